"""Multi-host training, as two local processes under `jax.distributed` (two CPU devices each, one 2 x 2 data x model
mesh across them): the losses equal one process's on the same mesh, process 0 writes the checkpoints, and a stopped
run resumes there too."""
import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jora.files import checkpoints
from jora.formats import load_lora
from jora.train import train_lora
from multihost_case import case_config, case_datasets, write_case

HERE = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    "Both processes' results, and the folder they trained in."
    folder = tmp_path_factory.mktemp("multihost")
    write_case(folder)
    (folder / "users").mkdir()
    (folder / "users" / "thesis.tex").write_text("years of work")
    port = str(free_port())
    workers = [subprocess.Popen([sys.executable, str(HERE / "multihost_worker.py"), str(number), port, str(folder)],
                                cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for number in (0, 1)]
    outputs = []
    for worker in workers:
        try:
            output, _ = worker.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for other in workers: other.kill()
            raise
        assert worker.returncode == 0, output[-3000:]
        outputs.append(output)
    results = [json.loads(line[len("RESULT "):]) for output in outputs for line in output.splitlines()
               if line.startswith("RESULT ")]
    return folder, sorted(results, key=lambda result: result["process"])


def test_two_processes_train_as_one(two_processes, tmp_path):
    folder, (first, second) = two_processes
    assert first["devices"] == second["devices"] == 4          # one global mesh across both processes
    assert first == {**second, "process": 0, "refused": first["refused"]}   # both processes report the same run
    config = case_config(folder)
    train, test = case_datasets(folder, config)
    alone = train_lora(config, train, tmp_path / "alone", eval_dataset=test, progress=False)   # 4 of 8 devices here
    np.testing.assert_allclose(first["whole"], [r["loss"] for r in alone.history], rtol=1e-5)
    np.testing.assert_allclose(first["eval"], [r["eval_loss"] for r in alone.history if "eval_loss" in r], rtol=1e-5)
    written, _ = load_lora(checkpoints(folder / "whole")[-1])   # written once, by process 0
    for name in alone.lora_config.targets:
        np.testing.assert_allclose(np.asarray(written.adapters[name]["lora_B"]),
                                   np.asarray(alone.lora.adapters[name]["lora_B"]), rtol=1e-4, atol=1e-6)
    assert [p.name for p in checkpoints(folder / "whole")] == ["step-00000002", "step-00000004"]


def test_a_stopped_two_process_run_resumes(two_processes):
    _, (first, _) = two_processes
    assert len(first["part"]) == 2 and len(first["rest"]) == 4
    np.testing.assert_array_equal(first["rest"], first["whole"])   # the resumed run is the whole run, to the bit
    np.testing.assert_array_equal(first["part"], first["whole"][:2])


def test_an_error_on_process_0_stops_every_process(two_processes):
    "Process 0 refuses a user's folder as checkpoints; process 1 gets its message instead of waiting forever."
    folder, (first, second) = two_processes
    assert first["refused"].startswith(f"UnsafeFolderError: {folder / 'users'} already holds files jora did not write")
    assert second["refused"].startswith(f"FirstProcessError: Process 0 failed at preparing {folder / 'users'}: "
                                        f"UnsafeFolderError: {folder / 'users'} already holds files")
    assert sorted(p.name for p in (folder / "users").iterdir()) == ["thesis.tex"]
