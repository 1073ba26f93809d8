"""Causal GQA attention as Pallas kernels (Triton GPU backend, or interpret mode on CPU).

Same contract as ``jamba_jax.attention.attend`` (and its XLA paths ``blocked_attention`` and
``split_k_attention``):

    q         [batch, q_len, kv_heads, group, head_dim]   any float dtype
    k, v      [batch, kv_heads, k_len, head_dim]          (head-major; never repeated per group)
    q_start   int or traced int32 scalar: the slot of the first query
    kv_valid  [batch, k_len] bool, or None (all valid)

key slot ``s`` is visible to query ``i`` iff ``s <= q_start + i`` and ``kv_valid[b, s]``. Scores,
softmax statistics and accumulators are float32; the output ``[batch, q_len, kv_heads, group,
head_dim]`` is in ``q.dtype``. Outputs of padding queries (rows whose own slot is not valid) are
finite but meaningless, as in the XLA paths.

``flash_attention_pallas`` (prefill). The wrapper folds the GQA group into the query rows:
q becomes ``[batch, kv_heads, q_len * group, head_dim]`` (row ``r`` is query ``r // group``, head
``r % group`` of that kv head), so each K/V block is loaded once for the whole group. The grid is
``(batch, kv_heads, row blocks)``; each program keeps a ``[block_q, head_dim]`` fp32 accumulator
and the running max / sum ``[block_q]`` and walks the key blocks in a ``fori_loop`` with an online
softmax (in base 2: the scores are pre-scaled by ``log2 e / sqrt(head_dim)``). Key blocks after
the slot of the block's last query are never read. Blocks whose every key precedes the block's
first query need no causal mask (only ``kv_valid``) and run in a first loop; the remaining
diagonal blocks run in a second loop with the full mask.

``decode_attention_pallas`` (one query). The grid is ``(batch, kv_heads, num_splits)``. The live
key blocks (those holding slots ``0 .. q_start``, computed in the kernel from ``q_start``, so a
cache filled to 4K of 256K reads 4K keys) are shared out evenly between the splits; each program
computes the partial softmax statistics ``(m, l, acc)`` of its key range for all ``group`` query
heads (rows padded to 16) and writes them to small fp32 outputs, which the wrapper merges in jnp.

Triton constraints: every loaded or computed array has power-of-two dimensions and ``tl.dot``
wants at least 16 rows/columns, so ``block_q``, ``block_k`` are powers of two >= 16, head_dim is
padded to a power of two >= 16 (zeros: no effect on the scores; sliced off the output), the query
rows to a multiple of ``block_q`` and the key axis to a multiple of ``block_k`` (with invalid
slots). Padding copies K/V, so size caches as multiples of ``block_k`` (no copy then).
``q_start`` reaches the kernel as a one-element int32 array, ``kv_valid`` as int32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

try:  # Triton compiler params; only used when lowering for GPU.
    from jax.experimental.pallas import triton as _pl_triton
except Exception:  # pragma: no cover - absent from some builds
    _pl_triton = None

__all__ = ["flash_attention_pallas", "decode_attention_pallas"]

_F32 = jnp.float32
_LOG2E = 1.4426950408889634
# Masked scores: finite, so a fully masked row gives a uniform average (never NaN) and
# exp2(_MASK - m) underflows to 0 as soon as the row has one real score.
_MASK = -0.7 * float(np.finfo(np.float32).max)
_MIN_BLOCK = 16  # tl.dot needs M, N, K >= 16
_DECODE_PROGRAMS = 256  # num_splits=None aims for about this many programs (an H100 has 132 SMs)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _check_block(name, b):
    if b < _MIN_BLOCK or _next_pow2(b) != b:
        raise ValueError(f"{name} must be a power of two >= {_MIN_BLOCK}, got {b}")


def _compiler_params(num_warps, num_stages, interpret):
    if interpret or _pl_triton is None:
        return None
    return _pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _precision(dtype):
    # fp32 inputs: IEEE fp32 products on GPU (the default would be tf32).
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _pad_axis(a, axis, size):
    if a.shape[axis] == size:
        return a
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, size - a.shape[axis])
    return jnp.pad(a, widths)


def _prepare_kv(k, v, kv_valid, block_k, hd_p):
    """Pads K/V ``[batch, kv_heads, k_len, head_dim]`` to ``[batch, kv_heads, k_pad, hd_p]`` (a copy
    only when a size changes) and ``kv_valid`` to int32 ``[batch, k_pad]`` (False on padded slots)."""
    k_pad = _round_up(k.shape[2], block_k)
    k, v = (_pad_axis(_pad_axis(a, 2, k_pad), 3, hd_p) for a in (k, v))
    if kv_valid is not None:
        kv_valid = _pad_axis(kv_valid.astype(jnp.int32), 1, k_pad)
    return k, v, kv_valid


def _block_update(carry, q, k, v, mask, scale2, precision):
    """One online-softmax step over a key block. carry: m, l ``[rows]``, acc ``[rows, hd]`` (fp32,
    scores in base-2 units); q ``[rows, hd]``; k, v ``[block_k, hd]``; mask ``[rows, block_k]`` bool
    or None."""
    m, l, acc = carry
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=_F32, precision=precision)
    s = s * scale2
    if mask is not None:
        s = jnp.where(mask, s, _MASK)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - m_new[:, None])
    l = l * alpha + jnp.sum(p, axis=1)
    pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=_F32, precision=precision)
    return m_new, l, acc * alpha[:, None] + pv


def _flash_kernel(*refs, group, q_len, block_q, block_k, n_k_blocks, scale2, has_valid, precision):
    """Program (b, h, j): rows ``j*block_q ..`` of the folded queries of kv head h. Refs (batch and
    head squeezed): start [1] int32; q [block_q, hd]; k, v [k_pad, hd]; valid [k_pad] int32
    (optional); out o [block_q, hd]."""
    start_ref, q_ref, k_ref, v_ref = refs[:4]
    valid_ref = refs[4] if has_valid else None
    o_ref = refs[-1]
    q_start = start_ref[0]
    row0 = pl.program_id(2) * block_q
    q = q_ref[...]
    first_slot = q_start + lax.div(row0, group)
    last_slot = q_start + jnp.minimum(lax.div(row0 + block_q - 1, group), q_len - 1)
    # Blocks [0, n_full): every key slot <= first_slot, no causal mask. [n_full, n_total): diagonal.
    n_total = jnp.minimum(lax.div(last_slot, block_k) + 1, n_k_blocks)
    n_full = jnp.minimum(lax.div(first_slot + 1, block_k), n_total)
    shape = (block_q, block_k)
    q_slot = q_start + lax.div(row0 + lax.broadcasted_iota(jnp.int32, (block_q, 1), 0), group)  # [bq, 1]

    def body(i, carry, causal):
        start = pl.multiple_of(i * block_k, block_k)
        k = k_ref[pl.ds(start, block_k), :]
        v = v_ref[pl.ds(start, block_k), :]
        mask = None
        if causal:
            mask = start + lax.broadcasted_iota(jnp.int32, (1, block_k), 1) <= q_slot  # [bq, bk]
        if has_valid:
            valid = jnp.broadcast_to(valid_ref[pl.ds(start, block_k)][None, :] != 0, shape)
            mask = valid if mask is None else mask & valid
        return _block_update(carry, q, k, v, mask, scale2, precision)

    hd = q.shape[-1]
    carry = (jnp.full((block_q,), _MASK, _F32), jnp.zeros((block_q,), _F32), jnp.zeros((block_q, hd), _F32))
    carry = lax.fori_loop(0, n_full, functools.partial(body, causal=False), carry)
    _, l, acc = lax.fori_loop(n_full, n_total, functools.partial(body, causal=True), carry)
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "num_warps", "num_stages", "interpret"))
def flash_attention_pallas(q, k, v, q_start, kv_valid, *, block_q: int = 128, block_k: int = 64,
                           num_warps: int | None = None, num_stages: int = 3, interpret: bool = False):
    """Prefill flash attention; shapes and semantics in the module docstring.

    ``block_q``: rows of the folded ``[q_len * group, head_dim]`` query matrix per program (a power
    of two >= 16; clipped to the rows rounded up to a power of two). ``block_k``: keys per inner
    step (a power of two >= 16; clipped likewise). ``num_warps``/``num_stages`` go to the Triton
    compiler (ignored in interpret mode); ``num_warps`` None: 8 for head_dim >= 128, else 4.
    Returns ``[batch, q_len, kv_heads, group, head_dim]`` in ``q.dtype``.
    """
    _check_block("block_q", block_q)
    _check_block("block_k", block_k)
    batch, q_len, n_kv, group, hd = q.shape
    k_len = k.shape[2]
    rows = q_len * group
    hd_p = max(_MIN_BLOCK, _next_pow2(hd))
    block_q = min(block_q, max(_MIN_BLOCK, _next_pow2(rows)))
    block_k = min(block_k, max(_MIN_BLOCK, _next_pow2(k_len)))
    if num_warps is None:
        num_warps = 8 if hd_p >= 128 and block_q >= 128 else 4
    rows_p = _round_up(rows, block_q)
    qf = jnp.transpose(q, (0, 2, 1, 3, 4)).reshape(batch, n_kv, rows, hd)
    qf = _pad_axis(_pad_axis(qf, 2, rows_p), 3, hd_p)
    k, v, valid = _prepare_kv(k, v, kv_valid, block_k, hd_p)
    k_pad = k.shape[2]
    start = jnp.asarray(q_start, jnp.int32).reshape(1)

    operands = [start, qf, k, v]
    kv_spec = pl.BlockSpec((None, None, k_pad, hd_p), lambda b, h, j: (b, h, 0, 0))
    in_specs = [
        pl.BlockSpec((1,), lambda b, h, j: (0,)),
        pl.BlockSpec((None, None, block_q, hd_p), lambda b, h, j: (b, h, j, 0)),
        kv_spec,
        kv_spec,
    ]
    if valid is not None:
        operands.append(valid)
        in_specs.append(pl.BlockSpec((None, k_pad), lambda b, h, j: (b, 0)))
    kernel = functools.partial(
        _flash_kernel, group=group, q_len=q_len, block_q=block_q, block_k=block_k,
        n_k_blocks=k_pad // block_k, scale2=_LOG2E / float(np.sqrt(hd)), has_valid=valid is not None,
        precision=_precision(q.dtype),
    )
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((batch, n_kv, rows_p, hd_p), q.dtype),
        grid=(batch, n_kv, rows_p // block_q),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, None, block_q, hd_p), lambda b, h, j: (b, h, j, 0)),
        interpret=interpret,
        compiler_params=_compiler_params(num_warps, num_stages, interpret),
        name="flash_attention",
    )(*operands)
    out = out[:, :, :rows, :hd].reshape(batch, n_kv, q_len, group, hd)
    return jnp.transpose(out, (0, 2, 1, 3, 4))


def _decode_kernel(*refs, block_k, n_k_blocks, num_splits, scale2, has_valid, precision):
    """Program (b, h, s): split s of the live key blocks of kv head h. Refs (batch, head, split
    squeezed): start [1] int32; q [rows, hd]; k, v [k_pad, hd]; valid [k_pad] int32 (optional);
    outputs m, l [rows] and acc [rows, hd], fp32 (m in base-2 units)."""
    start_ref, q_ref, k_ref, v_ref = refs[:4]
    valid_ref = refs[4] if has_valid else None
    m_ref, l_ref, acc_ref = refs[-3:]
    q_start = start_ref[0]
    q = q_ref[...]
    rows, hd = q.shape
    n_live = jnp.minimum(lax.div(q_start, block_k) + 1, n_k_blocks)
    per_split = lax.div(n_live + (num_splits - 1), num_splits)
    lo = jnp.minimum(pl.program_id(2) * per_split, n_live)
    hi = jnp.minimum(lo + per_split, n_live)
    shape = (rows, block_k)

    def body(i, carry):
        start = pl.multiple_of(i * block_k, block_k)
        k = k_ref[pl.ds(start, block_k), :]
        v = v_ref[pl.ds(start, block_k), :]
        mask = start + lax.broadcasted_iota(jnp.int32, shape, 1) <= q_start
        if has_valid:
            mask = mask & jnp.broadcast_to(valid_ref[pl.ds(start, block_k)][None, :] != 0, shape)
        return _block_update(carry, q, k, v, mask, scale2, precision)

    carry = (jnp.full((rows,), _MASK, _F32), jnp.zeros((rows,), _F32), jnp.zeros((rows, hd), _F32))
    m, l, acc = lax.fori_loop(lo, hi, body, carry)
    m_ref[...] = m
    l_ref[...] = l
    acc_ref[...] = acc


def _auto_splits(batch, n_kv, n_k_blocks):
    return max(1, min(n_k_blocks, -(-_DECODE_PROGRAMS // (batch * n_kv))))


@functools.partial(jax.jit, static_argnames=("block_k", "num_splits", "num_warps", "num_stages", "interpret"))
def decode_attention_pallas(q, k, v, q_start, kv_valid, *, block_k: int = 64, num_splits: int | None = None,
                            num_warps: int = 4, num_stages: int = 3, interpret: bool = False):
    """Split-K decode attention for one query (``q_len == 1``); shapes and semantics in the module
    docstring.

    ``block_k``: keys per inner step (a power of two >= 16, clipped to the cache length rounded up
    to a power of two). ``num_splits``: programs per (batch row, kv head) sharing the live key
    blocks (None: about 256 programs in all, at most one per key block of the cache).
    Returns ``[batch, 1, kv_heads, group, head_dim]`` in ``q.dtype``.
    """
    _check_block("block_k", block_k)
    batch, q_len, n_kv, group, hd = q.shape
    if q_len != 1:
        raise ValueError(f"decode_attention_pallas takes one query, got q_len={q_len}")
    k_len = k.shape[2]
    hd_p = max(_MIN_BLOCK, _next_pow2(hd))
    rows = max(_MIN_BLOCK, _next_pow2(group))
    block_k = min(block_k, max(_MIN_BLOCK, _next_pow2(k_len)))
    k, v, valid = _prepare_kv(k, v, kv_valid, block_k, hd_p)
    k_pad = k.shape[2]
    n_k_blocks = k_pad // block_k
    splits = _auto_splits(batch, n_kv, n_k_blocks) if num_splits is None else max(1, min(num_splits, n_k_blocks))
    qf = _pad_axis(_pad_axis(q[:, 0], 2, rows), 3, hd_p)  # [batch, kv_heads, rows, hd_p]
    start = jnp.asarray(q_start, jnp.int32).reshape(1)

    operands = [start, qf, k, v]
    kv_spec = pl.BlockSpec((None, None, k_pad, hd_p), lambda b, h, s: (b, h, 0, 0))
    in_specs = [
        pl.BlockSpec((1,), lambda b, h, s: (0,)),
        pl.BlockSpec((None, None, rows, hd_p), lambda b, h, s: (b, h, 0, 0)),
        kv_spec,
        kv_spec,
    ]
    if valid is not None:
        operands.append(valid)
        in_specs.append(pl.BlockSpec((None, k_pad), lambda b, h, s: (b, 0)))
    kernel = functools.partial(
        _decode_kernel, block_k=block_k, n_k_blocks=n_k_blocks, num_splits=splits,
        scale2=_LOG2E / float(np.sqrt(hd)), has_valid=valid is not None, precision=_precision(q.dtype),
    )
    stat_spec = pl.BlockSpec((None, None, None, rows), lambda b, h, s: (b, h, s, 0))
    m, l, acc = pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct((batch, n_kv, splits, rows), _F32),
            jax.ShapeDtypeStruct((batch, n_kv, splits, rows), _F32),
            jax.ShapeDtypeStruct((batch, n_kv, splits, rows, hd_p), _F32),
        ),
        grid=(batch, n_kv, splits),
        in_specs=in_specs,
        out_specs=(stat_spec, stat_spec,
                   pl.BlockSpec((None, None, None, rows, hd_p), lambda b, h, s: (b, h, s, 0, 0))),
        interpret=interpret,
        compiler_params=_compiler_params(num_warps, num_stages, interpret),
        name="decode_attention",
    )(*operands)
    # Merge the splits (an empty split has m = _MASK, l = 0, acc = 0 and weighs nothing).
    m_all = jnp.max(m, axis=2, keepdims=True)
    w = jnp.exp2(m - m_all)
    l_all = jnp.sum(l * w, axis=2)
    acc_all = jnp.sum(acc * w[..., None], axis=2)
    out = (acc_all / l_all[..., None])[:, :, :group, :hd]  # [batch, kv_heads, group, hd]
    return out[:, None].astype(q.dtype)
