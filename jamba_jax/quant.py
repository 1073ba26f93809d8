"""ExpertsInt8 (Jamba-1.5 paper, sec. 3.1): int8 feed-forward weights, dequantized inside the matmul.

Every MoE expert weight (``feed_forward/experts/{gate,up,down}_proj``, ``[experts, in, out]``) and every
dense MLP weight (``feed_forward/{gate,up,down}_proj/kernel``, ``[in, out]``, a 1-expert MoE) becomes a
``QuantizedWeight``: ``q`` int8 with the weight's shape, ``scale`` fp32 with the ``in`` (contraction)
axis dropped. Symmetric, per output channel and per expert, no calibration:
``scale = max_in |w| / 127``, ``q = clamp(round(w / scale), -127, 127)``. Leading axes (the stacked
``blocks`` axis, the expert axis) are kept, so ``nn.scan`` slices a ``QuantizedWeight`` like the weight
it replaces and a sharding of the weight carries over (``quantized_sharding``).

The params pytree holds ``QuantizedWeight`` nodes where the float weights were; ``Linear`` and the MoE's
grouped matmul dispatch on the type (``dot`` and ``int8_ragged_dot`` below)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec

from .params import is_quantized

EXPERTS_INT8 = "experts-int8"
QUANTIZE_MODES = (EXPERTS_INT8,)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """``w ~= q * scale[..., None, :]``: ``q`` int8 ``[..., in, out]``, ``scale`` fp32 ``[..., out]``."""

    q: jax.Array
    scale: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.q.shape)

    @property
    def nbytes(self) -> int:
        return int(self.q.size) * self.q.dtype.itemsize + int(self.scale.size) * self.scale.dtype.itemsize

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """The float weight ``[..., in, out]`` in ``dtype`` (for tests and inspection)."""
        return (self.q.astype(jnp.float32) * self.scale[..., None, :]).astype(dtype)


def check_quantize(mode: str | None) -> str | None:
    """``mode`` if it names a supported quantization (or is None); else a ValueError."""
    if mode is not None and mode not in QUANTIZE_MODES:
        raise ValueError(f"unknown quantize={mode!r}; expected one of {', '.join(map(repr, QUANTIZE_MODES))} "
                         "or None")
    return mode


def quantized_spec(spec: PartitionSpec, ndim: int) -> PartitionSpec:
    """The ``PartitionSpec`` of the scale of a weight of rank ``ndim`` partitioned by ``spec``: the
    contraction axis (``ndim - 2``) dropped."""
    spec = tuple(spec) + (None,) * (ndim - len(spec))
    return PartitionSpec(*spec[:ndim - 2], spec[ndim - 1])


def quantized_sharding(sharding, ndim: int):
    """The ``QuantizedWeight`` of shardings for a weight of rank ``ndim`` placed with ``sharding``: ``q``
    exactly as the weight, ``scale`` by ``quantized_spec``. Shardings other than ``NamedSharding`` (e.g.
    one device) apply to both as they are."""
    if not isinstance(sharding, NamedSharding):
        return QuantizedWeight(sharding, sharding)
    scale_spec = quantized_spec(sharding.spec, ndim)
    return QuantizedWeight(sharding, NamedSharding(sharding.mesh, scale_spec, memory_kind=sharding.memory_kind))


@functools.cache
def _quantize_fn(sharding, ndim: int):
    def fn(w):
        from pallas_kernels.int8_ragged_dot import quantize_int8  # [experts, in, out]

        if w.ndim == 2:  # a dense kernel: one expert
            q, scale = quantize_int8(w[None])
            return QuantizedWeight(q[0], scale[0])
        f = quantize_int8
        for _ in range(w.ndim - 3):  # stacked leading axes (no reshape: it would merge sharded axes)
            f = jax.vmap(f)
        return QuantizedWeight(*f(w))

    if sharding is None:
        return jax.jit(fn)
    return jax.jit(fn, out_shardings=quantized_sharding(sharding, ndim))


def quantize(w: jax.Array) -> QuantizedWeight:
    """Quantizes one weight ``[..., in, out]`` (any float dtype) on the device(s) holding it; the result
    is sharded like ``w`` (see ``quantized_sharding``)."""
    if w.ndim < 2:
        raise ValueError(f"quantize expects a weight [..., in, out], got shape {tuple(w.shape)}")
    sharding = None  # a single device, a numpy array or a tracer: jit keeps it where it is
    if isinstance(w, jax.Array) and not isinstance(w, jax.core.Tracer) and isinstance(w.sharding, NamedSharding):
        sharding = w.sharding
    return _quantize_fn(sharding, w.ndim)(w)


def quantize_params(params, config, mode: str = EXPERTS_INT8):
    """The params with every feed-forward weight (MoE experts and dense MLPs, stacked or not) replaced by
    a ``QuantizedWeight``; everything else is returned as is. One leaf at a time: the extra memory is one
    leaf's int8 copy. ``config`` checks that every layer's three projections were found."""
    if check_quantize(mode) is None:
        return params
    flat = traverse_util.flatten_dict(params)
    for path, leaf in flat.items():
        if is_quantized(path) and not isinstance(leaf, QuantizedWeight):
            flat[path] = quantize(leaf)
    if not _complete(flat, config):
        raise ValueError(f"quantize_params: the params do not hold the three feed-forward projections of "
                         f"each of the {config.num_hidden_layers} layers; is this a Jamba params tree?")
    return traverse_util.unflatten_dict(flat)


def _complete(flat, config) -> bool:
    """Every layer's three feed-forward projections are ``QuantizedWeight``s."""
    layers = 0
    for path, leaf in flat.items():
        if is_quantized(path):
            if not isinstance(leaf, QuantizedWeight):
                return False
            layers += leaf.shape[0] if path[0] == "blocks" else 1
    return layers == 3 * config.num_hidden_layers


