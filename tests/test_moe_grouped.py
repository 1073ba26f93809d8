"""The MoE's two float grouped matmuls ("ragged_dot" and "tiled", see ``jamba_jax/moe.py``) agree: same
outputs and gradients for random groupings with empty experts and one-row groups, in fp32 and bf16, and
with int8 expert weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jamba_jax.moe import GROUPED_MATMULS, experts_ffn, grouped_matmul, row_tile
from jamba_jax.quant import quantize
from helpers import rel_err

run = jax.jit(experts_ffn, static_argnames=("impl", "grouped"))


def _inputs(expert_ids, num_experts, hidden, inter, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    tokens = len(expert_ids)
    x = rng.standard_normal((tokens, hidden))
    weights = rng.random((tokens, len(expert_ids[0])))
    projs = [rng.standard_normal((num_experts, hidden, inter)) / np.sqrt(hidden) for _ in range(2)]
    projs.append(rng.standard_normal((num_experts, inter, hidden)) / np.sqrt(inter))
    cast = lambda a: jnp.asarray(a, dtype)
    return cast(x), jnp.asarray(expert_ids, jnp.int32), cast(weights), [cast(p) for p in projs]


def _skewed_ids(tokens, num_experts, top_k, seed):
    """Top-k of noisy logits with a strong preference order: the last experts get few rows or none."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((tokens, num_experts)) - np.linspace(0, 6, num_experts)
    return np.argsort(-logits, axis=1)[:, :top_k].tolist()


# (expert ids [tokens, k], experts): one decode token; a batch of decode tokens with empty experts and
# one-row groups; every row on one expert; larger skewed routings (row tiles > 1, some experts empty).
ROUTINGS = {
    "decode": ([[5, 1]], 8),
    "decode_batch": ([[5, 1], [2, 5]], 8),  # 4 rows of 8 experts: still one row at a time
    "small": ([[1, 3], [3, 5], [1, 2], [5, 3], [1, 5]], 6),
    "one_expert": ([[2, 2]] * 7, 4),
    "skewed_40": (_skewed_ids(40, 8, 2, seed=1), 8),
    "skewed_300": (_skewed_ids(300, 8, 2, seed=2), 8),
    "top1_16_experts": (_skewed_ids(100, 16, 1, seed=3), 16),
}


@pytest.mark.parametrize("name", ROUTINGS)
def test_tiled_equals_ragged_dot_fp32(name):
    ids, num_experts = ROUTINGS[name]
    counts = np.bincount(np.ravel(ids), minlength=num_experts)
    if name.startswith("skewed"):  # empty experts and experts spanning several row tiles
        assert (counts == 0).any() and counts.max() > row_tile(int(counts.sum()), num_experts)
    x, expert_ids, weights, projs = _inputs(ids, num_experts, 160, 300)  # contractions in uneven pieces
    tiled = run(x, expert_ids, weights, *projs, grouped="tiled")
    ragged = run(x, expert_ids, weights, *projs, grouped="ragged_dot")
    assert tiled.shape == x.shape and tiled.dtype == jnp.float32
    assert rel_err(tiled, ragged) < 1e-6


def test_tiled_equals_ragged_dot_at_jamba_small_shapes():
    """hidden 256, inter 512, 8 experts, one 256-token prefill chunk (512 rows, 64-row tiles)."""
    ids = _skewed_ids(256, 8, 2, seed=4)
    x, expert_ids, weights, projs = _inputs(ids, 8, 256, 512, seed=4)
    assert row_tile(512, 8) == 64 and row_tile(2, 8) == 1
    tiled = run(x, expert_ids, weights, *projs, grouped="tiled")
    assert rel_err(tiled, run(x, expert_ids, weights, *projs, grouped="ragged_dot")) < 1e-6


