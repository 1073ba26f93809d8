"""The Jamba decoder: embedding -> scanned blocks of the layer plan -> final norm -> LM head.

Layer ``i`` lives at ``blocks/layer_{i % P}[i // P]`` (params stacked over the ``num_blocks`` leading
axis and scanned with ``nn.scan``, so compile time does not grow with depth) or, for the last
``num_hidden_layers % P`` layers, at ``tail/layer_{i - num_blocks * P}``. ``P`` is
``config.block_size``.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from .attention import Attention
from .config import ATTENTION, JambaConfig
from .layers import Dtype, Linear, RMSNorm
from .mamba import Mamba
from .moe import MLP, MoE


class DecoderLayer(nn.Module):
    """``h = x + mixer(input_layernorm(x))``; ``out = h + ffn(pre_ff_layernorm(h))``."""

    config: JambaConfig
    mixer: str
    moe: bool
    dtype: Dtype = jnp.float32
    scan_impl: str = "associative"

    @nn.compact
    def __call__(self, x, token_valid):
        cfg = self.config
        h = RMSNorm(cfg.rms_norm_eps, self.dtype, name="input_layernorm")(x)
        if self.mixer == ATTENTION:
            h = Attention(cfg, self.dtype, name="self_attn")(h, token_valid)
        else:
            h = Mamba(cfg, self.dtype, self.scan_impl, name="mamba")(h, token_valid)
        x = x + h
        h = RMSNorm(cfg.rms_norm_eps, self.dtype, name="pre_ff_layernorm")(x)
        ffn = MoE if self.moe else MLP
        return x + ffn(cfg, self.dtype, name="feed_forward")(h)


class Block(nn.Module):
    """Consecutive layers at the given positions of the repeating layer plan (``layer_{j}``)."""

    config: JambaConfig
    positions: Sequence[int]
    dtype: Dtype = jnp.float32
    scan_impl: str = "associative"

    @nn.compact
    def __call__(self, x, token_valid):
        for j in self.positions:
            layer = DecoderLayer(self.config, self.config.mixer_type(j), self.config.is_moe(j), self.dtype,
                                 self.scan_impl, name=f"layer_{j}")
            x = layer(x, token_valid)
        return x, None


class JambaLM(nn.Module):
    """``input_ids [batch, seq]`` int, ``token_valid [batch, seq]`` bool or None ->
    logits ``[batch, seq, vocab]`` in ``dtype``."""

    config: JambaConfig
    dtype: Dtype = jnp.float32
    scan_impl: str = "associative"

    @nn.compact
    def __call__(self, input_ids, token_valid=None):
        cfg = self.config
        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, param_dtype=self.dtype,
                         embedding_init=nn.initializers.normal(0.02), name="embed_tokens")
        x = embed(input_ids)
        period = cfg.block_size
        if cfg.num_blocks:
            blocks = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                             in_axes=nn.broadcast, length=cfg.num_blocks)
            x, _ = blocks(cfg, tuple(range(period)), self.dtype, self.scan_impl, name="blocks")(x, token_valid)
        if cfg.num_tail_layers:
            x, _ = Block(cfg, tuple(range(cfg.num_tail_layers)), self.dtype, self.scan_impl,
                         name="tail")(x, token_valid)
        x = RMSNorm(cfg.rms_norm_eps, self.dtype, name="final_layernorm")(x)
        if cfg.tie_word_embeddings:
            return embed.attend(x)
        return Linear(cfg.vocab_size, dtype=self.dtype, name="lm_head")(x)


def layer_location(config: JambaConfig, layer: int) -> tuple[tuple[str, ...], int | None]:
    """Where layer ``layer``'s params live: (path prefix, index along the stacked block axis or None)."""
    period = config.block_size
    block, pos = divmod(layer, period)
    if block < config.num_blocks:
        return ("blocks", f"layer_{pos}"), block
    return ("tail", f"layer_{layer - config.num_blocks * period}"), None


def abstract_params(config: JambaConfig, dtype=jnp.float32):
    """The param pytree as ``jax.ShapeDtypeStruct`` leaves, without allocating."""
    model = JambaLM(config, dtype)
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return jax.eval_shape(lambda key, i: model.init(key, i)["params"], jax.random.key(0), ids)


def init_params(config: JambaConfig, key, dtype=jnp.float32):
    """Random params (HF-like initialisation) as a plain pytree."""
    return JambaLM(config, dtype).init(key, jnp.zeros((1, 1), jnp.int32))["params"]