def dot(x: jax.Array, kernel) -> jax.Array:
    """``x [..., in] @ kernel [in, out]`` in ``x.dtype``. A ``QuantizedWeight`` kernel is cast to
    ``x.dtype`` (exact: |q| <= 127), multiplied with fp32 accumulation, and scaled per output column."""
    if not isinstance(kernel, QuantizedWeight):
        return jnp.dot(x, kernel)
    y = jnp.dot(x, kernel.q.astype(x.dtype), preferred_element_type=jnp.float32)
    return (y * kernel.scale).astype(x.dtype)


MOE_INT8_IMPLS = ("xla", "pallas", "pallas-interpret", "mosaic", "mosaic-interpret")


def pallas_config(rows: int, k: int, n: int) -> dict:
    """Kernel configuration for ``rows`` lhs rows (static under jit) and a ``[experts, k, n]`` weight: the
    fastest of the H200 sweep at Jamba-1.5-Mini shapes (docs/experts_int8.md): "tile" for one decode token
    (2 rows), "item" up to 16 rows, "group" with 16-row chunks up to 128 rows, then 64-row chunks with
    256x64 weight tiles. A tile that does not divide ``k``/``n`` is halved down to 16 (no padded weight copy);
    if none divides, the kernel pads."""
    if rows <= 2:
        cfg = dict(design="tile", block_m=16, block_n=128, block_k=128)
    elif rows <= 16:
        cfg = dict(design="item", block_m=16, block_n=128, block_k=128)
    elif rows <= 128:
        cfg = dict(design="group", block_m=16, block_n=128, block_k=128)
    else:
        cfg = dict(design="group", block_m=64, block_n=256, block_k=64)

    def fit(block, dim):
        b = block
        while b > 16 and dim % b:
            b //= 2
        return b if dim % b == 0 else block

    return dict(cfg, block_n=fit(cfg["block_n"], n), block_k=fit(cfg["block_k"], k))


