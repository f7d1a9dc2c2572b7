"""What each context-parallel scheme sends between devices per training step, from the compiled program.

    python bench/communication.py                      # Llama-2-7B and Llama-3.1-8B on 8 seq devices, 32k-1M tokens
    python bench/communication.py --lengths 16384 --models Llama-2-7B   # one row per scheme

The step `train_lora` compiles (LoRA q,v r=16, bf16 weights, full remat, batch 1, attention blocks of 512) is lowered
for a data=1 x seq=8 x model=1 mesh and compiled on CPU; `jora.sharding.collective_bytes` adds up, from the optimized
HLO, the bytes one device receives per step by kind of collective (loop trip counts included). Nothing is run.
Results go to bench/results/communication.json.
"""
import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import jax  # noqa: E402

from jora.config import ParallamaConfig  # noqa: E402
from jora.sharding import collective_bytes, compile_for_memory_estimate, compiled_memory, make_mesh  # noqa: E402
from jora.train import abstract_train_inputs, make_optimizer, make_run_step  # noqa: E402
from longest_sequence import MODELS  # noqa: E402


def measure(model_config, scheme: str, length: int, devices: int = 8) -> dict:
    "Bytes received per device per step, by collective, and the step's memory, for one scheme and length."
    run = ParallamaConfig(N_ACCUMULATION_STEPS=1, REMAT="full", ATTENTION_BLOCK=512, CONTEXT_PARALLEL=scheme)
    mesh = make_mesh(data=1, seq=devices, model=1, devices=jax.devices()[:devices])
    optimizer, _ = make_optimizer(run, 1000)
    compiled = compile_for_memory_estimate(make_run_step(run, model_config, optimizer, mesh),
                                           *abstract_train_inputs(run, model_config, mesh, optimizer, length), mesh=mesh)
    received = collective_bytes(compiled, devices)
    return {"GB received per device": round(sum(received.values()) / 1e9, 3),
            **{f"{kind} GB": round(size / 1e9, 3) for kind, size in received.items() if size},
            "memory GB": round(compiled_memory(compiled)["total"] / 1e9, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="*", default=[32768, 131072, 524288, 1048576])
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--results", default=str(HERE / "results"))
    arguments = parser.parse_args()
    rows = []
    for name in arguments.models:
        for length in arguments.lengths:
            for scheme in ("all_gather", "ring"):
                row = {"model": name, "tokens": length, "seq devices": 8, "context parallel": scheme,
                       **measure(MODELS[name][0], scheme, length)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    results = {"date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
               "jax": jax.__version__, "step": "train_lora's, full remat, LoRA q,v r=16, bf16 weights, batch 1",
               "mesh": "data=1 x seq=8 x model=1", "rows": rows}
    Path(arguments.results).mkdir(parents=True, exist_ok=True)
    (Path(arguments.results) / "communication.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
