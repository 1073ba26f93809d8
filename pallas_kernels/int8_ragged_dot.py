"""ExpertsInt8 grouped matmul (Jamba-1.5 paper, sec. 3.1) as a Pallas kernel.

Expert weights are stored as int8 with one fp32 scale per (expert, output
column).  The matmul loads int8 weight tiles, casts them to the activation
dtype in registers, accumulates in fp32 and applies the per-column scale in
the epilogue, so the weights never exist in bf16 in HBM.

Public API
----------
quantize_int8(w)                      -> (q int8 [E, K, N], scale f32 [E, N])
int8_ragged_dot_reference(lhs, q, scale, group_sizes)   pure-XLA path
int8_ragged_dot_pallas(lhs, q, scale, group_sizes, ...)  Pallas kernel

Conventions (same as ``jax.lax.ragged_dot``): ``lhs`` is [M, K] with its rows
sorted by expert, ``group_sizes[e]`` rows for expert ``e`` (int32 [E]);
rows past ``sum(group_sizes)`` are padding and produce zeros.

Kernel design (Pallas, works on the Triton GPU backend and in interpret mode):
no scalar prefetch (TPU only), so the routing metadata is computed in the
wrapper as small int32 arrays that are passed as ordinary whole-array inputs
and read with scalar loads inside the kernel.  The int8 weights, the lhs and
the scales are whole-array refs sliced with ``pl.ds`` (dynamic expert index).

* ``design="group"`` (default): grid (work_items, n_tiles) with
  work_items = cdiv(M, block_m) + E (static bound).  Each expert's rows are cut
  into block_m-row chunks starting at the expert's first row; each program
  handles one (expert, chunk) pair and writes only that expert's rows with a
  masked store into a zero-initialised aliased output.  Programs write
  disjoint rows, so there is no race, and each weight tile is read once per
  chunk (no re-reads caused by tiles straddling experts).
* ``design="item"``: as "group" but with global m-tiles (row0 = tile *
  block_m); a tile straddling experts appears once per expert it touches.
* ``design="tile"``: grid (m_tiles, n_tiles).  Each program owns one
  [block_m, block_n] output tile and loops over the (tile, expert) work items
  that overlap its rows (dynamic trip count), each doing a K loop; rows of
  other experts are masked out with ``where``.  One program per output tile,
  hence race-free, plain blocked output store.
* ``swap_ab=True`` computes each tile as (q_tile^T @ lhs_tile^T)^T, putting the
  weight tile in the MMA's A slot (decode-sized block_m).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

try:  # Triton-specific helpers (masked store, compiler params).
  from jax.experimental.pallas import triton as plgpu
except Exception:  # pragma: no cover - very old / stripped jax builds
  plgpu = None

__all__ = [
    "quantize_int8",
    "int8_ragged_dot_reference",
    "int8_ragged_dot_float64",
    "int8_ragged_dot_pallas",
]


# --------------------------------------------------------------------------
# Quantization
# --------------------------------------------------------------------------
def quantize_int8(w: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Symmetric per-(expert, output-channel) int8 quantization.

  Args:
    w: float array [E, K, N] (K = input dim, N = output dim).

  Returns:
    q: int8 [E, K, N] = clamp(round(w / scale), -127, 127) (0 where scale==0).
    scale: float32 [E, N] = max_k |w[e, k, n]| / 127.
  """
  w32 = w.astype(jnp.float32)
  scale = jnp.max(jnp.abs(w32), axis=1) / 127.0  # [E, N]
  safe = jnp.where(scale == 0, 1.0, scale)
  q = jnp.round(w32 / safe[:, None, :])
  q = jnp.where(scale[:, None, :] == 0, 0.0, q)
  q = jnp.clip(q, -127, 127).astype(jnp.int8)
  return q, scale.astype(jnp.float32)


