"""A loaded model (`Jamba`) and `load`, which reads one from a checkpoint directory."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from .config import ConfigError, JambaConfig
from .convert.hf_checkpoint import CheckpointError, load_hf_params
from .convert.manifest import is_converted
from .convert.placement import leaf_shardings
from .kernels import Kernels
from .params import abstract_params, is_quantized
from .quant import check_quantize, quantize_params
from .quant import quantize as quantize_leaf
from .sharding import param_sharding_fn

TOKENIZER_FILE = "tokenizer.json"


@dataclasses.dataclass(frozen=True)
class Jamba:
    """A loaded model: its config, its params (a plain pytree in ``dtype``) and, when the checkpoint
    has one, its ``tokenizers.Tokenizer``. ``kernels`` (``jamba_jax.Kernels``) picks the implementation
    of the scan, the attention and the int8 MoE matmul wherever the model runs; ``with_kernels("pallas")``
    swaps them. ``quantize`` (``"experts-int8"`` or None) records that the feed-forward weights in
    ``params`` are ``quant.QuantizedWeight``s."""

    config: JambaConfig
    params: Any
    tokenizer: Any = None
    checkpoint_dir: Path | None = None  # where generation_config.json and the chat template are read
    quantize: str | None = None
    mesh: Any = None  # a jax.sharding.Mesh the params are sharded on (see jamba_jax.sharding), or None
    kernels: Kernels = Kernels()

    def __post_init__(self):
        check_quantize(self.quantize)
        object.__setattr__(self, "kernels", Kernels.named(self.kernels))

    def with_kernels(self, kernels: "str | Kernels") -> "Jamba":
        """This model with ``kernels`` (a ``Kernels`` or a preset name, see ``Kernels.named``)."""
        return self.replace(kernels=Kernels.named(kernels))

    @property
    def dtype(self) -> jnp.dtype:
        """The compute dtype: the embedding's (int8 weights and their fp32 scales do not count)."""
        return self.params["embed_tokens"]["embedding"].dtype

    def replace(self, **changes) -> "Jamba":
        return dataclasses.replace(self, **changes)


def load(path: str | Path, *, dtype=None, mesh=None, shardings=None, quantize: str | None = None,
         kernels: "str | Kernels" = "xla", verify: bool = True, allow_nonfinite: bool = False) -> Jamba:
    """Loads a Jamba checkpoint directory: an HF one (``config.json`` + safetensors, single or
    sharded) or one written by ``jamba convert`` (detected by its ``manifest.json``).

    ``dtype`` (e.g. ``"float32"``, ``jnp.bfloat16``) defaults to the checkpoint's dtype.
    ``mesh`` (a ``jax.sharding.Mesh``, e.g. ``jamba_jax.make_mesh(8)``) places each leaf by the logical-axis
    rules of ``jamba_jax.sharding`` unless ``shardings`` is given (a pytree of ``jax.sharding.Sharding``
    matching the params, or a callable ``(path, jax.ShapeDtypeStruct) -> Sharding`` with ``path`` a tuple
    of param keys; leaves it leaves out are replicated on ``mesh``). The model keeps the mesh:
    ``forward`` and ``generate`` then run sharded over it.
    A converted checkpoint is restored by Orbax in one call into an abstract tree that carries every
    leaf's sharding (each device reads only its shard); from an HF one, leaf by leaf, only the regions
    this process's devices hold are read (in a job of several processes, see ``jamba_jax.distributed``,
    no process reads the whole checkpoint). Raises ``ConfigError`` / ``CheckpointError`` with a message naming the file or key.

    A converted checkpoint's leaves are always checked against its ``manifest.json`` and ``config.json``
    (shape and dtype, before anything is read); ``verify`` (default True) also checks each leaf's checksum
    recorded at conversion (see ``docs/convert.md`` for its cost); ``verify=False`` skips that. An HF
    tensor holding NaN or Inf is refused, naming it, unless ``allow_nonfinite``.

    ``quantize="experts-int8"`` stores every MoE expert and dense MLP weight as int8 with fp32 per-output-
    channel scales (``quant.quantize_params``); from an HF checkpoint each such leaf is quantized as soon as
    it is placed, so the float weights never all exist at once. A checkpoint written by ``jamba convert
    --quantize experts-int8`` is restored quantized whatever ``quantize``. ``kernels`` (a ``Kernels``, or
    ``"xla"`` / ``"pallas"``: ``Kernels.named``) is stored on the ``Jamba``."""
    check_quantize(quantize)
    kept = dict(kernels=Kernels.named(kernels), mesh=mesh)
    if mesh is not None:
        if shardings is None:
            shardings = param_sharding_fn(mesh)
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory; expected an HF checkpoint directory")
    if is_converted(path):
        from .convert.orbax_checkpoint import restore_params  # imports Orbax: only when needed

        config, params, stored = restore_params(path, dtype=dtype, mesh=mesh, shardings=shardings, verify=verify)
        quantize = quantize or stored  # a quantized checkpoint stays quantized
        params = quantize_params(params, config, quantize)
        return Jamba(config, params, _load_tokenizer(path), checkpoint_dir=path, quantize=quantize, **kept)
    config = JambaConfig.from_json(path / "config.json")
    dtype = jnp.dtype(dtype if dtype is not None else config.dtype)
    placement = None
    if mesh is not None or shardings is not None:
        placement = leaf_shardings(traverse_util.flatten_dict(abstract_params(config, dtype)), mesh=mesh,
                                   shardings=shardings)
    transform = None
    if quantize is not None:  # each feed-forward leaf quantized as soon as it is placed
        transform = lambda leaf_path, leaf: quantize_leaf(leaf) if is_quantized(leaf_path) else leaf  # noqa: E731
    params = load_hf_params(path, config, dtype, shardings=placement, transform=transform,
                            allow_nonfinite=allow_nonfinite)
    params = quantize_params(params, config, quantize)  # checks every feed-forward weight was quantized
    return Jamba(config, params, _load_tokenizer(path), checkpoint_dir=path, quantize=quantize, **kept)


def _load_tokenizer(path: Path):
    file = path / TOKENIZER_FILE
    if not file.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # the tokenizers library raises a bare Exception on malformed files
        raise CheckpointError(f"{file}: unreadable tokenizer ({e})") from None


def mesh_context(model: Jamba):
    """``jax.set_mesh(model.mesh)``, under which the layers see the mesh; a no-op without one."""
    return contextlib.nullcontext() if model.mesh is None else jax.set_mesh(model.mesh)


__all__ = ["Jamba", "load", "mesh_context", "ConfigError", "CheckpointError"]
