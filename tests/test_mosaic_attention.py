"""The Mosaic GPU flash prefill attention (``pallas_kernels.flash_attention_mgpu``) in Pallas's GPU interpret
mode on CPU (SMEM, TMA copies with barriers and wgmma simulated), against the XLA reference
``attention.naive_attention`` and a float64 numpy oracle; the ``attend`` dispatch; the whole model with
``Kernels(attention="mosaic-interpret")`` against ``"xla"``; and Mosaic GPU's CUDA lowering of the kernel
at Jamba-1.5-Mini shapes.

GPU interpret mode runs the kernel's ``"smem"`` operand variant (K transposed by the wrapper, P through
SMEM); the ``"fa3"`` variant (K's tile transposed by the wgmma descriptor, P from registers) uses two
things the interpreter lacks and is checked here by its CUDA lowering only (numbers: on a GPU,
``benchmarks/gpu_mosaic.py``). Only rows of real queries are compared (padding queries' outputs are
finite and never used).

Tolerances (``rel_err`` = ``max |got - ref| / max |ref|``):

- fp32: 1e-5 against the XLA reference and the float64 oracle. The kernel splits q, k, v and P into
  three bf16 parts and sums the six part products that matter; each is exact in fp32 and the dropped
  ones are below 2^-24 relative, so it is an fp32 computation with another summation order (measured:
  about 3e-7).
- bf16: the kernel rounds the unnormalised probabilities ``P`` to bf16 for wgmma (each off by at most
  2^-9 of itself) and the output once (2^-9 of itself). With ``out = sum_k p_k v_k / l``, the first moves
  the output by at most ``2^-9 sum_k p_k |v_k| / l <= 2^-9 max|v|``, the second by ``2^-9 max|out|``:
  against the float64 oracle (on the same bf16 inputs) ``rel_err <= 2^-9 (1 + max|v| / max|out|)``, a
  bound the fp32 sums' own error (about 1e-7) does not reach. XLA's bf16 path makes the same two
  roundings (of the normalised probabilities), so the kernel must also be within twice XLA's own error.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_params, rel_err
from test_attention import case, real_queries
from test_attention_kernels import oracle

from jamba_jax import JambaConfig, JambaLM, Kernels
from jamba_jax.attention import ATTENTION_IMPLS, attend, naive_attention, split_k_attention
from jamba_jax.cache import init_cache_arrays
from pallas_kernels import mosaic_gpu
from pallas_kernels.flash_attention_mgpu import flash_attention_mgpu, mosaic_attention_config

TOL = 1e-5


@pytest.fixture(autouse=True)
def _clean_interpreter():
    """GPU interpret mode keeps simulated memory between kernels; an exception inside one leaves it dirty."""
    yield
    mosaic_gpu.reset_interpret_state()


@functools.cache
def with_reference(**kw):
    """One jitted function returning ``(kernel(...), naive_attention(...))`` (one compile per case and
    shape; kept, so that tests of the same shape share it)."""
    return jax.jit(lambda q, k, v, start, valid: (flash_attention_mgpu(q, k, v, start, valid, interpret=True, **kw),
                                                  naive_attention(q, k, v, start, valid)))


# (batch, q_len, k_len, kv_heads, group, head_dim, block_q, block_kv, left pads (None: kv_valid None),
#  q_start values (the slot of the first query; traced, one compile per case))
CASES = [
    # batch 2, 2 kv heads, GQA 4 (36 folded rows, one row block), left padding past the first key tile (row
    # 0 sees nothing before slot 70); odd lengths (150 keys: 3 tiles, the last partly padding); queries at
    # slot 0 (keys after slot 8 masked or skipped; row 0 all padding), at 20 and at the end of the cache
    # (tiles 0-1 without the causal mask, tile 2 diagonal)
    (2, 9, 150, 2, 4, 8, 64, 64, (70, 0), (0, 20, 141)),
    # a 16-query chunk, GQA 8 (128 folded rows: 2 row blocks), at the end of a 200-slot cache, then at slot 40
    # (tiles 1-3 skipped); no kv_valid; head_dim 16 padded to 64
    (1, 16, 200, 1, 8, 16, 64, 64, None, (184, 40)),
    # self-attention of odd length, one 128-row block (74 rows, the rest padding)
    pytest.param((2, 37, 37, 1, 2, 32, 128, 64, (5, 0), (0,)), marks=pytest.mark.slow),
]


@pytest.mark.parametrize("case_", CASES, ids=lambda c: f"b{c[0]}-q{c[1]}-k{c[2]}-h{c[3]}-g{c[4]}-bq{c[6]}")
def test_fp32_matches_xla_and_oracle(case_):
    batch, q_len, k_len, n_kv, group, hd, bq, bkv, pads, starts = case_
    q, k, v, _, valid = case(sum(case_[:6]), batch, q_len, k_len, n_kv, group, hd, left_pad=pads or (0,))
    valid = None if pads is None else valid
    fn = with_reference(block_q=bq, block_kv=bkv)
    for start in starts:
        got, ref = fn(q, k, v, start, valid)
        assert got.shape == q.shape and got.dtype == q.dtype
        real = real_queries(valid, start, q_len) if valid is not None else np.ones((batch, q_len), bool)
        assert np.all(np.isfinite(np.asarray(got)))
        assert rel_err(got, ref, real) < TOL, start
        full_valid = np.ones((batch, k_len), bool) if valid is None else valid
        assert rel_err(got, oracle(q, k, v, start, full_valid), real) < TOL, start


def test_tiles_after_the_last_query_are_never_read():
    """Causal block skipping: K and V are NaN from the first key tile after the last query's slot on (a
    tile that was loaded would make the output NaN: ``0 * NaN``), and the result is the clean one. The second
    case above at slot 40: its queries end at slot 55, in tile 0; tiles 1-3 (slots 64..) are never read."""
    q, k, v, start, _ = case(sum(CASES[1][:6]), *CASES[1][:6], q_start=40)
    poison = jnp.arange(k.shape[2])[None, None, :, None] >= 64
    k_bad, v_bad = (jnp.where(poison, jnp.nan, a) for a in (k, v))
    fn = with_reference(block_q=64, block_kv=64)  # the fp32 case's compile
    got, _ = fn(q, k_bad, v_bad, start, None)
    assert np.all(np.isfinite(np.asarray(got)))
    assert rel_err(got, fn(q, k, v, start, None)[1]) < TOL


def test_bf16_within_its_rounding_bound():
    """bf16 q/k/v: within the bound of the module docstring against the float64 oracle, and no worse than
    twice the XLA bf16 path's own error."""
    q, k, v, start, valid = case(4, 2, 33, 96, 1, 2, 16, left_pad=(7, 0))
    low = [a.astype(jnp.bfloat16) for a in (q, k, v)]
    got, ref = with_reference(block_kv=64)(*low, start, valid)
    assert got.dtype == jnp.bfloat16
    real = real_queries(valid, start, 33)
    truth = oracle(*(np.asarray(a, np.float32) for a in low), start, valid)
    err_kernel, err_xla = rel_err(got, truth, real), rel_err(ref, truth, real)
    bound = 2.0 ** -9 * (1 + np.abs(np.asarray(low[2], np.float64)).max() / np.abs(truth[real]).max())
    assert err_kernel <= bound and err_kernel <= 2 * err_xla, (err_kernel, bound, err_xla)


