"""Tests for pallas_kernels.int8_ragged_dot (CPU, Pallas interpret mode)."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_kernels.int8_ragged_dot import (
    int8_ragged_dot_pallas,
    int8_ragged_dot_reference,
    quantize_int8,
)

BLOCKS = dict(block_m=16, block_n=32, block_k=32)


def _quantize_np(w):
  w = np.asarray(w, np.float64)
  scale = np.abs(w).max(axis=1) / 127.0
  safe = np.where(scale == 0, 1.0, scale)
  q = np.clip(np.round(w / safe[:, None, :]), -127, 127)
  q = np.where(scale[:, None, :] == 0, 0, q)
  return q.astype(np.int8), scale


def _weights(e, k, n, seed=0):
  w = jax.random.normal(jax.random.PRNGKey(seed), (e, k, n), jnp.float32)
  w = w.at[1, :, 3].set(0.0)  # an all-zero output channel -> scale 0
  return w


def test_quantize_matches_numpy_float64():
  w = _weights(4, 48, 40)
  q, s = quantize_int8(w)
  assert q.dtype == jnp.int8 and q.shape == (4, 48, 40)
  assert s.dtype == jnp.float32 and s.shape == (4, 40)
  q_np, s_np = _quantize_np(w)
  np.testing.assert_allclose(np.asarray(s), s_np, rtol=1e-6, atol=0)
  diff = np.abs(np.asarray(q, np.int32) - q_np.astype(np.int32))
  # f32 vs f64 division may flip an exact .5 tie; allow at most a few.
  assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
  assert np.all(np.asarray(q)[1, :, 3] == 0) and float(s[1, 3]) == 0.0
  assert np.abs(np.asarray(q, np.int32)).max() <= 127
  # Dequantized weight within half a quantization step of the original.
  deq = np.asarray(q, np.float64) * np.asarray(s, np.float64)[:, None, :]
  err = np.abs(deq - np.asarray(w, np.float64))
  bound = np.asarray(s, np.float64)[:, None, :] * (0.5 + 1e-5) + 1e-12
  assert np.all(err <= bound)
  # Storage: int8 weights are half the bytes of bf16 weights.
  assert q.nbytes * 2 == w.astype(jnp.bfloat16).nbytes


# (M, K, N, group_sizes): empty experts, groups smaller than a tile, a group
# spanning several tiles, padding rows past sum(group_sizes), M/K/N not
# multiples of the blocks (16, 32, 32).
CASES = [
    (50, 72, 40, [0, 3, 30, 0, 9]),   # sum 42 < 50 -> 8 padding rows
    (37, 64, 64, [0, 0, 37, 0]),      # one expert, several tiles, ragged M
    (20, 48, 24, [1, 1, 1, 1, 1, 1]),  # many tiny groups in one tile
    (24, 32, 32, [0, 0, 0]),          # nothing routed -> all zeros
]


def _inputs(m, k, n, gs, dtype, seed=1):
  e = len(gs)
  lhs = jax.random.normal(jax.random.PRNGKey(seed), (m, k), jnp.float32)
  q, s = quantize_int8(_weights(e, k, n, seed + 1))
  return lhs.astype(dtype), q, s, jnp.asarray(gs, jnp.int32)


@pytest.mark.parametrize("design", ["group", "item", "tile"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_kernel_matches_reference_f32(design, case, swap_ab=False):
  m, k, n, gs = CASES[case]
  lhs, q, s, g = _inputs(m, k, n, gs, jnp.float32)
  ref = int8_ragged_dot_reference(lhs, q, s, g)
  out = int8_ragged_dot_pallas(lhs, q, s, g, design=design, interpret=True,
                               swap_ab=swap_ab, **BLOCKS)
  assert out.shape == (m, n) and out.dtype == jnp.float32
  ref, out = np.asarray(ref), np.asarray(out)
  total = sum(gs)
  assert np.all(out[total:] == 0)  # padding rows
  denom = max(np.abs(ref).max(), 1e-30)
  assert np.abs(out - ref).max() / denom < 1e-5


@pytest.mark.parametrize("design", ["group", "tile"])
def test_kernel_swap_ab(design):
  test_kernel_matches_reference_f32(design, 0, swap_ab=True)


@pytest.mark.parametrize("design", ["group", "tile"])
def test_kernel_bf16(design):
  m, k, n, gs = CASES[0]
  lhs, q, s, g = _inputs(m, k, n, gs, jnp.bfloat16)
  # f32 output: int8 -> bf16 is exact (|q| <= 127) and bf16*bf16 products are
  # exact in f32, so only the f32 summation order differs.
  ref = np.asarray(int8_ragged_dot_reference(lhs, q, s, g))
  out = np.asarray(int8_ragged_dot_pallas(lhs, q, s, g, design=design,
                                          interpret=True, **BLOCKS))
  assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-5
  # bf16 output: both sides round the same f32 value to bf16 (8-bit mantissa,
  # relative step 2^-8); allow one bf16 ulp of the largest magnitude.
  ref16 = int8_ragged_dot_reference(lhs, q, s, g,
                                    preferred_element_type=jnp.bfloat16)
  out16 = int8_ragged_dot_pallas(lhs, q, s, g, design=design, interpret=True,
                                 preferred_element_type=jnp.bfloat16,
                                 **BLOCKS)
  assert out16.dtype == jnp.bfloat16
  ref16 = np.asarray(ref16, np.float32)
  out16 = np.asarray(out16, np.float32)
  assert np.abs(out16 - ref16).max() <= 2.0 ** -8 * np.abs(ref16).max()
  # And the int8 path approximates the unquantized bf16 matmul.
  w = _weights(len(gs), k, n, 2)
  exact = np.asarray(jax.lax.ragged_dot(lhs.astype(jnp.float32), w, g))
  assert np.abs(out - exact).max() / np.abs(exact).max() < 2e-2
