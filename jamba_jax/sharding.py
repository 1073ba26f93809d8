"""Sharding: the device mesh, the logical axes of every param and cache entry, and the one table that maps
logical axes to mesh axes.

Mesh axes (``MESH_AXES``): ``data`` (batch rows), ``expert`` (MoE experts), ``tensor`` (attention heads,
Mamba channels, expert and MLP hidden columns, vocab). ``RULES`` maps each logical axis name to a mesh
axis or None (replicated). A dimension whose size the mesh axis does not divide is replicated instead
(e.g. 2 kv heads on a 4-way tensor axis): sharding never changes results, only where they are computed.

Under ``jax.set_mesh(mesh)`` (``generate``/``forward`` enter it for a model with a mesh) the layers read
the mesh with ``active_mesh()``: the MoE runs expert- and tensor-parallel under ``shard_map``
(``moe.experts_ffn_sharded``), the Pallas kernels run per shard, and ``constrain`` pins activations.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .params import param_logical_axes

MESH_AXES = ("data", "expert", "tensor")

RULES: dict[str, str | None] = {
    "batch": "data",
    "seq": None,
    "embed": None,
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "d_inner": "tensor",
    "d_state": None,
    "dt_rank": None,
    "d_conv": None,
    "xz": None,  # Mamba in_proj's (x, z) pair axis
    "x_proj_out": None,  # dt_rank + 2 * d_state
    "experts": "expert",
    "mlp": "tensor",
    "layers": None,  # the stacked-block axis of scanned params and cache entries
}

def make_mesh(n_devices: int | None = None, *, tensor: int | None = None, expert: int | None = None,
              data: int | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, expert, tensor)`` mesh over the first ``n_devices`` devices (default: all).

    Sizes left out are filled in: ``data`` defaults to 1, ``expert`` to 1, and ``tensor`` takes what is
    left (``n_devices / (data * expert)``). ``make_mesh(8)`` is 8-way tensor parallel; ``make_mesh(8,
    expert=2)`` is 2 expert groups x 4-way tensor. Raises ``ValueError`` when the sizes do not multiply
    to ``n_devices`` or more devices are asked for than exist."""
    available = list(devices) if devices is not None else jax.devices()
    n = len(available) if n_devices is None else int(n_devices)
    if n < 1 or n > len(available):
        raise ValueError(f"make_mesh: {n} devices asked for, {len(available)} available")
    data = 1 if data is None else int(data)
    expert = 1 if expert is None else int(expert)
    if tensor is None:
        if n % (data * expert):
            raise ValueError(f"make_mesh: data={data} x expert={expert} does not divide {n} devices")
        tensor = n // (data * expert)
    sizes = (data, expert, int(tensor))
    if min(sizes) < 1 or math.prod(sizes) != n:
        raise ValueError(f"make_mesh: data={data} x expert={expert} x tensor={tensor} != {n} devices")
    grid = np.asarray(available[:n], dtype=object).reshape(sizes)
    return Mesh(grid, MESH_AXES)


def _mesh_axis_size(mesh, axis: str | None) -> int:
    if axis is None or axis not in mesh.axis_names:
        return 1
    return mesh.shape[axis]


def spec_for(mesh, shape: Sequence[int], logical: Sequence[str | None]) -> PartitionSpec:
    """The ``PartitionSpec`` of an array of ``shape`` with these logical axes under ``RULES``: each
    dimension goes to its mesh axis when that axis exists, has size > 1, divides the dimension and is
    not already used by an earlier dimension; otherwise it is replicated. A logical axis that ``RULES``
    does not name is an error (None is an explicitly replicated axis)."""
    if len(shape) != len(logical):
        raise ValueError(f"shape {tuple(shape)} and logical axes {tuple(logical)} differ in rank")
    unknown = [name for name in logical if name is not None and name not in RULES]
    if unknown:
        raise ValueError(f"logical axis {unknown[0]!r} has no rule in sharding.RULES")
    used, out = set(), []
    for size, name in zip(shape, logical):
        axis = RULES[name] if name is not None else None
        n = _mesh_axis_size(mesh, axis)
        if n > 1 and axis not in used and size % n == 0:
            out.append(axis)
            used.add(axis)
        else:
            out.append(None)
    return PartitionSpec(*out)


