"""Loaders (GGUF, Hugging Face checkpoints), tokenizers and the model registry."""