WS_CASE = (2, 20, 100, 1, 4, 16)  # 80 folded rows: one CTA, warpgroup 0 on queries 0-15, warpgroup 1 on 16-19


def ws_inputs(dtype):
    q, k, v, _, valid = case(9, *WS_CASE, left_pad=(30, 0))
    return [a.astype(dtype) for a in (q, k, v)], valid


def test_warp_specialized_bf16():
    """``warp_specialized=True`` (two compute warpgroups consuming the K/V tiles a third one loads), bf16:
    within the bf16 bound against the float64 oracle; a chunk at slot 80 of a left-padded 100-slot cache
    (2 key tiles, the warpgroups' last queries in different tiles)."""
    (q, k, v), valid = ws_inputs(jnp.bfloat16)
    got, ref = with_reference(block_kv=64, warp_specialized=True)(q, k, v, 80, valid)
    real = real_queries(valid, 80, WS_CASE[1])
    truth = oracle(*(np.asarray(a, np.float32) for a in (q, k, v)), 80, valid)
    err_kernel, err_xla = rel_err(got, truth, real), rel_err(ref, truth, real)
    bound = 2.0 ** -9 * (1 + np.abs(np.asarray(v, np.float64)).max() / np.abs(truth[real]).max())
    assert err_kernel <= bound and err_kernel <= 2 * err_xla, (err_kernel, bound, err_xla)


