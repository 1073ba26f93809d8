"""The user-facing entry points: `Jamba`, `load` and `forward`."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from .config import ConfigError, JambaConfig
from .convert.hf_checkpoint import CheckpointError, load_hf_params
from .convert.manifest import is_converted, read_manifest
from .convert.placement import leaf_shardings
from .attention import ATTENTION_IMPLS
from .model import JambaLM, abstract_params
from .quant import MOE_IMPLS, check_quantize, is_quantized_path, quantize_params
from .quant import quantize as quantize_leaf
from .scan import SCAN_IMPLS
from .sharding import param_sharding_fn

TOKENIZER_FILE = "tokenizer.json"
# One flag for every kernel: the (scan_impl, moe_impl, attn_impl) each value selects.
KERNELS = {"xla": ("xla", "xla", "xla"), "pallas": ("pallas", "pallas", "pallas"),
           "pallas-interpret": ("pallas-interpret", "pallas-interpret", "pallas-interpret")}


def _check_impls(scan_impl, moe_impl, attn_impl):
    for what, value, known in (("scan_impl", scan_impl, SCAN_IMPLS), ("moe_impl", moe_impl, MOE_IMPLS),
                               ("attn_impl", attn_impl, ATTENTION_IMPLS)):
        if value not in known:
            raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(map(repr, known))}")


def kernel_impls(kernels: str = "xla", *, scan_impl=None, moe_impl=None, attn_impl=None) -> dict:
    """``{"scan_impl", "moe_impl", "attn_impl"}`` selected by ``kernels`` (a key of ``KERNELS``:
    ``"pallas"`` runs every Pallas kernel on GPU and the XLA paths elsewhere), each overridden when given."""
    if kernels not in KERNELS:
        raise ValueError(f"unknown kernels {kernels!r}; expected one of {', '.join(map(repr, KERNELS))}")
    chosen = [given if given is not None else default
              for given, default in zip((scan_impl, moe_impl, attn_impl), KERNELS[kernels])]
    _check_impls(*chosen)
    return dict(zip(("scan_impl", "moe_impl", "attn_impl"), chosen))


@dataclasses.dataclass(frozen=True)
class Jamba:
    """A loaded model: its config, its params (a plain pytree in ``dtype``) and, when the checkpoint
    has one, its ``tokenizers.Tokenizer``. ``scan_impl`` picks the Mamba selective-scan implementation,
    ``moe_impl`` the grouped matmul of int8 expert weights (``"xla"``, ``"pallas"``: the Pallas kernel on
    GPU, else XLA; ``"pallas-interpret"``), ``attn_impl`` the attention (``attention.ATTENTION_IMPLS``);
    ``with_kernels("pallas")`` sets all three. ``quantize`` (``"experts-int8"`` or None) records that the
    feed-forward weights in ``params`` are ``quant.QuantizedWeight``s."""

    config: JambaConfig
    params: Any
    tokenizer: Any = None
    scan_impl: str = "xla"
    checkpoint_dir: Path | None = None  # where generation_config.json and the chat template are read
    moe_impl: str = "xla"
    quantize: str | None = None
    attn_impl: str = "xla"
    mesh: Any = None  # a jax.sharding.Mesh the params are sharded on (see jamba_jax.sharding), or None

    def __post_init__(self):
        check_quantize(self.quantize)
        _check_impls(self.scan_impl, self.moe_impl, self.attn_impl)

    def with_kernels(self, kernels: str) -> "Jamba":
        """This model with every implementation selected by ``kernels`` (see ``kernel_impls``)."""
        return self.replace(**kernel_impls(kernels))

    @property
    def dtype(self) -> jnp.dtype:
        """The compute dtype: the embedding's (int8 weights and their fp32 scales do not count)."""
        return self.params["embed_tokens"]["embedding"].dtype

    def replace(self, **changes) -> "Jamba":
        return dataclasses.replace(self, **changes)


