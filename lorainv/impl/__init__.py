"""The runtime: a compact, real multi-LoRA serving engine."""
