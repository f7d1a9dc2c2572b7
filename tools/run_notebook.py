"""Run notebooks top to bottom and store what they show, the way the notebook tests run them.

    python tools/run_notebook.py nbs/00_attention.ipynb [more notebooks ...]

Cells marked `#| eval: false` (long searches that write a results file) are neither run nor changed: their stored
outputs stay. Every other code cell gets the outputs of this run, less live widgets (progress bars), whose state
does not outlive the kernel. Run `nbdev-clean` afterwards, as before a commit.
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
exec((ROOT / "tests" / "conftest.py").read_text())   # the tests' environment: eight CPU devices, offline, quiet

import nbformat  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))
from test_notebooks import WIDGET, executed, skipped  # noqa: E402  (run exactly as the notebook tests run them)


def run(path: Path) -> None:
    "Execute `path` in its own folder and write the fresh outputs of every cell that ran back into it."
    stored, runnable = executed(path, timeout=1800)
    for before, after in zip(stored.cells, runnable.cells):
        if before.cell_type == "code" and not skipped(before):
            # a live widget (a progress bar) has no state once the kernel is gone: keep its text outputs only
            before.outputs = [output for output in after.outputs if WIDGET not in output.get("data", {})]
            before.execution_count = after.execution_count
    nbformat.write(stored, path)
    print(f"{path}: ran and stored")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for name in sys.argv[1:]:
        run(Path(name).resolve())
