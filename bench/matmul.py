"""The matrix products of the CPU suite's training step, timed alone in XLA (what jora's step runs) and in torch (what
transformers+peft's step runs), on this machine: how fast each library multiplies the same shapes bounds the time
ratio `bench/run.py cpu` can reach here, since products are most of both steps.

    python bench/matmul.py          # writes bench/results/matmul.json; about 35 seconds on 2 cores

Shapes (fp32, batch 1, the cpu suite's model: hidden 512, MLP 1376, vocabulary 32000, 8 heads of 64):
the layer projections of 512 and 2112 positions, one LM-head chunk of 256 positions forward and backward, and the
attention products: jora's 64-query tiles of a 512-token row and its blocks of a 2112-token row (528 x 264 with the
default ATTENTION_BLOCK; both sizes are read from jora), for
scores (`q.k`), mixing (`p.v`) and the key/value gradients' form (`p^T.q`, contracting over the queries). Each is the
median of repeated calls after a warm-up, in one process; every product is timed in both libraries (each with all
cores) once per round, and the median of the rounds is reported with the range of XLA's speed over torch's. A
product's FLOPs are 2 x the product of every index's size (heads included).
"""
import argparse
import datetime
import os
import statistics
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from attention import timings  # noqa: E402
from run import RESULTS, machine, save  # noqa: E402

HEADS, HEAD_DIM = 8, 64


def attention_sizes() -> tuple[int, int, int]:
    "jora's query tile at 512 positions, and its query and key blocks at 2112 positions (default ATTENTION_BLOCK)."
    from jora.attention import block_layout, short_layout
    from jora.config import ParallamaConfig
    blocks = block_layout(2112, ParallamaConfig().ATTENTION_BLOCK)
    return short_layout(512).size, blocks.size, blocks.key_size


TILE, BLOCK, KEY_BLOCK = attention_sizes()
# name -> (einsum, left operand shape, right operand shape)
PRODUCTS = {
    "projection 512 x 512 -> 512": ("md,dn->mn", (512, 512), (512, 512)),
    "projection 512 x 512 -> 1376": ("md,dn->mn", (512, 512), (512, 1376)),
    "projection 512 x 1376 -> 512": ("md,dn->mn", (512, 1376), (1376, 512)),
    "projection 2112 x 512 -> 1376": ("md,dn->mn", (2112, 512), (512, 1376)),
    "projection 2112 x 1376 -> 512": ("md,dn->mn", (2112, 1376), (1376, 512)),
    "LM head 256 x 512 -> 32000": ("md,dn->mn", (256, 512), (512, 32000)),
    "LM head gradient 256 x 32000 -> 512": ("mv,dv->md", (256, 32000), (512, 32000)),
    f"attention scores, tile {TILE} x 512": ("hqd,hkd->hqk", (HEADS, TILE, HEAD_DIM), (HEADS, 512, HEAD_DIM)),
    f"attention mixing, tile {TILE} x 512": ("hqk,hkd->hqd", (HEADS, TILE, 512), (HEADS, 512, HEAD_DIM)),
    f"attention p^T.q, tile {TILE} x 512": ("hqk,hqd->hkd", (HEADS, TILE, 512), (HEADS, TILE, HEAD_DIM)),
    f"attention scores, block {BLOCK} x {KEY_BLOCK}": ("hqd,hkd->hqk", (HEADS, BLOCK, HEAD_DIM),
                                                       (HEADS, KEY_BLOCK, HEAD_DIM)),
    f"attention mixing, block {BLOCK} x {KEY_BLOCK}": ("hqk,hkd->hqd", (HEADS, BLOCK, KEY_BLOCK),
                                                       (HEADS, KEY_BLOCK, HEAD_DIM)),
    f"attention p^T.q, block {BLOCK} x {KEY_BLOCK}": ("hqk,hqd->hkd", (HEADS, BLOCK, KEY_BLOCK),
                                                      (HEADS, BLOCK, HEAD_DIM)),
}


