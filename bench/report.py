"""Tables and the plot made from bench/results/*.json (used by bench/results.ipynb and the front page).

Every figure shown comes from a results file written by bench/run.py or the sharding chapter; nothing is typed in by
hand except the published reference figures, which are labelled with their source.
"""
import json
from pathlib import Path

import pandas as pd

RESULTS = Path(__file__).resolve().parent / "results"
PAPER_TABLE_1_GB = {1: 23.1, 2: 16.1, 4: 11.4}
PUBLISHED_LONGEST = {"Unsloth, Llama-3.1-8B QLoRA, activations offloaded": 342733,
                     "Hugging Face + FlashAttention-2, Llama-3.1-8B": 28454}


def load(name: str, folder: Path = RESULTS) -> dict | None:
    "The results file `name`.json, or None when that suite has not been run."
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def step_table(results: dict) -> pd.DataFrame:
    "One row per case: jora and transformers+peft side by side, with their ratios."
    rows = []
    for row in results["rows"]:
        jora, hf = row["jora"], row["hf"]
        rows.append({
            "remat": row["remat"], "tokens": f"{row['prompt']} + {row['answer']}" if row["answer"] else str(row["prompt"]),
            "jora s/step": jora["median_step_seconds"], "HF s/step": hf["median_step_seconds"],
            "time ratio": row["time_ratio"], "runs": row.get("paired_runs", "-"),
            "ratio range": (f"{row['time_ratio_runs']['min']:.2f}-{row['time_ratio_runs']['max']:.2f}"
                            if "time_ratio_runs" in row else "-"),
            "jora tok/s": jora["tokens_per_second"], "HF tok/s": hf["tokens_per_second"],
            "jora compile s": jora["compile_seconds"], "jora peak RSS GB": jora["peak_rss_bytes"] / 1e9,
            "HF peak RSS GB": hf["peak_rss_bytes"] / 1e9, "RSS ratio": row["rss_ratio"],
            **({"jora peak GPU GB": jora["peak_device_bytes"] / 1e9, "HF peak GPU GB": hf["peak_device_bytes"] / 1e9,
                "GPU memory ratio": row["device_memory_ratio"]} if "device_memory_ratio" in row else {}),
            **({"jora MFU": row["mfu"]["jora"], "HF MFU": row["mfu"]["hf"]} if "mfu" in row else {}),
            **({"jora system s/step": jora["system_seconds_per_step"], "HF system s/step": hf["system_seconds_per_step"],
                "jora page faults/step": round(jora["page_faults_per_step"]),
                "HF page faults/step": round(hf["page_faults_per_step"])}
               if "page_faults_per_step" in jora and "page_faults_per_step" in hf else {}),
            **({"target": f"time ratio <= {row['time_target']}, RSS ratio <= 1",
                "met": f"time {'yes' if row['time_target_met'] else 'no'}, RSS {'yes' if row['rss_target_met'] else 'no'}"}
               if "time_target" in row else {}),
        })
    return pd.DataFrame(rows)


CPU_USE_COLUMNS = ["remat", "tokens", "jora s/step", "HF s/step", "time ratio", "runs", "ratio range",
                   "jora system s/step", "HF system s/step", "jora page faults/step", "HF page faults/step"]


def retained_memory_table(default: dict, retained: dict) -> pd.DataFrame:
    """The cases measured with CPU use, from the default run and from the `--retained-memory` run, each case's two rows
    side by side: step times and ratio, and per step the system CPU seconds and minor page faults."""
    both = pd.concat([step_table(results).assign(glibc=glibc)[["glibc", *CPU_USE_COLUMNS]]
                      for results, glibc in ((default, "default"), (retained, "freed memory kept"))])
    both = both.dropna(subset=["jora page faults/step"]).astype({"jora page faults/step": int, "HF page faults/step": int})
    both = both.assign(remat_order=both["remat"].map({"none": 0, "full": 1}),
                       prompt=both["tokens"].map(lambda text: int(text.split(" + ")[0])))
    both = both.sort_values(["remat_order", "prompt"], kind="stable").drop(columns=["remat_order", "prompt"])
    return both.reset_index(drop=True)


def retained_memory_effect(default: dict, retained: dict) -> str:
    """How much keeping freed memory mapped changed each framework's median step time, over the cases both runs hold:
    the range of `retained / default` (above 1: slower)."""
    key = lambda row: (row["remat"], row["prompt"], row["answer"])
    before = {key(row): row for row in default["rows"]}
    parts = []
    for name, label in (("jora", "jora's"), ("hf", "transformers + peft's")):
        changes = [row[f"{name}_step_seconds"]["median"] / before[key(row)][f"{name}_step_seconds"]["median"]
                   for row in retained["rows"] if key(row) in before]
        parts.append(f"{label} x{min(changes):.2f} to x{max(changes):.2f}")
    return ", ".join(parts)