# --------------------------------------------------------------------------
# Pure-XLA reference
# --------------------------------------------------------------------------
def _row_expert(group_sizes: jax.Array, m: int):
  """Expert id (int32 [M], clipped to E-1) and validity mask (bool [M])."""
  ends = jnp.cumsum(group_sizes.astype(jnp.int32))
  rows = jnp.arange(m, dtype=jnp.int32)
  expert = jnp.sum((rows[:, None] >= ends[None, :]).astype(jnp.int32), axis=1)
  valid = rows < ends[-1]
  expert = jnp.minimum(expert, group_sizes.shape[0] - 1)
  return expert, valid


def int8_ragged_dot_float64(lhs, q, scale, group_sizes):
  """The float64 numpy oracle of the grouped matmul (for tests and benchmarks): rows of group ``e`` times
  the dequantized expert ``e``; rows past the groups are 0. Returns a float64 numpy array."""
  import numpy as np

  x = np.asarray(jnp.asarray(lhs, jnp.float32), np.float64)
  w = np.asarray(q, np.float64) * np.asarray(scale, np.float64)[:, None, :]
  out = np.zeros((x.shape[0], w.shape[2]))
  start = 0
  for e, g in enumerate(np.asarray(group_sizes)):
    out[start:start + g] = x[start:start + g] @ w[e]
    start += g
  return out


def int8_ragged_dot_reference(lhs, q, scale, group_sizes, *,
                              preferred_element_type=jnp.float32):
  """XLA path: ragged_dot with the int8 weights cast to lhs.dtype, then scale.

  Args:
    lhs: [M, K] float (bf16 or f32), rows grouped by expert.
    q: int8 [E, K, N].
    scale: float32 [E, N].
    group_sizes: int32 [E], sum <= M.
    preferred_element_type: output dtype.

  Returns:
    [M, N] preferred_element_type; rows past sum(group_sizes) are 0.
  """
  m = lhs.shape[0]
  out = lax.ragged_dot(lhs, q.astype(lhs.dtype), group_sizes.astype(jnp.int32),
                       preferred_element_type=jnp.float32)
  expert, valid = _row_expert(group_sizes, m)
  row_scale = jnp.take(scale.astype(jnp.float32), expert, axis=0)  # [M, N]
  out = jnp.where(valid[:, None], out * row_scale, 0.0)
  return out.astype(preferred_element_type)


