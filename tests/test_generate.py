"""Cache, prefill and decode against full forwards and HF `generate`; sampling; streaming; the CLI."""

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jamba_jax
from hf_reference import HF_CONFIGS, checkpoint_pair, random_prompts
from jamba_jax import JambaConfig, JambaLM
from jamba_jax.cache import init_cache_arrays
from jamba_jax.generate import bucket_length, generate, prefill_layout
from jamba_jax.sampling import filter_logits, sample
from helpers import random_model, rel_err

# A short block (attention 2/1, experts 2/0) keeps compiles cheap: 2 scanned blocks + a 1-layer tail.
TINY = dataclasses.replace(JambaConfig.named("jamba-tiny"), num_hidden_layers=5, attn_layer_period=2,
                           attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=0)
TAIL = dataclasses.replace(TINY, mamba_proj_bias=True)


@pytest.mark.parametrize("split", [(12,), (5, 6, 1), (1,) * 12])
def test_incremental_forward_equals_full(split):
    """Prefill chunks and one-token decode steps through the cache give the full forward's logits."""
    model = random_model(TAIL)
    lm = JambaLM(TAIL)
    ids = np.random.default_rng(0).integers(1, TAIL.vocab_size, (2, sum(split)))
    full = jamba_jax.forward(model, ids)
    step = jax.jit(lambda params, ids, cache: lm.apply({"params": params}, ids, cache=cache))
    cache = init_cache_arrays(TAIL, 2, 16, jnp.float32)
    parts, start = [], 0
    for n in split:
        logits, cache = step(model.params, ids[:, start:start + n], cache)
        parts.append(logits)
        start += n
    assert int(cache["pos"]) == sum(split)
    assert rel_err(np.concatenate(parts, axis=1), full) < 1e-5


def test_chunked_prefill_equals_one_shot():
    model = random_model(TAIL)
    prompts = [list(range(3, 40)), list(range(7, 20))]
    one_shot = generate(model, prompts, max_new_tokens=6, chunk_size=64, stop_ids=[])
    chunked = generate(model, prompts, max_new_tokens=6, chunk_size=16, stop_ids=[])
    assert chunked.tokens == one_shot.tokens
    # 37 tokens in chunks of 32: a 16-token piece (the left padding and 5 tokens), then a whole chunk.
    assert prefill_layout(37, 6, 32)[2] == (16, 32)
    assert generate(model, prompts, max_new_tokens=6, chunk_size=32, stop_ids=[]).tokens == one_shot.tokens


def test_greedy_equals_step_by_step_argmax_of_full_forward():
    model = random_model(TINY)
    prompts = [[5, 6, 7], [9, 8, 7, 6, 5, 4, 3, 2, 1, 11]]
    result = generate(model, prompts, max_new_tokens=10, stop_ids=[])
    width = max(map(len, prompts)) + 10
    for prompt, new in zip(prompts, result.tokens):
        seq = list(prompt)
        for _ in range(10):  # full forwards, left-padded to one width (padding is exact) for one compile
            pad = width - len(seq)
            logits = jamba_jax.forward(model, [[0] * pad + seq], [[0] * pad + [1] * len(seq)])
            seq.append(int(np.argmax(logits[0, -1])))
        assert new == seq[len(prompt):]


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_greedy_batch_equals_hf_generate(tmp_path, name):
    hf_model, model = checkpoint_pair(tmp_path, name, seed=7)
    prompts = random_prompts(model.config.vocab_size, (5, 12, 1), seed=1)
    ours = generate(model, prompts, max_new_tokens=32)
    for prompt, new in zip(prompts, ours.tokens):
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, pad_token_id=0)
        ref = out[0, len(prompt):].tolist()
        eos = hf_model.config.eos_token_id
        if eos in ref:  # HF pads after EOS; ours stops there
            ref = ref[:ref.index(eos) + 1]
        assert new == ref


def test_bucket_lengths():
    assert [bucket_length(n, 256) for n in (1, 16, 17, 200, 256, 257, 600)] == [16, 16, 32, 256, 256, 272, 640]