def memory_table(results: dict) -> pd.DataFrame:
    "Per-device GB of the 7B LoRA step for 1/2/4/8 devices beside the paper's Table 1."
    table = pd.DataFrame([{"devices": row["devices"], "jora GB per device": row["total_bytes"] / 1e9,
                           "jora ratio": row["ratio"], "paper GB per GPU": row["paper_gb"]} for row in results["rows"]])
    table["paper ratio"] = table["paper GB per GPU"] / PAPER_TABLE_1_GB[1]
    return table.set_index("devices")


def longest_table(results: dict) -> pd.DataFrame:
    "Longest trainable sequence per model, device count, layout, context-parallel scheme and remat policy."
    rows = pd.DataFrame(results["rows"])
    table = rows.pivot_table(index=["model", "devices", "layout", "context parallel"], columns="remat",
                             values="longest tokens", sort=False)
    return table[[remat for remat in ("none", "projections", "full", "nested") if remat in table]].astype("Int64")


def longest_plot(results: dict):
    """Longest trainable sequence against devices with full remat, a line per layout and context-parallel scheme, and
    with nested remat for the ring scheme (dotted)."""
    from matplotlib.figure import Figure
    every = pd.DataFrame(results["rows"])
    rows = every.query("remat == 'full'")
    figure = Figure(figsize=(9, 3.4), dpi=100)
    for axis, model in zip(figure.subplots(1, 2, sharey=True), ("Llama-2-7B", "Llama-3.1-8B")):
        for (layout, scheme), line in rows.query("model == @model").groupby(["layout", "context parallel"], sort=False):
            if layout == "one device":
                continue
            one = rows.query("model == @model and layout == 'one device'")
            line = pd.concat([one, line]).sort_values("devices")
            label = layout if scheme == "-" else f"{layout}, {scheme.replace('_', '-')}"
            axis.plot(line["devices"], line["longest tokens"] / 1e3, "o-" if scheme == "ring" else "s--", label=label)
            if scheme == "ring":
                nested = every[(every["model"] == model) & (every["remat"] == "nested") & (
                    ((every["layout"] == layout) & (every["context parallel"] == "ring"))
                    | (every["layout"] == "one device"))]
                if len(nested) > 1:
                    nested = nested.sort_values("devices")
                    axis.plot(nested["devices"], nested["longest tokens"] / 1e3, "^:", label=f"{label}, nested remat")
        axis.axhline(1000, color="grey", linewidth=0.8, linestyle=":")  # a million tokens
        axis.set(xlabel="devices", xscale="log", xticks=[1, 2, 4, 8], xticklabels=["1", "2", "4", "8"],
                 title=f"{model}, {results['budget GB']:.0f} GB per device")
        axis.minorticks_off()
        axis.set_ylabel("longest sequence (thousand tokens)")
        axis.legend(fontsize=7)
    figure.tight_layout()
    return figure


def communication_table(results: dict) -> pd.DataFrame:
    "GB one device receives per step, and the step's memory, for each scheme, per model and length."
    rows = pd.DataFrame(results["rows"])
    table = rows.pivot_table(index=["model", "tokens"], columns="context parallel",
                             values=["GB received per device", "memory GB"], sort=False)
    table.columns = [f"{scheme.replace('_', '-')}: {'GB received' if value.startswith('GB') else 'memory GB'}"
                     for value, scheme in table.columns]
    return table


def plot(cpu: dict | None, memory: dict | None):
    "CPU step time of both frameworks per case, and per-device memory against devices beside the paper."
    import matplotlib.pyplot as plt
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    if cpu is not None:
        table = step_table(cpu)
        labels = [f"{t}\nremat {r}" for t, r in zip(table["tokens"], table["remat"])]
        positions = range(len(table))
        left.bar([p - 0.2 for p in positions], table["jora s/step"], 0.4, label="jora")
        left.bar([p + 0.2 for p in positions], table["HF s/step"], 0.4, label="transformers + peft")
        left.set(xticks=list(positions), ylabel="median seconds per step",
                 title=f"CPU LoRA step ({cpu['machine']['cpu_count']} cores, {cpu['date']})")
        left.set_xticklabels(labels, fontsize=8)
        left.legend(loc="upper left")
    if memory is not None:
        table = memory_table(memory)
        right.plot(table.index, table["jora GB per device"], "o-", label="jora (compiled, bf16, per device)")
        paper = table["paper GB per GPU"].dropna()
        right.plot(paper.index, paper, "s--", label="JORA paper, Table 1")
        right.set(xlabel="devices (model axis)", ylabel="GB per device", xticks=list(table.index),
                  title="Llama-2-7B LoRA step, 512 tokens")
        right.legend()
    figure.tight_layout()
    return figure


