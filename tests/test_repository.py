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


def test_the_papers_imports_work_from_the_top_level_and_import_jora_stays_light():
    "The paper's snippet imports from `jora` itself; `import jora` alone loads neither JAX nor transformers."
    code = ("import sys, jora\n"
            "assert not {'jax', 'transformers', 'torch'} & set(sys.modules), sorted(sys.modules)\n"
            "from jora import train_lora, ParallamaConfig, generate_alpaca_dataset\n"
            "from jora.train import train_lora as direct\n"
            "assert train_lora is direct and ParallamaConfig._fields[0] == 'JAX_PARAMS_PATH'\n"
            "assert set(jora.__all__) <= set(dir(jora))\n"
            "try:\n"
            "    jora.no_such_name\n"
            "except AttributeError as error:\n"
            "    assert 'no_such_name' in str(error)\n"
            "else:\n"
            "    raise SystemExit('a missing name did not raise')\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_pyproject_and_the_main_path_need_no_torch(tmp_path):
    """`pip install jora` pulls no torch (it is in the `torch` and `dev` extras only), and with torch impossible to
    import, a tiny checkpoint is written, loaded and run, and the paper's dataset builds (as a plain sequence)."""
    import tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.startswith("torch")]
    assert any(d.startswith("torch") for d in project["optional-dependencies"]["torch"])
    assert any(d.startswith("torch") for d in project["optional-dependencies"]["dev"])
    code = f"""
import json, sys
sys.modules["torch"] = None                      # any `import torch` now raises ImportError
import numpy as np
from jora import generate_alpaca_dataset, ParallamaConfig
from jora.model import forward
from jora.formats import load_hf_checkpoint
from jora.testing import save_tiny_hf_checkpoint
folder = save_tiny_hf_checkpoint({str(tmp_path / "tiny")!r}, "llama3.1", max_shard_size="60KB")
config, params = load_hf_checkpoint(folder)
logits = forward(config, params, np.array([[1, 5, 9]]))
assert logits.shape == (1, 3, config.vocab_size) and np.isfinite(np.asarray(logits)).all()
records = [{{"instruction": "Which capital?", "input": "France: Paris", "output": "Paris"}}] * 5
(folder / "data.json").write_text(json.dumps(records))
dataset = generate_alpaca_dataset(folder / "data.json", "train", ParallamaConfig(LLAMA2_HF_PATH=str(folder)))
assert len(dataset) == 4 and type(dataset).__mro__[1] is object
assert "torch" not in {{name.split(".")[0] for name, module in sys.modules.items() if module is not None}}
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


MODULE_ORDER = ["attention", "kernels", "memory", "model", "sharding", "lora", "data", "retrieval", "files", "formats", "testing", "config",
                "train", "export", "evaluate", "form", "gui", "raft", "cli"]


def test_modules_import_one_way():
    "Each module imports only the jora modules before it in MODULE_ORDER (CONTRIBUTING.md's one-way order), lazily or not."
    import ast
    modules = {path.stem for path in (ROOT / "jora").glob("*.py")} - {"__init__", "_modidx"}
    assert modules == set(MODULE_ORDER), modules ^ set(MODULE_ORDER)
    for name in MODULE_ORDER:
        tree = ast.parse((ROOT / "jora" / f"{name}.py").read_text(encoding="utf-8"))
        imported = {node.module.removeprefix("jora.") for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                    and node.module and (node.level == 1 or node.module.startswith("jora."))}
        later = imported & set(MODULE_ORDER[MODULE_ORDER.index(name):])
        assert not later, f"jora.{name} imports {sorted(later)}, which come after it"
