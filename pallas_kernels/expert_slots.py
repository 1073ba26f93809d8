"""The MoE at decode sizes as a Pallas kernel: each slot multiplies its rows by one expert's weight, read
straight from the stacked ``[experts, in, out]`` array, so a step reads only the experts its tokens were
routed to (never the whole stack).

Public API
----------
slot_matmul_pallas(lhs, w, scale, slot_expert, ...)  -> [slots, rows, out]
slot_matmul_reference(lhs, w, scale, slot_expert)     the same in XLA (dynamic slices of the stack)

``slot_expert [slots]`` int32 names each slot's expert; a slot whose id is at or past the expert count is
unused: its output is 0 and it loads no weight tile (its K loop has no iterations). ``lhs`` is ``[rows, in]``
(every slot multiplies the same rows: the gate and up projections of the tokens) or ``[slots, rows, in]``
(a slot's own rows: the down projection of its hidden activations). ``w`` is float, or int8 with ``scale``
``[experts, out]`` fp32 (ExpertsInt8: the int8 tile is cast to the activation dtype in registers, fp32
accumulation, the scale applied per output column after the K loop).

Design (generic Pallas: the Triton GPU backend and interpret mode): grid ``(slots, out // block_n)``; the
slot ids are a whole-array input read with a scalar load (scalar prefetch is TPU only), the weight is a
whole-array ref indexed ``w[e, k-tile, n-tile]`` with the slot's expert ``e``. Rows are padded to 16
(Triton's smallest dot); a decode step has at most ``experts / top_k`` tokens, so one row block.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

__all__ = ["slot_matmul_pallas", "slot_matmul_reference", "slot_block_n"]

MIN_ROWS = 16


def slot_matmul_reference(lhs, w, scale, slot_expert, *, preferred_element_type=None):
  """XLA path of ``slot_matmul_pallas`` (same arguments): one ``dot`` per slot on ``w[e]`` (a dynamic slice;
  an unused slot reads expert ``experts - 1`` and its output is zeroed)."""
  out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
  num_experts = w.shape[0]
  outs = []
  for s in range(slot_expert.shape[0]):
    e = jnp.minimum(slot_expert[s], num_experts - 1)
    a = lhs if lhs.ndim == 2 else lhs[s]
    y = jnp.dot(a, w[e].astype(a.dtype), preferred_element_type=jnp.float32)
    if scale is not None:
      y = y * scale[e].astype(jnp.float32)
    outs.append(jnp.where(slot_expert[s] < num_experts, y, 0.0).astype(out_dtype))
  return jnp.stack(outs)


def slot_block_n(slots: int, n: int) -> int:
  """Columns per program: 128, halved (down to 32) while the grid has fewer than 256 programs (a decode
  step of one token has 2 slots; the down projection's ``n`` is the hidden width). A starting point for
  the GPU, not a tuned value."""
  block_n = 128
  while block_n > 32 and slots * -(-n // block_n) < 256:
    block_n //= 2
  return block_n


def _kernel(slot_ref, x_ref, w_ref, *rest, num_experts, shared_lhs, block_n, block_k, num_k, compute_dtype,
            precision):
  s_ref = rest[0] if len(rest) == 2 else None
  o_ref = rest[-1]
  s = pl.program_id(0)
  n0 = pl.multiple_of(pl.program_id(1) * block_n, block_n)
  e = slot_ref[s]
  used = (e < num_experts).astype(jnp.int32)
  e = jnp.minimum(e, num_experts - 1)
  rows = o_ref.shape[1]

  def body(kk, acc):
    k0 = pl.multiple_of(kk * block_k, block_k)
    if shared_lhs:
      x = x_ref[:, pl.ds(k0, block_k)]
    else:
      x = x_ref[s, :, pl.ds(k0, block_k)]
    w = w_ref[e, pl.ds(k0, block_k), pl.ds(n0, block_n)].astype(compute_dtype)
    return acc + jnp.dot(x.astype(compute_dtype), w, preferred_element_type=jnp.float32, precision=precision)

  acc = lax.fori_loop(0, num_k * used, body, jnp.zeros((rows, block_n), jnp.float32))
  if s_ref is not None:
    acc = acc * s_ref[e, pl.ds(n0, block_n)][None, :]
  o_ref[0] = acc.astype(o_ref.dtype)


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _full_spec(shape):
  return pl.BlockSpec(tuple(shape), lambda *_: (0,) * len(shape))


@functools.partial(jax.jit, static_argnames=("block_n", "block_k", "num_warps", "num_stages",
                                             "preferred_element_type", "interpret"))
def slot_matmul_pallas(lhs, w, scale, slot_expert, *, block_n=None, block_k=128, num_warps=4, num_stages=3,
                       preferred_element_type=None, interpret=False):
  """``out[s] = lhs(s) @ w[slot_expert[s]]`` (times ``scale[slot_expert[s]]`` per column for int8 ``w``).

  Args:
    lhs: ``[rows, in]`` (shared by every slot) or ``[slots, rows, in]``, bf16 or fp32.
    w: ``[experts, in, out]``: float, or int8 with ``scale``.
    scale: ``[experts, out]`` fp32 for int8 ``w``; None for float ``w``.
    slot_expert: ``[slots]`` int32; ids at or past ``experts`` mark unused slots (output 0, no weight read).
    block_n, block_k: column / contraction tiles (powers of two >= 16); ``block_n`` None: ``slot_block_n``.
    num_warps, num_stages: Triton compiler parameters (ignored in interpret mode).
    preferred_element_type: output dtype (default ``lhs.dtype``); fp32 accumulation regardless.
    interpret: run in the Pallas interpreter (any backend; for tests).

  Returns:
    ``[slots, rows, out]``. ``in`` and ``out`` need not be multiples of the tiles (the weight is then
    padded: a whole copy; pick tiles that divide the real widths).
  """
  shared = lhs.ndim == 2
  slots = slot_expert.shape[0]
  rows, k = lhs.shape[-2:]
  num_experts, k2, n = w.shape
  if k != k2:
    raise ValueError(f"slot_matmul: lhs contracts {k} columns, the weight {k2} rows")
  if not shared and lhs.shape[0] != slots:
    raise ValueError(f"slot_matmul: lhs has {lhs.shape[0]} slots, slot_expert {slots}")
  if (scale is None) == (w.dtype == jnp.int8):
    raise ValueError("slot_matmul: an int8 weight needs its scale, a float weight none")
  block_n = block_n or slot_block_n(slots, n)
  while block_k > 16 and k % block_k:
    block_k //= 2
  while block_n > 16 and n % block_n:
    block_n //= 2
  out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
  compute_dtype = lhs.dtype
  precision = lax.Precision.HIGHEST if compute_dtype == jnp.float32 else None

  mp, kp, np_ = _round_up(max(rows, MIN_ROWS), MIN_ROWS), _round_up(k, block_k), _round_up(n, block_n)
  pad_rows = ((0, mp - rows), (0, kp - k))
  x = jnp.pad(lhs, pad_rows if shared else ((0, 0),) + pad_rows)
  if kp != k or np_ != n:
    w = jnp.pad(w, ((0, 0), (0, kp - k), (0, np_ - n)))
  ins = [slot_expert.astype(jnp.int32), x, w]
  if scale is not None:
    ins.append(jnp.pad(scale.astype(jnp.float32), ((0, 0), (0, np_ - n))))
  compiler_params = None
  if not interpret:
    from jax.experimental.pallas import triton as plgpu

    compiler_params = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
  kernel = functools.partial(_kernel, num_experts=num_experts, shared_lhs=shared, block_n=block_n,
                             block_k=block_k, num_k=kp // block_k, compute_dtype=compute_dtype,
                             precision=precision)
  out = pl.pallas_call(
      kernel,
      grid=(slots, np_ // block_n),
      in_specs=[_full_spec(a.shape) for a in ins],
      out_specs=pl.BlockSpec((1, mp, block_n), lambda s, j: (s, 0, j)),
      out_shape=jax.ShapeDtypeStruct((slots, mp, np_), out_dtype),
      compiler_params=compiler_params,
      interpret=interpret,
      name="expert_slot_matmul",
  )(*ins)
  return out[:, :rows, :n]
