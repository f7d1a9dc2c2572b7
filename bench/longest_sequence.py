"""The longest trainable sequence at 80 GB per device, from lowering alone (no accelerator needed).

    python bench/longest_sequence.py                              # every row of the sharding chapter's table
    python bench/longest_sequence.py --devices 8 --remat full --scheme ring   # some rows, merged into the file

For Llama-2-7B's shape (1 to 8 devices) and Llama-3.1-8B's (1 and 8), LoRA q,v r=16, bf16 weights, batch 1, the LM
head in chunks of 512, attention blocks of 512, the devices laid out as tensor parallelism, context parallelism (seq)
or both, each context layout with both context-parallel schemes (all_gather, ring): `jora.train.longest_trainable_sequence`
lowers the step `train_lora` compiles and searches the longest multiple of 1024 tokens within the budget. Rows are
merged into bench/results/longest_sequence.json (a row measured again replaces the old one), and the plot of the
full-remat rows is drawn again into bench/results/longest_sequence.png (`--devices 0` only redraws it).
"""
import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
RESULTS = ROOT / "bench" / "results" / "longest_sequence.json"

import jax  # noqa: E402

from jora.config import ParallamaConfig  # noqa: E402
from jora.model import LlamaConfig  # noqa: E402
from jora.sharding import make_mesh  # noqa: E402
from jora.train import longest_trainable_sequence  # noqa: E402
from report import longest_plot  # noqa: E402

MODELS = {
    "Llama-2-7B": (LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                               num_attention_heads=32, num_key_value_heads=32, head_dim=128), (1, 2, 4, 8)),
    "Llama-3.1-8B": (LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0),
                     (1, 8)),
}
KEY = ("model", "devices", "layout", "context parallel", "remat")


def layouts(devices: int) -> dict:
    "Ways to lay out `devices` for one long sequence: all tensor-parallel, all context-parallel, or both."
    if devices == 1:
        return {"one device": dict(model=1)}
    shapes = {"tensor": dict(model=devices), "context": dict(seq=devices)}
    if devices >= 4:
        shapes["context x tensor"] = dict(seq=devices // 2, model=2)
    return shapes


def rows_to_measure(arguments):
    for name, (model_config, device_counts) in MODELS.items():
        for devices in device_counts:
            for layout, axes in layouts(devices).items():
                schemes = ("all_gather", "ring") if "seq" in axes else ("-",)
                for scheme in schemes:
                    for remat in ("none", "projections", "full", "nested"):
                        row = dict(model=name, devices=devices, layout=layout, scheme=scheme, remat=remat)
                        if ((arguments.devices and devices not in arguments.devices)
                                or (arguments.remat and remat not in arguments.remat)
                                or (arguments.scheme and scheme not in arguments.scheme)
                                or (arguments.model and name not in arguments.model)):
                            continue
                        yield row, model_config, axes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, nargs="*")
    parser.add_argument("--remat", nargs="*", choices=("none", "projections", "full", "nested"))
    parser.add_argument("--scheme", nargs="*", choices=("all_gather", "ring", "-"))
    parser.add_argument("--model", nargs="*", choices=list(MODELS))
    parser.add_argument("--budget", type=float, default=80e9)
    arguments = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"rows": []}
    base = ParallamaConfig(N_ACCUMULATION_STEPS=1, ATTENTION_BLOCK=512)   # LoRA q,v r=16, bf16 weights, batch 1
    for row, model_config, axes in rows_to_measure(arguments):
        mesh = make_mesh(**{"data": 1, "seq": 1, **axes}, devices=jax.devices()[:row["devices"]])
        run = base._replace(REMAT=row["remat"], CONTEXT_PARALLEL="ring" if row["scheme"] == "ring" else "all_gather")
        length, report = longest_trainable_sequence(run, model_config, mesh, arguments.budget)
        measured = {"model": row["model"], "devices": row["devices"], "layout": row["layout"],
                    "context parallel": row["scheme"], "seq axis": mesh.shape["seq"], "model axis": mesh.shape["model"],
                    "remat": row["remat"], "longest tokens": length,
                    "total GB at that length": round(report["total"] / 1e9, 2),
                    "temporaries GB": round(report["temporaries"] / 1e9, 2)}
        print(json.dumps(measured), flush=True)
        results["rows"] = [r for r in results["rows"] if tuple(r.get(k) for k in KEY) != tuple(measured[k] for k in KEY)]
        results["rows"].append(measured)
        results.update({"date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
                        "jax": jax.__version__, "budget GB": arguments.budget / 1e9, "lora": "q_proj, v_proj, r=16",
                        "weights": "bfloat16", "options": {"logits_chunk": 512, "attention_block": 512},
                        "step": "train_lora's (jora.train.step_memory)", "granularity": 1024})
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    if results["rows"]:
        longest_plot(results).savefig(RESULTS.with_suffix(".png"))


if __name__ == "__main__":
    main()
