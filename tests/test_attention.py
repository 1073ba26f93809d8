"""Blocked (flash-style) and split-K attention against the naive all-scores reference."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jamba_jax import JambaConfig
from jamba_jax.attention import blocked_attention, naive_attention, split_k_attention
from jamba_jax.cache import init_cache_arrays
from jamba_jax.steps import ModelSpec, prefill_chunk
from helpers import random_model


def case(seed, batch, q_len, k_len, n_kv, group, hd=8, left_pad=(0,), q_start=None):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((batch, q_len, n_kv, group, hd)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((batch, n_kv, k_len, hd)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((batch, n_kv, k_len, hd)), jnp.float32)
    valid = np.ones((batch, k_len), bool)
    for row, pad in enumerate(left_pad):
        valid[row, :pad] = False
    return q, k, v, (k_len - q_len if q_start is None else q_start), jnp.asarray(valid)


def real_queries(valid, start, q_len):
    """[batch, q_len] bool: queries that are real tokens (padding queries' outputs are never used)."""
    return np.asarray(valid)[:, start:start + q_len]


@pytest.mark.parametrize("batch,q_len,k_len,n_kv,group,block,pads", [
    (2, 37, 37, 2, 4, 8, (5, 0)),      # self-attention, length not a multiple of the block, left padding
    (1, 16, 100, 1, 8, 32, (0,)),      # chunked prefill: 16 new queries at slot 84 over a filled cache
    (3, 20, 20, 4, 1, 512, (0, 19, 3)),  # GQA 1, a single block, a row that is all padding but its last
    (2, 9, 64, 2, 2, 16, (30, 0)),     # queries at slots 55.., key slots past the queries masked
])
def test_blocked_equals_naive(batch, q_len, k_len, n_kv, group, block, pads):
    q, k, v, start, valid = case(0, batch, q_len, k_len, n_kv, group, left_pad=pads)
    ref = naive_attention(q, k, v, start, valid)
    got = blocked_attention(q, k, v, start, valid, block_k=block)
    real = real_queries(valid, start, q_len)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(ref)[real], rtol=1e-5, atol=1e-5)


def test_blocked_skips_future_blocks_exactly():
    """A chunk early in a long cache: key blocks after its last query are skipped (``lax.cond``), blocks
    before it and the one it ends in are not; a row of padding queries stays finite."""
    q, k, v, start, valid = case(3, 2, 16, 160, 2, 2, left_pad=(0, 30), q_start=20)
    ref = naive_attention(q, k, v, start, valid)
    got = blocked_attention(q, k, v, start, valid, block_k=32)  # queries at 20..35: blocks 2-4 skipped
    real = real_queries(valid, start, 16)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(ref)[real], rtol=1e-5, atol=1e-5)
    assert np.isfinite(np.asarray(got)).all()


@pytest.mark.parametrize("k_len,splits,n_kv,group,pads,q_start", [
    (100, 7, 2, 4, (10, 0), 99),   # the last slot, splits not dividing the length
    (64, 16, 1, 8, (0,), 40),      # a cache filled to slot 40 of 64: later slots are masked
    (33, 1, 4, 2, (0, 32), 32),    # one split; a row whose only real key is the query itself
])
def test_split_k_decode_equals_naive(k_len, splits, n_kv, group, pads, q_start):
    q, k, v, _, valid = case(1, len(pads), 1, k_len, n_kv, group, left_pad=pads)
    ref = naive_attention(q, k, v, q_start, valid)
    got = split_k_attention(q, k, v, q_start, valid, num_splits=splits)
    real = real_queries(valid, q_start, 1)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(ref)[real], rtol=1e-5, atol=1e-5)


def test_prefill_chunk_memory_does_not_grow_with_context():
    """The compiled prefill chunk's scratch memory is the same for 4K and 64K-token caches: no score
    tensor spans the whole context. (The K/V cache itself, an argument, grows as it must.)"""
    config = dataclasses.replace(JambaConfig.named("jamba-tiny"), num_attention_heads=8, num_key_value_heads=2,
                                 num_hidden_layers=2, attn_layer_period=2, attn_layer_offset=1, num_experts=1)
    model = random_model(config)
    spec = ModelSpec.of(model)

    def temp_bytes(max_len):
        cache = jax.eval_shape(lambda: init_cache_arrays(config, 1, max_len, jnp.float32))
        ids = jax.ShapeDtypeStruct((1, 256), jnp.int32)
        valid = jax.ShapeDtypeStruct((1, 256), bool)
        compiled = prefill_chunk.lower(model.params, cache, ids, valid, spec=spec).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    small, large = temp_bytes(4096), temp_bytes(65536)
    # A whole-context score tensor would add 256 queries x 61440 keys x 8 heads x 4 B = 503 MB.
    assert large - small <= 0.01 * small, (small, large)


def test_blocked_bf16_is_as_accurate_as_naive_bf16():
    """In bf16, the online softmax loses nothing against the all-scores reference (fp32 truth)."""
    rng = np.random.default_rng(0)
    errors = {"naive": [], "blocked": []}
    for _ in range(10):
        q, k, v = (rng.standard_normal(s) * c for s, c in [((2, 40, 2, 4, 16), 2), ((2, 2, 40, 16), 2),
                                                           ((2, 2, 40, 16), 1)])
        truth = np.asarray(naive_attention(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)), 0, None))
        low = [jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)]
        errors["naive"].append(np.abs(np.asarray(naive_attention(*low, 0, None), np.float32) - truth).max())
        errors["blocked"].append(np.abs(np.asarray(blocked_attention(*low, 0, None, block_k=16), np.float32)
                                        - truth).max())
    assert np.mean(errors["blocked"]) <= 1.05 * np.mean(errors["naive"]), errors
