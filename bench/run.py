"""Run a benchmark suite: jora beside Hugging Face transformers+PEFT, every case in its own process, one after another.

    python bench/run.py cpu      # 8 layers, hidden 512, vocabulary 32k, fp32: seq 512 and RAFT rows (2048 + 64)
    python bench/run.py gpu      # Llama-2-7B shape, random bf16 weights, batch 1: seq 512, 4096, 16384
    python bench/run.py memory   # per-device memory of a Llama-2-7B LoRA step on 1/2/4/8 devices, by lowering only
    python bench/run.py smoke    # a tiny model in seconds, to check the scripts (the tests run it)

Writes bench/results/<suite>.json (every measurement, the machine, the versions, the commands) and prints a table.
Targets are reported as met or not; nothing here asserts a timing.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

LLAMA2_7B = dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000)
SUITES = {
    "cpu": dict(model=dict(num_hidden_layers=8, hidden_size=512, intermediate_size=1376, num_attention_heads=8,
                           num_key_value_heads=8, vocab_size=32000),
                dtype="float32", cases=[(512, 0), (2048, 64)], remats=["none", "full"], warmup=2, steps=7,
                device="cpu", targets={(512, 0): 1.0, (2048, 64): 0.6}),
    "gpu": dict(model=LLAMA2_7B, dtype="bfloat16", cases=[(512, 0), (4096, 0), (16384, 0)], remats=["full"],
                warmup=2, steps=7, device="auto", targets={}),
    "smoke": dict(model=dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                             num_key_value_heads=4, vocab_size=512),
                  dtype="float32", cases=[(48, 16)], remats=["none"], warmup=1, steps=2, device="cpu", targets={}),
}
PAPER_ONE_GPU = {"step_seconds": 0.19, "memory_gb": 23.1}           # JORA paper, Llama-2-7B, one GPU
PAPER_TABLE_1_GB = {1: 23.1, 2: 16.1, 4: 11.4}                      # JORA paper, Table 1, memory per GPU
PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}  # dense bf16, SXM


def write_model(folder: Path, shape: dict, dtype: str) -> Path:
    "A randomly initialised Llama checkpoint (seed 0) written by transformers: the weights both frameworks load."
    import torch
    import transformers
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**shape, max_position_embeddings=32768, rms_norm_eps=1e-5, tie_word_embeddings=False)
    device = "cuda" if torch.cuda.is_available() and dtype == "bfloat16" else "cpu"
    with torch.device(device):
        model = transformers.LlamaForCausalLM._from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def lora_flops_per_token(shape: dict, sequence: int, lora_rank: int = 16) -> float:
    """Model FLOPs per token of a LoRA training step: 4 x the frozen matrix parameters (forward, and the backward's
    input gradients; frozen weights get no weight gradient), 6 x the LoRA parameters, and 12 x layers x sequence x
    hidden for attention scores and mixing (forward and backward, no causal discount, as PaLM counts it).
    Rematerialisation is not counted: this is model FLOPs, not hardware FLOPs."""
    hidden, layers = shape["hidden_size"], shape["num_hidden_layers"]
    head_dim = hidden // shape["num_attention_heads"]
    key_value = shape["num_key_value_heads"] * head_dim
    per_layer = 2 * hidden * hidden + 2 * hidden * key_value + 3 * hidden * shape["intermediate_size"]
    frozen = layers * per_layer + hidden * shape["vocab_size"]
    lora = layers * lora_rank * ((hidden + hidden) + (hidden + key_value))      # q_proj and v_proj
    return 4 * frozen + 6 * lora + 12 * layers * sequence * hidden


def run_case(framework: str, model: Path, prompt: int, answer: int, suite: dict, remat: str) -> dict:
    command = [sys.executable, str(HERE / "step.py"), "--framework", framework, "--model", str(model),
               "--prompt", str(prompt), "--answer", str(answer), "--dtype", suite["dtype"], "--remat", remat,
               "--warmup", str(suite["warmup"]), "--steps", str(suite["steps"]), "--device", suite["device"]]
    environment = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, capture_output=True, text=True, env=environment)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["command"] = " ".join(["python", "bench/step.py", *command[2:]]).replace(str(model), "MODEL")
    return result


def machine() -> dict:
    import importlib.metadata as metadata
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = {name: metadata.version(name) for name in ("jax", "jaxlib", "torch", "transformers", "peft")}
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "python": platform.python_version(), **versions}


def compare(suite_name: str, suite: dict, model: Path) -> dict:
    rows = []
    for remat in suite["remats"]:
        for prompt, answer in suite["cases"]:
            pair = {name: run_case(name, model, prompt, answer, suite, remat) for name in ("jora", "hf")}
            jora, hf = pair["jora"], pair["hf"]
            row = {"remat": remat, "prompt": prompt, "answer": answer, "jora": jora, "hf": hf,
                   "time_ratio": jora["median_step_seconds"] / hf["median_step_seconds"],
                   "rss_ratio": jora["peak_rss_bytes"] / hf["peak_rss_bytes"],
                   "first_loss_difference": abs(jora["first_loss"] - hf["first_loss"])}
            if jora["peak_device_bytes"] and hf["peak_device_bytes"]:
                row["device_memory_ratio"] = jora["peak_device_bytes"] / hf["peak_device_bytes"]
            peak = next((flops for name, flops in PEAK_BF16_FLOPS.items() if name in jora["device"]), None)
            if peak and suite["dtype"] == "bfloat16":
                flops = lora_flops_per_token(suite["model"], prompt + answer)
                row["mfu"] = {name: flops * pair[name]["tokens_per_second"] / peak for name in pair}
            target = suite["targets"].get((prompt, answer))
            if target is not None:
                row["time_target"] = target
                row["time_target_met"] = row["time_ratio"] <= target
                row["rss_target_met"] = row["rss_ratio"] <= 1.0
            rows.append(row)
            print(summary_line(row), flush=True)
    return {"suite": suite_name, "date": datetime.date.today().isoformat(), "machine": machine(),
            "model_shape": suite["model"], "dtype": suite["dtype"], "lora": "q_proj, v_proj, r=16, alpha=16, dropout 0",
            "optimizer": "AdamW lr 1e-4", "warmup_steps": suite["warmup"], "timed_steps": suite["steps"],
            "command": f"python bench/run.py {suite_name}", "rows": rows,
            "paper_one_gpu": PAPER_ONE_GPU if suite_name == "gpu" else None}


def summary_line(row: dict) -> str:
    jora, hf = row["jora"], row["hf"]
    return (f"remat={row['remat']:<5} tokens={row['prompt']}+{row['answer']}: jora {jora['median_step_seconds']:.3f} s "
            f"({jora['tokens_per_second']:.0f} tok/s, compile {jora['compile_seconds']:.1f} s, "
            f"RSS {jora['peak_rss_bytes'] / 1e9:.2f} GB) | hf {hf['median_step_seconds']:.3f} s "
            f"({hf['tokens_per_second']:.0f} tok/s, RSS {hf['peak_rss_bytes'] / 1e9:.2f} GB) | "
            f"time ratio {row['time_ratio']:.2f}, RSS ratio {row['rss_ratio']:.2f}, "
            f"first-loss difference {row['first_loss_difference']:.1e}")


def memory_suite(folder: Path = RESULTS) -> dict:
    "Per-device bytes of a Llama-2-7B LoRA step (q,v r=16, 512 tokens, full remat, bf16) on 1/2/4/8 simulated devices."
    if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        environment = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
        done = subprocess.run([sys.executable, __file__, "memory", "--results", str(folder)], env=environment,
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-3000:])
        print(done.stdout, end="")
        return json.loads((folder / "memory.json").read_text())
    import jax
    from jora.model import LlamaConfig
    from jora.sharding import lora_step_memory, make_mesh
    config = LlamaConfig(**LLAMA2_7B, head_dim=128)
    rows = []
    for devices in (1, 2, 4, 8):
        report = lora_step_memory(config, make_mesh(model=devices, devices=jax.devices()[:devices]), seq_len=512)
        rows.append({"devices": devices, **{f"{k}_bytes": v for k, v in report.items()},
                     "paper_gb": PAPER_TABLE_1_GB.get(devices)})
        print(f"{devices} devices: {report['total'] / 1e9:.2f} GB per device "
              f"(paper: {PAPER_TABLE_1_GB.get(devices, '-')} GB)", flush=True)
    for row in rows:
        row["ratio"] = row["total_bytes"] / rows[0]["total_bytes"]
    results = {"suite": "memory", "date": datetime.date.today().isoformat(), "machine": machine(),
               "what": "compiled memory analysis of one LoRA step (XLA:CPU, simulated devices, nothing allocated): "
                       "Llama-2-7B shape, bf16 weights, LoRA q,v r=16, AdamW, 512 tokens, full remat, model axis",
               "command": "python bench/run.py memory", "rows": rows, "paper_table_1_gb": PAPER_TABLE_1_GB}
    save(results, folder / "memory.json")
    return results


def save(results: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("suite", choices=[*SUITES, "memory"])
    parser.add_argument("--model", help="use this checkpoint folder instead of writing a random one")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for <suite>.json (default: bench/results)")
    args = parser.parse_args(argv)
    if args.suite == "memory":
        memory_suite(args.results)
        return
    suite = SUITES[args.suite]
    with tempfile.TemporaryDirectory(prefix="jora-bench-") as folder:
        model = Path(args.model) if args.model else write_model(Path(folder) / "model", suite["model"], suite["dtype"])
        results = compare(args.suite, suite, model)
    print("wrote", save(results, args.results / f"{args.suite}.json"))


if __name__ == "__main__":
    main()
