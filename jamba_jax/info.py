"""Parameter counts and memory sizes of a config, from abstract shapes (nothing is allocated)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import traverse_util

from .cache import cache_bytes
from .config import JambaConfig
from .model import abstract_params


def _nbytes(a: jax.ShapeDtypeStruct) -> int:
    return a.size * jnp.dtype(a.dtype).itemsize


def model_info(config: JambaConfig, *, context: int, batch: int = 1, dtype="bfloat16",
               cache_dtype="bfloat16") -> dict:
    """Total and active (per token: non-expert params plus top-k of E experts) parameter counts,
    param bytes by dtype, and KV-cache / Mamba-state bytes for ``batch`` sequences of ``context``
    tokens."""
    params = traverse_util.flatten_dict(abstract_params(config, jnp.dtype(dtype)))
    total = sum(a.size for a in params.values())
    expert = sum(a.size for path, a in params.items() if "experts" in path)
    active = total - expert + expert * config.num_experts_per_tok // max(config.num_experts, 1)
    by_dtype: dict[str, int] = {}
    for a in params.values():
        by_dtype[str(a.dtype)] = by_dtype.get(str(a.dtype), 0) + _nbytes(a)
    return {
        "total_params": total,
        "active_params": active,
        "param_bytes_by_dtype": by_dtype,
        "param_bytes": sum(by_dtype.values()),
        "context": context,
        "batch": batch,
        **cache_bytes(config, batch, context, jnp.dtype(cache_dtype)),
        "layers": config.num_hidden_layers,
        "attention_layers": config.num_attention_layers,
        "mamba_layers": config.num_mamba_layers,
        "moe_layers": sum(moe for _, moe in config.layer_plan),
    }
