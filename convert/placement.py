"""Where each param leaf goes when loaded: one ``jax.sharding.Sharding`` per leaf path."""

from __future__ import annotations

from typing import Any, Callable

import jax
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

ShardingFn = Callable[[tuple[str, ...], jax.ShapeDtypeStruct], jax.sharding.Sharding]


def leaf_shardings(abstract: dict[tuple[str, ...], jax.ShapeDtypeStruct], *, mesh: Mesh | None = None,
                   shardings: Any = None) -> dict[tuple[str, ...], jax.sharding.Sharding]:
    """One sharding per flattened param path of ``abstract``.

    ``shardings`` is a pytree of ``Sharding`` with the structure of the params, or a callable
    ``(path, ShapeDtypeStruct) -> Sharding`` (``path`` a tuple of keys such as
    ``("blocks", "layer_0", "mamba", "A_log")``). Leaves it leaves out, or all leaves when it is
    None, are replicated on ``mesh``, or put on the default device without a mesh."""
    if mesh is not None:
        default = NamedSharding(mesh, PartitionSpec())
    else:
        default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if shardings is None:
        return {path: default for path in abstract}
    if callable(shardings):
        out = {}
        for path, sds in abstract.items():
            s = shardings(path, sds)
            out[path] = default if s is None else _checked(s, path)
        return out
    given = traverse_util.flatten_dict(shardings, is_leaf=lambda _, v: isinstance(v, jax.sharding.Sharding))
    unknown = sorted("/".join(p) for p in set(given) - set(abstract))
    if unknown:
        raise ValueError(f"shardings has entries for params that do not exist: {', '.join(unknown[:5])}")
    return {path: _checked(given.get(path, default), path) for path in abstract}


def _checked(s, path) -> jax.sharding.Sharding:
    if not isinstance(s, jax.sharding.Sharding):
        raise ValueError(f"sharding for {'/'.join(path)} is {type(s).__name__}, expected a jax.sharding.Sharding")
    return s
