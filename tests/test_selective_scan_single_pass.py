"""The single-pass Pallas selective scan (interpret mode on CPU) against ``selective_scan_sequential`` and a
float64 oracle, with its ``exp2`` all on the exp unit, split with the polynomial, and all polynomial; the
``"pallas-single-interpret"`` scan in the model against ``"xla"``; its Triton lowering (no GPU needed to
build the IR); and the polynomial ``exp2`` it shares with the CPU scan, under jit."""

import dataclasses

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import jamba_jax
from helpers import random_params, rel_err, triton_kernels_for_cuda
from jamba_jax import JambaConfig, Kernels
from jamba_jax.scan import exp2_nonpositive, selective_scan, selective_scan_sequential
from pallas_kernels.selective_scan_single_pass import poly_positions, selective_scan_single_pass
from test_selective_scan_kernel import call, make_inputs, oracle

TOL = 1e-5

# (batch, seq, d_inner, d_state, block_d, chunk, poly_fraction, prefetch, initial state, mask, activations)
CASES = [
    (2, 37, 40, 6, 16, 4, 0.5, True, True, "mixed", "float32"),  # d_inner % block_d, seq % chunk, d_state -> 8
    (3, 19, 24, 16, 8, 4, 0.0, True, False, "left", "bfloat16"),  # all exp2; batch 3; bf16 x/dt/z/B/C
    (2, 23, 20, 4, 64, 8, 1.0, False, True, None, "float32"),  # all polynomial; tail of 7; block_d clipped to 32
    (1, 13, 33, 5, 16, 16, 0.75, True, False, "mixed", "float32"),  # seq < chunk: the tail only, both exp2s
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}-L{c[1]}-d{c[2]}-s{c[3]}-T{c[5]}-p{c[6]}-"
                                                     f"{'prefetch' if c[7] else 'noprefetch'}-{c[10]}")
def test_matches_sequential_and_float64_oracle(case):
    """Under jit, against the lax.scan oracle and the float64 recurrence, within 1e-5."""
    batch, seq, d_inner, d_state, block_d, chunk, frac, prefetch, state, mask, dtype = case
    args, h0, m = make_inputs(sum(case[:4]), batch, seq, d_inner, d_state, state=state, mask=mask,
                              dtype=jnp.dtype(dtype))
    fn = jax.jit(lambda a, h0, m: call(selective_scan_single_pass, a, initial_state=h0, mask=m, block_d=block_d,
                                       chunk=chunk, poly_fraction=frac, prefetch=prefetch, interpret=True))
    y, h = fn(args, h0, m)
    assert y.shape == (batch, seq, d_inner) and y.dtype == jnp.float32
    assert h.shape == (batch, d_inner, d_state) and h.dtype == jnp.float32
    y_ref, h_ref = call(selective_scan_sequential, args, initial_state=h0, mask=m)
    assert rel_err(y, y_ref) < TOL and rel_err(h, h_ref) < TOL
    y64, h64 = oracle(**args, initial_state=np.zeros(h.shape) if h0 is None else h0,
                      mask=np.ones((batch, seq), bool) if m is None else m)
    assert rel_err(y, y64) < TOL and rel_err(h, h64) < TOL


def test_polynomial_split_is_by_position():
    """Slot 0 of every chunk takes the polynomial at fraction 1/4: the first position's outputs equal the
    all-polynomial run's bit for bit and differ from the all-exp2 run's (the two exp2s round differently)."""
    args, h0, _ = make_inputs(5, 1, 8, 8, 8, state=True)
    run = lambda frac: np.asarray(call(selective_scan_single_pass, args, initial_state=h0, block_d=8, chunk=4,
                                       poly_fraction=frac, interpret=True)[0])
    y0, y_quarter, y1 = run(0.0), run(0.25), run(1.0)
    np.testing.assert_array_equal(y_quarter[:, 0], y1[:, 0])
    assert not np.array_equal(y_quarter[:, 0], y0[:, 0])
    assert not np.array_equal(y_quarter, y1)  # the other slots take exp2


@pytest.mark.slow  # about 7 s: interpret-mode compiles
def test_masked_positions_are_inert():
    """A fully masked row leaves the initial state exactly as it was, on both exp2 paths."""
    args, h0, _ = make_inputs(3, 2, 11, 16, 4, state=True)
    m = jnp.asarray(np.array([[False] * 11, [True] * 11]))
    _, h = call(selective_scan_single_pass, args, initial_state=h0, mask=m, block_d=16, chunk=4,
                poly_fraction=0.5, interpret=True)
    np.testing.assert_array_equal(np.asarray(h[0]), np.asarray(h0[0]))


