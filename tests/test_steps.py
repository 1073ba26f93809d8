"""The public steps (``init_cache``, ``prefill``, ``decode_step``) against HF transformers' logits, on a
ragged left-padded batch, and their argument checks."""

import numpy as np
import pytest

import jamba_jax
from hf_reference import HF_CONFIGS, checkpoint_pair, hf_logits, random_prompts

LENGTHS = (7, 12, 3)  # ragged: left-padded to 12
DECODE_STEPS = 3


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_prefill_and_decode_steps_equal_hf(tmp_path, name):
    hf_model, model = checkpoint_pair(tmp_path, name, seed=3)
    vocab = model.config.vocab_size
    prompts = random_prompts(vocab, LENGTHS, seed=0)
    rng = np.random.default_rng(1)
    width = max(LENGTHS)
    ids = np.zeros((len(prompts), width), np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):], mask[row, width - len(p):] = p, 1

    def assert_equals_hf(logits, sequences):
        """Each row's logits against HF's last-position logits of that row alone (no padding)."""
        logits = np.asarray(logits)
        assert logits.shape == (len(sequences), vocab)
        for row, seq in enumerate(sequences):
            ref = hf_logits(hf_model, np.asarray([seq]))[0, -1]
            assert np.abs(logits[row] - ref).max() <= 1e-4 * np.abs(ref).max(), (row, len(seq))

    cache = jamba_jax.init_cache(model, len(prompts), width + DECODE_STEPS)
    logits, cache = jamba_jax.prefill(model, ids, cache, attention_mask=mask, chunk_size=5)  # pieces 2, 5, 5
    assert int(cache["pos"]) == width
    assert_equals_hf(logits, prompts)
    sequences = [list(p) for p in prompts]
    for step in range(DECODE_STEPS):
        new = np.argmax(np.asarray(logits), axis=-1) if step % 2 else rng.integers(3, vocab, 3)
        for seq, t in zip(sequences, new):
            seq.append(int(t))
        logits, cache = jamba_jax.decode_step(model, new, cache)
        assert_equals_hf(logits, sequences)
    assert int(cache["pos"]) == width + DECODE_STEPS


def test_step_arguments_are_checked(tmp_path):
    model = jamba_jax.Jamba(jamba_jax.JambaConfig.named("jamba-tiny"), None)
    cache = jamba_jax.cache.init_cache_arrays(model.config, 2, 8, "float32")
    with pytest.raises(ValueError, match="3 rows of ids for a cache of 2 rows"):
        jamba_jax.prefill(model, np.ones((3, 4), np.int32), cache)
    with pytest.raises(ValueError, match="9 tokens after 0 cached ones overflow the cache's 8 slots"):
        jamba_jax.prefill(model, np.ones((2, 9), np.int32), cache)
    with pytest.raises(ValueError, match="attention_mask shape"):
        jamba_jax.prefill(model, np.ones((2, 4), np.int32), cache, attention_mask=np.ones((2, 5)))
    with pytest.raises(ValueError, match="ids must be integer"):
        jamba_jax.prefill(model, np.ones((2, 4), np.float32), cache)
    with pytest.raises(ValueError, match="ids must be integer \\[batch\\]"):
        jamba_jax.decode_step(model, np.ones((2, 1), np.int32), cache)
    with pytest.raises(ValueError, match="batch_size and max_length must be >= 1"):
        jamba_jax.init_cache(model, 0, 8)
