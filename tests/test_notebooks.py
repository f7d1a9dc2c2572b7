"""Every notebook is a test: each one runs top to bottom (its hidden check cells included) as one pytest item, and the
text it shows must be what the current code prints. A cell whose shown output cannot repeat (timings, a progress bar,
a random temporary folder in a sentence) says so on a line `# output varies: <why>`; its output is not compared.
Cells marked `#| eval: false` (long searches that write a results file) are not run.

Numbers with a fraction or an exponent are compared within `FLOAT_TOLERANCE` (absolute and relative), the rest of the
text exactly but for whitespace: float results differ in their last digits from one CPU to another (XLA's and torch's
kernels differ between AVX2 and AVX-512 machines), and a pretty printer re-aligns columns and re-breaks lines when a
number's width changes. A change in any integer, word or figure beyond the last digits still fails."""
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


FLOAT_TOLERANCE = 1e-5
NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


def text_and_numbers(text: str) -> tuple[str, list[str]]:
    "The text with its numbers taken out and its whitespace removed, and the numbers in order."
    return re.sub(r"\s+", "", NUMBER.sub("#", text)), NUMBER.findall(text)


def same_number(before: str, after: str) -> bool:
    "Integers equal; numbers with a fraction or exponent within `FLOAT_TOLERANCE`, absolute and relative."
    if not re.search(r"[.eE]", before + after):
        return int(before) == int(after)
    a, b = float(before), float(after)
    return abs(a - b) <= FLOAT_TOLERANCE * (1 + max(abs(a), abs(b)))


def same_output(before: str, after: str) -> bool:
    "Whether two shown outputs say the same (see the module's note on numbers and whitespace)."
    (text_before, numbers_before), (text_after, numbers_after) = text_and_numbers(before), text_and_numbers(after)
    return (text_before == text_after and len(numbers_before) == len(numbers_after)
            and all(map(same_number, numbers_before, numbers_after)))


def differences(stored, executed) -> list[str]:
    "The code cells (not marked as varying) whose fresh text output differs from the stored one."
    found = []
    for before, after in zip(stored.cells, executed.cells):
        if before.cell_type != "code" or skipped(before) or VARIES in before.source:
            continue
        if not same_output(shown_text(before), shown_text(after)):
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


def test_outputs_differing_in_the_last_float_digits_are_the_same_and_others_are_not():
    "The comparison forgives a CPU's last digits and a re-aligned table, never a changed word, integer or figure."
    assert same_output("([3.6579198837280273, 13.1], 5.60239855448405)",
                       "([3.6579196453094482, 13.1],\n 5.6023984750111895)")
    assert same_output("all_gather     9.536743e-07  5.9e-08", "all_gather              0.0  6.8e-08")
    assert same_output("[ 0.9999995, -1.999999 ]]", "[ 0.9999996, -1.9999992]]")
    assert not same_output("max difference: 1.79e-06", "max difference: 2.1e-03")
    assert not same_output("loss 5.806002", "loss 5.816002")
    assert not same_output("{'new_tokens': 8}", "{'new_tokens': 9}")
    assert not same_output("same_greedy_tokens: True", "same_greedy_tokens: False")
    assert not same_output("shape (2, 3)", "shape (2, 3, 1)")