def test_prefill_layout():
    """Pieces cover the padded prompt, short one first; the cache holds the new tokens in whole key blocks."""
    for n, new, chunk in [(1, 1, 256), (257, 64, 256), (600, 512, 256), (1024, 64, 256), (1100, 8, 1024)]:
        length, max_len, pieces = prefill_layout(n, new, chunk)
        assert length == bucket_length(n, chunk) == sum(pieces) >= n
        assert all(p == chunk for p in pieces[1:]) and pieces[0] <= chunk
        assert max_len % 512 == 0 and length + new <= max_len < length + new + 512
    assert prefill_layout(600, 512, 256) == (640, 1536, (128, 256, 256))


def numpy_filter(logits, top_k, top_p):
    """Reference: keep the top-k, then the smallest prefix of the sorted distribution reaching top_p."""
    out = np.array(logits, np.float64)
    for row in out:
        if top_k is not None:
            row[row < np.sort(row)[::-1][top_k - 1]] = -np.inf
        if top_p is not None:
            order = np.argsort(-row, kind="stable")
            p = np.exp(row[order] - row[order][0])
            p /= p.sum()
            keep = np.cumsum(p) - p < top_p
            row[order[~keep]] = -np.inf
    return out


@pytest.mark.parametrize("top_k,top_p", [(5, None), (None, 0.3), (None, 0.9), (7, 0.6), (1, None), (None, 1e-6)])
def test_top_k_top_p_against_numpy(top_k, top_p):
    logits = np.random.default_rng(0).standard_normal((4, 50)).astype(np.float32) * 3
    got = np.asarray(filter_logits(jnp.asarray(logits), top_k, top_p))
    want = numpy_filter(logits, top_k, top_p)
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    np.testing.assert_array_equal(got[~np.isinf(got)], logits[~np.isinf(want)])


def test_sampling_is_reproducible_and_respects_filters():
    logits = jnp.asarray(np.random.default_rng(1).standard_normal((3, 40)), jnp.float32)
    draw = lambda seed: np.asarray(sample(logits, jax.random.key(seed), temperature=0.8, top_k=4))
    assert (draw(3) == draw(3)).all()
    allowed = np.argsort(-np.asarray(logits), axis=1)[:, :4]
    for seed in range(20):
        assert all(t in allowed[r] for r, t in enumerate(draw(seed)))
    model = random_model(TINY)
    a = generate(model, [[1, 2, 3]], max_new_tokens=8, temperature=1.0, top_p=0.9, seed=5, stop_ids=[])
    b = generate(model, [[1, 2, 3]], max_new_tokens=8, temperature=1.0, top_p=0.9, seed=5, stop_ids=[])
    c = generate(model, [[1, 2, 3]], max_new_tokens=8, temperature=1.0, top_p=0.9, seed=6, stop_ids=[])
    assert a.tokens == b.tokens and a.tokens != c.tokens


def test_stream_equals_batch_and_eos_stops_a_row():
    model = random_model(TINY)
    prompts = [[4, 5, 6], [7, 8, 9, 10]]
    free = generate(model, prompts, max_new_tokens=12, stop_ids=[])
    eos = free.tokens[0][3]  # make row 0 stop at its 4th token
    result = generate(model, prompts, max_new_tokens=12, stop_ids=[eos])
    assert result.tokens[0] == free.tokens[0][:4]
    stream = generate(model, prompts, max_new_tokens=12, stop_ids=[eos], stream=True)
    steps = []
    try:
        while True:
            steps.append(next(stream))
    except StopIteration as done:
        streamed = done.value
    assert streamed.tokens == result.tokens
    assert [s[0] for s in steps if s[0] is not None] == result.tokens[0]
    assert steps[4][0] is None  # row 0 has stopped