@pytest.mark.parametrize("name", ["decode", "small", "skewed_300"])
def test_tiled_equals_ragged_dot_bf16(name):
    ids, num_experts = ROUTINGS[name]
    x, expert_ids, weights, projs = _inputs(ids, num_experts, 48, 80, dtype=jnp.bfloat16)
    tiled = run(x, expert_ids, weights, *projs, grouped="tiled")
    ragged = run(x, expert_ids, weights, *projs, grouped="ragged_dot")
    assert tiled.dtype == jnp.bfloat16
    # both round every matmul to bf16; each is as close to the fp32 result of the same inputs
    f32 = run(x.astype(jnp.float32), expert_ids, weights.astype(jnp.float32),
              *(p.astype(jnp.float32) for p in projs), grouped="ragged_dot")
    assert rel_err(tiled, f32) < 2 * rel_err(ragged, f32) + 1e-3
    assert rel_err(tiled, ragged) < 2e-2


@pytest.mark.parametrize("name", ["skewed_40"])
def test_tiled_gradients_equal_ragged_dot(name):
    """Training differentiates through the MoE: the tiled loop has the same gradients."""
    ids, num_experts = ROUTINGS[name]
    x, expert_ids, weights, projs = _inputs(ids, num_experts, 48, 80)
    probe = jnp.asarray(np.random.default_rng(5).standard_normal(x.shape), jnp.float32)

    def grads(grouped):
        def loss(x, weights, projs):
            return jnp.sum(experts_ffn(x, expert_ids, weights, *projs, grouped=grouped) * probe)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, weights, projs)

    for tiled, ragged in zip(jax.tree.leaves(grads("tiled")), jax.tree.leaves(grads("ragged_dot"))):
        assert rel_err(tiled, ragged) < 1e-6


@pytest.mark.parametrize("name", ["decode", "skewed_40"])
def test_int8_weights_on_both_paths(name):
    """``QuantizedWeight`` experts: the tiled path equals the sorted ``int8_ragged_dot`` path."""
    ids, num_experts = ROUTINGS[name]
    x, expert_ids, weights, projs = _inputs(ids, num_experts, 48, 80)
    projs = [quantize(p) for p in projs]
    tiled = run(x, expert_ids, weights, *projs, grouped="tiled")
    assert rel_err(tiled, run(x, expert_ids, weights, *projs, grouped="ragged_dot")) < 1e-6


@pytest.mark.parametrize("name", ["skewed_40", "decode_batch"])
def test_ids_past_the_experts_contribute_nothing(name):
    """The expert-parallel MoE marks other devices' pairs with an id past the local experts."""
    ids, num_experts = ROUTINGS[name]
    x, expert_ids, weights, projs = _inputs(ids, num_experts, 48, 80)
    dropped = jnp.asarray(np.arange(expert_ids.size).reshape(expert_ids.shape) % 3 == 1)
    for grouped in GROUPED_MATMULS:
        out = run(x, jnp.where(dropped, num_experts, expert_ids), weights, *projs, grouped=grouped)
        ref = run(x, expert_ids, jnp.where(dropped, 0, weights), *projs, grouped=grouped)
        assert np.abs(np.asarray(ref)).max() > 0 and rel_err(out, ref) < 1e-6


@pytest.mark.parametrize("name,loop", [("decode", False), ("decode_batch", False), ("small", True)])
def test_few_rows_run_one_at_a_time(name, loop):
    """Up to half the expert count of rows, the tiled path runs each row on its own, with no loop (a loop
    over the pieces makes XLA copy a scanned block's whole expert stack out of the stacked params)."""
    ids, num_experts = ROUTINGS[name]
    x, expert_ids, weights, projs = _inputs(ids, num_experts, 48, 80)
    jaxpr = str(jax.make_jaxpr(lambda *a: experts_ffn(*a, grouped="tiled"))(x, expert_ids, weights, *projs))
    assert ("while[" in jaxpr or "scan[" in jaxpr) == loop


def test_default_and_unknown_grouped_matmul():
    assert grouped_matmul() == ("tiled" if jax.default_backend() == "cpu" else "ragged_dot")
    assert grouped_matmul() in GROUPED_MATMULS
    x, expert_ids, weights, projs = _inputs(*ROUTINGS["small"], 48, 80)
    np.testing.assert_array_equal(np.asarray(run(x, expert_ids, weights, *projs)),
                                  np.asarray(run(x, expert_ids, weights, *projs, grouped=grouped_matmul())))
    with pytest.raises(ValueError, match="grouped matmul"):
        experts_ffn(x, expert_ids, weights, *projs, grouped="dense")
