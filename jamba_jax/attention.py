"""Grouped-query self-attention with no positional encoding (Jamba's Mamba layers carry position)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from .config import JambaConfig
from .layers import Dtype, Linear
from .sharding import constrain, per_shard


def dot_product_attention(q, k, v, mask):
    """Softmax attention with fp32 scores and softmax.

    q ``[batch, q_len, kv_heads, group, head_dim]``; k, v ``[batch, kv_heads, k_len, head_dim]``;
    mask broadcastable to ``[batch, kv_heads, group, q_len, k_len]`` (True = attend).
    Returns ``[batch, q_len, kv_heads, group, head_dim]`` in ``q.dtype``. Fully masked rows (a query
    that is itself padding) give a uniform average instead of NaN; their outputs are never used.
    """
    scale = q.shape[-1] ** -0.5
    scores = jnp.einsum("bqhgd,bhkd->bhgqk", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhgqk,bhkd->bqhgd", probs, v)


def position_mask(q_start, q_len: int, kv_valid, key_start=0, key_len=None):
    """``[batch or 1, 1, 1, q_len, key_len]`` bool: query at slot ``q_start + i`` may see key slot ``s``
    iff ``s <= q_start + i`` and ``kv_valid[b, s]`` (None = all valid). Keys are slots
    ``key_start .. key_start + key_len - 1`` of ``kv_valid``."""
    key_slots = key_start + jnp.arange(key_len)
    mask = key_slots[None, :] <= q_start + jnp.arange(q_len)[:, None]
    mask = mask[None, None, None]
    if kv_valid is not None:
        valid = jax.lax.dynamic_slice_in_dim(kv_valid, key_start, key_len, axis=1)
        mask = mask & valid[:, None, None, None, :]
    return mask


def naive_attention(q, k, v, q_start, kv_valid):
    """Reference: all scores at once. Shapes as in ``attend``."""
    return dot_product_attention(q, k, v, position_mask(q_start, q.shape[1], kv_valid, 0, k.shape[2]))


_NEG = jnp.finfo(jnp.float32).min
# Keys per block of the XLA prefill path. A key length that is not a multiple of it is padded, which copies
# K/V: decode caches are sized in multiples of it (``generate``).
KEY_BLOCK = 512


def _partial(q, k, v, mask):
    """Softmax statistics of one key block: running max ``m`` and sum ``l`` ``[b, h, g, q]`` and the
    unnormalised output ``acc`` ``[b, h, g, q, d]``, all fp32.

    The scale goes on q and q is put head-major first, so that both products come out of
    ``dot_general`` in the layout the softmax uses: written as einsums over q's own layout, XLA
    computes ``k @ q^T`` and transposes the whole score block (on CPU, 3x the block's time)."""
    q = jnp.moveaxis(q * q.shape[-1] ** -0.5, 1, 3)  # [b, h, g, q, d]
    batch_dims = ((0, 1), (0, 1))  # (b, h) of q/p against (b, h) of k/v [b, h, k, d]
    s = jax.lax.dot_general(q, k, (((4,), (3,)), batch_dims), preferred_element_type=jnp.float32)
    s = jnp.where(mask, s, _NEG)  # [b, h, g, q, k]
    m = s.max(axis=-1)
    p = jnp.exp(s - m[..., None])
    acc = jax.lax.dot_general(p.astype(v.dtype), v, (((4,), (2,)), batch_dims), preferred_element_type=jnp.float32)
    return m, p.sum(axis=-1), acc


def _merge(a, b):
    """Combines the softmax statistics of two disjoint key sets."""
    m = jnp.maximum(a[0], b[0])
    wa, wb = jnp.exp(a[0] - m), jnp.exp(b[0] - m)
    return m, a[1] * wa + b[1] * wb, a[2] * wa[..., None] + b[2] * wb[..., None]


def _finish(stats, dtype):
    _, l, acc = stats
    return jnp.moveaxis(acc / l[..., None], 3, 1).astype(dtype)  # [b, h, g, q, d] -> [b, q, h, g, d]


def _pad_keys(k, v, kv_valid, block: int):
    """Pads the key axis to a multiple of ``block`` with slots that are never valid."""
    batch, length = k.shape[0], k.shape[2]
    pad = -length % block
    if kv_valid is None:
        kv_valid = jnp.ones((batch, length), bool)
    if pad:
        widths = [(0, 0), (0, 0), (0, pad), (0, 0)]
        k, v = jnp.pad(k, widths), jnp.pad(v, widths)
        kv_valid = jnp.pad(kv_valid, [(0, 0), (0, pad)])
    return k, v, kv_valid


def blocked_attention(q, k, v, q_start, kv_valid, *, block_k: int = KEY_BLOCK):
    """Flash-style attention: a ``lax.scan`` over key blocks with an online softmax, so at most one
    ``[q_len, block_k]`` block of scores per head exists at a time; blocks past the last query's slot
    are skipped. Shapes as in ``attend``."""
    block_k = min(block_k, k.shape[2])
    k, v, kv_valid = _pad_keys(k, v, kv_valid, block_k)
    n_blocks = k.shape[2] // block_k
    batch, q_len, n_kv, group, hd = q.shape

    def step(stats, i):
        start = i * block_k

        def add_block(stats):
            kb = jax.lax.dynamic_slice_in_dim(k, start, block_k, axis=2)
            vb = jax.lax.dynamic_slice_in_dim(v, start, block_k, axis=2)
            return _merge(stats, _partial(q, kb, vb, position_mask(q_start, q_len, kv_valid, start, block_k)))

        # A block after the last query's slot (the unfilled end of a cache) is masked for every query:
        # skipped. Block 0 never is, so a fully masked (padding) query still gets a finite average.
        return jax.lax.cond(start <= q_start + q_len - 1, add_block, lambda stats: stats, stats), None

    init = (jnp.full((batch, n_kv, group, q_len), _NEG), jnp.zeros((batch, n_kv, group, q_len)),
            jnp.zeros((batch, n_kv, group, q_len, hd)))
    stats, _ = jax.lax.scan(step, init, jnp.arange(n_blocks))
    return _finish(stats, q.dtype)


def split_k_attention(q, k, v, q_start, kv_valid, *, num_splits: int = 16):
    """Decode attention: the key range is cut into ``num_splits`` parts whose partial softmaxes are
    computed in parallel (not one after another) and merged. Shapes as in ``attend``.

    The parts are a reshape of K/V, not slices: a vmapped ``dynamic_slice`` is a gather, whose CPU time
    grew faster than the key count (``docs/attention.md``)."""
    length = k.shape[2]
    num_splits = max(1, min(num_splits, length))
    block = -(-length // num_splits)
    k, v, kv_valid = _pad_keys(k, v, kv_valid, block)
    n = k.shape[2] // block
    k, v = (a.reshape(*a.shape[:2], n, block, a.shape[3]) for a in (k, v))
    mask = position_mask(q_start, q.shape[1], kv_valid, 0, n * block)
    mask = mask.reshape(*mask.shape[:-1], n, block)
    m, l, acc = jax.vmap(lambda kb, vb, mb: _partial(q, kb, vb, mb), in_axes=(2, 2, -2))(k, v, mask)
    m_all = m.max(axis=0)  # [split, b, h, g, q] -> [b, h, g, q]
    w = jnp.exp(m - m_all)
    return _finish((m_all, (l * w).sum(0), (acc * w[..., None]).sum(0)), q.dtype)


def _per_shard_kernel(kernel, q, k, v, q_start, kv_valid):
    """``kernel(q, k, v, q_start, kv_valid)`` (a Pallas attention kernel) with ``kv_valid`` None made all-True
    and ``q_start`` int32; under a mesh each device runs it on its kv heads (and batch rows)."""
    q_axes, kv_axes = ("batch", "seq", "kv_heads", None, "head_dim"), ("batch", "kv_heads", "seq", "head_dim")
    if kv_valid is None:
        kv_valid = jnp.ones((k.shape[0], k.shape[2]), bool)
    q_start = jnp.asarray(q_start, jnp.int32)
    return per_shard(kernel, (q_axes, kv_axes, kv_axes, None, ("batch", "seq")), q_axes, q, k, v, q_start,
                     kv_valid)


ATTENTION_IMPLS = ("xla", "pallas", "pallas-interpret", "mosaic", "mosaic-interpret")


def attend(q, k, v, q_start, kv_valid, *, block_k: int = KEY_BLOCK, num_splits: int = 16, impl: str = "xla"):
    """Causal GQA attention of ``q_len`` queries at slots ``q_start ..`` over key slots ``0 .. k_len-1``.

    q ``[batch, q_len, kv_heads, group, head_dim]``; k, v ``[batch, kv_heads, k_len, head_dim]`` (never
    repeated per group; head-major, so each head's keys are one matrix, the layout both products take:
    seq-major, XLA transposed the whole cache on every decode step); ``kv_valid [batch, k_len]`` bool or
    None. Scores and softmax in fp32.
    Returns ``[batch, q_len, kv_heads, group, head_dim]`` in ``q.dtype``. One query (decode) uses the
    split-K path, longer blocks the blocked (flash-style) path. ``impl``: ``"xla"``, ``"pallas"`` (the
    kernels of ``pallas_kernels.flash_attention`` on GPU, the XLA paths elsewhere),
    ``"pallas-interpret"`` (the kernels in interpret mode, for tests), ``"mosaic"`` (prefill chunks by the
    Mosaic GPU flash kernel ``pallas_kernels.flash_attention_mgpu`` on GPU, the XLA paths elsewhere) or
    ``"mosaic-interpret"`` (that kernel in Pallas's GPU interpret mode, any backend). Under both Mosaic
    choices decode (``q_len == 1``) takes the XLA split-K path, not a Triton kernel. ``block_k`` and
    ``num_splits`` tune the XLA paths only."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    mosaic = impl == "mosaic-interpret" or (impl == "mosaic" and jax.default_backend() == "gpu")
    if mosaic and q.shape[1] > 1:
        from pallas_kernels.flash_attention_mgpu import flash_attention_mgpu  # imported at trace time only

        kernel = functools.partial(flash_attention_mgpu, interpret=impl == "mosaic-interpret")
        return _per_shard_kernel(kernel, q, k, v, q_start, kv_valid)
    if impl == "pallas-interpret" or (impl == "pallas" and jax.default_backend() == "gpu"):
        from pallas_kernels import flash_attention as kernels  # imported at trace time only

        interpret = impl == "pallas-interpret"
        kernel = kernels.decode_attention_pallas if q.shape[1] == 1 else kernels.flash_attention_pallas
        return _per_shard_kernel(functools.partial(kernel, interpret=interpret), q, k, v, q_start, kv_valid)
    if q.shape[1] == 1:
        return split_k_attention(q, k, v, q_start, kv_valid, num_splits=num_splits)
    return blocked_attention(q, k, v, q_start, kv_valid, block_k=block_k)


class Attention(nn.Module):
    """GQA self-attention: ``[batch, seq, hidden]`` -> ``[batch, seq, hidden]`` in ``dtype``.

    Without ``cache`` it attends within ``x`` (causal + ``token_valid`` padding mask). With ``cache``
    (``{"key", "value"}: [batch, kv_heads, max_len, head_dim]``, or ``[blocks, batch, ...]`` with ``block``
    the index of this layer's block) it writes the new keys/values at slot ``pos``, attends over the cache
    under ``kv_valid [batch, max_len]`` and returns the updated cache too.
    ``impl`` is ``attend``'s.
    """

    config: JambaConfig
    dtype: Dtype = jnp.float32
    impl: str = "xla"

    @nn.compact
    def __call__(self, x, token_valid, cache=None, pos=None, kv_valid=None, block=None):
        cfg = self.config
        batch, seq, _ = x.shape
        n_kv, hd = cfg.num_key_value_heads, cfg.head_dim
        group = cfg.num_attention_heads // n_kv
        q = Linear(cfg.num_attention_heads * hd, dtype=self.dtype, name="q_proj")(x)
        k = Linear(n_kv * hd, dtype=self.dtype, name="k_proj")(x)
        v = Linear(n_kv * hd, dtype=self.dtype, name="v_proj")(x)
        q = constrain(q.reshape(batch, seq, n_kv, group, hd), "batch", "seq", "kv_heads", None, "head_dim")
        k, v = (constrain(a.reshape(batch, seq, n_kv, hd).swapaxes(1, 2), "batch", "kv_heads", "seq", "head_dim")
                for a in (k, v))  # [batch, kv_heads, seq, head_dim]
        q_start, valid = 0, token_valid
        if cache is not None:
            q_start, valid = pos, kv_valid
            if block is None:  # this layer's buffers
                start, new = (0, 0, pos, 0), (k, v)
            else:  # every scanned block's buffers, [blocks, batch, ...]: block ``block`` writes its slice
                start, new = (block, 0, 0, pos, 0), (k[None], v[None])
            cache = {n: jax.lax.dynamic_update_slice(cache[n], a.astype(cache[n].dtype), start)
                     for n, a in zip(("key", "value"), new)}
            k, v = (cache[n] if block is None else jax.lax.dynamic_index_in_dim(cache[n], block, keepdims=False)
                    for n in ("key", "value"))
            k, v = k.astype(self.dtype), v.astype(self.dtype)
        out = attend(q, k, v, q_start, valid, impl=self.impl)
        out = Linear(cfg.hidden_size, dtype=self.dtype, name="o_proj")(out.reshape(batch, seq, -1))
        return out, cache
