"""The RAFT data pipeline: templates, labels, truncation, splits, mixing, batches, packing and bad input."""
import json
import subprocess
import sys
from collections import namedtuple

import jax
import numpy as np
import pandas as pd
import pytest
from transformers import AutoTokenizer

from jora.data import (PROMPT_WITH_INPUT, PROMPT_WITHOUT_INPUT, AlpacaDataset, RecordError, TruncationReport,
                       batches, default_buckets, format_prompt, generate_alpaca_dataset, read_records, split_records,
                       tokenize_record)
from jora.model import IGNORE_INDEX, Batch, LlamaConfig, causal_lm_loss_sum, init_params
from jora.testing import save_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    return save_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def tokenizer(tokenizer_folder):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    assert tokenizer.pad_token is None  # like Llama's: the pipeline must not need one
    return tokenizer


def records(count, context_words=5, seed=0):
    rng = np.random.default_rng(seed)
    return [{"instruction": f"What is the capital in row {i}?",
             "input": " ".join(["the table lists each country and its capital"] * int(rng.integers(1, context_words + 1))),
             "output": f"Capital number {i} is Paris"} for i in range(count)]


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(row) for row in rows), encoding="utf-8")
    return path


# ---- templates and labels ----

def test_templates_are_stanford_alpaca_word_for_word():
    assert format_prompt({"instruction": "Name it.", "input": "Context here.", "output": "x"}) == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nName it.\n\n### Input:\nContext here.\n\n### Response:")
    assert format_prompt({"instruction": "Name it.", "input": "", "output": "x"}) == (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nName it.\n\n### Response:")
    assert "{input}" in PROMPT_WITH_INPUT and "{input}" not in PROMPT_WITHOUT_INPUT


@pytest.mark.parametrize("record", [
    {"instruction": "Which capital?", "input": "France: capital Paris.", "output": "Paris"},
    {"instruction": "Say hello.", "input": "", "output": "Hello there, friend."},
    {"instruction": "Repeat.", "input": "x", "output": "multi\nline answer with ### Response: inside"},
])
def test_labelled_tokens_decode_to_output_and_eos(tokenizer, record):
    example = tokenize_record(record, tokenizer, max_len=512)
    ids, labels = example["input_ids"], example["labels"]
    assert ids.dtype == np.int32 and labels.dtype == np.int32 and ids.shape == labels.shape
    assert ids[0] == tokenizer.bos_token_id and (ids == tokenizer.bos_token_id).sum() == 1
    assert ids[-1] == tokenizer.eos_token_id and labels[-1] == tokenizer.eos_token_id  # the EOS is learnt
    labelled = labels[labels != IGNORE_INDEX]
    assert tokenizer.decode(labelled) == record["output"] + tokenizer.eos_token
    np.testing.assert_array_equal(ids[labels != IGNORE_INDEX], labelled)  # labels are the tokens themselves
    assert tokenizer.decode(ids[labels == IGNORE_INDEX], skip_special_tokens=True) == format_prompt(record)


# ---- truncation ----

def test_context_is_cut_first_and_the_output_kept(tokenizer):
    record = {"instruction": "Which capital?", "input": "the table lists each country " * 40, "output": "Paris, France"}
    full = tokenize_record(record, tokenizer, max_len=4096)
    report = TruncationReport()
    cut = tokenize_record(record, tokenizer, max_len=120, report=report)
    assert len(cut["input_ids"]) == 120 < len(full["input_ids"])
    np.testing.assert_array_equal(cut["labels"][cut["labels"] != IGNORE_INDEX], full["labels"][full["labels"] != IGNORE_INDEX])
    assert report.context_truncated == 1 and report.context_tokens_removed == len(full["input_ids"]) - 120
    prompt = tokenizer.decode(cut["input_ids"][cut["labels"] == IGNORE_INDEX], skip_special_tokens=True)
    assert prompt.endswith("\n\n### Response:") and "### Instruction:\nWhich capital?" in prompt


def test_output_cut_only_when_it_cannot_fit_and_counted(tokenizer):
    report = TruncationReport()
    long_answer = {"instruction": "Explain.", "input": "some context", "output": "Paris is the capital. " * 30}
    cut = tokenize_record(long_answer, tokenizer, max_len=64, report=report, number=1)
    assert len(cut["input_ids"]) == 64 and report.output_cut == 1 and report.output_tokens_removed > 0
    assert cut["labels"][-1] != tokenizer.eos_token_id  # the answer did not end here
    assert tokenize_record({"instruction": "Explain " * 80, "output": "x"}, tokenizer, 64, report, number=2) is None
    assert report.left_out == [2] and report.total == 2
    assert "1 with the output cut" in str(report) and "records [2]" in str(report)


def test_dataset_reports_and_warns_instead_of_dropping_silently(tmp_path, tokenizer):
    rows = records(6) + [{"instruction": "Why?", "input": "context " * 200, "output": "Because."}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.warns(UserWarning, match="with the context truncated"):
        dataset = AlpacaDataset(path=path, split="train", split_percentage=1.0, tokenizer=tokenizer, max_len=96,
                                alpaca_mix=0)
    assert len(dataset) == 7 and dataset.report.total == 7 and dataset.report.context_truncated >= 1
    assert max(dataset.lengths()) <= 96


# ---- splits and mixing ----

def test_splits_are_disjoint_complete_and_stable():
    rows = records(50)
    train, test = split_records(rows, "train", 0.8, seed=0), split_records(rows, "test", 0.8, seed=0)
    assert len(train) == 40 and len(test) == 10
    key = lambda r: r["output"]
    assert not set(map(key, train)) & set(map(key, test)) and set(map(key, train + test)) == set(map(key, rows))
    assert [r["output"] for r in split_records(rows, "test", 0.8, seed=0)] == [r["output"] for r in test]
    assert set(map(key, split_records(rows, "test", 0.8, seed=1))) != set(map(key, test))
    # the same assignment in another process with another hash seed (so no dependence on Python's hash())
    code = ("import json, sys; from jora.data import split_records; rows = json.loads(sys.stdin.read()); "
            "print(json.dumps([r['output'] for r in split_records(rows, 'test', 0.8, seed=0)]))")
    other = subprocess.run([sys.executable, "-c", code], input=json.dumps(rows), capture_output=True, text=True,
                           env={"PYTHONHASHSEED": "123", "PATH": ""}, check=True)
    assert json.loads(other.stdout) == [r["output"] for r in test]


def test_split_assignment_is_pinned():
    "The hash order is the contract: these ten records split the same way on every machine and version."
    rows = [{"instruction": f"q{i}", "input": "", "output": str(i)} for i in range(10)]
    assert [r["output"] for r in split_records(rows, "test", 0.8, seed=0)] == PINNED_TEST_OUTPUTS


PINNED_TEST_OUTPUTS = ["0", "7"]  # recorded when the hash order was chosen; a change here breaks users' splits


def test_general_mix_goes_to_train_only(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "task.jsonl", records(20))
    general = write_jsonl(tmp_path / "general.jsonl",
                          [{"instruction": f"General task {i}", "output": f"General answer {i}"} for i in range(30)])
    train = AlpacaDataset(path=path, split="train", tokenizer=tokenizer, alpaca_mix=0.5, general_path=general)
    test = AlpacaDataset(path=path, split="test", tokenizer=tokenizer, alpaca_mix=0.5, general_path=general)
    mixed = [r for r in train.records if r["instruction"].startswith("General")]
    assert len(train) == 16 + 8 and len(mixed) == 8 and len(test) == 4
    assert not any(r["instruction"].startswith("General") for r in test.records)
    again = AlpacaDataset(path=path, split="train", tokenizer=tokenizer, alpaca_mix=0.5, general_path=general)
    assert again.records == train.records
    with pytest.raises(ValueError, match="alpaca_mix=0.3 asks to mix .* no general_path was given"):
        AlpacaDataset(path=path, split="train", tokenizer=tokenizer)
    AlpacaDataset(path=path, split="test", tokenizer=tokenizer)  # the test split never mixes, so needs no path


def test_generate_alpaca_dataset_reads_the_paper_config(tmp_path, tokenizer_folder):
    Config = namedtuple("Config", "LLAMA2_HF_PATH MAX_SEQ_LEN SEED ALPACA_MIX")
    path = write_jsonl(tmp_path / "task.jsonl", records(10))
    dataset = generate_alpaca_dataset(path, "train", Config(str(tokenizer_folder), 256, 0, 0.0))
    assert len(dataset) == 8 and dataset.max_len == 256


def test_inputs_as_json_list_and_dataframe(tmp_path):
    rows = records(3)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    assert read_records(tmp_path / "d.json") == rows
    frame = pd.DataFrame([{"instruction": "a", "output": "b"}, {"instruction": "c", "input": "d", "output": "e"}])
    assert read_records(frame) == [{"instruction": "a", "input": "", "output": "b"},
                                   {"instruction": "c", "input": "d", "output": "e"}]


# ---- batches ----

def test_batches_use_few_lengths_and_cover_every_example_once(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", records(37, context_words=12))
    dataset = AlpacaDataset(path=path, split="train", split_percentage=1.0, tokenizer=tokenizer, max_len=512, alpaca_mix=0)
    seen, lengths = [], set()
    for batch in batches(dataset, batch_size=8, seed=3):
        assert set(batch) == {"input_ids", "labels", "attention_mask", "positions", "segment_ids"}
        assert all(array.dtype == np.int32 and array.shape[0] == 8 for array in batch.values())
        lengths.add(batch["input_ids"].shape[1])
        for row in range(8):
            real = batch["attention_mask"][row].astype(bool)
            if real.any():
                seen.append(tuple(batch["input_ids"][row][real]))
            assert not (batch["labels"][row][~real] != IGNORE_INDEX).any()
    assert sorted(seen) == sorted(tuple(dataset[i]["input_ids"]) for i in range(len(dataset)))
    assert lengths <= set(default_buckets(512)) and len(lengths) <= 3
    first = [b["input_ids"] for b in batches(dataset, batch_size=8, seed=3, epoch=1)]
    again = [b["input_ids"] for b in batches(dataset, batch_size=8, seed=3, epoch=1)]
    assert all((a == b).all() for a, b in zip(first, again))


def test_packed_batches_give_the_losses_of_the_examples_alone(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", records(12))
    dataset = AlpacaDataset(path=path, split="train", split_percentage=1.0, tokenizer=tokenizer, max_len=512, alpaca_mix=0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    params = init_params(config, jax.random.key(0), std=0.1)
    packed = list(batches(dataset, batch_size=2, pack=True, seed=1))
    assert sum(int(b["segment_ids"].max(axis=1).sum()) for b in packed) == len(dataset)
    assert max(int(b["segment_ids"].max()) for b in packed) >= 3  # several examples really share a row
    total = sum(float(causal_lm_loss_sum(config, params, Batch(**b))[0]) for b in packed)
    alone = sum(float(causal_lm_loss_sum(config, params, Batch(e["input_ids"][None], e["labels"][None]))[0])
                for e in (dataset[i] for i in range(len(dataset))))
    assert abs(total - alone) <= 1e-5 * alone, (total, alone)


# ---- bad input: each error names the file and the record ----

@pytest.mark.parametrize("content, message", [
    ('[{"instruction": "a", "output": "b"},\n {"instruction": "c", "output": }]', r"d\.json: invalid JSON at line 2"),
    ('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output"\n', r"d\.json, record 2 \(line 2\): invalid JSON"),
    ('{"instruction": "a", "output": "b"}\n{"output": "b"}', r"d\.json, record 2 \(line 2\): missing 'instruction'"),
    ('[{"instruction": "a", "output": "b"}, {"instruction": "a"}]', r"d\.json, record 2: missing 'output'"),
    ('[{"instruction": "a", "output": 42}]', r"d\.json, record 1: 'output' must be a string, got int"),
    ('[{"instruction": "a", "input": ["x"], "output": "b"}]', r"d\.json, record 1: 'input' must be a string, got list"),
    ('["just a string"]', r"d\.json, record 1: expected an object"),
    ("   \n", r"d\.json is empty"),
    ("[]", r"d\.json holds no records"),
])
def test_bad_input_names_file_and_record(tmp_path, content, message):
    (tmp_path / "d.json").write_text(content, encoding="utf-8")
    with pytest.raises(RecordError, match=message):
        read_records(tmp_path / "d.json")


def test_non_utf8_and_missing_path(tmp_path):
    (tmp_path / "d.json").write_bytes(b'[{"instruction": "caf\xe9", "output": "b"}]')
    with pytest.raises(RecordError, match=r"d\.json: not UTF-8 text \(byte 0xe9 at offset 21\)"):
        read_records(tmp_path / "d.json")
    with pytest.raises(FileNotFoundError, match="No data file at .*absent.json"):
        read_records(tmp_path / "absent.json")


def test_a_list_of_records_is_named_briefly_in_warnings(tokenizer):
    rows = [{"instruction": "Why?", "input": "context " * 200, "output": "Because."}]
    with pytest.warns(UserWarning, match=r"^list of 1 records \(train\): 1 records: 0 intact, 1 with the context") as caught:
        AlpacaDataset(path=rows, split="train", split_percentage=1.0, tokenizer=tokenizer, max_len=96, alpaca_mix=0)
    assert "Because" not in str(caught[0].message)
