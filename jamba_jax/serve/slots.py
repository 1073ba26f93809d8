"""The compiled programs of the serving engine, over a slot cache: one ``jamba_jax.init_cache`` of
``slots`` rows and ``2 * span`` positions that every decode step advances together.

Jamba's attention has no positional encoding, so where a row's keys sit in the cache does not matter,
only which slots hold them (``valid``) and that they precede the write position ``pos``. The rows share
``pos`` (the cache table's one write position): every request's tokens end at ``pos``. A prompt is
prefilled into a one-row scratch cache and then copied into its row, shifted so that it ends at the
slot cache's ``pos``; when ``pos`` reaches the end of the cache, every row is moved back by ``span``
(``compact``), which holds all live tokens because no request is longer than ``span``. Every program has
fixed shapes: requests coming and going compile nothing.

Row snapshots (``take_row``) are one-row caches whose tokens end at position ``span``; they seed the
scratch cache when a new prompt extends a snapshot's tokens (prefix reuse).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ..cache import cache_logical_axes
from ..steps import ModelSpec, apply_step


def _axes(path, leaf) -> tuple[int | None, int | None]:
    """The (batch, seq) axis indices of a cache leaf (None where it has none)."""
    axes = cache_logical_axes(path, leaf.ndim)
    return (axes.index("batch") if "batch" in axes else None, axes.index("seq") if "seq" in axes else None)


def _shift(x, shift, axis: int):
    """``x`` rolled by ``shift`` (traced) along ``axis``: element ``i`` moves to ``(i + shift) % n``."""
    n = x.shape[axis]
    doubled = jnp.concatenate([x, x], axis=axis)
    return jax.lax.dynamic_slice_in_dim(doubled, (n - shift % n) % n, n, axis=axis)


def _moved_row(path, leaf, row, shift):
    """Row ``row`` of ``leaf`` (kept as a one-row axis), its seq axis rolled by ``shift``."""
    batch, seq = _axes(path, leaf)
    if batch is None:
        return leaf
    one = jax.lax.dynamic_slice_in_dim(leaf, row, 1, axis=batch)
    return one if seq is None else _shift(one, shift, seq)


@functools.partial(jax.jit, donate_argnames="cache")
def insert(cache: dict, scratch: dict, slot):
    """``cache`` with row ``slot`` replaced by ``scratch``'s one row (K/V, valid, conv and ssm state),
    shifted so that its tokens end at ``cache["pos"]``."""
    shift = cache["pos"] - scratch["pos"]

    def put(path, leaf, one):
        batch, _ = _axes(path, leaf)
        if batch is None:
            return leaf
        return jax.lax.dynamic_update_slice_in_dim(leaf, _moved_row(path, one, 0, shift).astype(leaf.dtype),
                                                   slot, axis=batch)

    return jax.tree_util.tree_map_with_path(put, cache, scratch)


@functools.partial(jax.jit, static_argnames="span")
def take_row(cache: dict, row, *, span: int) -> dict:
    """A one-row copy of ``cache``'s row ``row`` whose tokens end at position ``span``."""
    shift = span - cache["pos"]
    out = jax.tree_util.tree_map_with_path(lambda p, leaf: _moved_row(p, leaf, row, shift), cache)
    return {**out, "pos": jnp.asarray(span, jnp.int32)}


@functools.partial(jax.jit, donate_argnames="scratch")
def restore(scratch: dict, snapshot: dict) -> dict:
    """A copy of ``snapshot`` in place of ``scratch`` (whose buffers are reused)."""
    return jax.tree.map(lambda old, new: new.astype(old.dtype) + jnp.zeros_like(old), scratch, snapshot)


@functools.partial(jax.jit, donate_argnames="scratch")
def reset(scratch: dict, start) -> dict:
    """``scratch`` emptied (no valid slot, zero state), its write position at ``start``."""
    out = jax.tree.map(jnp.zeros_like, scratch)
    return {**out, "pos": jnp.asarray(start, jnp.int32)}


@functools.partial(jax.jit, static_argnames="span", donate_argnames="cache")
def compact(cache: dict, *, span: int) -> dict:
    """Every row moved back by ``span`` positions (the first ``span`` dropped, the last emptied) and ``pos``
    with them."""
    def move(path, leaf):
        _, seq = _axes(path, leaf)
        if seq is None or leaf.ndim == 0:
            return leaf
        kept = jax.lax.slice_in_dim(leaf, span, leaf.shape[seq], axis=seq)
        return jnp.concatenate([kept, jnp.zeros_like(kept)], axis=seq)

    out = jax.tree_util.tree_map_with_path(move, cache)
    return {**out, "pos": cache["pos"] - span}


def sample_rows(logits, keys, temperature, top_k, top_p):
    """Next tokens ``[rows]`` int32 from ``logits [rows, vocab]``, each row with its own settings:
    ``keys [rows]`` (typed PRNG keys), ``temperature [rows]`` f32 (0 = greedy), ``top_k [rows]`` int32
    (0 = off), ``top_p [rows]`` f32 (1 = off). Row by row the same choice as ``sampling.sample`` with that
    row's settings as static arguments (top-k, then top-p on what top-k kept, then one categorical draw)."""
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    vocab = logits.shape[-1]

    def one(key, row, t, k, p):
        row = row / jnp.where(t > 0, t, 1.0)
        kth = jnp.sort(row)[::-1][jnp.clip(k - 1, 0, vocab - 1)]
        row = jnp.where((k > 0) & (k < vocab) & (row < kth), -jnp.inf, row)
        ordered = jnp.sort(row)[::-1]
        probs = jax.nn.softmax(ordered)
        kept = jnp.cumsum(probs) - probs < p
        cutoff = jnp.min(jnp.where(kept, ordered, jnp.inf))
        row = jnp.where((p < 1.0) & (row < cutoff), -jnp.inf, row)
        return jax.random.categorical(key, row).astype(jnp.int32)

    def draw(_):  # two sorts of the vocabulary per row: skipped when every row is greedy
        return jnp.where(temperature > 0, jax.vmap(one)(keys, logits, temperature, top_k, top_p), greedy)

    return jax.lax.cond(jnp.any(temperature > 0), draw, lambda _: greedy, None)


def _split(key_data):
    keys = jax.vmap(lambda k: jax.random.split(jax.random.wrap_key_data(k)))(key_data)  # [rows, 2]
    return jax.random.key_data(keys[:, 0]), keys[:, 1]


@jax.jit
def first_token(logits, seeds, temperature, top_k, top_p):
    """The first new token of requests whose prompts gave ``logits [rows, vocab]``, drawn as ``generate``
    draws it from ``jax.random.key(seed)``: ``(tokens [rows], key data [rows, 2]`` left for decoding)."""
    key_data = jax.vmap(lambda s: jax.random.key_data(jax.random.key(s)))(seeds)
    key_data, sub = _split(key_data)
    return sample_rows(logits, sub, temperature, top_k, top_p), key_data


@functools.partial(jax.jit, static_argnames="spec", donate_argnames="cache")
def decode_and_sample(params, cache, tokens, active, key_data, temperature, top_k, top_p, *, spec: ModelSpec):
    """One decode step of every row (``tokens [rows]``; rows not ``active`` are masked out and leave their
    state untouched) and each row's next token: ``(tokens [rows], key data [rows, 2], cache)``."""
    key_data, sub = _split(key_data)
    logits, cache = apply_step(params, cache, tokens[:, None], active[:, None], spec=spec)
    return sample_rows(logits, sub, temperature, top_k, top_p), key_data, cache
