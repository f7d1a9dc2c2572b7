"""Faults, round two (the adversarial review's failures, each a test that failed before its fix): non-finite values
and updates are never saved, a model folder's code never runs, one run per checkpoint folder, interrupted runs exit
non-zero, and malformed files get one line. As in `test_faults.py`, the user's files are checked byte-identical
(sha256) before the message is."""
import json
import os
import re
import select
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

import jora.cli
from jora.config import config_from_toml, parse_field_text, value_problem
from jora.files import (CheckpointWarning, FolderInUseError, HOLDER, checkpoint_problems, describe_checkpoints,
                        latest_checkpoint, step_folders)
from jora.form import validate
from jora.model import LoraWeights
from jora.formats import NonFiniteError, load_lora, save_checkpoint
from jora.train import TrainingDiverged, TrainingWarning, train_lora
from test_faults import JORA, one_error_line, setup, snapshot  # noqa: F401  (setup is a fixture)
from test_train import datasets, small_config

HERE = Path(__file__).parent


# ---- non-finite values: refused from every source, never applied, never saved ----

@pytest.mark.parametrize("field, value", [("MIN_LR_RATIO", "nan"), ("LR", "nan"), ("WEIGHT_DECAY", "inf"),
                                          ("LORA_ALPHA", "-inf")])
def test_every_float_field_refuses_nan_and_infinity_from_every_source(setup, tmp_path, field, value):
    folder, data, model = setup
    before = snapshot(folder)
    number = float(value)
    toml = tmp_path / "run.toml"
    toml.write_text(f"{field} = {value}\n")                                   # TOML spells them nan and inf
    with pytest.raises(ValueError, match=f"{toml}: {field} must be a finite number"):
        config_from_toml(toml)
    with pytest.raises(ValueError, match="finite number"):                    # a flag, a panel's text box
        parse_field_text(field, value)
    assert value_problem(field, number) == "must be a finite number"         # the panels' check
    assert validate(small_config(model, **{field: number}), str(data), str(tmp_path / "run"), 1)[field] \
        == "must be a finite number"
    config = small_config(model, **{field: number})                           # Python
    train, _ = datasets(data, small_config(model))
    with pytest.raises(ValueError, match=f"{field} must be a finite number"):
        train_lora(config, train, tmp_path / "python", progress=False)
    assert not (tmp_path / "python").exists() and snapshot(folder) == before


def test_a_non_finite_update_is_not_applied_and_stops_the_run_after_the_patience(setup, tmp_path):
    "WEIGHT_DECAY=1e300 is finite, but AdamW's update with it is not: the step keeps the old state and says so."
    folder, data, model = setup
    before = snapshot(folder)
    config = small_config(model, WEIGHT_DECAY=1e300, CHECKPOINT_EVERY=1)
    train, _ = datasets(data, config)
    with pytest.raises(TrainingDiverged, match=r"The update made the adapters or the optimizer state NaN or infinite "
                                               r"\(loss [0-9.]+, gradient norm [0-9.]+; .*WEIGHT_DECAY.*\) at step 1;"):
        train_lora(config, train, tmp_path / "run", progress=False)
    assert step_folders(tmp_path / "run") == []                               # nothing saved
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(TrainingDiverged, match=r"at step 3 \(3 steps in a row\)"):
            train_lora(config._replace(NONFINITE_PATIENCE=2), train, tmp_path / "patient", progress=False)
    skipped = [str(w.message) for w in caught if issubclass(w.category, TrainingWarning)]
    assert len(skipped) == 2 and "skipped (2 of NONFINITE_PATIENCE=2 in a row)" in skipped[1]
    saved = step_folders(tmp_path / "patient")     # the skipped steps' checkpoints hold the untouched, finite state
    assert [f.name for f in saved] == ["step-00000001", "step-00000002"]
    assert all(checkpoint_problems(f) == [] for f in saved) and snapshot(folder) == before


