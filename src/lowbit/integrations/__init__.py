"""Integrations with other libraries (Hugging Face transformers: `lowbit.integrations.hf`).

Importing this package imports nothing heavy; transformers is imported on first use.
"""