def int8_ragged_dot(lhs: jax.Array, w: QuantizedWeight, group_sizes: jax.Array, impl: str = "xla") -> jax.Array:
    """Grouped matmul with int8 expert weights: ``lhs [rows, in]`` sorted by expert, ``w`` ``[experts, in,
    out]``, ``group_sizes [experts]`` int32 -> ``[rows, out]`` in ``lhs.dtype`` (fp32 accumulation, the
    scale applied per row's expert and output column).

    ``impl``: ``"xla"`` (``jax.lax.ragged_dot`` on the weights cast to ``lhs.dtype``), ``"pallas"`` (the
    Pallas Triton kernel with ``pallas_config`` on GPU; the XLA path on other backends),
    ``"pallas-interpret"`` (that kernel in the Pallas interpreter, any backend; slow, for tests),
    ``"mosaic"`` (the Mosaic GPU kernel ``pallas_kernels.int8_ragged_dot_mgpu``, TMA + wgmma, with its
    ``mosaic_config``, on GPU; the XLA path on other backends) or ``"mosaic-interpret"`` (that kernel in
    Pallas's GPU interpret mode, any backend; slow, for tests)."""
    if impl not in MOE_INT8_IMPLS:
        raise ValueError(f"unknown Kernels.moe_int8 {impl!r}; expected one of {', '.join(map(repr, MOE_INT8_IMPLS))}")
    from pallas_kernels import int8_ragged_dot as kernels  # imported at trace time only

    if impl == "xla" or (impl in ("pallas", "mosaic") and jax.default_backend() != "gpu"):
        return kernels.int8_ragged_dot_reference(lhs, w.q, w.scale, group_sizes, preferred_element_type=lhs.dtype)
    if impl in ("mosaic", "mosaic-interpret"):
        from pallas_kernels.int8_ragged_dot_mgpu import int8_ragged_dot_mgpu

        return int8_ragged_dot_mgpu(lhs, w.q, w.scale, group_sizes, preferred_element_type=lhs.dtype,
                                    interpret=impl == "mosaic-interpret")
    config = pallas_config(lhs.shape[0], *w.q.shape[1:])
    return kernels.int8_ragged_dot_pallas(lhs, w.q, w.scale, group_sizes, preferred_element_type=lhs.dtype,
                                          interpret=impl == "pallas-interpret", **config)


def slot_matmul(lhs: jax.Array, w, slot_expert: jax.Array, impl: str = "xla") -> jax.Array:
    """The MoE's decode-sized matmul (``moe``'s ``"slots"`` path): ``out[s] = lhs(s) @ w[slot_expert[s]]``
    in ``lhs.dtype``, fp32 accumulation. ``lhs [rows, in]`` (shared by every slot) or ``[slots, rows, in]``;
    ``w`` ``[experts, in, out]``, float or a ``QuantizedWeight`` (its scale applied per output column);
    ``slot_expert [slots]`` int32, ids at or past ``experts`` mark unused slots (output 0) -> ``[slots,
    rows, out]``. Only the slots' experts are read.

    ``impl`` (``Kernels.moe_int8``) for int8 ``w``: ``"pallas"`` runs ``pallas_kernels.expert_slots`` on GPU,
    ``"pallas-interpret"`` that kernel in the Pallas interpreter (any backend); otherwise, and for float
    ``w``, XLA: one ``dot`` per slot on the expert's dynamic slice of the stack."""
    if impl not in MOE_INT8_IMPLS:
        raise ValueError(f"unknown Kernels.moe_int8 {impl!r}; expected one of {', '.join(map(repr, MOE_INT8_IMPLS))}")
    from pallas_kernels import expert_slots  # imported at trace time only

    q, scale = (w.q, w.scale) if isinstance(w, QuantizedWeight) else (w, None)
    kernel = scale is not None and (impl == "pallas-interpret" or (impl == "pallas" and jax.default_backend() == "gpu"))
    if kernel:
        return expert_slots.slot_matmul_pallas(lhs, q, scale, slot_expert, interpret=impl == "pallas-interpret")
    return expert_slots.slot_matmul_reference(lhs, q, scale, slot_expert)