@pytest.mark.parametrize("stream", [False, True])
def test_compile_time_is_reported_apart(stream):
    """The first call at new shapes compiles: that time is ``compile_seconds``, not prefill or decode."""
    # A config no other test compiles (and one per case): its first call cannot find compiled programs.
    model = random_model(dataclasses.replace(TINY, rms_norm_eps=TINY.rms_norm_eps * (2 + stream)))

    def run():
        t0 = time.perf_counter()
        result = generate(model, [list(range(3, 44))], max_new_tokens=9, stop_ids=[], stream=stream)
        if stream:
            try:
                while True:
                    next(result)
            except StopIteration as done:
                result = done.value
        return result, time.perf_counter() - t0

    first, wall = run()
    assert first.compile_seconds > 0
    assert first.prefill_seconds + first.decode_seconds + first.compile_seconds <= wall
    # The tiny model runs in milliseconds and compiles in seconds: timings that held the compile would not pass.
    assert first.prefill_seconds + first.decode_seconds < 0.25 * first.compile_seconds
    again, _ = run()
    assert again.compile_seconds == 0.0 and again.tokens == first.tokens


@pytest.mark.parametrize("kwargs,message", [
    (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(top_p=1.5), "top_p must be in"),
    (dict(stop=["x"]), "stop strings need the model's tokenizer"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(random_model(TINY), [[1, 2]], **kwargs)


def test_bad_prompts():
    model = random_model(TINY)
    with pytest.raises(ValueError, match="no tokenizer"):
        generate(model, "hello")
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1], []])
    with pytest.raises(ValueError, match="token id 9999 outside the vocabulary"):
        generate(model, [[1, 9999]])


def test_default_chunk_per_backend():
    """CPU keeps the 256-token chunk (``jamba bench``'s shapes); a GPU gets the larger ``GPU_CHUNK``."""
    from jamba_jax import steps

    assert jax.default_backend() == "cpu" and steps.default_chunk() == 256 == steps.DEFAULT_CHUNK
    assert steps.default_chunk("cpu") == 256 and steps.default_chunk("gpu") == steps.GPU_CHUNK == 2048
    assert steps.default_chunk("some-other-backend") == 256
    model = random_model(TINY)
    assert steps.model_platform(model) == "cpu" and steps.default_chunk(steps.model_platform(model)) == 256
    for n in (1, 37, 256, 300, 1000):
        assert bucket_length(n) == bucket_length(n, 256)
        assert prefill_layout(n, 8) == prefill_layout(n, 8, 256)
        assert steps.prefill_pieces(n) == steps.prefill_pieces(n, 256)
    # 2500 tokens with a GPU chunk: one 512-token piece (452 tokens + padding), then one whole chunk.
    assert prefill_layout(2500, 8, 2048)[::2] == (2560, (512, 2048))


def test_gpu_sized_chunk_prefill_equals_one_shot():
    """A 2048-token chunk (the GPU default) on a ragged batch of ~2500-token prompts: the chunked prefill's
    last-position logits equal a one-piece prefill's, and greedy generation gives the same tokens."""
    model = random_model(TAIL)
    rng = np.random.default_rng(3)
    lengths = (2500, 1703)
    prompts = [rng.integers(3, TAIL.vocab_size, n).tolist() for n in lengths]
    width = max(lengths)
    ids = np.zeros((2, width), np.int32)
    mask = np.zeros((2, width), bool)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):], mask[row, width - len(p):] = p, True
    max_len = 3072
    chunked, cache = jamba_jax.prefill(model, ids, jamba_jax.init_cache(model, 2, max_len), mask, chunk_size=2048)
    assert int(cache["pos"]) == width
    one_shot, _ = jamba_jax.prefill(model, ids, jamba_jax.init_cache(model, 2, max_len), mask, chunk_size=width)
    assert rel_err(chunked, one_shot) < 1e-5
    greedy = generate(model, prompts, max_new_tokens=4, chunk_size=2048, stop_ids=[])
    assert greedy.tokens == generate(model, prompts, max_new_tokens=4, chunk_size=4096, stop_ids=[]).tokens
    assert [t[0] for t in greedy.tokens] == np.argmax(np.asarray(one_shot), -1).tolist()