@pytest.mark.slow  # about 45 s: GPU interpret mode simulates the three warpgroups one step at a time
def test_warp_specialized_fp32():
    """The warp-specialized kernel, fp32: within 1e-5 of XLA and the float64 oracle at slots 80 and 10 (key
    tile 1 skipped; row 0's queries all padding)."""
    (q, k, v), valid = ws_inputs(jnp.float32)
    fn = with_reference(block_kv=64, warp_specialized=True)
    for start in (80, 10):
        got, ref = fn(q, k, v, start, valid)
        real = real_queries(valid, start, WS_CASE[1])
        assert rel_err(got, ref, real) < TOL, start
        assert rel_err(got, oracle(q, k, v, start, valid), real) < TOL, start


def test_dispatch_and_kernels_option():
    """``attend`` with ``"mosaic-interpret"`` runs the kernel for a prefill chunk and XLA's split-K path for
    one query (bit for bit); ``"mosaic"`` off GPU is the XLA path, bit for bit; ``Kernels`` accepts both."""
    assert {"mosaic", "mosaic-interpret"} <= set(ATTENTION_IMPLS)
    assert Kernels(attention="mosaic").attention == "mosaic"
    q, k, v, start, valid = case(5, 2, 5, 64, 2, 2, 16, left_pad=(3, 0))
    traced = str(jax.make_jaxpr(lambda *a: attend(*a, impl="mosaic-interpret"))(q, k, v, start, valid))
    assert "wgmma" in traced  # its numbers: the model test below
    run = jax.jit(attend, static_argnames="impl")
    if jax.default_backend() != "gpu":
        np.testing.assert_array_equal(np.asarray(run(q, k, v, start, valid, impl="mosaic")),
                                      np.asarray(run(q, k, v, start, valid)))
    q1 = q[:, :1]
    np.testing.assert_array_equal(np.asarray(run(q1, k, v, 60, valid, impl="mosaic-interpret")),
                                  np.asarray(jax.jit(split_k_attention)(q1, k, v, 60, valid)))


def test_bad_options_say_what_to_use():
    q, k, v, start, valid = case(6, 1, 4, 64, 1, 2, 16)
    with pytest.raises(ValueError, match='operands="smem"'):
        flash_attention_mgpu(q, k, v, start, valid, operands="fa3", interpret=True)
    with pytest.raises(ValueError, match="block_q must be 64 or 128"):
        flash_attention_mgpu(q, k, v, start, valid, block_q=32, interpret=True)
    with pytest.raises(ValueError, match="block_kv must be a multiple of 64"):
        flash_attention_mgpu(q, k, v, start, valid, block_kv=96, interpret=True)
    with pytest.raises(ValueError, match="use warp_specialized=False"):  # fp32 parts of two warpgroups
        mosaic_attention_config(4096, 128, jnp.float32, "fa3", warp_specialized=True)


