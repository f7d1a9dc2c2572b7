"""Tensor parallelism and LoRA on 8 simulated CPU devices (set in conftest.py), against one device and against peft.

Tolerances: loss and every LoRA gradient leaf within a relative difference of 1e-5 of the one-device result (fp32);
merged vs unmerged logits within 1e-5; jora's LoRA logits vs peft's PeftModel within 1e-4.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import NamedSharding, PartitionSpec as P

from jora.lora import LoraConfig, init_lora, lora_parameter_count, merge_lora, shard_lora
from jora.attention import ComputeOptions
from jora.model import IGNORE_INDEX, Batch, LlamaConfig, LoraWeights, causal_lm_loss, forward, init_params
from jora.formats import load_hf_checkpoint
from jora.kernels import pallas_interpreted
from jora.testing import save_tiny_hf_checkpoint
from jora.sharding import adapter_specs, make_mesh, param_specs, placement, shard_params

MESHES = [(1, 1), (1, 2), (1, 4), (1, 8), (2, 2), (2, 4)]  # (data, model)
TINY_GQA = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=8, num_key_value_heads=2, head_dim=16, rope_theta=500000.0)
ALL_TARGETS = LoraConfig(r=4, alpha=8, dropout=0.1, targets="all-linear")


def relative_difference(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.fixture(scope="module")
def setup():
    params = init_params(TINY_GQA, jax.random.key(0), std=0.1)
    lora = init_lora(TINY_GQA, ALL_TARGETS, jax.random.key(1))
    # trained-looking adapters: B is no longer zero, so gradients reach A as well
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape), lora)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, TINY_GQA.vocab_size, (4, 16))
    labels = ids.copy()
    labels[:, :9] = IGNORE_INDEX  # a prompt of 9 tokens, an answer of 7
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # one left-padded row
    labels[1, :4] = IGNORE_INDEX
    return params, lora, ids, labels, mask


def loss_and_grads(params, lora, ids, labels, mask, mesh=None, dropout_key=None):
    def loss(adapters):
        with placement(mesh):
            return causal_lm_loss(TINY_GQA, params, Batch(ids, labels, mask), LoraWeights(adapters, lora.scale, lora.dropout),
                                  dropout_key)
    return jax.jit(jax.value_and_grad(loss))(lora.adapters)


ONE_DEVICE = {}  # the one-device reference, computed once per dropout setting


@pytest.mark.parametrize("data, model", MESHES, ids=[f"{d}x{m}" for d, m in MESHES])
@pytest.mark.parametrize("with_dropout", [False, True], ids=["eval", "dropout"])
def test_loss_and_lora_gradients_equal_one_device(setup, data, model, with_dropout):
    params, lora, ids, labels, mask = setup
    key = jax.random.key(7) if with_dropout else None
    if with_dropout not in ONE_DEVICE:
        ONE_DEVICE[with_dropout] = loss_and_grads(params, lora, ids, labels, mask, dropout_key=key)
    expected_loss, expected_grads = ONE_DEVICE[with_dropout]
    mesh = make_mesh(data=data, model=model)
    batch = NamedSharding(mesh, P("data", "seq"))
    loss, grads = loss_and_grads(shard_params(TINY_GQA, params, mesh), shard_lora(TINY_GQA, lora, mesh),
                                 *(jax.device_put(x, batch) for x in (ids, labels, mask)), mesh=mesh, dropout_key=key)
    assert relative_difference(loss, expected_loss) <= 1e-5
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(expected_grads)):
        assert float(jnp.abs(want).max()) > 0, f"{jax.tree_util.keystr(path)}: a zero gradient tests nothing"
        difference = relative_difference(got, want)
        assert difference <= 1e-5, f"{data}x{model} {jax.tree_util.keystr(path)}: relative difference {difference:.2e}"


@pytest.mark.parametrize("data, model", MESHES, ids=[f"{d}x{m}" for d, m in MESHES])
def test_every_leaf_has_its_intended_sharding(setup, data, model):
    params, lora, *_ = setup
    mesh = make_mesh(data=data, model=model)
    sharded, sharded_lora = shard_params(TINY_GQA, params, mesh), shard_lora(TINY_GQA, lora, mesh)
    is_spec = lambda x: isinstance(x, P)
    pairs = [*zip(jax.tree.leaves(sharded), jax.tree.leaves(param_specs(TINY_GQA, params, mesh), is_leaf=is_spec)),
             *zip(jax.tree.leaves(sharded_lora.adapters),
                  jax.tree.leaves(adapter_specs(TINY_GQA, ALL_TARGETS.targets, mesh), is_leaf=is_spec))]
    assert len(pairs) == len(jax.tree.leaves(params)) + 2 * len(ALL_TARGETS.targets)
    for leaf, spec in pairs:
        assert leaf.sharding.is_equivalent_to(NamedSharding(mesh, spec), leaf.ndim), (leaf.shape, leaf.sharding, spec)
    # the Megatron layout, spelled out
    layers, adapters = sharded["layers"], sharded_lora.adapters
    assert layers["q_proj"].sharding.spec == P(None, None, "model")
    assert layers["gate_proj"].sharding.spec == P(None, None, "model")
    assert layers["o_proj"].sharding.spec == P(None, "model", None)
    assert layers["down_proj"].sharding.spec == P(None, "model", None)
    assert layers["input_layernorm"].sharding.is_fully_replicated   # whole on every device
    assert sharded["embed_tokens"].sharding.spec == P("model", None)
    assert sharded["lm_head"].sharding.spec == P(None, "model")
    kv_split = TINY_GQA.num_key_value_heads % model == 0  # 2 key/value heads: split over 1 or 2, whole over 4 or 8
    assert layers["k_proj"].sharding.spec == (P(None, None, "model") if kv_split else P(None, None, None))
    assert adapters["q_proj"]["lora_A"].sharding.spec == P(None, None, None)
    assert adapters["q_proj"]["lora_B"].sharding.spec == P(None, None, "model")
    assert adapters["down_proj"]["lora_A"].sharding.spec == P(None, "model", None)
    assert adapters["down_proj"]["lora_B"].sharding.spec == P(None, None, None)
    # each device really holds only its part
    q_shard = layers["q_proj"].addressable_shards[0].data.shape
    assert q_shard == (2, 64, 128 // model)


@pytest.mark.parametrize("data, model", [(1, 1), (2, 4)])
def test_merged_equals_unmerged(setup, data, model):
    params, lora, ids, _, mask = setup
    mesh = make_mesh(data=data, model=model)
    sharded, sharded_lora = shard_params(TINY_GQA, params, mesh), shard_lora(TINY_GQA, lora, mesh)
    with placement(mesh):
        unmerged = jax.jit(lambda p, adapters: forward(TINY_GQA, p, ids, attention_mask=mask, lora=adapters))(sharded, sharded_lora)
        merged_params = merge_lora(TINY_GQA, sharded, sharded_lora, ALL_TARGETS)
        merged = jax.jit(lambda p: forward(TINY_GQA, p, ids, attention_mask=mask))(merged_params)
    assert float(jnp.abs(merged - unmerged).max()) <= 1e-5
    assert float(jnp.abs(merged - forward(TINY_GQA, params, ids, attention_mask=mask)).max()) > 1e-3  # LoRA did something
    assert merged_params["layers"]["q_proj"].sharding.spec == P(None, None, "model")


def test_invalid_meshes_are_clear_errors(setup):
    params, *_ = setup
    with pytest.raises(ValueError, match=r"A model axis of 3 devices cannot split this model: its 8 attention heads "
                                         r"and MLP width 128 .* sizes that work: \[1, 2, 4, 8\]"):
        shard_params(TINY_GQA, params, make_mesh(model=3))
    with pytest.raises(ValueError, match="needs 12 devices but 8 are available"):
        make_mesh(data=3, model=4)
    with pytest.raises(ValueError, match="cannot split"):
        init_lora(TINY_GQA, LoraConfig(), jax.random.key(0), mesh=make_mesh(model=6))


def test_checkpoint_loads_straight_onto_a_mesh(tmp_path):
    folder = save_tiny_hf_checkpoint(tmp_path / "m", "llama3.1", max_shard_size="60KB", with_tokenizer=False)
    mesh = make_mesh(data=2, model=4)
    config, on_mesh = load_hf_checkpoint(folder, dtype=jnp.float32, mesh=mesh)
    _, on_one = load_hf_checkpoint(folder, dtype=jnp.float32)
    for (path, leaf), spec, reference in zip(jax.tree_util.tree_leaves_with_path(on_mesh),
                                             jax.tree.leaves(param_specs(config, on_mesh, mesh),
                                                             is_leaf=lambda x: isinstance(x, P)),
                                             jax.tree.leaves(on_one)):
        assert leaf.sharding.is_equivalent_to(NamedSharding(mesh, spec), leaf.ndim), jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(reference))


# ---- LoRA against peft ----

def peft_model_with(folder, lora_config, lora):
    "A peft PeftModel on the same checkpoint, its adapters set to jora's (A [in, r] -> lora_A.weight [r, in])."
    import peft
    base = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    model = peft.get_peft_model(base, peft.LoraConfig(r=lora_config.r, lora_alpha=lora_config.alpha, lora_dropout=0.0,
                                                      target_modules=list(lora_config.targets),
                                                      use_rslora=lora_config.use_rslora))
    modules = dict(model.named_modules())
    for name, adapter in lora.adapters.items():
        group = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        for layer in range(adapter["lora_A"].shape[0]):
            module = modules[f"base_model.model.model.layers.{layer}.{group}.{name}"]
            with torch.no_grad():
                module.lora_A["default"].weight.copy_(torch.tensor(np.asarray(adapter["lora_A"][layer]).T))
                module.lora_B["default"].weight.copy_(torch.tensor(np.asarray(adapter["lora_B"][layer]).T))
    return model.eval()


@pytest.mark.parametrize("lora_config", [
    LoraConfig(r=8, alpha=16),
    LoraConfig(r=4, alpha=32, targets="all-linear"),
    LoraConfig(r=16, alpha=8, targets=("k_proj", "o_proj", "down_proj"), use_rslora=True),
], ids=["q,v", "all-linear", "rslora"])
def test_lora_forward_and_count_match_peft(tmp_path, lora_config):
    folder = save_tiny_hf_checkpoint(tmp_path / "p", "llama3.1", with_tokenizer=False)
    config, params = load_hf_checkpoint(folder, dtype=jnp.float32)
    lora = init_lora(config, lora_config, jax.random.key(3))
    lora = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(4), x.shape), lora)
    model = peft_model_with(folder, lora_config, lora)
    trainable, _ = model.get_nb_trainable_parameters()
    assert lora_parameter_count(config, lora_config) == trainable
    ids = np.random.default_rng(1).integers(3, config.vocab_size, (2, 12))
    with torch.no_grad():
        expected = model(input_ids=torch.tensor(ids)).logits.numpy()
    ours = np.asarray(forward(config, params, ids, lora=lora))
    assert np.abs(ours - expected).max() < 1e-4
    assert np.abs(ours - np.asarray(forward(config, params, ids))).max() > 1e-3  # the adapters matter


# --- context parallelism: the 'seq' axis -------------------------------------------------------------------------

SEQUENCE_MESHES = [(1, 4, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]  # (data, seq, model)
LONG_STEP_OPTIONS = [(None, None, None), ("full", 8, 8), ("projections", 16, 4), ("none", 24, 5)]


@pytest.fixture(scope="module")
def packed_rows():
    "Two 64-token rows: one packed with two examples, one left-padded; answers only at the end of each example."
    rng = np.random.default_rng(3)
    ids = rng.integers(3, TINY_GQA.vocab_size, (2, 64))
    valid = np.ones_like(ids)
    valid[1, :5] = 0
    segments = np.ones_like(ids)
    segments[0, 30:] = 2
    positions = np.concatenate([np.arange(30), np.arange(34)])[None].repeat(2, 0)
    positions[1] = np.maximum(np.cumsum(valid[1]) - 1, 0)
    labels = np.full_like(ids, IGNORE_INDEX)
    labels[0, 24:30], labels[0, 56:], labels[1, 50:] = ids[0, 24:30], ids[0, 56:], ids[1, 50:]
    return ids, labels, valid, segments, positions


def long_loss_and_grads(params, lora, rows, mesh=None, remat=None, block=None, chunk=None, scheme="ring",
                        pieces=None, dropout_key=None, implementation="auto", row_layout="any"):
    ids, labels, valid, segments, positions = rows
    dropout = 0.0 if dropout_key is None else lora.dropout
    def loss(adapters):
        with placement(mesh, scheme):
            return causal_lm_loss(TINY_GQA, params, Batch(ids, labels, valid, positions, segments),
                                  LoraWeights(adapters, lora.scale, dropout), dropout_key, options)
    options = ComputeOptions(remat=remat or "none", attention_block=block or 0, logits_chunk=chunk or 0,
                             feed_forward_chunk=pieces, attention_implementation=implementation, row_layout=row_layout)
    if mesh is not None:
        ids, labels, valid, segments, positions = (None if x is None else jax.device_put(x, NamedSharding(mesh, P("data", "seq")))
                                                   for x in rows)
    return jax.jit(jax.value_and_grad(loss))(lora.adapters)


@pytest.mark.parametrize("scheme", ["ring", "all_gather"])
@pytest.mark.parametrize("data, seq, model", SEQUENCE_MESHES, ids=[f"{d}x{s}x{m}" for d, s, m in SEQUENCE_MESHES])
@pytest.mark.parametrize("remat, block, chunk", LONG_STEP_OPTIONS,
                         ids=["whole", "full-remat-blocks", "projections-blocks", "no-remat-uneven-blocks"])
def test_sequence_split_gives_the_one_device_loss_and_gradients(setup, packed_rows, data, seq, model, remat, block,
                                                                 chunk, scheme):
    """Split over 'seq' (with data and model), packed and padded rows, attention in blocks, LM head in chunks, keys
    and values passed round a ring (zig-zag order) or gathered: the loss and every LoRA gradient within 1e-5."""
    params, lora, *_ = setup
    reference_loss, reference_grads = long_loss_and_grads(params, lora, packed_rows)
    mesh = make_mesh(data=data, seq=seq, model=model)
    loss, grads = long_loss_and_grads(shard_params(TINY_GQA, params, mesh), shard_lora(TINY_GQA, lora, mesh),
                                      packed_rows, mesh, remat, block, chunk, scheme)
    assert relative_difference(loss, reference_loss) <= 1e-5
    for leaf, expected in zip(jax.tree.leaves(grads), jax.tree.leaves(reference_grads)):
        assert relative_difference(leaf, expected) <= 1e-5


PIECE_MESHES = [(1, 1, 1), (2, 2, 2), (1, 4, 2), (1, 8, 1)]


@pytest.mark.parametrize("data, seq, model", PIECE_MESHES, ids=[f"{d}x{s}x{m}" for d, s, m in PIECE_MESHES])
def test_the_mlp_in_pieces_gives_the_whole_row_loss_and_gradients(setup, packed_rows, data, seq, model):
    """The MLP in pieces of at most 4 positions per device (LoRA on gate, up and down; full remat, the ring scheme):
    the loss and every LoRA gradient of the whole-row MLP on one device within 1e-5."""
    params, lora, *_ = setup
    reference_loss, reference_grads = long_loss_and_grads(params, lora, packed_rows, pieces=0)
    mesh = make_mesh(data=data, seq=seq, model=model)
    loss, grads = long_loss_and_grads(shard_params(TINY_GQA, params, mesh), shard_lora(TINY_GQA, lora, mesh),
                                      packed_rows, mesh, remat="full", block=8, pieces=4)
    assert relative_difference(loss, reference_loss) <= 1e-5
    for leaf, expected in zip(jax.tree.leaves(grads), jax.tree.leaves(reference_grads)):
        assert relative_difference(leaf, expected) <= 1e-5


def test_mlp_pieces_draw_their_own_dropout_the_same_on_any_mesh_of_one_seq_device(setup, packed_rows):
    """With dropout, each piece draws its own masks: other draws than the whole row's (the loss differs), and the same
    on one device as on data x model meshes (within 1e-5)."""
    params, lora, *_ = setup
    key = jax.random.key(11)
    whole, _ = long_loss_and_grads(params, lora, packed_rows, remat="full", pieces=0, dropout_key=key)
    reference_loss, reference_grads = long_loss_and_grads(params, lora, packed_rows, remat="full", pieces=4,
                                                          dropout_key=key)
    assert relative_difference(whole, reference_loss) > 1e-4
    mesh = make_mesh(data=2, seq=1, model=4)
    loss, grads = long_loss_and_grads(shard_params(TINY_GQA, params, mesh), shard_lora(TINY_GQA, lora, mesh),
                                      packed_rows, mesh, remat="full", pieces=4, dropout_key=key)
    assert relative_difference(loss, reference_loss) <= 1e-5
    for leaf, expected in zip(jax.tree.leaves(grads), jax.tree.leaves(reference_grads)):
        assert relative_difference(leaf, expected) <= 1e-5


FOUR_LAYERS = dataclasses.replace(TINY_GQA, num_hidden_layers=4)


@pytest.mark.parametrize("data, seq, model", [(1, 1, 1), (2, 2, 2)], ids=["1x1x1", "2x2x2"])
def test_nested_remat_gives_the_loss_and_gradients_of_no_remat(packed_rows, data, seq, model):
    """Four layers scanned in two rematerialised groups (`nested`), on one device and on a 2x2x2 mesh: the loss and
    every LoRA gradient of the step without remat on one device, within 1e-5."""
    params = init_params(FOUR_LAYERS, jax.random.key(0), std=0.1)
    lora = init_lora(FOUR_LAYERS, ALL_TARGETS, jax.random.key(1))
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape), lora)
    ids, labels, valid, segments, positions = packed_rows

    def loss_and_grads(params, adapters, remat, mesh=None):
        def loss(adapters):
            with placement(mesh):
                return causal_lm_loss(FOUR_LAYERS, params, Batch(ids, labels, valid, positions, segments),
                                      LoraWeights(adapters, lora.scale),
                                      options=ComputeOptions(remat=remat or "none", attention_block=8))
        return jax.jit(jax.value_and_grad(loss))(adapters)

    reference_loss, reference_grads = loss_and_grads(params, lora.adapters, None)
    mesh = make_mesh(data=data, seq=seq, model=model)
    loss, grads = loss_and_grads(shard_params(FOUR_LAYERS, params, mesh), shard_lora(FOUR_LAYERS, lora, mesh).adapters,
                                 "nested", mesh)
    assert relative_difference(loss, reference_loss) <= 1e-5
    for leaf, expected in zip(jax.tree.leaves(grads), jax.tree.leaves(reference_grads)):
        assert relative_difference(leaf, expected) <= 1e-5


def test_nested_remat_keeps_fewer_layer_inputs_than_full():
    """32 layers, 16384 tokens on four seq devices (the training defaults otherwise): `nested` keeps the inputs of 4
    groups, and of one group's 8 layers while it is recomputed, instead of 32 layer inputs; its step needs at least
    half of those 20 layer inputs' bytes less than `full`. The groups are the divisor nearest the square root."""
    from jora.config import ParallamaConfig
    from jora.memory import layer_groups
    from jora.train import Run, check_step_fits, step_memory
    model = dataclasses.replace(TINY_GQA, num_hidden_layers=32, hidden_size=128, intermediate_size=256, head_dim=16)
    mesh = make_mesh(data=1, seq=4, model=1, devices=jax.devices()[:4])
    sizes = {remat: step_memory(ParallamaConfig(REMAT=remat, MESH_SEQ=4, N_ACCUMULATION_STEPS=1), model,
                                seq_len=16384, mesh=mesh)["temporaries"] for remat in ("full", "nested")}
    layer_input = 16384 // 4 * 128 * 2   # one layer's input on one device, bf16
    assert sizes["full"] - sizes["nested"] >= 0.5 * (32 - 12) * layer_input, sizes
    config = ParallamaConfig(REMAT="full", MESH_SEQ=4, N_ACCUMULATION_STEPS=1)   # and the planner offers it
    needed = step_memory(config, model, seq_len=16384, mesh=mesh)["total"]
    run = Run(config, mesh, model, None, None, None, None, 10, None, None)
    with pytest.raises(MemoryError, match=r"These settings fit: .*REMAT='nested' \([\d.]+ MB\)"):
        check_step_fits(run, needed, 16384, limit=needed - (sizes["full"] - sizes["nested"]) // 2)
    assert [layer_groups(count) for count in (1, 2, 4, 16, 32, 40)] == [1, 1, 2, 4, 4, 5]


def test_attention_blocks_match_whole_attention_with_a_sliding_window(setup):
    "Blocks that do not divide the sequence, a Mistral-style window and padding: the same logits as one call."
    params, *_ = setup
    config = dataclasses.replace(TINY_GQA, sliding_window=5)
    ids = np.random.default_rng(4).integers(3, config.vocab_size, (2, 40))
    valid = np.ones_like(ids)
    valid[0, :3] = 0
    whole = forward(config, params, ids, attention_mask=valid)
    for block in (1, 7, 16, 39):
        blocked = forward(config, params, ids, attention_mask=valid, options=ComputeOptions(attention_block=block))
        np.testing.assert_allclose(blocked[valid == 1],
                                   whole[valid == 1], atol=1e-5)


def test_sequence_axis_cuts_the_temporaries_of_an_8k_token_step():
    """seq=4 holds at most 0.5x the per-device temporaries of seq=1 for one training step on 8192 tokens, with the
    training defaults (bf16 weights, full remat, LM-head chunks, flash attention blocks), and at most 0.35x with
    attention in one call. (The blocked path is the smaller at seq=1 already: its scores are one block pair, so what
    every seq device keeps whole, the gathered keys and values and their fp32 gradients, weighs more in the ratio.)"""
    from jora.train import step_memory
    from jora.config import ParallamaConfig
    defaults = ParallamaConfig(N_ACCUMULATION_STEPS=1)
    config = LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=8192)
    for block in (defaults.ATTENTION_BLOCK, None):
        run = defaults._replace(ATTENTION_BLOCK=block or 0)
        temporaries = {seq: step_memory(run, config, seq_len=8192, mesh=make_mesh(data=1, seq=seq, model=1,
                                                                                  devices=jax.devices()[:seq]))
                       ["temporaries"] for seq in (1, 4)}
        assert temporaries[4] <= (0.35 if block is None else 0.5) * temporaries[1], (block, temporaries)


