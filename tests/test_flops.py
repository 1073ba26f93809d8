"""``jamba_jax.flops``: exact on single layer kinds, and against XLA's own count of the compiled prefill."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jamba_jax
from jamba_jax import JambaConfig, steps
from jamba_jax.cache import cache_shapes
from jamba_jax.flops import causal_pairs, layer_flops, prefill_flops

# Dense only (no MoE), one attention layer: matmuls dominate, and XLA's count (which sees a while loop's
# body once, not times its trip count) covers the whole program: one layer, one key block.
DENSE = dataclasses.replace(JambaConfig.named("jamba-tiny"), hidden_size=256, intermediate_size=1024,
                            num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1,
                            attn_layer_period=1, attn_layer_offset=0, num_experts=1, vocab_size=512)


def xla_flops(fn, *shapes) -> float:
    return jax.jit(fn).lower(*shapes).compile().cost_analysis()["flops"]


def f32(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def test_exact_on_matmul_chains():
    """The dense MLP's and the attention projections' formulas equal XLA's count of the same dots."""
    t, h, i = 48, DENSE.hidden_size, DENSE.intermediate_size
    per = layer_flops(DENSE, t)
    mlp = xla_flops(lambda x, wg, wu, wd: (jnp.dot(x, wu), jnp.dot(jnp.dot(x, wg), wd)),
                    f32(t, h), f32(h, i), f32(h, i), f32(i, h))
    assert mlp == per["dense_mlp"]["dense_mlp"] == 2 * t * 3 * h * i
    q, kv = DENSE.num_attention_heads * DENSE.head_dim, DENSE.num_key_value_heads * DENSE.head_dim
    proj = xla_flops(lambda x, wq, wk, wv, wo: (jnp.dot(x, wk), jnp.dot(x, wv), jnp.dot(jnp.dot(x, wq), wo)),
                     f32(t, h), f32(h, q), f32(h, kv), f32(h, kv), f32(q, h))
    assert proj == per["attention"]["attention_proj"]


def test_counts_add_up():
    config = JambaConfig.named("jamba-1.5-mini")
    one = prefill_flops(config, 4096, batch=2)
    parts = [prefill_flops(config, 1024, start, batch=2) for start in range(0, 4096, 1024)]
    for kind in one:
        expect = sum(p[kind] for p in parts)
        if kind in ("lm_head", "matmul", "total"):  # the LM head runs once per prefill call
            expect -= 3 * parts[0]["lm_head"]
        assert one[kind] == expect, kind
    assert causal_pairs(3, 2) == 3 * 2 + 6
    assert one["total"] == one["matmul"] + one["mamba_conv"] + one["mamba_scan"]
    # Mini, 1K tokens: active parameters (~12B) x 2 x tokens dominate.
    assert 2.2e13 < prefill_flops(config, 1024)["total"] < 2.8e13
    with pytest.raises(ValueError):
        prefill_flops(config, 16, logits="some")


@pytest.mark.parametrize("what,t", [("forward", 64), ("prefill_chunk", 128)])
def test_dense_model_against_xla(what, t):
    """The model count is within 5% below XLA's; the rest is what the model count leaves out: the masked
    upper triangle of the causal scores (XLA computes the whole key block) and the elementwise ops (norms,
    softmax, SiLU, residuals), about 0.5% here."""
    spec = steps.ModelSpec(DENSE, np.dtype("float32"))
    params = jamba_jax.abstract_params(DENSE, jnp.float32)
    ids, valid = jax.ShapeDtypeStruct((1, t), jnp.int32), jax.ShapeDtypeStruct((1, t), bool)
    if what == "forward":
        lowered = steps.forward_logits.lower(params, ids, valid, spec=spec)
        model = prefill_flops(DENSE, t, logits="all")
    else:  # the compiled prefill program: LM head on the last position only
        lowered = steps.prefill_chunk.lower(params, cache_shapes(DENSE, 1, t, jnp.float32), ids, valid, spec=spec)
        model = prefill_flops(DENSE, t, logits="last")
    xla = lowered.compile().cost_analysis()["flops"]
    assert 0.95 < model["total"] / xla < 1.0
    masked = 4 * DENSE.num_attention_heads * DENSE.head_dim * (t * t - causal_pairs(t))
    assert 0.99 < (model["total"] + masked) / xla < 1.0
