"""Export against the real clients: peft's PeftModel on jora's adapters, transformers on merged folders, and peft's
own adapters read by jora. Tolerance: logits within 1e-4 max abs (fp32)."""
import json
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from safetensors import safe_open

from jora.files import write_manifest
from jora.export import merge_to_hf
from jora.formats import load_peft_adapter, save_peft_adapter
from jora.lora import LoraConfig, init_lora
from jora.model import forward
from jora.formats import load_hf_checkpoint
from jora.testing import save_tiny_hf_checkpoint
from jora.formats import save_lora

TOLERANCE = 1e-4
CASES = {
    "llama2-q,v": ("llama2", {}, LoraConfig(r=8, alpha=16)),
    "gqa-all-seven": ("llama3.1", {"max_shard_size": "60KB"}, LoraConfig(r=4, alpha=8, targets="all-linear")),
    "tied-rslora": ("llama3.2", {}, LoraConfig(r=16, alpha=8, targets=("k_proj", "o_proj", "down_proj"), use_rslora=True)),
}


def trained_lora(config, lora_config, seed=0):
    "Adapters with a non-zero B, as after training."
    lora = init_lora(config, lora_config, jax.random.key(seed))
    return jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(seed + 1), x.shape), lora)


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    style, extra, lora_config = CASES[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    base = save_tiny_hf_checkpoint(folder / "base", style, **extra)
    config, params = load_hf_checkpoint(base, dtype=jnp.float32)
    lora = trained_lora(config, lora_config)
    ids = np.random.default_rng(0).integers(3, config.vocab_size, (2, 12))
    expected = np.asarray(forward(config, params, ids, lora=lora))
    assert np.abs(expected - np.asarray(forward(config, params, ids))).max() > 1e-2  # the adapters matter
    return folder, base, config, lora, lora_config, ids, expected


def test_peft_loads_the_exported_adapter(case):
    folder, base, config, lora, lora_config, ids, expected = case
    adapter = save_peft_adapter(folder / "adapter", lora, lora_config, base)
    key = next(iter(safe_open(str(adapter / "adapter_model.safetensors"), "numpy").keys()))
    assert key.startswith("base_model.model.model.layers.") and key.endswith((".lora_A.weight", ".lora_B.weight"))
    model = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager"), adapter).eval()
    assert model.peft_config["default"].r == lora_config.r
    assert np.abs(hf_logits(model, ids) - expected).max() < TOLERANCE


@pytest.mark.parametrize("source", ["peft-adapter", "jora-checkpoint"])
def test_merged_checkpoint_equals_lora_forward(case, source):
    folder, base, config, lora, lora_config, ids, expected = case
    if source == "peft-adapter":
        lora_path = save_peft_adapter(folder / "adapter-for-merge", lora, lora_config, base)
    else:
        (folder / "checkpoints" / "step-00000007").mkdir(parents=True, exist_ok=True)
        save_lora(folder / "checkpoints" / "step-00000007" / "lora.safetensors", lora, lora_config)
        (folder / "checkpoints" / "step-00000007" / "state.json").write_text('{"step": 7}')
        write_manifest(folder / "checkpoints" / "step-00000007", 7)
        lora_path = folder / "checkpoints"  # the folder of checkpoints: the newest is used
    merged = merge_to_hf(base, lora_path, folder / f"merged-{source}")
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (merged / name).is_file(), name
    assert sorted(p.name for p in merged.glob("*.safetensors")) == sorted(p.name for p in base.glob("*.safetensors"))
    model = transformers.AutoModelForCausalLM.from_pretrained(merged, attn_implementation="eager")
    assert np.abs(hf_logits(model, ids) - expected).max() < TOLERANCE


def test_an_adapter_written_by_peft_loads_into_jora(case):
    folder, base, config, _, lora_config, ids, _ = case
    model = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager"),
                                peft.LoraConfig(r=lora_config.r, lora_alpha=lora_config.alpha, lora_dropout=0.0,
                                                target_modules=list(lora_config.targets), use_rslora=lora_config.use_rslora))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.normal_(0.0, 0.05)
    model.save_pretrained(folder / "peft-written")
    lora, loaded_config = load_peft_adapter(folder / "peft-written", config)
    assert loaded_config.targets == lora_config.targets and loaded_config.scale == pytest.approx(lora_config.scale)
    _, params = load_hf_checkpoint(base, dtype=jnp.float32)
    ours = np.asarray(forward(config, params, ids, lora=lora))
    assert np.abs(hf_logits(model.eval(), ids) - ours).max() < TOLERANCE


def test_merge_keeps_the_base_dtype_and_computes_in_fp32(tmp_path):
    base = save_tiny_hf_checkpoint(tmp_path / "base", "llama3.1", dtype="bfloat16")
    config, _ = load_hf_checkpoint(base, dtype=jnp.float32)
    lora_config = LoraConfig(r=4, alpha=8, targets=("v_proj",))
    lora = trained_lora(config, lora_config)
    merged = merge_to_hf(base, save_peft_adapter(tmp_path / "adapter", lora, lora_config), tmp_path / "merged")
    key = "model.layers.1.self_attn.v_proj.weight"
    with safe_open(str(base / "model.safetensors"), "numpy") as before, safe_open(str(merged / "model.safetensors"), "numpy") as after:
        original, result = before.get_tensor(key), after.get_tensor(key)
    assert str(result.dtype) == "bfloat16"
    update = (np.asarray(lora.adapters["v_proj"]["lora_A"][1]) @ np.asarray(lora.adapters["v_proj"]["lora_B"][1])).T
    np.testing.assert_array_equal(result, (original.astype(np.float32) + lora_config.scale * update).astype(original.dtype))


