"""Jamba's Mamba-1 mixer: in_proj -> causal depthwise conv -> selective scan (with Jamba's dt/B/C
RMSNorms) -> gate -> out_proj."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from .config import JambaConfig
from .layers import Dtype, Linear, RMSNorm
from .params import a_log_init, conv_init, normal_init, ones_init, zeros_init
from .scan import selective_scan
from .sharding import constrain


def causal_conv1d(x, kernel, bias=None, state=None):
    """Depthwise causal convolution over time.

    x ``[batch, seq, channels]``; kernel ``[width, channels]``; bias ``[channels]`` or None;
    state ``[batch, width - 1, channels]``: the inputs just before ``x`` (zeros = sequence start).
    Accumulates in fp32. Returns ``(y [batch, seq, channels] in x.dtype, new_state)`` where
    ``new_state`` holds the last ``width - 1`` inputs.
    """
    width = kernel.shape[0]
    batch, seq, channels = x.shape
    if state is None:
        state = jnp.zeros((batch, width - 1, channels), x.dtype)
    padded = jnp.concatenate([state.astype(x.dtype), x], axis=1)  # [batch, width - 1 + seq, channels]
    y = sum(padded[:, k:k + seq].astype(jnp.float32) * kernel[k].astype(jnp.float32) for k in range(width))
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype), padded[:, seq:]


class Mamba(nn.Module):
    """Mamba-1 mixer: ``[batch, seq, hidden]`` -> ``[batch, seq, hidden]`` in ``dtype``.

    ``token_valid [batch, seq]`` bool (or None): padded positions are zeroed before and after the
    convolution and are inert in the scan, so they leave the conv and ssm state exactly as if absent.
    ``scan_impl`` selects the selective-scan implementation (see ``jamba_jax.scan.SCAN_IMPLS``).
    With ``cache`` (``{"conv": [batch, d_conv - 1, d_inner], "ssm": [batch, d_inner, d_state] f32}``)
    the conv and scan continue from the cached state, and the updated cache is returned too.
    """

    config: JambaConfig
    dtype: Dtype = jnp.float32
    scan_impl: str = "xla"

    @nn.compact
    def __call__(self, x, token_valid, cache=None):
        cfg = self.config
        d_inner, d_state, dt_rank = cfg.d_inner, cfg.mamba_d_state, cfg.mamba_dt_rank

        def zero_padding(a):
            return a if token_valid is None else a * token_valid[..., None].astype(a.dtype)

        # kernel [hidden, 2, d_inner]: x and z kept apart so that sharding d_inner splits both alike.
        xz = Linear((2, d_inner), use_bias=cfg.mamba_proj_bias, dtype=self.dtype, name="in_proj")(zero_padding(x))
        # A projection bias would make padded inputs non-zero: mask again so padding cannot reach the conv.
        xs, z = zero_padding(xz[..., 0, :]), xz[..., 1, :]
        xs, z = constrain(xs, "batch", "seq", "d_inner"), constrain(z, "batch", "seq", "d_inner")

        conv_kernel = self.param("conv_kernel", conv_init, (cfg.mamba_d_conv, d_inner), self.dtype)
        conv_bias = (self.param("conv_bias", zeros_init, (d_inner,), self.dtype)
                     if cfg.mamba_conv_bias else None)
        xs, conv_state = causal_conv1d(xs, conv_kernel, conv_bias, None if cache is None else cache["conv"])
        xs = zero_padding(nn.silu(xs))

        dt, B, C = jnp.split(Linear(dt_rank + 2 * d_state, dtype=self.dtype, name="x_proj")(xs),
                             [dt_rank, dt_rank + d_state], axis=-1)
        dt = RMSNorm(cfg.rms_norm_eps, self.dtype, name="dt_layernorm")(dt)
        B = RMSNorm(cfg.rms_norm_eps, self.dtype, name="b_layernorm")(B)
        C = RMSNorm(cfg.rms_norm_eps, self.dtype, name="c_layernorm")(C)
        dt = Linear(d_inner, dtype=self.dtype, name="dt_proj")(dt)
        dt_bias = self.param("dt_bias", normal_init, (d_inner,), self.dtype)
        a_log = self.param("A_log", a_log_init, (d_inner, d_state), self.dtype)
        D = self.param("D", ones_init, (d_inner,), self.dtype)
        A = -jnp.exp(a_log.astype(jnp.float32))

        y, ssm_state = selective_scan(xs, dt, A, B, C, D, z, dt_bias, mask=token_valid, impl=self.scan_impl,
                                      initial_state=None if cache is None else cache["ssm"])
        out = Linear(cfg.hidden_size, use_bias=cfg.mamba_proj_bias, dtype=self.dtype,
                     name="out_proj")(y.astype(self.dtype))
        if cache is not None:
            cache = {"conv": conv_state.astype(cache["conv"].dtype), "ssm": ssm_state}
        return out, cache