def test_bad_arguments():
    args, _, _ = make_inputs(0, 1, 4, 8, 4)
    with pytest.raises(ValueError, match="powers of two"):
        call(selective_scan_single_pass, args, block_d=24, interpret=True)
    with pytest.raises(ValueError, match="multiple of 1/chunk = 1/4"):
        call(selective_scan_single_pass, args, chunk=4, poly_fraction=0.3, interpret=True)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        poly_positions(1.5, 4)
    assert poly_positions(0.75, 8) == 6


@pytest.mark.slow  # about 15 s
def test_dispatch_prefill_and_decode_step():
    """``selective_scan(impl="pallas-single-interpret")``: a prompt through the kernel, then one position
    (the decode step: the state update, as for ``"pallas"``), both against the oracle."""
    args, h0, m = make_inputs(2, 2, 8, 24, 4, state=True, mask="mixed")
    y_ref, h_ref = call(selective_scan_sequential, args, initial_state=h0, mask=m)
    y, h = call(selective_scan, args, initial_state=h0, mask=m, impl="pallas-single-interpret")
    assert rel_err(y, y_ref) < TOL and rel_err(h, h_ref) < TOL
    one = {k: (v[:, :1] if k in ("x", "dt", "z", "B", "C") else v) for k, v in args.items()}
    y_ref, h_ref = call(selective_scan_sequential, one, initial_state=h0)
    y, h = call(selective_scan, one, initial_state=h0, impl="pallas-single-interpret")
    assert rel_err(y, y_ref) < TOL and rel_err(h, h_ref) < TOL


@pytest.mark.slow  # about 40 s
def test_model_with_single_pass_scan_matches_xla():
    """``Kernels(scan="pallas-single-interpret")`` reaches the Mamba layers: a left-padded forward of a
    tiny model (layers mamba, attention) gives the logits of ``"xla"``."""
    config = dataclasses.replace(JambaConfig.named("jamba-tiny"), num_hidden_layers=2, attn_layer_period=2,
                                 attn_layer_offset=1, num_experts=1, vocab_size=128)
    model = jamba_jax.Jamba(config, random_params(config), kernels=Kernels(scan="pallas-single-interpret"))
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1, config.vocab_size, (2, 13)).astype(np.int32))
    valid = np.ones(ids.shape, bool)
    valid[0, :4] = False
    got = jamba_jax.forward(model, ids, jnp.asarray(valid))
    ref = jamba_jax.forward(model.with_kernels(Kernels()), ids, jnp.asarray(valid))
    assert rel_err(got, ref, valid) < TOL


def test_polynomial_exp2_under_jit():
    """The range reduction by adding 1.5 * 2^23 must survive XLA's simplifier, which folds (w + c) - c to w
    (the fraction would then be 0, an error up to 41%): compiled, ``exp2_nonpositive`` stays within 2e-7
    of float64, ties included."""
    w = np.concatenate([-np.logspace(-9, np.log10(126.0), 20_000), np.arange(-126.0, 0.5, 0.5)]).astype(np.float32)
    got = np.asarray(jax.jit(exp2_nonpositive)(w), np.float64)
    ref = np.exp2(w.astype(np.float64))
    assert np.max(np.abs(got - ref) / ref) < 2e-7


@pytest.mark.parametrize("frac, prefetch", [(0.0, True), (0.5, True), (1.0, False)])
def test_lowers_for_triton_gpu(frac, prefetch):
    """Builds the Triton IR for CUDA without a GPU: every op of both exp2 paths has a Triton lowering
    (``jnp.round`` has none) and every array a power-of-two shape. Compiling it to PTX needs the GPU."""

    sd = lambda shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype)  # noqa: E731
    b, L, d, s = 2, 45, 96, 6
    fn = jax.jit(lambda x, dt, A, B, C, D, z, bias, h0, m: selective_scan_single_pass(
        x, dt, A, B, C, D, z, bias, initial_state=h0, mask=m, block_d=8, chunk=8, poly_fraction=frac,
        prefetch=prefetch, num_warps=1))
    args = (sd((b, L, d)), sd((b, L, d)), sd((d, s), jnp.float32), sd((b, L, s)), sd((b, L, s)),
            sd((d,), jnp.float32), sd((b, L, d)), sd((d,), jnp.float32), sd((b, d, s), jnp.float32),
            sd((b, L), jnp.bool_))
    assert triton_kernels_for_cuda(fn, *args) == 1


def test_unused_call_is_dead_code():
    """Jitted, so an unused call lowers to nothing (flax's nn.scan needs it; see test_kernels_in_model)."""
    f32 = lambda *s: jnp.ones(s, jnp.float32)  # noqa: E731
    x, A, B, D = f32(1, 16, 32), -f32(32, 4), f32(1, 16, 4), f32(32)
    hlo = jax.jit(lambda: (selective_scan_single_pass(x, x, A, B, B, D, x, D), 0)[1]).lower().as_text()
    assert "pallas" not in hlo.lower() and "triton" not in hlo.lower()

