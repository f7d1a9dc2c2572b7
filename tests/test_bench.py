"""The benchmark scripts run and report what they measure (their timings are not asserted: machines are shared).

The smoke suite runs jora and transformers+peft on a tiny checkpoint, each in its own process, exactly as the CPU and
GPU suites do; the two first losses must agree (same weights, same tokens, LoRA B starts at zero) within 1e-4.
"""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "bench" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_suite_measures_both_frameworks_on_the_same_step(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "smoke", "--results", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "smoke.json").read_text())
    assert results["machine"]["cpu_count"] >= 1 and results["command"] == "python bench/run.py smoke"
    assert results["compilation_cache"] is None   # every CPU run compiles its step afresh
    (row,) = results["rows"]
    assert row["first_loss_difference"] <= 1e-4, row
    for name in ("jora", "hf"):
        measured = row[name]
        assert len(measured["step_seconds"]) == results["timed_steps"]
        assert measured["tokens_per_step"] == 64 and measured["peak_rss_bytes"] > 0
        assert measured["tokens_per_second"] == pytest.approx(64 / measured["median_step_seconds"])
        # the process's own CPU use over the timed steps, per step
        assert measured["user_seconds_per_step"] > 0 and measured["page_faults_per_step"] >= 0
        assert measured["system_seconds_per_step"] >= 0
    assert row["jora"]["compile_seconds"] > 0 and row["hf"]["compile_seconds"] is None
    from jora.config import ParallamaConfig   # jora runs as a user would: LM-head chunk and attention block by default
    defaults = ParallamaConfig()
    assert row["jora"]["options"] == {"logits_chunk": defaults.LOGITS_CHUNK,
                                      "attention_block": defaults.ATTENTION_BLOCK}
    # the ratio of the medians over the repeated runs, and a range over the paired runs around it
    assert row["time_ratio"] == pytest.approx(row["jora_step_seconds"]["median"] / row["hf_step_seconds"]["median"])
    assert row["time_ratio_runs"]["min"] <= row["time_ratio_runs"]["max"]
    assert len(row["runs"]["jora"]) == len(row["runs"]["hf"]) == results["repeats"]


def test_flop_count_matches_the_parameter_count():
    "4 x the frozen matrices (every projection and the LM head, not the embedding or norms) plus causal attention."
    import numpy as np
    from jora.model import LlamaConfig, param_shapes
    bench = load_bench()
    shape = bench.LLAMA2_7B
    shapes = param_shapes(LlamaConfig(**shape, head_dim=128))
    frozen = sum(np.prod(s) for name, s in shapes["layers"].items() if name.endswith("_proj")) + np.prod(shapes["lm_head"])
    lora = 32 * 16 * (2 * 4096 + 2 * 4096)
    assert bench.lora_flops_per_token(shape, 0) == 4 * frozen + 6 * lora
    # causal attention: 12 x layers x sequence x hidden (PaLM's count, forward and backward), halved
    assert bench.lora_flops_per_token(shape, 4096) - bench.lora_flops_per_token(shape, 0) == 6 * 32 * 4096 * 4096


def test_peak_flops_tell_an_h200_nvl_from_an_h200_sxm():
    bench = load_bench()
    assert bench.peak_flops("NVIDIA H200 NVL") == 835.6e12 and bench.peak_flops("NVIDIA H200") == 989.4e12
    assert bench.peak_flops("NVIDIA H100 PCIe") == 756.5e12 and bench.peak_flops("Tesla T4") is None


def test_memory_suite_writes_the_paper_table_beside_jora(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "memory", "--results", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "memory.json").read_text())["rows"]
    assert [row["devices"] for row in rows] == [1, 2, 4, 8]
    assert [row["paper_gb"] for row in rows] == [23.1, 16.1, 11.4, None]
    assert all(later["total_bytes"] < earlier["total_bytes"] for earlier, later in zip(rows, rows[1:]))


