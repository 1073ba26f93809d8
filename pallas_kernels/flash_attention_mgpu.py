"""Causal GQA flash prefill attention as a Mosaic GPU (Pallas) kernel: the Hopper twin of
``flash_attention.flash_attention_pallas``.

Same contract as ``flash_attention_pallas`` and ``jamba_jax.attention.attend``:

    q         [batch, q_len, kv_heads, group, head_dim]   bf16, f16 or f32
    k, v      [batch, kv_heads, k_len, head_dim]          (head-major; never repeated per group)
    q_start   int or traced int32 scalar: the slot of the first query
    kv_valid  [batch, k_len] bool, or None (all valid)

key slot ``s`` is visible to query ``i`` iff ``s <= q_start + i`` and ``kv_valid[b, s]``. Scores, softmax
statistics and accumulators are float32; the output ``[batch, q_len, kv_heads, group, head_dim]`` is in
``q.dtype`` (k and v are cast to it). Outputs of padding queries (rows whose own slot is not valid) are
finite but meaningless, as in the XLA paths.

Design (FlashAttention-3's forward pass)
---------------------------------------
* **GQA folded into rows.** The wrapper lays q out as ``[batch, kv_heads, q_len * group, head_dim]`` (row
  ``r`` is query ``r // group``, head ``r % group`` of its kv head), so one K/V tile feeds the whole group.
* **Grid** ``(kv_heads, row blocks, batch)``; by default a CTA is one warpgroup and owns ``block_q`` (64 or
  128) folded rows of one kv head. It TMA-copies its q tile to SMEM once, then streams K/V tiles ``[block_kv,
  head_dim]`` through a ``plgpu.emit_pipeline`` of ``max_concurrent_steps`` stages (TMA bulk copies, one
  barrier per stage, later tiles in flight while the current one is used), together with the tile's
  ``kv_valid`` flags. The default tiles (``mosaic_attention_config``) keep a CTA within ``SMEM_PER_CTA`` so
  that two share an SM: one's softmax can run while the other's wgmma does (FlashAttention-3 gets that overlap
  from two consumer warpgroups in one CTA). The output tile reuses the q tile's SMEM when their dtypes agree.
* **Per K/V tile**: ``S = Q K^T`` by ``wgmma`` into an fp32 accumulator; scores scaled by
  ``log2(e) / sqrt(head_dim)`` (the softmax runs in base 2); mask; online softmax in fp32 registers
  (running max ``m``, sum ``l``, rescale ``acc`` by ``exp2(m_old - m_new)``); ``P V`` by ``wgmma`` (``P``
  cast to the MMA dtype, V's SMEM tile as B) into a fresh accumulator added to the rescaled ``acc`` (GPU
  interpret mode cannot run wgmma into a pre-initialised accumulator, ``pl.run_state``; the add is one FMA
  per element). The epilogue divides by ``l``, casts, stores the tile to SMEM and TMA-copies it out.
* **Operands** (``operands=``). ``"fa3"`` (the default when compiling): K's ``[block_kv, head_dim]`` SMEM
  tile is wgmma's B operand for ``Q K^T`` through ``plgpu.transpose_ref`` (a K-major descriptor: free on
  Hopper) and ``P`` is the register A operand of ``P V``, as FlashAttention-3 does. GPU interpret mode (jax
  0.10.2) implements wgmma only with both operands in SMEM and neither transposed, so ``"smem"`` (the
  default in interpret mode) gets the same products another way: the wrapper passes ``K^T`` (``[batch,
  kv_heads, head_dim, k_pad]``, one transpose of K per call) whose ``[head_dim, block_kv]`` tiles are B as
  stored, and the kernel stores ``P`` to an SMEM tile (fenced by ``commit_smem``) as A. Everything else is
  the same code. The tests run ``"smem"`` in interpret mode and lower both for CUDA.
* **Causal block skipping.** From ``q_start`` (a kernel input, so one compile serves every chunk) a CTA
  computes the slots of its first and last query: key tiles after the last one are never loaded (the
  pipeline's trip count is dynamic: a chunk early in a 256K cache reads only the filled part); tiles whose
  every key precedes the first query run in a first pipeline with the ``kv_valid`` mask only; the diagonal
  tiles run in a second pipeline that adds the causal mask ``row >= (slot - q_start) * group`` (the
  condition ``slot <= q_start + row // group`` without a division).
* **Masked scores** are set to ``-0.7 * f32 max`` (finite): a fully masked row gives a uniform average
  (never NaN) and ``exp2(mask - m)`` underflows to 0 as soon as the row has one real score.
* **fp32 inputs.** wgmma has no IEEE fp32 mode (fp32 operands run as tf32, 10 significand bits). The
  wrapper splits q, k and v into three bf16 parts each (``split_f32``: their fp32 sum is the value) and the
  kernel splits ``P`` likewise in registers; each product is the sum of the six part products ``a_i b_j``
  with ``i + j < 3`` (the dropped ones are below ``2^-24`` relative), every one exact in fp32. Six MMAs
  per product instead of one: the fp32 path is for checking, the model runs bf16.
* Lowering semantics ``Warpgroup``: SMEM swizzle/tiling and register layouts are left to Mosaic GPU.

* **Warp specialization** (``warp_specialized=True``; ``plgpu.emit_pipeline_warp_specialized``): a CTA of
  three warpgroups. Two compute warpgroups own ``block_q`` rows each (``2 * block_q`` per CTA) and consume the
  same K/V tiles, which the third (memory) warpgroup TMA-loads into the stages and refills as both release
  them; the compute warpgroups load their own q tile and write their own output. One pipeline runs over the
  tiles up to the CTA's last query, each tile with the causal mask (the two warpgroups' diagonals differ).
  Default tiles: 128 keys, 2 stages (one CTA per SM). fp32 at head_dim 128 does not fit SMEM this way (six q
  parts and two outputs): ValueError. Not (yet) in it, against FlashAttention-3 proper: the ping-pong schedule
  barrier that makes one compute warpgroup's softmax overlap the other's wgmma, and the overlap of a tile's
  softmax with the next tile's ``Q K^T`` inside a warpgroup. Both change speed only; only a GPU can say what
  each design is worth (``benchmarks/gpu_mosaic.py`` times both against each other, Triton, XLA and cuDNN).

Shapes: ``block_q`` 64 or 128 (wgmma rows per warpgroup), ``block_kv`` a multiple of 64 up to 256. The
wrapper pads head_dim to a multiple of 64 (zeros: no effect on the scores; sliced off the output), the
folded rows to a multiple of ``block_q`` (``2 * block_q`` warp-specialized) and the key axis to a multiple
of ``block_kv`` (slots that are never valid). Padding copies K/V: size caches as multiples of ``block_kv``
(no copy then).

Testing: ``interpret=True`` (or an ``InterpretGPUParams``) runs the kernel in Pallas's GPU interpret mode on
any backend (``tests/test_mosaic_attention.py``); ``jax.jit(...).trace(...).lower(lowering_platforms=
("cuda",))`` runs Mosaic GPU's own lowering without a GPU. Compiling, running and timing need one.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import mosaic_gpu
from pallas_kernels.int8_ragged_dot_mgpu import split_f32

__all__ = ["flash_attention_mgpu", "mosaic_attention_config"]

_F32 = jnp.float32
_LOG2E = 1.4426950408889634
_MASK = -0.7 * float(np.finfo(np.float32).max)
# SMEM per CTA the default tiles stay within: two CTAs (two warpgroups) then share an SM (H100/H200: 227 KiB),
# so that one's softmax can run while the other's wgmma does; a config past it gets one CTA per SM.
SMEM_PER_CTA = 110 * 1024
SMEM_LIMIT = 227 * 1024
HEAD_ALIGN = 64  # head_dim is padded to a multiple of this (wgmma K and the 128-byte swizzle)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _compute(dtype):
    """(MMA operand dtype, number of bf16 parts) for an input dtype."""
    return mosaic_gpu.mma_operands(dtype, "flash_attention_mgpu")


def _reuses_q_tile(parts: int, compute_dtype, out_dtype) -> bool:
    """Whether the output tile is written into the q tile (free after the last wgmma): same dtype, one part."""
    return parts == 1 and jnp.dtype(compute_dtype) == jnp.dtype(out_dtype)


def _smem_bytes(block_q, block_kv, hd, stages, parts, compute_dtype, out_dtype, operands, wgs=1) -> int:
    """SMEM of a CTA with ``wgs`` compute warpgroups: their q, output and P tiles, the pipeline's stages."""
    c = jnp.dtype(compute_dtype).itemsize
    per_stage = 2 * parts * block_kv * hd * c + 4 * block_kv  # K and V parts, the valid flags
    p_tile = parts * block_q * block_kv * c if operands == "smem" else 0
    o_tile = 0 if _reuses_q_tile(parts, compute_dtype, out_dtype) else block_q * hd * jnp.dtype(out_dtype).itemsize
    return wgs * (parts * block_q * hd * c + o_tile + p_tile) + stages * per_stage + 64