def load(path: str | Path, *, dtype=None, scan_impl: str | None = None, mesh=None, shardings=None,
         quantize: str | None = None, moe_impl: str | None = None, attn_impl: str | None = None,
         kernels: str = "xla") -> Jamba:
    """Loads a Jamba checkpoint directory: an HF one (``config.json`` + safetensors, single or
    sharded) or one written by ``jamba convert`` (detected by its ``manifest.json``).

    ``dtype`` (e.g. ``"float32"``, ``jnp.bfloat16``) defaults to the checkpoint's dtype.
    ``mesh`` (a ``jax.sharding.Mesh``, e.g. ``jamba_jax.make_mesh(8)``) places each leaf by the logical-axis
    rules of ``jamba_jax.sharding`` unless ``shardings`` is given (a pytree of ``jax.sharding.Sharding``
    matching the params, or a callable ``(path, jax.ShapeDtypeStruct) -> Sharding`` with ``path`` a tuple
    of param keys; leaves it leaves out are replicated on ``mesh``). The model keeps the mesh:
    ``forward`` and ``generate`` then run sharded over it.
    A converted checkpoint restores every leaf straight into its sharding; an HF one is read one leaf
    at a time and put onto it. Raises ``ConfigError`` / ``CheckpointError`` with a message naming the
    file or key.

    ``quantize="experts-int8"`` stores every MoE expert and dense MLP weight as int8 with fp32 per-output-
    channel scales (``quant.quantize_params``); from an HF checkpoint each such leaf is quantized as soon as
    it is placed, so the float weights never all exist at once. A checkpoint written by ``jamba convert
    --quantize experts-int8`` is restored quantized whatever ``quantize``. ``kernels`` (``"xla"`` or
    ``"pallas"``) selects ``scan_impl``, ``moe_impl`` and ``attn_impl`` together; each given one overrides
    it (``kernel_impls``). They are stored on the ``Jamba``."""
    check_quantize(quantize)
    impls = kernel_impls(kernels, scan_impl=scan_impl, moe_impl=moe_impl, attn_impl=attn_impl)
    if mesh is not None:
        impls["mesh"] = mesh
        if shardings is None:
            shardings = param_sharding_fn(mesh)
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory; expected an HF checkpoint directory")
    if is_converted(path):
        from .convert.orbax_checkpoint import restore_params  # imports Orbax: only when needed

        config, params = restore_params(path, dtype=dtype, mesh=mesh, shardings=shardings)
        quantize = quantize or read_manifest(path)["quantization"]  # a quantized checkpoint stays quantized
        params = quantize_params(params, config, quantize)
        return Jamba(config, params, _load_tokenizer(path), checkpoint_dir=path, quantize=quantize, **impls)
    config = JambaConfig.from_json(path / "config.json")
    dtype = jnp.dtype(dtype if dtype is not None else config.dtype)
    place = None
    if mesh is not None or shardings is not None:
        placement = leaf_shardings(traverse_util.flatten_dict(abstract_params(config, dtype)), mesh=mesh,
                                   shardings=shardings)
        place = lambda leaf_path, leaf: jax.device_put(leaf, placement[leaf_path])  # noqa: E731
    if quantize is not None:
        place = _quantizing(place)
    params = load_hf_params(path, config, dtype, place=place)
    params = quantize_params(params, config, quantize)  # checks every feed-forward weight was quantized
    return Jamba(config, params, _load_tokenizer(path), checkpoint_dir=path, quantize=quantize, **impls)


def _quantizing(place):
    """The loader's ``place`` hook, followed by ExpertsInt8 quantization of the feed-forward leaves."""
    place = place or (lambda leaf_path, leaf: jnp.asarray(leaf))

    def place_and_quantize(leaf_path, leaf):
        stored = place(leaf_path, leaf)
        return quantize_leaf(stored) if is_quantized_path(leaf_path) else stored

    return place_and_quantize


def _load_tokenizer(path: Path):
    file = path / TOKENIZER_FILE
    if not file.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # the tokenizers library raises a bare Exception on malformed files
        raise CheckpointError(f"{file}: unreadable tokenizer ({e})") from None


@functools.partial(jax.jit, static_argnames=("config", "dtype", "scan_impl", "moe_impl", "attn_impl"))
def _forward(params, input_ids, token_valid, *, config, dtype, scan_impl, moe_impl="xla", attn_impl="xla"):
    model = JambaLM(config, dtype, scan_impl, moe_impl, attn_impl=attn_impl)
    return model.apply({"params": params}, input_ids, token_valid)


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
        return _forward(model.params, input_ids, attention_mask, config=model.config, dtype=np.dtype(model.dtype),
                        scan_impl=model.scan_impl, moe_impl=model.moe_impl, attn_impl=model.attn_impl)


def mesh_context(model: Jamba):
    """``jax.set_mesh(model.mesh)``, under which the layers see the mesh; a no-op without one."""
    return contextlib.nullcontext() if model.mesh is None else jax.set_mesh(model.mesh)


__all__ = ["Jamba", "load", "forward", "kernel_impls", "KERNELS", "ConfigError", "CheckpointError"]
