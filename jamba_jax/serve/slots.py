"""The compiled programs of the serving engine, over a slot cache: one ``jamba_jax.init_cache`` of
``slots`` rows and ``2 * span`` positions that every decode step advances together.

Jamba's attention has no positional encoding, so where a row's keys sit in the cache does not matter,
only which slots hold them (``valid``) and that they precede the write position ``pos``. The rows share
``pos`` (the cache table's one write position): every request's tokens end at ``pos``. Prompts are
prefilled into a scratch cache of a few rows (``prefill_rows``: several prompts in one call, left-padded
to a common length) and each row is then copied into its slot, shifted so that it ends at the slot
cache's ``pos`` (``insert``); when ``pos`` reaches the end of the cache, every row is moved back by
``span`` (``compact``), which holds all live tokens because no request is longer than ``span``. Every
program has fixed shapes: requests coming and going compile nothing.

Row snapshots (``take_row``) are one-row caches whose tokens end at position ``span``; they seed the
scratch cache's first row when a new prompt extends a snapshot's tokens (prefix reuse).
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
def insert(cache: dict, scratch: dict, row, slot):
    """``cache`` with row ``slot`` replaced by ``scratch``'s row ``row`` (K/V, valid, conv and ssm state),
    shifted so that its tokens end at ``cache["pos"]``."""
    shift = cache["pos"] - scratch["pos"]

    def put(path, leaf, rows):
        batch, _ = _axes(path, leaf)
        if batch is None:
            return leaf
        return jax.lax.dynamic_update_slice_in_dim(leaf, _moved_row(path, rows, row, shift).astype(leaf.dtype),
                                                   slot, axis=batch)

    return jax.tree_util.tree_map_with_path(put, cache, scratch)


@functools.partial(jax.jit, static_argnames="span")
def take_row(cache: dict, row, *, span: int) -> dict:
    """A one-row copy of ``cache``'s row ``row`` whose tokens end at position ``span``."""
    shift = span - cache["pos"]
    out = jax.tree_util.tree_map_with_path(lambda p, leaf: _moved_row(p, leaf, row, shift), cache)
    return {**out, "pos": jnp.asarray(span, jnp.int32)}


def _first_rows(cache: dict, rows: int) -> dict:
    """The first ``rows`` rows of ``cache`` (leaves without a batch axis as they are)."""
    def first(path, leaf):
        batch, _ = _axes(path, leaf)
        return leaf if batch is None else jax.lax.slice_in_dim(leaf, 0, rows, axis=batch)

    return jax.tree_util.tree_map_with_path(first, cache)


def _with_first_rows(cache: dict, part: dict) -> dict:
    """``cache`` with its first rows replaced by ``part``'s (a cache of fewer rows), and ``part``'s leaves
    without a batch axis (``pos``) in place of its own."""
    def put(path, leaf, new):
        batch, _ = _axes(path, leaf)
        new = new.astype(leaf.dtype)
        return new if batch is None else jax.lax.dynamic_update_slice_in_dim(leaf, new, 0, axis=batch)

    return jax.tree_util.tree_map_with_path(put, cache, part)


@functools.partial(jax.jit, donate_argnames="scratch")
def restore(scratch: dict, snapshot: dict) -> dict:
    """``scratch`` with its first row replaced by the one-row ``snapshot`` and its ``pos`` set to the
    snapshot's (the other rows keep stale contents: a snapshot seeds one-row prefills only)."""
    return _with_first_rows(scratch, snapshot)


@functools.partial(jax.jit, static_argnames="spec", donate_argnames="scratch")
def prefill_rows(params, scratch, ids, valid, start, *, spec: ModelSpec):
    """One prefill chunk of ``ids, valid [rows, n]`` into the first ``rows`` rows of ``scratch`` (all of
    them when ``rows`` is its row count; the others keep their contents), written from position ``start``
    (int32; -1: the scratch's ``pos``), after which ``pos`` is ``n`` further: ``(logits [rows, vocab]`` of
    each row's last position, ``scratch)``. Compiled per ``rows``, so a lone prompt costs one row's compute,
    not the scratch's."""
    rows = ids.shape[0]
    scratch = {**scratch, "pos": jnp.where(start >= 0, start, scratch["pos"]).astype(jnp.int32)}
    if rows == scratch["valid"].shape[0]:
        return apply_step(params, scratch, ids, valid, spec=spec)
    logits, part = apply_step(params, _first_rows(scratch, rows), ids, valid, spec=spec)
    return logits, _with_first_rows(scratch, part)


def resetter(scratch: dict):
    """A compiled ``reset(scratch, start)``: ``scratch`` emptied (no valid slot, zero state), its write
    position at ``start``, each leaf keeping ``scratch``'s sharding (zeros made from nothing would come out
    replicated, and a program fed them would compile again for the new shardings). Prompts are prefilled
    (left-padded) only into an empty scratch: padding is exact before a sequence's first token."""
    def reset(scratch: dict, start) -> dict:
        out = jax.tree.map(jnp.zeros_like, scratch)
        return {**out, "pos": jnp.asarray(start, jnp.int32)}

    if not any(a.committed for a in jax.tree.leaves(scratch)):  # one device, uncommitted: keep it so
        return jax.jit(reset, donate_argnums=0)
    return jax.jit(reset, donate_argnums=0, out_shardings=jax.tree.map(lambda a: a.sharding, scratch))


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


@functools.partial(jax.jit, static_argnames=("spec", "steps", "eos"), donate_argnames="cache")
def decode_steps(params, cache, tokens, key_data, fresh, fresh_tokens, fresh_key_data, budget, temperature, top_k,
                 top_p, *, spec: ModelSpec, steps: int, eos: tuple[int, ...]):
    """``steps`` decode steps of every row, each row sampling its next token with its own settings:
    ``(new tokens [steps, rows], last tokens [rows], key data [rows, 2], cache)``.

    Row ``i`` starts from ``tokens[i]`` with PRNG ``key_data[i]`` (the previous call's outputs, left on the
    device), or from ``fresh_tokens[i]`` and ``fresh_key_data[i]`` where ``fresh[i]`` (a row just inserted).
    It runs at most ``budget[i]`` steps (0: masked throughout) and stops before feeding a token of ``eos``;
    a row that is not running is masked out, its state untouched and its new tokens meaningless. Each
    running step splits the row's key once, as ``generate`` does."""
    tokens = jnp.where(fresh, fresh_tokens, tokens)
    key_data = jnp.where(fresh[:, None], fresh_key_data, key_data)
    stop = jnp.asarray(eos if eos else (-1,), jnp.int32)

    def one(carry, j):
        tokens, key_data, cache = carry
        running = (j < budget) & ~jnp.isin(tokens, stop)
        key_data, sub = _split(key_data)
        logits, cache = apply_step(params, cache, tokens[:, None], running[:, None], spec=spec)
        new = sample_rows(logits, sub, temperature, top_k, top_p)
        return (jnp.where(running, new, tokens), key_data, cache), new

    (tokens, key_data, cache), new = jax.lax.scan(one, (tokens, key_data, cache), jnp.arange(steps))
    return new, tokens, key_data, cache
