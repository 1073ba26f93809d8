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

from .quant import QuantizedWeight
from .sharding import active_mesh, spec_for


def _weight_spec(w, expert_axis, tensor_axis, down: bool):
    """gate/up ``[experts, hidden, inter]``: (expert, None, tensor); down ``[experts, inter, hidden]``:
    (expert, tensor, None). A ``QuantizedWeight``'s scale ``[experts, out]`` drops the contraction axis."""
    spec = P(expert_axis, tensor_axis, None) if down else P(expert_axis, None, tensor_axis)
    if isinstance(w, QuantizedWeight):
        return QuantizedWeight(spec, P(spec[0], spec[2]))
    return spec


def sharded_experts_ffn(x, expert_ids, weights, gate_proj, up_proj, down_proj, impl: str, ffn):
    """``ffn(x, expert_ids, weights, gate, up, down, impl)`` (``moe.experts_ffn``'s signature, which gives
    0 for ids past its experts) run expert- and tensor-parallel over the active mesh; shapes as
    ``moe.experts_ffn``. The (token, choice) pairs of other devices' experts get id ``local experts``. Returns None when there is no mesh to use (no active mesh, both
    axes of size 1, or sizes that do not divide the experts / hidden width): the caller then runs ``ffn``
    as is."""
    mesh = active_mesh()
    if mesh is None:
        return None
    n_exp = mesh.shape.get("expert", 1)
    n_tp = mesh.shape.get("tensor", 1)
    num_experts, _, inter = (gate_proj.q if isinstance(gate_proj, QuantizedWeight) else gate_proj).shape
    if n_exp * n_tp == 1 or num_experts % n_exp or inter % n_tp:
        return None
    expert_axis = "expert" if n_exp > 1 else None
    tensor_axis = "tensor" if n_tp > 1 else None
    rows = spec_for(mesh, x.shape[:1], ("batch",))[0]  # tokens split over "data" when it divides them
    row_spec = P(rows, None)

    def local(x, expert_ids, weights, gate_proj, up_proj, down_proj):
        local_experts = (gate_proj.q if isinstance(gate_proj, QuantizedWeight) else gate_proj).shape[0]
        first = jax.lax.axis_index("expert") * local_experts if expert_axis else 0
        ids = expert_ids - first
        mine = (ids >= 0) & (ids < local_experts)
        ids = jnp.where(mine, ids, local_experts)  # other devices' pairs: past this device's experts
        out = ffn(x, ids, jnp.where(mine, weights, 0), gate_proj, up_proj, down_proj, impl)
        axes = tuple(a for a in (expert_axis, tensor_axis) if a)
        return jax.lax.psum(out.astype(jnp.float32), axes).astype(out.dtype)

    in_specs = (row_spec, row_spec, row_spec, _weight_spec(gate_proj, expert_axis, tensor_axis, False),
                _weight_spec(up_proj, expert_axis, tensor_axis, False),
                _weight_spec(down_proj, expert_axis, tensor_axis, True))
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=row_spec, check_vma=False)(
        x, expert_ids, weights, gate_proj, up_proj, down_proj)
