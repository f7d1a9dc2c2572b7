"""Time one framework's LoRA training step and print one JSON line.

    python bench/step.py --framework jora --model /tmp/bench-model --prompt 2048 --answer 64
    python bench/step.py --framework hf   --model /tmp/bench-model --prompt 2048 --answer 64

Both frameworks load the same Hugging Face checkpoint, train LoRA on q_proj and v_proj (r=16, alpha=16, no dropout)
with AdamW (lr 1e-4) on the same token ids, in the checkpoint's dtype. `--answer 0` puts a label on every position;
otherwise the last `--answer` positions carry labels and the prompt none. Each framework runs in its own process
(bench/run.py starts them one after another), so the peak resident memory reported is that framework's own.

Reported: the loss of the first step (both must agree: same weights, same tokens, B starts at zero), the median of
`--steps` timed steps after `--warmup` untimed ones, tokens per second, jora's compile time (lowering + XLA compile,
outside the timed steps), peak RSS of the process, on a GPU the device's peak memory, and per timed step the process's
user and system CPU seconds and minor page faults (memory the step maps afresh is faulted in, and zeroed, page by page).
"""
import argparse
import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path

import numpy as np


def token_batch(vocab_size: int, batch: int, prompt: int, answer: int, seed: int = 0):
    "Random token ids `[batch, prompt + answer]` and labels: the answer positions only, or all when `answer` is 0."
    ids = np.random.default_rng(seed).integers(3, vocab_size, (batch, prompt + answer)).astype(np.int64)
    labels = ids.copy()
    if answer:
        labels[:, :prompt] = -100
    return ids, labels


def peak_rss_bytes() -> int:
    "Peak resident set size of this process (Linux reports kilobytes)."
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_use() -> dict:
    "This process's CPU seconds so far (user, system) and minor page faults."
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"user_seconds": usage.ru_utime, "system_seconds": usage.ru_stime, "page_faults": usage.ru_minflt}


def check_gpu(framework: str) -> None:
    "Stop with a message when the framework would fall back to the CPU."
    if framework == "jora":
        import jax
        found = jax.default_backend() == "gpu"
    else:
        import torch
        found = torch.cuda.is_available()
    if not found:
        raise SystemExit(f"--device gpu: {framework} sees no GPU here; nothing was measured.")


def run_jora(args, ids, labels):
    import jax
    import jax.numpy as jnp
    import optax
    from jora.lora import LoraConfig, init_lora
    from jora.formats import load_hf_checkpoint
    from jora.sharding import make_mesh
    from jora.attention import ComputeOptions
    from jora.train import TrainState, make_train_step, place_batch

    mesh = make_mesh(data=1, seq=1, model=1, devices=jax.devices()[:1])
    config, params = load_hf_checkpoint(args.model, dtype=jnp.dtype(args.dtype), mesh=mesh)
    lora_config = LoraConfig(r=16, alpha=16, dropout=0.0, targets=("q_proj", "v_proj"))
    adapters = init_lora(config, lora_config, jax.random.key(0), mesh=mesh).adapters
    optimizer = optax.adamw(1e-4)
    options = ComputeOptions(remat=args.remat, logits_chunk=args.logits_chunk, attention_block=args.attention_block)
    step = make_train_step(config, optimizer, lora_config, mesh, options)
    batch = {"input_ids": ids.astype(np.int32), "labels": labels.astype(np.int32),
             "attention_mask": np.ones(ids.shape, np.int32),
             "positions": np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape).copy(),
             "segment_ids": np.ones(ids.shape, np.int32)}
    micro_batches = place_batch({name: value[None] for name, value in batch.items()}, mesh, leading=1)
    state = TrainState(adapters, optimizer.init(adapters), jnp.int32(0), jax.random.key(1))
    rss_before = peak_rss_bytes()
    started = time.perf_counter()
    compiled = step.lower(state, params, micro_batches).compile()
    compile_seconds = time.perf_counter() - started

    def one_step():
        nonlocal state
        state, metrics = compiled(state, params, micro_batches)
        return float(metrics["loss"])        # waits for the step to finish

    device = jax.devices()[0]
    peak_device = lambda: (device.memory_stats() or {}).get("peak_bytes_in_use")
    return one_step, compile_seconds, rss_before, peak_device, f"{device.platform}: {device.device_kind}"


