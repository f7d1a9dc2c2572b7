"""Attention's three computations against the definition, and the GPU program checked on a machine without a GPU.

- The Pallas kernel (JAX's Triton flash attention) runs in interpret mode on the CPU: its output and its gradients
  equal `reference_attention` (the whole boolean mask, `jax.nn.dot_product_attention`) at every real position, fp32,
  within 1e-5 (output) and 1e-4 (gradients), for causal, padded, packed, grouped-query rows and uneven lengths.
- The XLA flash path (`blocked_attention`) and the short-sequence tiles (`short_attention`) equal the same reference
  in the same cases and with a sliding window.
- The real training step, lowered for CUDA with `jax.export` on this CPU machine, calls the Triton kernel and holds no
  tensor with two sequence-sized dimensions (no `[time x time]` or `[block x time]` scores); lowered for the CPU, it
  holds none either above `SHORT_SEQUENCE` positions, and below it no `[time x time]` (its tiles are 64 queries wide).
- Under full rematerialisation attention's forward runs twice per layer (forward, recompute), its backward once.
- Ring attention with the Pallas kernel per pair of runs equals the reference in interpret mode on 2, 4 and 8
  simulated devices (zig-zag and natural order, grouped-query heads, rows padded at the end), and the ring's training
  step lowered for CUDA calls it.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jora.attention import (SHORT_SEQUENCE, ComputeOptions, MaskParts, block_layout, blocked_attention, reference_attention,
                            short_attention)
from jora.kernels import attention, pallas_attention
from jora.lora import LoraConfig, init_lora
from jora.model import LlamaConfig, init_params
from jora.train import TrainState, make_train_step

CASES = {
    # name: (time, heads, kv_heads, valid lengths per row, segment boundaries inside a row)
    "causal": (45, 4, 4, (45, 45), ()),
    "right-padded": (45, 4, 2, (45, 31), ()),
    "packed": (45, 4, 2, (45, 40), (12, 30)),
    "grouped-query, one kv head": (37, 4, 1, (37, 20), (9,)),
    "longer than a tile": (150, 2, 1, (150, 129), (70,)),
}


def make_case(time, heads, kv_heads, lengths, boundaries, head_dim=16, seed=0, left_padded=False):
    keys = jax.random.split(jax.random.key(seed), 3)
    query = jax.random.normal(keys[0], (len(lengths), time, heads, head_dim))
    key, value = (jax.random.normal(k, (len(lengths), time, kv_heads, head_dim)) for k in keys[1:])
    slots = jnp.broadcast_to(jnp.arange(time), (len(lengths), time))
    ends = jnp.asarray(lengths)[:, None]
    valid = (slots >= time - ends) if left_padded else (slots < ends)
    segments = sum((slots >= b).astype(jnp.int32) for b in boundaries) + 1
    return query, key, value, MaskParts(slots, slots, valid, segments * valid, segments * valid)


def real(x, parts):
    return np.asarray(x * parts.key_valid[:, :, None, None])


def check_against_reference(attend, query, key, value, parts, window=None):
    reference = lambda q, k, v: reference_attention(q, k, v, parts, window)
    np.testing.assert_allclose(real(attend(query, key, value), parts), real(reference(query, key, value), parts),
                               atol=1e-5, rtol=1e-5)
    weights = jax.random.normal(jax.random.key(7), query.shape) * parts.key_valid[:, :, None, None]
    gradients = lambda fn: jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * weights), argnums=(0, 1, 2))(query, key, value)
    for ours, theirs in zip(gradients(attend), gradients(reference)):
        np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", CASES)
def test_pallas_kernel_equals_the_reference_in_interpret_mode(case):
    query, key, value, parts = make_case(*CASES[case])
    check_against_reference(lambda q, k, v: pallas_attention(q, k, v, parts, interpret=True), query, key, value, parts)


def test_pallas_kernel_equals_the_reference_on_left_padded_rows():
    query, key, value, parts = make_case(40, 2, 2, (40, 25), (), left_padded=True)
    check_against_reference(lambda q, k, v: pallas_attention(q, k, v, parts, interpret=True), query, key, value, parts)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("block", [8, 16, 64])
def test_xla_flash_path_equals_the_reference(case, window, block):
    query, key, value, parts = make_case(*CASES[case])
    layout = block_layout(query.shape[1], block)
    check_against_reference(lambda q, k, v: blocked_attention(q, k, v, parts, layout, window), query, key, value, parts,
                            window)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("window", [None, 7])
def test_short_sequence_tiles_equal_the_reference(case, window):
    query, key, value, parts = make_case(*CASES[case])
    check_against_reference(lambda q, k, v: short_attention(q, k, v, parts, window), query, key, value, parts, window)


RING_CASES = {  # name: (seq devices, time, heads, kv heads, zig-zag order)
    "two devices, one run each": (2, 30, 4, 2, False),
    "four devices, zig-zag": (4, 64, 4, 1, True),
    "four devices, natural order": (4, 64, 4, 4, False),
    "eight devices, zig-zag, runs of 13 padded to a tile": (8, 208, 2, 1, True),
    "two devices, runs of whole tiles (no padding)": (2, 512, 2, 1, True),
}


@pytest.mark.parametrize("case", RING_CASES)
def test_pallas_kernel_on_the_ring_equals_the_reference_in_interpret_mode(case):
    from jax.sharding import Mesh
    from jora.attention import ring_order, placement_by_rules
    from jora.kernels import pallas_ring_attention
    devices, time, heads, kv_heads, zig_zag = RING_CASES[case]
    query, key, value, parts = make_case(time, heads, kv_heads, (time, time - 11), ())
    order = ring_order(time, devices) if zig_zag else np.arange(time)
    query, key, value = (x[:, order] for x in (query, key, value))
    parts = MaskParts(*(x[:, order] for x in parts[:3]), None, None)
    rules = {"batch": None, "length": "seq", "key_length": "seq", "heads": None, "kv_heads": None}
    with placement_by_rules(Mesh(jax.devices()[:devices], ("seq",)), rules):
        check_against_reference(jax.jit(lambda q, k, v: pallas_ring_attention(q, k, v, parts, interpret=True)),
                                query, key, value, parts)


def test_a_named_kernel_that_cannot_run_says_why():
    query, key, value, parts = make_case(*CASES["causal"])
    for name in ("pallas", "cudnn"):
        with pytest.raises(ValueError, match=f"'{name}' needs an NVIDIA GPU"):
            attention(query, key, value, parts, ComputeOptions(attention_implementation=name))


# every size other than the sequence (640) and the query block (128) stays under 100
TINY = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=12)
TIME, BLOCK = 640, 128                     # the XLA path cuts 640 positions into query blocks of 128, keys of 64
SHORT = 200                                # at most SHORT_SEQUENCE: tiles of 50 queries (100 with both heads of a group)
assert SHORT <= SHORT_SEQUENCE < TIME


def training_step_inputs(time=TIME):
    params = init_params(TINY, jax.random.key(0))
    lora_config = LoraConfig(r=4, alpha=8, dropout=0.0, targets=("q_proj", "v_proj"))
    adapters = init_lora(TINY, lora_config, jax.random.key(1)).adapters
    optimizer = optax.adamw(1e-3)
    ids = np.random.default_rng(0).integers(3, TINY.vocab_size, (1, 1, time)).astype(np.int32)
    labels = np.full_like(ids, -100)
    labels[..., -16:] = ids[..., -16:]
    batch = {"input_ids": ids, "labels": labels, "attention_mask": np.ones_like(ids),
             "positions": np.broadcast_to(np.arange(time, dtype=np.int32), ids.shape).copy(),
             "segment_ids": np.ones_like(ids)}
    state = TrainState(adapters, optimizer.init(adapters), jnp.int32(0), jax.random.key(2))
    return lora_config, optimizer, (state, params, batch)


def tensor_shapes(stablehlo: str) -> list[tuple[int, ...]]:
    "Every static tensor shape written in a StableHLO module."
    return [tuple(int(d) for d in found.rstrip("x").split("x")) for found in re.findall(r"tensor<((?:\d+x)+)\w+>", stablehlo)]


def sequence_sized(shape, at_least: int = 100) -> int:
    "How many dimensions of `shape` are `at_least` long (default: under a query block): a score tensor would have two."
    return sum(d >= at_least for d in shape)


@pytest.mark.parametrize("row_layout", ["right_padded", "packed"])
def test_training_step_lowered_for_cuda_calls_the_fused_kernel_and_holds_no_scores(row_layout):
    lora_config, optimizer, inputs = training_step_inputs()
    step = make_train_step(TINY, optimizer, lora_config, None, ComputeOptions(
        remat="full", logits_chunk=32, attention_block=BLOCK, attention_implementation="auto", row_layout=row_layout))
    exported = jax.export.export(step, platforms=("cuda",), disabled_checks=[
        jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*inputs)
    text = exported.mlir_module()
    assert "__gpu$xla.gpu.triton" in text                       # the Pallas kernel (fp32 rules cuDNN out)
    assert text.count("mha_forward") >= 2 and "mha_backward" in text   # forward, its recompute, and the backward
    shapes = tensor_shapes(text)
    assert any(TIME in shape for shape in shapes)                      # the sequence is there ...
    assert not [shape for shape in shapes if sequence_sized(shape) >= 2]   # ... but never twice in one tensor


def test_ring_training_step_lowered_for_cuda_calls_the_kernel_per_pair_and_holds_no_scores():
    """On a 1x4x1 mesh with the ring scheme and rows padded at the end, the real training step lowered for CUDA passes
    key runs round the ring and calls the Triton kernel on them (forward, recompute, backward), with no tensor that
    is sequence-sized twice."""
    from jora.sharding import make_mesh, shard_params
    from jora.lora import shard_lora
    lora_config, optimizer, (state, params, batch) = training_step_inputs()
    mesh = make_mesh(data=1, seq=4, model=1, devices=jax.devices()[:4])
    state = state._replace(adapters=shard_lora(TINY, init_lora(TINY, lora_config, jax.random.key(1)), mesh).adapters)
    step = make_train_step(TINY, optimizer, lora_config, mesh, ComputeOptions(
        remat="full", logits_chunk=32, attention_block=BLOCK, attention_implementation="auto", row_layout="right_padded",
        context_parallel="ring"))
    exported = jax.export.export(step, platforms=("cuda",), disabled_checks=[
        jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(state, shard_params(TINY, params, mesh),
                                                                             batch)
    text = exported.mlir_module()
    assert "collective_permute" in text and "__gpu$xla.gpu.triton" in text
    assert text.count("mha_forward") >= 2 and "mha_backward" in text
    assert not [shape for shape in tensor_shapes(text) if sequence_sized(shape) >= 2]


@pytest.mark.parametrize("time, at_least", [(TIME, 100), (SHORT, SHORT)])
def test_training_step_lowered_for_the_cpu_holds_no_scores(time, at_least):
    "Flash blocks hold no `[block x time]` scores; short-sequence tiles hold `[tile x time]` but no `[time x time]`."
    lora_config, optimizer, inputs = training_step_inputs(time)
    step = make_train_step(TINY, optimizer, lora_config, None,
                           ComputeOptions(remat="full", logits_chunk=32, attention_block=BLOCK))
    shapes = tensor_shapes(step.lower(*inputs).as_text())
    assert any(time in shape for shape in shapes)
    assert not [shape for shape in shapes if sequence_sized(shape, at_least) >= 2]


def attention_passes(compiled_hlo: str) -> dict:
    """How many passes of the XLA attention one layer runs in a compiled program: each pass is one call of the jitted
    functions named `flash_attention_forward` / `_backward` (`tile_attention_...` for short sequences), found by the
    distinct op-name paths that lead to them; only calls inside the layer scan (under jvp or its transpose) count, and
    XLA has already removed dead code."""
    calls = set(re.findall(r'op_name="([^"]*jvp\(\)[^"]*?jit\((?:flash|tile)_attention_(?:forward|backward)\))',
                           compiled_hlo))
    return {kind: sum(call.endswith(f"_attention_{kind})") for call in calls) for kind in ("forward", "backward")}


@pytest.mark.parametrize("time", [TIME, SHORT])
@pytest.mark.parametrize("remat, forwards", [("none", 1), ("full", 2)])
def test_attention_forward_runs_at_most_twice_per_layer(remat, forwards, time):
    from jora.model import Batch, LoraWeights, causal_lm_loss_sum
    lora_config, optimizer, (state, params, batch) = training_step_inputs(time)
    adapters = state.adapters

    def loss(adapters):
        options = ComputeOptions(logits_chunk=32, attention_block=BLOCK, remat=remat, attention_implementation="xla")
        return causal_lm_loss_sum(TINY, params, Batch(batch["input_ids"][0], batch["labels"][0]),
                                  LoraWeights(adapters, 1.0, 0.0), options=options)[0]

    compiled = jax.jit(jax.grad(loss)).lower(adapters).compile().as_text()
    # the forward pass (and under full remat its recompute in the backward pass), then one backward
    assert attention_passes(compiled) == {"forward": forwards, "backward": 1}
