"""Per-device memory plan of a sharded model, from abstract shapes and compiled programs (no weights are
allocated).

Exact, from the sharding rules: the params, KV cache and Mamba state each device holds. Compiled: the
scratch memory (``temp``) of the prefill-chunk and decode-step programs for the devices of ``mesh``
(``compile().memory_analysis()``). ``plan_devices(n)`` picks the devices to compile for: ``n`` attached
GPUs; else, on a machine with a GPU backend, ``n`` compile-only GPUs of the attached kind (XLA's GPU
compiler cross-compiles for them); else ``n`` fake CPU devices (``fake_cpu_devices``, before JAX starts
its backends).

Which compiler made the plan (``plan_compiler``): GPU devices compile the programs as they run (bf16
activations, int8 or bf16 weights). The CPU backend has no bf16 matmul: it converts every bf16 weight to
an fp32 copy before its dot, scratch that a GPU never allocates. So on CPU devices the programs are
compiled with fp32 weights and activations (a proxy, from the same sharded HLO): their scratch holds no
weight copies, and fp32 activations are an upper bound on bf16 ones. Either way the reported peaks are
params + cache + state (exact, in the real dtypes) + the program's compiled scratch.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

_COUNT_FLAG = "--xla_force_host_platform_device_count"
CPU_PROXY = "cpu fp32 proxy"
GPU = "gpu"
_GPU_PLATFORMS = ("gpu", "cuda", "rocm")


def fake_cpu_devices(n: int) -> None:
    """Asks XLA for ``n`` CPU devices. Only effective before JAX initialises its backends (the first
    ``jax.devices()`` or array); raises ``ValueError`` when that has happened with fewer devices."""
    flags = os.environ.get("XLA_FLAGS", "")
    if _COUNT_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {_COUNT_FLAG}={n}".strip()
    if len(jax.devices("cpu")) < n:
        raise ValueError(f"{n} devices needed but JAX has {len(jax.devices('cpu'))} CPU devices; set "
                         f"XLA_FLAGS={_COUNT_FLAG}={n} before starting")


def compile_only_gpus(n: int) -> list:
    """``n`` compile-only GPUs of the attached GPU's kind in one host (``jax.experimental.topologies``):
    programs compile for them with XLA's GPU compiler (and report ``memory_analysis``) but cannot run."""
    from jax._src.lib import xla_client
    from jax.experimental import topologies

    attached = jax.devices()
    platform = "rocm" if "rocm" in attached[0].client.platform_version.lower() else "cuda"
    target = xla_client.get_topology_for_devices(attached).target_config
    topology = topologies.get_topology_desc(platform=platform, topology=f"1x1x{n}", target_config=target)
    return list(topology.devices)[:n]


def plan_devices(n: int) -> tuple[list, str]:
    """The ``n`` devices to compile a plan for, and how they were found: ``"attached gpus"``,
    ``"compile-only gpus"`` (a GPU backend with fewer than ``n`` GPUs) or ``"fake cpu devices"`` (no GPU
    backend, or the compile-only topology failed: its error goes to stderr). Call before JAX starts its
    backends, so that the fake CPU devices can be made."""
    fake_cpu_devices(n)
    attached = jax.devices()
    if attached[0].platform in _GPU_PLATFORMS:
        if len(attached) >= n:
            return attached[:n], "attached gpus"
        try:
            return compile_only_gpus(n), "compile-only gpus"
        except Exception as e:  # noqa: BLE001 -- any failure of the cross-compile target: plan on CPU
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            print(f"compile-only GPU topology for {n} devices failed ({first}); planning on CPU devices",
                  file=sys.stderr)
    return jax.devices("cpu")[:n], "fake cpu devices"


def plan_compiler(mesh) -> str:
    """``GPU`` when ``mesh``'s devices are GPUs (attached or compile-only: the programs compiled as they
    run), else ``CPU_PROXY`` (the fp32 proxy of the module docstring)."""
    return GPU if next(iter(mesh.devices.flat)).platform in _GPU_PLATFORMS else CPU_PROXY