def mosaic_attention_config(k_len: int, head_dim: int, dtype=jnp.bfloat16, operands: str = "fa3",
                            warp_specialized: bool = False) -> dict:
    """Default tiles: ``block_q`` 64 folded rows per warpgroup (a 64 x 64-128 fp32 score tile and the
    accumulator fit its registers at head_dim 128) and the largest ``block_kv`` (128 or 64; 64 for a cache
    of at most 64 keys) with 2 pipeline stages within the SMEM target: ``SMEM_PER_CTA`` for one warpgroup
    per CTA (two CTAs per SM; 64 keys for bf16 at head_dim 128), ``SMEM_LIMIT`` when warp-specialized (one
    CTA of three warpgroups per SM; 128 keys). Otherwise (fp32: three bf16 parts triple the tiles) 64 keys
    with the most stages, down to 1, within ``SMEM_LIMIT``; ValueError if even that does not fit. Not tuned
    on a GPU yet (``benchmarks/gpu_mosaic.py`` sweeps)."""
    compute_dtype, parts = _compute(dtype)
    hd = _round_up(head_dim, HEAD_ALIGN)
    block_q, wgs = 64, 2 if warp_specialized else 1
    target = SMEM_LIMIT if warp_specialized else SMEM_PER_CTA

    def smem(block_kv, stages):
        return _smem_bytes(block_q, block_kv, hd, stages, parts, compute_dtype, dtype, operands, wgs)

    for block_kv in ((128, 64) if k_len > 64 else (64,)):
        if smem(block_kv, 2) <= target:
            return dict(block_q=block_q, block_kv=block_kv, max_concurrent_steps=2)
    for stages in (3, 2, 1):
        if smem(64, stages) <= SMEM_LIMIT:
            return dict(block_q=block_q, block_kv=64, max_concurrent_steps=stages)
    raise ValueError(f"flash_attention_mgpu: {jnp.dtype(dtype).name} at head_dim {head_dim} does not fit SMEM "
                     f"({smem(64, 1)} bytes at 64 keys, 1 stage{', two warpgroups' if warp_specialized else ''}); "
                     + ("use warp_specialized=False" if warp_specialized else "use bf16 inputs"))