def test_the_command_line_stops_a_diverging_run_with_one_line_and_status_1(setup, tmp_path):
    folder, data, model = setup
    before = snapshot(folder)
    process = subprocess.run([*JORA, "train", "--data", str(data), "--checkpoint-path", str(tmp_path / "run"),
                              "--llama2-hf-path", str(model), "--dtype", "float32", "--max-seq-len", "160",
                              "--lora-r", "4", "--num-gpus", "1", "--max-steps", "2", "--weight-decay", "1e300"],
                             capture_output=True, text=True, timeout=600)
    assert process.returncode == 1 and "Traceback" not in process.stderr, process.stderr[-3000:]
    errors = [line for line in process.stderr.splitlines() if line.startswith("jora train: error: ")]
    assert len(errors) == 1 and "The update made the adapters" in errors[0]
    assert step_folders(tmp_path / "run") == [] and snapshot(folder) == before


def test_non_finite_tensors_are_never_written_and_jora_check_reports_them(setup, tmp_path):
    _, data, model = setup
    config = small_config(model, MAX_STEPS=1)
    train, _ = datasets(data, config)
    result = train_lora(config, train, tmp_path / "run", progress=False)
    good = result.checkpoint
    adapters = result.lora.adapters
    poisoned = LoraWeights({**adapters, "q_proj": {**adapters["q_proj"],
                                                   "lora_B": adapters["q_proj"]["lora_B"].at[0, 0, 0].set(np.nan)}})
    before = snapshot(tmp_path / "run")
    with pytest.raises(NonFiniteError, match=r"Not writing checkpoint .*step-00000002: q_proj.lora_B hold NaN"):
        save_checkpoint(tmp_path / "run", 2, poisoned, result.lora_config, {}, {"step": 2})
    assert snapshot(tmp_path / "run") == before
    # a checkpoint with NaN written by something else (an older jora): verified sizes and sums, but not finite
    from jora.files import write_manifest
    from safetensors.numpy import load_file, save_file
    tensors = load_file(str(good / "lora.safetensors"))
    tensors["v_proj.lora_A"][0, 0, 0] = np.inf
    save_file(tensors, str(good / "lora.safetensors"), metadata={"format": "jora-lora", "r": "4", "alpha": "8",
                                                                 "dropout": "0.05", "targets": '["q_proj", "v_proj", "o_proj"]',
                                                                 "use_rslora": "false"})
    write_manifest(good, 1)
    assert checkpoint_problems(good) == ["lora.safetensors holds NaN or infinite values in v_proj.lora_A"]
    lines, resume_from = describe_checkpoints(tmp_path / "run")
    assert resume_from is None and "NaN or infinite values in v_proj.lora_A" in lines[0]
    checked = subprocess.run([*JORA, "check", "--checkpoint", str(tmp_path / "run")], capture_output=True, text=True,
                             timeout=300)
    assert "NaN or infinite" in checked.stdout and "no verified checkpoint" in checked.stdout
    with pytest.raises(Exception, match="NaN or infinite"):
        load_lora(good)


# ---- no code from model folders ----

