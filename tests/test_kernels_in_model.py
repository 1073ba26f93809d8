"""The model with the Pallas kernels (in interpret mode off GPU) gives the logits of the XLA paths:
``scan_impl="pallas-interpret"`` (selective scan) and ``attn_impl="pallas-interpret"`` (flash and
decode attention), for a left-padded prefill and decode steps through the cache; ``"pallas"`` off GPU
is the XLA path; ``kernels=`` selects every implementation at once."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jamba_jax
import jamba_jax.train
from jamba_jax import JambaConfig, JambaLM, Kernels
from jamba_jax import scan as scan_module
from jamba_jax.cache import init_cache_arrays
from pallas_kernels import selective_scan as kernels
from helpers import random_params

TOL = 1e-5
# Layers mamba, attention, mamba (one scanned block); dense MLPs keep compile times short.
CONFIG = dataclasses.replace(JambaConfig.named("jamba-tiny"), num_hidden_layers=3, attn_layer_period=3,
                             attn_layer_offset=1, num_experts=1, vocab_size=128)
PROMPT, DECODE_STEPS, BATCH = 19, 2, 2
# On a GPU the same tests check the compiled kernel (run with JAX_DEFAULT_MATMUL_PRECISION=highest).
PALLAS = "pallas" if jax.default_backend() == "gpu" else "pallas-interpret"


def inputs():
    rng = np.random.default_rng(0)
    ids = rng.integers(1, CONFIG.vocab_size, (BATCH, PROMPT + DECODE_STEPS)).astype(np.int32)
    valid = np.ones(ids.shape, bool)
    valid[0, :6] = False  # left padding on the first row
    return jnp.asarray(ids), jnp.asarray(valid)


def assert_close(got, ref, valid=None):
    """Within TOL of the largest reference value; logits only where ``valid`` [batch, seq]."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape
    if valid is not None:
        got, ref = got[np.asarray(valid)], ref[np.asarray(valid)]
    assert np.abs(got - ref).max() <= TOL * np.abs(ref).max()


def decode(params, scan, attention="xla"):
    """Logits of the left-padded prompt through the cache, then of each decode step; the cache."""
    ids, valid = inputs()
    model = JambaLM(CONFIG, jnp.float32, Kernels(scan=scan, attention=attention))
    step = jax.jit(lambda p, i, v, c: model.apply({"params": p}, i, v, cache=c))
    cache = init_cache_arrays(CONFIG, BATCH, PROMPT + DECODE_STEPS, jnp.float32)
    logits, cache = step(params, ids[:, :PROMPT], valid[:, :PROMPT], cache)
    outs = [logits]
    for t in range(PROMPT, PROMPT + DECODE_STEPS):
        logits, cache = step(params, ids[:, t:t + 1], valid[:, t:t + 1], cache)
        outs.append(logits)
    return outs, cache


def test_pallas_interpret_decode_matches_associative(monkeypatch):
    """Prefill (padded, through the cache; the kernel with its default configuration, two-pass
    "segmented" since the minimum segment length is lowered to 8) and decode steps (the Pallas state update)."""
    monkeypatch.setattr(kernels, "_MIN_SEG_LEN", 8)
    assert kernels._segment_length(PROMPT, scan_module.PALLAS_SCAN_CONFIG["chunk"], None, 8)[1] == 2
    params = random_params(CONFIG)
    ref, ref_cache = decode(params, "associative")
    got, got_cache = decode(params, PALLAS)
    _, valid = inputs()
    assert_close(got[0], ref[0], valid[:, :PROMPT])
    for g, r in zip(got[1:], ref[1:]):
        assert_close(g, r)
    jax.tree.map(assert_close, got_cache, ref_cache)  # conv and ssm states, K/V


def test_pallas_attention_decode_matches_xla():
    """Prefill through the cache (flash kernel) and decode steps (split-K decode kernel)."""
    params = random_params(CONFIG)
    ref, ref_cache = decode(params, "associative")
    got, got_cache = decode(params, "associative", PALLAS)
    _, valid = inputs()
    assert_close(got[0], ref[0], valid[:, :PROMPT])
    for g, r in zip(got[1:], ref[1:]):
        assert_close(g, r)
    jax.tree.map(assert_close, got_cache, ref_cache)


@pytest.mark.slow  # interpret-mode kernels through generate: minutes on CPU; run with -m slow (and on GPU)
def test_all_kernels_forward_and_generate_match_xla():
    """``with_kernels`` reaches every layer: the padded forward without a cache, and greedy generation."""
    model = jamba_jax.Jamba(CONFIG, random_params(CONFIG))
    kernels_model = model.with_kernels(PALLAS)
    assert kernels_model.kernels == Kernels(PALLAS, PALLAS, PALLAS)
    ids, valid = inputs()
    assert_close(jamba_jax.forward(kernels_model, ids, valid), jamba_jax.forward(model, ids, valid), valid)
    prompts = [[5, 9, 17, 3], [7, 8]]
    got = jamba_jax.generate(kernels_model, prompts, max_new_tokens=3, stop_ids=[]).tokens
    assert got == jamba_jax.generate(model, prompts, max_new_tokens=3, stop_ids=[]).tokens