def _products(parts: int):
    """The part products ``(i, j)`` kept: all with ``i + j < parts`` (one for bf16, six for fp32)."""
    return [(i, j) for i in range(parts) for j in range(parts) if i + j < parts]


def _split_regs(x, parts: int, dtype):
    """``parts`` arrays of ``dtype`` whose fp32 sum is ``x`` (fp32) to ``8 * parts`` bits."""
    out = []
    for i in range(parts):
        p = x.astype(dtype)
        out.append(p)
        if i + 1 < parts:
            x = x - p.astype(_F32)
    return out


def _tile_update(carry, q_tiles, k_tiles, v_tiles, valid_tile, p_smem, *, row0, key0, q_start, causal, group,
                 scale2, compute_dtype, operands):
    """One online-softmax step over a K/V tile. carry: m, l ``[block_q]`` (base-2 units), acc ``[block_q, hd]``,
    fp32; q_tiles: SMEM ``[block_q, hd]`` per part; k_tiles: SMEM ``[block_kv, hd]`` (``"fa3"``) or ``[hd,
    block_kv]`` (``"smem"``) per part; v_tiles: SMEM ``[block_kv, hd]`` per part; valid_tile: SMEM int32
    ``[block_kv]``; p_smem: SMEM ``[parts, block_q, block_kv]`` (``"smem"``) or None. ``row0``: the folded
    row of the tile's first query; ``key0``: the slot of its first key."""
    plgpu = mosaic_gpu.plgpu
    parts = len(q_tiles)
    m, l, acc = carry
    shape = (acc.shape[0], valid_tile.shape[0])
    products = _products(parts)
    if operands == "fa3":  # K's tile [block_kv, hd] read transposed by wgmma (a K-major descriptor)
        k_tiles = [plgpu.transpose_ref(t, (1, 0)) for t in k_tiles]

    def qk(s_ref):
        for i, j in products:
            plgpu.wgmma(s_ref, q_tiles[i], k_tiles[j])
        return s_ref[...]

    s = pl.run_scoped(qk, plgpu.ACC(shape, _F32)) * scale2
    mask = lax.broadcast_in_dim(valid_tile[...], shape, (1,)) != 0
    if causal:  # slot <= q_start + row // group, without a division
        row = row0 + lax.broadcasted_iota(jnp.int32, shape, 0)
        rel = key0 - q_start + lax.broadcasted_iota(jnp.int32, shape, 1)
        mask = mask & (row >= rel * group)
    s = jnp.where(mask, s, _MASK)
    m_new = jnp.maximum(m, s.max(axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - lax.broadcast_in_dim(m_new, shape, (0,)))
    l = l * alpha + p.sum(axis=1)
    p_parts = _split_regs(p, parts, compute_dtype)
    if operands == "smem":  # P through SMEM: wgmma's A operand from a tile, not from registers
        for i in range(parts):
            p_smem[i] = p_parts[i]
        plgpu.commit_smem()
        p_parts = [p_smem.at[i] for i in range(parts)]

    def pv(pv_ref):
        for i, j in products:
            plgpu.wgmma(pv_ref, p_parts[i], v_tiles[j])
        return pv_ref[...]

    # P V goes to a fresh (zeroed) accumulator and is added after the rescale (one FMA per element):
    # GPU interpret mode cannot run wgmma into a pre-initialised one (``pl.run_state``).
    pv_tile = pl.run_scoped(pv, plgpu.ACC(acc.shape, _F32))
    return m_new, l, acc * lax.broadcast_in_dim(alpha, acc.shape, (0,)) + pv_tile


def _kv_specs(parts, block_kv, hd, operands, first=0):
    """The pipeline's BlockSpecs: K (or K^T) and V tiles per part, the tile's valid flags; step ``i`` loads
    tile ``first + i``."""
    plgpu = mosaic_gpu.plgpu
    if operands == "fa3":
        k_spec = plgpu.BlockSpec((block_kv, hd), lambda i: (first + i, 0))
    else:  # K^T [hd, k_pad]
        k_spec = plgpu.BlockSpec((hd, block_kv), lambda i: (0, first + i))
    v_spec = plgpu.BlockSpec((block_kv, hd), lambda i: (first + i, 0))
    return [k_spec] * parts + [v_spec] * parts + [plgpu.BlockSpec((block_kv,), lambda i: (first + i,))]


def _init_carry(block_q, hd):
    return jnp.full((block_q,), _MASK, _F32), jnp.zeros((block_q,), _F32), jnp.zeros((block_q, hd), _F32)


def _store_out(o_smem, o_gmem, l, acc, out_dtype):
    plgpu = mosaic_gpu.plgpu
    o_smem[...] = (acc / lax.broadcast_in_dim(l, acc.shape, (0,))).astype(out_dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_gmem)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _kernel(start_ref, *refs, parts, group, rows, block_q, block_kv, n_k_blocks, stages, scale2,
            compute_dtype, out_dtype, operands):
    """One warpgroup per CTA: ``block_q`` folded rows; key tiles before the first query in a pipeline without
    the causal mask, the diagonal ones in a second with it."""
    plgpu = mosaic_gpu.plgpu
    q_refs, k_refs, v_refs = refs[:parts], refs[parts:2 * parts], refs[2 * parts:3 * parts]
    valid_ref, o_ref, q_smem, q_barrier, *scratch = refs[3 * parts:]
    p_smem = scratch.pop() if operands == "smem" else None
    o_smem = scratch.pop() if scratch else q_smem.at[0]  # the q tile is free after the last wgmma
    hd = q_smem.shape[-1]
    b, h = lax.axis_index("batch"), lax.axis_index("heads")
    row0 = lax.axis_index("rows") * block_q
    q_start = start_ref[0]
    first_slot = q_start + lax.div(row0, group)
    last_slot = q_start + lax.div(jnp.minimum(row0 + block_q, rows) - 1, group)
    n_total = jnp.minimum(lax.div(last_slot, block_kv) + 1, n_k_blocks)
    n_full = jnp.minimum(lax.div(first_slot + 1, block_kv), n_total)

    for i in range(parts):
        plgpu.copy_gmem_to_smem(q_refs[i].at[b, h, pl.ds(row0, block_q)], q_smem.at[i], q_barrier)
    plgpu.barrier_wait(q_barrier)
    q_tiles = [q_smem.at[i] for i in range(parts)]

    def key_tiles(lo, hi, causal, carry):
        """Runs the key tiles ``[lo, hi)`` through the pipeline; ``hi - lo`` may be 0."""
        def step(idx, *tiles):
            *tiles, carry = tiles
            return _tile_update(carry, q_tiles, tiles[:parts], tiles[parts:2 * parts], tiles[2 * parts], p_smem,
                                row0=row0, key0=(lo + idx[0]) * block_kv, q_start=q_start, causal=causal,
                                group=group, scale2=scale2, compute_dtype=compute_dtype, operands=operands)

        return plgpu.emit_pipeline(
            step, grid=(hi - lo,), in_specs=_kv_specs(parts, block_kv, hd, operands, lo),
            max_concurrent_steps=stages, init_carry=carry,
        )(*(r.at[b, h] for r in (*k_refs, *v_refs)), valid_ref.at[b])

    carry = key_tiles(0, n_full, False, _init_carry(block_q, hd))
    _, l, acc = key_tiles(n_full, n_total, True, carry)
    _store_out(o_smem, o_ref.at[b, h, pl.ds(row0, block_q)], l, acc, out_dtype)


def _kernel_ws(start_ref, *refs, parts, group, rows, block_q, block_kv, n_k_blocks, stages, scale2,
               compute_dtype, out_dtype, operands):
    """Warp-specialized: two compute warpgroups of ``block_q`` rows each and a memory warpgroup issuing the
    TMA copies of the K/V tiles both consume (``plgpu.emit_pipeline_warp_specialized``). One pipeline over
    the tiles up to the CTA's last query, every tile with the causal mask."""
    plgpu = mosaic_gpu.plgpu
    q_refs, k_refs, v_refs = refs[:parts], refs[parts:2 * parts], refs[2 * parts:3 * parts]
    valid_ref, o_ref, q_smem, q_barriers, *scratch = refs[3 * parts:]
    p_smem = scratch.pop() if operands == "smem" else None
    o_smem = scratch.pop() if scratch else None
    hd = q_smem.shape[-1]
    b, h, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
    cta_row0 = lax.axis_index("rows") * (2 * block_q)
    row0 = cta_row0 + wg * block_q  # meaningful in the compute warpgroups 0 and 1
    q_start = start_ref[0]
    last_slot = q_start + lax.div(jnp.minimum(cta_row0 + 2 * block_q, rows) - 1, group)
    n_total = jnp.minimum(lax.div(last_slot, block_kv) + 1, n_k_blocks)
    q_tiles = [q_smem.at[wg, i] for i in range(parts)]

    def compute(pipeline):
        for i in range(parts):
            plgpu.copy_gmem_to_smem(q_refs[i].at[b, h, pl.ds(row0, block_q)], q_tiles[i], q_barriers.at[wg])
        plgpu.barrier_wait(q_barriers.at[wg])
        _, l, acc = pipeline(_init_carry(block_q, hd))
        out = q_tiles[0] if o_smem is None else o_smem.at[wg]  # the q tile is free after the last wgmma
        _store_out(out, o_ref.at[b, h, pl.ds(row0, block_q)], l, acc, out_dtype)

    def step(idx, *tiles):
        *tiles, carry = tiles
        return _tile_update(carry, q_tiles, tiles[:parts], tiles[parts:2 * parts], tiles[2 * parts],
                            None if p_smem is None else p_smem.at[wg], row0=row0, key0=idx[0] * block_kv,
                            q_start=q_start, causal=True, group=group, scale2=scale2, compute_dtype=compute_dtype,
                            operands=operands)

    plgpu.emit_pipeline_warp_specialized(
        step, grid=(n_total,), memory_registers=40, in_specs=_kv_specs(parts, block_kv, hd, operands),
        max_concurrent_steps=stages, wg_axis="wg", num_compute_wgs=2, compute_context=compute,
    )(*(r.at[b, h] for r in (*k_refs, *v_refs)), valid_ref.at[b])


def _interpret_arg(interpret):
    if interpret is True:
        return mosaic_gpu.interpret_params()
    return interpret or None


def _pad_axis(a, axis: int, size: int):
    if a.shape[axis] == size:
        return a
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, size - a.shape[axis])
    return jnp.pad(a, widths)


