"""The Mosaic GPU ExpertsInt8 grouped matmul (``pallas_kernels.int8_ragged_dot_mgpu``) in Pallas's GPU
interpret mode on CPU (SMEM, TMA copies with barriers and wgmma simulated), against the XLA reference
``int8_ragged_dot_reference`` and a float64 numpy oracle; and ``Kernels(moe_int8="mosaic-interpret")`` in
the whole model against ``"xla"``.

Tolerances (``rel_err`` = ``max |got - ref| / max |ref|``):

- fp32 lhs: 1e-5 against the XLA reference (and the float64 oracle). The kernel splits the lhs into three
  bf16 parts whose sum is the fp32 value and accumulates the (exact) products in fp32, so only the fp32
  summation order differs from XLA's fp32 ``ragged_dot`` (measured: about 1e-7).
- bf16 lhs, fp32 output: 1e-5 against the XLA reference: int8 -> bf16 is exact (``|q| <= 127``) and a
  bf16 x bf16 product is exact in fp32, so again only the summation order differs.
- bf16 lhs, bf16 output (what the model runs): each path rounds its fp32 result to bf16 once, a relative
  error of at most 2^-9 of each element. Against the float64 oracle the XLA bf16 path itself is off by
  ``err_xla`` (about 2^-9 of the largest output); the kernel must be within ``max(2 * err_xla, 2^-9)``,
  i.e. no worse than two such roundings, and within one bf16 ulp (2^-8 of the largest output) of XLA.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import rel_err, scaled_params

from jamba_jax import JambaConfig, JambaLM, Kernels
from jamba_jax.quant import (
    MOE_INT8_IMPLS,
    QuantizedWeight,
    int8_ragged_dot,
    quantize_params,
)
from pallas_kernels import mosaic_gpu
from pallas_kernels.int8_ragged_dot import int8_ragged_dot_float64, int8_ragged_dot_reference, quantize_int8
from pallas_kernels.int8_ragged_dot_mgpu import (
    int8_ragged_dot_mgpu,
    mosaic_config,
    split_f32,
    work_items,
)


@pytest.fixture(autouse=True)
def _clean_interpreter():
    """GPU interpret mode keeps simulated memory between kernels; an exception inside one leaves it dirty."""
    yield
    mosaic_gpu.reset_interpret_state()


def inputs(m, k, n, group_sizes, dtype, seed=0):
    rng = np.random.default_rng(seed)
    lhs = jnp.asarray(rng.standard_normal((m, k)), jnp.float32).astype(dtype)
    w = rng.standard_normal((len(group_sizes), k, n)).astype(np.float32) / np.sqrt(k)
    w[0, :, 1] = 0.0  # an all-zero output channel: scale 0
    q, scale = quantize_int8(jnp.asarray(w))
    return lhs, q, scale, jnp.asarray(group_sizes, jnp.int32)


# (M, K, N, group_sizes), 64-row chunks (block_m = 64): empty experts, a group of 70 rows (two chunks), odd M,
# 4 padding rows past sum(group_sizes) = 79.
RAGGED = (83, 128, 64, [0, 70, 0, 9])


def test_work_items_cover_each_row_once():
    """The routing table: every row below M owned by exactly one item, of its own group; chunks start at
    multiples of 8 (what the TMA lowering needs) with fewer than 8 rows of the previous group skipped; experts
    with no rows get no item (so no weight loads); decode (2 rows) has exactly the two routed experts'."""
    block_m = 64
    for m, gs in [(83, [0, 70, 0, 9]), (2, [0, 1, 0, 0, 1, 0]), (200, [64, 0, 128, 8]), (5, [0, 0, 0]),
                  (7, [0, 9, 0]),  # groups past M are clipped
                  (300, [3, 61, 1, 7, 100, 0, 120])]:  # many unaligned group starts
        table = np.asarray(work_items(jnp.asarray(gs, jnp.int32), m, block_m))
        num_experts = len(gs)
        assert table.shape == (4, -(-(m + 7 * (num_experts + 1)) // block_m) + num_experts)
        ends = np.minimum(np.cumsum(gs), m)
        starts = np.concatenate([[0], ends[:-1]])
        owner = np.full(m, num_experts)  # padding rows belong to group E
        for e in range(num_experts):
            owner[starts[e]:ends[e]] = e
        covered = np.zeros(m, int)
        for group, row0_div8, skip, rows in table.T:
            if rows == 0:
                assert group == num_experts
                continue
            row0 = 8 * row0_div8
            assert 0 <= skip < 8 and 0 < rows <= block_m - skip and row0 < m
            assert np.all(owner[row0 + skip:row0 + skip + rows] == group), (m, gs, group, row0, skip, rows)
            covered[row0 + skip:row0 + skip + rows] += 1
        assert np.all(covered == 1), (m, gs)
        routed = {e for e in range(num_experts) if ends[e] > starts[e]}
        assert set(table[0][table[3] > 0].tolist()) - {num_experts} == routed
    decode = np.asarray(work_items(jnp.asarray([0, 1, 0, 0, 1, 0], jnp.int32), 2, block_m))
    assert sorted(decode[0][decode[3] > 0]) == [1, 4] and decode[3].sum() == 2


def test_split_f32_is_exact():
    x = jnp.asarray(np.random.default_rng(0).standard_normal(4096) * 10.0 ** np.arange(-3, 5).repeat(512),
                    jnp.float32)
    total = sum(np.asarray(p, np.float64) for p in split_f32(x))
    np.testing.assert_array_equal(total, np.asarray(x, np.float64))


def test_ragged_f32_lhs():
    """fp32 lhs: empty experts, a group spanning two row chunks, odd M, padding rows -> zeros."""
    m, k, n, gs = RAGGED
    lhs, q, scale, g = inputs(m, k, n, gs, jnp.float32)
    out = np.asarray(int8_ragged_dot_mgpu(lhs, q, scale, g, interpret=True))
    ref = np.asarray(int8_ragged_dot_reference(lhs, q, scale, g))
    assert out.shape == (m, n) and out.dtype == np.float32
    assert np.all(out[sum(gs):] == 0)  # padding rows (the interpreter fills unwritten memory with NaN)
    assert rel_err(out, ref) < 1e-5
    assert rel_err(out, int8_ragged_dot_float64(lhs, q, scale, g)) < 1e-5


def test_ragged_bf16_lhs():
    """bf16 lhs with fp32 and bf16 outputs; the bf16 tolerance is set by the XLA bf16 path's own error
    against the float64 oracle (module docstring)."""
    m, k, n, gs = RAGGED
    lhs, q, scale, g = inputs(m, k, n, gs, jnp.bfloat16, seed=1)
    exact = int8_ragged_dot_float64(lhs, q, scale, g)
    out32 = np.asarray(int8_ragged_dot_mgpu(lhs, q, scale, g, interpret=True))
    assert rel_err(out32, np.asarray(int8_ragged_dot_reference(lhs, q, scale, g))) < 1e-5
    assert rel_err(out32, exact) < 1e-5
    out16 = int8_ragged_dot_mgpu(lhs, q, scale, g, preferred_element_type=jnp.bfloat16, interpret=True)
    ref16 = int8_ragged_dot_reference(lhs, q, scale, g, preferred_element_type=jnp.bfloat16)
    assert out16.dtype == jnp.bfloat16
    out16, ref16 = np.asarray(out16, np.float32), np.asarray(ref16, np.float32)
    assert np.all(out16[sum(gs):] == 0)
    err_xla, err_kernel = rel_err(ref16, exact), rel_err(out16, exact)
    assert err_xla <= 2.0 ** -8  # sanity: one bf16 rounding
    assert err_kernel <= max(2 * err_xla, 2.0 ** -9), (err_kernel, err_xla)
    assert rel_err(out16, ref16) <= 2.0 ** -8  # at most one bf16 ulp of the largest output apart


def test_decode_rows_and_padded_weight_dims():
    """Decode: 2 rows on 2 of 6 experts (the other 4 have no work item). K and N not multiples of the tiles:
    the wrapper pads the weights (K 80 -> 2 x 64, N 40 -> 48)."""
    lhs, q, scale, g = inputs(2, 80, 40, [0, 1, 0, 0, 1, 0], jnp.bfloat16, seed=2)
    assert mosaic_config(2, 80, 40) == dict(block_m=64, block_n=48, block_k=64, max_concurrent_steps=4)
    out = np.asarray(int8_ragged_dot_mgpu(lhs, q, scale, g, interpret=True))
    assert out.shape == (2, 40)
    assert rel_err(out, np.asarray(int8_ragged_dot_reference(lhs, q, scale, g))) < 1e-5


def test_decode_loads_only_the_routed_experts_weights():
    """With race detection on, GPU interpret mode logs every read of a simulated buffer: the only weight
    tiles read (``q[e, k-tile, n-tile]`` copies) are those of the two experts the 2 decode rows go to."""
    lhs, q, scale, g = inputs(2, 128, 64, [0, 1, 0, 0, 1, 0], jnp.bfloat16, seed=5)
    out = int8_ragged_dot_mgpu(lhs, q, scale, g, interpret=mosaic_gpu.interpret_params(detect_races=True))
    assert rel_err(out, int8_ragged_dot_reference(lhs, q, scale, g)) < 1e-5
    try:  # the read log is an interpreter internal
        from jax._src.pallas.mosaic_gpu.interpret.gpu_callbacks import (
            get_memory_space_idx,
        )
        from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import get_races
        races = get_races()
        gmem = get_memory_space_idx(mosaic_gpu.plgpu.GMEM)
        gmem_reads = [r[3] for key, log in races.reads.items() if key.memory_space_id == gmem for r in log]
    except (ImportError, AttributeError, TypeError) as e:
        pytest.skip(f"GPU interpret mode's read log is not available: {e!r}")
    assert not races.races_found
    # GMEM reads of the weights index [expert, k slice, n slice]; of lhs, table and scales, 2 indices
    experts = {int(idx[0]) for idx in gmem_reads if len(idx) == 3 and not isinstance(idx[0], slice)}
    assert experts == {1, 4}


def test_several_column_tiles_and_pipeline_stages():
    """Two column tiles (N 128 with block_n 64), K 256 in 4 pipeline steps with 2 stages in flight, a
    group of exactly one chunk (64 rows), no padding rows."""
    lhs, q, scale, g = inputs(96, 256, 128, [64, 0, 32], jnp.float32, seed=3)
    out = np.asarray(int8_ragged_dot_mgpu(lhs, q, scale, g, block_n=64, block_k=64, max_concurrent_steps=2,
                                          interpret=True))
    assert rel_err(out, np.asarray(int8_ragged_dot_reference(lhs, q, scale, g))) < 1e-5


# Jamba-1.5-Mini expert matmuls (E=16; gate/up [16, 4096, 14336], down [16, 14336, 4096]): (rows, K, N, lhs
# dtype, output dtype, tiles or None for mosaic_config).
MINI_LOWERINGS = [
    (2, 4096, 14336, jnp.bfloat16, jnp.bfloat16, None),  # one decode token, top-2
    (83, 14336, 4096, jnp.float32, jnp.float32, None),  # fp32 lhs: three bf16 parts
    (512, 4096, 14336, jnp.bfloat16, jnp.bfloat16, None),  # 256 tokens: 128-row chunks
    (16, 4096, 14336, jnp.bfloat16, jnp.bfloat16, dict(block_n=256, max_concurrent_steps=3)),
]


@pytest.mark.parametrize("case", range(len(MINI_LOWERINGS)))
def test_lowers_for_gpu_at_mini_shapes(case):
    """Mosaic GPU's own lowering (Warpgroup layout inference, TMA and wgmma lowering to its MLIR dialects)
    runs without a GPU: the kernel lowers for ``cuda`` at Jamba-1.5-Mini expert shapes. (PTX compilation
    and running need a GPU: ``benchmarks/gpu_mosaic.py``.)"""
    m, k, n, lhs_dtype, out_dtype, cfg = MINI_LOWERINGS[case]
    args = (jax.ShapeDtypeStruct((m, k), lhs_dtype), jax.ShapeDtypeStruct((16, k, n), jnp.int8),
            jax.ShapeDtypeStruct((16, n), jnp.float32), jax.ShapeDtypeStruct((16,), jnp.int32))
    fn = jax.jit(lambda *a: int8_ragged_dot_mgpu(*a, preferred_element_type=out_dtype, **(cfg or {})))
    try:
        text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    except ImportError as e:  # a jaxlib without Mosaic GPU's Python dialects
        pytest.skip(f"Mosaic GPU lowering unavailable here: {e!r}")
    assert "mosaic_gpu" in text


def test_dispatch_and_kernels_option():
    """``quant.int8_ragged_dot`` with ``"mosaic-interpret"`` runs the kernel; ``"mosaic"`` off GPU is the XLA
    path, bit for bit; ``Kernels`` accepts both."""
    assert {"mosaic", "mosaic-interpret"} <= set(MOE_INT8_IMPLS)
    assert Kernels(moe_int8="mosaic").moe_int8 == "mosaic"
    with pytest.raises(ValueError, match="'mosaic-interpret'"):
        Kernels(moe_int8="triton")
    lhs, q, scale, g = inputs(5, 64, 64, [2, 0, 3], jnp.float32, seed=4)
    w = QuantizedWeight(q, scale)
    xla = np.asarray(int8_ragged_dot(lhs, w, g, "xla"))
    assert rel_err(int8_ragged_dot(lhs, w, g, "mosaic-interpret"), xla) < 1e-5
    if jax.default_backend() != "gpu":
        np.testing.assert_array_equal(np.asarray(int8_ragged_dot(lhs, w, g, "mosaic")), xla)


TINY = JambaConfig.named("jamba-tiny")
SMALL = dataclasses.replace(TINY, hidden_size=32, intermediate_size=64, vocab_size=128, num_hidden_layers=3,
                            attn_layer_period=2, attn_layer_offset=1, expert_layer_offset=0, num_experts=8)


def test_model_mosaic_int8_matches_xla():
    """The whole fp32 model with int8 weights: ``moe_int8="mosaic-interpret"`` (the kernel, in GPU interpret
    mode, for each of the two MoE layers' three projections) equals ``"xla"`` within 1e-5. 6 (token, choice)
    rows over 8 experts: at least two experts get no rows."""
    params = quantize_params(scaled_params(SMALL, 1), SMALL)
    ids = np.random.default_rng(1).integers(1, SMALL.vocab_size, (1, 3))

    def logits(impl):
        model = JambaLM(SMALL, kernels=Kernels(moe_int8=impl))
        return np.asarray(jax.jit(lambda p, i: model.apply({"params": p}, i))(params, ids))

    assert rel_err(logits("mosaic-interpret"), logits("xla")) < 1e-5
    # the kernel ran (on CPU the MoE would otherwise take its tiled path, which never calls it)
    traced = str(jax.make_jaxpr(lambda p, i: JambaLM(SMALL, kernels=Kernels(moe_int8="mosaic-interpret"))
                                .apply({"params": p}, i))(params, ids))
    assert "wgmma" in traced