def matmul_table(results: dict) -> pd.DataFrame:
    "One row per product of `bench/matmul.py`: XLA's and torch's GFLOP/s on the same shapes, and their ratio."
    return pd.DataFrame([{"product": row["product"], "XLA GFLOP/s": row["xla_gflops"],
                          "torch GFLOP/s": row["torch_gflops"], "XLA / torch": row["xla_over_torch"],
                          "range": f"{row['xla_over_torch_runs']['min']:.2f}-{row['xla_over_torch_runs']['max']:.2f}"}
                         for row in results["rows"]])


def other_machines(folder: Path = RESULTS) -> list[Path]:
    "The subfolders of `folder` holding the CPU suite measured on another machine (`bench/run.py cpu --results ...`)."
    return sorted(path for path in folder.iterdir() if (path / "cpu.json").exists())


def other_machine_markdown(folder: Path) -> str:
    "The CPU suite as measured on another machine, with that machine's matrix-product speeds when measured."
    cpu, matmul = load("cpu", folder), load("matmul", folder)
    machine = cpu["machine"]
    table = step_table(cpu)[["remat", "tokens", "jora s/step", "HF s/step", "time ratio", "ratio range", "runs", "met"]]
    text = (f"**The same CPU suite on another machine** ({cpu['date']}, {machine['cpu']}, "
            f"{machine['cpu_count']} cores; {commands(cpu)}; the same model and pairing as above, jora with "
            f"{jora_options(cpu)}):\n\n"
            + table.to_markdown(index=False, floatfmt=".3g"))
    if matmul is not None:
        flags = ", ".join(matmul["machine"].get("cpu_flags", [])) or "not reported"
        text += (f"\n\n**How fast each library multiplies the step's shapes on that machine**, products being most "
                 f"of both steps ({matmul['date']}, "
                 f"`{matmul['command']}`; CPU flags: {flags}; fp32, each the median of {matmul['rounds']} rounds of "
                 f"{matmul['repeats']} calls, the libraries alternating; XLA is what jora's step runs, torch what "
                 f"transformers+peft's runs):\n\n"
                 + matmul_table(matmul).to_markdown(index=False, floatfmt=".3g"))
    return text


def jora_options(results: dict) -> str:
    "The LM-head chunk and attention block jora's rows of a CPU suite ran with, as a phrase."
    options = {(row["jora"]["options"]["logits_chunk"], row["jora"]["options"]["attention_block"])
               for row in results["rows"]}
    return "; ".join(f"LM head in chunks of {chunk}, attention blocks of at most {block}"
                     for chunk, block in sorted(options))


def commands(results: dict) -> str:
    "The commands that wrote a results file's rows, each once, as inline code."
    return ", ".join(f"`{command}`" for command in dict.fromkeys(row.get("command", results["command"])
                                                                    for row in results["rows"]))


def compiled_how(results: dict) -> str:
    "Where a results file's runs took jora's compiled step from: a fresh compile, or the cache it names."
    if results.get("compilation_cache"):
        return f"jora's step read from the compilation cache in `{results['compilation_cache']}` once compiled"
    return ("in a fresh process that compiles jora's step (no compilation cache: the compile time is a real "
            "compile's and jora's peak RSS includes the compiler's)")


