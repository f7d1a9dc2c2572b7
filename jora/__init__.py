"""JAX tensor-parallel LoRA fine-tuning of Llama-family models for retrieval-augmented data

Modules:

- `jora.attention`: Masks built a block at a time, flash attention written in XLA with causal block skipping, and the fused GPU kernels (cuDNN, Pallas), chosen per platform when the step is lowered."""

__version__ = "0.1.0"
