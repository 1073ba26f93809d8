"""Fused Mamba-1 selective scan as a Pallas kernel (Triton GPU backend, or interpret mode on CPU).

Same contract as ``jamba_jax.scan.selective_scan_sequential``:

    x, dt, z       [batch, seq, d_inner]   any float dtype (upcast to float32 in the kernel)
    A              [d_inner, d_state]      float32, already ``-exp(A_log)``
    B, C           [batch, seq, d_state]   any float dtype
    D, dt_bias     [d_inner]
    initial_state  [batch, d_inner, d_state] float32, or None (zeros)
    mask           [batch, seq] bool, or None: False positions are inert (dt treated as 0 after
                   softplus, so the state passes through unchanged; y is still computed there)

returns ``y [batch, seq, d_inner] float32`` and ``final_state [batch, d_inner, d_state] float32``.

Kernel layout. The grid is ``(d_inner_padded // block_d, batch)``. Each program keeps the state of
its ``block_d`` channels on chip as a ``[block_d, d_state_p]`` float32 value carried through a
``fori_loop`` (``d_state_p`` is d_state rounded up to a power of two) and walks all ``seq``
positions: per position it reads one row of x/dt/z (``[block_d]``, contiguous) and of B/C
(``[d_state_p]``), and writes one row of y. Softplus(dt + dt_bias), the mask, exp(dt A) (as exp2
with A pre-scaled by log2 e), the B x input, the C contraction, the D skip and the silu(z) gate are
all fused. Padded channels and padded state columns have x = 0, A = B = C = 0 and a zero initial
state, so they stay zero and contribute nothing; the sequence is never padded. The wrapper casts
B and C (small) to float32 and leaves x/dt/z in their dtype (bf16 halves the kernel's reads).

Four ``variant``s (all compute the same thing):

* ``"loop"``:   ``fori_loop`` over positions; each step loads its rows and stores one y row.
* ``"unroll"``: ``fori_loop`` over chunks of ``chunk`` positions; the chunk is unrolled in Python
                and all its row loads are issued before the recurrence, so their latencies overlap.
* ``"tile"``:   ``fori_loop`` over chunks; x/dt/z/B/C are loaded as ``[chunk, block_d]`` /
                ``[chunk, d_state_p]`` tiles, softplus and the gate are applied tile-wide, each
                step picks its row out of the tile with a one-hot masked sum (Triton cannot index a
                register tile dynamically) and the y tile is stored once per chunk.

On the Triton backend ``"unroll"`` is expected to be the fastest (the Triton compiler does not
software-pipeline these loads by itself); ``block_d = 32`` with one warp lets Triton do the
per-channel work (softplus, gate) once per channel instead of once per thread holding part of a
state row. ``"tile"`` compiles to many shuffles and is kept as an alternative to measure.

* ``"segmented"``: a two-pass time-parallel scan for long sequences at small batch, where the
                variants above run only ``batch * d_inner / block_d`` programs, each a serial walk
                over the whole sequence. The sequence is cut into ``segments`` runs of ``seg_len``
                positions (a multiple of ``chunk``). Pass 1 (grid ``(d blocks, batch, segments - 1)``)
                scans every segment but the last from a zero state, reading only x/dt/B (and the
                mask), and writes the segment's end state and its sum of softplus(dt): the
                segment's total decay is ``exp(A * sum dt)`` because A is constant per channel.
                Pass 2 (grid ``(d blocks, batch, segments)``) first folds the earlier segments'
                results into its true initial state (``h = exp(A sum_k) h + h_k``, at most
                ``segments - 1`` tiny steps per program), then walks its segment exactly like
                ``"unroll"``, writing y; the last segment writes the final state. Pass 1 costs
                about 40% of pass 2's reads; in exchange there are ``segments`` times as many
                programs to hide the latency of the serial recurrence.

The chunked variants handle ``seq % chunk`` trailing positions with the ``"loop"`` step.
Triton needs every loaded/computed array to have a power-of-two number of elements, hence
power-of-two ``block_d``, ``chunk`` and ``d_state_p``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

try:  # Triton compiler params; only used when lowering for GPU.
    from jax.experimental.pallas import triton as _pl_triton
except Exception:  # pragma: no cover - absent from some builds
    _pl_triton = None

_F32 = jnp.float32
_LOG2E = 1.4426950408889634  # exp(v) = exp2(v * log2 e); A is pre-scaled so the kernel uses exp2
VARIANTS = ("loop", "unroll", "tile", "segmented")
# "segmented" with segments=None aims for at least this many programs (cut into segments of at
# least _MIN_SEG_LEN positions): enough warps to keep every SM of an H100/H200 busy.
_TARGET_PROGRAMS = 8192
_MIN_SEG_LEN = 256

__all__ = ["selective_scan_pallas", "selective_state_update", "selective_state_update_pallas", "VARIANTS"]


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _softplus(v):
    # jax.nn.softplus's formula (logaddexp(v, 0)); exp2 of a pre-scaled argument lowers to one
    # MUFU.EX2 on GPU where exp goes through a longer libdevice range reduction.
    return jnp.maximum(v, 0.0) + jnp.log1p(jnp.exp2(jnp.abs(v) * -_LOG2E))


def _silu(v):
    return v / (1.0 + jnp.exp2(v * -_LOG2E))


def _scan_kernel(*refs, seq, chunk, variant, has_mask, has_h0, seg_len=None, n_seg=1):
    """One program: channel block ``j`` of batch row ``b`` (and segment ``s`` when ``seg_len`` is
    set). Refs (batch dim squeezed): x, dt, z [seq, bd]; b, c [seq, ds]; a2 [bd, ds] (A * log2 e);
    d, bias [bd]; mask [seq, 1] (optional); h0 [bd, ds] (optional); with ``seg_len``, pass 1's
    segment end states [n_seg - 1, bd, ds] and dt sums [n_seg - 1, bd]; outputs y [seq, bd] f32,
    h [bd, ds] f32."""
    refs = list(refs)
    x_ref, dt_ref, z_ref, b_ref, c_ref, a_ref, d_ref, bias_ref = refs[:8]
    rest = refs[8:]
    m_ref = rest.pop(0) if has_mask else None
    h0_ref = rest.pop(0) if has_h0 else None
    if seg_len is not None:
        hseg_ref, dtsum_ref = rest.pop(0), rest.pop(0)
    y_ref, h_ref = rest

    a2 = a_ref[...].astype(_F32)  # [bd, ds]
    d_skip = d_ref[...].astype(_F32)  # [bd]
    bias = bias_ref[...].astype(_F32)
    h = h0_ref[...].astype(_F32) if has_h0 else jnp.zeros(a2.shape, _F32)
    start = 0
    if seg_len is not None:  # fold the earlier segments into this segment's initial state
        s = pl.program_id(2)
        start = s * seg_len

        def fold(k, h):
            return jnp.exp2(a2 * dtsum_ref[k, :][:, None]) * h + hseg_ref[k, :, :]

        h = lax.fori_loop(0, s, fold, h)

    def load_rows(t):
        """Inputs of position t: x, dt, z [bd]; B, C [ds]; mask [1] or None."""
        rows = (x_ref[t, :], dt_ref[t, :], z_ref[t, :], b_ref[t, :], c_ref[t, :])
        return rows, (m_ref[t, :] if has_mask else None)

    def step(h, t, rows, m):
        x_r, dt_r, z_r, b_r, c_r = (v.astype(_F32) for v in rows)
        dt_s = _softplus(dt_r + bias)
        if has_mask:
            dt_s = jnp.where(m > 0.5, dt_s, 0.0)
        h = jnp.exp2(dt_s[:, None] * a2) * h + (dt_s * x_r)[:, None] * b_r[None, :]
        y_r = jnp.sum(h * c_r[None, :], axis=1)  # [bd]
        y_ref[t, :] = (y_r + d_skip * x_r) * _silu(z_r)
        return h

    def position_body(t, h):
        rows, m = load_rows(t)
        return step(h, t, rows, m)

    def unroll_body(c, h):
        base = start + c * chunk
        loaded = [load_rows(base + i) for i in range(chunk)]  # issue every load first
        for i, (rows, m) in enumerate(loaded):
            h = step(h, base + i, rows, m)
        return h

    def tile_body(c, h):
        sl = pl.ds(pl.multiple_of(c * chunk, chunk), chunk)
        xt = x_ref[sl, :].astype(_F32)  # [T, bd]
        dtt = _softplus(dt_ref[sl, :].astype(_F32) + bias[None, :])
        if has_mask:
            dtt = jnp.where(m_ref[sl, :] > 0.5, dtt, 0.0)  # mask tile [T, 1]
        dt_cols = dtt.T  # [bd, T]: step i reads column i, in the state's orientation
        u_cols = (dtt * xt).T
        bt = b_ref[sl, :].astype(_F32)  # [T, ds]
        ct = c_ref[sl, :].astype(_F32)
        col_id = lax.broadcasted_iota(jnp.int32, (1, chunk), 1)
        row_id = lax.broadcasted_iota(jnp.int32, (chunk, 1), 0)
        y_cols = jnp.zeros(dt_cols.shape, _F32)
        for i in range(chunk):
            on_col, on_row = col_id == i, row_id == i
            dt_i = jnp.sum(jnp.where(on_col, dt_cols, 0.0), axis=1, keepdims=True)  # [bd, 1]
            u_i = jnp.sum(jnp.where(on_col, u_cols, 0.0), axis=1, keepdims=True)
            b_i = jnp.sum(jnp.where(on_row, bt, 0.0), axis=0, keepdims=True)  # [1, ds]
            c_i = jnp.sum(jnp.where(on_row, ct, 0.0), axis=0, keepdims=True)
            h = jnp.exp2(dt_i * a2) * h + u_i * b_i
            y_i = jnp.sum(h * c_i, axis=1, keepdims=True)  # [bd, 1]
            y_cols = jnp.where(on_col, y_i, y_cols)
        gate = _silu(z_ref[sl, :].astype(_F32))
        y_ref[sl, :] = (y_cols.T + d_skip[None, :] * xt) * gate
        return h

    if seg_len is not None:  # every segment but the last is full; the last may be short
        count = jnp.minimum(seg_len, seq - start)
        n_chunks = count // chunk
        h = lax.fori_loop(0, n_chunks, unroll_body, h)
        h = lax.fori_loop(start + n_chunks * chunk, start + count, position_body, h)

        @pl.when(s == n_seg - 1)
        def _():
            h_ref[...] = h

        return
    if variant == "loop":
        n_chunks, tail_start = 0, 0
    else:
        n_chunks = seq // chunk
        tail_start = n_chunks * chunk
    if n_chunks:
        body = unroll_body if variant == "unroll" else tile_body
        h = lax.fori_loop(0, n_chunks, body, h)
    if tail_start < seq:
        h = lax.fori_loop(tail_start, seq, position_body, h)
    h_ref[...] = h


def _segment_state_kernel(*refs, seg_len, chunk, has_mask):
    """Pass 1 of ``"segmented"``: program (channel block j, batch row b, segment s) scans the
    ``seg_len`` positions of segment s from a zero state. Refs (batch dim squeezed): x, dt [seq, bd];
    b [seq, ds]; a2 [bd, ds]; bias [bd]; mask [seq, 1] (optional); outputs: the segment's end state
    [bd, ds] f32 and its sum of softplus(dt) [bd] f32 (the segment's decay is exp2(a2 * sum))."""
    x_ref, dt_ref, b_ref, a_ref, bias_ref = refs[:5]
    m_ref = refs[5] if has_mask else None
    hseg_ref, dtsum_ref = refs[-2:]
    a2 = a_ref[...].astype(_F32)
    bias = bias_ref[...].astype(_F32)
    start = pl.program_id(2) * seg_len

    def body(c, carry):
        h, acc = carry
        base = start + c * chunk
        loaded = [(x_ref[base + i, :], dt_ref[base + i, :], b_ref[base + i, :],
                   m_ref[base + i, :] if has_mask else None) for i in range(chunk)]
        for x_r, dt_r, b_r, m in loaded:
            dt_s = _softplus(dt_r.astype(_F32) + bias)
            if has_mask:
                dt_s = jnp.where(m > 0.5, dt_s, 0.0)
            h = jnp.exp2(dt_s[:, None] * a2) * h + (dt_s * x_r.astype(_F32))[:, None] * b_r.astype(_F32)[None, :]
            acc = acc + dt_s
        return h, acc

    init = (jnp.zeros(a2.shape, _F32), jnp.zeros(bias.shape, _F32))
    h, acc = lax.fori_loop(0, seg_len // chunk, body, init)
    hseg_ref[...] = h
    dtsum_ref[...] = acc


def _segment_length(seq, chunk, segments, programs):
    """``seg_len`` (a multiple of ``chunk``) and the resulting number of segments; ``segments``
    None picks enough segments to reach ``_TARGET_PROGRAMS`` programs, each at least
    ``_MIN_SEG_LEN`` positions long."""
    if segments is None:
        want = _next_pow2(max(1, -(-_TARGET_PROGRAMS // programs)))
        segments = max(1, min(want, seq // _MIN_SEG_LEN))
    seg_len = -(-max(1, -(-seq // segments)) // chunk) * chunk
    return seg_len, -(-seq // seg_len)


def _with_segment_axis(spec):
    """The same block for every segment: a (j, b) index map extended to the grid (j, b, s)."""
    return pl.BlockSpec(spec.block_shape, lambda j, b, s: spec.index_map(j, b))


def _compiler_params(num_warps, num_stages):
    if _pl_triton is None:
        return None
    return _pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


# jitted (here and below) so that an unused call is dead code: XLA's DCE drops a jit call whose outputs
# are unused, but never a bare pallas_call, and flax's nn.scan (newer versions) rejects a scan body
# whose "broadcast" trace keeps any computation on the scanned inputs.
@functools.partial(jax.jit, static_argnames=("block_d", "chunk", "variant", "segments", "num_warps", "num_stages",
                                             "interpret"))
def selective_scan_pallas(
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
    block_d: int = 32,
    chunk: int = 8,
    variant: str = "unroll",
    segments: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool = False,
):
    """Fused selective scan; see the module docstring for shapes, dtypes and the variants.

    ``block_d`` (channels per program) and ``chunk`` (positions per unrolled/tile step) must be
    powers of two; ``block_d`` is clipped to d_inner rounded up to a power of two. d_inner is
    padded up to a multiple of ``block_d`` and d_state up to a power of two (with A = B = C = 0).
    ``segments`` (``"segmented"`` only): how many time segments to cut the sequence into (None:
    enough for about 8192 programs, segments of at least 256 positions); one segment is ``"unroll"``.
    ``num_warps``/``num_stages`` go to the Triton compiler (ignored in interpret mode); by default
    one warp per 32 channels (1 to 4).
    Returns ``(y [batch, seq, d_inner] f32, final_state [batch, d_inner, d_state] f32)``.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    batch, seq, d_inner = x.shape
    d_state = A.shape[-1]
    if _next_pow2(block_d) != block_d or _next_pow2(chunk) != chunk:
        raise ValueError(f"block_d ({block_d}) and chunk ({chunk}) must be powers of two")
    block_d = min(block_d, _next_pow2(d_inner))
    if num_warps is None:
        num_warps = max(1, min(4, block_d // 32))
    d_pad = -(-d_inner // block_d) * block_d
    ds = _next_pow2(d_state)
    pad_d, pad_s = d_pad - d_inner, ds - d_state

    def pad_to(a, shape):
        pads = [(0, n - k) for k, n in zip(a.shape, shape)]
        return a if not any(p for _, p in pads) else jnp.pad(a, pads)

    x, dt, z = (pad_to(a, (batch, seq, d_pad)) for a in (x, dt, z))
    # B and C are tiny next to x/dt/z; f32 saves the kernel a conversion per element per channel.
    B, C = (pad_to(a.astype(_F32), (batch, seq, ds)) for a in (B, C))
    a2 = pad_to(A.astype(_F32) * _LOG2E, (d_pad, ds))
    d_vec, bias_vec = (pad_to(a.astype(_F32), (d_pad,)) for a in (D, dt_bias))

    seq_block = pl.BlockSpec((None, seq, block_d), lambda j, b: (b, 0, j))
    seq_whole = pl.BlockSpec((None, seq, ds), lambda j, b: (b, 0, 0))
    state_block = pl.BlockSpec((None, block_d, ds), lambda j, b: (b, j, 0))
    operands = [x, dt, z, B, C, a2, d_vec, bias_vec]
    in_specs = [seq_block] * 3 + [seq_whole] * 2 + [
        pl.BlockSpec((block_d, ds), lambda j, b: (j, 0)),
        pl.BlockSpec((block_d,), lambda j, b: (j,)),
        pl.BlockSpec((block_d,), lambda j, b: (j,)),
    ]
    has_mask = mask is not None
    if has_mask:
        operands.append(mask.astype(_F32)[..., None])  # [batch, seq, 1]
        in_specs.append(pl.BlockSpec((None, seq, 1), lambda j, b: (b, 0, 0)))
    has_h0 = initial_state is not None
    if has_h0:
        operands.append(pad_to(initial_state.astype(_F32), (batch, d_pad, ds)))
        in_specs.append(state_block)

    params = None if interpret else _compiler_params(num_warps, num_stages)
    n_blocks = d_pad // block_d
    seg_len, n_seg = (None, 1)
    if variant == "segmented":
        seg_len, n_seg = _segment_length(seq, chunk, segments, n_blocks * batch)
        if n_seg == 1:
            variant, seg_len = "unroll", None
    if n_seg == 1:
        kernel = functools.partial(
            _scan_kernel, seq=seq, chunk=chunk, variant=variant, has_mask=has_mask, has_h0=has_h0
        )
        grid, index = (n_blocks, batch), lambda spec: spec
    else:
        # Pass 1: end state and dt sum of every segment but the last, each from a zero state.
        pass1_ops = [x, dt, B, a2, bias_vec] + ([operands[8]] if has_mask else [])
        pass1_specs = [in_specs[i] for i in (0, 1, 3, 5, 7)] + ([in_specs[8]] if has_mask else [])
        hseg, dtsum = pl.pallas_call(
            functools.partial(_segment_state_kernel, seg_len=seg_len, chunk=chunk, has_mask=has_mask),
            out_shape=(
                jax.ShapeDtypeStruct((batch, n_seg - 1, d_pad, ds), _F32),
                jax.ShapeDtypeStruct((batch, n_seg - 1, d_pad), _F32),
            ),
            grid=(n_blocks, batch, n_seg - 1),
            in_specs=[_with_segment_axis(spec) for spec in pass1_specs],
            out_specs=(
                pl.BlockSpec((None, None, block_d, ds), lambda j, b, s: (b, s, j, 0)),
                pl.BlockSpec((None, None, block_d), lambda j, b, s: (b, s, j)),
            ),
            interpret=interpret,
            compiler_params=params,
            name="selective_scan_segment_states",
        )(*pass1_ops)
        # Pass 2: each segment folds the earlier ones into its initial state, then scans.
        operands += [hseg, dtsum]
        in_specs = [_with_segment_axis(spec) for spec in in_specs] + [
            pl.BlockSpec((None, n_seg - 1, block_d, ds), lambda j, b, s: (b, 0, j, 0)),
            pl.BlockSpec((None, n_seg - 1, block_d), lambda j, b, s: (b, 0, j)),
        ]
        kernel = functools.partial(
            _scan_kernel, seq=seq, chunk=chunk, variant="unroll", has_mask=has_mask, has_h0=has_h0,
            seg_len=seg_len, n_seg=n_seg,
        )
        grid, index = (n_blocks, batch, n_seg), _with_segment_axis
    y, h_final = pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct((batch, seq, d_pad), _F32),
            jax.ShapeDtypeStruct((batch, d_pad, ds), _F32),
        ),
        grid=grid,
        in_specs=in_specs,
        out_specs=(index(seq_block), index(state_block)),
        interpret=interpret,
        compiler_params=params,
        name=f"selective_scan_{variant}",
    )(*operands)
    if pad_d or pad_s:
        y, h_final = y[..., :d_inner], h_final[:, :d_inner, :d_state]
    return y, h_final


def selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, *, mask=None):
    """One decode step of the selective scan, as fused XLA ops.

    state [batch, d_inner, d_state] f32; x, dt, z [batch, d_inner] any float dtype;
    A [d_inner, d_state] f32; B, C [batch, d_state]; D, dt_bias [d_inner];
    mask [batch] bool or None (False: the state passes through unchanged).
    Returns ``(y [batch, d_inner] f32, new_state [batch, d_inner, d_state] f32)``.
    """
    x, z, B, C = (a.astype(_F32) for a in (x, z, B, C))
    dt = jax.nn.softplus(dt.astype(_F32) + dt_bias.astype(_F32))
    if mask is not None:
        dt = jnp.where(mask[:, None], dt, 0.0)
    dA = jnp.exp(dt[..., None] * A.astype(_F32))
    new_state = dA * state.astype(_F32) + (dt * x)[..., None] * B[:, None, :]
    y = jnp.einsum("bds,bs->bd", new_state, C)
    y = (y + D.astype(_F32) * x) * jax.nn.silu(z)
    return y, new_state


@functools.partial(jax.jit, static_argnames=("block_d", "num_warps", "interpret"))
def selective_state_update_pallas(
    state, x, dt, A, B, C, D, z, dt_bias, *, mask=None, block_d: int = 32, num_warps=None,
    interpret: bool = False,
):
    """``selective_state_update`` through the Pallas scan kernel with seq = 1: same shapes, dtypes
    and returns. Reads and writes the state once, like the fused jnp version."""
    y, new_state = selective_scan_pallas(
        x[:, None], dt[:, None], A, B[:, None], C[:, None], D, z[:, None], dt_bias,
        initial_state=state, mask=None if mask is None else mask[:, None],
        block_d=block_d, chunk=1, variant="loop", num_warps=num_warps, interpret=interpret,
    )
    return y[:, 0], new_state
