"""The param table: every weight of a Jamba model declared once, with everything derived from it.

Each ``ParamRow`` holds a param's path, its shape as a function of the config, its logical axes (mapped
to mesh axes by ``sharding.RULES``), its initializer, its HF checkpoint key and the layout change between
the two, and whether ExpertsInt8 quantizes it. From ``PARAM_TABLE`` come: the abstract params and the
random init (``abstract_params``, ``init_params``), the sharding of every leaf
(``param_logical_axes``), which leaves are quantized (``is_quantized``), the leaves a converted
checkpoint stores (``convert.orbax_checkpoint.stored_leaves``), the HF key map both ways
(``convert.hf_keys``) and the MoE's ``shard_map`` specs (``moe_parallel``). The Flax modules declare the
same params for ``apply``; a test checks that their tree is exactly this table's. A path with no row is
an error, never a silent default.

Where the params live: layer ``i`` at ``blocks/layer_{i % P}`` (stacked over a leading ``num_blocks``
axis, logical axis ``"layers"``, scanned with ``nn.scan``) or, for the last ``num_hidden_layers % P``
layers, at ``tail/layer_{i - num_blocks * P}`` (``layer_location``); ``P`` is ``config.block_size``. A
layer row's ``path`` is relative to its layer (``("mamba", "A_log")``); the others are top level.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from .config import ATTENTION, MAMBA, JambaConfig

# ---- initializers (HF Jamba's) -------------------------------------------------------------------------

Initializer = Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]


def normal_init(key, shape, dtype):
    """Weights and embeddings: N(0, 0.02)."""
    return 0.02 * jax.random.normal(key, shape, jnp.float32).astype(dtype)


def ones_init(key, shape, dtype):
    return jnp.ones(shape, dtype)


def zeros_init(key, shape, dtype):
    return jnp.zeros(shape, dtype)


def a_log_init(key, shape, dtype):
    """``A_log [..., d_inner, d_state] = log(1 .. d_state)`` (S4D-real)."""
    return jnp.broadcast_to(jnp.log(jnp.arange(1, shape[-1] + 1, dtype=jnp.float32)), shape).astype(dtype)


def conv_init(key, shape, dtype):
    """The depthwise conv kernel ``[..., width, channels]``: torch's default, U(+-1/sqrt(width))."""
    bound = 1.0 / np.sqrt(shape[-2])
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


# ---- layouts between HF tensors and params ---------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Layout:
    """How an HF tensor becomes ours (``to_jax``) and back (``to_hf``), on numpy arrays. ``to_jax`` is the HF
    tensor reshaped to ``view(hf_shape)`` (its bytes in file order), then transposed by ``perm`` (None: no
    transpose): a box of the param leaf is then a box of the view, which is how a process reads only its
    shard's bytes (``convert.hf_checkpoint.read_leaf_region``)."""

    name: str
    to_jax: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    view: Callable[[tuple[int, ...]], tuple[int, ...]]
    perm: tuple[int, ...] | None


