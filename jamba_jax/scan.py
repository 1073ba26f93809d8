"""Mamba-1 selective scan: the sequential oracle and the chunked associative (parallel) scan, and
the dispatch (``selective_scan(..., impl=...)``) to them, to the one suited to the backend (``"xla"``,
the default) and to the Pallas GPU kernel.

Both functions share one signature with the Pallas kernel in ``pallas_kernels.selective_scan``:

    x, dt, z   [batch, seq, d_inner]   any float dtype (upcast to float32)
    A          [d_inner, d_state]      float32, already ``-exp(A_log)``
    B, C       [batch, seq, d_state]   any float dtype
    D, dt_bias [d_inner]
    initial_state  [batch, d_inner, d_state] float32 or None (zeros)
    mask       [batch, seq] bool or None: False positions are inert (state passes through unchanged)

and return ``(y, final_state)``: ``y [batch, seq, d_inner] float32`` is
``(sum_s h_t[:, s] * C_t[s] + D * x_t) * silu(z_t)`` and ``final_state [batch, d_inner, d_state]``
float32 is the state after the last position.

Recurrence (fp32): ``dt_t = softplus(dt_t + dt_bias)``, ``h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from .sharding import per_shard

_F32 = jnp.float32


def _prepare(x, dt, B, C, D, z, dt_bias, initial_state, mask, softplus=jax.nn.softplus):
    """Upcasts to fp32, applies softplus and the mask (inert position = dt 0, so exp(0*A)=1 and dB x=0)."""
    batch, _, d_inner = x.shape
    d_state = B.shape[-1]
    x, B, C, z = (a.astype(_F32) for a in (x, B, C, z))
    dt = softplus(dt.astype(_F32) + dt_bias.astype(_F32))
    if mask is not None:
        dt = jnp.where(mask[..., None], dt, 0.0)
    if initial_state is None:
        initial_state = jnp.zeros((batch, d_inner, d_state), _F32)
    return x, dt, B, C, D.astype(_F32), z, initial_state.astype(_F32)


def _gate(y, x, D, z):
    return (y + D * x) * jax.nn.silu(z)


# Cheaper elementwise functions for the CPU scan: XLA's CPU ``exp`` (~1.4 ns an element) is most of a scan
# step, and its ``log1p`` (~3.8 ns) most of softplus. Each is within 3e-7 relative of the float64 value.

def _pow2(n):
    """``2^n`` for integer-valued fp32 ``n`` in [-127, 0], built in the exponent bits (-127 gives 0.0)."""
    return lax.bitcast_convert_type((n.astype(jnp.int32) + 127) << 23, _F32)


def exp_nonpositive(v):
    """``exp(v)`` for fp32 ``v <= 0`` (``softplus_series``'s ``e^-|x|``), within 2e-7 relative of the exact value; at or
    below -88 (where exp is subnormal or 0) it is 0. Inputs above 0 are not supported (``2^n`` would overflow).

    A Cody-Waite reduction ``v = n ln2 + r``, ``|r| <= ln2 / 2``, Cephes' degree-5 minimax polynomial
    for ``e^r``, and ``2^n`` built in the exponent bits."""
    v = jnp.maximum(v.astype(_F32), -88.0)
    n = jnp.floor(v * _LOG2E + 0.5)
    r = v - n * _LN2_HI - n * _LN2_LO  # ln2 split so that n * _LN2_HI is exact
    p = _EXP_POLY[0]
    for c in _EXP_POLY[1:]:
        p = p * r + c
    return (1.0 + r + r * r * p) * _pow2(n)


def exp2_nonpositive(w):
    """``2^w`` for fp32 ``w <= 0``, within 2e-7 relative of the exact value down to -126 (the smallest
    normal power); at or below -127 it is 0. Inputs above 0 are not supported.

    ``w = n + f`` with ``n`` the nearest integer (``|f| <= 1/2``, exact), ``2^f`` by a degree-5 polynomial
    (a relative minimax fit, 9e-8 in exact arithmetic) and ``2^n`` built in the exponent bits. Fewer
    operations than ``exp_nonpositive``: the scan folds ``log2(e)`` into ``A`` once, so no ``ln 2``
    reduction is needed per element (a CPU scan step is bound by the operation count of its exp).

    Only adds, multiplies, an integer add and a shift: ``n`` comes from adding 1.5 * 2^23 (which rounds to
    the nearest integer, ties to even, as ``jnp.round``) and ``2^n`` from the low bits of that sum, so no
    rounding or float-to-int instruction is needed. On NVIDIA GPUs those run at the special-function
    unit's rate (16 per clock per SM), not the FMA pipes' (128), and Pallas's Triton lowering has no
    ``round``: this form lets a GPU kernel (``pallas_kernels.selective_scan_single_pass``) move
    exponentials off the exp unit."""
    w = jnp.maximum(w.astype(_F32), -127.0)
    shifted = w + _ROUND_SHIFT  # an fp32 in [2^23, 2^24): its bits are those of _ROUND_SHIFT plus n
    # f = w - n written as w + (-n): XLA folds (w + c) - c to w, but not c - (w + c).
    f = w + (_ROUND_SHIFT - shifted)
    p = _EXP2_POLY[-1]
    for c in _EXP2_POLY[-2::-1]:
        p = p * f + c
    two_n = (lax.bitcast_convert_type(shifted, jnp.int32) + (127 - _ROUND_SHIFT_BITS)) << 23
    return (1.0 + f * p) * lax.bitcast_convert_type(two_n, _F32)


def softplus_series(x):
    """``log(1 + e^x)`` in fp32, within 3e-7 relative: ``max(x, 0) + log1p(u)``, ``u = e^-|x|`` by
    ``exp_nonpositive``, and ``log1p(u) = 2 atanh(s)``, ``s = u / (2 + u) <= 1/3``, by its series to
    ``s^15`` (the next term is below 1e-8 relative). 2.5x faster than ``jax.nn.softplus`` on CPU."""
    x = x.astype(_F32)
    u = exp_nonpositive(-jnp.abs(x))
    s = u / (2.0 + u)
    s2 = s * s
    p = 1.0 / 15
    for k in (13, 11, 9, 7, 5, 3):
        p = p * s2 + 1.0 / k
    return jnp.maximum(x, 0.0) + 2.0 * s * (p * s2 + 1.0)


_LOG2E = 1.4426950408889634
_LN2_HI, _LN2_LO = 0.693359375, -2.12194440e-4
_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
_ROUND_SHIFT, _ROUND_SHIFT_BITS = 12582912.0, 0x4B400000  # 1.5 * 2^23 and its fp32 bit pattern
# 2^f - 1 = f * (c1 + c2 f + ... + c5 f^4) on [-1/2, 1/2], fitted for the least largest relative error.
_EXP2_POLY = (0.6931469775962749, 0.2402224208182124, 0.055507337470971446, 0.009671512822016788,
              0.0013264726223517383)


def _sequential(x, dt, A, B, C, D, z, dt_bias, initial_state, mask, exp=jnp.exp, softplus=jax.nn.softplus,
                a_scale=1.0):
    """The loop behind the sequential scans; ``exp(dt A)`` is ``exp(dt * (A * a_scale))``, so an ``exp`` of
    another base (``exp2_nonpositive`` with ``a_scale = log2(e)``) gets its argument at no cost per step."""
    x, dt, B, C, D, z, h0 = _prepare(x, dt, B, C, D, z, dt_bias, initial_state, mask, softplus)
    A_t = (A.astype(_F32) * a_scale).T  # [d_state, d_inner]

    def step(h, inputs):
        x_t, dt_t, B_t, C_t = inputs  # [batch, d_inner], [batch, d_inner], [batch, d_state] x2
        dA = exp(dt_t[:, None, :] * A_t)
        h = dA * h + (dt_t * x_t)[:, None, :] * B_t[..., None]
        return h, jnp.einsum("bsd,bs->bd", h, C_t)

    seq_first = lambda a: jnp.swapaxes(a, 0, 1)
    h_last, y = lax.scan(step, jnp.swapaxes(h0, 1, 2), tuple(map(seq_first, (x, dt, B, C))))
    return _gate(seq_first(y), x, D, z), jnp.swapaxes(h_last, 1, 2)


def selective_scan_sequential(x, dt, A, B, C, D, z, dt_bias, *, initial_state=None, mask=None):
    """The oracle: one ``lax.scan`` step per position. See the module docstring for shapes.

    The loop carries the state as ``[batch, d_state, d_inner]``: with channels innermost, every array the
    step broadcasts runs along the contiguous axis (on CPU 1.2x faster than ``[.., d_inner, d_state]``)."""
    return _sequential(x, dt, A, B, C, D, z, dt_bias, initial_state, mask)


def _combine(left, right):
    a_l, b_l = left
    a_r, b_r = right
    return a_l * a_r, a_r * b_l + b_r


def selective_scan_associative(
    x, dt, A, B, C, D, z, dt_bias, *, initial_state=None, mask=None, chunk_size: int = 256
):
    """Parallel scan: ``lax.associative_scan`` inside chunks of ``chunk_size`` positions, the state
    carried between chunks by a ``lax.scan``, so the [batch, chunk, d_inner, d_state] intermediate is
    bounded by the chunk, not the sequence. A sequence that is not a multiple of the chunk is padded
    with inert positions. See the module docstring for shapes."""
    x, dt, B, C, D, z, h0 = _prepare(x, dt, B, C, D, z, dt_bias, initial_state, mask)
    A = A.astype(_F32)
    batch, seq, d_inner = x.shape
    chunk = max(1, min(chunk_size, seq))
    n_chunks = -(-seq // chunk)
    pad = n_chunks * chunk - seq

    def to_chunks(a):  # [batch, seq, ...] -> [n_chunks, batch, chunk, ...]; padding has dt = 0
        a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        a = a.reshape(batch, n_chunks, chunk, *a.shape[2:])
        return jnp.swapaxes(a, 0, 1)

    def chunk_step(h, inputs):
        x_c, dt_c, B_c, C_c = inputs
        dA = jnp.exp(dt_c[..., None] * A)  # [batch, chunk, d_inner, d_state]
        dBx = (dt_c * x_c)[..., None] * B_c[:, :, None, :]
        decay, states = lax.associative_scan(_combine, (dA, dBx), axis=1)
        states = states + decay * h[:, None]
        y = jnp.einsum("btds,bts->btd", states, C_c)
        return states[:, -1], y

    h_last, y = lax.scan(chunk_step, h0, tuple(map(to_chunks, (x, dt, B, C))))
    y = jnp.swapaxes(y, 0, 1).reshape(batch, n_chunks * chunk, d_inner)[:, :seq]
    return _gate(y, x, D, z), h_last


# The Pallas kernel configuration that "pallas" uses for prefill (see docs/selective_scan.md for
# the H200 measurements behind it).
PALLAS_SCAN_CONFIG = dict(variant="segmented", block_d=32, chunk=4, segments=None, num_warps=1)
# The single-pass kernel's configuration ("pallas-single"): a starting point, not yet measured on a GPU
# (benchmarks/gpu_scan.py sweeps block_d and the polynomial share; docs/selective_scan.md).
PALLAS_SINGLE_PASS_CONFIG = dict(block_d=8, chunk=8, poly_fraction=0.125, prefetch=True, num_warps=1)
# A decode step (one position) uses the Pallas update up to this batch and the fused XLA update above
# it (H200, Mini widths: the kernel takes 0.38x / 0.70x / 0.94x of XLA's time at batch 1 / 8 / 32, 1.85x at 128).
PALLAS_UPDATE_MAX_BATCH = 32


def selective_scan_xla(x, dt, A, B, C, D, z, dt_bias, *, initial_state=None, mask=None):
    """The XLA scan for the backend: the sequential ``lax.scan`` on CPU (``exp(dt A)`` as
    ``exp2_nonpositive(dt * A log2(e))`` and softplus as ``softplus_series``, which take ~35% off its time),
    the associative scan elsewhere.

    On CPU one fused loop body per position beats the associative scan, whose log-depth levels each
    write ``[batch, chunk, d_inner, d_state]`` operands to memory (a Mamba layer of a 256-token prefill
    chunk: 5.8x faster sequential; docs/generate.md). Accelerators gain from the parallel scan."""
    if jax.default_backend() == "cpu":
        return _sequential(x, dt, A, B, C, D, z, dt_bias, initial_state, mask, exp2_nonpositive, softplus_series,
                           _LOG2E)
    return selective_scan_associative(x, dt, A, B, C, D, z, dt_bias, initial_state=initial_state, mask=mask)


def _selective_scan_pallas(x, dt, A, B, C, D, z, dt_bias, *, initial_state=None, mask=None, interpret=False,
                           single_pass=False):
    """The Pallas kernel on GPU (or in interpret mode); off GPU, ``selective_scan_xla``. The kernel is the
    two-pass ``selective_scan_pallas`` with ``PALLAS_SCAN_CONFIG``, or with ``single_pass`` the single-pass
    ``selective_scan_single_pass`` with ``PALLAS_SINGLE_PASS_CONFIG``. A single
    position (a decode step) goes through the Pallas state update (batch <= ``PALLAS_UPDATE_MAX_BATCH``)
    or the fused XLA one.
    ``pallas_kernels`` is imported here, so the XLA impls never import Pallas. Under a mesh the kernel runs
    on each device's shard of the batch and channels (``sharding.per_shard``)."""
    if not interpret and jax.default_backend() != "gpu":
        return selective_scan_xla(x, dt, A, B, C, D, z, dt_bias, initial_state=initial_state, mask=mask)
    from pallas_kernels import selective_scan as kernels

    if initial_state is None:
        initial_state = jnp.zeros((x.shape[0], x.shape[2], A.shape[-1]), _F32)
    seq_axes, chan_axes, state_axes = ("batch", "seq", "d_inner"), ("d_inner",), ("batch", "d_inner", "d_state")
    in_axes = [seq_axes, seq_axes, ("d_inner", "d_state"), ("batch", "seq", "d_state"), ("batch", "seq", "d_state"),
               chan_axes, seq_axes, chan_axes, state_axes]
    args = [x, dt, A, B, C, D, z, dt_bias, initial_state]
    if mask is not None:
        in_axes.append(("batch", "seq"))
        args.append(mask)

    def run(x, dt, A, B, C, D, z, dt_bias, h0, mask=None):  # on one shard of the batch and channels
        if x.shape[1] == 1:
            step = (h0, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D, z[:, 0], dt_bias)
            step_mask = None if mask is None else mask[:, 0]
            if x.shape[0] <= PALLAS_UPDATE_MAX_BATCH:
                y, h = kernels.selective_state_update_pallas(*step, mask=step_mask, interpret=interpret)
            else:
                y, h = kernels.selective_state_update(*step, mask=step_mask)
            return y[:, None], h
        if single_pass:
            from pallas_kernels.selective_scan_single_pass import selective_scan_single_pass

            return selective_scan_single_pass(x, dt, A, B, C, D, z, dt_bias, initial_state=h0, mask=mask,
                                              interpret=interpret, **PALLAS_SINGLE_PASS_CONFIG)
        return kernels.selective_scan_pallas(x, dt, A, B, C, D, z, dt_bias, initial_state=h0, mask=mask,
                                             interpret=interpret, **PALLAS_SCAN_CONFIG)

    return per_shard(run, in_axes, (seq_axes, state_axes), *args)


SCAN_IMPLS = {
    "xla": selective_scan_xla,
    "sequential": selective_scan_sequential,
    "associative": selective_scan_associative,
    # The Pallas kernel on GPU; "xla" on other backends.
    "pallas": _selective_scan_pallas,
    # The Pallas kernel in interpret mode on any backend (slow; for tests).
    "pallas-interpret": functools.partial(_selective_scan_pallas, interpret=True),
    # The single-pass Pallas kernel (exp2 split between the exp unit and a polynomial) on GPU; "xla" elsewhere.
    "pallas-single": functools.partial(_selective_scan_pallas, single_pass=True),
    "pallas-single-interpret": functools.partial(_selective_scan_pallas, interpret=True, single_pass=True),
}


def selective_scan(x, dt, A, B, C, D, z, dt_bias, *, initial_state=None, mask=None, impl="xla"):
    """Dispatches to the implementation named ``impl`` (a key of ``SCAN_IMPLS``)."""
    try:
        fn = SCAN_IMPLS[impl]
    except KeyError:
        raise ValueError(f"unknown scan implementation {impl!r}; choose one of {sorted(SCAN_IMPLS)}") from None
    return fn(x, dt, A, B, C, D, z, dt_bias, initial_state=initial_state, mask=mask)
