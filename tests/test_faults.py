"""Faults and bad input, as a new user meets them: every command and API that writes refuses a user's folder, the base
model and the checkpoints; damaged checkpoints are skipped with a warning; killed runs are cleaned up; full and
read-only disks fail before training or leave the earlier checkpoints; flags mean what they say; the command line
shows one line per expected error. Each test first checks that the user's files are byte-identical afterwards."""
import contextlib
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from jora.data import RecordError, load_tokenizer, read_records
from jora.export import merge_to_hf
from jora.formats import save_peft_adapter
from jora.files import (CheckpointError, CheckpointWarning, UnsafeFolderError, WriteError, checkpoints,
                        describe_checkpoints, latest_checkpoint)
from jora.form import command_line
from jora.gui import panels
from jora.formats import checkpoint_tensor_files
from jora.testing import save_tiny_hf_checkpoint
from jora.train import train_lora
from jora.config import FIELD_CHOICES, ParallamaConfig
from jora.cli import config_from_arguments, train_argument_parser, train_main
from jora.formats import load_lora
from test_train import datasets, losses, small_config  # the same tiny run as the training tests

JORA = [sys.executable, "-c", "import sys, jora.cli; sys.exit(jora.cli.main())"]
MERGER = [sys.executable, "-c", "import sys, jora.export as e; sys.exit(e.huggingface_merger())"]


def snapshot(folder: Path) -> dict:
    "Every file under `folder` (relative path -> sha256), to show that nothing was changed, added or removed."
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(folder.rglob("*"))}


def users_folder(path: Path) -> Path:
    "A folder of a user's own files."
    (path / "notes").mkdir(parents=True)
    (path / "thesis.tex").write_text("years of work")
    (path / "notes" / "ideas.md").write_text("more work")
    return path


def one_error_line(process) -> str:
    "The stderr of a command that failed with an expected error: exit status 1 and one line, no traceback."
    assert process.returncode == 1, (process.returncode, process.stderr[-3000:])
    lines = [line for line in process.stderr.splitlines() if line.strip() and ": warning: " not in line]
    assert len(lines) == 1 and "Traceback" not in process.stderr, process.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from jora.data import format_prompt
    from jora.testing import demo_raft_records
    folder = tmp_path_factory.mktemp("faults")
    data = folder / "raft.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in demo_raft_records(40, seed=1)))
    model = save_tiny_hf_checkpoint(folder / "tiny", "llama3.1",
                                    corpus=[format_prompt(r) + r["output"] for r in demo_raft_records(200)])
    return folder, data, model


@pytest.fixture(scope="module")
def finished_run(setup, tmp_path_factory):
    "A run stopped at step 4 with checkpoints at steps 2 and 4, and the uninterrupted run's losses."
    _, data, model = setup
    config = small_config(model, CHECKPOINT_EVERY=2, KEEP_CHECKPOINTS=3)
    train, _ = datasets(data, config)
    folder = tmp_path_factory.mktemp("finished")
    train_lora(config, train, folder / "run", progress=False, stop_after=4)
    whole = train_lora(config, train, folder / "whole", progress=False)
    return config, train, folder / "run", losses(whole)


# ---- 1. jora never deletes or overwrites a folder it did not create ----

def test_merger_refuses_a_users_folder_and_the_base_models_parent(setup, finished_run, tmp_path):
    folder, _, model = setup
    _, _, run, _ = finished_run
    users = users_folder(tmp_path / "users")
    before, model_before = snapshot(users), snapshot(folder)
    line = one_error_line(subprocess.run([*MERGER, str(model), str(run), str(users)], capture_output=True, text=True))
    assert snapshot(users) == before
    assert line.startswith("huggingface_merger: error:") and "holds files jora did not write" in line
    assert str(users) in line
    line = one_error_line(subprocess.run([*MERGER, str(model), str(run), str(folder)], capture_output=True, text=True))
    assert snapshot(folder) == model_before  # the base model and everything beside it
    assert "is, contains or lies inside" in line
    line = one_error_line(subprocess.run([*MERGER, str(model), str(run), str(run / "step-00000004")],
                                         capture_output=True, text=True))
    assert snapshot(folder) == model_before and "lies inside" in line  # a checkpoint is not a merge (nor is inside one)


