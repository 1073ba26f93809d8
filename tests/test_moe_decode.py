"""The MoE's decode path (``"slots"``, ``jamba_jax/moe.py``): each distinct routed expert in a slot, read
on its own, never the whole stack. Its outputs equal the grouped paths' (fp32, bf16, int8 weights, XLA and
the Pallas kernel of ``pallas_kernels/expert_slots.py`` in interpret mode); experts nobody was routed to
are never read (their weights poisoned with NaN leave the output finite); greedy generation gives the
same tokens as the CPU's default path."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jamba_jax
from jamba_jax import JambaConfig, moe
from jamba_jax.generate import generate
from jamba_jax.moe import experts_ffn, forced_decode_matmul, grouped_matmul, slot_experts
from jamba_jax.quant import QuantizedWeight, quantize, quantize_params
from pallas_kernels.expert_slots import slot_block_n, slot_matmul_pallas, slot_matmul_reference
from pallas_kernels.int8_ragged_dot import quantize_int8
from helpers import random_params, rel_err

run = jax.jit(experts_ffn, static_argnames=("impl", "grouped"))

# expert ids [tokens, k] over 8 experts: one decode token; a decode batch sharing experts (6 distinct of 8
# rows); 8 rows on 8 experts, all distinct (every slot used); ids past the experts (another device's rows).
ROUTINGS = {"one_token": [[5, 1]], "shared": [[5, 1], [2, 5], [1, 2], [5, 7]],
            "all_slots": [[0, 1], [2, 3], [4, 5], [6, 7]], "dropped": [[5, 8], [8, 2], [9, 5]]}
E, H, I = 8, 48, 80


def _inputs(ids, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((len(ids), H)), dtype)
    weights = jnp.asarray(rng.uniform(0.1, 1.0, (len(ids), 2)), dtype)
    projs = [rng.standard_normal(s) / np.sqrt(s[1]) for s in ((E, H, I), (E, H, I), (E, I, H))]
    return x, jnp.asarray(ids, jnp.int32), weights, [jnp.asarray(p, dtype) for p in projs]


def _ffn_float64(x, ids, weights, projs):
    """The MoE's expert sum in float64 numpy: ``sum_k w_k down_e(silu(gate_e x) * up_e x)``."""
    x, weights = np.asarray(x, np.float64), np.asarray(weights, np.float64)
    gate, up, down = (np.asarray(p.dequantize() if isinstance(p, QuantizedWeight) else p, np.float64)
                      for p in projs)
    out = np.zeros_like(x)
    for t, row in enumerate(np.asarray(ids)):
        for k, e in enumerate(row):
            if e < gate.shape[0]:
                g = x[t] @ gate[e]
                out[t] += weights[t, k] * ((g / (1 + np.exp(-g)) * (x[t] @ up[e])) @ down[e])
    return out


def test_slot_experts_lists_each_routed_expert_once():
    ids = jnp.asarray(ROUTINGS["shared"] + ROUTINGS["dropped"], jnp.int32)  # 14 rows, 5 distinct below 8
    np.testing.assert_array_equal(np.asarray(slot_experts(ids, E)), [1, 2, 5, 7] + [E] * 4)
    np.testing.assert_array_equal(np.asarray(slot_experts(jnp.asarray([[3, 0]]), E)), [0, 3])


@pytest.mark.parametrize("name", ROUTINGS)
def test_slots_equal_grouped_paths_fp32(name):
    x, ids, weights, projs = _inputs(ROUTINGS[name])
    slots = run(x, ids, weights, *projs, grouped="slots")
    assert slots.shape == x.shape and slots.dtype == jnp.float32
    for grouped in ("ragged_dot", "tiled"):
        assert rel_err(slots, run(x, ids, weights, *projs, grouped=grouped)) < 1e-5
    assert rel_err(slots, _ffn_float64(x, ids, weights, projs)) < 1e-5


@pytest.mark.parametrize("name", ["one_token", "shared"])
def test_slots_equal_ragged_dot_bf16(name):
    """bf16: each path rounds its matmuls to bf16; the slots are as close to the fp32 result as
    ``ragged_dot`` (within 2x + 1e-3) and within 2e-2 of it."""
    x, ids, weights, projs = _inputs(ROUTINGS[name], jnp.bfloat16)
    slots = run(x, ids, weights, *projs, grouped="slots")
    ragged = run(x, ids, weights, *projs, grouped="ragged_dot")
    assert slots.dtype == jnp.bfloat16
    ref = _ffn_float64(x, ids, weights, projs)
    assert rel_err(slots, ref) < 2 * rel_err(ragged, ref) + 1e-3
    assert rel_err(slots, ragged) < 2e-2


