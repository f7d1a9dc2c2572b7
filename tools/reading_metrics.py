"""How readable jora's core is, as four numbers (issue 43's measures), for this checkout or an older one:

1. lines of the core reading path: the modules a newcomer reads to follow one training step (model, LoRA, placement,
   step and loop, and what the model calls on the way), code lines only (no blank or comment lines);
2. the most parameters any public function of the forward path takes (`self`/`cls` not counted, `*args`/`**kw`
   counted as one each);
3. chapters with a forward import: notebooks in nbs/ that import (in any cell) a jora module exported by a later
   chapter, in the chapters' file-name order;
4. figures in chapter prose: numbers with a unit or a thousands separator in markdown cells (a cell's output is
   checked by the notebook tests; prose is not).

    python tools/reading_metrics.py            # this checkout
    python tools/reading_metrics.py /tmp/old   # a checkout of an older commit (git worktree add /tmp/old COMMIT)
"""
import ast
import json
import re
import sys
from pathlib import Path

# what the step's forward path runs through, module by module (update when modules move)
READING_PATH = ["model", "attention", "kernels", "memory", "lora", "sharding", "train"]
FORWARD_PATH = ["model", "attention", "kernels", "memory"]
FIGURE = re.compile(r"(?<![\w.])(\d{1,3}(,\d{3})+|\d+(\.\d+)?\s?(%|x\b|×|ms\b|s\b|seconds|minutes|GB|GiB|MB|MiB|KiB|"
                    r"tokens|tok/s|steps/s|bytes))")


def code_lines(path: Path) -> int:
    "Lines of `path` that hold code: not blank, not only a comment (docstrings count: they are read)."
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines()
               if line.strip() and not line.strip().startswith("#"))


def public_functions(path: Path):
    "(name, parameter count) of every public function and method of a module (names without a leading underscore)."
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            arguments = node.args
            names = [a.arg for a in arguments.posonlyargs + arguments.args + arguments.kwonlyargs]
            count = len([n for n in names if n not in ("self", "cls")]) + bool(arguments.vararg) + bool(arguments.kwarg)
            yield node.name, count


def chapter_modules(root: Path) -> dict[str, str]:
    "Which chapter (notebook stem) exports each module."
    chapters = {}
    for notebook in sorted((root / "nbs").glob("*.ipynb")):
        text = notebook.read_text(encoding="utf-8")
        found = re.search(r"#\| default_exp (\w+)", text)
        if found:
            chapters[found.group(1)] = notebook.stem
    return chapters


def forward_imports(root: Path) -> dict[str, list[str]]:
    "For each chapter, the later chapters' modules it imports."
    chapters = chapter_modules(root)
    order = sorted(set(chapters.values()))
    found = {}
    for notebook in sorted((root / "nbs").glob("*.ipynb")):
        source = "\n".join("".join(cell["source"]) for cell in json.loads(notebook.read_text(encoding="utf-8"))["cells"]
                           if cell["cell_type"] == "code")
        imported = set(re.findall(r"(?:from|import) jora\.(\w+)", source))
        later = sorted(m for m in imported if m in chapters and order.index(chapters[m]) > order.index(notebook.stem))
        if later:
            found[notebook.stem] = later
    return found


def prose_figures(root: Path) -> dict[str, int]:
    "For each chapter, how many figures its markdown cells state (code spans left out)."
    counts = {}
    for notebook in sorted((root / "nbs").glob("*.ipynb")):
        cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
        prose = "\n".join(re.sub(r"`[^`]*`", "", "".join(c["source"])) for c in cells if c["cell_type"] == "markdown")
        count = len(FIGURE.findall(prose))
        if count:
            counts[notebook.stem] = count
    return counts


def reading_metrics(root: Path) -> dict:
    path_lines = {m: code_lines(root / "jora" / f"{m}.py") for m in READING_PATH if (root / "jora" / f"{m}.py").exists()}
    widest = max((count, f"{module}.{name}") for module in FORWARD_PATH if (root / "jora" / f"{module}.py").exists()
                 for name, count in public_functions(root / "jora" / f"{module}.py"))
    forward, figures = forward_imports(root), prose_figures(root)
    return {"core_reading_path_lines": sum(path_lines.values()), "by_module": path_lines,
            "most_parameters": widest[0], "widest_function": widest[1],
            "chapters_with_forward_import": len(forward), "forward_imports": forward,
            "prose_figures": sum(figures.values()), "prose_figures_by_chapter": figures}


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent
    print(json.dumps(reading_metrics(root), indent=1))
