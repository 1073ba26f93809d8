"""ExpertsInt8 grouped matmul as a Mosaic GPU (Pallas) kernel: the Hopper twin of ``int8_ragged_dot``.

Same contract as ``int8_ragged_dot_reference`` / ``int8_ragged_dot_pallas``: ``lhs [M, K]`` (bf16, f16 or
f32) with rows sorted by expert, ``q int8 [E, K, N]``, ``scale f32 [E, N]``, ``group_sizes int32 [E]``
(``group_sizes[e]`` rows for expert ``e``; rows past the sum are padding and come out as zeros) ->
``[M, N]`` in ``preferred_element_type``, fp32 accumulation.

Public API
----------
int8_ragged_dot_mgpu(lhs, q, scale, group_sizes, *, preferred_element_type, interpret, block_*)
mosaic_config(rows, k, n, lhs_dtype, out_dtype)      the default tiles for a problem size
work_items(group_sizes, m, block_m)                   the routing table the kernel reads

Design
------
* **Work items.** Each expert's rows are cut into ``block_m``-row chunks, and the padding rows past
  ``sum(group_sizes)`` form one more group (the "padding group", index ``E``). A group's first chunk
  starts at the multiple of 8 at or before its first row (Mosaic GPU's TMA lowering needs the lhs tile's
  first row to be a provable multiple of 8), so up to 7 rows of the previous group ride along in it,
  computed and not stored. A work item is (group, first row / 8, skip, rows): it owns rows ``[row0 +
  skip, row0 + skip + rows)``. At most ``cdiv(M + 7 (E + 1), block_m) + E`` items (the static size of
  the table), valid ones first, in row order. The wrapper computes the table with a few XLA ops on
  ``group_sizes`` (int32 ``[4, W]``); the kernel reads four scalars of it from GMEM.
* **Grid** ``(N / block_n, W)``, one CTA (one warpgroup) per (column tile, work item). An item with no
  rows returns at once, so an expert that gets no rows costs no weight loads: a decode step reads exactly
  the weight columns of the experts it routes to, once per chunk.
* **K pipeline** (``plgpu.emit_pipeline``, ``max_concurrent_steps`` stages): per step, TMA bulk copies of
  the lhs tile ``[block_m, block_k]`` and of the int8 weight tile ``[block_k, block_n]`` of the item's
  expert into SMEM, completion on a barrier per stage, with up to ``stages - 1`` later steps' copies in
  flight. The step loads the int8 tile into registers, converts it to bf16 (exact: ``|q| <= 127``),
  stores it to a bf16 SMEM tile, fences (``commit_smem``) and issues ``wgmma`` (A = lhs tile, B = the
  bf16 weight tile, fp32 accumulator in registers), then waits for it before the stage is refilled.
  The padding group runs the pipeline for 0 steps (dynamic trip count), so its accumulator stays 0.
* **fp32 lhs.** wgmma has no IEEE fp32 mode (fp32 operands run as tf32). Since the weights are exact in
  bf16, the wrapper splits the fp32 lhs into three bf16 parts (``hi + mid + lo``, 24 significand bits
  together) and each step issues one wgmma per part into the same fp32 accumulator: every product is
  exact in fp32, so the result is as accurate as an fp32 matmul (3x the MMA work, same weight traffic).
* **Epilogue.** The expert's scale row ``scale[e, n-tile]`` is TMA-copied to SMEM at the start (own
  barrier), broadcast over the rows and multiplied into the accumulator, cast to the output dtype and
  stored to an SMEM tile; the item's own rows go back to GMEM as TMA stores of power-of-two row counts
  (binary decomposition of the row count, at most ``log2(block_m) + 1`` stores), so rows of other
  experts in the same output region are never touched and no zero-initialised output is needed: every
  row below ``M`` belongs to exactly one item (expert or padding group).
* Lowering semantics ``Warpgroup``: SMEM swizzle/tiling transforms and register layouts are left to
  Mosaic GPU's inference.

Shapes: ``block_m`` is 64 or 128 (wgmma M per warpgroup), ``block_n`` a multiple of 16 up to 256,
``block_k`` a multiple of 64 (16 and 32 fail Mosaic's layout inference when lowering). The wrapper pads: lhs rows to a multiple of 8 plus ``block_m`` (every chunk's TMA load
stays in bounds; TMA wants whole 8-row tiles) and ``K`` up to ``block_k``; ``q``/``scale`` only when
``block_k``/``block_n`` do not divide ``K``/``N`` (a full weight copy: pick tiles that divide the real
model's dims; ``mosaic_config`` does for Jamba's 4096/14336).

Testing: ``interpret=True`` (or an ``InterpretGPUParams``) runs the kernel in Pallas's GPU interpret mode
on any backend (``tests/test_mosaic_kernels.py``). ``jax.jit(...).trace(...).lower(lowering_platforms=
("cuda",))`` runs Mosaic GPU's own lowering (layout inference, TMA/wgmma lowering) without a GPU; the
test file does that for the Jamba-1.5-Mini shapes. Not yet compiled to PTX, run or timed on a GPU:
``benchmarks/gpu_mosaic.py`` does that.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import mosaic_gpu

__all__ = ["int8_ragged_dot_mgpu", "mosaic_config", "split_f32", "work_items"]

SMEM_BUDGET = 200 * 1024  # bytes of SMEM the tiles may use (H100/H200: 227 KiB per block)
ROW_ALIGN = 8  # a chunk's first row is a multiple of this (the TMA lowering of the lhs tile needs it)


def _round_up(x: int, m: int) -> int:
  return (x + m - 1) // m * m


def _fit(block: int, dim: int, smallest: int) -> int:
  """``block`` halved until it divides ``dim`` (not below ``smallest``); if none does, the smaller of
  ``block`` and ``dim`` rounded up to 16 (the wrapper then pads)."""
  b = block
  while b > smallest and dim % b:
    b //= 2
  return b if dim % b == 0 else min(block, _round_up(dim, 16))


def _smem_bytes(block_m, block_n, block_k, stages, parts, compute_dtype, out_dtype) -> int:
  c = jnp.dtype(compute_dtype).itemsize
  per_stage = parts * block_m * block_k * c + block_k * block_n  # lhs parts + int8 weight tile
  return (stages * per_stage + block_k * block_n * c  # bf16 weight tile
          + block_m * block_n * jnp.dtype(out_dtype).itemsize + 4 * block_n + 64)


def _compute(lhs_dtype):
  """(MMA operand dtype, number of lhs parts) for an lhs dtype."""
  return mosaic_gpu.mma_operands(lhs_dtype, "int8_ragged_dot_mgpu")


def mosaic_config(rows: int, k: int, n: int, lhs_dtype=jnp.bfloat16, out_dtype=jnp.bfloat16) -> dict:
  """Default tiles for ``rows`` lhs rows and a ``[E, k, n]`` weight: 64-row chunks (128 past 256 rows),
  weight tiles of ``block_k`` = 64 rows (``k`` padded up to a multiple) by ``block_n`` = 128 columns
  (halved down to 64 until it divides ``n``, else ``n`` rounded up to 16 if smaller), 4 pipeline stages
  or fewer to fit ``SMEM_BUDGET``. Not tuned on a GPU yet (``benchmarks/gpu_mosaic.py`` sweeps)."""
  compute_dtype, parts = _compute(lhs_dtype)
  block_m = 64 if rows <= 256 else 128
  block_n = _fit(128, n, 64)
  block_k = 64
  stages = 4
  while stages > 2 and _smem_bytes(block_m, block_n, block_k, stages, parts, compute_dtype,
                                   out_dtype) > SMEM_BUDGET:
    stages -= 1
  return dict(block_m=block_m, block_n=block_n, block_k=block_k, max_concurrent_steps=stages)


def split_f32(x: jax.Array, parts: int = 3) -> list[jax.Array]:
  """bf16 arrays whose fp32 sum is ``x`` (fp32) to 24 significand bits (exact for ``parts=3`` up to the
  last bit's rounding): each part is the bf16 rounding of what the previous parts left."""
  out, rest = [], x.astype(jnp.float32)
  for _ in range(parts):
    p = rest.astype(jnp.bfloat16)
    out.append(p)
    rest = rest - p.astype(jnp.float32)
  return out


def work_items(group_sizes: jax.Array, m: int, block_m: int) -> jax.Array:
  """The kernel's routing table, int32 ``[4, W]``, one column per work item: its group (expert
  ``0..E-1``, or ``E`` for the padding rows past ``sum(group_sizes)``), its first row divided by
  ``ROW_ALIGN``, ``skip`` and ``rows``: the item covers rows ``[row0, row0 + block_m)`` of which
  ``[row0 + skip, row0 + skip + rows)`` are its group's (``0 < rows <= block_m - skip``). Unused columns at
  the end have group ``E`` and ``rows`` 0.

  Each group's rows are cut into ``block_m``-row chunks starting at the ``ROW_ALIGN``-aligned row at or
  before the group's first row (``skip < ROW_ALIGN`` rows of the previous group ride along in its first
  chunk and are not stored): Mosaic GPU's TMA lowering needs the lhs tile's first row to be a provable
  multiple of 8. A group past ``m`` rows is clipped. Over the ``E + 1`` groups, ``sum_g cdiv(size_g +
  skip_g, block_m) <= cdiv(m + 7 (E + 1), block_m) + E = W``."""
  num_experts = group_sizes.shape[0]
  gs = jnp.maximum(group_sizes.astype(jnp.int32), 0)
  ends = jnp.minimum(jnp.cumsum(gs), m)
  starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
  sizes = jnp.concatenate([ends - starts, jnp.asarray(m, jnp.int32)[None] - ends[-1:]])  # [E + 1]
  starts = jnp.concatenate([starts, ends[-1:]])
  first = starts // ROW_ALIGN * ROW_ALIGN  # the aligned first row of each group's first chunk
  counts = jnp.where(sizes > 0, (starts + sizes - first + block_m - 1) // block_m, 0)
  cum = jnp.cumsum(counts)  # inclusive
  num_items = pl.cdiv(m + (ROW_ALIGN - 1) * (num_experts + 1), block_m) + num_experts
  w = jnp.arange(num_items, dtype=jnp.int32)
  group = jnp.minimum(jnp.sum((cum[None, :] <= w[:, None]).astype(jnp.int32), axis=1), num_experts)
  valid = w < cum[-1]
  row0 = first[group] + (w - (cum[group] - counts[group])) * block_m
  lo = jnp.maximum(row0, starts[group])
  hi = jnp.minimum(row0 + block_m, starts[group] + sizes[group])
  table = [jnp.where(valid, group, num_experts), row0 // ROW_ALIGN, lo - row0, hi - lo]
  return jnp.stack([jnp.where(valid, t, 0) if i else t for i, t in enumerate(table)]).astype(jnp.int32)


def _store_rows(o_smem, o_gmem, row0, skip, rows, n0, block_m: int, block_n: int) -> None:
  """TMA-stores rows ``[skip, skip + rows)`` of ``o_smem`` to the same rows counted from ``row0``, columns
  ``[n0, n0 + block_n)``, of ``o_gmem`` (``rows <= block_m``): one store per set bit of ``rows``, largest
  first (a TMA box has a static shape, hence the power-of-two sizes)."""
  start = skip
  size = block_m
  while size >= 1:
    bit = lax.bitwise_and(rows, jnp.int32(size))

    @pl.when(bit != 0)
    def _store(start=start, size=size):
      mosaic_gpu.plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(start, size)],
                                         o_gmem.at[pl.ds(row0 + start, size), pl.ds(n0, block_n)])

    start = start + bit
    size //= 2


def _kernel(table_ref, *refs, num_parts, num_experts, num_k, block_m, block_n, block_k, stages,
            compute_dtype, out_dtype):
  plgpu = mosaic_gpu.plgpu
  x_refs = refs[:num_parts]
  q_ref, s_ref, o_ref, w_smem, s_smem, o_smem, s_barrier = refs[num_parts:]
  n0 = lax.axis_index("n") * block_n
  item = lax.axis_index("item")
  group = table_ref[0, item]
  row0 = table_ref[1, item] * ROW_ALIGN  # provably aligned (see work_items)
  skip = table_ref[2, item]
  rows = table_ref[3, item]
  expert = jnp.minimum(group, num_experts - 1)  # the padding group reads expert E-1's scales (times 0)

  @pl.when(rows > 0)
  def _item():
    plgpu.copy_gmem_to_smem(s_ref.at[expert, pl.ds(n0, block_n)], s_smem, s_barrier)

    def acc_scope(acc_ref):
      def k_step(_, *tiles):
        *x_tiles, q_tile = tiles
        w_smem[...] = q_tile[...].astype(compute_dtype)  # int8 -> bf16 on chip, exact
        plgpu.commit_smem()  # the stores must be visible to wgmma (async proxy)
        for x_tile in x_tiles:  # 1 part (bf16/f16 lhs) or 3 (fp32 lhs split in bf16)
          plgpu.wgmma(acc_ref, x_tile, w_smem)
        plgpu.wgmma_wait(0)  # w_smem and the stage's tiles are reused next step

      steps = jnp.where(group < num_experts, jnp.int32(num_k), jnp.int32(0))  # padding group: no loads
      plgpu.emit_pipeline(
          k_step,
          grid=(steps,),
          # pl.Element: the index map gives the chunk's first row itself (a multiple of 8, not of block_m)
          in_specs=[plgpu.BlockSpec((pl.Element(block_m), block_k), lambda k: (row0, k))] * num_parts
          + [plgpu.BlockSpec((block_k, block_n), lambda k: (k, 0))],
          max_concurrent_steps=stages,
      )(*x_refs, q_ref.at[expert, :, pl.ds(n0, block_n)])
      return acc_ref[...]

    # Register (accumulator) allocations may not share a run_scoped with SMEM ones.
    acc = pl.run_scoped(acc_scope, plgpu.ACC((block_m, block_n), jnp.float32))
    plgpu.barrier_wait(s_barrier)
    scale = lax.broadcast_in_dim(s_smem[...], (block_m, block_n), (1,))
    o_smem[...] = (acc * scale).astype(out_dtype)
    plgpu.commit_smem()
    _store_rows(o_smem, o_ref, row0, skip, rows, n0, block_m, block_n)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _interpret_arg(interpret):
  if interpret is True:
    return mosaic_gpu.interpret_params()
  return interpret or None


@functools.partial(jax.jit, static_argnames=("block_m", "block_n", "block_k", "max_concurrent_steps",
                                             "preferred_element_type", "interpret"))
def int8_ragged_dot_mgpu(lhs, q, scale, group_sizes, *, block_m=None, block_n=None, block_k=None,
                         max_concurrent_steps=None, preferred_element_type=jnp.float32, interpret=False):
  """Grouped int8-weight matmul on Mosaic GPU, same semantics as ``int8_ragged_dot_reference``.

  Args:
    lhs: [M, K] bf16/f16/f32 activations, rows sorted by expert.
    q: int8 [E, K, N]; scale: f32 [E, N]; group_sizes: int32 [E], sum <= M.
    block_m, block_n, block_k, max_concurrent_steps: tiles and pipeline depth; None: ``mosaic_config``.
    preferred_element_type: output dtype (fp32 accumulation regardless).
    interpret: False (compile for the GPU), True (GPU interpret mode with default ``InterpretGPUParams``)
      or an ``InterpretGPUParams``.

  Returns:
    [M, N] preferred_element_type; rows past sum(group_sizes) are 0.
  """
  plgpu = mosaic_gpu.require_plgpu()
  m, k = lhs.shape
  num_experts, k2, n = q.shape
  if k != k2 or scale.shape != (num_experts, n) or group_sizes.shape != (num_experts,):
    raise ValueError(f"int8_ragged_dot_mgpu: shapes lhs {lhs.shape}, q {q.shape}, scale {scale.shape}, "
                     f"group_sizes {group_sizes.shape} do not fit [M, K], [E, K, N], [E, N], [E]")
  out_dtype = jnp.dtype(preferred_element_type)
  compute_dtype, num_parts = _compute(lhs.dtype)
  if m == 0:
    return jnp.zeros((0, n), out_dtype)
  cfg = mosaic_config(m, k, n, lhs.dtype, out_dtype)
  block_m = block_m or cfg["block_m"]
  block_n = block_n or cfg["block_n"]
  block_k = block_k or cfg["block_k"]
  stages = max_concurrent_steps or cfg["max_concurrent_steps"]
  if block_m not in (64, 128):
    raise ValueError(f"block_m must be 64 or 128 (wgmma rows per warpgroup), got {block_m}")
  if block_n % 16 or not 16 <= block_n <= 256 or block_k % 64:
    raise ValueError(f"block_n must be a multiple of 16 up to 256 and block_k a multiple of 64, got "
                     f"{block_n}, {block_k}")

  kp, np_ = _round_up(k, block_k), _round_up(n, block_n)
  num_k = kp // block_k
  stages = max(1, min(stages, num_k))
  parts = split_f32(lhs) if num_parts == 3 else [lhs]
  # A chunk starts at a row < M and its TMA load reads block_m rows; TMA wants whole 8-row tiles.
  mp = _round_up(m, ROW_ALIGN) + block_m
  parts = [jnp.pad(p, ((0, mp - m), (0, kp - k))) for p in parts]
  if kp != k or np_ != n:
    q = jnp.pad(q, ((0, 0), (0, kp - k), (0, np_ - n)))
  scale = scale.astype(jnp.float32)
  if np_ != n:
    scale = jnp.pad(scale, ((0, 0), (0, np_ - n)))
  table = work_items(group_sizes, m, block_m)

  kernel = plgpu.kernel(
      functools.partial(_kernel, num_parts=num_parts, num_experts=num_experts, num_k=num_k,
                        block_m=block_m, block_n=block_n, block_k=block_k, stages=stages,
                        compute_dtype=compute_dtype, out_dtype=out_dtype),
      out_type=jax.ShapeDtypeStruct((m, np_), out_dtype),
      grid=(np_ // block_n, table.shape[1]),
      grid_names=("n", "item"),
      scratch_types=(
          plgpu.SMEM((block_k, block_n), compute_dtype),  # the converted weight tile (wgmma B)
          plgpu.SMEM((block_n,), jnp.float32),  # the expert's scales for this column tile
          plgpu.SMEM((block_m, block_n), out_dtype),  # the output tile
          plgpu.Barrier(num_arrivals=1),  # the scale copy
      ),
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=_interpret_arg(interpret),
  )
  out = kernel(table, *parts, q, scale)
  return out if np_ == n else out[:, :n]