def test_merge_overwrite_replaces_only_the_files_jora_wrote(setup, finished_run, tmp_path):
    _, _, model = setup
    _, _, run, _ = finished_run
    merged = merge_to_hf(model, run, tmp_path / "merged")
    (merged / "my-eval.txt").write_text("mine")
    first = snapshot(merged)
    with pytest.raises(UnsafeFolderError, match="holds an earlier jora merged model; .* pass --overwrite"):
        merge_to_hf(model, run, merged)
    assert snapshot(merged) == first
    process = subprocess.run([*MERGER, str(model), str(run), str(merged), "--overwrite"], capture_output=True, text=True)
    assert process.returncode == 0, process.stderr[-2000:]
    assert snapshot(merged) == first  # same inputs, same bytes; the user's file is still there
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no temporary folder left beside it


def test_adapter_export_refuses_foreign_folders_the_base_model_and_the_checkpoints(setup, finished_run, tmp_path):
    folder, _, model = setup
    _, _, run, _ = finished_run
    lora, lora_config = load_lora(latest_checkpoint(run))
    users = users_folder(tmp_path / "users")
    before, model_before, run_before = snapshot(users), snapshot(folder), snapshot(run)
    for target, message in [(users, "holds files jora did not write"), (model, "is, contains or lies inside"),
                            (folder, "is, contains or lies inside"), (run, "is, contains or lies inside")]:
        with pytest.raises(UnsafeFolderError, match=message):
            save_peft_adapter(target, lora, lora_config, str(model), protected=[run])
    assert (snapshot(users), snapshot(folder), snapshot(run)) == (before, model_before, run_before)
    written = save_peft_adapter(tmp_path / "adapter", lora, lora_config, str(model))
    assert (written / "adapter_model.safetensors").is_file()


def test_training_refuses_a_users_folder_and_the_model_folder_for_params_and_checkpoints(setup, tmp_path):
    folder, data, model = setup
    users = users_folder(tmp_path / "users")
    before, model_before = snapshot(users), snapshot(folder)
    config = small_config(model, MAX_STEPS=1)
    train, _ = datasets(data, config)
    with pytest.raises(UnsafeFolderError, match="holds files jora did not write"):  # JAX_PARAMS_PATH
        train_lora(config._replace(JAX_PARAMS_PATH=str(users)), train, tmp_path / "a", progress=False)
    with pytest.raises(UnsafeFolderError, match="is, contains or lies inside"):
        train_lora(config._replace(JAX_PARAMS_PATH=str(model)), train, tmp_path / "b", progress=False)
    for target in (users, model, folder):  # checkpoint_path
        with pytest.raises(UnsafeFolderError):
            train_lora(config, train, target, progress=False)
    assert snapshot(users) == before and snapshot(folder) == model_before
    cache = tmp_path / "params"
    train_lora(config._replace(JAX_PARAMS_PATH=str(cache)), train, tmp_path / "c", progress=False)
    assert json.loads((cache / ".jora-output.json").read_text())["kind"] == "converted parameters"


def test_starting_over_needs_overwrite(finished_run, tmp_path):
    config, train, run, _ = finished_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    before = snapshot(copy)
    with pytest.raises(UnsafeFolderError, match="holds checkpoints of an earlier run .* --overwrite"):
        train_lora(config, train, copy, progress=False, resume=False)
    assert snapshot(copy) == before
    result = train_lora(config, train, copy, progress=False, resume=False, overwrite=True, stop_after=2)
    assert [p.name for p in checkpoints(copy)] == ["step-00000002"] and len(result.history) == 2


def test_panel_export_refuses_an_empty_path_and_a_users_folder(setup, finished_run, tmp_path, monkeypatch):
    _, data, model = setup
    config, _, run, _ = finished_run
    monkeypatch.chdir(users_folder(tmp_path / "working-folder"))
    before = snapshot(tmp_path)
    ui = panels(config, str(data), str(run))
    ui.export.adapter_path.value = ""
    ui.export.save_adapter()
    assert "No folder given for the PEFT adapter" in ui.export.status.value and "b00020" in ui.export.status.value
    ui.export.merged_path.value = str(tmp_path / "working-folder")
    ui.export.merge()
    assert "holds files jora did not write" in ui.export.status.value
    assert snapshot(tmp_path) == before
    ui.export.adapter_path.value = str(tmp_path / "adapter")
    assert ui.export.save_adapter()
    assert "PEFT adapter of step 4" in ui.export.status.value and f"written to {tmp_path / 'adapter'}" in ui.export.status.value
    assert not ui.export.save_adapter()
    assert "tick &#x27;replace an earlier export in that folder&#x27;" in ui.export.status.value
    ui.export.overwrite.value = True
    assert ui.export.save_adapter() and "PEFT adapter of step 4" in ui.export.status.value


