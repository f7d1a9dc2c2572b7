"""Write README.md from index.ipynb (the front page), without quarto and without nbconvert's template files.

Markdown cells are copied, code cells become ```python blocks, and their stored text outputs follow as plain
blocks (markdown outputs as markdown). Cells marked `#| hide` are left out, cells marked `#| echo: false` show only
their outputs, and `#|` directive lines are removed. `--check` writes nothing and exits 1
when README.md is out of date.
"""
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
HEADER = "<!-- Generated from index.ipynb by `python tools/make_readme.py`. Edit the notebook, not this file. -->\n"


def output_text(output) -> str | None:
    "The text of one stored output: a stream, or a result's markdown or plain text."
    if output.get("output_type") == "stream":
        return output.get("text", "")
    data = output.get("data", {})
    if "text/markdown" in data:
        return None if not data["text/markdown"] else "\n" + data["text/markdown"]
    return data.get("text/plain")


def cell_markdown(cell) -> str:
    if cell.cell_type == "markdown":
        return cell.source.strip()
    lines = cell.source.splitlines()
    if cell.cell_type != "code" or any(line.strip().startswith("#| hide") for line in lines):
        return ""
    code = "\n".join(line for line in lines if not line.startswith("#|")).strip()
    echo = not any(line.strip().replace(" ", "") == "#|echo:false" for line in lines)
    parts = [f"```python\n{code}\n```"] if code and echo else []
    for output in cell.get("outputs", []):
        text = output_text(output)
        if text and text.startswith("\n"):
            parts.append(text.strip())
        elif text:
            parts.append(f"```\n{text.rstrip()}\n```")
    return "\n\n".join(parts)


def readme_text(notebook_path: Path = ROOT / "index.ipynb") -> str:
    notebook = nbformat.read(notebook_path, as_version=4)
    blocks = [cell_markdown(cell) for cell in notebook.cells]
    return HEADER + "\n" + "\n\n".join(block for block in blocks if block) + "\n"


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
