"""train_lora: learning, sharded == one device, exact resume, the NaN stop, killed checkpoint writes, Ctrl-C, the CLI."""
import json
import signal
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from jora.data import AlpacaDataset, format_prompt
from jora.testing import save_tiny_hf_checkpoint
from jora.files import checkpoints, latest_checkpoint
from jora.train import TrainingDiverged, load_model, run_mesh, train_lora
from jora.config import ParallamaConfig
from jora.testing import demo_raft_records
from jora.formats import load_lora


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train")
    data = folder / "raft.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in demo_raft_records(40, seed=1)))
    corpus = [format_prompt(r) + r["output"] for r in demo_raft_records(200)]
    model = save_tiny_hf_checkpoint(folder / "tiny", "llama3.1", corpus=corpus)
    return folder, data, model


def small_config(model, **changes):
    return ParallamaConfig(LLAMA2_HF_PATH=str(model), LORA_R=4, LORA_ALPHA=8, LORA_TARGETS=("q_proj", "v_proj", "o_proj"),
                           LR=5e-3, BATCH_SIZE=4, N_ACCUMULATION_STEPS=2, MAX_SEQ_LEN=160, N_EPOCHS=2, SEED=0,
                           DTYPE="float32", REMAT="none", WARMUP_STEPS=2, EVAL_EVERY=0, CHECKPOINT_EVERY=100,
                           NUM_GPUS=1)._replace(**changes)


def datasets(data, config):
    train = AlpacaDataset(path=data, split="train", tokenizer=config.LLAMA2_HF_PATH, max_len=config.MAX_SEQ_LEN, alpaca_mix=0)
    test = AlpacaDataset(path=data, split="test", tokenizer=config.LLAMA2_HF_PATH, max_len=config.MAX_SEQ_LEN)
    return train, test


def losses(result):
    return np.array([record["loss"] for record in result.history])


def test_loss_falls_and_the_history_is_complete(setup, tmp_path):
    _, data, model = setup
    config = small_config(model, N_EPOCHS=8, EVAL_EVERY=8, LR=1e-2)
    train, test = datasets(data, config)
    events = []
    result = train_lora(config, train, tmp_path / "run", eval_dataset=test, progress=False,
                        callbacks=[lambda event, info: events.append(event)])
    history = losses(result)
    assert len(history) == 8 * 4  # 32 train examples / batch 4 / 2 accumulation steps, 8 epochs
    assert history[-4:].mean() < 0.6 * history[:2].mean()
    first = result.history[0]
    for key in ("step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_second", "step_time",
                "compile_time", "compiled_bytes_per_device"):
        assert key in first, key
    assert [r["lr"] for r in result.history][:3] == pytest.approx([0.0, 5e-3, 1e-2])  # linear warmup of 2 steps
    assert sum("eval_loss" in r for r in result.history) == 4
    assert events[0] == "start" and events[-1] == "end" and "checkpoint" in events and events.count("step") == 32
    restored, lora_config = load_lora(result.checkpoint)
    assert lora_config == result.lora_config
    for name in lora_config.targets:
        np.testing.assert_array_equal(np.asarray(restored.adapters[name]["lora_B"]),
                                      np.asarray(result.lora.adapters[name]["lora_B"]))


def test_the_memory_planner_lowers_the_step_train_lora_compiles(setup, tmp_path):
    "`step_memory`, from abstract inputs alone, reports exactly the per-device bytes of the step a run compiled."
    from jora.train import step_memory
    _, data, model = setup
    config = small_config(model, MAX_STEPS=1, LORA_DROPOUT=0.1, MAX_GRAD_NORM=1.0)
    train, _ = datasets(data, config)
    result = train_lora(config, train, tmp_path / "run", progress=False)
    count, rows, length = result.history[0]["compiled_shape"]
    assert (count, rows) == (config.N_ACCUMULATION_STEPS, config.BATCH_SIZE)
    planned = step_memory(config, result.model_config, seq_len=length, total_steps=1, estimate=False)
    assert planned["total"] == result.history[0]["compiled_bytes_per_device"]
    other = step_memory(config._replace(REMAT="full"), result.model_config, seq_len=length, total_steps=1, estimate=False)
    assert other["total"] != planned["total"]           # the figure depends on the step: this check can fail


def test_same_seed_same_history(setup, tmp_path):
    _, data, model = setup
    config = small_config(model, MAX_STEPS=4)
    train, _ = datasets(data, config)
    first = train_lora(config, train, tmp_path / "a", progress=False)
    second = train_lora(config, train, tmp_path / "b", progress=False)
    np.testing.assert_array_equal(losses(first), losses(second))
    other = train_lora(config._replace(SEED=1), train, tmp_path / "c", progress=False)
    assert not np.array_equal(losses(first), losses(other))


