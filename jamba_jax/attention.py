"""Grouped-query self-attention with no positional encoding (Jamba's Mamba layers carry position)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from .config import JambaConfig
from .layers import Dtype, Linear


def attention_mask(query_valid: jnp.ndarray | None, seq: int) -> jnp.ndarray:
    """Causal mask combined with a key padding mask: ``[batch or 1, 1, 1, q, k]`` bool, True = attend.
    ``query_valid [batch, seq]`` bool marks real (non-pad) tokens."""
    causal = jnp.tril(jnp.ones((seq, seq), bool))
    if query_valid is None:
        return causal[None, None, None]
    return causal[None, None, None] & query_valid[:, None, None, None, :]


def dot_product_attention(q, k, v, mask):
    """Softmax attention with fp32 scores and softmax.

    q ``[batch, q_len, kv_heads, group, head_dim]``; k, v ``[batch, k_len, kv_heads, head_dim]``;
    mask broadcastable to ``[batch, kv_heads, group, q_len, k_len]`` (True = attend).
    Returns ``[batch, q_len, kv_heads, group, head_dim]`` in ``q.dtype``. Fully masked rows (a query
    that is itself padding) give a uniform average instead of NaN; their outputs are never used.
    """
    scale = q.shape[-1] ** -0.5
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhgqk,bkhd->bqhgd", probs, v)


def cached_attention_mask(pos, seq: int, kv_valid: jnp.ndarray) -> jnp.ndarray:
    """Mask for ``seq`` new queries at slots ``pos .. pos + seq - 1`` over a cache of ``max_len`` slots:
    ``[batch, 1, 1, seq, max_len]`` bool. ``kv_valid [batch, max_len]`` marks slots holding real tokens
    (the new ones included)."""
    max_len = kv_valid.shape[1]
    causal = jnp.arange(max_len)[None, :] <= pos + jnp.arange(seq)[:, None]  # [seq, max_len]
    return causal[None, None, None] & kv_valid[:, None, None, None, :]


class Attention(nn.Module):
    """GQA self-attention: ``[batch, seq, hidden]`` -> ``[batch, seq, hidden]`` in ``dtype``.

    Without ``cache`` it attends within ``x`` (causal + ``token_valid`` padding mask). With ``cache``
    (``{"key", "value"}: [batch, max_len, kv_heads, head_dim]``) it writes the new keys/values at slot
    ``pos``, attends over the cache under ``kv_valid [batch, max_len]`` and returns the updated cache too.
    """

    config: JambaConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, token_valid, cache=None, pos=None, kv_valid=None):
        cfg = self.config
        batch, seq, _ = x.shape
        n_kv, hd = cfg.num_key_value_heads, cfg.head_dim
        group = cfg.num_attention_heads // n_kv
        q = Linear(cfg.num_attention_heads * hd, dtype=self.dtype, name="q_proj")(x)
        k = Linear(n_kv * hd, dtype=self.dtype, name="k_proj")(x)
        v = Linear(n_kv * hd, dtype=self.dtype, name="v_proj")(x)
        q = q.reshape(batch, seq, n_kv, group, hd)
        k = k.reshape(batch, seq, n_kv, hd)
        v = v.reshape(batch, seq, n_kv, hd)
        if cache is None:
            out = dot_product_attention(q, k, v, attention_mask(token_valid, seq))
        else:
            start = (0, pos, 0, 0)
            k = jax.lax.dynamic_update_slice(cache["key"], k.astype(cache["key"].dtype), start)
            v = jax.lax.dynamic_update_slice(cache["value"], v.astype(cache["value"].dtype), start)
            cache = {"key": k, "value": v}
            out = dot_product_attention(q, k.astype(self.dtype), v.astype(self.dtype),
                                        cached_attention_mask(pos, seq, kv_valid))
        out = Linear(cfg.hidden_size, dtype=self.dtype, name="o_proj")(out.reshape(batch, seq, -1))
        return out, cache