OPERANDS = ("fa3", "smem")


@functools.partial(jax.jit, static_argnames=("block_q", "block_kv", "max_concurrent_steps", "operands",
                                             "warp_specialized", "interpret"))
def flash_attention_mgpu(q, k, v, q_start, kv_valid, *, block_q=None, block_kv=None, max_concurrent_steps=None,
                         operands=None, warp_specialized=False, interpret=False):
    """Prefill flash attention on Mosaic GPU; shapes and semantics in the module docstring.

    Args:
      q: ``[batch, q_len, kv_heads, group, head_dim]`` bf16/f16/f32.
      k, v: ``[batch, kv_heads, k_len, head_dim]`` (cast to ``q.dtype``).
      q_start: int32 scalar (may be traced), the slot of the first query.
      kv_valid: ``[batch, k_len]`` bool, or None.
      block_q, block_kv, max_concurrent_steps: tiles and pipeline depth; None: ``mosaic_attention_config``.
      operands: how K^T and P reach wgmma (module docstring): ``"fa3"`` (K's tile transposed by the
        descriptor, P from registers; GPU only) or ``"smem"`` (K transposed by the wrapper, P through
        SMEM; also runs in GPU interpret mode). None: ``"smem"`` in interpret mode, else ``"fa3"``.
      warp_specialized: two compute warpgroups (``2 * block_q`` rows per CTA) and a memory warpgroup
        issuing the TMA copies (module docstring); False: one warpgroup per CTA.
      interpret: False (compile for the GPU), True (GPU interpret mode with default ``InterpretGPUParams``)
        or an ``InterpretGPUParams``.

    Returns:
      ``[batch, q_len, kv_heads, group, head_dim]`` in ``q.dtype``.
    """
    plgpu = mosaic_gpu.require_plgpu()
    batch, q_len, n_kv, group, hd = q.shape
    if k.shape[:2] != (batch, n_kv) or k.shape[3] != hd or v.shape != k.shape:
        raise ValueError(f"flash_attention_mgpu: k {k.shape} and v {v.shape} must be [batch, kv_heads, k_len, "
                         f"head_dim] = [{batch}, {n_kv}, k_len, {hd}] for q {q.shape}")
    k_len = k.shape[2]
    dtype = jnp.dtype(q.dtype)
    compute_dtype, parts = _compute(dtype)
    rows = q_len * group
    operands = operands or ("smem" if interpret else "fa3")
    if operands not in OPERANDS:
        raise ValueError(f"operands must be one of {OPERANDS}, got {operands!r}")
    if operands == "fa3" and interpret:
        raise ValueError('operands="fa3" (transposed SMEM and register wgmma operands) does not run in GPU '
                         'interpret mode; use operands="smem"')
    cfg = mosaic_attention_config(k_len, hd, dtype, operands, warp_specialized)
    block_q = block_q or cfg["block_q"]
    block_kv = block_kv or cfg["block_kv"]
    stages = max_concurrent_steps or cfg["max_concurrent_steps"]
    if block_q not in (64, 128):
        raise ValueError(f"block_q must be 64 or 128 (wgmma rows per warpgroup), got {block_q}")
    if block_kv % 64 or not 64 <= block_kv <= 256:
        raise ValueError(f"block_kv must be a multiple of 64 up to 256, got {block_kv}")
    hd_p = _round_up(hd, HEAD_ALIGN)
    wgs = 2 if warp_specialized else 1  # compute warpgroups per CTA
    rows_p = _round_up(rows, wgs * block_q)
    k_pad = _round_up(k_len, block_kv)
    qf = jnp.transpose(q, (0, 2, 1, 3, 4)).reshape(batch, n_kv, rows, hd)
    qf = _pad_axis(_pad_axis(qf, 2, rows_p), 3, hd_p)
    k, v = (_pad_axis(_pad_axis(a.astype(dtype), 2, k_pad), 3, hd_p) for a in (k, v))
    valid = jnp.ones((batch, k_len), jnp.int32) if kv_valid is None else kv_valid.astype(jnp.int32)
    valid = _pad_axis(valid, 1, k_pad)
    split = (lambda a: split_f32(a, parts)) if parts > 1 else (lambda a: [a])
    start = jnp.asarray(q_start, jnp.int32).reshape(1)
    if operands == "smem":
        k = jnp.swapaxes(k, 2, 3)  # [batch, kv_heads, hd_p, k_pad]: wgmma's B operand for Q K^T as stored

    per_wg = (wgs,) if warp_specialized else ()  # scratch per compute warpgroup
    scratch = [plgpu.SMEM((*per_wg, parts, block_q, hd_p), compute_dtype),  # the q tile (bf16 parts for fp32)
               plgpu.Barrier(num_arrivals=parts, num_barriers=wgs)]  # the q copies
    if not _reuses_q_tile(parts, compute_dtype, dtype):
        scratch.append(plgpu.SMEM((*per_wg, block_q, hd_p), dtype))  # the output tile
    if operands == "smem":
        scratch.append(plgpu.SMEM((*per_wg, parts, block_q, block_kv), compute_dtype))  # P
    threads = dict(num_threads=wgs + 1, thread_name="wg") if warp_specialized else {}
    kernel = plgpu.kernel(
        functools.partial(_kernel_ws if warp_specialized else _kernel, parts=parts, group=group, rows=rows,
                          block_q=block_q, block_kv=block_kv, n_k_blocks=k_pad // block_kv, stages=stages,
                          scale2=_LOG2E / float(np.sqrt(hd)), compute_dtype=compute_dtype, out_dtype=dtype,
                          operands=operands),
        out_type=jax.ShapeDtypeStruct((batch, n_kv, rows_p, hd_p), dtype),
        grid=(n_kv, rows_p // (wgs * block_q), batch),
        grid_names=("heads", "rows", "batch"),
        scratch_types=tuple(scratch),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=_interpret_arg(interpret),
        **threads,
    )
    out = kernel(start, *split(qf), *split(k), *split(v), valid)
    out = out[:, :, :rows, :hd].reshape(batch, n_kv, q_len, group, hd)
    return jnp.transpose(out, (0, 2, 1, 3, 4))