@pytest.mark.parametrize("mesh, dropout", [
    (dict(MESH_MODEL=4), 0.1), (dict(MESH_DATA=2, MESH_MODEL=2), 0.1),
    (dict(MESH_SEQ=4, MESH_MODEL=1, ATTENTION_BLOCK=16, LOGITS_CHUNK=8, CONTEXT_PARALLEL="all_gather"), 0.1),
    (dict(MESH_SEQ=2, MESH_MODEL=2, ATTENTION_BLOCK=8, CONTEXT_PARALLEL="all_gather"), 0.1),
    (dict(MESH_SEQ=4, MESH_MODEL=1, ATTENTION_BLOCK=16, LOGITS_CHUNK=8), 0.0),
    (dict(MESH_SEQ=2, MESH_MODEL=2, ATTENTION_BLOCK=8), 0.0)],
    ids=["1x1x4", "2x1x2", "1x4x1-blocks", "1x2x2-blocks", "1x4x1-ring", "1x2x2-ring"])
def test_four_devices_equal_one(setup, tmp_path, mesh, dropout):
    """Four devices train as one, to 1e-5. Under the ring scheme the positions are laid out zig-zag, so LoRA dropout
    draws its masks over another layout (the same distribution, not the same draws): the ring runs are compared
    without dropout, the gathering ones with it."""
    _, data, model = setup
    config = small_config(model, MAX_STEPS=4, LORA_DROPOUT=dropout)
    train, _ = datasets(data, config)
    one = train_lora(config, train, tmp_path / "one", progress=False)
    four = train_lora(config._replace(NUM_GPUS=4, **mesh), train, tmp_path / "four", progress=False)
    np.testing.assert_allclose(losses(four), losses(one), rtol=1e-5)
    for name in one.lora_config.targets:
        np.testing.assert_allclose(np.asarray(four.lora.adapters[name]["lora_B"]),
                                   np.asarray(one.lora.adapters[name]["lora_B"]), rtol=1e-4, atol=1e-6)
    split_on_model = four.lora.adapters["q_proj"]["lora_B"].sharding.spec[-1] == "model"
    assert split_on_model == (config._replace(**mesh).MESH_MODEL > 1)


def test_resume_continues_the_same_run(setup, tmp_path):
    _, data, model = setup
    config = small_config(model, CHECKPOINT_EVERY=2)
    train, _ = datasets(data, config)
    whole = train_lora(config, train, tmp_path / "whole", progress=False)
    part = train_lora(config, train, tmp_path / "parts", progress=False, stop_after=3)
    assert part.stopped_early and len(part.history) == 3
    assert json.loads((latest_checkpoint(tmp_path / "parts") / "state.json").read_text())["step"] == 3
    rest = train_lora(config, train, tmp_path / "parts", progress=False)
    assert len(rest.history) == len(whole.history)
    np.testing.assert_array_equal(losses(rest), losses(whole))
    for name in whole.lora_config.targets:
        np.testing.assert_array_equal(np.asarray(rest.lora.adapters[name]["lora_A"]),
                                      np.asarray(whole.lora.adapters[name]["lora_A"]))
    assert len(checkpoints(tmp_path / "parts")) == config.KEEP_CHECKPOINTS


def test_nan_stops_and_keeps_the_last_good_checkpoint(setup, tmp_path):
    _, data, model = setup
    config = small_config(model, CHECKPOINT_EVERY=1)
    train, _ = datasets(data, config)
    train_lora(config, train, tmp_path / "run", progress=False, stop_after=2)
    good = latest_checkpoint(tmp_path / "run")
    model_config, params = load_model(config, run_mesh(config))
    poisoned = {**params, "layers": {**params["layers"],
                                     "q_proj": params["layers"]["q_proj"].at[0, 0, 0].set(float("nan"))}}
    with pytest.raises(TrainingDiverged, match=r"The loss became nan .* at step 3; .* nothing was saved .*step-00000002"):
        train_lora(config, train, tmp_path / "run", progress=False, model=(model_config, poisoned))
    assert latest_checkpoint(tmp_path / "run") == good
    resumed = train_lora(config, train, tmp_path / "run", progress=False, stop_after=3)
    assert np.isfinite(losses(resumed)).all() and len(resumed.history) == 3


