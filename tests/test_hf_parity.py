"""Logits of `jamba_jax.load` + `forward` against HF `JambaForCausalLM` on random checkpoints."""

import numpy as np
import pytest
import torch

import jamba_jax
from hf_reference import hf_logits, make_checkpoint
from helpers import rel_err

# Each config varies knobs of the layer plan and of the modules.
CONFIGS = {
    # 5 layers, not a multiple of the block (4): one scanned block + a 1-layer tail; odd sizes; GQA 2.
    "tail_gqa2_top2": dict(vocab_size=97, hidden_size=48, intermediate_size=40, num_hidden_layers=5,
                           num_attention_heads=6, num_key_value_heads=3, num_experts=4, num_experts_per_tok=2,
                           attn_layer_period=4, attn_layer_offset=1, expert_layer_period=2,
                           expert_layer_offset=0, mamba_d_state=5, mamba_d_conv=4, mamba_expand=2),
    # top-1 over 3 experts, MQA (GQA 4), projection biases on, conv bias off, tied embeddings, 2 blocks + tail.
    "top1_mqa_bias_tied": dict(vocab_size=64, hidden_size=32, intermediate_size=24, num_hidden_layers=7,
                               num_attention_heads=4, num_key_value_heads=1, num_experts=3,
                               num_experts_per_tok=1, attn_layer_period=3, attn_layer_offset=2,
                               expert_layer_period=3, expert_layer_offset=1, mamba_d_state=7,
                               mamba_d_conv=3, mamba_expand=1, mamba_dt_rank=5, mamba_proj_bias=True,
                               mamba_conv_bias=False, tie_word_embeddings=True),
    # a single expert: every feed-forward is the dense MLP; GQA 8, attention first in each block.
    "dense_gqa8": dict(vocab_size=80, hidden_size=64, intermediate_size=72, num_hidden_layers=6,
                       num_attention_heads=8, num_key_value_heads=1, num_experts=1, num_experts_per_tok=1,
                       attn_layer_period=2, attn_layer_offset=0, mamba_d_state=16, mamba_d_conv=4,
                       mamba_expand=2),
    # the released layer plan (attention 8/4, experts 2/1) on 9 layers: 1 block + 1-layer tail.
    "released_plan": dict(vocab_size=128, hidden_size=32, intermediate_size=56, num_hidden_layers=9,
                          num_attention_heads=4, num_key_value_heads=2, num_experts=6, num_experts_per_tok=2,
                          mamba_d_state=8, mamba_dt_rank=6),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def checkpoint(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    model = make_checkpoint(directory, seed=len(request.param), **CONFIGS[request.param])
    return directory, model


@pytest.mark.parametrize("scan", ["associative", "sequential"])
def test_fp32_logits_match_hf(checkpoint, scan):
    directory, hf_model = checkpoint
    ours = jamba_jax.load(directory, dtype="float32", kernels=jamba_jax.Kernels(scan=scan))
    ids = np.random.default_rng(0).integers(0, ours.config.vocab_size, (2, 19))
    ref = hf_logits(hf_model, ids)
    got = np.asarray(jamba_jax.forward(ours, ids))
    assert got.shape == ref.shape
    assert rel_err(got, ref) < 1e-4


def test_fp32_left_padded_batch_matches_hf(checkpoint):
    directory, hf_model = checkpoint
    if hf_model.config.mamba_proj_bias:
        pytest.skip("HF lets in_proj's bias leak padding into the conv; covered by test_padding")
    ours = jamba_jax.load(directory, dtype="float32")
    rng = np.random.default_rng(1)
    ids = rng.integers(1, ours.config.vocab_size, (3, 13))
    mask = np.ones_like(ids)
    mask[0, :5] = 0
    mask[2, :1] = 0
    ids = np.where(mask == 1, ids, 0)
    ref = hf_logits(hf_model, ids, mask)
    got = np.asarray(jamba_jax.forward(ours, ids, mask))
    real = mask == 1
    assert rel_err(got[real], ref[real]) < 1e-4


def test_bf16_error_no_worse_than_hf_bf16(tmp_path):
    """bf16 checkpoints in bf16: measured against the fp32 run of the same weights, our bf16 logits are
    at least as accurate as HF's bf16 logits. The dense config keeps bf16's discrete top-k routing
    flips (which make any two bf16 runs of a MoE differ by O(1) at some positions) out of the measure."""
    config = CONFIGS["dense_gqa8"]
    ours_err, hf_err = [], []
    for seed in range(4):
        directory = tmp_path / str(seed)
        hf_model = make_checkpoint(directory, seed=seed, torch_dtype=torch.bfloat16, **config)
        ours = jamba_jax.load(directory)  # the checkpoint's dtype
        assert ours.dtype == np.dtype("bfloat16")
        ids = np.random.default_rng(seed).integers(0, config["vocab_size"], (2, 16))
        hf_bf16 = hf_logits(hf_model, ids)
        truth = hf_logits(hf_model.float(), ids)
        ours_bf16 = np.asarray(jamba_jax.forward(ours, ids).astype(np.float32))
        ours_err.append(rel_err(ours_bf16, truth))
        hf_err.append(rel_err(hf_bf16, truth))
    assert np.mean(ours_err) <= 1.2 * np.mean(hf_err), (ours_err, hf_err)
    assert max(ours_err) <= max(hf_err), (ours_err, hf_err)
