"""Every notebook is a test: each one runs top to bottom (its hidden check cells included) as one pytest item."""
from pathlib import Path

import pytest

import nbdev.test as nbdev_test

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = [ROOT / "index.ipynb", *sorted((ROOT / "nbs").glob("*.ipynb")), ROOT / "bench" / "results.ipynb"]


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda path: path.name)
def test_notebook_runs(notebook):
    succeeded, _seconds = nbdev_test.test_nb(notebook, cell_timeout=900)
    assert succeeded, f"{notebook.relative_to(ROOT)} failed; its error is printed above"