def test_demo_refuses_a_users_folder(tmp_path):
    users = users_folder(tmp_path / "users")
    before = snapshot(users)
    line = one_error_line(subprocess.run([*JORA, "demo", "--tiny", "--folder", str(users)], capture_output=True, text=True))
    assert snapshot(users) == before and line.startswith("jora demo: error:") and "jora did not write" in line


# ---- 2. checkpoints carry a manifest; resume takes the newest that verifies ----

def damage(folder: Path, how: str) -> None:
    if how == "truncated lora":
        path = folder / "lora.safetensors"
        path.write_bytes(path.read_bytes()[:-50])
    elif how == "garbled optimizer header":
        path = folder / "optimizer.safetensors"
        data = bytearray(path.read_bytes())
        data[8:24] = b"#" * 16
        path.write_bytes(bytes(data))
    elif how == "flipped tensor byte":
        path = folder / "lora.safetensors"
        data = bytearray(path.read_bytes())
        data[-7] ^= 0x55
        path.write_bytes(bytes(data))
    elif how == "empty state":
        (folder / "state.json").write_text("")
    elif how == "truncated state":
        path = folder / "state.json"
        path.write_text(path.read_text()[:40])
    elif how == "no manifest":
        (folder / "manifest.json").unlink()


@pytest.mark.parametrize("how", ["truncated lora", "garbled optimizer header", "flipped tensor byte", "empty state",
                                 "truncated state", "no manifest"])
def test_a_damaged_checkpoint_is_skipped_with_a_warning_naming_it(finished_run, tmp_path, how):
    _, _, run, _ = finished_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    damage(copy / "step-00000004", how)
    with pytest.warns(CheckpointWarning, match=r"Skipping damaged checkpoint .*step-00000004: "):
        assert latest_checkpoint(copy).name == "step-00000002"
    lines, resume_from = describe_checkpoints(copy)
    assert resume_from.name == "step-00000002" and any(line.startswith("step-00000004: damaged") for line in lines)
    if how != "no manifest":
        with pytest.raises(CheckpointError, match="step-00000004 is damaged"):
            load_lora(copy / "step-00000004")


def test_resume_falls_back_past_a_damaged_checkpoint_and_keeps_it(finished_run, tmp_path):
    config, train, run, whole = finished_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    damage(copy / "step-00000004", "flipped tensor byte")
    damaged = snapshot(copy / "step-00000004")
    with pytest.warns(CheckpointWarning):
        resumed = train_lora(config, train, copy, progress=False)
    np.testing.assert_array_equal(losses(resumed), whole)  # the same run as one without the damage
    assert snapshot(copy / "step-00000004.damaged") == damaged  # set aside, not deleted
    assert latest_checkpoint(copy).name == f"step-{len(whole):08d}"


def test_resume_ignores_foreign_step_folders_and_compares_steps_as_numbers(finished_run, tmp_path):
    config, train, run, whole = finished_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    shutil.copytree(copy / "step-00000002", copy / "step-backup")
    (copy / "step-zzz").mkdir()
    (copy / "step-zzz" / "state.json").write_text("garbage")
    shutil.copytree(copy / "step-00000002", copy / "step-2")  # not eight digits: not a jora step folder
    foreign = {name: snapshot(copy / name) for name in ("step-backup", "step-zzz", "step-2")}
    assert latest_checkpoint(copy).name == "step-00000004"
    resumed = train_lora(config, train, copy, progress=False)
    np.testing.assert_array_equal(losses(resumed), whole)
    again = train_lora(config, train, copy, progress=False)  # a second run: already finished, loses nothing
    np.testing.assert_array_equal(losses(again), whole)
    assert {name: snapshot(copy / name) for name in foreign} == foreign
    assert [p.name for p in checkpoints(copy)][-1] == f"step-{len(whole):08d}"


def test_rotation_keeps_the_newest_verified_checkpoint(finished_run, tmp_path):
    config, train, run, whole = finished_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    damage(copy / "step-00000004", "truncated lora")
    with pytest.warns(CheckpointWarning):
        train_lora(config._replace(KEEP_CHECKPOINTS=1), train, copy, progress=False, stop_after=3)
    assert [p.name for p in checkpoints(copy)] == ["step-00000003"]
    assert (copy / "step-00000004").is_dir()  # damaged, newer by number: never taken, never deleted


