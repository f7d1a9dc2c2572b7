"""The losses of a short LoRA run on the tiny model (4 steps, LoRA dropout 0 and 0.05), to check that a change to the
training step leaves the numbers as they were. Run it on two commits and compare the printed lines:

    python tools/short_run_losses.py
    git worktree add /tmp/older REV && PYTHONPATH=/tmp/older python tools/short_run_losses.py

(The run writes only into a new temporary folder.)
"""
import json
import tempfile
from pathlib import Path

try:
    from jora.testing import demo_raft_records
except ImportError:                      # before the sample moved to jora.testing
    from jora.train import demo_raft_records
from jora.data import format_prompt, generate_alpaca_dataset
from jora.testing import save_tiny_hf_checkpoint
from jora.train import ParallamaConfig, train_lora


def main() -> None:
    folder = Path(tempfile.mkdtemp(prefix="jora-short-run-"))
    records = demo_raft_records(48, seed=1)
    (folder / "raft.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    save_tiny_hf_checkpoint(folder / "tiny", "llama3.1", corpus=[format_prompt(r) + r["output"] for r in records])
    for dropout in (0.0, 0.05):
        config = ParallamaConfig(LLAMA2_HF_PATH=str(folder / "tiny"), LORA_R=4, LORA_ALPHA=8, LORA_DROPOUT=dropout,
                                 DTYPE="float32", REMAT="none", BATCH_SIZE=4, N_ACCUMULATION_STEPS=2, MAX_SEQ_LEN=160,
                                 N_EPOCHS=1, LR=5e-3, WARMUP_STEPS=2, NUM_GPUS=1, MAX_STEPS=4)
        rows = generate_alpaca_dataset(folder / "raft.jsonl", "train", config)
        result = train_lora(config, rows, folder / f"run-{dropout}", progress=False)
        print(f"dropout {dropout}: {[round(record['loss'], 6) for record in result.history]}")


if __name__ == "__main__":
    main()
