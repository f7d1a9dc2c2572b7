"""jora.model against transformers' LlamaForCausalLM / MistralForCausalLM on tiny local checkpoints.

Tolerances: fp32 logits within 1e-4 max abs on every real (non-padding) token; greedy tokens identical.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jora.attention import ComputeOptions
from jora.model import (IGNORE_INDEX, Batch, LlamaConfig, causal_lm_loss, hidden_states, forward, generate,
                        positions_from_mask, rms_norm)
from jora.formats import checkpoint_tensor_files, load_hf_checkpoint, load_hf_config
from jora.testing import save_tiny_hf_checkpoint

LOGIT_TOLERANCE = 1e-4

# (name, style, extra arguments for save_tiny_hf_checkpoint)
CHECKPOINTS = {
    "llama2": ("llama2", {}),
    "llama3.1": ("llama3.1", {}),
    "llama3.2-tied": ("llama3.2", {}),
    "llama3.1-sharded": ("llama3.1", {"max_shard_size": "60KB", "seed": 3}),
    "linear-rope": ("linear-rope", {}),
    "mistral-window": ("mistral", {}),
    "biased": ("biased", {}),
}


@pytest.fixture(scope="module", params=list(CHECKPOINTS))
def checkpoint(request, tmp_path_factory):
    "A tiny checkpoint written by transformers, loaded both by jora (fp32) and by transformers (eager attention)."
    style, extra = CHECKPOINTS[request.param]
    folder = save_tiny_hf_checkpoint(tmp_path_factory.mktemp(request.param), style, **extra)
    config, params = load_hf_checkpoint(folder, dtype=jnp.float32)
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    return request.param, folder, config, params, reference


def padded_batch(lengths, time, side, vocab, seed=0):
    "Random token ids `[len(lengths), time]`, each row padded (with 0) to `time` on `side`."
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), time), np.int64)
    mask = np.zeros((len(lengths), time), np.int64)
    for row, length in enumerate(lengths):
        columns = slice(time - length, time) if side == "left" else slice(0, length)
        ids[row, columns] = rng.integers(3, vocab, length)
        mask[row, columns] = 1
    return ids, mask


def reference_logits(reference, ids, mask):
    positions = np.asarray(positions_from_mask(mask))
    with torch.no_grad():
        return reference(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                         position_ids=torch.tensor(positions)).logits.float().numpy()


@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_logits_match_transformers(checkpoint, padding):
    name, _, config, params, reference = checkpoint
    lengths = [24, 24, 24] if padding == "none" else [24, 13, 5]  # 24 > the Mistral window of 8
    ids, mask = padded_batch(lengths, 24, "left" if padding == "none" else padding, config.vocab_size)
    expected = reference_logits(reference, ids, mask)
    ours = np.asarray(forward(config, params, ids, attention_mask=mask))
    assert ours.dtype == np.float32 and ours.shape == expected.shape
    real = mask.astype(bool)
    error = np.abs(ours - expected)[real].max()
    assert error < LOGIT_TOLERANCE, f"{name}, {padding} padding: max |jora - transformers| = {error:.2e}"
    assert np.isfinite(ours).all()


def test_loss_matches_transformers(checkpoint):
    "causal_lm_loss equals transformers' outputs.loss for the same labels (-100 ignored), within 1e-5."
    _, _, config, params, reference = checkpoint
    ids, mask = padded_batch([20, 11], 20, "left", config.vocab_size, seed=5)
    labels = np.where(mask.astype(bool), ids, IGNORE_INDEX)
    labels[:, :-6] = IGNORE_INDEX  # learn only the answer: the last six tokens
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels),
                             position_ids=torch.tensor(np.asarray(positions_from_mask(mask)))).loss.item()
    ours = float(causal_lm_loss(config, params, Batch(ids, labels, mask)))
    for unlabelled in (ids, Batch(ids)):   # ids alone, or a Batch without labels: one clear line
        with pytest.raises(ValueError, match=r"The loss needs labels: give a Batch\(input_ids, labels"):
            causal_lm_loss(config, params, unlabelled)
    assert abs(ours - expected) <= 1e-5 * abs(expected), (ours, expected)


def test_padding_does_not_change_real_tokens(checkpoint):
    "A row's logits at its real tokens are the same alone and inside a left- or right-padded batch."
    _, _, config, params, _ = checkpoint
    ids, mask = padded_batch([9], 9, "left", config.vocab_size, seed=1)
    alone = np.asarray(forward(config, params, ids))
    for side in ("left", "right"):
        padded = np.zeros((1, 16), np.int64)
        columns = slice(7, 16) if side == "left" else slice(0, 9)
        padded[0, columns] = ids[0]
        batch_logits = np.asarray(forward(config, params, padded, attention_mask=padded != 0))
        np.testing.assert_allclose(batch_logits[0, columns], alone[0], atol=LOGIT_TOLERANCE)


def test_greedy_generation_matches_transformers(checkpoint):
    name, _, config, params, reference = checkpoint
    ids, mask = padded_batch([7, 3], 7, "left", config.vocab_size, seed=2)
    with torch.no_grad():
        expected = reference.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=20,
                                      do_sample=False, pad_token_id=0).numpy()
    ours = generate(config, params, ids, attention_mask=mask, max_new_tokens=20, pad_token_id=0)
    assert ours.shape == expected.shape, f"{name}: lengths differ {ours.shape} vs {expected.shape}"
    assert (ours == expected).all(), f"{name}: first difference at column {np.argmax((ours != expected).any(0))}"


def test_generation_without_stop_gives_twenty_tokens(checkpoint):
    "With end-of-sequence stopping off, exactly 20 greedy tokens, equal to transformers with the same setting."
    _, _, config, params, reference = checkpoint
    ids, _ = padded_batch([6], 6, "left", config.vocab_size, seed=4)
    ours = generate(config, params, ids, max_new_tokens=20, eos_token_id=())
    with torch.no_grad():
        expected = reference.generate(torch.tensor(ids), max_new_tokens=20, min_new_tokens=20, do_sample=False,
                                      pad_token_id=0).numpy()
    assert ours.shape == (1, 26)
    np.testing.assert_array_equal(ours, expected)


@pytest.mark.parametrize("shape", [(1, 37, 24), (3, 37, 24), (37, 24), (1, 1, 5, 24)])
def test_rms_norm_and_its_gradient_match_transformers(shape):
    """One sequence's rows take the `[time, hidden]` path, several the batched one; both equal `LlamaRMSNorm`: output
    and input gradient within 1e-6 (gradient 1e-5 relative), weight gradient within 1e-5."""
    rng = np.random.default_rng(0)
    x, weight, output_grad = (rng.normal(size=size).astype(np.float32) for size in (shape, shape[-1:], shape))
    reference = transformers.models.llama.modeling_llama.LlamaRMSNorm(shape[-1], eps=1e-5)
    with torch.no_grad():
        reference.weight.copy_(torch.tensor(weight))
    x_torch = torch.tensor(x, requires_grad=True)
    expected = reference(x_torch)
    expected.backward(torch.tensor(output_grad))
    ours, pullback = jax.vjp(lambda x, w: rms_norm(x, w, 1e-5), jnp.asarray(x), jnp.asarray(weight))
    x_grad, weight_grad = pullback(jnp.asarray(output_grad))
    assert ours.shape == shape
    np.testing.assert_allclose(ours, expected.detach().numpy(), atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(x_grad, x_torch.grad.numpy(), atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(weight_grad, reference.weight.grad.numpy(), atol=1e-5, rtol=1e-5)


def test_sharded_checkpoint_really_is_sharded(tmp_path):
    folder = save_tiny_hf_checkpoint(tmp_path / "sharded", "llama3.1", max_shard_size="60KB", with_tokenizer=False)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert len(set(checkpoint_tensor_files(folder).values())) > 1


def test_bfloat16_loading(tmp_path):
    "bf16 loading gives bf16 params, and jora's bf16 logits are no further from fp32 than transformers' bf16 ones."
    folder = save_tiny_hf_checkpoint(tmp_path / "bf16", "llama3.1", with_tokenizer=False)
    config, params = load_hf_checkpoint(folder, dtype=jnp.bfloat16)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(params))
    ids, mask = padded_batch([16], 16, "left", config.vocab_size)
    exact = reference_logits(transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager"), ids, mask)
    hf_bf16 = reference_logits(transformers.AutoModelForCausalLM.from_pretrained(
        folder, attn_implementation="eager", dtype=torch.bfloat16), ids, mask)
    ours = np.asarray(forward(config, params, ids, attention_mask=mask))
    assert ours.dtype == np.float32
    our_error, hf_error = np.abs(ours - exact).max(), np.abs(hf_bf16 - exact).max()
    assert our_error <= 2 * hf_error + 1e-2, f"bf16 error {our_error:.3g} vs transformers' {hf_error:.3g}"


def test_config_fields_from_hf(tmp_path):
    folder = save_tiny_hf_checkpoint(tmp_path / "c", "llama3.2", with_tokenizer=False)
    config = load_hf_config(folder)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (8, 2, 16)
    assert config.tie_word_embeddings and config.rope_theta == 500000.0
    assert config.rope_scaling.rope_type == "llama3" and config.rope_scaling.factor == 32.0
    assert config.eos_token_id == (2,) and config.bos_token_id == 1
    # transformers 4 layout (rope_theta + rope_scaling with the old "type" key) reads the same
    old = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
           "num_attention_heads": 2, "rope_theta": 1e4, "rope_scaling": {"type": "linear", "factor": 2.0}}
    assert load_hf_config(old).rope_scaling.factor == 2.0 and load_hf_config(old).num_key_value_heads == 2


# ---- errors a user can cause: each is clear and names what is wrong ----

@pytest.fixture()
def folder(tmp_path):
    return save_tiny_hf_checkpoint(tmp_path / "model", "llama2", with_tokenizer=False)


def edit_config(folder, **changes):
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_missing_folder_or_config(tmp_path, folder):
    with pytest.raises(FileNotFoundError, match="No Hugging Face config"):
        load_hf_checkpoint(tmp_path / "nowhere")
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_checkpoint(folder)


def test_corrupt_or_truncated_weights(folder):
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        load_hf_checkpoint(folder)
    weights.write_bytes(b"\x00\x01 not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_hf_checkpoint(folder)


def test_missing_shard(tmp_path):
    folder = save_tiny_hf_checkpoint(tmp_path / "s", "llama3.1", max_shard_size="60KB", with_tokenizer=False)
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"{shard.name} is listed in .*index.json but missing"):
        load_hf_checkpoint(folder)


def test_pickle_only_checkpoint_is_refused(folder):
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="does not read pickled weights"):
        load_hf_checkpoint(folder)


def test_invalid_config_json(folder):
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        load_hf_checkpoint(folder)


@pytest.mark.parametrize("changes, message", [
    ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "rope type 'yarn' is not supported"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope type 'dynamic' is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads=3"),
])
def test_unsupported_config(folder, changes, message):
    edit_config(folder, **changes)
    with pytest.raises(ValueError, match=message):
        load_hf_checkpoint(folder)


def test_config_that_does_not_match_the_weights(folder):
    edit_config(folder, intermediate_size=96)
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.gate_proj.weight' .* has shape \(128, 64\) but config"):
        load_hf_checkpoint(folder)
    edit_config(folder, intermediate_size=128, num_hidden_layers=1)   # the layer count, checked from the names first
    with pytest.raises(ValueError, match="config.json says num_hidden_layers=1, but the weights hold 2 layers"):
        load_hf_checkpoint(folder)
    edit_config(folder, num_hidden_layers=3)
    with pytest.raises(ValueError, match="config.json says num_hidden_layers=3, but the weights hold 2 layers"):
        load_hf_checkpoint(folder)


def test_not_a_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="No model folder"):
        checkpoint_tensor_files(tmp_path / "absent")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"No \*.safetensors weights"):
        checkpoint_tensor_files(empty)


def test_chunked_lm_head_saves_memory_and_gives_the_same_loss():
    "A long prompt with a short answer: the chunked loss never holds time x vocabulary logits (compiled memory)."
    import jax
    from jora.model import init_params
    config = LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    params = init_params(config, jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (1, 2048), 3, config.vocab_size)
    labels = jnp.where(jnp.arange(2048) >= 2048 - 64, ids, IGNORE_INDEX)
    def loss(norm, chunk):
        return causal_lm_loss(config, {**params, "norm": norm}, Batch(ids, labels), options=ComputeOptions(logits_chunk=chunk))
    memory = {chunk: jax.jit(jax.grad(loss), static_argnums=1).lower(params["norm"], chunk).compile()
              .memory_analysis().temp_size_in_bytes for chunk in (0, 256)}
    without_head = jax.jit(jax.grad(lambda norm: hidden_states(config, {**params, "norm": norm}, ids).sum())
                           ).lower(params["norm"]).compile().memory_analysis().temp_size_in_bytes
    # the LM head's share of the temporaries: 2048 x 32000 fp32 logits (262 MB, twice) at once, or one chunk
    assert memory[256] - without_head <= 0.05 * (memory[0] - without_head), (memory, without_head)
    np.testing.assert_allclose(float(loss(params["norm"], 256)), float(loss(params["norm"], None)), rtol=1e-5)
