"""What the memory policies for long rows cost in time: one LoRA training step (loss and LoRA gradients) under full
remat with the MLP whole, full remat with the MLP in pieces, and nested remat, on the same model, tokens and adapters.

    python bench/remat_cost.py            # 8 layers, hidden 512, 8192 tokens, MLP pieces of 2048 positions

The three variants alternate, round after round, so a slow moment of a shared machine hits each of them alike; each
is timed `--rounds` times after one warm-up, and the medians and their ratios to full remat with the MLP whole go to
bench/results/remat_cost.json. Ratios are the result: seconds depend on the machine.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jora.lora import LoraConfig, init_lora  # noqa: E402
from jora.attention import ComputeOptions  # noqa: E402
from jora.model import Batch, LlamaConfig, LoraWeights, causal_lm_loss, init_params  # noqa: E402

VARIANTS = {   # name: (remat, positions per MLP piece; 0 keeps the MLP whole)
    "full, MLP whole": ("full", 0),
    "full, MLP in pieces": ("full", None),
    "nested, MLP in pieces": ("nested", None),
}


def step_function(model, params, lora, ids, labels, remat, pieces):
    "The jitted loss and LoRA gradients of one row under `remat`, the MLP in pieces of `pieces` positions."
    def loss(adapters):
        options = ComputeOptions(remat=remat, attention_block=512, logits_chunk=512, feed_forward_chunk=pieces)
        return causal_lm_loss(model, params, Batch(ids, labels), LoraWeights(adapters, lora.scale), options=options)
    return jax.jit(jax.value_and_grad(loss))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--pieces", type=int, default=2048, help="positions per MLP piece")
    parser.add_argument("--rounds", type=int, default=3)
    arguments = parser.parse_args()
    model = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                        num_attention_heads=8, num_key_value_heads=8, head_dim=64)
    params = init_params(model, jax.random.key(0))
    lora = init_lora(model, LoraConfig(r=16, alpha=16), jax.random.key(1))
    ids = np.random.default_rng(0).integers(3, model.vocab_size, (1, arguments.tokens))
    labels = ids.copy()
    labels[:, : arguments.tokens - 64] = -100   # a RAFT row: the loss on the last 64 tokens
    steps, losses = {}, {}
    for name, (remat, pieces) in VARIANTS.items():
        steps[name] = step_function(model, params, lora, ids, labels, remat,
                                    arguments.pieces if pieces is None else pieces)
        losses[name] = float(jax.block_until_ready(steps[name](lora.adapters))[0])   # warm-up, compile
    seconds = {name: [] for name in VARIANTS}
    for _ in range(arguments.rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            jax.block_until_ready(step(lora.adapters))
            seconds[name].append(time.perf_counter() - start)
    baseline = statistics.median(seconds["full, MLP whole"])
    rows = [{"variant": name, "median seconds": statistics.median(times), "runs": times,
             "time ratio": statistics.median(times) / baseline, "loss": losses[name]} for name, times in seconds.items()]
    results = {"date": datetime.date.today().isoformat(), "command": "python bench/remat_cost.py " + " ".join(sys.argv[1:]),
               "machine": {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()},
               "jax": jax.__version__, "tokens": arguments.tokens, "positions per MLP piece": arguments.pieces,
               "model": "8 layers, hidden 512, MLP 1376, vocabulary 32000, fp32, LoRA q,v r=16", "rows": rows}
    (HERE / "results" / "remat_cost.json").write_text(json.dumps(results, indent=1) + "\n")
    for row in rows:
        print(f"{row['variant']:24s} {row['median seconds']:7.2f} s  ratio {row['time ratio']:.2f}  loss {row['loss']:.6f}")


if __name__ == "__main__":
    main()
