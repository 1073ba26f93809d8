"""Parameter counts and memory sizes of a config, from abstract shapes (nothing is allocated)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import traverse_util

from .cache import cache_bytes
from .config import JambaConfig
from .params import abstract_params


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


# Table 1 of the Jamba-1.5 paper: KV cache at 256K tokens in 16-bit. The Jamba rows are computed from
# the bundled configs; the attention-only models from their published architectures (every layer is
# attention: 2 (K and V) x layers x kv_heads x head_dim values per token), frozen here as
# (name, layers, kv_heads, head_dim, the paper's figure in GB).
PUBLISHED_ATTENTION_MODELS = (
    ("Mistral-7B", 32, 8, 128, 32),
    ("Mixtral-8x7B", 32, 8, 128, 32),
    ("LLaMA-3.1-8B", 32, 8, 128, 32),
    ("Mixtral-8x22B", 56, 8, 128, 56),
    ("Mistral-Large-2", 88, 8, 128, 88),
    ("LLaMA-3.1-70B", 80, 8, 128, 80),
)
JAMBA_PAPER_KV_GB = {"jamba-1.5-mini": 4, "jamba-1.5-large": 9}


def kv_cache_table(context: int = 262144, cache_dtype="bfloat16") -> list[dict]:
    """KV-cache bytes for one sequence of ``context`` tokens: Jamba-1.5-Mini and -Large from their configs
    (``cache_bytes``, which also gives the Mamba state), the attention-only models of the paper's Table 1
    from ``PUBLISHED_ATTENTION_MODELS``. ``paper_gb`` is the paper's figure (256K tokens, 16-bit)."""
    itemsize = jnp.dtype(cache_dtype).itemsize
    rows = []
    for name, paper in JAMBA_PAPER_KV_GB.items():
        config = JambaConfig.named(name)
        sizes = cache_bytes(config, 1, context, jnp.dtype(cache_dtype))
        rows.append({"model": name, "source": "bundled config", "attention_layers": config.num_attention_layers,
                     "layers": config.num_hidden_layers, "kv_heads": config.num_key_value_heads,
                     "head_dim": config.head_dim, "kv_cache_bytes": sizes["kv_cache_bytes"],
                     "mamba_state_bytes": sizes["mamba_state_bytes"], "paper_gb": paper})
    for name, layers, kv_heads, head_dim, paper in PUBLISHED_ATTENTION_MODELS:
        rows.append({"model": name, "source": "published architecture", "attention_layers": layers,
                     "layers": layers, "kv_heads": kv_heads, "head_dim": head_dim,
                     "kv_cache_bytes": 2 * layers * kv_heads * head_dim * itemsize * context,
                     "mamba_state_bytes": 0, "paper_gb": paper})
    return rows
