"""Single-pass Mamba-1 selective scan as a Pallas kernel (Triton GPU backend, or interpret mode on CPU), with
the exponentials split between the special-function unit and a polynomial on the FMA pipes.

Same contract as ``pallas_kernels.selective_scan.selective_scan_pallas`` and
``jamba_jax.scan.selective_scan_sequential``:

    x, dt, z       [batch, seq, d_inner]   any float dtype (upcast to float32 in the kernel)
    A              [d_inner, d_state]      float32, already ``-exp(A_log)``
    B, C           [batch, seq, d_state]   any float dtype
    D, dt_bias     [d_inner]
    initial_state  [batch, d_inner, d_state] float32, or None (zeros)
    mask           [batch, seq] bool, or None: False positions are inert (dt 0 after softplus: the state
                   passes through unchanged; y is still computed there)

returns ``y [batch, seq, d_inner] float32`` and ``final_state [batch, d_inner, d_state] float32``.

Design. The grid is ``(d_inner_padded // block_d, batch)``; each program owns ``block_d`` channels of one
batch row and walks the whole sequence in order, in chunks of ``chunk`` positions, with its
``[block_d, d_state_p]`` float32 state carried on chip from the first chunk to the last. x, dt, z, B, C
are read once and y is written once (the two-pass ``"segmented"`` kernel reads x, dt, B twice and computes
every ``exp2`` twice). Within a chunk all row loads are issued before the recurrence, and the chunk is
unrolled, so the exponentials of its positions (which do not depend on the state) can overlap each other
and the loads; the only serial dependence is the one multiply-add ``h = a h + u`` per position. With
``prefetch`` the rows of chunk ``c + 1`` are loaded at the top of chunk ``c``'s step and carried to the
next one, so a program waits for memory only where a chunk's arithmetic is shorter than the load latency
(at batch 1 there are only ``d_inner / block_d`` programs, too few to hide it by switching warps).

One ``exp2`` per (channel, state, position) is the kernel's largest cost on a GPU, and all of them go to
the special-function unit (16 per clock per SM on Hopper) while the FMA pipes (128 lanes) have room.
``poly_fraction`` moves part of them there: positions whose index modulo ``chunk`` is below
``poly_fraction * chunk`` compute ``exp2`` with ``jamba_jax.scan.exp2_nonpositive`` (a degree-5
polynomial, the range reduction by an add of 1.5 * 2^23 and the power of two built in the exponent bits:
adds, multiplies, an integer add and a shift; within 2e-7 relative), the others with ``jnp.exp2`` (one
MUFU.EX2). The split is by position, so every position's arithmetic is one or the other and the trailing
``seq % chunk`` positions follow the same rule; 0 is all ``exp2``, 1 all polynomial.

Padding: d_inner up to a multiple of ``block_d`` and d_state up to a power of two, with x = 0 and
A = B = C = 0 there, so padded channels and state columns stay zero (A = 0 gives ``exp2(0) = 1`` on both
paths); the sequence is not padded. Triton needs every loaded or computed array to have a power-of-two
number of elements, hence power-of-two ``block_d``, ``chunk`` and padded d_state.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jamba_jax.scan import exp2_nonpositive
from pallas_kernels.selective_scan import _LOG2E, _compiler_params, _next_pow2, _silu, _softplus

_F32 = jnp.float32

__all__ = ["selective_scan_single_pass", "poly_positions"]


def poly_positions(poly_fraction: float, chunk: int) -> int:
    """How many of every ``chunk`` positions take the polynomial ``exp2``: ``poly_fraction * chunk``, which
    must be a whole number (``poly_fraction`` in [0, 1], a multiple of ``1 / chunk``)."""
    n = poly_fraction * chunk
    if not 0.0 <= poly_fraction <= 1.0 or abs(n - round(n)) > 1e-9:
        raise ValueError(f"poly_fraction must be a multiple of 1/chunk = 1/{chunk} in [0, 1], got {poly_fraction}")
    return int(round(n))


def _kernel(*refs, seq, chunk, n_poly, prefetch, has_mask, has_h0):
    """One program: channel block ``j`` of batch row ``b``. Refs (batch dim squeezed): x, dt, z [seq, bd];
    b, c [seq, ds] f32; a2 [bd, ds] (A * log2 e); d, bias [bd]; mask [seq, 1] f32 (optional); h0 [bd, ds]
    (optional); outputs y [seq, bd] f32 and the final state [bd, ds] f32."""
    refs = list(refs)
    x_ref, dt_ref, z_ref, b_ref, c_ref, a_ref, d_ref, bias_ref = refs[:8]
    rest = refs[8:]
    m_ref = rest.pop(0) if has_mask else None
    h0_ref = rest.pop(0) if has_h0 else None
    y_ref, h_ref = rest

    a2 = a_ref[...]
    d_skip = d_ref[...]
    bias = bias_ref[...]
    h = h0_ref[...] if has_h0 else jnp.zeros(a2.shape, _F32)

    def load(t):
        rows = (x_ref[t, :], dt_ref[t, :], z_ref[t, :], b_ref[t, :], c_ref[t, :])
        return rows, (m_ref[t, :] if has_mask else None)

    def step(h, t, poly, rows, m):
        """Position ``t``; ``poly`` (static) picks the polynomial exp2 over the exp unit's."""
        x_r, dt_r, z_r, b_r, c_r = (v.astype(_F32) for v in rows)
        dt_s = _softplus(dt_r + bias)
        if has_mask:
            dt_s = jnp.where(m > 0.5, dt_s, 0.0)
        exp2 = exp2_nonpositive if poly else jnp.exp2
        h = exp2(dt_s[:, None] * a2) * h + (dt_s * x_r)[:, None] * b_r[None, :]
        y_r = jnp.sum(h * c_r[None, :], axis=1)
        y_ref[t, :] = (y_r + d_skip * x_r) * _silu(z_r)
        return h

    def load_chunk(c):
        return [load(c * chunk + i) for i in range(chunk)]

    def scan_chunk(h, c, loaded):
        for i, (rows, m) in enumerate(loaded):
            h = step(h, c * chunk + i, i < n_poly, rows, m)
        return h

    def chunk_body(c, h):
        return scan_chunk(h, c, load_chunk(c))  # every load of the chunk issued before its recurrence

    def prefetching_body(c, carry):
        h, loaded = carry
        ahead = load_chunk(jnp.minimum(c + 1, n_chunks - 1))  # the last chunk reloads itself, unused
        return scan_chunk(h, c, loaded), ahead

    def tail_body(poly):
        return lambda t, h: step(h, t, poly, *load(t))

    n_chunks = seq // chunk
    if n_chunks and prefetch:
        h, _ = lax.fori_loop(0, n_chunks, prefetching_body, (h, load_chunk(0)))
    elif n_chunks:
        h = lax.fori_loop(0, n_chunks, chunk_body, h)
    # The short last chunk (seq % chunk positions) by the same rule: its first n_poly positions take the
    # polynomial, the rest exp2 (two loops, so the trace holds two steps, not up to chunk - 1).
    tail, poly_end = n_chunks * chunk, min(seq, n_chunks * chunk + n_poly)
    if poly_end > tail:
        h = lax.fori_loop(tail, poly_end, tail_body(True), h)
    if seq > poly_end:
        h = lax.fori_loop(poly_end, seq, tail_body(False), h)
    h_ref[...] = h