SAME = Layout("same", lambda a: a, lambda a: a, lambda s: s, None)
# torch Linear weight [out, in] <-> kernel [in, out]
LINEAR = Layout("linear", lambda a: a.T, lambda a: a.T, lambda s: s, (1, 0))
# Mamba in_proj weight [2 * d_inner, in] <-> kernel [in, 2, d_inner] (x and z halves on their own axis)
IN_PROJ = Layout("in_proj", lambda a: a.T.reshape(a.shape[1], 2, -1), lambda a: a.reshape(a.shape[0], -1).T,
                 lambda s: (2, s[0] // 2, s[1]), (2, 0, 1))
IN_PROJ_BIAS = Layout("in_proj_bias", lambda a: a.reshape(2, -1), lambda a: a.reshape(-1),
                      lambda s: (2, s[0] // 2), None)
# torch depthwise Conv1d weight [channels, 1, width] <-> [width, channels]
CONV = Layout("conv", lambda a: a[:, 0, :].T, lambda a: a.T[:, None, :], lambda s: (s[0], s[2]), (1, 0))


# ---- the table -------------------------------------------------------------------------------------------

MODEL, LAYER, DENSE, MOE = "model", "layer", "dense", "moe"  # scopes besides the mixers ATTENTION and MAMBA


@dataclasses.dataclass(frozen=True)
class ParamRow:
    """One param. ``scope``: ``"model"`` (top level), ``"layer"`` (every layer), ``"attention"`` /
    ``"mamba"`` (layers with that mixer), ``"dense"`` / ``"moe"`` (layers with that feed-forward).
    ``hf_key`` is relative to ``model.layers.{i}.`` for layer scopes; ``{e}`` in it stands for the expert
    (then the leaf's leading axis is the expert axis and each expert is its own HF tensor). ``present``:
    whether the config has this param (biases that are optional, an untied LM head)."""

    path: tuple[str, ...]
    scope: str
    shape: Callable[[JambaConfig], tuple[int, ...]]
    axes: tuple[str | None, ...]
    init: Initializer
    hf_key: str
    layout: Layout = SAME
    quantized: bool = False
    present: Callable[[JambaConfig], bool] = lambda c: True

    @property
    def per_expert(self) -> bool:
        return "{e}" in self.hf_key


def _linear(path, scope, shape, axes, hf_key, **kw) -> ParamRow:
    return ParamRow(path, scope, shape, axes, normal_init, hf_key, LINEAR, **kw)


def _ffn(scope: str, path: tuple[str, ...], hf: str, experts: bool) -> list[ParamRow]:
    lead, lead_axes = ((lambda c: (c.num_experts,)), ("experts",)) if experts else ((lambda c: ()), ())
    up = lambda c: (*lead(c), c.hidden_size, c.intermediate_size)  # noqa: E731
    down = lambda c: (*lead(c), c.intermediate_size, c.hidden_size)  # noqa: E731
    leaf = () if experts else ("kernel",)
    return [_linear(path + (p,) + leaf, scope, shape, lead_axes + axes, hf.format(p=p), quantized=True)
            for p, shape, axes in (("gate_proj", up, ("embed", "mlp")), ("up_proj", up, ("embed", "mlp")),
                                   ("down_proj", down, ("mlp", "embed")))]


def _heads(c: JambaConfig) -> int:
    return c.num_attention_heads * c.head_dim


def _kv(c: JambaConfig) -> int:
    return c.num_key_value_heads * c.head_dim


def _proj_bias(c: JambaConfig) -> bool:
    return c.mamba_proj_bias


PARAM_TABLE: tuple[ParamRow, ...] = (
    ParamRow(("embed_tokens", "embedding"), MODEL, lambda c: (c.vocab_size, c.hidden_size), ("vocab", "embed"),
             normal_init, "model.embed_tokens.weight"),
    ParamRow(("final_layernorm", "weight"), MODEL, lambda c: (c.hidden_size,), ("embed",), ones_init,
             "model.final_layernorm.weight"),
    _linear(("lm_head", "kernel"), MODEL, lambda c: (c.hidden_size, c.vocab_size), ("embed", "vocab"),
            "lm_head.weight", present=lambda c: not c.tie_word_embeddings),
    ParamRow(("input_layernorm", "weight"), LAYER, lambda c: (c.hidden_size,), ("embed",), ones_init,
             "input_layernorm.weight"),
    ParamRow(("pre_ff_layernorm", "weight"), LAYER, lambda c: (c.hidden_size,), ("embed",), ones_init,
             "pre_ff_layernorm.weight"),
    # attention
    _linear(("self_attn", "q_proj", "kernel"), ATTENTION, lambda c: (c.hidden_size, _heads(c)), ("embed", "heads"),
            "self_attn.q_proj.weight"),
    _linear(("self_attn", "k_proj", "kernel"), ATTENTION, lambda c: (c.hidden_size, _kv(c)), ("embed", "kv_heads"),
            "self_attn.k_proj.weight"),
    _linear(("self_attn", "v_proj", "kernel"), ATTENTION, lambda c: (c.hidden_size, _kv(c)), ("embed", "kv_heads"),
            "self_attn.v_proj.weight"),
    _linear(("self_attn", "o_proj", "kernel"), ATTENTION, lambda c: (_heads(c), c.hidden_size), ("heads", "embed"),
            "self_attn.o_proj.weight"),
    # Mamba: in_proj's (x, z) halves on an axis of their own, so that sharding d_inner splits both alike
    ParamRow(("mamba", "in_proj", "kernel"), MAMBA, lambda c: (c.hidden_size, 2, c.d_inner), ("embed", "xz", "d_inner"),
             normal_init, "mamba.in_proj.weight", IN_PROJ),
    ParamRow(("mamba", "in_proj", "bias"), MAMBA, lambda c: (2, c.d_inner), ("xz", "d_inner"), zeros_init,
             "mamba.in_proj.bias", IN_PROJ_BIAS, present=_proj_bias),
    ParamRow(("mamba", "conv_kernel"), MAMBA, lambda c: (c.mamba_d_conv, c.d_inner), ("d_conv", "d_inner"),
             conv_init, "mamba.conv1d.weight", CONV),
    ParamRow(("mamba", "conv_bias"), MAMBA, lambda c: (c.d_inner,), ("d_inner",), zeros_init, "mamba.conv1d.bias",
             present=lambda c: c.mamba_conv_bias),
    _linear(("mamba", "x_proj", "kernel"), MAMBA, lambda c: (c.d_inner, c.mamba_dt_rank + 2 * c.mamba_d_state),
            ("d_inner", "x_proj_out"), "mamba.x_proj.weight"),
    ParamRow(("mamba", "dt_layernorm", "weight"), MAMBA, lambda c: (c.mamba_dt_rank,), ("dt_rank",), ones_init,
             "mamba.dt_layernorm.weight"),
    ParamRow(("mamba", "b_layernorm", "weight"), MAMBA, lambda c: (c.mamba_d_state,), ("d_state",), ones_init,
             "mamba.b_layernorm.weight"),
    ParamRow(("mamba", "c_layernorm", "weight"), MAMBA, lambda c: (c.mamba_d_state,), ("d_state",), ones_init,
             "mamba.c_layernorm.weight"),
    _linear(("mamba", "dt_proj", "kernel"), MAMBA, lambda c: (c.mamba_dt_rank, c.d_inner), ("dt_rank", "d_inner"),
            "mamba.dt_proj.weight"),
    ParamRow(("mamba", "dt_bias"), MAMBA, lambda c: (c.d_inner,), ("d_inner",), normal_init, "mamba.dt_proj.bias"),
    ParamRow(("mamba", "A_log"), MAMBA, lambda c: (c.d_inner, c.mamba_d_state), ("d_inner", "d_state"), a_log_init,
             "mamba.A_log"),
    ParamRow(("mamba", "D"), MAMBA, lambda c: (c.d_inner,), ("d_inner",), ones_init, "mamba.D"),
    _linear(("mamba", "out_proj", "kernel"), MAMBA, lambda c: (c.d_inner, c.hidden_size), ("d_inner", "embed"),
            "mamba.out_proj.weight"),
    ParamRow(("mamba", "out_proj", "bias"), MAMBA, lambda c: (c.hidden_size,), ("embed",), zeros_init,
             "mamba.out_proj.bias", present=_proj_bias),
    # feed-forward: a dense MLP, or the router and the stacked experts (ExpertsInt8 quantizes both kinds)
    *_ffn(DENSE, ("feed_forward",), "feed_forward.{p}.weight", experts=False),
    # The router's expert axis is replicated: every device routes every token (see moe_parallel).
    _linear(("feed_forward", "router", "kernel"), MOE, lambda c: (c.hidden_size, c.num_experts), ("embed", None),
            "feed_forward.router.weight"),
    *_ffn(MOE, ("feed_forward", "experts"), "feed_forward.experts.{{e}}.{p}.weight", experts=True),
)
_BY_PATH = {row.path: row for row in PARAM_TABLE}


def _layer_scopes(config: JambaConfig, layer: int) -> tuple[str, ...]:
    return LAYER, config.mixer_type(layer), MOE if config.is_moe(layer) else DENSE


def layer_location(config: JambaConfig, layer: int) -> tuple[tuple[str, ...], int | None]:
    """Where layer ``layer``'s params live: (path prefix, index along the stacked block axis or None)."""
    period = config.block_size
    block, pos = divmod(layer, period)
    if block < config.num_blocks:
        return ("blocks", f"layer_{pos}"), block
    return ("tail", f"layer_{layer - config.num_blocks * period}"), None


@dataclasses.dataclass(frozen=True)
class Leaf:
    """A param leaf of a config: its full path, its row and its shape (stacked leaves lead with the
    block axis)."""

    path: tuple[str, ...]
    row: ParamRow
    shape: tuple[int, ...]

    @property
    def stacked(self) -> bool:
        return self.path[0] == "blocks"

    @property
    def axes(self) -> tuple[str | None, ...]:
        return ("layers",) * self.stacked + self.row.axes


@functools.lru_cache(maxsize=64)
def param_leaves(config: JambaConfig) -> tuple[Leaf, ...]:
    """Every param leaf of ``config``, in table order: top-level params, then each layer position of the
    scanned blocks, then the tail layers."""
    leaves = [Leaf(r.path, r, r.shape(config)) for r in PARAM_TABLE if r.scope == MODEL and r.present(config)]
    first_layers = [(j, ("blocks", f"layer_{j}"), (config.num_blocks,)) for j in range(config.block_size)
                    if config.num_blocks]
    first_layers += [(j, ("tail", f"layer_{j}"), ()) for j in range(config.num_tail_layers)]
    for j, prefix, lead in first_layers:  # position j of the plan: the same kinds as layer j
        scopes = _layer_scopes(config, j)
        leaves += [Leaf(prefix + r.path, r, lead + r.shape(config)) for r in PARAM_TABLE
                   if r.scope in scopes and r.present(config)]
    return tuple(leaves)


def param_row(path: tuple[str, ...]) -> ParamRow:
    """The row of the param at ``path`` (a full path such as ``("blocks", "layer_0", "mamba", "A_log")``, a
    tuple of keys); ``ValueError`` for a path the table does not describe."""
    relative = tuple(path[2:]) if path[:1] in (("blocks",), ("tail",)) else tuple(path)
    row = _BY_PATH.get(relative)
    if row is None or (row.scope == MODEL) != (relative == tuple(path)):
        raise ValueError(f"param {'/'.join(map(str, path))} has no row in params.PARAM_TABLE")
    return row


def layer_row(path: tuple[str, ...]) -> ParamRow:
    """The row of a layer's param by its path within the layer (``("feed_forward", "experts", "gate_proj")``)."""
    return param_row(("tail", "layer_0") + tuple(path))


def param_logical_axes(path: tuple[str, ...], ndim: int) -> tuple[str | None, ...]:
    """Logical axes of the param at ``path`` with ``ndim`` dimensions; a leading stacked-block axis
    (params under ``blocks``) is ``"layers"``."""
    axes = param_row(path).axes
    extra = ndim - len(axes)
    if extra not in (0, 1):
        raise ValueError(f"param {'/'.join(path)}: {ndim} dims, expected {len(axes)} (+1 stacked)")
    return ("layers",) * extra + axes


def is_quantized(path: tuple[str, ...]) -> bool:
    """Whether ExpertsInt8 stores the param at ``path`` as int8 + scales (MoE experts and dense MLPs)."""
    return param_row(path).quantized


def abstract_params(config: JambaConfig, dtype=jnp.float32) -> dict:
    """The param pytree as ``jax.ShapeDtypeStruct`` leaves, without allocating."""
    dtype = jnp.dtype(dtype)
    return traverse_util.unflatten_dict({leaf.path: jax.ShapeDtypeStruct(leaf.shape, dtype)
                                         for leaf in param_leaves(config)})


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def init_params(config: JambaConfig, key, dtype=jnp.float32) -> dict:
    """Random params (HF Jamba's initialisation, each leaf from its row's initializer and its own key) as a
    plain pytree."""
    return traverse_util.unflatten_dict({
        leaf.path: leaf.row.init(jax.random.fold_in(key, i), leaf.shape, jnp.dtype(dtype))
        for i, leaf in enumerate(param_leaves(config))})


def scaled_params(config: JambaConfig, seed: int, dtype=np.float32) -> dict:
    """Random params at scales where activations stay O(1) through the layers, for measuring numerical
    error (the 0.02 init leaves logits nearly flat): linear and expert weights ~ N(0, 1/fan_in), unit
    embeddings, router and ``D``, norm weights near 1, ``A_log`` near ``log(1..d_state)``. Drawn in numpy
    (``seed``), in table order; the scales of the tests' HF reference checkpoints."""
    rng = np.random.default_rng(seed)
    flat = {}
    for leaf in param_leaves(config):
        n = rng.standard_normal(leaf.shape).astype(np.float32)
        name, path = leaf.path[-1], leaf.path
        if name == "weight":  # norms
            v = 1.0 + 0.2 * n
        elif name == "A_log":
            v = np.log(np.arange(1, leaf.shape[-1] + 1, dtype=np.float32)) + 0.3 * n
        elif name in ("D", "embedding") or path[-2] == "router":
            v = n
        elif name == "dt_bias":
            v = 0.5 * n - 1.0
        elif name == "conv_kernel":
            v = 0.5 * n
        elif name.endswith("bias"):
            v = 0.1 * n
        else:  # kernels [..., in, out] and expert weights [..., experts, in, out]
            v = n / np.sqrt(leaf.shape[-2])
        flat[path] = jnp.asarray(v, dtype)
    return traverse_util.unflatten_dict(flat)
