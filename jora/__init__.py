"""JAX tensor-parallel LoRA fine-tuning of Llama-family models for retrieval-augmented data"""

__version__ = "0.1.0"

# The paper's entry points and the few names a user needs first, importable from the top level
# (`from jora import train_lora, ParallamaConfig, generate_alpaca_dataset`). Each is imported from its module when it
# is first used, so `import jora` itself loads neither JAX nor transformers.
_TOP_LEVEL = {
    "ParallamaConfig": "jora.config", "train_lora": "jora.train",
    "generate_alpaca_dataset": "jora.data", "AlpacaDataset": "jora.data",
    "LoraConfig": "jora.lora", "LlamaConfig": "jora.model", "load_hf_checkpoint": "jora.formats", "generate": "jora.model",
    "save_peft_adapter": "jora.formats", "merge_to_hf": "jora.export",
}
__all__ = ["__version__", *_TOP_LEVEL]


def __getattr__(name: str):
    if name not in _TOP_LEVEL:
        raise AttributeError(f"module 'jora' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(_TOP_LEVEL[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted({*globals(), *_TOP_LEVEL})