def param_shardings(mesh: Mesh, params: Any) -> Any:
    """``NamedSharding`` per leaf of ``params`` (arrays or ``ShapeDtypeStruct``s; an int8
    ``QuantizedWeight``'s ``scale`` drops the contraction axis of its weight), same tree structure."""
    from .quant import QuantizedWeight, quantized_sharding  # quant imports this module

    place = param_sharding_fn(mesh)

    def one(path, leaf):
        weight = leaf.q if isinstance(leaf, QuantizedWeight) else leaf
        sharding = place(path, weight)
        return quantized_sharding(sharding, len(weight.shape)) if isinstance(leaf, QuantizedWeight) else sharding

    flat = traverse_util.flatten_dict(params, is_leaf=lambda _, v: isinstance(v, QuantizedWeight))
    return traverse_util.unflatten_dict({path: one(path, leaf) for path, leaf in flat.items()})


def param_sharding_fn(mesh: Mesh):
    """``(path, ShapeDtypeStruct) -> NamedSharding`` by the param table's logical axes: the form
    ``jamba_jax.load(shardings=)`` takes."""
    return lambda path, sds: NamedSharding(mesh, spec_for(mesh, sds.shape, param_logical_axes(path, len(sds.shape))))


def cache_shardings(mesh: Mesh, cache: Any) -> Any:
    """``NamedSharding`` per leaf of a decode cache (``jamba_jax.cache``): K/V by kv heads, the conv and
    ssm states by d_inner, rows by ``data``; stacked entries keep their leading block axis replicated."""

    from .cache import cache_logical_axes

    def one(path, leaf):
        return NamedSharding(mesh, spec_for(mesh, leaf.shape, cache_logical_axes(path, len(leaf.shape))))

    return jax.tree_util.tree_map_with_path(one, cache)


def shard_bytes(sds) -> int:
    """Bytes of one device's shard of ``sds`` (a ``jax.ShapeDtypeStruct`` or array; the whole of it when it
    carries no sharding)."""
    sharding = getattr(sds, "sharding", None)
    shape = sharding.shard_shape(sds.shape) if sharding is not None else sds.shape
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(sds.dtype).itemsize


def active_mesh():
    """The mesh set by ``jax.set_mesh`` (an abstract mesh inside ``jit``), or None when there is none."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh is None or mesh.empty else mesh


def constrain(x, *logical: str | None):
    """``x`` pinned to the sharding of its logical axes under the active mesh; unchanged without one."""
    mesh = active_mesh()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, spec_for(mesh, x.shape, logical))


def per_shard(fn, in_logical, out_logical, *args):
    """``fn(*args)`` run on each device's shards under ``shard_map`` over the active mesh: ``in_logical`` /
    ``out_logical`` give each argument's / output's logical axes (None for a replicated argument). For
    computations that are independent across the sharded axes (Pallas kernels over heads or channels);
    without an active mesh, or when nothing would be sharded, just ``fn(*args)``."""
    mesh = active_mesh()
    if mesh is None:
        return fn(*args)

    def spec(a, axes):
        return PartitionSpec() if axes is None or a is None else spec_for(mesh, a.shape, axes)

    in_specs = tuple(spec(a, axes) for a, axes in zip(args, in_logical))
    out_shapes = jax.eval_shape(fn, *args)
    out_specs = jax.tree.map(lambda o, axes: spec(o, axes), out_shapes, out_logical,
                             is_leaf=lambda v: isinstance(v, jax.ShapeDtypeStruct))
    if not any(any(p is not None for p in s) for s in (*in_specs, *jax.tree.leaves(
            out_specs, is_leaf=lambda v: isinstance(v, PartitionSpec)))):
        return fn(*args)
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*args)


__all__ = ["per_shard", "MESH_AXES", "RULES", "make_mesh", "spec_for", "param_shardings",
           "param_sharding_fn", "cache_shardings", "shard_bytes", "active_mesh", "constrain"]