@pytest.mark.parametrize("name,kernel", [("one_token", False), ("shared", True), ("dropped", False)])
def test_int8_slots_xla_and_kernel_equal_grouped(name, kernel):
    """ExpertsInt8: the slots in XLA (and with the Pallas kernel in interpret mode, on the routing where
    experts are shared) equal the sorted ``int8_ragged_dot`` path and float64 (fp32 activations, 1e-5)."""
    x, ids, weights, projs = _inputs(ROUTINGS[name], seed=1)
    projs = [quantize(p) for p in projs]
    grouped = run(x, ids, weights, *projs, grouped="ragged_dot")
    xla = run(x, ids, weights, *projs, grouped="slots")
    assert rel_err(xla, grouped) < 1e-5 and rel_err(xla, _ffn_float64(x, ids, weights, projs)) < 1e-5
    if kernel:
        assert rel_err(run(x, ids, weights, *projs, impl="pallas-interpret", grouped="slots"), grouped) < 1e-5
    # off GPU, "pallas" is the XLA path
    np.testing.assert_array_equal(np.asarray(run(x, ids, weights, *projs, impl="pallas", grouped="slots")),
                                  np.asarray(xla))


def test_int8_kernel_bf16_within_bf16_rounding():
    """bf16 activations, int8 weights: the kernel and the XLA slots differ by at most the bf16 rounding of
    their outputs (both accumulate in fp32; 1e-2 relative)."""
    x, ids, weights, projs = _inputs(ROUTINGS["shared"], jnp.bfloat16, seed=2)
    projs = [quantize(p) for p in projs]
    xla = run(x, ids, weights, *projs, grouped="slots")
    kernel = run(x, ids, weights, *projs, impl="pallas-interpret", grouped="slots")
    assert kernel.dtype == jnp.bfloat16 and rel_err(kernel, xla) < 1e-2


@pytest.mark.parametrize("int8", [False, True])
def test_unrouted_experts_are_never_read(int8):
    """Every expert no token chose holds NaN: the slots' output is finite and equals the clean weights'
    result (float weights: CPU ``ragged_dot``, a masked dense contraction over the whole stack, turns
    NaN; int8: NaN scales)."""
    x, ids, weights, projs = _inputs(ROUTINGS["shared"], seed=3)
    unrouted = np.setdiff1d(np.arange(E), np.asarray(ids))
    assert unrouted.size == 4
    clean = run(x, ids, weights, *projs, grouped="slots")
    poisoned = [p.at[unrouted].set(jnp.nan) for p in projs]
    if int8:
        clean = run(x, ids, weights, *[quantize(p) for p in projs], grouped="slots")
        poisoned = [QuantizedWeight(q.q, q.scale.at[unrouted].set(jnp.nan)) for q in map(quantize, projs)]
        kernel = run(x, ids, weights, *poisoned, impl="pallas-interpret", grouped="slots")
        np.testing.assert_array_equal(np.asarray(kernel), np.asarray(
            run(x, ids, weights, *[quantize(p) for p in projs], impl="pallas-interpret", grouped="slots")))
    out = run(x, ids, weights, *poisoned, grouped="slots")
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_array_equal(np.asarray(out), np.asarray(clean))
    if not int8 and jax.default_backend() == "cpu":  # (int8 weights cannot hold NaN; their scales are read per row)
        assert not np.isfinite(np.asarray(run(x, ids, weights, *poisoned, grouped="ragged_dot"))).all()


@pytest.mark.parametrize("dtype,shared", [(jnp.float32, True), (jnp.bfloat16, False)])
def test_slot_kernel_matches_float64(dtype, shared):
    """``slot_matmul_pallas`` (interpret) against float64, float and int8 weights, widths that are not
    multiples of the tiles (padding), an unused slot (zeros)."""
    rng = np.random.default_rng(4)
    num_experts, k, n, rows = 5, 72, 40, 3
    slot_expert = jnp.asarray([3, 0, num_experts], jnp.int32)
    lhs_shape = (rows, k) if shared else (3, rows, k)
    lhs = jnp.asarray(rng.standard_normal(lhs_shape), dtype)
    w = jnp.asarray(rng.standard_normal((num_experts, k, n)) / np.sqrt(k), jnp.float32)
    q, scale = quantize_int8(w)
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    for weight, sc in ((w.astype(dtype), None), (q, scale)):
        out = slot_matmul_pallas(lhs, weight, sc, slot_expert, block_n=32, block_k=32, interpret=True)
        assert out.shape == (3, rows, n) and out.dtype == dtype
        w64 = np.asarray(weight, np.float64) * (1 if sc is None else np.asarray(sc, np.float64)[:, None, :])
        x64 = np.asarray(lhs.astype(jnp.float32), np.float64)
        for s, e in enumerate([3, 0]):
            ref = (x64 if shared else x64[s]) @ w64[e]
            assert rel_err(out[s], ref) < tol
        np.testing.assert_array_equal(np.asarray(out[2], np.float32), 0)
        ref = slot_matmul_reference(lhs, weight, sc, slot_expert)
        assert rel_err(out, ref) < tol