def product_flops(equation: str, left: tuple, right: tuple) -> int:
    "2 x the product of every index's size (batch, kept and contracted): the multiply-adds of one product."
    inputs = equation.split("->")[0].split(",")
    sizes = {**dict(zip(inputs[0], left)), **dict(zip(inputs[1], right))}
    return 2 * int(np.prod(list(sizes.values())))


def median_seconds(call, repeats: int) -> float:
    "The median wall time of `repeats` calls after an untimed one (`call` waits for its result)."
    return timings(call, repeats)["median_ms"] / 1000


def product_timers(repeats: int) -> dict:
    "Per product, a function that times it once in XLA and once in torch (seconds, each a median of `repeats` calls)."
    import jax
    import jax.numpy as jnp
    import torch

    torch.set_num_threads(os.cpu_count())
    timers = {}
    for name, (equation, left, right) in PRODUCTS.items():
        generator = np.random.default_rng(0)
        operands = [generator.standard_normal(shape, dtype=np.float32) for shape in (left, right)]
        product = jax.jit(lambda a, b, equation=equation: jnp.einsum(equation, a, b))
        on_device, tensors = [jnp.asarray(x) for x in operands], [torch.from_numpy(x) for x in operands]

        def both(product=product, on_device=on_device, tensors=tensors, equation=equation):
            xla = median_seconds(lambda: product(*on_device).block_until_ready(), repeats)
            with torch.no_grad():
                eager = median_seconds(lambda: torch.einsum(equation, *tensors), repeats)
            return xla, eager
        timers[name] = both
    return timers


def time_products(repeats: int, rounds: int) -> list[dict]:
    """One row per product: XLA's and torch's GFLOP/s on the same random operands (the median of `rounds` rounds, each
    timing every product once in both libraries), and XLA's speed over torch's with its range over the rounds."""
    timers = product_timers(repeats)
    measured = {name: [timer() for _ in range(rounds)] for name, timer in timers.items()}
    rows = []
    for name, runs in measured.items():
        equation, left, right = PRODUCTS[name]
        flops = product_flops(equation, left, right)
        xla, eager = (statistics.median(run[i] for run in runs) for i in (0, 1))
        ratios = [run[1] / run[0] for run in runs]
        rows.append({"product": name, "einsum": equation, "shapes": [list(left), list(right)], "flops": flops,
                     "xla_gflops": flops / xla / 1e9, "torch_gflops": flops / eager / 1e9,
                     "xla_over_torch": statistics.median(ratios),
                     "xla_over_torch_runs": {"min": min(ratios), "max": max(ratios)}})
        print(f"{name:40s} XLA {rows[-1]['xla_gflops']:6.1f}  torch {rows[-1]['torch_gflops']:6.1f} GFLOP/s")
    return rows


def cpu_flags() -> list[str]:
    "The vector extensions the CPU reports that matter to fp32 products (AVX2, AVX-512, AMX)."
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    return sorted(flag for flag in flags.split(":", 1)[1].split() if flag in ("avx2", "fma", "avx512f", "amx_tile"))


def command_line(results: Path) -> str:
    "The command as a user types it in the checkout: `--results` shown only when it is not the default folder."
    if results.resolve() == RESULTS:
        return "python bench/matmul.py"
    shown = results.resolve().relative_to(HERE.parent) if results.resolve().is_relative_to(HERE.parent) else results
    return f"python bench/matmul.py --results {shown}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30, help="calls per timing")
    parser.add_argument("--rounds", type=int, default=5, help="timings per product and library")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for matmul.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    rows = time_products(args.repeats, args.rounds)
    results = {"date": datetime.date.today().isoformat(), "machine": {**machine(), "cpu_flags": cpu_flags()},
               "command": command_line(args.results), "repeats": args.repeats,
               "rounds": args.rounds, "rows": rows}
    print(f"wrote {save(results, args.results / 'matmul.json')}")


if __name__ == "__main__":
    main()
