"""An exported adapter carries its prompt format: the folder alone (its tokenizer files and jora_prompt_format.json),
served with transformers + peft, reproduces the prompt tokens jora trained on and jora's greedy tokens; `jora check
--adapter` says so, and exits 1 when they differ."""
import json

import jax
import pytest

from jora.cli import check_adapter, main
from jora.data import PROMPT_FORMAT_FILE, prompt_format
from jora.formats import load_hf_checkpoint, save_peft_adapter
from jora.lora import LoraConfig, init_lora
from jora.testing import demo_raft_records, save_tiny_hf_checkpoint

pytest.importorskip("peft")


@pytest.fixture(scope="module", params=["sentencepiece", "byte_level"])
def exported(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    records = demo_raft_records(4, seed=3)
    (folder / "data.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    base = save_tiny_hf_checkpoint(folder / "base", "llama3.1", tokenizer_kind=request.param,
                                   corpus=[r["instruction"] + "\n" + r["input"] + r["output"] for r in records])
    config, _ = load_hf_checkpoint(base)
    lora_config = LoraConfig(r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
    lora = jax.tree.map(lambda x: x + 0.05, init_lora(config, lora_config, jax.random.key(0)))
    return save_peft_adapter(folder / "adapter", lora, lora_config, str(base)), folder / "data.jsonl"


def copy_of(adapter, folder, names=None):
    "A copy of the adapter folder's files (or only `names`), to change without touching the fixture."
    folder.mkdir()
    for file in adapter.iterdir():
        if names is None or file.name in names:
            (folder / file.name).write_bytes(file.read_bytes())
    return folder


def test_the_served_adapter_sees_the_training_prompts(exported, capsys):
    adapter, data = exported
    assert {"tokenizer.json", "tokenizer_config.json", PROMPT_FORMAT_FILE} <= {p.name for p in adapter.iterdir()}
    assert json.loads((adapter / PROMPT_FORMAT_FILE).read_text()) == prompt_format()
    result = check_adapter(adapter, data, count=3, max_new_tokens=6)
    assert result["agree"] and len(result["records"]) == 3
    assert main(["check", "--adapter", str(adapter), "--data", str(data), "--count", "2", "--max-new-tokens", "4"]) == 0
    assert "record 2: prompt tokens same, greedy tokens same" in capsys.readouterr().out


def test_a_prompt_format_that_differs_from_training_fails_the_check(exported, tmp_path, capsys):
    adapter, data = exported
    changed = copy_of(adapter, tmp_path / "changed")
    templates = prompt_format()
    templates["prompt_with_input"] = templates["prompt_with_input"].replace("### Input:\n", "### Input: ")
    (changed / PROMPT_FORMAT_FILE).write_text(json.dumps(templates))
    assert main(["check", "--adapter", str(changed), "--data", str(data), "--count", "1", "--max-new-tokens", "2"]) == 1
    assert "prompt tokens DIFFER" in capsys.readouterr().out


def test_a_folder_without_its_prompt_format_is_a_clear_error(exported, tmp_path, capsys):
    adapter, data = exported
    bare = copy_of(adapter, tmp_path / "bare", names=("adapter_config.json", "adapter_model.safetensors"))
    assert main(["check", "--adapter", str(bare), "--data", str(data)]) == 1
    assert "lacks jora_prompt_format.json or the tokenizer's files" in capsys.readouterr().err
    assert main(["check", "--adapter", str(adapter)]) == 1
    assert "needs --data FILE" in capsys.readouterr().err


def test_an_adapter_without_a_tokenizer_to_ship_warns(tmp_path):
    config, _ = load_hf_checkpoint(save_tiny_hf_checkpoint(tmp_path / "base", "llama3.1", with_tokenizer=False))
    lora_config = LoraConfig(r=2, alpha=4)
    with pytest.warns(UserWarning, match="without tokenizer files"):
        folder = save_peft_adapter(tmp_path / "adapter", init_lora(config, lora_config, jax.random.key(0)), lora_config)
    assert (folder / PROMPT_FORMAT_FILE).is_file() and not (folder / "tokenizer.json").exists()


def test_chat_records_are_served_with_the_shipped_chat_template(tmp_path):
    from transformers import AutoTokenizer
    from jora.data import as_chat
    from jora.testing import CHAT_TEMPLATES, add_chat_template
    records = [as_chat(r, system="Answer from the table.") for r in demo_raft_records(3, seed=5)]
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    base = save_tiny_hf_checkpoint(tmp_path / "base", "llama3.1", corpus=[r["context"] for r in records])
    add_chat_template(base)
    config, _ = load_hf_checkpoint(base)
    lora_config = LoraConfig(r=2, alpha=4)
    lora = jax.tree.map(lambda x: x + 0.05, init_lora(config, lora_config, jax.random.key(1)))
    adapter = save_peft_adapter(tmp_path / "adapter", lora, lora_config, str(base))
    assert AutoTokenizer.from_pretrained(adapter).chat_template == CHAT_TEMPLATES["header"]  # the template ships with it
    result = check_adapter(adapter, tmp_path / "chat.jsonl", count=2, max_new_tokens=4)
    assert result["agree"], result
