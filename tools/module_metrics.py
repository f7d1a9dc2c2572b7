"""Lines, top-level definitions and the largest function of each module in jora/ (or in ROOT/jora/ when given), and
how many exported notebook cells (ROOT/nbs) are longer than 40 lines.

    python tools/module_metrics.py            # this checkout
    python tools/module_metrics.py /tmp/old   # a folder holding an older jora/ (git show ... > /tmp/old/jora/...)
"""
import ast
import json
import sys
from pathlib import Path


def module_metrics(root: Path) -> list[tuple[str, int, int, str, int]]:
    "(module, lines, top-level definitions, largest function, its lines) for each module, `_modidx` left out."
    rows = []
    for path in sorted((root / "jora").glob("*.py")):
        if path.stem == "_modidx":
            continue
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text)
        functions = [(node.end_lineno - node.lineno + 1, node.name) for node in ast.walk(tree)
                     if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
        largest = max(functions, default=(0, "-"))
        top_level = sum(isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)) for node in tree.body)
        rows.append((path.stem, len(text.splitlines()), top_level, largest[1], largest[0]))
    return rows


def exported_cell_lengths(root: Path) -> list[int]:
    "The length in lines of every `#| export` cell of the notebooks in ROOT/nbs."
    lengths = []
    for notebook in sorted((root / "nbs").glob("*.ipynb")):
        for cell in json.loads(notebook.read_text(encoding="utf-8"))["cells"]:
            source = "".join(cell["source"])
            if cell["cell_type"] == "code" and source.startswith("#| export"):
                lengths.append(len(source.splitlines()))
    return lengths


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1]
    for name, lines, top_level, function, function_lines in module_metrics(root):
        print(f"{name:10s} {lines:5d} lines {top_level:3d} top-level definitions, largest function {function} "
              f"({function_lines} lines)")
    lengths = exported_cell_lengths(root)
    print(f"{len(lengths)} exported cells, {sum(n > 40 for n in lengths)} over 40 lines, the largest {max(lengths)} lines")
