"""The decode cache: K/V buffers for attention layers, conv and ssm state for Mamba layers, described by
one table (``CACHE_TABLE``) from which the arrays, their shapes, their shardings and their byte counts
all derive.

A plain pytree laid out like the params (``blocks/layer_{j}`` stacked over the scanned blocks,
``tail/layer_{j}`` for the remainder):

- ``pos``: int32 scalar, the number of filled slots (the same for every row: batches are left-padded)
- ``valid``: ``[batch, max_len]`` bool, True where a slot holds a real (non-pad) token
- attention layer: ``key``, ``value`` ``[(blocks,) batch, kv_heads, max_len, head_dim]`` in ``dtype``
- Mamba layer: ``conv`` ``[(blocks,) batch, d_conv - 1, d_inner]`` in ``dtype`` (the last pre-conv
  inputs) and ``ssm`` ``[(blocks,) batch, d_inner, d_state]`` in float32 (bf16 state degrades output)

The public constructor over a loaded model is ``jamba_jax.init_cache`` (``steps.init_cache``); this module
works from a config.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import traverse_util

from .config import ATTENTION, MAMBA, JambaConfig

KV_CACHE, MAMBA_STATE, BOOKKEEPING = "kv_cache", "mamba_state", "bookkeeping"


@dataclasses.dataclass(frozen=True)
class CacheEntry:
    """One cache array: its leaf name, the layers that hold it (``mixer``: ``"attention"``, ``"mamba"``, or
    None for the two top-level arrays), what it counts as (``kind``), its shape and logical axes (without
    the stacked-block axis), and its dtype (None: the model's dtype)."""

    name: str
    mixer: str | None
    kind: str
    shape: Callable[[JambaConfig, int, int], tuple[int, ...]]  # (config, batch, max_len) -> shape
    axes: tuple[str | None, ...]
    dtype: jnp.dtype | None = None


def _kv_shape(c: JambaConfig, batch: int, max_len: int) -> tuple[int, ...]:
    return (batch, c.num_key_value_heads, max_len, c.head_dim)


CACHE_TABLE: tuple[CacheEntry, ...] = (
    CacheEntry("pos", None, BOOKKEEPING, lambda c, b, t: (), (), jnp.int32),
    CacheEntry("valid", None, BOOKKEEPING, lambda c, b, t: (b, t), ("batch", "seq"), jnp.bool_),
    CacheEntry("key", ATTENTION, KV_CACHE, _kv_shape, ("batch", "kv_heads", "seq", "head_dim")),
    CacheEntry("value", ATTENTION, KV_CACHE, _kv_shape, ("batch", "kv_heads", "seq", "head_dim")),
    CacheEntry("conv", MAMBA, MAMBA_STATE, lambda c, b, t: (b, c.mamba_d_conv - 1, c.d_inner),
               ("batch", "d_conv", "d_inner")),
    CacheEntry("ssm", MAMBA, MAMBA_STATE, lambda c, b, t: (b, c.d_inner, c.mamba_d_state),
               ("batch", "d_inner", "d_state"), jnp.float32),
)
_BY_NAME = {e.name: e for e in CACHE_TABLE}


def cache_entry(path) -> CacheEntry:
    """The table row of the cache leaf at ``path`` (a tuple of keys, or a JAX key path); an error for a
    leaf the table does not describe."""
    name = path[-1] if isinstance(path[-1], str) else path[-1].key
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"cache leaf {name!r} has no row in cache.CACHE_TABLE") from None


def cache_leaves(config: JambaConfig, batch: int, max_len: int, dtype=jnp.bfloat16) -> dict[tuple, tuple]:
    """``{path: (row, shape, dtype)}`` of every cache leaf, from the table (nothing traced or allocated):
    the two top-level arrays, then each layer position of the scanned blocks (stacked), then the tail."""
    leaves = {(e.name,): (e, e.shape(config, batch, max_len), e.dtype) for e in CACHE_TABLE if e.mixer is None}
    layers = [(("blocks", f"layer_{j}"), (config.num_blocks,)) for j in range(config.block_size) if config.num_blocks]
    layers += [(("tail", f"layer_{j}"), ()) for j in range(config.num_tail_layers)]
    for prefix, lead in layers:
        mixer = config.mixer_type(int(prefix[1].removeprefix("layer_")))
        for e in CACHE_TABLE:
            if e.mixer == mixer:
                leaves[prefix + (e.name,)] = (e, lead + e.shape(config, batch, max_len), e.dtype or dtype)
    return leaves


def init_cache_arrays(config: JambaConfig, batch: int, max_len: int, dtype=jnp.bfloat16) -> dict:
    """An empty cache for ``batch`` sequences of up to ``max_len`` tokens (on the default device). One
    buffer per entry, never shared: every one is donated."""
    return traverse_util.unflatten_dict({path: jnp.zeros(shape, kind) for path, (_, shape, kind)
                                         in cache_leaves(config, batch, max_len, dtype).items()})


def cache_shapes(config: JambaConfig, batch: int, max_len: int, dtype=jnp.bfloat16) -> dict:
    """``init_cache_arrays``'s pytree as ``jax.ShapeDtypeStruct`` leaves, allocating nothing."""
    return traverse_util.unflatten_dict({path: jax.ShapeDtypeStruct(shape, kind) for path, (_, shape, kind)
                                         in cache_leaves(config, batch, max_len, dtype).items()})


def cache_logical_axes(path, ndim: int) -> tuple[str | None, ...]:
    """Logical axes of the cache leaf at ``path`` with ``ndim`` dimensions (a stacked leaf's leading block
    axis is ``"layers"``)."""
    axes = cache_entry(path).axes
    return ("layers",) * (ndim - len(axes)) + axes


def split_by_mixer(config: JambaConfig, entries: dict | None):
    """A ``blocks`` or ``tail`` cache as (attention layers' entries, Mamba layers' entries), by the layer
    plan; (None, None) without a cache."""
    if entries is None:
        return None, None
    attention = {n: e for n, e in entries.items() if config.mixer_type(int(n.removeprefix("layer_"))) == ATTENTION}
    return attention, {n: e for n, e in entries.items() if n not in attention}


def cache_bytes(config: JambaConfig, batch: int, max_len: int, dtype=jnp.bfloat16) -> dict[str, int]:
    """Bytes of the K/V buffers (``kv_cache_bytes``) and of the Mamba state (``mamba_state_bytes``)."""
    totals = {f"{KV_CACHE}_bytes": 0, f"{MAMBA_STATE}_bytes": 0}
    for entry, shape, kind in cache_leaves(config, batch, max_len, dtype).values():
        if entry.kind != BOOKKEEPING:
            totals[f"{entry.kind}_bytes"] += math.prod(shape) * jnp.dtype(kind).itemsize
    return totals