def code_folder(model: Path, tmp_path: Path, *, builtin_class: bool) -> Path:
    "A copy of `model` whose tokenizer_config.json maps AutoTokenizer to a .py file in the folder that leaves a mark."
    import shutil
    folder = tmp_path / "asks-for-code"
    shutil.copytree(model, folder)
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings["auto_map"] = {"AutoTokenizer": ["tokenization_mark.MarkTokenizer", "tokenization_mark.MarkTokenizer"]}
    if not builtin_class:
        settings["tokenizer_class"] = "MarkTokenizer"
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    (folder / "tokenization_mark.py").write_text(
        f"open({str(tmp_path / 'RAN')!r}, 'w').write('ran')\n"
        "from transformers import PreTrainedTokenizerFast\nclass MarkTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    return folder


def run_in_a_terminal(code: str, answer: bytes = b"y\n", timeout: float = 180) -> tuple[int, str]:
    "Run `python -c code` on a pseudo-terminal, answering any [y/N] question with `answer`; its status and output."
    master, replica = os.openpty()
    process = subprocess.Popen([sys.executable, "-c", code], stdin=replica, stdout=replica, stderr=replica,
                               close_fds=True, cwd=HERE)
    os.close(replica)
    output, answered, deadline = b"", False, time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(master, 4096)
            except OSError:   # the process closed the terminal
                break
            output += chunk
            if not answered and b"[y/N]" in output:
                os.write(master, answer)
                answered = True
        elif process.poll() is not None:
            break
    process.kill()
    os.close(master)
    return process.wait(), output.decode(errors="replace")


def test_a_model_folder_asking_to_run_its_code_is_refused_under_a_terminal_answering_yes(setup, tmp_path):
    _, _, model = setup
    folder = code_folder(model, tmp_path, builtin_class=False)
    before = snapshot(folder)
    status, output = run_in_a_terminal(f"from jora.data import load_tokenizer; load_tokenizer({str(folder)!r})")
    assert not (tmp_path / "RAN").exists(), output                 # the folder's code never ran
    assert status == 1 and "[y/N]" not in output, output           # nobody was asked
    assert "asks to run its own code (tokenizer_config.json: " in output
    assert "jora does not run a model folder's code" in output
    assert snapshot(folder) == before


def test_a_model_folder_with_a_builtin_tokenizer_loads_it_and_says_its_code_was_not_run(setup, tmp_path):
    from jora.data import load_tokenizer
    _, _, model = setup
    folder = code_folder(model, tmp_path, builtin_class=True)
    with pytest.warns(UserWarning, match="jora does not run a model folder's code .* It loaded transformers' own"):
        tokenizer = load_tokenizer(folder)
    assert type(tokenizer).__module__.startswith("transformers.") and not (tmp_path / "RAN").exists()


def test_every_transformers_load_in_jora_passes_trust_remote_code_false():
    "Every Auto* `from_pretrained` call in the package says `trust_remote_code=False` (a prompt needs none of them)."
    import re
    root = HERE.parent / "jora"
    for path in root.glob("*.py"):
        for call in re.finditer(r"Auto\w+\.from_pretrained\(", path.read_text()):
            text = path.read_text()[call.start():]
            arguments = text[:text.index(")\n") + 1]
            assert "trust_remote_code=False" in arguments, (path.name, arguments)


# ---- one run per checkpoint folder ----

HOLD = textwrap.dedent("""
    import sys, time
    from jora.files import prepare_checkpoint_folder
    from contextlib import ExitStack
    with ExitStack() as lock:
        prepare_checkpoint_folder(sys.argv[1], lock=lock)
        print("held", flush=True)
        time.sleep(600)
""")


def test_a_second_run_into_a_folder_in_use_is_refused_and_a_dead_runs_lock_is_taken_over(setup, tmp_path):
    _, data, model = setup
    config = small_config(model, MAX_STEPS=1)
    train, _ = datasets(data, config)
    folder = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True, cwd=HERE)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(folder)
        with pytest.raises(FolderInUseError, match=rf"{folder} is in use by another jora run \(host .*, PID "
                                                   rf"{holder.pid}, since .*\)\. Wait for it"):
            train_lora(config, train, folder, progress=False)
        assert snapshot(folder) == before                       # nothing written, nothing cleaned
        process = subprocess.run([*JORA, "train", "--data", str(data), "--checkpoint-path", str(folder),
                                  "--llama2-hf-path", str(model)], capture_output=True, text=True, timeout=300)
        assert f"PID {holder.pid}" in one_error_line(process)
    finally:
        holder.send_signal(signal.SIGKILL)                       # dies holding it: the system frees the lock
        holder.wait()
    assert (folder / HOLDER).is_file()
    with pytest.warns(CheckpointWarning, match=rf"Taking over the lock on {folder} left by a run that ended without "
                                               rf"releasing it \(host .*, PID {holder.pid}"):
        result = train_lora(config, train, folder, progress=False)
    assert result.checkpoint.name == "step-00000001" and not (folder / HOLDER).exists()   # released at the end


# ---- interrupted runs exit non-zero ----

