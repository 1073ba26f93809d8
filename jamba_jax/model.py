"""The Jamba decoder: embedding -> scanned blocks of the layer plan -> final norm -> LM head.

Layer ``i`` lives at ``blocks/layer_{i % P}[i // P]`` (params stacked over the ``num_blocks`` leading
axis and scanned with ``nn.scan``, so compile time does not grow with depth) or, for the last
``num_hidden_layers % P`` layers, at ``tail/layer_{i - num_blocks * P}``. ``P`` is
``config.block_size``. The params these modules declare are those of ``params.PARAM_TABLE``, which gives
their shapes, axes and initializers.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from .attention import Attention
from .cache import split_by_mixer
from .config import ATTENTION, JambaConfig
from .kernels import Kernels
from .layers import Dtype, Linear, RMSNorm
from .mamba import Mamba
from .params import normal_init
from .moe import MLP, MoE
from .sharding import constrain


class DecoderLayer(nn.Module):
    """``h = x + mixer(input_layernorm(x))``; ``out = h + ffn(pre_ff_layernorm(h))``.
    Returns ``(out, new_cache)``; ``cache`` is this layer's entry of the decode cache or None. An attention
    layer's K/V may be the stacks of all scanned blocks, with ``block`` its index (see ``Block``)."""

    config: JambaConfig
    mixer: str
    moe: bool
    dtype: Dtype = jnp.float32
    kernels: Kernels = Kernels()

    @nn.compact
    def __call__(self, x, token_valid, cache=None, pos=None, kv_valid=None, block=None):
        cfg = self.config
        h = RMSNorm(cfg.rms_norm_eps, self.dtype, name="input_layernorm")(x)
        if self.mixer == ATTENTION:
            attention = Attention(cfg, self.dtype, self.kernels.attention, name="self_attn")
            h, cache = attention(h, token_valid, cache, pos, kv_valid, block)
        else:
            h, cache = Mamba(cfg, self.dtype, self.kernels.scan, name="mamba")(h, token_valid, cache)
        self.sow("intermediates", f"{self.mixer}_out", h)  # "mamba_out" / "attention_out", for training losses
        x = x + h
        h = RMSNorm(cfg.rms_norm_eps, self.dtype, name="pre_ff_layernorm")(x)
        if self.moe:
            ffn = MoE(cfg, self.dtype, self.kernels.moe_int8, name="feed_forward")
        else:
            ffn = MLP(cfg, self.dtype, name="feed_forward")
        h = ffn(h)
        self.sow("intermediates", "ffn_out", h)
        return constrain(x + h, "batch", "seq", "embed"), cache


class Block(nn.Module):
    """Consecutive layers at the given positions of the repeating layer plan (``layer_{j}``).

    ``carry`` is ``(x, kv)``: ``kv`` holds the attention layers' cache entries (``{"layer_{j}": {"key",
    "value"}}``, or None without a cache), ``cache`` the Mamba layers' (or None). Returns ``((x, kv),
    new_mamba_cache)``. Scanned, ``kv`` is carried whole, stacked over the blocks, and ``block`` is this
    block's index into it: each step writes its new keys in place and reads its own slice. Passed in and
    out as scanned slices, the K/V buffers were copied several times per decode step (docs/generate.md)."""

    config: JambaConfig
    positions: Sequence[int]
    dtype: Dtype = jnp.float32
    kernels: Kernels = Kernels()

    @nn.compact
    def __call__(self, carry, token_valid, cache=None, pos=None, kv_valid=None, block=None):
        x, kv = carry
        kv = None if kv is None else dict(kv)
        new_cache = None if cache is None else {}
        for j in self.positions:
            name, mixer = f"layer_{j}", self.config.mixer_type(j)
            layer = DecoderLayer(self.config, mixer, self.config.is_moe(j), self.dtype, self.kernels, name=name)
            entries, new_entries = (kv, kv) if mixer == ATTENTION else (cache, new_cache)
            x, entry = layer(x, token_valid, None if entries is None else entries[name], pos, kv_valid, block)
            if new_entries is not None:
                new_entries[name] = entry
        return (x, kv), new_cache


class JambaLM(nn.Module):
    """``input_ids [batch, seq]`` int, ``token_valid [batch, seq]`` bool or None -> logits
    ``[batch, seq, vocab]`` in ``dtype`` (``[batch, 1, vocab]`` for the last position with
    ``last_only``). ``kernels`` picks the implementation of the scan, the attention and the int8 MoE
    matmul (``jamba_jax.Kernels``).

    With ``cache`` (see ``jamba_jax.cache``) the tokens continue the cached sequences at slot
    ``cache["pos"]`` and ``(logits, new_cache)`` is returned.

    With ``mutable=["intermediates"]`` the layers also return (``self.sow``) each mixer's output
    (``mamba_out`` / ``attention_out``), each feed-forward's output (``ffn_out``) and each MoE's
    ``router_logits``; under ``blocks`` they are stacked over the block axis. ``remat`` recomputes each
    block's activations in the backward pass (gradient checkpointing)."""

    config: JambaConfig
    dtype: Dtype = jnp.float32
    kernels: Kernels = Kernels()
    remat: bool = False

    @nn.compact
    def __call__(self, input_ids, token_valid=None, cache=None, last_only: bool = False):
        cfg = self.config
        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, param_dtype=self.dtype,
                         embedding_init=normal_init, name="embed_tokens")
        x = constrain(embed(input_ids), "batch", "seq", "embed")
        pos = kv_valid = None
        new_cache = None
        if cache is not None:
            if token_valid is None:
                token_valid = jnp.ones(input_ids.shape, bool)
            pos = cache["pos"]
            kv_valid = jax.lax.dynamic_update_slice(cache["valid"], token_valid, (0, pos))
            new_cache = {"pos": pos + input_ids.shape[1], "valid": kv_valid}
        period = cfg.block_size
        if cfg.num_blocks:
            block = nn.remat(Block, prevent_cse=False) if self.remat else Block
            blocks = nn.scan(block, variable_axes={"params": 0, "intermediates": 0}, split_rngs={"params": True},
                             in_axes=(nn.broadcast, 0, nn.broadcast, nn.broadcast, 0), length=cfg.num_blocks)
            scanned = blocks(cfg, tuple(range(period)), self.dtype, self.kernels, name="blocks")
            kv, mamba = split_by_mixer(cfg, None if cache is None else cache["blocks"])
            index = None if cache is None else jnp.arange(cfg.num_blocks)
            (x, kv), mamba = scanned((x, kv), token_valid, mamba, pos, kv_valid, index)
            if cache is not None:
                new_cache["blocks"] = {**mamba, **kv}
        if cfg.num_tail_layers:
            layers = tuple(range(cfg.num_tail_layers))
            block = nn.remat(Block) if self.remat else Block
            tail = block(cfg, layers, self.dtype, self.kernels, name="tail")
            kv, mamba = split_by_mixer(cfg, None if cache is None else cache["tail"])
            (x, kv), mamba = tail((x, kv), token_valid, mamba, pos, kv_valid)
            if cache is not None:
                new_cache["tail"] = {**mamba, **kv}
        if last_only:
            x = x[:, -1:]
        x = RMSNorm(cfg.rms_norm_eps, self.dtype, name="final_layernorm")(x)
        if cfg.tie_word_embeddings:
            logits = embed.attend(x)
        else:
            logits = Linear(cfg.vocab_size, dtype=self.dtype, name="lm_head")(x)
        return logits if cache is None else (logits, new_cache)