def front_page_markdown(folder: Path = RESULTS) -> str:
    "The results section of the front page: the tables with their date, machine and command."
    parts = []
    cpu, memory, longest, gpu = (load(name, folder) for name in ("cpu", "memory", "longest_sequence", "gpu"))
    if cpu is not None:
        table = step_table(cpu)[["remat", "tokens", "jora s/step", "HF s/step", "time ratio", "ratio range", "runs",
                                  "jora tok/s",
                                  "HF tok/s",
                                  "jora compile s", "jora peak RSS GB", "HF peak RSS GB", "target", "met"]]
        machine = cpu["machine"]
        parts.append(f"**CPU step, jora vs transformers {machine['transformers']} + peft {machine['peft']}** "
                     f"({cpu['date']}, {machine['cpu']}, {machine['cpu_count']} cores; "
                     f"{commands(cpu)}; "
                     f"{cpu['model_shape']['num_hidden_layers']} layers, hidden {cpu['model_shape']['hidden_size']}, "
                     f"vocabulary {cpu['model_shape']['vocab_size']}, {cpu['dtype']}, {cpu['lora']}, batch 1, "
                     f"`runs` paired runs per case, the frameworks alternating; each run is "
                     f"the median of {cpu['timed_steps']} steps after {cpu['warmup_steps']} warm-up, "
                     f"{compiled_how(cpu)}; the table shows "
                     f"the median run and the range of the paired runs' ratios):\n\n"
                     + table.to_markdown(index=False, floatfmt=".3g"))
    retained = load("cpu-retained-memory", folder)
    if cpu is not None and retained is not None:
        settings = " ".join(f"{name}={value}" for name, value in retained["environment"].items())
        parts.append(f"**Where the CPU step's system time goes** ({retained['date']}; the runs of the table above, "
                     f"and the same cases with both frameworks under glibc's `{settings}`: {commands(retained)}). Both frameworks map the step's scratch memory afresh every step and the "
                     f"kernel faults it in page by page; with freed memory kept mapped most of the faults go, and the "
                     f"median step times change by {retained_memory_effect(cpu, retained)} (above 1: slower). This is a "
                     f"setting for any CPU process, not a jora change, so the time target above is judged without it:\n\n"
                     + retained_memory_table(cpu, retained).to_markdown(index=False, floatfmt=".3g"))
    parts.extend(other_machine_markdown(machine_folder) for machine_folder in other_machines(folder))
    if memory is not None:
        parts.append(f"**Per-device memory, Llama-2-7B LoRA step** ({memory['date']}, `{memory['command']}`; "
                     f"{memory['what']}):\n\n" + memory_table(memory).to_markdown(floatfmt=".3g"))
    if longest is not None:
        published = "; ".join(f"{name}: {tokens:,}" for name, tokens in PUBLISHED_LONGEST.items())
        parts.append(f"**Longest trainable sequence at 80 GB per device** ({longest['date']}, lowering only the step "
                     f"`train_lora` compiles, on XLA:CPU as a GPU would hold it (random bits drawn as a GPU lowering draws "
                     f"them, no hoisted fp32 weight copies), `python bench/longest_sequence.py`, explained in "
                     f"`nbs/01_sharding.ipynb`; bf16, LoRA q,v r=16 with dropout 0.05, LM head "
                     f"chunks of {longest['options']['logits_chunk']} and attention blocks of "
                     f"{longest['options']['attention_block']}, the training defaults otherwise; `nested` is the "
                     f"remat policy that scans the layers in rematerialised groups, for one more forward pass; "
                     f"published for comparison, one 80 GB GPU: {published}):\n\n"
                     + longest_table(longest).reset_index().to_markdown(index=False)
                     + ("\n\n![Longest trainable sequence against devices, full remat: each layout and context-parallel "
                        "scheme, and nested remat for the ring scheme.](bench/results/longest_sequence.png)" if (folder / "longest_sequence.png").exists()
                        else ""))
    communication = load("communication", folder)
    if communication is not None:
        parts.append(f"**What each context-parallel scheme sends per step** ({communication['date']}, "
                     f"`python bench/communication.py`; {communication['step']}, {communication['mesh']}; GB one "
                     f"device receives per step, from the compiled program's collectives, and its memory):\n\n"
                     + communication_table(communication).reset_index().to_markdown(index=False, floatfmt=".4g"))
    if gpu is not None:
        parts.append(f"**GPU step, Llama-2-7B shape** ({gpu['date']}, {gpu['rows'][0]['jora']['device']}; "
                     f"`{gpu['command']}`; paper, one GPU: {gpu['paper_one_gpu']['step_seconds']} s, "
                     f"{gpu['paper_one_gpu']['memory_gb']} GB):\n\n"
                     + step_table(gpu).to_markdown(index=False, floatfmt=".3g"))
    else:
        parts.append("**GPU**: not measured yet, because no GPU was lent to this project's sessions so far. "
                     "`bench/run.py gpu` fits a short lease, one case per command (Llama-2-7B shape, random bf16 "
                     "weights written once into `build/`, batch 1, MFU with causal attention FLOPs as defined in "
                     "`bench/run.py`); its docstring lists the commands that measure 512, 4096 and 16384 tokens for "
                     "both frameworks in under 25 minutes of device time.")
    return "\n\n".join(parts)