def test_a_16k_prompt_never_builds_a_16k_by_vocabulary_tensor():
    "The whole step's temporaries stay under a fifth of one 16k x 32000 fp32 logits tensor (2.1 GB)."
    from jora.train import step_memory
    from jora.config import ParallamaConfig
    config = LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16384)
    one_device = make_mesh(data=1, seq=1, model=1, devices=jax.devices()[:1])
    run = ParallamaConfig(N_ACCUMULATION_STEPS=1, DTYPE="float32", REMAT="full", ATTENTION_BLOCK=256)
    logits_bytes = 16384 * config.vocab_size * 4
    memory = lambda chunk: step_memory(run._replace(LOGITS_CHUNK=chunk), config, seq_len=16384, mesh=one_device)
    assert memory(512)["temporaries"] < 0.2 * logits_bytes
    assert memory(0)["temporaries"] > logits_bytes


def test_the_memory_estimate_draws_dropout_bits_as_a_gpu_lowering_does():
    """XLA:CPU's threefry loop keeps uint32 arrays the size of a LoRA dropout mask alive at once; the estimate lowers
    the bits as for a GPU (straight-line code fused into the mask's use) and keeps about one mask-sized array (the
    dropped-out input) more than a step without dropout. A step compiled for the run afterwards draws its bits with CPU's loop again."""
    from jora.train import step_memory
    from jora.config import ParallamaConfig
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=8192)
    one_device = make_mesh(data=1, seq=1, model=1, devices=jax.devices()[:1])
    run = ParallamaConfig(N_ACCUMULATION_STEPS=1, DTYPE="float32", REMAT="full", LORA_DROPOUT=0.05)
    temporaries = lambda run, estimate: step_memory(run, config, seq_len=8192, mesh=one_device,
                                                    estimate=estimate)["temporaries"]
    mask_bytes = 8192 * config.hidden_size * 4
    exact, estimate = temporaries(run, False), temporaries(run, True)
    assert exact - estimate >= 2 * mask_bytes, (exact, estimate)
    assert estimate - temporaries(run._replace(LORA_DROPOUT=0.0), True) < 1.5 * mask_bytes
    assert temporaries(run, False) == exact


