"""Every notebook is a test: each one runs top to bottom (its hidden check cells included) as one pytest item, and the
text it shows must be what the current code prints. A cell whose shown output cannot repeat (timings, a progress bar,
a random temporary folder in a sentence) says so on a line `# output varies: <why>`; its output is not compared.
Cells marked `#| eval: false` (long searches that write a results file) are not run."""
import copy
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = [ROOT / "index.ipynb", *sorted((ROOT / "nbs").glob("*.ipynb")), ROOT / "bench" / "results.ipynb"]
VARIES = "# output varies"
WIDGET = "application/vnd.jupyter.widget-view+json"   # a live panel or progress bar: interactive, not text


def skipped(cell) -> bool:
    "A cell the notebook tests do not run."
    return cell.cell_type == "code" and re.search(r"^#\|\s*eval:\s*false", cell.source, re.M) is not None


def shown_text(cell) -> str:
    "What a reader sees of a code cell as text: its printed output and its results' plain text (not stderr, not widgets)."
    parts = []
    for output in cell.get("outputs", []):
        data = output.get("data", {})
        if output.get("output_type") == "stream" and output.get("name") == "stdout":
            parts.append(output.get("text", ""))
        elif output.get("output_type") in ("execute_result", "display_data") and WIDGET not in data:
            parts.append(data.get("text/plain", ""))
    return normalised("".join(parts))


def normalised(text: str) -> str:
    "Text with what legitimately changes from run to run removed: temporary folders and object addresses."
    text = re.sub(r"/tmp/[^\s'\"),\]]+", "<tmp>", text)
    return re.sub(r"0x[0-9a-f]{6,}", "0x…", text).rstrip()


def differences(stored, executed) -> list[str]:
    "The code cells (not marked as varying) whose fresh text output differs from the stored one."
    found = []
    for before, after in zip(stored.cells, executed.cells):
        if before.cell_type != "code" or skipped(before) or VARIES in before.source:
            continue
        if shown_text(before) != shown_text(after):
            found.append(f"cell {before.get('id')}:\n--- stored\n{shown_text(before)[:600]}\n--- now\n"
                         f"{shown_text(after)[:600]}")
    return found


def executed(notebook: Path, timeout: int = 900):
    "The notebook as stored, and a copy run top to bottom in its own folder with the skipped cells left empty."
    stored = nbformat.read(notebook, as_version=4)
    runnable = copy.deepcopy(stored)
    for cell in runnable.cells:
        if skipped(cell):
            cell.source = ""
    NotebookClient(runnable, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(notebook.parent)}}).execute()
    return stored, runnable


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda path: path.name)
def test_notebook_runs_and_shows_what_the_code_prints(notebook):
    stored, runnable = executed(notebook)
    stale = differences(stored, runnable)
    assert not stale, (f"{notebook.relative_to(ROOT)}: {len(stale)} cell(s) show output the code no longer prints; "
                       f"run the notebook again (or mark a cell `{VARIES}: <why>`):\n\n" + "\n\n".join(stale))