def test_attention_microbenchmark_runs_every_path(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "attention.py"), "--lengths", "80", "--repeats", "2",
                           "--heads", "2", "--head-dim", "16"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [row["path"] for row in rows] == ["short", "flash", "torch"]
    assert all(row["length"] == 80 and 0 < row["min_ms"] <= row["median_ms"] for row in rows)


def test_norm_reduction_bench_times_every_case():
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "norm_reduction.py"), "--time", "48", "--hiddens", "16",
                           "--repeats", "2", "--rounds", "2"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(rows) == 4 and {row["hidden"] for row in rows} == {16}
    assert all(0 < row["min_ms"] <= row["median_ms"] <= row["max_ms"] for row in rows)


def test_retrieval_bench_reports_index_search_and_rows(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "retrieval.py"), "--documents", "1500", "--questions",
                           "150", "--repeats", "1", "--results", str(tmp_path), "--no-wikitablequestions"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = json.loads((tmp_path / "retrieval.json").read_text())["rows"]
    assert (row["documents"], row["questions"]) == (1500, 150) and row["oracle_in_top10"] > 0.9
    assert row["index_seconds"]["median"] > 0 and row["queries_per_second"] > 0 and row["rows_per_second"] > 0
    assert row["raft_rows_report"].startswith("150 rows:") and row["budgeted_questions"] == 150


def load_bench_module(name: str):
    "A bench/ script as a module (bench/ on the path, for its sibling imports)."
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_communication_bench_tells_the_schemes_apart():
    """On a small model over eight seq devices, the ring step's traffic is collective-permutes and the all-gather
    step's is all-gathers, each counted from the compiled program."""
    communication = load_bench_module("communication")
    from jora.model import LlamaConfig
    small = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    ring, gathered = (communication.measure(small, scheme, 8192) for scheme in ("ring", "all_gather"))
    assert ring["collective-permute GB"] > 10 * ring.get("all-gather GB", 0), ring
    assert gathered["all-gather GB"] > 10 * gathered.get("collective-permute GB", 0), gathered
    assert ring["memory GB"] > 0 and gathered["memory GB"] > 0


def test_longest_sequence_bench_chooses_its_rows_and_keeps_each_once():
    "Rows are filtered by the flags; a row measured again replaces the old one (by its key)."
    longest = load_bench_module("longest_sequence")
    arguments = longest.argparse.Namespace(devices=[8], remat=["full"], scheme=["ring"], model=["Llama-3.1-8B"])
    rows = [row for row, _, _ in longest.rows_to_measure(arguments)]
    assert rows == [dict(model="Llama-3.1-8B", devices=8, layout="context", scheme="ring", remat="full"),
                    dict(model="Llama-3.1-8B", devices=8, layout="context x tensor", scheme="ring", remat="full")]
    everything = longest.argparse.Namespace(devices=None, remat=None, scheme=None, model=None)
    keys = [tuple(row.values()) for row, _, _ in longest.rows_to_measure(everything)]
    assert len(keys) == len(set(keys)) == 4 * (1 + 3 + 5 + 5 + 1 + 5)


def test_retained_memory_applies_the_same_glibc_settings_to_both_frameworks(monkeypatch, tmp_path):
    "`--retained-memory` sets glibc's settings in every measured process, whichever framework, and writes its own file."
    bench = load_bench()
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "0")     # set in the shell: the default run must not inherit it
    for suite in bench.SUITES.values():
        plain, kept = bench.case_environment(suite), bench.case_environment(suite, retained_memory=True)
        assert not set(bench.RETAINED_MEMORY) & set(plain)
        assert {name: kept[name] for name in bench.RETAINED_MEMORY} == bench.RETAINED_MEMORY
        assert {name: value for name, value in kept.items() if name not in bench.RETAINED_MEMORY} == plain
    seen = []
    fake = {"median_step_seconds": 1.0, "peak_rss_bytes": 1, "first_loss": 1.0, "peak_device_bytes": None,
            "device": "cpu: cpu", "tokens_per_second": 1.0}
    monkeypatch.setattr(bench, "run_case", lambda name, *arguments: seen.append((name, arguments[-1])) or dict(fake))
    monkeypatch.setattr(bench, "model_folder", lambda *arguments: tmp_path)
    bench.main(["smoke", "--results", str(tmp_path), "--retained-memory", "--repeats", "1"])
    assert sorted(seen) == [("hf", True), ("jora", True)]
    written = json.loads((tmp_path / "smoke-retained-memory.json").read_text())
    assert written["environment"] == bench.RETAINED_MEMORY and not (tmp_path / "smoke.json").exists()