def test_longest_trainable_sequence_is_on_the_budget_boundary():
    "The returned length fits the budget and one granule more does not (checked by lowering again)."
    from jora.train import longest_trainable_sequence, step_memory
    from jora.config import ParallamaConfig
    mesh = make_mesh(data=1, seq=2, model=1, devices=jax.devices()[:2])
    run = ParallamaConfig(N_ACCUMULATION_STEPS=1, DTYPE="float32", REMAT="full", LOGITS_CHUNK=256, ATTENTION_BLOCK=256)
    budget = 60e6
    length, report = longest_trainable_sequence(run, TINY_GQA, mesh, budget, granularity=256)
    assert length >= 256 and report["total"] <= budget
    assert step_memory(run, TINY_GQA, seq_len=length + 256, mesh=mesh)["total"] > budget
    assert longest_trainable_sequence(run, TINY_GQA, mesh, 1e3, granularity=256)[0] == 0


def test_ring_attention_is_what_the_ring_scheme_traces(setup, packed_rows):
    "The ring scheme passes keys and values with ppermute; the all-gather scheme has none (the switch is real)."
    params, lora, *_ = setup
    mesh = make_mesh(data=1, seq=4, model=1, devices=jax.devices()[:4])
    ids, labels, valid, segments, positions = packed_rows

    def traced(scheme):
        def loss(adapters):
            with placement(mesh, scheme):
                return causal_lm_loss(TINY_GQA, params, Batch(ids, labels, valid, positions, segments),
                                      LoraWeights(adapters, lora.scale), options=ComputeOptions(attention_block=8))
        return str(jax.make_jaxpr(jax.grad(loss))(lora.adapters))

    assert "ppermute" in traced("ring") and "ppermute" not in traced("all_gather")
    with pytest.raises(ValueError, match="Unknown context-parallel scheme 'ulysses'"):
        traced("ulysses")


