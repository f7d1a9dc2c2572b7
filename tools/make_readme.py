"""Write README.md from index.ipynb (the front page), without quarto.

Cells marked `#| hide` are left out, `#|` directive lines are removed, and stored outputs are kept.
`--check` writes nothing and exits 1 when README.md is out of date.
"""
import sys
from pathlib import Path

import nbformat
from nbconvert import MarkdownExporter

ROOT = Path(__file__).resolve().parents[1]
HEADER = "<!-- Generated from index.ipynb by `python tools/make_readme.py`. Edit the notebook, not this file. -->\n\n"


def readme_text(notebook_path: Path = ROOT / "index.ipynb") -> str:
    notebook = nbformat.read(notebook_path, as_version=4)
    kept = []
    for cell in notebook.cells:
        lines = cell.source.splitlines()
        if cell.cell_type == "code":
            if any(line.strip().startswith("#| hide") for line in lines):
                continue
            cell.source = "\n".join(line for line in lines if not line.startswith("#|")).strip()
        kept.append(cell)
    notebook.cells = kept
    body, _ = MarkdownExporter(exclude_input_prompt=True, exclude_output_prompt=True).from_notebook_node(notebook)
    return HEADER + body.strip() + "\n"


def main(argv: list[str]) -> int:
    text, readme = readme_text(), ROOT / "README.md"
    if "--check" in argv:
        if not readme.exists() or readme.read_text(encoding="utf-8") != text:
            print("README.md is out of date: run `python tools/make_readme.py`.")
            return 1
        return 0
    readme.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
