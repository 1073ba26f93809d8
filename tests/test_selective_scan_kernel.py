"""The Pallas selective-scan kernel (interpret mode on CPU; every variant, the two-pass
``"segmented"`` one with several segment counts) against ``selective_scan_sequential``,
the decode-step functions against one step of it, one float64 numpy oracle, and a check that the
kernel lowers for the Triton GPU backend (lowering only: no GPU is needed to build the Triton IR)."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from helpers import rel_err, triton_kernels_for_cuda
from jamba_jax.scan import selective_scan_sequential
from pallas_kernels.selective_scan import (
    VARIANTS,
    _segment_length,
    selective_scan_pallas,
    selective_state_update,
    selective_state_update_pallas,
)

TOL = 1e-5


def make_inputs(seed, batch, seq, d_inner, d_state, *, state=False, mask=None, dtype=np.float32):
    rng = np.random.default_rng(seed)
    f = lambda *s, scale=1.0: (scale * rng.standard_normal(s)).astype(np.float32)
    args = dict(
        x=f(batch, seq, d_inner), dt=f(batch, seq, d_inner) - 1.0,
        A=-np.exp(f(d_inner, d_state, scale=0.5)), B=f(batch, seq, d_state), C=f(batch, seq, d_state),
        D=f(d_inner), z=f(batch, seq, d_inner), dt_bias=f(d_inner, scale=0.3),
    )
    args = {k: jnp.asarray(v) for k, v in args.items()}
    for k in ("x", "dt", "z", "B", "C"):
        args[k] = args[k].astype(dtype)
    h0 = jnp.asarray(f(batch, d_inner, d_state)) if state else None
    m = None
    if mask is not None:
        m = rng.random((batch, seq)) > 0.3 if mask == "mixed" else np.ones((batch, seq), bool)
        m[0, : seq // 3 + 1] = False  # left padding on the first row
        m = jnp.asarray(m)
    return args, h0, m


def call(fn, args, **kw):
    a = args
    return fn(a["x"], a["dt"], a["A"], a["B"], a["C"], a["D"], a["z"], a["dt_bias"], **kw)


# (batch, seq, d_inner, d_state, block_d, chunk, variant, initial state, mask)
CASES = [
    (2, 37, 40, 6, 16, 4, "unroll", True, "mixed"),  # d_inner % block_d, seq % chunk, d_state -> 8
    (3, 19, 24, 16, 16, 4, "tile", False, "left"),
    (2, 23, 20, 4, 8, 4, "loop", True, None),
    (1, 16, 33, 5, 32, 4, "unroll", False, None),  # no tail positions; d_inner -> 64
    (2, 13, 16, 12, 16, 16, "tile", True, "mixed"),  # seq < chunk: tail loop only
    (2, 21, 12, 9, 64, 4, "tile", False, None),  # block_d clipped to 16
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[6]}-b{c[0]}-L{c[1]}-d{c[2]}-s{c[3]}")
def test_kernel_matches_sequential(case):
    batch, seq, d_inner, d_state, block_d, chunk, variant, state, mask = case
    args, h0, m = make_inputs(sum(case[:4]), batch, seq, d_inner, d_state, state=state, mask=mask)
    y_ref, h_ref = call(selective_scan_sequential, args, initial_state=h0, mask=m)
    y, h = call(selective_scan_pallas, args, initial_state=h0, mask=m, block_d=block_d, chunk=chunk,
                variant=variant, interpret=True)
    assert y.shape == y_ref.shape and y.dtype == jnp.float32
    assert h.shape == h_ref.shape and h.dtype == jnp.float32
    assert rel_err(y, y_ref) < TOL
    assert rel_err(h, h_ref) < TOL


# (batch, seq, d_inner, d_state, block_d, chunk, segments, initial state, mask)
SEGMENTED_CASES = [
    (2, 37, 40, 6, 16, 4, 4, True, "mixed"),  # segments of 12, 12, 12, 1 (the last one tail-only)
    (1, 64, 16, 16, 8, 8, 8, False, None),  # equal segments, no tails
    (2, 50, 24, 5, 8, 4, 3, True, "left"),  # 20, 20, 10: a short last segment with a tail
    (2, 9, 8, 4, 8, 4, 5, False, "mixed"),  # more segments asked for than chunks: 4, 4, 1
]


@pytest.mark.parametrize("case", SEGMENTED_CASES, ids=lambda c: f"b{c[0]}-L{c[1]}-d{c[2]}-s{c[3]}-S{c[6]}")
def test_segmented_matches_sequential(case):
    batch, seq, d_inner, d_state, block_d, chunk, segments, state, mask = case
    args, h0, m = make_inputs(sum(case[:4]), batch, seq, d_inner, d_state, state=state, mask=mask)
    y_ref, h_ref = call(selective_scan_sequential, args, initial_state=h0, mask=m)
    y, h = call(selective_scan_pallas, args, initial_state=h0, mask=m, block_d=block_d, chunk=chunk,
                variant="segmented", segments=segments, interpret=True)
    assert y.shape == y_ref.shape and h.shape == h_ref.shape
    assert rel_err(y, y_ref) < TOL
    assert rel_err(h, h_ref) < TOL


def test_segment_length_choice():
    """segments=None: about 8192 programs, segments of at least 256 positions, multiples of chunk."""
    assert _segment_length(65536, 8, None, 256) == (2048, 32)  # Jamba-1.5-Mini, batch 1, block_d 32
    assert _segment_length(4096, 8, None, 256) == (256, 16)
    assert _segment_length(4096, 8, None, 8192) == (4096, 1)  # already enough programs
    assert _segment_length(300, 8, None, 16)[1] == 1  # too short to split
    assert _segment_length(37, 4, 4, 3) == (12, 4)
    assert _segment_length(9, 4, 5, 2) == (4, 3)


def test_kernel_bf16_inputs_under_jit():
    args, h0, m = make_inputs(7, 2, 21, 32, 16, state=True, mask="mixed", dtype=jnp.bfloat16)
    y_ref, h_ref = call(selective_scan_sequential, args, initial_state=h0, mask=m)
    fn = jax.jit(lambda a, h0, m: call(selective_scan_pallas, a, initial_state=h0, mask=m, block_d=16,
                                       chunk=4, variant="unroll", interpret=True))
    y, h = fn(args, h0, m)
    assert rel_err(y, y_ref) < TOL and rel_err(h, h_ref) < TOL


@pytest.mark.parametrize("variant", ["unroll", "segmented"])
def test_masked_positions_are_inert(variant):
    """A fully masked row leaves the initial state untouched."""
    args, h0, _ = make_inputs(3, 2, 11, 16, 4, state=True)
    m = jnp.asarray(np.array([[False] * 11, [True] * 11]))
    _, h = call(selective_scan_pallas, args, initial_state=h0, mask=m, block_d=16, chunk=4, variant=variant,
                segments=3, interpret=True)
    np.testing.assert_array_equal(np.asarray(h[0]), np.asarray(h0[0]))


def oracle(x, dt, A, B, C, D, z, dt_bias, initial_state, mask):
    """float64 numpy recurrence written from the Mamba-1 equations."""
    x, dt, A, B, C, D, z, dt_bias = (np.asarray(a, np.float64) for a in (x, dt, A, B, C, D, z, dt_bias))
    dt = np.log1p(np.exp(dt + dt_bias))
    h = np.array(initial_state, np.float64)
    y = np.zeros_like(x)
    for t in range(x.shape[1]):
        h_new = np.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * x[:, t])[..., None] * B[:, t, None, :]
        h = np.where(np.asarray(mask)[:, t, None, None], h_new, h)
        y[:, t] = np.einsum("bds,bs->bd", h, C[:, t])
    return (y + D * x) * z / (1 + np.exp(-z)), h


def test_kernel_matches_float64_oracle():
    args, h0, m = make_inputs(11, 2, 29, 24, 7, state=True, mask="mixed")
    y_ref, h_ref = oracle(**args, initial_state=h0, mask=m)
    y, h = call(selective_scan_pallas, args, initial_state=h0, mask=m, block_d=16, chunk=4, interpret=True)
    assert rel_err(y, y_ref) < TOL and rel_err(h, h_ref) < TOL


def step_inputs(seed, batch, d_inner, d_state):
    args, h0, _ = make_inputs(seed, batch, 1, d_inner, d_state, state=True)
    mask = jnp.asarray(np.arange(batch) % 2 == 0)
    return args, h0, mask


@pytest.mark.parametrize("use_mask", [False, True])
def test_state_update_matches_one_sequential_step(use_mask):
    args, h0, mask = step_inputs(5, 3, 40, 6)
    mask = mask if use_mask else None
    y_ref, h_ref = call(selective_scan_sequential, args, initial_state=h0,
                        mask=None if mask is None else mask[:, None])
    step = {k: (v[:, 0] if k in ("x", "dt", "z", "B", "C") else v) for k, v in args.items()}
    y, h = selective_state_update(h0, **step, mask=mask)
    assert y.shape == (3, 40) and h.shape == h0.shape
    assert rel_err(y, y_ref[:, 0]) < TOL and rel_err(h, h_ref) < TOL
    y_p, h_p = selective_state_update_pallas(h0, **step, mask=mask, block_d=16, interpret=True)
    assert rel_err(y_p, y_ref[:, 0]) < TOL and rel_err(h_p, h_ref) < TOL
    if use_mask:  # masked rows keep their state
        np.testing.assert_array_equal(np.asarray(h[1]), np.asarray(h0[1]))


def test_bad_arguments():
    args, _, _ = make_inputs(0, 1, 4, 8, 4)
    with pytest.raises(ValueError):
        call(selective_scan_pallas, args, block_d=24, interpret=True)
    with pytest.raises(ValueError):
        call(selective_scan_pallas, args, variant="nope", interpret=True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_lowers_for_triton_gpu(variant):
    """Builds the Triton IR for CUDA without a GPU; catches unsupported ops and non power-of-two
    shapes. Compiling that IR to PTX still needs the GPU toolchain."""

    sd = lambda shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype)
    b, L, d, s = 2, 45, 96, 6
    fn = jax.jit(lambda x, dt, A, B, C, D, z, bias, h0, m: selective_scan_pallas(
        x, dt, A, B, C, D, z, bias, initial_state=h0, mask=m, block_d=32, chunk=8, variant=variant,
        segments=4, num_warps=1))
    args = (sd((b, L, d)), sd((b, L, d)), sd((d, s), jnp.float32), sd((b, L, s)), sd((b, L, s)),
            sd((d,), jnp.float32), sd((b, L, d)), sd((d,), jnp.float32), sd((b, d, s), jnp.float32),
            sd((b, L), jnp.bool_))
    # "segmented" is two kernels (segment states, then the outputs).
    assert triton_kernels_for_cuda(fn, *args) == (2 if variant == "segmented" else 1)