def test_ring_turns_are_a_loop_whatever_the_device_count(setup, packed_rows):
    """The ring's turns run as one loop, not unrolled per device: the traced gradient holds the same number of
    ppermutes on 2, 4 and 8 seq devices (unrolled turns kept several turns' blocks alive at once: 131 GB per device
    instead of 98 for Llama-2-7B at a million tokens on eight)."""
    params, lora, *_ = setup
    ids, labels, valid, segments, positions = packed_rows

    def ppermutes(devices):
        mesh = make_mesh(data=1, seq=devices, model=1, devices=jax.devices()[:devices])

        def loss(adapters):
            with placement(mesh, "ring"):
                return causal_lm_loss(TINY_GQA, params, Batch(ids, labels, valid, positions, segments),
                                      LoraWeights(adapters, lora.scale), options=ComputeOptions(attention_block=2))
        return str(jax.make_jaxpr(jax.grad(loss))(lora.adapters)).count("ppermute[")

    counts = [ppermutes(devices) for devices in (2, 4, 8)]
    assert counts[0] > 0 and counts == [counts[0]] * 3, counts


def test_a_step_that_does_not_fit_names_the_settings_that_would():
    """Past the devices' memory, the error names the scheme that fits, with its lowered size, or says that none does.
    At 8192 tokens on two seq devices the ring step is the smaller (its keys and values are never gathered)."""
    from jora.train import Run, check_step_fits, step_memory
    from jora.config import ParallamaConfig
    mesh = make_mesh(data=1, seq=2, model=1, devices=jax.devices()[:2])
    config = ParallamaConfig(N_ACCUMULATION_STEPS=1, DTYPE="float32", REMAT="full", MESH_SEQ=2, MESH_MODEL=1,
                             CONTEXT_PARALLEL="all_gather", LOGITS_CHUNK=256, ATTENTION_BLOCK=256)
    run = Run(config, mesh, TINY_GQA, None, None, None, None, 10, None, None)
    sizes = {scheme: step_memory(config._replace(CONTEXT_PARALLEL=scheme), TINY_GQA, seq_len=8192, mesh=mesh,
                                 total_steps=10)["total"] for scheme in ("all_gather", "ring")}
    assert sizes["ring"] < sizes["all_gather"], sizes
    check_step_fits(run, sizes["all_gather"], 8192, limit=sizes["all_gather"])      # fits: nothing said
    with pytest.raises(MemoryError, match=r"needs [\d.]+ [MG]B per device and the devices have [\d.]+ [MG]B\. "
                                          r"These settings fit: CONTEXT_PARALLEL='ring' \([\d.]+ [MG]B\)"):
        check_step_fits(run, sizes["all_gather"], 8192, limit=sizes["ring"])
    with pytest.raises(MemoryError, match="No other context-parallel scheme or remat policy fits either"):
        check_step_fits(run, sizes["all_gather"], 8192, limit=1000)


