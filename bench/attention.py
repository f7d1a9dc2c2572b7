"""One layer's causal self-attention, forward and backward, timed for jora's two XLA paths and torch's SDPA.

    python bench/attention.py                                  # 512, 768, 1024 and 2112 positions
    python bench/attention.py --lengths 512 --repeats 30

Shape: batch 1, 8 heads of 64, fp32, every position real, one segment. Paths:
- `short`: `short_attention`, 64-query tiles against exactly their visible keys (jora uses it up to SHORT_SEQUENCE);
- `flash`: `blocked_attention` with `block_layout(time, 640)` (the training default ATTENTION_BLOCK);
- `torch`: `torch.nn.functional.scaled_dot_product_attention(is_causal=True)`, with as many threads as cores.
Each is called once to compile or warm up, then timed `--repeats` times; the minimum and the median are printed as
one JSON line per length and path. Nothing is asserted: a timing is only a result on an otherwise idle machine.
"""
import argparse
import json
import os
import statistics
import time

import numpy as np


def timings(run, repeats: int) -> dict:
    "Milliseconds of `repeats` calls after one untimed call: min and median."
    run()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - started)
    return {"min_ms": 1000 * min(seconds), "median_ms": 1000 * statistics.median(seconds)}


def jora_runs(query, key, value, output_grad) -> dict:
    "The two XLA paths as callables that run forward and backward and wait for the result."
    import jax
    import jax.numpy as jnp
    from jora.attention import MaskParts, block_layout, blocked_attention, short_attention
    time_ = query.shape[1]
    slots = jnp.broadcast_to(jnp.arange(time_), (1, time_))
    parts = MaskParts(slots, slots, jnp.ones((1, time_), bool), jnp.ones((1, time_), jnp.int32),
                      jnp.ones((1, time_), jnp.int32))
    layout = block_layout(time_, 640)
    paths = {"short": lambda q, k, v: short_attention(q, k, v, parts),
             "flash": lambda q, k, v: blocked_attention(q, k, v, parts, layout)}
    arrays = [jnp.asarray(x) for x in (query, key, value, output_grad)]
    runs = {}
    for name, attend in paths.items():
        step = jax.jit(lambda q, k, v, g, attend=attend: jax.vjp(attend, q, k, v)[1](g))
        runs[name] = lambda step=step: jax.block_until_ready(step(*arrays))
    return runs


def torch_run(query, key, value, output_grad):
    import torch
    torch.set_num_threads(os.cpu_count())
    q, k, v = (torch.tensor(x).transpose(1, 2).requires_grad_() for x in (query, key, value))
    grad = torch.tensor(output_grad).transpose(1, 2)

    def run():
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad)
    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="512,768,1024,2112", help="sequence lengths, comma-separated")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    args = parser.parse_args(argv)
    for length in (int(x) for x in args.lengths.split(",")):
        rng = np.random.default_rng(0)
        query, key, value, output_grad = (rng.standard_normal((1, length, args.heads, args.head_dim)).astype(np.float32)
                                          for _ in range(4))
        runs = {**jora_runs(query, key, value, output_grad), "torch": torch_run(query, key, value, output_grad)}
        for name, run in runs.items():
            print(json.dumps({"length": length, "path": name, "heads": args.heads, "head_dim": args.head_dim,
                              "repeats": args.repeats, **timings(run, args.repeats)}), flush=True)


if __name__ == "__main__":
    main()