# jitted so that an unused call is dead code (see selective_scan_pallas: flax's nn.scan needs it).
@functools.partial(jax.jit, static_argnames=("block_d", "chunk", "poly_fraction", "prefetch", "num_warps",
                                             "num_stages", "interpret"))
def selective_scan_single_pass(
    x,
    dt,
    A,
    B,
    C,
    D,
    z,
    dt_bias,
    *,
    initial_state=None,
    mask=None,
    block_d: int = 8,
    chunk: int = 8,
    poly_fraction: float = 0.125,
    prefetch: bool = True,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool = False,
):
    """Single-pass fused selective scan; see the module docstring for shapes, dtypes and the design.

    ``block_d`` (channels per program) and ``chunk`` (positions per unrolled step) must be powers of two;
    ``block_d`` is clipped to d_inner rounded up to a power of two. ``poly_fraction``: the share of positions
    whose ``exp2`` is the FMA polynomial (a multiple of ``1 / chunk`` in [0, 1]). ``prefetch``: load the
    next chunk's rows while the current chunk's recurrence runs (one chunk of rows carried). ``num_warps`` /
    ``num_stages`` go to the Triton compiler (ignored in interpret mode); by default one warp per 32 channels
    (1 to 4). Returns ``(y [batch, seq, d_inner] f32, final_state [batch, d_inner, d_state] f32)``.
    """
    batch, seq, d_inner = x.shape
    d_state = A.shape[-1]
    if _next_pow2(block_d) != block_d or _next_pow2(chunk) != chunk:
        raise ValueError(f"block_d ({block_d}) and chunk ({chunk}) must be powers of two")
    n_poly = poly_positions(poly_fraction, chunk)
    block_d = min(block_d, _next_pow2(d_inner))
    if num_warps is None:
        num_warps = max(1, min(4, block_d // 32))
    d_pad = -(-d_inner // block_d) * block_d
    ds = _next_pow2(d_state)

    def pad_to(a, shape):
        pads = [(0, n - k) for k, n in zip(a.shape, shape)]
        return a if not any(p for _, p in pads) else jnp.pad(a, pads)

    x, dt, z = (pad_to(a, (batch, seq, d_pad)) for a in (x, dt, z))
    B, C = (pad_to(a.astype(_F32), (batch, seq, ds)) for a in (B, C))  # tiny: f32 spares a convert per channel
    a2 = pad_to(A.astype(_F32) * _LOG2E, (d_pad, ds))
    d_vec, bias_vec = (pad_to(a.astype(_F32), (d_pad,)) for a in (D, dt_bias))

    seq_block = pl.BlockSpec((None, seq, block_d), lambda j, b: (b, 0, j))
    seq_whole = pl.BlockSpec((None, seq, ds), lambda j, b: (b, 0, 0))
    state_block = pl.BlockSpec((None, block_d, ds), lambda j, b: (b, j, 0))
    channel = pl.BlockSpec((block_d,), lambda j, b: (j,))
    operands = [x, dt, z, B, C, a2, d_vec, bias_vec]
    in_specs = [seq_block] * 3 + [seq_whole] * 2 + [pl.BlockSpec((block_d, ds), lambda j, b: (j, 0)), channel, channel]
    if mask is not None:
        operands.append(mask.astype(_F32)[..., None])  # [batch, seq, 1]
        in_specs.append(pl.BlockSpec((None, seq, 1), lambda j, b: (b, 0, 0)))
    if initial_state is not None:
        operands.append(pad_to(initial_state.astype(_F32), (batch, d_pad, ds)))
        in_specs.append(state_block)

    kernel = functools.partial(_kernel, seq=seq, chunk=chunk, n_poly=n_poly, prefetch=prefetch,
                               has_mask=mask is not None, has_h0=initial_state is not None)
    y, h_final = pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct((batch, seq, d_pad), _F32),
            jax.ShapeDtypeStruct((batch, d_pad, ds), _F32),
        ),
        grid=(d_pad // block_d, batch),
        in_specs=in_specs,
        out_specs=(seq_block, state_block),
        interpret=interpret,
        compiler_params=None if interpret else _compiler_params(num_warps, num_stages),
        name="selective_scan_single_pass",
    )(*operands)
    if d_pad != d_inner or ds != d_state:
        y, h_final = y[..., :d_inner], h_final[:, :d_inner, :d_state]
    return y, h_final