@pytest.mark.parametrize("signal_number, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_command_line_run_saves_says_so_and_exits_non_zero(setup, tmp_path, monkeypatch, capsys,
                                                                          signal_number, status):
    _, data, model = setup
    trained = jora.cli.train_lora

    def interrupt_after_step_two(*arguments, **settings):
        def send(event, info):
            if event == "step" and info["step"] == 2:
                signal.raise_signal(signal_number)
        return trained(*arguments, callbacks=[send], progress=False, **settings)

    monkeypatch.setattr(jora.cli, "train_lora", interrupt_after_step_two)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    code = jora.cli.main(["train", "--data", str(data), "--checkpoint-path", str(tmp_path / "run"),
                          "--llama2-hf-path", str(model), "--dtype", "float32", "--max-seq-len", "160",
                          "--lora-r", "4", "--num-gpus", "1", "--n-accumulation-steps", "1", "--batch-size", "4"])
    assert code == status and "interrupted at step 2" in capsys.readouterr().err
    assert latest_checkpoint(tmp_path / "run").name == "step-00000002"
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers


def test_ctrl_c_before_training_starts_is_one_line_and_status_130(monkeypatch, capsys):
    def loading_forever(argv):
        raise KeyboardInterrupt   # as a Ctrl-C while the model loads or the step compiles
    monkeypatch.setattr(jora.cli, "_run", loading_forever)
    assert jora.cli.main(["train"]) == 130 and capsys.readouterr().err.strip() == "jora train: interrupted"


# ---- config files ----

def test_a_toml_with_a_jora_table_and_top_level_keys_and_an_out_of_range_seed_are_named(tmp_path):
    mixed = tmp_path / "mixed.toml"
    mixed.write_text("LR = 0.001\n[jora]\nLORA_R = 8\n")
    with pytest.raises(ValueError, match=r"mixed.toml has a \[jora\] table and also \['LR'\] outside it"):
        config_from_toml(mixed)
    seed = tmp_path / "seed.toml"
    seed.write_text("SEED = 99999999999999999999\n")
    with pytest.raises(ValueError, match=r"seed.toml: SEED must be between 0 and 2147483646"):
        config_from_toml(seed)
    assert value_problem("SEED", -1) == "must be between 0 and 2147483646"


# ---- every file read as carefully as training data ----

def read_error(action) -> str:
    "The one-line message of the error `action` raises (a `ValueError`: RecordError, UnsafeFolderError, ...)."
    with pytest.raises(ValueError) as raised:
        action()
    message = str(raised.value)
    assert "\n" not in message and "Traceback" not in message, message
    return message


def test_corpus_files_and_folders_are_read_with_care(tmp_path):
    from jora.retrieval import read_corpus
    jsonl = tmp_path / "corpus.jsonl"   # a BOM, U+2028 and U+0085 inside strings (written raw, as ensure_ascii=False)
    jsonl.write_text("\ufeff" + json.dumps({"id": "a", "text": "one\u2028line"}, ensure_ascii=False) + "\n"
                     + json.dumps({"id": "b", "text": "next\u0085line"}, ensure_ascii=False) + "\r\n", encoding="utf-8")
    assert [(d.id, d.text) for d in read_corpus(jsonl)] == [("a", "one\u2028line"), ("b", "next\u0085line")]
    wide = tmp_path / "wide.csv"                                            # a field over csv's 128 KiB default cap
    wide.write_text("id,text\nlong," + "x" * 300_000 + "\n", encoding="utf-8")
    assert len(read_corpus(wide)[0].text) == 300_000
    empty = tmp_path / "null.jsonl"
    empty.write_text('{"id": "a", "text": "fine"}\n{"id": "b", "text": null}\n')
    assert read_error(lambda: read_corpus(empty)) == f"{empty}, document 2 ('b'): its `text` is None; every document needs text."
    missing = tmp_path / "missing.json"
    missing.write_text('[{"id": "a"}]')
    assert "document 1 ('a'): its `text` is missing" in read_error(lambda: read_corpus(missing))
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"id": "a", "text": "caf\u00e9"}\n'.encode("latin-1"))
    assert read_error(lambda: read_corpus(latin)).startswith(f"{latin}: not UTF-8 text (byte 0xe9")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "kept.txt").write_text("a document")
    (folder / "binary.txt").write_bytes(b"PK\x03\x04\x00\x00binary")
    assert read_error(lambda: read_corpus(folder)).startswith(f"{folder / 'binary.txt'}: holds NUL bytes")
    (folder / "binary.txt").unlink()
    os.mkfifo(folder / "pipe.txt")                                          # reading it would block forever
    with pytest.warns(UserWarning, match=r"Skipping .*pipe.txt: not a regular file"):
        assert [d.id for d in read_corpus(folder)] == ["kept"]
    (folder / "pipe.txt").unlink()
    secret = tmp_path / "secret.txt"
    secret.write_text("not part of the corpus")
    (folder / "link.txt").symlink_to(secret)
    before = snapshot(tmp_path / "folder")
    assert "leads out of the corpus folder" in read_error(lambda: read_corpus(folder))
    assert snapshot(tmp_path / "folder") == before