def test_only_the_gpu_suite_reads_compiled_steps_from_a_cache(monkeypatch):
    """A CPU run compiles its step in every process (its compile time and peak RSS are a fresh process's, even with a
    cache set in the shell); the GPU suite reads the step from the persistent cache, so a short lease compiles it once."""
    bench = load_bench()
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/somewhere/else")
    assert "JAX_COMPILATION_CACHE_DIR" not in bench.case_environment(bench.SUITES["cpu"])
    assert "JAX_COMPILATION_CACHE_DIR" not in bench.case_environment(bench.SUITES["smoke"])
    gpu = bench.case_environment(bench.SUITES["gpu"])
    assert gpu["JAX_COMPILATION_CACHE_DIR"] == str(bench.BUILD / "jax-compilation-cache")
    assert gpu["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.95"


def test_retained_memory_effect_gives_each_frameworks_range_of_time_changes():
    "The caption's figures: each framework's retained / default median step time, smallest to largest, per case."
    report = load_bench_module("report")
    row = lambda remat, jora, hf: {"remat": remat, "prompt": 512, "answer": 0, "jora_step_seconds": {"median": jora},
                                   "hf_step_seconds": {"median": hf}}
    default = {"rows": [row("none", 1.0, 2.0), row("full", 2.0, 4.0)]}
    retained = {"rows": [row("none", 1.1, 1.0), row("full", 1.8, 4.4)]}
    assert report.retained_memory_effect(default, retained) == "jora's x0.90 to x1.10, transformers + peft's x0.50 to x1.10"


def test_matmul_bench_counts_flops_and_times_both_libraries(tmp_path):
    "Each product's FLOPs are 2 x every index's size; one quick round writes a row per product for both libraries."
    matmul = load_bench_module("matmul")
    assert matmul.product_flops("hqd,hkd->hqk", (8, 64, 64), (8, 512, 64)) == 2 * 8 * 64 * 512 * 64
    assert matmul.product_flops("mv,dv->md", (256, 32000), (512, 32000)) == 2 * 256 * 32000 * 512
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "matmul.py"), "--repeats", "1", "--rounds", "1",
                           "--results", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "matmul.json").read_text())
    assert [row["product"] for row in results["rows"]] == list(matmul.PRODUCTS)
    assert all(row["xla_gflops"] > 0 and row["torch_gflops"] > 0 for row in results["rows"])


def test_front_page_shows_the_cpu_suite_of_another_machine_with_its_products(tmp_path):
    "A subfolder with its own cpu.json (and matmul.json) gets its own tables on the front page; others are ignored."
    report = load_bench_module("report")
    (tmp_path / "xeon").mkdir()
    for name in ("cpu.json", "matmul.json"):
        (tmp_path / "xeon" / name).write_text((ROOT / "bench" / "results" / "intel-xeon" / name).read_text())
    (tmp_path / "empty").mkdir()
    assert report.other_machines(tmp_path) == [tmp_path / "xeon"]
    text = report.front_page_markdown(tmp_path)
    assert "The same CPU suite on another machine" in text and "attention p^T.q, tile 64 x 512" in text
    options = {(row["jora"]["options"]["logits_chunk"], row["jora"]["options"]["attention_block"])
               for row in json.loads((tmp_path / "xeon" / "cpu.json").read_text())["rows"]}
    assert all(f"LM head in chunks of {chunk}, attention blocks of at most {block}" in text for chunk, block in options)
