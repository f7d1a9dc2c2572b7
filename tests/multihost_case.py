"The run both sides of the two-process test train: a tiny model, RAFT records, a 2 x 2 data x model mesh."
import json
from pathlib import Path

from jora.config import ParallamaConfig
from jora.data import AlpacaDataset, format_prompt
from jora.testing import demo_raft_records, save_tiny_hf_checkpoint


def write_case(folder: Path) -> None:
    "The model and the data, written once by the test (both processes read them)."
    (folder / "raft.jsonl").write_text("\n".join(json.dumps(r) for r in demo_raft_records(40, seed=1)))
    corpus = [format_prompt(r) + r["output"] for r in demo_raft_records(200)]
    save_tiny_hf_checkpoint(folder / "tiny", "llama3.1", corpus=corpus)


def case_config(folder) -> ParallamaConfig:
    return ParallamaConfig(LLAMA2_HF_PATH=f"{folder}/tiny", LORA_R=4, LORA_ALPHA=8,
                           LORA_TARGETS=("q_proj", "v_proj", "o_proj"), LORA_DROPOUT=0.1, LR=5e-3, BATCH_SIZE=4,
                           N_ACCUMULATION_STEPS=2, MAX_SEQ_LEN=160, N_EPOCHS=1, MAX_STEPS=4, SEED=0, DTYPE="float32",
                           REMAT="none", WARMUP_STEPS=2, EVAL_EVERY=2, EVAL_BATCHES=2, CHECKPOINT_EVERY=2,
                           NUM_GPUS=4, MESH_DATA=2, MESH_MODEL=2)


def case_datasets(folder, config):
    train = AlpacaDataset(path=f"{folder}/raft.jsonl", split="train", tokenizer=config.LLAMA2_HF_PATH,
                          max_len=config.MAX_SEQ_LEN, alpaca_mix=0)
    test = AlpacaDataset(path=f"{folder}/raft.jsonl", split="test", tokenizer=config.LLAMA2_HF_PATH,
                         max_len=config.MAX_SEQ_LEN)
    return train, test