def test_question_files_name_the_file_the_question_and_the_field(tmp_path):
    from jora.retrieval import CorpusIndex, Document, raft_rows, read_questions
    index = CorpusIndex([Document("a", "alpha document"), Document("b", "beta document"), Document("c", "gamma")])
    table = tmp_path / "questions.csv"                                       # oracle ids as a CSV column
    table.write_text('question,answer,oracle_ids\nwhich?,alpha,a|b\nand?,gamma,"[""c""]"\n')
    rows, _ = raft_rows(read_questions(table), index, distractors=1, seed=0, oracle_probability=1.0)
    assert [row["oracle_ids"] for row in rows] == [["a", "b"], ["c"]]
    for record, message in [({"question": "q", "answer": None, "oracle_ids": ["a"]}, "its `answer` is None"),
                            ({"question": "q", "answer": "x", "oracle_ids": {"a": 1}}, "`oracle_ids` is {'a': 1}"),
                            ({"question": "q", "answer": "x", "oracle_ids": [["a"]]}, "`oracle_ids` is [['a']]"),
                            ({"question": "q", "answer": "x", "oracle_ids": [True]}, "`oracle_ids` is [True]")]:
        file = tmp_path / "bad.jsonl"
        file.write_text(json.dumps({"question": "fine", "answer": "x", "oracle_ids": ["a"]}) + "\n" + json.dumps(record))
        assert read_error(lambda: read_questions(file)).startswith(f"{file}, question 2: {message}")


def test_a_long_document_is_tokenized_once_for_every_row_and_setting(monkeypatch, tmp_path):
    "A 1 MB oracle shown in three settings' rows is tokenized whole once (it was 5 or more times per row before)."
    import jora.retrieval as retrieval
    from jora.data import load_tokenizer
    from jora.testing import save_tiny_tokenizer
    tokenizer = load_tokenizer(save_tiny_tokenizer(tmp_path / "tokenizer"))
    long = " ".join(["the table lists the year and the city"] * 25_000)
    index = retrieval.CorpusIndex([retrieval.Document("long", long)] +
                                  [retrieval.Document(f"d{i}", f"document {i} about a city") for i in range(8)])
    questions = [{"question": f"which city {i}?", "answer": "x", "oracle_ids": ["long"]} for i in range(4)]
    counted, tokens = [], retrieval.prompt_tokens

    def counting(tokenizer, text, **options):
        counted.append(len(text))
        return tokens(tokenizer, text, **options)
    monkeypatch.setattr(retrieval, "prompt_tokens", counting)
    reports = [raft_rows_report(retrieval, questions, index, tokenizer, distractors) for distractors in (0, 2, 4)]
    assert sum(length >= len(long) for length in counted) == 1
    assert all(report.oracle_cut == 4 and report.oracle_tokens_removed == reports[0].oracle_tokens_removed > 0
               for report in reports)


def raft_rows_report(retrieval, questions, index, tokenizer, distractors):
    return retrieval.raft_rows(questions, index, distractors=distractors, seed=0, oracle_probability=1.0,
                               tokenizer=tokenizer, context_tokens=300)[1]


def hostile_copy(model: Path, tmp_path: Path, name: str) -> Path:
    import shutil
    copy = tmp_path / name
    shutil.copytree(model, copy)
    return copy