def test_ring_logits_come_back_in_the_natural_order(setup, packed_rows):
    "forward under the ring scheme lays positions out zig-zag inside and returns the logits in the row's own order."
    params, lora, *_ = setup
    ids, _, valid, segments, positions = packed_rows
    rows, blocks = Batch(ids, None, valid, positions, segments), ComputeOptions(attention_block=8)
    expected = forward(TINY_GQA, params, rows, options=blocks)
    mesh = make_mesh(data=1, seq=4, model=2)
    with placement(mesh, "ring"):
        logits = jax.jit(lambda p: forward(TINY_GQA, p, rows, options=blocks))(shard_params(TINY_GQA, params, mesh))
    assert relative_difference(logits, expected) <= 1e-5


@pytest.fixture(scope="module")
def padded_rows():
    "Two 64-token rows, unpacked, the second padded at its end: the rows the Pallas kernel takes on the ring."
    rng = np.random.default_rng(4)
    ids = rng.integers(3, TINY_GQA.vocab_size, (2, 64))
    valid = np.ones_like(ids)
    valid[1, 50:] = 0
    labels = np.where(valid.astype(bool), ids, IGNORE_INDEX)
    labels[:, :40] = IGNORE_INDEX   # a long prompt, the answer at the end
    return ids, labels, valid, None, np.broadcast_to(np.arange(64), ids.shape).copy()


