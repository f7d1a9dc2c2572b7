"""Evaluation a researcher can trust: gold answer lists kept from the file to the score, the official WikiTableQuestions
rule on answers that hold ", ", and a held-out file scored whole."""
import json
import subprocess
import sys

import numpy as np
import pytest

from jora.config import ParallamaConfig
from jora.data import AlpacaDataset, RecordError, format_prompt, read_records
from jora.evaluate import prediction_readings, wikitablequestions_match
from jora.raft import read_wtq_questions, wtq_records
from jora.testing import demo_raft_records, save_tiny_hf_checkpoint
from jora.train import train_lora

JORA = [sys.executable, "-c", "import sys, jora.cli; sys.exit(jora.cli.main())"]


@pytest.mark.parametrize("answers, predicted, right", [
    (["Bangkok, Thailand"], "Bangkok, Thailand", True),     # one gold value holding ", ": was split in two and failed
    (["Bangkok, Thailand"], "Thailand, Bangkok", False),    # its parts in another order: was accepted
    (["Bangkok, Thailand"], "Bangkok", False),
    (["Italy", "Russia"], "Russia, Italy", True), (["Italy", "Russia"], "Italy | Russia", True),
    (["Italy", "Russia"], "Italy", False), (["Italy", "Russia"], "Italy, Russia, Spain", False),
    (["2004"], "2004.0", True), (["12,467"], "12467", False),
])
def test_the_official_rule_reads_a_prediction_as_one_value_or_several(answers, predicted, right):
    record = {"instruction": "?", "input": "", "output": ", ".join(answers), "answers": answers}
    assert wikitablequestions_match(record, predicted) is right


def test_prediction_readings():
    assert prediction_readings("Bangkok, Thailand") == [["Bangkok, Thailand"], ["Bangkok", "Thailand"]]
    assert prediction_readings(" a | b ") == [["a | b"], ["a", "b"]]
    assert prediction_readings("2004") == [["2004"]]


def test_gold_answer_lists_survive_a_file(tmp_path):
    """wtq_records -> a JSONL file -> read_records -> the dataset's records: the gold list is kept (it was dropped on
    reading, so `jora eval` scored the joined string); a malformed list is refused by record."""
    from pathlib import Path
    sample = Path(__file__).resolve().parents[1] / "samples" / "wikitablequestions-sample"
    records = wtq_records(sample, "data/pristine-unseen-tables.tsv")
    several = next(record for record in records if len(record["answers"]) > 1)
    path = tmp_path / "held-out.jsonl"
    path.write_text("\n".join(json.dumps(record) for record in records) + "\n")
    read = read_records(path)
    assert [record["answers"] for record in read] == [q["answers"] for q in read_wtq_questions(sample, "data/pristine-unseen-tables.tsv")]
    assert several["answers"] in [record["answers"] for record in read]
    (tmp_path / "bad.jsonl").write_text(json.dumps({**records[0], "answers": "2004"}) + "\n")
    with pytest.raises(RecordError, match=r"bad.jsonl, record 1 \(line 1\): 'answers' must be a non-empty list"):
        read_records(tmp_path / "bad.jsonl")


def test_a_held_out_file_is_scored_whole_and_the_split_is_said(tmp_path):
    """`jora eval --test-data` scores every record of a held-out file (the default split scored 8 of 40 silently, and
    SPLIT_PERCENTAGE 1.0 was refused); `--data` says how many of the file's records its test split scored."""
    rows = demo_raft_records(24, seed=2)
    model = save_tiny_hf_checkpoint(tmp_path / "tiny", "llama3.1", corpus=[format_prompt(r) + r["output"] for r in rows])
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:16]))
    (tmp_path / "held-out.jsonl").write_text("\n".join(json.dumps(r) for r in rows[16:]))
    config = ParallamaConfig(LLAMA2_HF_PATH=str(model), LORA_R=2, LORA_ALPHA=4, DTYPE="float32", REMAT="none",
                             BATCH_SIZE=4, N_ACCUMULATION_STEPS=1, MAX_SEQ_LEN=160, NUM_GPUS=1, MAX_STEPS=1,
                             SPLIT_PERCENTAGE=1.0, WARMUP_STEPS=0, EVAL_EVERY=0)
    train = AlpacaDataset(path=tmp_path / "train.jsonl", split="train", split_percentage=1.0, tokenizer=str(model),
                          max_len=160, alpaca_mix=0)
    checkpoint = train_lora(config, train, tmp_path / "run", progress=False).checkpoint
    common = ["eval", "--adapter", str(checkpoint), "--llama2-hf-path", str(model), "--max-seq-len", "160", "--dtype", "float32",
              "--remat", "none", "--max-new-tokens", "4"]
    whole = subprocess.run([*JORA, *common, "--test-data", str(tmp_path / "held-out.jsonl"), "--split-percentage", "1.0"],
                           capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-2000:]
    assert f"scored 8 of the 8 records in {tmp_path / 'held-out.jsonl'}: every record" in whole.stdout
    assert whole.stdout.count("/8") == 2, whole.stdout   # both rows (base, adapter) over the 8 records
    split = subprocess.run([*JORA, *common, "--data", str(tmp_path / "held-out.jsonl")], capture_output=True, text=True,
                           timeout=600)
    assert split.returncode == 0, split.stderr[-2000:]
    assert "scored 2 of the 8 records" in split.stdout and "SPLIT_PERCENTAGE=0.8" in split.stdout, split.stdout
    both = subprocess.run([*JORA, *common, "--data", "a.jsonl", "--test-data", "b.jsonl"], capture_output=True, text=True)
    assert both.returncode == 1 and "Give --data" in both.stderr


def test_bootstrap_interval_agrees_with_scipy():
    "Question-level intervals match scipy's percentile bootstrap within Monte Carlo error (0.015 on 400 questions)."
    from scipy.stats import bootstrap
    from jora.evaluate import accuracy_interval
    hits = np.random.default_rng(3).random(400) < 0.3
    ours = accuracy_interval(list(hits), resamples=4000)
    reference = bootstrap((hits.astype(float),), np.mean, n_resamples=4000, method="percentile", random_state=5)
    assert ours["accuracy"] == hits.mean() and ours["questions"] == 400
    assert abs(ours["low"] - reference.confidence_interval.low) < 0.015
    assert abs(ours["high"] - reference.confidence_interval.high) < 0.015


def test_bootstrap_draws_whole_groups():
    "Correlated questions (all right or all wrong in a group) widen the interval; a constant metric gives a point."
    from jora.evaluate import accuracy_interval, bootstrap_interval
    hits = [True] * 60 + [False] * 140
    alone = accuracy_interval(hits)
    grouped = accuracy_interval(hits, [i // 20 for i in range(200)])  # 10 groups of 20 alike answers
    assert grouped["high"] - grouped["low"] > 2 * (alone["high"] - alone["low"])
    assert bootstrap_interval([[1], [1]], lambda drawn: 0.5) == (0.5, 0.5)
    assert all(np.isnan(bootstrap_interval([[1]], lambda drawn: float("nan"))))
    with pytest.raises(ValueError, match="at least one scored question"):
        bootstrap_interval([], len)
