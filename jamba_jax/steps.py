"""The public, pure steps of inference: ``forward`` (no cache), ``init_cache``, ``prefill`` and
``decode_step``, and the compiled programs behind them.

```python
cache = jamba_jax.init_cache(model, batch_size, max_length)
logits, cache = jamba_jax.prefill(model, ids, cache, attention_mask=mask)   # [batch, vocab]: each row's last
logits, cache = jamba_jax.decode_step(model, next_ids, cache)               # ids [batch] -> [batch, vocab]
```

A cache holds ``max_length`` slots per row; ``prefill`` and ``decode_step`` append to it (a prefill after
other steps continues the sequences). Batches are left-padded: ``attention_mask`` marks the real tokens,
and padded positions are exact no-ops (attention masks them; the conv and scan pass their state through).
The cache passed in is donated (its buffers are updated in place): use the returned one.

``prefill_chunk`` and ``decode_logits`` are the compiled programs (``jax.jit`` with the static
``ModelSpec``); ``apply_step`` is the model call they wrap, for callers that compile it into a program
of their own (``generate``'s on-device decode loop). ``prefill_chunk.lower(...)`` on abstract arrays
compiles a program without running it (the memory plan).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from .api import Jamba, mesh_context
from .cache import cache_shapes, init_cache_arrays
from .config import JambaConfig
from .kernels import Kernels
from .model import JambaLM
from .sharding import cache_shardings, shard_bytes

DEFAULT_CHUNK = 256  # prefill tokens per compiled step on CPU: activation memory is bounded by the chunk
# With 256-token chunks the H200 prefilled at ~5-12% of its bf16 matmul rate (docs/results/generate_h200.json).
# 2048 is a starting value, not a measurement: the GPU chunk sweep (benchmarks/gpu_prefill.py,
# "chunk_sweep") is to measure and tune it.
GPU_CHUNK = 2048
BACKEND_CHUNKS = {"cpu": DEFAULT_CHUNK, "gpu": GPU_CHUNK}


def default_chunk(platform: str | None = None) -> int:
    """The prefill chunk (tokens per compiled step) for ``platform`` (``"cpu"``, ``"gpu"``, ...; default
    ``jax.default_backend()``): ``DEFAULT_CHUNK`` (256) on CPU and any backend not in ``BACKEND_CHUNKS``,
    ``GPU_CHUNK`` on GPU. Used by ``prefill`` and ``generate`` when no ``chunk_size`` is given; the
    chunk bounds activation memory and, through ``generate``'s buckets, sets the compiled shapes."""
    return BACKEND_CHUNKS.get(platform or jax.default_backend(), DEFAULT_CHUNK)


def model_platform(model: Jamba) -> str:
    """The platform of the devices ``model`` runs on (its mesh's, else the default backend)."""
    return next(iter(model.mesh.devices.flat)).platform if model.mesh is not None else jax.default_backend()


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything static about a model's compiled programs (hashable: a static jit argument)."""

    config: JambaConfig
    dtype: np.dtype
    kernels: Kernels = Kernels()

    @classmethod
    def of(cls, model: Jamba) -> "ModelSpec":
        return cls(model.config, np.dtype(model.dtype), model.kernels)

    @property
    def module(self) -> JambaLM:
        return JambaLM(self.config, self.dtype, self.kernels)


@functools.partial(jax.jit, static_argnames="spec")
def forward_logits(params, ids, valid, *, spec: ModelSpec):
    """The model without a cache: logits ``[batch, seq, vocab]`` for ``ids [batch, seq]``."""
    return spec.module.apply({"params": params}, ids, valid)


def forward(model: Jamba, input_ids, attention_mask=None) -> jax.Array:
    """Logits ``[batch, seq, vocab]`` (in the model's dtype) for ``input_ids [batch, seq]``.

    ``attention_mask [batch, seq]`` (1 = token, 0 = padding) supports left-padded batches: every
    real position's logits equal those of the same sequence without padding."""
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    if attention_mask is not None:
        attention_mask = jnp.asarray(attention_mask).astype(bool)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                             f"{tuple(input_ids.shape)}")
    with mesh_context(model):
        return forward_logits(model.params, input_ids, attention_mask, spec=ModelSpec.of(model))


def apply_step(params, cache, ids, valid, *, spec: ModelSpec):
    """The model on ``ids [batch, seq]`` (``valid [batch, seq]`` bool or None) continuing ``cache``:
    ``(logits [batch, vocab] of the last position, new cache)``. Pure; not compiled by itself."""
    logits, cache = spec.module.apply({"params": params}, ids, valid, cache, last_only=True)
    return logits[:, -1], cache


@functools.partial(jax.jit, static_argnames="spec", donate_argnames="cache")
def prefill_chunk(params, cache, ids, valid, *, spec: ModelSpec):
    """``apply_step`` compiled, for one chunk of a prefill: ``ids, valid [batch, chunk]``."""
    return apply_step(params, cache, ids, valid, spec=spec)


@functools.partial(jax.jit, static_argnames="spec", donate_argnames="cache")
def decode_logits(params, cache, ids, *, spec: ModelSpec):
    """``apply_step`` compiled for one new token per row: ``ids [batch]`` int32."""
    return apply_step(params, cache, ids[:, None], None, spec=spec)