def run_hf(args, ids, labels):
    import peft
    import torch
    import transformers

    torch.manual_seed(0)
    on_gpu = torch.cuda.is_available() and args.device != "cpu"
    device = torch.device("cuda" if on_gpu else "cpu")
    if not on_gpu:
        torch.set_num_threads(os.cpu_count())
    model = transformers.LlamaForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype),
                                                          attn_implementation="sdpa").to(device)
    if args.remat == "full":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0,
                                                       target_modules=["q_proj", "v_proj"]))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    input_ids, label_ids = torch.tensor(ids, device=device), torch.tensor(labels, device=device)
    rss_before = peak_rss_bytes()

    def one_step():
        loss = model(input_ids=input_ids, labels=label_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)                   # waits for the step to finish

    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    peak_device = (lambda: torch.cuda.max_memory_allocated()) if on_gpu else (lambda: None)
    name = torch.cuda.get_device_name() if on_gpu else platform.processor() or "cpu"
    return one_step, None, rss_before, peak_device, f"{device.type}: {name}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--framework", choices=["jora", "hf"], required=True)
    parser.add_argument("--model", required=True, help="Hugging Face checkpoint folder (bench/run.py writes one)")
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens per row")
    parser.add_argument("--answer", type=int, default=0, help="answer tokens per row (0: every position labelled)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--remat", default="none", choices=["none", "full"],
                        help="full: jora's per-layer remat / transformers' gradient checkpointing")
    parser.add_argument("--logits-chunk", type=int, default=None,
                        help="jora only; default: jora's LOGITS_CHUNK (0: all positions at once)")
    parser.add_argument("--attention-block", type=int, default=None,
                        help="jora only; default: jora's ATTENTION_BLOCK (0: one call)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"],
                        help="gpu: refuse to run unless this framework sees a GPU (no silent CPU fallback)")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"
    if args.framework == "jora":
        from jora.config import ParallamaConfig
        defaults = ParallamaConfig()
        args.logits_chunk = defaults.LOGITS_CHUNK if args.logits_chunk is None else args.logits_chunk
        args.attention_block = defaults.ATTENTION_BLOCK if args.attention_block is None else args.attention_block
    if args.device == "gpu":
        check_gpu(args.framework)
    vocab_size = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    ids, labels = token_batch(vocab_size, args.batch, args.prompt, args.answer)
    runner = run_jora if args.framework == "jora" else run_hf
    one_step, compile_seconds, rss_before, peak_device, device = runner(args, ids, labels)
    first = time.perf_counter()
    first_loss = one_step()
    first_step_seconds = time.perf_counter() - first
    for _ in range(args.warmup - 1):
        one_step()
    times, before = [], cpu_use()
    for _ in range(args.steps):
        started = time.perf_counter()
        one_step()
        times.append(time.perf_counter() - started)
    per_step = {f"{name}_per_step": (value - before[name]) / args.steps for name, value in cpu_use().items()}
    median = statistics.median(times)
    print(json.dumps({
        "framework": args.framework, "device": device, "dtype": args.dtype, "remat": args.remat,
        "batch": args.batch, "prompt": args.prompt, "answer": args.answer, "tokens_per_step": int(ids.size),
        "first_loss": first_loss, "compile_seconds": compile_seconds, "first_step_seconds": first_step_seconds,
        "step_seconds": times, "median_step_seconds": median, "tokens_per_second": ids.size / median,
        "peak_rss_bytes": peak_rss_bytes(), "rss_before_first_step_bytes": rss_before,
        "peak_device_bytes": peak_device(), **per_step,
        "options": {"logits_chunk": args.logits_chunk, "attention_block": args.attention_block}
        if args.framework == "jora" else {"attn_implementation": "sdpa"}}))


if __name__ == "__main__":
    main()
