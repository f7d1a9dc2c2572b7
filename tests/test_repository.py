"""Repository hygiene the tests can see: notebooks committed without widget state or bulky outputs, no pickle,
no trust_remote_code, and an import of jora that touches no device."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = [ROOT / "index.ipynb", *sorted((ROOT / "nbs").glob("*.ipynb")), ROOT / "bench" / "results.ipynb"]
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda path: path.name)
def test_notebook_has_no_widget_state_or_bulky_outputs(notebook):
    content = json.loads(notebook.read_text(encoding="utf-8"))
    assert "widgets" not in content["metadata"], f"{notebook.name}: widget state in the notebook metadata"
    for cell in content["cells"]:
        for output in cell.get("outputs", []):
            assert WIDGET_VIEW not in output.get("data", {}), f"{notebook.name}: widget output in cell {cell.get('id')}"
            size = len(json.dumps(output))
            assert size < 200_000, f"{notebook.name}: an output of {size} bytes in cell {cell.get('id')}"


def test_no_pickle_or_remote_code():
    sources = [*sorted((ROOT / "jora").glob("*.py")), *sorted((ROOT / "bench").glob("*.py")), *NOTEBOOKS]
    for path in sources:
        text = path.read_text(encoding="utf-8")
        for forbidden in ("import pickle", "pickle.load", "torch.load(", "trust_remote_code=True"):
            assert forbidden not in text, f"{path.relative_to(ROOT)} contains {forbidden!r}"


def test_import_touches_no_device():
    "Importing every module must not initialise a JAX backend (so it works on any machine, GPU or not)."
    code = ("import jax._src.xla_bridge as xb, importlib, pkgutil, jora\n"
            "for m in pkgutil.iter_modules(jora.__path__): importlib.import_module('jora.' + m.name)\n"
            "assert not xb._backends, xb._backends\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