@pytest.mark.parametrize("data, seq, model", SEQUENCE_MESHES, ids=[f"{d}x{s}x{m}" for d, s, m in SEQUENCE_MESHES])
def test_ring_with_the_pallas_kernel_gives_the_one_device_loss_and_gradients(setup, padded_rows, data, seq, model):
    """Ring attention with JAX's Pallas kernel per pair of runs (interpret mode on the CPU), full remat, rows padded at
    the end: the loss and every LoRA gradient equal the one-device XLA step's within 1e-5."""
    params, lora, *_ = setup
    reference_loss, reference_grads = long_loss_and_grads(params, lora, padded_rows)
    mesh = make_mesh(data=data, seq=seq, model=model)
    with pallas_interpreted():
        loss, grads = long_loss_and_grads(shard_params(TINY_GQA, params, mesh), shard_lora(TINY_GQA, lora, mesh),
                                          padded_rows, mesh, "full", block=8, implementation="pallas",
                                          row_layout="right_padded")
    assert relative_difference(loss, reference_loss) <= 1e-5
    for leaf, expected in zip(jax.tree.leaves(grads), jax.tree.leaves(reference_grads)):
        assert relative_difference(leaf, expected) <= 1e-5


def test_the_pallas_kernel_on_the_ring_refuses_packed_rows_and_says_why(setup, packed_rows):
    params, lora, *_ = setup
    mesh = make_mesh(data=1, seq=4, model=1, devices=jax.devices()[:4])
    with pallas_interpreted(), pytest.raises(ValueError, match=r"packed or left-padded rows.*PACK=False"):
        long_loss_and_grads(params, lora, packed_rows, mesh, "full", block=8, implementation="pallas",
                            row_layout="packed")
