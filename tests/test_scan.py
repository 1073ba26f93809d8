"""The two selective-scan references against each other and against a float64 numpy oracle."""

import numpy as np
import pytest

from jamba_jax.scan import (exp2_nonpositive, exp_nonpositive, selective_scan, selective_scan_associative,
                            selective_scan_sequential, selective_scan_xla, softplus_series)


def random_inputs(rng, batch, seq, d_inner, d_state, *, with_state=False, with_mask=False):
    f = lambda *s, scale=1.0: (scale * rng.standard_normal(s)).astype(np.float32)
    inputs = dict(x=f(batch, seq, d_inner), dt=f(batch, seq, d_inner) - 1.0,
                  A=-np.exp(f(d_inner, d_state, scale=0.5)), B=f(batch, seq, d_state),
                  C=f(batch, seq, d_state), D=f(d_inner), z=f(batch, seq, d_inner), dt_bias=f(d_inner, scale=0.3))
    state = f(batch, d_inner, d_state) if with_state else None
    mask = None
    if with_mask:
        mask = rng.random((batch, seq)) > 0.3
        mask[0, : seq // 2] = False  # left padding on the first row
    return inputs, state, mask


def oracle(x, dt, A, B, C, D, z, dt_bias, initial_state=None, mask=None):
    """float64 numpy recurrence, written from the Mamba-1 equations."""
    x, dt, A, B, C, D, z, dt_bias = (np.asarray(a, np.float64) for a in (x, dt, A, B, C, D, z, dt_bias))
    batch, seq, d_inner = x.shape
    dt = np.log1p(np.exp(dt + dt_bias))
    h = np.zeros((batch, d_inner, A.shape[1])) if initial_state is None else np.array(initial_state, np.float64)
    y = np.zeros_like(x)
    for t in range(seq):
        live = np.ones(batch, bool) if mask is None else mask[:, t]
        dA = np.exp(dt[:, t, :, None] * A)
        h_new = dA * h + (dt[:, t] * x[:, t])[..., None] * B[:, t, None, :]
        h = np.where(live[:, None, None], h_new, h)
        y[:, t] = np.einsum("bds,bs->bd", h, C[:, t])
    y = (y + D * x) / (1 + np.exp(-z)) * z
    return y, h


@pytest.mark.parametrize("seq", [1, 7, 64, 130])
@pytest.mark.parametrize("with_state,with_mask", [(False, False), (True, True)])
def test_sequential_equals_associative(seq, with_state, with_mask):
    rng = np.random.default_rng(seq)
    inputs, state, mask = random_inputs(rng, 2, seq, 12, 5, with_state=with_state, with_mask=with_mask)
    y_seq, h_seq = selective_scan_sequential(**inputs, initial_state=state, mask=mask)
    for chunk in (16, 256):
        y_par, h_par = selective_scan_associative(**inputs, initial_state=state, mask=mask, chunk_size=chunk)
        np.testing.assert_allclose(y_par, y_seq, rtol=2e-5, atol=2e-5 * np.abs(y_seq).max())
        np.testing.assert_allclose(h_par, h_seq, rtol=2e-5, atol=2e-5 * np.abs(h_seq).max())


@pytest.mark.parametrize("impl", ["sequential", "associative", "xla"])
def test_against_float64_oracle(impl):
    rng = np.random.default_rng(0)
    inputs, state, mask = random_inputs(rng, 3, 45, 8, 16, with_state=True, with_mask=True)
    y, h = selective_scan(**inputs, initial_state=state, mask=mask, impl=impl)
    y_ref, h_ref = oracle(**inputs, initial_state=state, mask=mask)
    assert np.abs(np.asarray(y) - y_ref).max() / np.abs(y_ref).max() < 1e-5
    assert np.abs(np.asarray(h) - h_ref).max() / np.abs(h_ref).max() < 1e-5


def test_split_sequence_equals_whole():
    """Scanning [0:t) then [t:T) from the carried state equals one scan: the basis of chunked prefill."""
    rng = np.random.default_rng(3)
    inputs, _, _ = random_inputs(rng, 2, 40, 6, 4)
    y, h = selective_scan_associative(**inputs)
    cut = 17
    first = {k: (v[:, :cut] if v.ndim == 3 and k not in ("A",) else v) for k, v in inputs.items()}
    second = {k: (v[:, cut:] if v.ndim == 3 and k not in ("A",) else v) for k, v in inputs.items()}
    y1, h1 = selective_scan_associative(**first)
    y2, h2 = selective_scan_associative(**second, initial_state=h1)
    np.testing.assert_allclose(np.concatenate([y1, y2], axis=1), y, rtol=1e-5, atol=1e-5 * np.abs(y).max())
    np.testing.assert_allclose(h2, h, rtol=1e-5, atol=1e-5 * np.abs(h).max())


@pytest.mark.parametrize("scan", [selective_scan_associative, selective_scan_xla])
def test_masked_positions_are_inert(scan):
    rng = np.random.default_rng(4)
    inputs, state, _ = random_inputs(rng, 1, 20, 6, 4, with_state=True)
    mask = np.zeros((1, 20), bool)
    _, h = scan(**inputs, initial_state=state, mask=mask)
    np.testing.assert_array_equal(h, state)


def test_cpu_elementwise_functions_against_float64():
    """The CPU scan's exp and softplus, over the fp32 range they meet, to their documented bounds."""
    rng = np.random.default_rng(6)
    v = np.concatenate([-np.logspace(-12, np.log10(87.0), 100_000), rng.uniform(-87.0, 0.0, 100_000),
                        [0.0, -0.0]]).astype(np.float32)
    ref = np.exp(v.astype(np.float64))
    got = np.asarray(exp_nonpositive(v), np.float64)
    assert np.max(np.abs(got - ref) / ref) < 2e-7
    assert float(exp_nonpositive(np.float32(0.0))) == 1.0  # masked positions: dt = 0 keeps the state exactly
    assert np.all(np.asarray(exp_nonpositive(np.array([-88.0, -1e4, -np.inf], np.float32))) == 0.0)

    w = np.concatenate([-np.logspace(-12, np.log10(126.0), 100_000), rng.uniform(-126.0, 0.0, 100_000),
                        [0.0, -0.0, -0.5, -1.5, -125.5]]).astype(np.float32)  # halves: where rounding ties
    ref = np.exp2(w.astype(np.float64))
    got = np.asarray(exp2_nonpositive(w), np.float64)
    assert np.max(np.abs(got - ref) / ref) < 2e-7
    assert float(exp2_nonpositive(np.float32(0.0))) == 1.0
    assert np.all(np.asarray(exp2_nonpositive(np.array([-127.0, -1e4, -np.inf], np.float32))) == 0.0)

    x = np.concatenate([rng.standard_normal(100_000) * 10, np.linspace(-80.0, 80.0, 10_001),
                        [1e4, -1e4]]).astype(np.float32)
    ref = np.logaddexp(x.astype(np.float64), 0.0)
    got = np.asarray(softplus_series(x), np.float64)
    live = ref > 1e-30  # below, both underflow towards 0
    assert np.max(np.abs(got - ref)[live] / ref[live]) < 3e-7
    assert np.all(got[~live] < 1e-30)


def test_unknown_impl_is_a_clear_error():
    rng = np.random.default_rng(5)
    inputs, _, _ = random_inputs(rng, 1, 3, 2, 2)
    with pytest.raises(ValueError, match="unknown scan implementation 'fast'"):
        selective_scan(**inputs, impl="fast")
