"""Which public functions of each module no chapter shows running: a callable in a module's `__all__` counts as
shown when its name appears in a visible code cell (not exported, not hidden) of a notebook.

    python tools/shown_functions.py
"""
import importlib
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def visible_code() -> str:
    "The source of every code cell a reader sees: not `#| export` and not `#| hide`."
    cells = []
    for notebook in [ROOT / "index.ipynb", *sorted((ROOT / "nbs").glob("*.ipynb"))]:
        for cell in json.loads(notebook.read_text(encoding="utf-8"))["cells"]:
            source = "".join(cell["source"])
            if cell["cell_type"] == "code" and not source.lstrip().startswith(("#| export", "#| hide")):
                cells.append(source)
    return "\n".join(cells)


def main() -> None:
    text = visible_code()
    modules = [path.stem for path in sorted((ROOT / "jora").glob("*.py")) if path.stem not in ("__init__", "_modidx")]
    total, missing = 0, {}
    for name in modules:
        module = importlib.import_module(f"jora.{name}")
        public = sorted(n for n in getattr(module, "__all__", []) if callable(getattr(module, n)))
        total += len(public)
        unshown = [n for n in public if not re.search(rf"\b{re.escape(n)}\b", text)]
        if unshown:
            missing[name] = unshown
    print(f"{total} public callables, {sum(map(len, missing.values()))} not shown running in a visible cell")
    for name, unshown in missing.items():
        print(f"  {name}: {', '.join(unshown)}")


if __name__ == "__main__":
    main()
