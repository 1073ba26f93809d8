"""The decode cache: K/V buffers for attention layers, conv and ssm state for Mamba layers.

A plain pytree laid out like the params (``blocks/layer_{j}`` stacked over the scanned blocks,
``tail/layer_{j}`` for the remainder):

- ``pos``: int32 scalar, the number of filled slots (the same for every row: batches are left-padded)
- ``valid``: ``[batch, max_len]`` bool, True where a slot holds a real (non-pad) token
- attention layer: ``key``, ``value`` ``[(blocks,) batch, kv_heads, max_len, head_dim]`` in ``dtype``
- Mamba layer: ``conv`` ``[(blocks,) batch, d_conv - 1, d_inner]`` in ``dtype`` (the last pre-conv
  inputs) and ``ssm`` ``[(blocks,) batch, d_inner, d_state]`` in float32 (bf16 state degrades output)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .config import ATTENTION, JambaConfig


def _layer_cache(config: JambaConfig, mixer: str, lead: tuple[int, ...], batch: int, max_len: int, dtype):
    if mixer == ATTENTION:
        shape = (*lead, batch, config.num_key_value_heads, max_len, config.head_dim)
        return {"key": jnp.zeros(shape, dtype), "value": jnp.zeros(shape, dtype)}  # two buffers: both are donated
    return {"conv": jnp.zeros((*lead, batch, config.mamba_d_conv - 1, config.d_inner), dtype),
            "ssm": jnp.zeros((*lead, batch, config.d_inner, config.mamba_d_state), jnp.float32)}


def init_cache(config: JambaConfig, batch: int, max_len: int, dtype=jnp.bfloat16) -> dict:
    """An empty cache for ``batch`` sequences of up to ``max_len`` tokens."""
    cache = {"pos": jnp.zeros((), jnp.int32), "valid": jnp.zeros((batch, max_len), bool)}
    if config.num_blocks:
        cache["blocks"] = {f"layer_{j}": _layer_cache(config, config.mixer_type(j), (config.num_blocks,),
                                                      batch, max_len, dtype)
                           for j in range(config.block_size)}
    if config.num_tail_layers:
        cache["tail"] = {f"layer_{j}": _layer_cache(config, config.mixer_type(j), (), batch, max_len, dtype)
                         for j in range(config.num_tail_layers)}
    return cache


def cache_shapes(config: JambaConfig, batch: int, max_len: int, dtype=jnp.bfloat16) -> dict:
    """``init_cache``'s pytree as ``jax.ShapeDtypeStruct`` leaves, allocating nothing."""
    return jax.eval_shape(lambda: init_cache(config, batch, max_len, dtype))


def cache_bytes(config: JambaConfig, batch: int, max_len: int, dtype=jnp.bfloat16) -> dict[str, int]:
    """Bytes of the K/V buffers (``kv_cache_bytes``) and of the Mamba state (``mamba_state_bytes``)."""
    totals = {"kv_cache_bytes": 0, "mamba_state_bytes": 0}
    leaves = jax.tree_util.tree_flatten_with_path(cache_shapes(config, batch, max_len, dtype))[0]
    for path, a in leaves:
        name = path[-1].key
        if name in ("key", "value"):
            totals["kv_cache_bytes"] += a.size * a.dtype.itemsize
        elif name in ("conv", "ssm"):
            totals["mamba_state_bytes"] += a.size * a.dtype.itemsize
    return totals
