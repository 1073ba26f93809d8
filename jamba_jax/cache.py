"""Shapes of the decode cache: K/V for attention layers, conv and ssm state for Mamba layers."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .config import JambaConfig


def cache_shapes(config: JambaConfig, batch: int, max_len: int, dtype=jnp.bfloat16) -> dict:
    """Abstract cache arrays (``jax.ShapeDtypeStruct``), layers stacked on the leading axis:

    - ``key``, ``value``: ``[attention_layers, batch, max_len, kv_heads, head_dim]`` in ``dtype``
    - ``conv``: ``[mamba_layers, batch, d_conv - 1, d_inner]`` in ``dtype`` (the last pre-conv inputs)
    - ``ssm``: ``[mamba_layers, batch, d_inner, d_state]`` in float32 (bf16 state degrades output)
    """
    n_attn, n_mamba = config.num_attention_layers, config.num_mamba_layers
    kv = jax.ShapeDtypeStruct((n_attn, batch, max_len, config.num_key_value_heads, config.head_dim), dtype)
    return {
        "key": kv,
        "value": kv,
        "conv": jax.ShapeDtypeStruct((n_mamba, batch, config.mamba_d_conv - 1, config.d_inner), dtype),
        "ssm": jax.ShapeDtypeStruct((n_mamba, batch, config.d_inner, config.mamba_d_state), jnp.float32),
    }