def test_kernels_option():
    assert Kernels.named("pallas").replace(scan="sequential") == Kernels("sequential", "pallas", "pallas")
    assert Kernels.named("xla") == Kernels() == jamba_jax.Jamba(CONFIG, {}).kernels
    assert jamba_jax.Jamba(CONFIG, {}, kernels="pallas").kernels == Kernels.named("pallas")
    with pytest.raises(ValueError, match="unknown kernels 'cuda'"):
        Kernels.named("cuda")
    with pytest.raises(ValueError, match="Kernels.attention 'cudnn'"):
        jamba_jax.Jamba(CONFIG, {}, kernels=Kernels(attention="cudnn"))
    with pytest.raises(ValueError, match="Kernels.moe_int8"):
        Kernels(moe_int8="cuda")
    with pytest.raises(ValueError, match="no backward pass"):
        jamba_jax.train.TrainConfig(kernels=Kernels(scan=PALLAS))


def test_pallas_interpret_forward_matches_associative():
    """``Kernels.scan`` reaches the Mamba layers: the plain padded forward, without a cache."""
    model = jamba_jax.Jamba(CONFIG, random_params(CONFIG), kernels=Kernels(scan=PALLAS))
    ids, valid = inputs()
    got = jamba_jax.forward(model, ids, valid)
    ref = jamba_jax.forward(model.with_kernels(Kernels(scan="associative")), ids, valid)
    assert_close(got, ref, valid)


def test_pallas_off_gpu_is_the_backends_xla_scan():
    """Off GPU ``"pallas"`` runs ``"xla"`` bit for bit; on CPU that is the sequential scan with cheaper
    exp and softplus (within 1e-6 of the oracle ``"sequential"``; test_scan checks both against float64)."""
    if jax.default_backend() != "cpu":
        pytest.skip("checks the CPU fallback")
    rng = np.random.default_rng(1)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    args = (f(2, 9, 16), f(2, 9, 16), -jnp.exp(f(16, 4)), f(2, 9, 4), f(2, 9, 4), f(16), f(2, 9, 16), f(16))
    mask = jnp.asarray(rng.random((2, 9)) > 0.3)
    y_xla, h_xla = scan_module.selective_scan(*args, mask=mask, impl="xla")
    y, h = scan_module.selective_scan(*args, mask=mask, impl="pallas")
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_xla))
    np.testing.assert_array_equal(np.asarray(h), np.asarray(h_xla))
    y_seq, h_seq = scan_module.selective_scan(*args, mask=mask, impl="sequential")
    assert np.abs(np.asarray(y_xla - y_seq)).max() / np.abs(np.asarray(y_seq)).max() < 1e-6
    assert np.abs(np.asarray(h_xla - h_seq)).max() / np.abs(np.asarray(h_seq)).max() < 1e-6


def test_unused_kernel_calls_are_dead_code():
    """Every Pallas entry point is jitted, so a call whose outputs are unused is removed before lowering
    (a bare ``pallas_call`` never is). Newer flax's ``nn.scan`` depends on this: it rejects a block whose
    broadcast trace keeps any computation on the scanned inputs. Compiled (not interpreted) kernels cannot
    lower on CPU, so a kernel that survived would fail the lowering here."""
    from pallas_kernels.flash_attention import decode_attention_pallas, flash_attention_pallas
    from pallas_kernels.int8_ragged_dot import int8_ragged_dot_pallas

    f32 = lambda *s: jnp.ones(s, jnp.float32)  # noqa: E731
    x, A, B, D = f32(1, 16, 32), -f32(32, 4), f32(1, 16, 4), f32(32)
    q, k = f32(1, 16, 2, 2, 32), f32(1, 2, 16, 32)
    calls = {
        "selective_scan_pallas": lambda: kernels.selective_scan_pallas(x, x, A, B, B, D, x, D),
        "selective_state_update_pallas": lambda: kernels.selective_state_update_pallas(
            f32(1, 32, 4), x[:, 0], x[:, 0], A, B[:, 0], B[:, 0], D, x[:, 0], D),
        "flash_attention_pallas": lambda: flash_attention_pallas(q, k, k, 0, None),
        "decode_attention_pallas": lambda: decode_attention_pallas(q[:, :1], k, k, 15, None),
        "int8_ragged_dot_pallas": lambda: int8_ragged_dot_pallas(
            f32(4, 32), jnp.ones((2, 32, 16), jnp.int8), f32(2, 16), jnp.array([3, 1], jnp.int32)),
    }
    for name, call in calls.items():
        hlo = jax.jit(lambda: (call(), 0)[1]).lower().as_text()
        assert "pallas" not in hlo.lower() and "triton" not in hlo.lower(), name