def test_huggingface_merger_command(tmp_path):
    base = save_tiny_hf_checkpoint(tmp_path / "base", "llama2")
    config, _ = load_hf_checkpoint(base, dtype=jnp.float32)
    lora_config = LoraConfig(r=4, alpha=4)
    (tmp_path / "ckpt").mkdir()
    save_lora(tmp_path / "ckpt" / "lora.safetensors", trained_lora(config, lora_config), lora_config)
    executable = shutil.which("huggingface_merger")
    command = [executable] if executable else [sys.executable, "-c", "import sys, jora.export as e; sys.exit(e.huggingface_merger())"]
    process = subprocess.run([*command, str(base), str(tmp_path / "ckpt"), str(tmp_path / "merged")],
                             capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-2000:]
    assert (tmp_path / "merged" / "model.safetensors").is_file() and "merged model written" in process.stdout


# ---- mismatches are clear errors ----

@pytest.fixture()
def exported(tmp_path):
    base = save_tiny_hf_checkpoint(tmp_path / "base", "llama3.1", with_tokenizer=False)
    config, _ = load_hf_checkpoint(base, dtype=jnp.float32)
    lora_config = LoraConfig(r=4, alpha=8)
    adapter = save_peft_adapter(tmp_path / "adapter", trained_lora(config, lora_config), lora_config)
    return tmp_path, base, config, adapter


def edit(adapter, **changes):
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_mismatched_rank(exported):
    _, _, config, adapter = exported
    edit(adapter, r=8)
    with pytest.raises(ValueError, match=r"q_proj.lora_A.weight has shape \(4, 64\), which does not have rank r=8"):
        load_peft_adapter(adapter, config)


def test_mismatched_shape(exported):
    tmp_path, _, _, adapter = exported
    other = save_tiny_hf_checkpoint(tmp_path / "other", "llama3.1", with_tokenizer=False, hidden_size=96)
    with pytest.raises(ValueError, match="Was the adapter trained on another base model"):
        merge_to_hf(other, adapter, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_mismatched_target_set(exported):
    _, _, config, adapter = exported
    edit(adapter, target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"holds tensors outside the configured targets \['q_proj'\]"):
        load_peft_adapter(adapter, config)
    edit(adapter, target_modules=["q_proj", "v_proj", "o_proj"])
    with pytest.raises(ValueError, match=r"o_proj.lora_A.weight is missing"):
        load_peft_adapter(adapter, config)
    edit(adapter, target_modules=["q_proj", "embed_tokens"])
    with pytest.raises(ValueError, match=r"\['embed_tokens'\] are not Llama projections"):
        load_peft_adapter(adapter, config)


@pytest.mark.parametrize("changes, message", [({"use_dora": True}, "use_dora=True is not supported"),
                                              ({"bias": "all"}, "bias='all' is not supported"),
                                              ({"peft_type": "IA3"}, "peft_type 'IA3' is not LoRA")])
def test_unsupported_adapter_features(exported, changes, message):
    _, _, config, adapter = exported
    edit(adapter, **changes)
    with pytest.raises(ValueError, match=message):
        load_peft_adapter(adapter, config)


def test_jora_export_writes_the_newest_checkpoint_as_a_peft_adapter(tmp_path):
    """`jora export RUN FOLDER`: the run's newest checkpoint, naming the run's base; peft serves it with jora's logits.
    A folder without checkpoints is one line, and nothing is written."""
    from jora.config import ParallamaConfig
    from jora.data import AlpacaDataset, format_prompt
    from jora.testing import demo_raft_records
    from jora.train import train_lora
    rows = demo_raft_records(16, seed=5)
    base = save_tiny_hf_checkpoint(tmp_path / "base", "llama3.1", corpus=[format_prompt(r) + r["output"] for r in rows])
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    config = ParallamaConfig(LLAMA2_HF_PATH=str(base), LORA_R=4, LORA_ALPHA=8, LR=2e-2, DTYPE="float32", REMAT="none",
                             BATCH_SIZE=4, N_ACCUMULATION_STEPS=1, MAX_SEQ_LEN=160, NUM_GPUS=1, MAX_STEPS=3,
                             CHECKPOINT_EVERY=2, SPLIT_PERCENTAGE=1.0, WARMUP_STEPS=0, EVAL_EVERY=0)
    train = AlpacaDataset(path=tmp_path / "data.jsonl", split="train", split_percentage=1.0, tokenizer=str(base),
                          max_len=160, alpaca_mix=0)
    result = train_lora(config, train, tmp_path / "run", progress=False)
    jora = [sys.executable, "-c", "import sys, jora.cli; sys.exit(jora.cli.main())"]
    done = subprocess.run([*jora, "export", str(tmp_path / "run"), str(tmp_path / "adapter")], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{tmp_path / 'run' / 'step-00000003'}" in done.stdout and f"(base model: {base})" in done.stdout
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    model_config, params = load_hf_checkpoint(base, dtype=jnp.float32)
    ids = np.random.default_rng(1).integers(3, model_config.vocab_size, (1, 10))
    expected = np.asarray(forward(model_config, params, ids, lora=result.lora))
    served = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager"), tmp_path / "adapter").eval()
    assert np.abs(hf_logits(served, ids) - expected).max() < TOLERANCE
    assert np.abs(expected - np.asarray(forward(model_config, params, ids))).max() > 1e-3   # the adapters matter
    (tmp_path / "empty").mkdir()
    refused = subprocess.run([*jora, "export", str(tmp_path / "empty"), str(tmp_path / "adapter2")], capture_output=True,
                             text=True, timeout=600)
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert refused.returncode == 1 and len(lines) == 1 and "No verified checkpoint in" in lines[0], refused.stderr
    assert not (tmp_path / "adapter2").exists()