def _abstract(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def sharded_params(config, mesh, dtype, quantize: str | None = None):
    """Abstract params (``ShapeDtypeStruct``s with their ``NamedSharding``) in ``dtype``; with
    ``quantize="experts-int8"`` the expert and MLP weights as int8 ``QuantizedWeight``s."""
    from .params import abstract_params
    from .quant import quantize_params
    from .sharding import param_shardings

    params = abstract_params(config, jnp.dtype(dtype))
    if quantize:
        params = jax.eval_shape(lambda p: quantize_params(p, config, quantize), params)
    return _abstract(params, param_shardings(mesh, params))


def sharded_cache(config, mesh, batch: int, context: int, dtype):
    """The abstract decode cache of ``batch`` rows of ``context`` tokens, with its shardings."""
    from .cache import cache_shapes
    from .sharding import cache_shardings

    cache = cache_shapes(config, batch, context, jnp.dtype(dtype))
    return _abstract(cache, cache_shardings(mesh, cache))


def decode_weight_read_bytes(config, params) -> int:
    """Bytes of weights one device reads in a decode step of one token, from the shard shapes of sharded
    abstract ``params``: every shard but the embedding (a gather of one row); of an expert weight, the
    top-k experts if they all fall on this device (the slowest device sets the step's time), i.e.
    ``min(k, local experts) / local experts`` of its shard. int8 weights count with their scales."""
    from .params import param_logical_axes
    from .sharding import shard_bytes

    total = 0
    flat = traverse_util.flatten_dict(params, is_leaf=lambda _, v: hasattr(v, "q"))
    for path, leaf in flat.items():
        if path[0] == "embed_tokens":
            continue
        arrays = [leaf.q, leaf.scale] if hasattr(leaf, "q") else [leaf]
        nbytes = sum(shard_bytes(a) for a in arrays)
        if "experts" in path:
            weight = arrays[0]
            axis = param_logical_axes(path, len(weight.shape)).index("experts")
            local = weight.sharding.shard_shape(weight.shape)[axis]
            nbytes = nbytes * min(config.num_experts_per_tok, local) // local
        total += nbytes
    return total


def program_memory(compiled) -> dict:
    """Per-device bytes of a compiled program (``memory_analysis``): ``argument``, ``output``, ``alias``
    (outputs sharing a donated argument's buffer), ``temp`` (scratch), ``code``; zeros where the backend
    does not report."""
    m = compiled.memory_analysis()
    fields = {"argument": "argument_size_in_bytes", "output": "output_size_in_bytes",
              "alias": "alias_size_in_bytes", "temp": "temp_size_in_bytes", "code": "generated_code_size_in_bytes"}
    return {k: 0 if m is None else int(getattr(m, v, 0)) for k, v in fields.items()}


def compile_plan(config, mesh, *, context: int, batch: int = 1, dtype="bfloat16", quantize: str | None = None,
                 chunk: int | None = None, kernels=None) -> tuple[dict, dict]:
    """``memory_plan``'s dict and the compiled programs it read, ``{"prefill": ..., "decode": ...}``
    (``jax.stages.Compiled``: ``as_text()`` gives their HLO)."""
    from .cache import KV_CACHE, MAMBA_STATE, cache_entry
    from .kernels import Kernels
    from .quant import check_quantize
    from .sharding import shard_bytes
    from .steps import ModelSpec, decode_logits, default_chunk, prefill_chunk

    check_quantize(quantize)
    compiler = plan_compiler(mesh)
    chunk = min(chunk or default_chunk("gpu" if compiler == GPU else "cpu"), context)  # a chunk fits the cache
    params, cache = sharded_params(config, mesh, dtype, quantize), sharded_cache(config, mesh, batch, context, dtype)
    weight_read = decode_weight_read_bytes(config, params)
    flat_cache = traverse_util.flatten_dict(cache)

    def cache_kind_bytes(kind):  # by the cache table's kind of each leaf
        return sum(shard_bytes(a) for path, a in flat_cache.items() if cache_entry(path).kind == kind)

    kv, state = cache_kind_bytes(KV_CACHE), cache_kind_bytes(MAMBA_STATE)
    param_bytes = sum(shard_bytes(a) for a in jax.tree.leaves(params))

    program_dtype = jnp.float32 if compiler == CPU_PROXY else jnp.dtype(dtype)
    if compiler == CPU_PROXY:
        params = sharded_params(config, mesh, program_dtype, quantize)
        cache = sharded_cache(config, mesh, batch, context, program_dtype)
    spec = ModelSpec(config, np.dtype(program_dtype), Kernels.named(kernels or "xla"))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def tokens(shape, kind):
        return jax.ShapeDtypeStruct(shape, kind, sharding=replicated)

    with jax.set_mesh(mesh):
        prefill = prefill_chunk.lower(params, cache, tokens((batch, chunk), jnp.int32),
                                      tokens((batch, chunk), jnp.bool_), spec=spec).compile()
        decode = decode_logits.lower(params, cache, tokens((batch,), jnp.int32), spec=spec).compile()
    prefill_memory, decode_memory = program_memory(prefill), program_memory(decode)
    resident = param_bytes + kv + state
    device = next(iter(mesh.devices.flat))
    plan = {
        "devices": int(np.prod(list(mesh.shape.values()))),
        "mesh": dict(mesh.shape),
        "compiler": compiler,
        "compiled_for": getattr(device, "device_kind", device.platform),
        "context": context,
        "batch": batch,
        "dtype": str(jnp.dtype(dtype)),
        "quantize": quantize,
        "kernels": str(spec.kernels),
        "prefill_chunk": chunk,
        "params": param_bytes,
        "kv_cache": kv,
        "mamba_state": state,
        "prefill_temp": prefill_memory["temp"],
        "decode_temp": decode_memory["temp"],
        "prefill_peak": resident + prefill_memory["temp"],
        "decode_peak": resident + decode_memory["temp"],
        "peak": resident + max(prefill_memory["temp"], decode_memory["temp"]),
        "decode_weight_read": weight_read,
        "prefill_memory": prefill_memory,
        "decode_memory": decode_memory,
    }
    return plan, {"prefill": prefill, "decode": decode}


def memory_plan(config, mesh, *, context: int, batch: int = 1, dtype="bfloat16", quantize: str | None = None,
                chunk: int | None = None, kernels=None) -> dict:
    """Per-device bytes of the model sharded on ``mesh`` (``jamba_jax.make_mesh``) for ``batch``
    sequences of up to ``context`` tokens: ``params``, ``kv_cache``, ``mamba_state`` (exact, in ``dtype``;
    ``quantize="experts-int8"``: int8 expert and MLP weights); the compiled scratch of the prefill chunk
    (``chunk`` tokens, default ``steps.default_chunk`` of the compiler's platform) and of the decode step
    (``prefill_temp``, ``decode_temp``), compiled by ``compiler`` (``plan_compiler``: ``"gpu"``, or the
    ``"cpu fp32 proxy"`` of the module docstring) with ``kernels`` (default ``"xla"``); ``prefill_peak``,
    ``decode_peak`` (params + cache + state + that program's scratch) and ``peak``, the larger;
    ``decode_weight_read`` (``decode_weight_read_bytes``); each program's ``memory_analysis`` bytes
    (``prefill_memory``, ``decode_memory``: ``program_memory``)."""
    return compile_plan(config, mesh, context=context, batch=batch, dtype=dtype, quantize=quantize, chunk=chunk,
                        kernels=kernels)[0]