def test_killed_runs_leave_nothing_behind_after_the_next_start(setup, finished_run, tmp_path):
    "A real SIGKILL in the middle of rotation's deletion, and a killed write's temporary folder from a dead process."
    _, data, _ = setup
    config, train, run, whole = finished_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    child = textwrap.dedent(f"""
        import os, signal, shutil, jora.files as files, jora.train as train
        from jora.data import AlpacaDataset
        config = train.ParallamaConfig(**{config._replace(KEEP_CHECKPOINTS=1)._asdict()!r})
        dataset = AlpacaDataset(path={str(data)!r}, split="train", tokenizer=config.LLAMA2_HF_PATH,
                                max_len=config.MAX_SEQ_LEN, alpaca_mix=0)
        real_rmtree = shutil.rmtree
        def dying_rmtree(path, *args, **kwargs):
            if os.path.basename(str(path)).startswith(".deleting-"):
                victim = os.path.join(str(path), "lora.safetensors")
                os.remove(victim)  # half deleted
                os.kill(os.getpid(), signal.SIGKILL)
            return real_rmtree(path, *args, **kwargs)
        files.shutil.rmtree = dying_rmtree
        train.train_lora(config, dataset, {str(copy)!r}, progress=False)
    """)
    process = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=600)
    assert process.returncode == -signal.SIGKILL, process.stderr[-2000:]
    left = sorted(p.name for p in copy.iterdir())
    assert any(name.startswith(".deleting-step-") for name in left), left
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket
    stale = copy / f".tmp-step-00000006-{dead.stdout.strip()}@{socket.gethostname()}"
    stale.mkdir()
    alive = copy / f".tmp-step-00000007-{os.getpid()}@{socket.gethostname()}"  # a running process's: kept
    alive.mkdir()
    with pytest.warns(CheckpointWarning, match="left by a killed run"):
        resumed = train_lora(config, train, copy, progress=False)
    np.testing.assert_array_equal(losses(resumed), whole)
    left = sorted(p.name for p in copy.iterdir() if p.name.startswith("."))
    assert left == [".jora-output.json", ".jora-run.lock", alive.name], left   # the lock file stays, unheld


# ---- 3. fail before training, not after ----

@contextlib.contextmanager
def small_disk(path: Path, size: str, read_only: bool = False):
    "A tmpfs of `size` at `path` (root only; the test is skipped where mounting is not allowed)."
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_read_only_checkpoint_folder_fails_before_step_one(setup, tmp_path):
    _, data, model = setup
    config = small_config(model, MAX_STEPS=2)
    train, _ = datasets(data, config)
    steps = []
    with small_disk(tmp_path / "disk", "1m", read_only=True) as disk:
        with pytest.raises(WriteError, match=rf"{disk}.*read-only.*no training was done"):
            train_lora(config, train, disk / "run", progress=False, callbacks=[lambda e, i: steps.append(e)])
        assert list(disk.iterdir()) == []
    assert steps == []


def test_a_disk_too_small_for_a_checkpoint_fails_before_step_one(setup, tmp_path):
    _, data, model = setup
    config = small_config(model, MAX_STEPS=2)
    train, _ = datasets(data, config)
    with small_disk(tmp_path / "disk", "64k") as disk:
        with pytest.raises(WriteError, match=r"MiB free, but a checkpoint needs about .* no training was done"):
            train_lora(config, train, disk / "run", progress=False)
        assert sorted(p.name for p in (disk / "run").iterdir()) == [".jora-output.json", ".jora-run.lock"]