# Jamba-1.5-Mini attention (32 heads, 8 kv heads, head_dim 128): (batch, q_len, k_len, dtype, operands,
# warp_specialized)
MINI_LOWERINGS = [
    (1, 4096, 4096, jnp.bfloat16, "fa3", False),  # a 4K prompt at once
    (2, 256, 65536, jnp.bfloat16, "fa3", False),  # a prefill chunk into a 64K cache
    (1, 4096, 4096, jnp.bfloat16, "fa3", True),
    pytest.param((1, 4096, 4096, jnp.bfloat16, "smem", False), marks=pytest.mark.slow),
    pytest.param((1, 4096, 4096, jnp.bfloat16, "smem", True), marks=pytest.mark.slow),
    pytest.param((1, 256, 4096, jnp.float32, "fa3", False), marks=pytest.mark.slow),  # 3 bf16 parts: 1 stage
]


@pytest.mark.parametrize("case_", MINI_LOWERINGS, ids=lambda c: f"b{c[0]}-q{c[1]}-k{c[2]}-{c[4]}-ws{int(c[5])}")
def test_lowers_for_gpu_at_mini_shapes(case_):
    """Mosaic GPU's own lowering (Warpgroup layout inference, TMA and wgmma lowering to its MLIR dialects,
    the SMEM budget check) runs without a GPU. (PTX compilation and running need a GPU:
    ``benchmarks/gpu_mosaic.py``.)"""
    batch, q_len, k_len, dtype, operands, ws = case_
    args = (jax.ShapeDtypeStruct((batch, q_len, 8, 4, 128), dtype),
            *[jax.ShapeDtypeStruct((batch, 8, k_len, 128), dtype)] * 2,
            jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((batch, k_len), jnp.bool_))
    fn = jax.jit(lambda *a: flash_attention_mgpu(*a, operands=operands, warp_specialized=ws))
    try:
        text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    except ImportError as e:  # a jaxlib without Mosaic GPU's Python dialects
        pytest.skip(f"Mosaic GPU lowering unavailable here: {e!r}")
    assert "mosaic_gpu" in text
    assert mosaic_attention_config(k_len, 128, dtype, operands, ws)["max_concurrent_steps"] == (
        1 if dtype == jnp.float32 else 2)


# Layers mamba, attention, mamba (one scanned block), dense MLPs: short compiles.
CONFIG = dataclasses.replace(JambaConfig.named("jamba-tiny"), num_hidden_layers=3, attn_layer_period=3,
                             attn_layer_offset=1, num_experts=1, vocab_size=128)


@pytest.mark.slow  # about 35 s: the model compiled twice, once with the kernel in GPU interpret mode
def test_model_mosaic_attention_matches_xla():
    """The fp32 model through the cache, ``attention="mosaic-interpret"`` against ``"xla"`` within 1e-5: a
    left-padded 20-token prompt in two chunks of 10 (the second at slot 10: queries at an offset into the
    cache; one compile for both)."""
    params = random_params(CONFIG)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1, CONFIG.vocab_size, (2, 20)), jnp.int32)
    valid = np.ones(ids.shape, bool)
    valid[0, :6] = False
    valid = jnp.asarray(valid)

    def run(attention):
        model = JambaLM(CONFIG, jnp.float32, Kernels(attention=attention))
        step = jax.jit(lambda p, i, v, c: model.apply({"params": p}, i, v, cache=c))
        cache = init_cache_arrays(CONFIG, 2, 20, jnp.float32)
        outs = []
        for lo in (0, 10):
            logits, cache = step(params, ids[:, lo:lo + 10], valid[:, lo:lo + 10], cache)
            outs.append(np.asarray(logits))
        return outs

    got, ref = run("mosaic-interpret"), run("xla")
    for lo, g, r in zip((0, 10), got, ref):
        assert rel_err(g, r, valid[:, lo:lo + 10]) < TOL, lo
