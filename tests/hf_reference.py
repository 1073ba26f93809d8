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


def hf_logits(model: JambaForCausalLM, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    """Logits ``[batch, seq, vocab]`` as float32 numpy."""
    with torch.no_grad():
        ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
        mask = None if attention_mask is None else torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
        out = model(input_ids=ids, attention_mask=mask, use_cache=False)
    return out.logits.float().numpy()