def test_hostile_model_folders_get_one_line_each(setup, tmp_path):
    from jora.formats import load_hf_checkpoint
    _, _, model = setup
    settings = json.loads((model / "config.json").read_text())
    cases = {"config-list": (lambda f: (f / "config.json").write_text("[1, 2]"), "holds a JSON list, not an object"),
             "no-factor": (lambda f: (f / "config.json").write_text(json.dumps({**settings, "rope_parameters": {
                 key: value for key, value in settings["rope_parameters"].items() if key != "factor"}})),
                 "llama3 rope scaling needs the numbers"),
             "many-layers": (lambda f: (f / "config.json").write_text(json.dumps({**settings,
                                                                                  "num_hidden_layers": 10**8})),
                             "says num_hidden_layers=100000000, but the weights hold 2 layers"),
             "float-layers": (lambda f: (f / "config.json").write_text(json.dumps({**settings, "num_hidden_layers": 1e8})),
                              "num_hidden_layers=100000000.0: sizes must be positive whole numbers"),
             "map-list": (lambda f: (f / "model.safetensors.index.json").write_text('{"weight_map": ["a"]}'),
                          "its weight_map is a JSON list"),
             "map-number": (lambda f: (f / "model.safetensors.index.json").write_text('{"weight_map": {"a": 3}}'),
                            "the weight_map gives 3 as a shard")}
    for name, (spoil, message) in cases.items():
        folder = hostile_copy(model, tmp_path, name)
        spoil(folder)
        before = snapshot(folder)
        started = time.monotonic()
        with pytest.raises(ValueError, match=re.escape(message)):
            load_hf_checkpoint(folder)
        assert time.monotonic() - started < 30 and snapshot(folder) == before, name
    outside = tmp_path / "elsewhere"                                       # shards through a linked subfolder
    outside.mkdir()
    linked = hostile_copy(model, tmp_path, "linked")
    (linked / "model.safetensors").rename(outside / "model.safetensors")
    (linked / "weights").symlink_to(outside)
    from safetensors import safe_open
    with safe_open(str(outside / "model.safetensors"), framework="numpy") as handle:
        names = list(handle.keys())
    (linked / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {name: "weights/model.safetensors" for name in names}}))
    assert "whose folder leads outside" in read_error(lambda: load_hf_checkpoint(linked))
    process = subprocess.run([*JORA, "train", "--data", str(setup[1]), "--checkpoint-path", str(tmp_path / "run"),
                              "--llama2-hf-path", str(tmp_path / "many-layers"), "--num-gpus", "1"],
                             capture_output=True, text=True, timeout=300)
    assert "num_hidden_layers=100000000" in one_error_line(process)


# ---- outputs ----

def test_an_output_inside_the_base_model_folder_is_refused(setup, tmp_path):
    from jora.export import merge_to_hf
    from jora.files import UnsafeFolderError
    _, data, model = setup
    copy = hostile_copy(model, tmp_path, "base")
    before = snapshot(copy)
    with pytest.raises(UnsafeFolderError, match="is, contains or lies inside"):
        merge_to_hf(copy, tmp_path / "adapter-not-needed", copy / "merged")
    assert snapshot(copy) == before


def test_a_base_with_shards_in_subfolders_is_merged_with_its_layout(setup, tmp_path):
    from jora.export import merge_to_hf
    from jora.formats import checkpoint_tensor_files, load_hf_checkpoint
    _, data, model = setup
    config = small_config(model, MAX_STEPS=1, LORA_R=2)
    train, _ = datasets(data, config)
    adapter = train_lora(config, train, tmp_path / "run", progress=False).checkpoint
    nested = hostile_copy(model, tmp_path, "nested")
    (nested / "weights").mkdir()
    (nested / "model.safetensors").rename(nested / "weights" / "model.safetensors")
    from safetensors import safe_open
    with safe_open(str(nested / "weights" / "model.safetensors"), framework="numpy") as handle:
        names = list(handle.keys())
    (nested / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {name: "weights/model.safetensors" for name in names}}))
    merged = merge_to_hf(nested, adapter, tmp_path / "merged")
    flat = merge_to_hf(model, adapter, tmp_path / "flat")
    assert (merged / "weights" / "model.safetensors").is_file() and not (merged / "model.safetensors").exists()
    assert set(checkpoint_tensor_files(merged)) == set(names)
    _, from_nested = load_hf_checkpoint(merged, dtype=np.float32)
    _, from_flat = load_hf_checkpoint(flat, dtype=np.float32)
    np.testing.assert_array_equal(np.asarray(from_nested["layers"]["q_proj"]), np.asarray(from_flat["layers"]["q_proj"]))


