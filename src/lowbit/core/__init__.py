"""Quantization core: the one numerical truth (pure torch)."""
