"""Random weights for tests: the model's own init plus N(0, 0.3) noise, larger than the 0.02 init so
that every branch matters (norm weights stay near 1, ``A_log`` near ``log(1..d_state)``)."""

import functools

import jax
import numpy as np

import jamba_jax
from jamba_jax import init_params


@functools.lru_cache(maxsize=16)
def random_params(config, seed: int = 0):
    """Params of ``config`` (fp32). The init runs compiled with an ``unsafe_rbg`` key (threefry's bit
    generator, once per param, makes the compile several times slower) and numpy draws the noise."""
    params = init_params(config, jax.random.key(seed, impl="unsafe_rbg"))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: p + (0.3 * rng.standard_normal(p.shape)).astype(p.dtype), params)


def random_model(config, seed: int = 0, scan_impl: str = "associative") -> jamba_jax.Jamba:
    return jamba_jax.Jamba(config, random_params(config, seed), scan_impl=scan_impl)