def test_rotation_never_follows_a_linked_step_folder(setup, tmp_path):
    _, data, model = setup
    config = small_config(model, CHECKPOINT_EVERY=1, KEEP_CHECKPOINTS=1, MAX_STEPS=2)
    train, _ = datasets(data, config)
    elsewhere = train_lora(config._replace(MAX_STEPS=1), train, tmp_path / "elsewhere", progress=False).checkpoint
    run = tmp_path / "run"
    run.mkdir()
    (run / "step-00000000").symlink_to(elsewhere)                           # a user's link to another run's checkpoint
    before = snapshot(tmp_path / "elsewhere")
    result = train_lora(config, train, run, progress=False)
    assert result.checkpoint.name == "step-00000002" and (run / "step-00000000").is_symlink()
    assert snapshot(tmp_path / "elsewhere") == before


def test_an_empty_mount_point_is_a_working_output_and_the_marker_lists_what_is_there(setup, tmp_path):
    "An output folder on another filesystem (a tmpfs mounted there): written inside it, nothing left beside it."
    from jora.export import merge_to_hf
    from jora.files import MARKER
    from test_faults import small_disk
    _, data, model = setup
    config = small_config(model, MAX_STEPS=1, LORA_R=2)
    train, _ = datasets(data, config)
    adapter = train_lora(config, train, tmp_path / "run", progress=False).checkpoint
    with small_disk(tmp_path / "mounted", "64m") as mounted:
        merge_to_hf(model, adapter, mounted)
        listed = json.loads((mounted / MARKER).read_text())["entries"]
        assert sorted(listed) == sorted(p.name for p in mounted.iterdir() if p.name != MARKER)
        assert "model.safetensors" in listed and not list(mounted.glob(".jora-tmp-*"))
        assert not list(tmp_path.glob(".mounted.jora-tmp-*"))


def test_a_lone_surrogate_in_data_names_the_file_and_the_record(tmp_path):
    from jora.data import read_records
    data = tmp_path / "data.jsonl"
    data.write_text('{"instruction": "fine", "output": "yes"}\n{"instruction": "bad \\ud800 escape", "output": "x"}\n')
    assert read_error(lambda: read_records(data)) == (f"{data}, record 2 (line 2): 'instruction' holds a lone surrogate "
                                                      f"'\\ud800' at character 4, which is not text; fix that \\u escape "
                                                      f"in the record.")
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "\ud800"}]}) + "\n")
    assert "message 2 holds a lone surrogate" in read_error(lambda: read_records(chat))


@pytest.mark.parametrize("flag, value, message", [("--max-examples", "0", "at least 1, not '0'"),
                                                  ("--distractors", "-1", "at least 0, not '-1'")])
def test_jora_eval_refuses_counts_out_of_range_in_one_line(flag, value, message):
    process = subprocess.run([*JORA, "eval", "--adapter", "anything", flag, value], capture_output=True, text=True,
                             timeout=120)
    errors = [line for line in process.stderr.splitlines() if "error:" in line]
    assert process.returncode == 2 and errors == [f"jora eval: error: argument {flag}: takes a whole number of {message}"]
    assert "Traceback" not in process.stderr


def test_a_killed_writes_leftover_is_removed_only_from_a_folder_jora_may_write(tmp_path):
    "A `.jora-tmp-<dead pid>@host` folder inside an output: kept in a user's folder jora refuses, removed in an empty one."
    import socket
    from jora.files import UnsafeFolderError, output_folder
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = f".jora-tmp-{dead.stdout.strip()}@{socket.gethostname()}"
    users = tmp_path / "users"
    (users / leftover).mkdir(parents=True)
    (users / "thesis.tex").write_text("years of work")
    before = snapshot(users)
    with pytest.raises(UnsafeFolderError, match=r"holds files jora did not write \(thesis.tex\)"):
        with output_folder(users, "merged model"):
            pass
    assert snapshot(users) == before
    empty = tmp_path / "empty"
    (empty / leftover).mkdir(parents=True)
    with output_folder(empty, "merged model") as temporary:
        (temporary / "weights.txt").write_text("new")
    assert sorted(p.name for p in empty.iterdir()) == [".jora-output.json", "weights.txt"]