def test_slot_kernel_rejects_mismatches():
    w = jnp.zeros((4, 32, 16), jnp.float32)
    with pytest.raises(ValueError, match="contracts 24 columns"):
        slot_matmul_pallas(jnp.zeros((2, 24)), w, None, jnp.zeros((2,), jnp.int32), interpret=True)
    with pytest.raises(ValueError, match="int8 weight needs its scale"):
        slot_matmul_pallas(jnp.zeros((2, 32)), w.astype(jnp.int8), None, jnp.zeros((2,), jnp.int32), interpret=True)
    assert slot_block_n(2, 4096) == 32 and slot_block_n(16, 14336) == 128


def test_which_path_runs():
    """Off CPU, decode sizes (at most ``experts`` rows) take the slots; interpreted kernels run where they
    run on GPU; ``forced_decode_matmul`` switches decode sizes only, and restores the default."""
    cpu = jax.default_backend() == "cpu"
    assert grouped_matmul(16, 16) == ("tiled" if cpu else "slots")
    assert grouped_matmul(17, 16) == ("tiled" if cpu else "ragged_dot")
    assert grouped_matmul(2, 16, "pallas-interpret") == "slots"
    assert grouped_matmul(512, 16, "pallas-interpret") == "ragged_dot"
    assert grouped_matmul(2, 16, "mosaic-interpret") == "ragged_dot"
    with forced_decode_matmul("slots"):
        assert grouped_matmul(2, 16) == "slots" and grouped_matmul(512, 16) == grouped_matmul()
    assert grouped_matmul(2, 16) == ("tiled" if cpu else "slots")
    with pytest.raises(ValueError, match="grouped matmul"):
        with forced_decode_matmul("dense"):
            pass
    # the slots path has no sort (``ragged_dot``'s layout) and no loop
    x, ids, weights, projs = _inputs(ROUTINGS["shared"])
    jaxpr = str(jax.make_jaxpr(lambda *a: experts_ffn(*a, grouped="slots"))(x, ids, weights, *projs))
    assert not re.search(r"\b(sort|while|scan)\[", jaxpr)


# Two scanned blocks of 2 layers (Mamba + dense MLP, attention + MoE) and a 1-layer tail; 8 experts, top-2.
CONFIG = dataclasses.replace(JambaConfig.named("jamba-tiny"), num_hidden_layers=5, attn_layer_period=2,
                             attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1, num_experts=8)


@pytest.mark.parametrize("int8", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_greedy_tokens_equal_default_path(int8):
    """``generate`` with the decode MoE on the slots gives the default CPU path's greedy tokens (a batch of
    3 prompts: 6 rows over 8 experts at every step), fp32, float and int8 expert weights."""
    params = random_params(CONFIG, 3)
    model = jamba_jax.Jamba(CONFIG, params)
    if int8:
        model = model.replace(params=quantize_params(params, CONFIG), quantize="experts-int8")
    prompts = [[5, 6, 7, 8], [9, 8, 7, 6, 5, 4, 3], [11]]
    default = generate(model, prompts, max_new_tokens=8, stop_ids=[])
    with forced_decode_matmul("slots"):
        slots = generate(model, prompts, max_new_tokens=8, stop_ids=[])
    assert moe.grouped_matmul(6, 8) == ("tiled" if jax.default_backend() == "cpu" else "slots")  # restored
    assert slots.tokens == default.tokens


@pytest.mark.parametrize("rows,k,n,shared,int8", [(1, 4096, 14336, True, True), (1, 14336, 4096, False, True),
                                                  (8, 4096, 14336, True, False)])
def test_slot_kernel_lowers_for_gpu_at_mini_shapes(rows, k, n, shared, int8):
    """Pallas's Triton lowering runs without a GPU: the kernel lowers for ``cuda`` at Jamba-1.5-Mini's
    gate/up and down shapes, int8 (one decode token: 2 slots) and bf16 (8 tokens: 16 slots). (Compiling
    to PTX and running need a GPU: ``benchmarks/gpu_decode.py``.)"""
    slots = 2 if rows == 1 else 16
    lhs = jax.ShapeDtypeStruct((rows, k) if shared else (slots, rows, k), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((16, k, n), jnp.int8 if int8 else jnp.bfloat16)
    scale = jax.ShapeDtypeStruct((16, n), jnp.float32) if int8 else None
    fn = jax.jit(lambda lhs, w, scale, ids: slot_matmul_pallas(lhs, w, scale, ids))
    text = fn.trace(lhs, w, scale, jax.ShapeDtypeStruct((slots,), jnp.int32)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "triton" in text
