"""Feed-forward blocks: the dense SiLU-gated MLP and the top-k mixture of experts.

The MoE is dropless: the (token, choice) pairs are sorted by expert and each expert's contiguous run
of rows is multiplied by that expert's weights with one grouped matmul (`jax.lax.ragged_dot`; for int8
weights, see `quant.int8_ragged_dot`)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from .config import JambaConfig
from .layers import Dtype, Linear, default_init
from .quant import QuantizedWeight, int8_ragged_dot


class MLP(nn.Module):
    """``down(silu(gate(x)) * up(x))``: ``[..., hidden]`` -> ``[..., hidden]`` in ``dtype``."""

    config: JambaConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        cfg = self.config
        gate = Linear(cfg.intermediate_size, dtype=self.dtype, name="gate_proj")(x)
        up = Linear(cfg.intermediate_size, dtype=self.dtype, name="up_proj")(x)
        return Linear(cfg.hidden_size, dtype=self.dtype, name="down_proj")(nn.silu(gate) * up)


def route(router_logits: jnp.ndarray, top_k: int):
    """fp32 softmax over all experts, then top-k; the k weights are not renormalised.

    router_logits ``[tokens, experts]`` -> (weights ``[tokens, k]`` fp32, expert ids ``[tokens, k]`` int32)."""
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    return jax.lax.top_k(probs, top_k)


def experts_ffn(x, expert_ids, weights, gate_proj, up_proj, down_proj, impl: str = "xla"):
    """Dropless grouped expert FFN.

    x ``[tokens, hidden]``; expert_ids, weights ``[tokens, k]``; gate_proj, up_proj
    ``[experts, hidden, inter]``; down_proj ``[experts, inter, hidden]``. Returns
    ``[tokens, hidden]`` in ``x.dtype``: ``sum_k weights[:, k] * down_e(silu(gate_e(x)) * up_e(x))``.
    A projection may be a ``QuantizedWeight`` (int8); ``impl`` ("xla", "pallas", "pallas-interpret") picks
    its grouped matmul (see ``quant.int8_ragged_dot``).
    """
    tokens, top_k = expert_ids.shape
    num_experts = gate_proj.shape[0]
    flat_ids = expert_ids.reshape(-1)
    order = jnp.argsort(flat_ids, stable=True)  # rows of one expert become contiguous
    rows = x[order // top_k]  # [tokens * k, hidden]
    group_sizes = jnp.bincount(flat_ids, length=num_experts).astype(jnp.int32)

    def grouped(lhs, rhs):
        if isinstance(rhs, QuantizedWeight):
            return int8_ragged_dot(lhs, rhs, group_sizes, impl)
        return jax.lax.ragged_dot(lhs, rhs.astype(lhs.dtype), group_sizes)

    h = nn.silu(grouped(rows, gate_proj)) * grouped(rows, up_proj)
    out = grouped(h, down_proj) * weights.reshape(-1)[order][:, None].astype(x.dtype)
    unsorted = jnp.zeros_like(out).at[order].set(out)
    return unsorted.reshape(tokens, top_k, -1).sum(axis=1)


class MoE(nn.Module):
    """Top-k mixture of SiLU-gated experts: ``[batch, seq, hidden]`` -> same, in ``dtype``.
    Params: ``router/kernel [hidden, experts]`` and ``experts/{gate,up}_proj [experts, hidden, inter]``,
    ``experts/down_proj [experts, inter, hidden]``. ``moe_impl`` picks the int8 grouped matmul."""

    config: JambaConfig
    dtype: Dtype = jnp.float32
    moe_impl: str = "xla"

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        cfg = self.config
        E, H, inter = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
        flat = x.reshape(-1, H)
        logits = Linear(E, dtype=self.dtype, name="router")(flat)
        self.sow("intermediates", "router_logits", logits)  # [tokens, experts], for the aux loss
        weights, expert_ids = route(logits, cfg.num_experts_per_tok)
        experts = Experts(E, H, inter, self.dtype, name="experts")
        out = experts_ffn(flat, expert_ids, weights.astype(self.dtype), *experts(), self.moe_impl)
        return out.reshape(x.shape)


class Experts(nn.Module):
    """Holds the stacked expert weights; ``__call__`` returns (gate_proj, up_proj, down_proj)."""

    num_experts: int
    hidden: int
    inter: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self):
        E, H, inter = self.num_experts, self.hidden, self.inter
        return (self.param("gate_proj", default_init, (E, H, inter), self.dtype),
                self.param("up_proj", default_init, (E, H, inter), self.dtype),
                self.param("down_proj", default_init, (E, inter, H), self.dtype))
