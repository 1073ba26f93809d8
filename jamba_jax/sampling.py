"""Next-token selection: greedy, temperature, top-k and top-p (nucleus) sampling."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def filter_logits(logits: jnp.ndarray, top_k: int | None = None, top_p: float | None = None) -> jnp.ndarray:
    """Sets to -inf the logits outside the top-k and outside the nucleus.

    logits ``[batch, vocab]`` float32. top-k keeps the k largest (ties with the k-th are kept); top-p
    keeps the smallest set of largest-probability tokens whose mass reaches ``top_p`` (the token that
    crosses it included, so at least one token survives)."""
    neg_inf = jnp.asarray(-jnp.inf, logits.dtype)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, neg_inf, logits)
    if top_p is not None and top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        kept = mass_before < top_p
        cutoff = jnp.min(jnp.where(kept, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, neg_inf, logits)
    return logits


def sample(logits: jnp.ndarray, key, *, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None) -> jnp.ndarray:
    """Token ids ``[batch]`` int32 from logits ``[batch, vocab]``; ``temperature == 0`` is greedy."""
    logits = logits.astype(jnp.float32)
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits / temperature, top_k, top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
