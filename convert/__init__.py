"""Checkpoint conversion: the HF key table and the HF safetensors reader (``jamba_jax.convert``)."""