def test_a_disk_that_fills_up_keeps_the_earlier_checkpoint_and_leaks_nothing(setup, tmp_path):
    _, data, model = setup
    config = small_config(model, MAX_STEPS=4, CHECKPOINT_EVERY=2)
    train, _ = datasets(data, config)
    with small_disk(tmp_path / "disk", "4m") as disk:
        def fill_the_disk(event, info):
            if event == "checkpoint":  # after the first checkpoint, another program takes the rest of the disk
                with open(disk / "filler", "wb", buffering=0) as handle:   # unbuffered: closing it writes nothing
                    with contextlib.suppress(OSError):
                        while True:
                            handle.write(b"\0" * 65536)
        with pytest.raises(WriteError, match=r"Could not write checkpoint .*step-00000004: the disk is full\. The "
                                             r"earlier checkpoints are untouched \(newest: step-00000002\)"):
            train_lora(config, train, disk / "run", progress=False, callbacks=[fill_the_disk])
        assert sorted(p.name for p in (disk / "run").iterdir()) == [".jora-output.json", ".jora-run.lock", "metrics.jsonl",
                                                                    "step-00000002"]
        assert [p.name for p in checkpoints(disk / "run")] == ["step-00000002"]
        (disk / "filler").unlink()
        with pytest.raises(WriteError, match="the disk is full. Nothing there was changed"):
            with open(disk / "filler", "wb", buffering=0) as handle:  # now the merge meets a full disk
                with contextlib.suppress(OSError):
                    while True:
                        handle.write(b"\0" * 65536)
                os.truncate(disk / "filler", max(0, os.path.getsize(disk / "filler") - 30000))
                merge_to_hf(model, disk / "run", disk / "merged")
        assert sorted(p.name for p in disk.iterdir()) == ["filler", "run"]


# ---- 4. settings mean what they say ----

def non_default_values():
    "A value other than the default for every field, as a user would set it."
    values = {}
    for field, default in ParallamaConfig._field_defaults.items():
        if field in FIELD_CHOICES:                      # REMAT, DTYPE, ATTENTION_IMPLEMENTATION: another choice
            values[field] = next(choice for choice in reversed(FIELD_CHOICES[field]) if choice != default)
        elif isinstance(default, bool):
            values[field] = not default
        elif isinstance(default, tuple):
            values[field] = ("q_proj", "k_proj", "down_proj")
        elif isinstance(default, float):
            values[field] = default * 0.5 + 0.001
        elif isinstance(default, int):
            values[field] = default + 3
        else:  # optional fields
            values[field] = 5 if field in ("NUM_GPUS", "MESH_MODEL", "MAX_STEPS", "EVAL_BATCHES") else f"/data/{field.lower()}"
    return values


def test_every_flag_round_trips_through_the_panels_command_preview(tmp_path):
    config = ParallamaConfig(**non_default_values())
    command = command_line(config, "my data.jsonl", tmp_path / "run")
    arguments = train_argument_parser().parse_args(shlex.split(command)[2:])
    assert config_from_arguments(arguments) == config
    assert config_from_arguments(train_argument_parser().parse_args(
        shlex.split(command_line(ParallamaConfig(), "d.jsonl", "c"))[2:])) == ParallamaConfig()


def test_none_is_a_value_and_bad_values_are_named(tmp_path):
    parse = lambda *flags: config_from_arguments(train_argument_parser().parse_args(["--data", "d", "--checkpoint-path",
                                                                                    "c", *flags]))
    assert parse("--remat", "none").REMAT == "none"
    assert parse("--max-steps", "none").MAX_STEPS is None
    (tmp_path / "run.toml").write_text('MAX_STEPS = 7\nREMAT = "projections"\n')
    assert parse("--config", str(tmp_path / "run.toml"), "--max-steps", "none").MAX_STEPS is None  # the flag wins
    assert parse("--config", str(tmp_path / "run.toml")).REMAT == "projections"
    for flags, message in [(["--lora-r", "2.5"], "--lora-r takes a whole number, not '2.5'"),
                           (["--lora-r", "none"], "--lora-r takes a whole number, not 'none'"),
                           (["--remat", "nothing"], "--remat takes one of none, full, projections"),
                           (["--lr", "fast"], "--lr takes a finite number, not 'fast'"),
                           (["--pack", "maybe"], "--pack takes true or false")]:
        process = subprocess.run([*JORA, "train", "--data", "d", "--checkpoint-path", "c", *flags],
                                 capture_output=True, text=True)
        assert process.returncode == 2 and message in process.stderr, (flags, process.stderr)
    (tmp_path / "bad.toml").write_text('LORA_R = "8"\n')
    with pytest.raises(ValueError, match=r"bad.toml: LORA_R='8' is not a whole number"):
        parse("--config", str(tmp_path / "bad.toml"))


