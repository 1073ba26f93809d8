"""The layer stack is scanned over its repeating blocks: tracing does not grow with depth."""

import dataclasses

import jax
import jax.numpy as jnp

import jamba_jax
from jamba_jax import JambaConfig, JambaLM

TINY = JambaConfig.named("jamba-tiny")


def test_compiled_program_does_not_grow_with_depth():
    """The scanned blocks are traced once: 2 and 6 blocks give the same number of jaxpr equations."""
    def eqn_count(layers):
        config = dataclasses.replace(TINY, num_hidden_layers=layers)
        params = jamba_jax.abstract_params(config)
        ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
        jaxpr = jax.make_jaxpr(lambda p, i: JambaLM(config).apply({"params": p}, i))(params, ids)
        return len(jaxpr.jaxpr.eqns)

    assert eqn_count(16) == eqn_count(48)
