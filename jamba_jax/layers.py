"""Building blocks shared by the mixers: `Linear` and `RMSNorm`."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from .params import normal_init, ones_init, zeros_init
from .quant import dot

Dtype = Any


class Linear(nn.Module):
    """``y = x @ kernel (+ bias)``; ``kernel [in, features]`` (the transpose of torch's weight), both in
    ``dtype``; the input is cast to ``dtype``. The kernel may be a ``quant.QuantizedWeight`` (ExpertsInt8).
    ``features`` may be a tuple (float kernels only): ``kernel [in, *features]``, ``y [..., *features]``."""

    features: int | tuple[int, ...]
    use_bias: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        features = self.features if isinstance(self.features, tuple) else (self.features,)
        kernel = self.param("kernel", normal_init, (x.shape[-1], *features), self.dtype)
        x = x.astype(self.dtype)
        y = dot(x, kernel) if len(features) == 1 else jnp.tensordot(x, kernel, axes=1)
        if self.use_bias:
            y = y + self.param("bias", zeros_init, features, self.dtype)
        return y


def rms_norm(x: jnp.ndarray, weight: jnp.ndarray, eps: float) -> jnp.ndarray:
    """HF Jamba RMSNorm: normalise in fp32, cast back to ``x.dtype``, then scale by ``weight``."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jnp.reciprocal(jnp.sqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps))
    return weight * x32.astype(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm over the last axis with a learned ``weight [dim]`` in ``dtype``."""

    eps: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        weight = self.param("weight", ones_init, (x.shape[-1],), self.dtype)
        return rms_norm(x, weight, self.eps)
