"""Builds small random HF `JambaForCausalLM` checkpoints (torch CPU): the numerical reference.

Weights are redrawn at larger scales than HF's init (which leaves logits nearly flat), so that every
parameter, routing decision and Mamba branch visibly changes the output."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from transformers import JambaConfig as HFJambaConfig
from transformers import JambaForCausalLM


# Small configs of the released kinds of layer, for tests against HF: the released layer plan (one scanned
# block of 8 and a one-layer tail, top-2 of 4 experts), and a short plan (attention 2/1, experts 2/0: two
# blocks and a tail) with top-1 routing, 4-way GQA and tied embeddings.
HF_CONFIGS = {
    "released_plan": dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=9,
                          num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                          mamba_d_state=8, mamba_dt_rank=4),
    "top1_gqa4_tied": dict(vocab_size=80, hidden_size=32, intermediate_size=40, num_hidden_layers=5,
                           num_attention_heads=4, num_key_value_heads=1, num_experts=3, num_experts_per_tok=1,
                           attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                           expert_layer_offset=0, mamba_d_state=6, tie_word_embeddings=True),
}


# The smallest checkpoint with every kind of tensor (attention, Mamba, MoE and a dense MLP; a scanned block
# and a tail), for tests of checkpoint files rather than numerics.
SMALL_CHECKPOINT = dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=3,
                        num_attention_heads=2, num_key_value_heads=1, num_experts=2, num_experts_per_tok=1,
                        attn_layer_period=2, attn_layer_offset=1, mamba_d_state=4)


def randomize_(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("layernorm.weight"):
                value = 1.0 + 0.2 * noise
            elif name.endswith("A_log"):
                value = torch.log(torch.arange(1, p.shape[-1] + 1, dtype=torch.float32)) + 0.3 * noise
            elif name.endswith("mamba.D"):
                value = noise
            elif name.endswith("dt_proj.bias"):
                value = 0.5 * noise - 1.0
            elif name.endswith("conv1d.weight"):
                value = 0.5 * noise
            elif name.endswith("router.weight"):
                value = noise
            elif name.endswith("embed_tokens.weight"):
                value = noise
            elif name.endswith("bias"):
                value = 0.1 * noise
            else:  # linear weights [out, in] (expert weights included)
                value = noise / math.sqrt(p.shape[-1])
            p.copy_(value.to(p.dtype))


def make_checkpoint(directory: Path, *, seed: int = 0, torch_dtype=torch.float32,
                    max_shard_size: str | None = "200KB", **config) -> JambaForCausalLM:
    """Saves a random HF Jamba checkpoint into ``directory`` and returns the torch model (eval mode)."""
    torch.manual_seed(seed)
    cfg = HFJambaConfig(**config)
    model = JambaForCausalLM(cfg).to(torch_dtype)
    model.config._attn_implementation = "eager"
    randomize_(model, seed)
    model.eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    return model


def checkpoint_pair(directory: Path, name: str, *, seed: int, dtype: str = "float32"):
    """``HF_CONFIGS[name]`` as a random HF checkpoint in ``directory``: (the torch model, the same checkpoint
    loaded by jamba_jax in ``dtype``)."""
    import jamba_jax

    hf_model = make_checkpoint(directory, seed=seed, **HF_CONFIGS[name])
    return hf_model, jamba_jax.load(directory, dtype=dtype)


def random_prompts(vocab_size: int, lengths, seed: int) -> list[list[int]]:
    """Prompts of the given lengths, ids past the special tokens 0-2."""
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab_size, n).tolist() for n in lengths]


def hf_logits(model: JambaForCausalLM, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    """Logits ``[batch, seq, vocab]`` as float32 numpy."""
    with torch.no_grad():
        ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
        mask = None if attention_mask is None else torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
        out = model(input_ids=ids, attention_mask=mask, use_cache=False)
    return out.logits.float().numpy()