def available_bytes(model: Jamba) -> int | None:
    """Free memory on each device the model runs on (the least of them; None where the backend does not
    say): an accelerator's ``bytes_limit - bytes_in_use``; for CPU devices the host's available memory,
    shared between them."""
    devices = list(model.mesh.devices.flat) if model.mesh is not None else jax.devices()[:1]
    devices = [d for d in devices if d.process_index == jax.process_index()]  # a process sees only its own
    free = []
    for device in devices:
        stats = device.memory_stats() if hasattr(device, "memory_stats") else None
        if stats and "bytes_limit" in stats:
            free.append(int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)))
        elif device.platform == "cpu" and hasattr(os, "sysconf") and "SC_AVPHYS_PAGES" in os.sysconf_names:
            free.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // len(devices))
    return min(free) if free else None


def cache_device_bytes(model: Jamba, batch_size: int, max_length: int) -> int:
    """Bytes of the cache ``init_cache`` makes, on the device holding the most of it."""
    shapes = cache_shapes(model.config, batch_size, max_length, model.dtype)
    if model.mesh is not None:
        shapes = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes,
                              cache_shardings(model.mesh, shapes))
    return sum(shard_bytes(a) for a in jax.tree.leaves(shapes))


def check_cache_fits(model: Jamba, batch_size: int, max_length: int, *, extra_bytes: int = 0) -> None:
    """A ``ValueError`` naming the sizes when the cache (plus ``extra_bytes``) would not fit the memory the
    devices have free; nothing is allocated to find out."""
    free = available_bytes(model)
    need = cache_device_bytes(model, batch_size, max_length) + extra_bytes
    if free is not None and need > free:
        raise ValueError(f"a cache of {batch_size} x {max_length:,} tokens needs {need / 2**30:,.2f} GiB a device, "
                         f"{free / 2**30:,.2f} GiB free; use fewer rows or tokens")


def init_cache(model: Jamba, batch_size: int, max_length: int) -> dict:
    """An empty cache (``jamba_jax.cache``) for ``batch_size`` sequences of up to ``max_length`` tokens in
    the model's dtype (the ssm state in float32), sharded over the model's mesh when it has one. A
    ``max_length`` that is a multiple of ``attention.KEY_BLOCK`` spares the attention a padded copy of K/V."""
    if batch_size < 1 or max_length < 1:
        raise ValueError(f"init_cache: batch_size and max_length must be >= 1, got {batch_size} and {max_length}")
    check_cache_fits(model, batch_size, max_length)
    if model.mesh is None:
        return init_cache_arrays(model.config, batch_size, max_length, model.dtype)
    shapes = jax.eval_shape(lambda: init_cache_arrays(model.config, batch_size, max_length, model.dtype))
    make = jax.jit(lambda: init_cache_arrays(model.config, batch_size, max_length, model.dtype),
                   out_shardings=cache_shardings(model.mesh, shapes))
    return make()  # each device allocates only its shard


def _check_ids(ids, cache, what: str) -> None:
    batch, slots = cache["valid"].shape
    if ids.shape[0] != batch:
        raise ValueError(f"{what}: {ids.shape[0]} rows of ids for a cache of {batch} rows")
    pos = int(cache["pos"])
    if pos + ids.shape[-1] > slots:
        raise ValueError(f"{what}: {ids.shape[-1]} tokens after {pos} cached ones overflow the cache's "
                         f"{slots} slots; make a larger cache with init_cache")


def prefill_pieces(length: int, chunk: int | None = None) -> tuple[int, ...]:
    """The piece lengths ``prefill`` runs for ``length`` tokens, in order: the remainder first (with left
    padding, that is where the padding lives), then whole chunks (``chunk``: default ``default_chunk()``)."""
    chunk = default_chunk() if chunk is None else chunk
    full, rest = divmod(length, chunk)
    return (rest,) * bool(rest) + (chunk,) * full


def prefill(model: Jamba, ids, cache: dict, attention_mask=None, *, chunk_size: int | None = None):
    """Runs ``ids [batch, seq]`` (left-padded; ``attention_mask [batch, seq]``, 1 = token, None = all
    tokens) through the model into ``cache`` in pieces of at most ``chunk_size`` tokens (``prefill_pieces``;
    default ``default_chunk`` of the model's platform: 256 on CPU, larger on GPU), so activation memory is
    bounded by the chunk, not the prompt. Returns ``(logits [batch, vocab]`` of each
    row's last position in the model's dtype, ``new cache)``."""
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.shape[1] < 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"prefill: ids must be integer [batch, seq] with seq >= 1, got {ids.dtype} {ids.shape}")
    valid = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    if valid.shape != ids.shape:
        raise ValueError(f"prefill: attention_mask shape {valid.shape} != ids shape {ids.shape}")
    if chunk_size is None:
        chunk_size = default_chunk(model_platform(model))
    if chunk_size < 1:
        raise ValueError(f"prefill: chunk_size must be >= 1, got {chunk_size}")
    _check_ids(ids, cache, "prefill")
    spec, start, logits = ModelSpec.of(model), 0, None
    ids = ids.astype(np.int32)
    with mesh_context(model):
        for size in prefill_pieces(ids.shape[1], chunk_size):
            logits, cache = prefill_chunk(model.params, cache, ids[:, start:start + size],
                                          valid[:, start:start + size], spec=spec)
            start += size
    return logits, cache


def decode_step(model: Jamba, ids, cache: dict):
    """One new token per row, ``ids [batch]`` int, appended to ``cache``: ``(logits [batch, vocab]`` in the
    model's dtype, ``new cache)``."""
    ids = jnp.asarray(ids)
    if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"decode_step: ids must be integer [batch], got {ids.dtype} {ids.shape}")
    _check_ids(ids[:, None], cache, "decode_step")
    with mesh_context(model):
        return decode_logits(model.params, cache, ids.astype(jnp.int32), spec=ModelSpec.of(model))