def test_remat_none_reaches_the_training_step(setup, tmp_path, monkeypatch):
    "Flag -> parsed config -> what the run compiles: `--remat none` gives a step without rematerialisation."
    _, data, model = setup
    import jora.train as train_module
    used = []
    real = train_module.make_train_step
    monkeypatch.setattr(train_module, "make_train_step",
                        lambda model_config, optimizer, lora_config, mesh, options: used.append(options.remat) or
                        real(model_config, optimizer, lora_config, mesh, options))
    common = ["--data", str(data), "--lora-r", "4", "--dtype", "float32", "--max-seq-len", "160", "--num-gpus", "1",
              "--batch-size", "4", "--n-accumulation-steps", "1", "--max-steps", "1", "--split-percentage", "1.0",
              "--llama2-hf-path", str(model)]
    for remat in ("none", "projections", "full"):   # the step's options carry the flag's own value
        assert train_main([*common, "--checkpoint-path", str(tmp_path / remat), "--remat", remat]) == 0
        state = json.loads((latest_checkpoint(tmp_path / remat) / "state.json").read_text())
        assert state["config"]["REMAT"] == remat and used[-1] == remat


# ---- 5. one clear line per expected error at the command line ----

def test_command_line_errors_are_one_line_and_debug_shows_the_traceback(setup, finished_run, tmp_path):
    _, data, model = setup
    _, _, run, _ = finished_run
    base = ["train", "--checkpoint-path", str(tmp_path / "run"), "--llama2-hf-path", str(model), "--num-gpus", "1"]
    line = one_error_line(subprocess.run([*JORA, *base, "--data", str(tmp_path / "missing.jsonl")],
                                         capture_output=True, text=True))
    assert line.startswith("jora train: error:") and "missing.jsonl" in line
    (tmp_path / "bad.jsonl").write_text('{"instruction": "q", "output": "a"}\n{"instruction": \n')
    line = one_error_line(subprocess.run([*JORA, *base, "--data", str(tmp_path / "bad.jsonl")],
                                         capture_output=True, text=True))
    assert "bad.jsonl, record 2 (line 2): invalid JSON" in line
    line = one_error_line(subprocess.run([*JORA, *base, "--data", str(data), "--mesh-model", "3"],
                                         capture_output=True, text=True))
    assert "3" in line
    debug = subprocess.run([*JORA, *base, "--data", str(tmp_path / "missing.jsonl"), "--debug"],
                           capture_output=True, text=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr
    copy = tmp_path / "checked"
    shutil.copytree(run, copy)
    damage(copy / "step-00000004", "truncated lora")
    process = subprocess.run([*JORA, "check", "--checkpoint", str(copy)], capture_output=True, text=True)
    assert process.returncode == 1 and "step-00000002: verified" in process.stdout
    assert "step-00000004: damaged: lora.safetensors has" in process.stdout
    assert "a resume starts from step-00000002" in process.stdout
    process = subprocess.run([*JORA, "check", "--checkpoint", str(run)], capture_output=True, text=True)
    assert process.returncode == 0 and "a resume starts from step-00000004" in process.stdout, process.stdout


# ---- 6. smaller fixes ----

def test_a_missing_tokenizer_names_the_folder(setup, tmp_path):
    _, _, model = setup
    bare = tmp_path / "no-tokenizer"
    shutil.copytree(model, bare, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json"))
    with pytest.raises(FileNotFoundError, match=rf"{bare} holds no tokenizer"):
        load_tokenizer(bare)
    with pytest.raises(FileNotFoundError, match="No model folder at"):
        load_tokenizer(tmp_path / "nowhere")


def test_jsonl_lines_end_only_at_newline(tmp_path):
    texts = ["a\u2028b", "c\u2029d", "e\u0085f", "g\rh"]
    path = tmp_path / "odd.jsonl"
    with open(path, "w", encoding="utf-8", newline="") as handle:
        for number, text in enumerate(texts):
            handle.write(json.dumps({"instruction": text, "input": "", "output": str(number)}, ensure_ascii=False) + "\r\n")
    assert [record["instruction"] for record in read_records(path)] == texts
    path.write_text('{"instruction": "x", "output": "y"}\n\n{"instruction": \n', encoding="utf-8")
    with pytest.raises(RecordError, match="record 2 \\(line 3\\)"):
        read_records(path)


def test_shard_names_may_not_leave_the_model_folder(setup, tmp_path):
    _, _, model = setup
    copy = tmp_path / "model"
    shutil.copytree(model, copy)
    secret = tmp_path / "outside.safetensors"
    shutil.copy(copy / "model.safetensors", secret)
    for name in ("../outside.safetensors", str(secret)):
        (copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": name}}))
        with pytest.raises(ValueError, match="lies outside"):
            checkpoint_tensor_files(copy)