# --------------------------------------------------------------------------
# Routing metadata (computed in the wrapper, static sizes)
# --------------------------------------------------------------------------
def _make_metadata(group_sizes: jax.Array, m_rows: int, block_m: int,
                   group_aligned: bool = False):
  """Builds the (m-tile, expert) work-item list.

  Args:
    group_sizes: int32 [E].
    m_rows: number of (unpadded) lhs rows M.
    block_m: row tile.

  Returns dict of int32 arrays:
    group_start, group_end: [E] row range of each expert (clamped to M).
    item_expert, item_row0, item_valid: [W], W = cdiv(M, block_m) + E; valid
      items come first, ordered by expert (hence also by row).  Invalid items
      have expert 0, row0 0 and valid 0.  item_row0 is tile * block_m
      (global tiles, designs "tile"/"item") or, with group_aligned=True
      (design "group"), group_start + chunk * block_m: each expert's rows are
      cut into cdiv(g_e, block_m) chunks starting at its first row, so no
      chunk holds two experts' rows (sum_e cdiv(g_e, bm) <= cdiv(M, bm) + E).
    tile_items: [T + 1] with items of tile t at [tile_items[t],
      tile_items[t+1]) (design "tile").
  """
  gs = group_sizes.astype(jnp.int32)
  num_experts = gs.shape[0]
  num_tiles = pl.cdiv(m_rows, block_m)
  num_items = num_tiles + num_experts
  ends = jnp.minimum(jnp.cumsum(gs), m_rows)
  starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
  nonempty = ends > starts
  if group_aligned:
    first_tile = jnp.zeros_like(starts)
    counts = jnp.where(nonempty, (ends - starts + block_m - 1) // block_m, 0)
  else:
    first_tile = starts // block_m
    last_tile = jnp.maximum(ends - 1, 0) // block_m
    counts = jnp.where(nonempty, last_tile - first_tile + 1, 0)
  cum = jnp.cumsum(counts)  # inclusive
  total = cum[-1]
  w = jnp.arange(num_items, dtype=jnp.int32)
  expert = jnp.sum((cum[None, :] <= w[:, None]).astype(jnp.int32), axis=1)
  valid = w < total
  expert = jnp.where(valid, jnp.minimum(expert, num_experts - 1), 0)
  offset = cum[expert] - counts[expert]  # exclusive cumsum at expert
  tile = jnp.where(valid, first_tile[expert] + (w - offset), 0)
  if group_aligned:
    row0 = jnp.where(valid, starts[expert] + tile * block_m, 0)
  else:
    row0 = tile * block_m
  # Items of tile t: count of valid items with tile < t (items sorted by tile).
  sort_tile = jnp.where(valid, tile, num_tiles)
  t = jnp.arange(num_tiles + 1, dtype=jnp.int32)
  tile_items = jnp.sum((sort_tile[None, :] < t[:, None]).astype(jnp.int32),
                       axis=1)
  return dict(
      group_start=starts.astype(jnp.int32),
      group_end=ends.astype(jnp.int32),
      item_expert=expert.astype(jnp.int32),
      item_row0=row0.astype(jnp.int32),
      item_valid=valid.astype(jnp.int32),
      tile_items=tile_items.astype(jnp.int32),
  )


# --------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------
def _k_loop(x_ref, q_ref, e, row0, n0, *, block_m, block_n, block_k, num_k,
            compute_dtype, precision, swap_ab):
  """fp32 [block_m, block_n] = lhs[row0:+bm, :] @ q[e][:, n0:+bn] (unscaled).

  int8 weight tiles are cast to compute_dtype in registers.  With swap_ab the
  product is formed as (q^T lhs^T) [block_n, block_m] so the weight tile is the
  MMA's A operand (better for tiny block_m); the result is transposed back.
  """

  def body(kk, acc):
    k0 = pl.multiple_of(kk * block_k, block_k)
    x = x_ref[pl.ds(row0, block_m), pl.ds(k0, block_k)].astype(compute_dtype)
    w = q_ref[e, pl.ds(k0, block_k), pl.ds(n0, block_n)].astype(compute_dtype)
    if swap_ab:
      d = lax.dot_general(w, x, (((0,), (1,)), ((), ())),
                          preferred_element_type=jnp.float32,
                          precision=precision)
    else:
      d = jnp.dot(x, w, preferred_element_type=jnp.float32,
                  precision=precision)
    return acc + d

  shape = (block_n, block_m) if swap_ab else (block_m, block_n)
  acc = lax.fori_loop(0, num_k, body, jnp.zeros(shape, jnp.float32))
  return acc.T if swap_ab else acc


def _tile_kernel(tile_items_ref, item_expert_ref, gstart_ref, gend_ref,
                 x_ref, q_ref, s_ref, o_ref, *, block_m, block_n, block_k,
                 num_k, compute_dtype, precision, swap_ab):
  """Grid (m_tiles, n_tiles); o_ref is the [block_m, block_n] output block."""
  t = pl.program_id(0)
  j = pl.program_id(1)
  row0 = pl.multiple_of(t * block_m, block_m)
  n0 = pl.multiple_of(j * block_n, block_n)
  lo = tile_items_ref[t]
  hi = tile_items_ref[t + 1]
  rows = row0 + lax.broadcasted_iota(jnp.int32, (block_m, block_n), 0)

  def item_body(i, acc):
    e = item_expert_ref[i]
    part = _k_loop(x_ref, q_ref, e, row0, n0, block_m=block_m,
                   block_n=block_n, block_k=block_k, num_k=num_k,
                   compute_dtype=compute_dtype, precision=precision,
                   swap_ab=swap_ab)
    s = s_ref[e, pl.ds(n0, block_n)]  # f32 [block_n]
    mask = (rows >= gstart_ref[e]) & (rows < gend_ref[e])
    return acc + jnp.where(mask, part * s[None, :], 0.0)

  acc = lax.fori_loop(lo, hi, item_body,
                      jnp.zeros((block_m, block_n), jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


def _item_kernel(item_expert_ref, item_row0_ref, item_valid_ref, gstart_ref,
                 gend_ref, x_ref, q_ref, s_ref, zeros_ref, o_ref, *, block_m,
                 block_n, block_k, num_k, compute_dtype, precision, swap_ab):
  """Grid (work_items, n_tiles); o_ref is the whole (zero-initialised) output.

  Work item w covers rows [row0, row0 + block_m) of expert e and stores only
  the rows of e (masked store); items write disjoint rows, so no races.
  """
  del zeros_ref  # aliased with o_ref
  w = pl.program_id(0)
  j = pl.program_id(1)
  e = item_expert_ref[w]
  valid = item_valid_ref[w]
  row0 = item_row0_ref[w]
  n0 = pl.multiple_of(j * block_n, block_n)
  acc = _k_loop(x_ref, q_ref, e, row0, n0, block_m=block_m, block_n=block_n,
                block_k=block_k, num_k=num_k * valid,
                compute_dtype=compute_dtype, precision=precision,
                swap_ab=swap_ab)
  s = s_ref[e, pl.ds(n0, block_n)]
  acc = acc * s[None, :]
  rows = row0 + lax.broadcasted_iota(jnp.int32, (block_m, block_n), 0)
  mask = (rows >= gstart_ref[e]) & (rows < gend_ref[e]) & (valid > 0)
  plgpu.store(o_ref.at[pl.ds(row0, block_m), pl.ds(n0, block_n)],
              acc.astype(o_ref.dtype), mask=mask)


# --------------------------------------------------------------------------
# Wrapper
# --------------------------------------------------------------------------
def _round_up(x: int, m: int) -> int:
  return (x + m - 1) // m * m


def _full_spec(shape):
  nd = len(shape)
  return pl.BlockSpec(tuple(shape), lambda *_: (0,) * nd)


@functools.partial(
    jax.jit,
    static_argnames=("block_m", "block_n", "block_k", "design", "swap_ab",
                     "num_warps", "num_stages", "preferred_element_type",
                     "interpret"))
def int8_ragged_dot_pallas(lhs, q, scale, group_sizes, *, block_m=None,
                           block_n=128, block_k=128, design="group",
                           swap_ab=False, num_warps=4, num_stages=4,
                           preferred_element_type=jnp.float32,
                           interpret=False):
  """Grouped int8-weight matmul, same semantics as int8_ragged_dot_reference.

  Args:
    lhs: [M, K] bf16 (or f32) activations, rows sorted by expert.
    q: int8 [E, K, N] quantized expert weights.
    scale: float32 [E, N] per-(expert, output column) scale.
    group_sizes: int32 [E], sum(group_sizes) <= M.
    block_m: row tile (power of two >= 16); None: 16 if M <= 128 else 64.
    block_n, block_k: column / reduction tiles (powers of two >= 16).
    design: "group" (default; one program per (expert, block_m-row chunk of
      that expert's rows), masked stores, each weight tile read once per
      chunk), "item" (one program per (global m-tile, expert) pair, masked
      stores) or "tile" (one program per output tile looping over the
      experts in it; plain blocked store).
    swap_ab: compute (q^T lhs^T)^T so the weight tile is the MMA A operand.
    num_warps, num_stages: Triton compiler parameters (ignored in interpret).
    preferred_element_type: output dtype (fp32 accumulation regardless).
    interpret: run the Pallas interpreter (CPU testing).

  Returns:
    [M, N] preferred_element_type; rows past sum(group_sizes) are 0.

  M, K, N need not be multiples of the blocks: lhs/scale are padded, and q is
  padded only when K % block_k or N % block_n is nonzero (a full weight copy;
  pick blocks dividing K and N for real models).
  """
  m, k = lhs.shape
  num_experts, k2, n = q.shape
  assert k == k2, (lhs.shape, q.shape)
  assert scale.shape == (num_experts, n), scale.shape
  assert group_sizes.shape == (num_experts,), group_sizes.shape
  if design not in ("tile", "item", "group"):
    raise ValueError(f"unknown design {design!r}")
  if block_m is None:  # H200 sweep: 16 best up to M=128 rows, 64 at M=512
    block_m = 16 if m <= 128 else 64
  for b in (block_m, block_n, block_k):
    if b < 16 or b & (b - 1):
      raise ValueError(f"block sizes must be powers of two >= 16, got {b}")

  compute_dtype = lhs.dtype
  if compute_dtype == jnp.float32:
    precision = lax.Precision.HIGHEST  # IEEE fp32 on GPU (not tf32)
  else:
    precision = None

  mp = _round_up(max(m, 1), block_m)
  if design == "group":
    mp += block_m  # chunks start at group starts: row0 + block_m <= M - 1 + bm
  kp = _round_up(k, block_k)
  np_ = _round_up(n, block_n)
  x = lhs
  if mp != m or kp != k:
    x = jnp.pad(lhs, ((0, mp - m), (0, kp - k)))
  qp = q
  if kp != k or np_ != n:
    qp = jnp.pad(q, ((0, 0), (0, kp - k), (0, np_ - n)))
  sp = scale.astype(jnp.float32)
  if np_ != n:
    sp = jnp.pad(sp, ((0, 0), (0, np_ - n)))

  meta = _make_metadata(group_sizes, m, block_m,
                        group_aligned=(design == "group"))
  num_tiles = mp // block_m
  num_n = np_ // block_n
  num_k = kp // block_k
  out_dtype = jnp.dtype(preferred_element_type)
  kw = dict(block_m=block_m, block_n=block_n, block_k=block_k, num_k=num_k,
            compute_dtype=compute_dtype, precision=precision, swap_ab=swap_ab)
  compiler_params = None
  if plgpu is not None:
    compiler_params = plgpu.CompilerParams(num_warps=num_warps,
                                           num_stages=num_stages)

  if design == "tile":
    ins = (meta["tile_items"], meta["item_expert"], meta["group_start"],
           meta["group_end"], x, qp, sp)
    out = pl.pallas_call(
        functools.partial(_tile_kernel, **kw),
        grid=(num_tiles, num_n),
        in_specs=[_full_spec(a.shape) for a in ins],
        out_specs=pl.BlockSpec((block_m, block_n), lambda t, j: (t, j)),
        out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        compiler_params=compiler_params,
        interpret=interpret,
        name="int8_ragged_dot_tile",
    )(*ins)
  else:
    if plgpu is None:
      raise NotImplementedError(f"design={design!r} needs plgpu.store")
    zeros = jnp.zeros((mp, np_), out_dtype)
    ins = (meta["item_expert"], meta["item_row0"], meta["item_valid"],
           meta["group_start"], meta["group_end"], x, qp, sp, zeros)
    num_items = meta["item_expert"].shape[0]
    out = pl.pallas_call(
        functools.partial(_item_kernel, **kw),
        grid=(num_items, num_n),
        in_specs=[_full_spec(a.shape) for a in ins],
        out_specs=_full_spec((mp, np_)),
        out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        input_output_aliases={len(ins) - 1: 0},
        compiler_params=compiler_params,
        interpret=interpret,
        name=f"int8_ragged_dot_{design}",
    )(*ins)
  return out[:m, :n]
