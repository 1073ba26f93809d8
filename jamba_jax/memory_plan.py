"""Per-device memory plan of a sharded model, from abstract shapes and compiled programs (no weights are
allocated).

Exact, from the sharding rules: the params, KV cache and Mamba state each device holds. Compiled: the
scratch memory (``temp``) of the prefill-chunk and decode-step programs for the devices of ``mesh``
(``compile().memory_analysis()``). On a machine without that many accelerators, ``fake_cpu_devices(n)``
before JAX starts its backends gives XLA's CPU compiler ``n`` devices to plan for (``jamba info --mesh N``
does this). The CPU backend has no bf16 matmul: it converts every bf16 weight to an fp32 copy before its
dot, scratch that a GPU never allocates. So the programs are compiled with fp32 weights and activations
(a proxy, from the same sharded HLO): their scratch holds no weight copies, and fp32 activations are an
upper bound on bf16 ones. The reported ``peak`` is params + cache + state (exact, in the real dtypes) +
the larger compiled scratch.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

_COUNT_FLAG = "--xla_force_host_platform_device_count"


def fake_cpu_devices(n: int) -> None:
    """Asks XLA for ``n`` CPU devices. Only effective before JAX initialises its backends (the first
    ``jax.devices()`` or array); raises ``ValueError`` when that has happened with fewer devices."""
    flags = os.environ.get("XLA_FLAGS", "")
    if _COUNT_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {_COUNT_FLAG}={n}".strip()
    if len(jax.devices("cpu")) < n:
        raise ValueError(f"{n} devices needed but JAX has {len(jax.devices('cpu'))} CPU devices; set "
                         f"XLA_FLAGS={_COUNT_FLAG}={n} before starting")


def _abstract(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def _temp_bytes(compiled) -> int:
    """Scratch bytes of a compiled program (0 where the backend does not report)."""
    m = compiled.memory_analysis()
    return 0 if m is None else int(m.temp_size_in_bytes)


def memory_plan(config, mesh, *, context: int, batch: int = 1, dtype="bfloat16", quantize: str | None = None,
                chunk: int | None = None) -> dict:
    """Per-device bytes of the model sharded on ``mesh`` (``jamba_jax.make_mesh``) for ``batch``
    sequences of up to ``context`` tokens: ``params``, ``kv_cache``, ``mamba_state`` (exact, in ``dtype``;
    ``quantize="experts-int8"``: int8 expert and MLP weights), the compiled scratch of the prefill chunk
    (``chunk`` tokens, default ``generate``'s) and of the decode step (``prefill_temp``, ``decode_temp``,
    from the fp32 proxy described in the module docstring), and ``peak``, their sum with the larger
    scratch."""
    from .cache import KV_CACHE, MAMBA_STATE, cache_entry, cache_shapes
    from .params import abstract_params
    from .quant import check_quantize, quantize_params
    from .sharding import cache_shardings, param_shardings, shard_bytes
    from .steps import DEFAULT_CHUNK, ModelSpec, decode_logits, prefill_chunk

    check_quantize(quantize)
    chunk = chunk or DEFAULT_CHUNK

    def sharded_params(dt):
        params = abstract_params(config, jnp.dtype(dt))
        if quantize:
            params = jax.eval_shape(lambda p: quantize_params(p, config, quantize), params)
        return _abstract(params, param_shardings(mesh, params))

    def sharded_cache(dt):
        cache = cache_shapes(config, batch, context, jnp.dtype(dt))
        return _abstract(cache, cache_shardings(mesh, cache))

    params, cache = sharded_params(dtype), sharded_cache(dtype)
    flat_cache = traverse_util.flatten_dict(cache)

    def cache_kind_bytes(kind):  # by the cache table's kind of each leaf
        return sum(shard_bytes(a) for path, a in flat_cache.items() if cache_entry(path).kind == kind)

    kv, state = cache_kind_bytes(KV_CACHE), cache_kind_bytes(MAMBA_STATE)
    param_bytes = sum(shard_bytes(a) for a in jax.tree.leaves(params))

    proxy_params, proxy_cache = sharded_params(jnp.float32), sharded_cache(jnp.float32)
    spec = ModelSpec(config, np.dtype(jnp.float32))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def tokens(shape, kind):
        return jax.ShapeDtypeStruct(shape, kind, sharding=replicated)

    with jax.set_mesh(mesh):
        prefill = prefill_chunk.lower(proxy_params, proxy_cache, tokens((batch, chunk), jnp.int32),
                                      tokens((batch, chunk), jnp.bool_), spec=spec).compile()
        decode = decode_logits.lower(proxy_params, proxy_cache, tokens((batch,), jnp.int32), spec=spec).compile()
    prefill_temp, decode_temp = _temp_bytes(prefill), _temp_bytes(decode)
    return {
        "devices": int(np.prod(list(mesh.shape.values()))),
        "mesh": dict(mesh.shape),
        "context": context,
        "batch": batch,
        "dtype": str(jnp.dtype(dtype)),
        "quantize": quantize,
        "prefill_chunk": chunk,
        "params": param_bytes,
        "kv_cache": kv,
        "mamba_state": state,
        "prefill_temp": prefill_temp,
        "decode_temp": decode_temp,
        "peak": param_bytes + kv + state + max(prefill_temp, decode_temp),
    }
