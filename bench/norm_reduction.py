"""The sum RMSNorm's backward takes (gradient times input over the hidden axis), timed in XLA:CPU on one sequence's
rows with and without the leading batch dimension of 1, and RMSNorm's forward and backward on `[1, time, hidden]` as
jora's `rms_norm` runs it (as `[time, hidden]`) beside the same formula with the leading 1 kept (jora before 2026-12-07).

    python bench/norm_reduction.py                          # hidden 512 and 4096 at 2112 positions
    python bench/norm_reduction.py --hiddens 512 --repeats 50

Why it exists: XLA:CPU hands `jnp.sum(a * b, -1)` to a YNNPACK fusion, which ran 10-70x slower on `[1, time, hidden]`
than on `[time, hidden]` on an Intel Xeon; `rms_norm` therefore normalises one sequence as `[time, hidden]`
(`nbs/00_model.ipynb`). Each case is called once untimed, then `--repeats` times per round, the cases taking turns for
`--rounds` rounds; one JSON line per case gives the median and the range of the rounds' medians in milliseconds.
Nothing is asserted: a timing is only a result on an otherwise idle machine.
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import timings  # noqa: E402


def rms_norm_with_leading_one(x, weight, eps):
    "jora's `rms_norm` as it was before 2026-12-07: the statistics taken on `x` as it comes."
    import jax
    import jax.numpy as jnp
    normalised = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    return weight * normalised


def cases(time: int, hidden: int) -> dict:
    "Name -> a callable that runs one case and waits for its result."
    import jax
    import jax.numpy as jnp
    from jora.model import rms_norm
    rng = np.random.default_rng(0)
    a, b = (jnp.asarray(rng.standard_normal((1, time, hidden)).astype(np.float32)) for _ in range(2))
    rows_a, rows_b = jax.block_until_ready((a[0], b[0]))     # the same values without the leading 1
    weight = jnp.ones((hidden,), jnp.float32)
    product_sum = jax.jit(lambda a, b: jnp.sum(a * b, axis=-1))
    backward = lambda norm: jax.jit(lambda x, g: jax.vjp(lambda x: norm(x, weight, 1e-5), x)[1](g))
    jora_norm, kept_norm = backward(rms_norm), backward(rms_norm_with_leading_one)
    return {"sum(a * b, -1) on [1, time, hidden]": lambda: product_sum(a, b).block_until_ready(),
            "sum(a * b, -1) on [time, hidden]": lambda: product_sum(rows_a, rows_b).block_until_ready(),
            "rms_norm forward+backward, leading 1 kept": lambda: jax.block_until_ready(kept_norm(a, b)),
            "rms_norm forward+backward, jora (as [time, hidden])": lambda: jax.block_until_ready(jora_norm(a, b))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--time", type=int, default=2112, help="positions of the sequence")
    parser.add_argument("--hiddens", default="512,4096", help="hidden sizes, comma-separated")
    parser.add_argument("--repeats", type=int, default=20, help="calls per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    for hidden in (int(x) for x in args.hiddens.split(",")):
        runs = cases(args.time, hidden)
        medians = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, run in runs.items():
                medians[name].append(timings(run, args.repeats)["median_ms"])
        for name, values in medians.items():
            print(json.dumps({"case": name, "time": args.time, "hidden": hidden, "rounds": args.rounds,
                              "repeats": args.repeats, "median_ms": statistics.median(values),
                              "min_ms": min(values), "max_ms": max(values)}), flush=True)


if __name__ == "__main__":
    main()
