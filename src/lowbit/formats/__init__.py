"""Quantized tensor formats and their user-facing configs."""