def test_a_checkpoint_write_killed_halfway_leaves_the_previous_one(setup, tmp_path):
    "A real SIGKILL in the middle of writing the second checkpoint; the first stays the latest, and resuming works."
    _, data, model = setup
    run = tmp_path / "run"
    script = textwrap.dedent(f"""
        import os, signal, jora.train as train, jora.formats as formats
        from jora.data import AlpacaDataset, format_prompt
        config = train.ParallamaConfig(**{small_config(model, CHECKPOINT_EVERY=2)._asdict()!r})
        dataset = AlpacaDataset(path={str(data)!r}, split="train", tokenizer=config.LLAMA2_HF_PATH,
                                max_len=config.MAX_SEQ_LEN, alpaca_mix=0)
        writes = []
        original = formats._write_safetensors
        def dying_write(path, tensors, metadata=None):
            original(path, tensors, metadata)
            writes.append(path)
            if len(writes) == 3:  # the second checkpoint's LoRA file is on disk, its optimizer file is not
                os.kill(os.getpid(), signal.SIGKILL)
        formats._write_safetensors = dying_write
        train.train_lora(config, dataset, {str(run)!r}, progress=False)
    """)
    process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert process.returncode == -signal.SIGKILL, process.stderr[-2000:]
    leftovers = [p.name for p in run.iterdir()]
    assert any(name.startswith(".tmp-step-00000004") for name in leftovers), leftovers
    assert latest_checkpoint(run).name == "step-00000002"
    config = small_config(model, CHECKPOINT_EVERY=2)
    train, _ = datasets(data, config)
    resumed = train_lora(config, train, run, progress=False)
    whole = train_lora(config, train, tmp_path / "whole", progress=False)
    np.testing.assert_array_equal(losses(resumed), losses(whole))


def test_ctrl_c_and_stop_save_then_stop(setup, tmp_path):
    _, data, model = setup
    config = small_config(model)
    train, _ = datasets(data, config)

    def press_ctrl_c(event, info):
        if event == "step" and info["step"] == 2:
            signal.raise_signal(signal.SIGINT)  # the handler asks the loop to stop after this step

    handler_before = signal.getsignal(signal.SIGINT)
    interrupted = train_lora(config, train, tmp_path / "ctrl-c", progress=False, callbacks=[press_ctrl_c])
    assert interrupted.stopped_early and len(interrupted.history) == 2
    assert json.loads((latest_checkpoint(tmp_path / "ctrl-c") / "state.json").read_text())["step"] == 2
    assert signal.getsignal(signal.SIGINT) is handler_before  # the run's handler is removed again
    stop = threading.Event()
    stopped = train_lora(config, train, tmp_path / "stop", progress=False, stop=stop,
                         callbacks=[lambda event, info: stop.set() if event == "step" and info["step"] == 3 else None])
    assert stopped.stopped_early and latest_checkpoint(tmp_path / "stop").name == "step-00000003"


def test_jax_params_path_is_written_once_then_read(setup, tmp_path):
    _, data, model = setup
    cache = tmp_path / "jax-params"
    config = small_config(model, JAX_PARAMS_PATH=str(cache), MAX_STEPS=2)
    train, _ = datasets(data, config)
    first = train_lora(config, train, tmp_path / "a", progress=False)
    assert (cache / "config.json").is_file() and (cache / "layers.q_proj.safetensors").is_file()
    from_cache = train_lora(config._replace(LLAMA2_HF_PATH=str(tmp_path / "gone")), train, tmp_path / "b", progress=False)
    np.testing.assert_array_equal(losses(first), losses(from_cache))
    with pytest.raises(ValueError, match="MODEL_SIZE=7B but the checkpoint has 0.00B parameters"):
        train_lora(config._replace(MODEL_SIZE="7B"), train, tmp_path / "c", progress=False)


def test_jora_train_command_line(setup, tmp_path):
    _, data, model = setup
    (tmp_path / "run.toml").write_text(textwrap.dedent(f"""
        [jora]
        LLAMA2_HF_PATH = "{model}"
        LORA_R = 4
        LORA_TARGETS = ["q_proj", "v_proj"]
        DTYPE = "float32"
        MAX_SEQ_LEN = 160
        BATCH_SIZE = 4
        N_ACCUMULATION_STEPS = 1
        NUM_GPUS = 1
    """))
    command = [sys.executable, "-c", "import sys, jora.cli; sys.exit(jora.cli.main())", "train", "--data", str(data),
               "--checkpoint-path", str(tmp_path / "run"), "--config", str(tmp_path / "run.toml"), "--max-steps", "3"]
    process = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stderr[-3000:]
    assert "step 3: loss" in process.stdout and "eval loss" in process.stdout
    assert latest_checkpoint(tmp_path / "run").name == "step-00000003"
    state = json.loads((latest_checkpoint(tmp_path / "run") / "state.json").read_text())
    assert state["config"]["LORA_R"] == 4 and state["config"]["MAX_STEPS"] == 3
    helped = subprocess.run([sys.executable, "-c", "import sys, jora.cli; sys.exit(jora.cli.main())", "train", "--help"],
                            capture_output=True, text=True, timeout=120)
    for field in ParallamaConfig._fields:
        assert field in helped.stdout, field


