"""The MoE's expert FFN on a mesh: expert parallel over ``expert``, tensor parallel inside each expert over
``tensor`` (``shard_map``).

Every device holds ``experts / |expert|`` experts (its slice of the expert axis) and, of each, a
``1 / |tensor|`` slice of the hidden width (gate/up columns, down rows): no device holds all experts of a
layer, nor all of one expert when ``|tensor| > 1``. The router runs before, replicated, so every device
knows every (token, choice) pair's expert. Within a ``data`` shard, the tokens are replicated over
``expert`` and ``tensor`` (they come out of the tensor-parallel mixers all-reduced), so routing a pair to
the devices holding its expert needs no exchange: each device keeps the pairs of its own experts (the
others become a dropped group past its ``ragged_dot`` groups), runs its slice of their FFN, and one
``psum`` over ``expert`` and ``tensor`` brings every pair's output back to every device of the shard: the
experts' partial sums over the hidden slices and the experts' contributions at once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from .params import layer_row
from .quant import QuantizedWeight, quantized_spec
from .sharding import active_mesh, spec_for


def _weight_spec(mesh, w, proj: str):
    """The ``shard_map`` spec of one expert weight ``[experts, in, out]`` (a per-block slice): its param
    row's logical axes under the sharding rules; a ``QuantizedWeight``'s scale drops the contraction axis."""
    axes = layer_row(("feed_forward", "experts", proj)).axes
    spec = spec_for(mesh, w.shape, axes)
    return QuantizedWeight(spec, quantized_spec(spec, len(axes))) if isinstance(w, QuantizedWeight) else spec


def sharded_experts_ffn(x, expert_ids, weights, gate_proj, up_proj, down_proj, impl: str, ffn):
    """``ffn(x, expert_ids, weights, gate, up, down, impl)`` (``moe.experts_ffn``'s signature, which gives
    0 for ids past its experts) run expert- and tensor-parallel over the active mesh; shapes as
    ``moe.experts_ffn``. The (token, choice) pairs of other devices' experts get id ``local experts``.
    Returns None when there is no mesh to use (no active mesh, or the rules shard neither the experts nor
    the hidden width, e.g. sizes that do not divide them): the caller then runs ``ffn`` as is."""
    mesh = active_mesh()
    if mesh is None:
        return None
    projs = (gate_proj, up_proj, down_proj)
    specs = tuple(_weight_spec(mesh, w, p) for w, p in zip(projs, ("gate_proj", "up_proj", "down_proj")))
    gate_spec = specs[0].q if isinstance(gate_proj, QuantizedWeight) else specs[0]
    expert_axis, _, tensor_axis = tuple(gate_spec) + (None,) * (3 - len(gate_spec))
    if expert_axis is None and tensor_axis is None:
        return None
    rows = spec_for(mesh, x.shape[:1], ("batch",))[0]  # tokens split over "data" when it divides them
    row_spec = P(rows, None)

    def local(x, expert_ids, weights, gate_proj, up_proj, down_proj):
        local_experts = gate_proj.shape[0]
        first = jax.lax.axis_index(expert_axis) * local_experts if expert_axis else 0
        ids = expert_ids - first
        mine = (ids >= 0) & (ids < local_experts)
        ids = jnp.where(mine, ids, local_experts)  # other devices' pairs: past this device's experts
        out = ffn(x, ids, jnp.where(mine, weights, 0), gate_proj, up_proj, down_proj, impl)
        axes = tuple(a for a in (expert_axis, tensor_axis) if a)
        return jax.lax.psum(out.astype(jnp.float32), axes).astype(out.dtype)

    return jax.shard_map(local, mesh=mesh, in_specs=(row_spec, row_spec, row_spec, *specs), out_specs=row_spec,
                         check_vma=False)(x, expert_ids, weights, *projs)