def test_jora_demo_end_to_end(tmp_path):
    "The README's first line, in a smaller setting: the loss falls by at least half and the adapter is saved."
    command = [sys.executable, "-c", "import sys, jora.cli; sys.exit(jora.cli.main())", "demo", "--folder",
               str(tmp_path / "demo"), "--tiny", "--records", "160", "--epochs", "4"]
    process = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert process.returncode == 0, process.stderr[-3000:]
    import re
    first, last = map(float, re.search(r"loss: first step ([\d.]+), last step ([\d.]+)", process.stdout).groups())
    assert last <= 0.5 * first, process.stdout
    assert "before fine-tuning:" in process.stdout and "after fine-tuning:" in process.stdout
    assert latest_checkpoint(tmp_path / "demo" / "checkpoints") is not None


def test_max_steps_is_the_step_count_whatever_the_epochs(tmp_path):
    "As Hugging Face's max_steps: more steps than N_EPOCHS hold go on into further epochs, fewer stop early."
    model = save_tiny_hf_checkpoint(tmp_path / "tiny", "llama3.1", corpus=[format_prompt(r) + r["output"] for r in demo_raft_records(24)])
    rows = demo_raft_records(24)
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    config = ParallamaConfig(LLAMA2_HF_PATH=str(model), LORA_R=2, LORA_ALPHA=4, DTYPE="float32", REMAT="none",
                             BATCH_SIZE=4, N_ACCUMULATION_STEPS=1, MAX_SEQ_LEN=160, NUM_GPUS=1, N_EPOCHS=1,
                             SPLIT_PERCENTAGE=1.0, WARMUP_STEPS=0, CHECKPOINT_EVERY=100)
    dataset = AlpacaDataset(path=tmp_path / "d.jsonl", split="train", split_percentage=1.0, tokenizer=str(model),
                            max_len=160, alpaca_mix=0)
    longer = train_lora(config._replace(MAX_STEPS=9), dataset, tmp_path / "longer", progress=False)
    assert [r["step"] for r in longer.history] == list(range(1, 10))  # 6 steps an epoch: into a second epoch
    assert [r["epoch"] for r in longer.history] == [0] * 6 + [1] * 3 and longer.checkpoint.name == "step-00000009"
    shorter = train_lora(config._replace(MAX_STEPS=2), dataset, tmp_path / "shorter", progress=False)
    assert len(shorter.history) == 2


def test_every_step_is_a_line_of_metrics_jsonl_and_a_resume_drops_lost_steps(setup, tmp_path, capsys):
    """metrics.jsonl in the checkpoint folder holds one line per step as it happens; a resumed run rewrites it from
    its checkpoint's history, so steps lost after the last checkpoint (a crash) are not left in it; `jora train`
    prints the steps and where the file is."""
    from jora.cli import train_main
    from jora.train import METRICS_FILE
    folder, data, model = setup
    config = small_config(model, MAX_STEPS=4, N_EPOCHS=1, CHECKPOINT_EVERY=2)
    train, _ = datasets(data, config)
    first = train_lora(config, train, tmp_path / "run", progress=False, stop_after=3)
    lines = lambda: [json.loads(line) for line in (tmp_path / "run" / METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in lines()] == [1, 2, 3] and lines() == json.loads(json.dumps(first.history))
    resumed = train_lora(config, train, tmp_path / "run", progress=False)   # from step 2: step 3 is done again
    assert [r["step"] for r in lines()] == [1, 2, 3, 4] and lines() == json.loads(json.dumps(resumed.history))
    assert lines()[2]["loss"] == pytest.approx(first.history[2]["loss"], rel=1e-5)
    code = train_main(["--data", str(data), "--checkpoint-path", str(tmp_path / "cli"), "--llama2-hf-path", str(model),
                       "--lora-r", "4", "--dtype", "float32", "--remat", "none", "--max-seq-len", "160", "--num-gpus",
                       "1", "--batch-size", "4", "--n-accumulation-steps", "1", "--max-steps", "3",
                       "--split-percentage", "1.0"])
    shown = capsys.readouterr().out
    assert code == 0 and f"every step's metrics: {tmp_path / 'cli' / METRICS_FILE}" in shown
    table = shown.split("step 3: loss")[0].splitlines()
    assert table[0].split()[:3] == ["step", "loss", "lr"] and [line.split()[0] for line in table[1:]] == ["1", "2", "3"]
