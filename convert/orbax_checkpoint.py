"""Converted checkpoints: HF safetensors -> one Orbax checkpoint per param leaf, and back into arrays.

A converted directory holds::

    manifest.json                  format, versions, dtype, source files, every param's shape
    config.json                    the HF config, its dtype set to the stored dtype
    tokenizer.json, ...            copied from the source (see ``manifest.AUX_FILES``)
    params/blocks.layer_0.mamba.A_log/   an Orbax PyTree checkpoint {"value": leaf} per param leaf

Quantized (``jamba convert --quantize experts-int8``, manifest ``"quantization": "experts-int8"``): each
feed-forward weight is stored as two leaves, ``<path>.q`` (int8, the weight's shape) and ``<path>.scale``
(fp32, the contraction axis dropped), and restored as a ``quant.QuantizedWeight``.

Each leaf is its own Orbax checkpoint so that the converter writes, and the loader restores, one leaf
at a time: host memory peaks near the largest leaf (e.g. a stacked expert kernel
``[num_blocks, experts, hidden, intermediate]``), not the model. A leaf is stored as an uncompressed
zarr array in chunks of at most ``CHUNK_BYTES``, written chunk by chunk without copying the leaf, and
can be restored into any ``jax.sharding.Sharding``, each device reading only the chunks of its shard.
"""

from __future__ import annotations

import contextlib
import ctypes
import inspect
import itertools
import json
import logging
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from flax import traverse_util
from jax.sharding import Mesh
from tqdm.auto import tqdm

from ..config import JambaConfig
from ..params import abstract_params, is_quantized
from ..quant import QuantizedWeight, check_quantize, quantize, quantized_sharding
from .atomic_dir import atomic_output_dir, check_distinct
from .hf_checkpoint import CheckpointError, iter_hf_leaves, open_hf_checkpoint
from .manifest import (CONFIG_FILE, MANIFEST_FILE, PARAMS_DIR, build_manifest, check_params, copy_aux_files,
                       is_converted, leaf_dir, read_manifest, write_config)
from .placement import leaf_shardings

CHUNK_BYTES = 16 << 20
ITEM = "value"


@contextlib.contextmanager
def _quiet_orbax():
    """Orbax logs INFO/WARNING lines through absl on every save; a CLI run keeps only errors."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        logger.setLevel(level)


def chunk_regions(shape: tuple[int, ...], chunk: tuple[int, ...]) -> Iterator[tuple[slice, ...]]:
    """The index of every chunk of an array of ``shape`` split into ``chunk``-shaped blocks."""
    starts = [range(0, n, c) for n, c in zip(shape, chunk)]
    for corner in itertools.product(*starts):
        yield tuple(slice(i, min(i + c, n)) for i, c, n in zip(corner, chunk, shape))


class _ChunkwiseNumpyHandler(ocp.type_handlers.NumpyHandler):
    """Orbax's numpy handler, writing one chunk at a time.

    One tensorstore write of a multi-chunk array stages a copy of every chunk before any is stored
    (a second copy of the leaf); chunk by chunk, only one chunk is staged. Orbax versions without
    this hook fall back to the one-shot write, which is as correct but peaks at twice the leaf."""

    async def _open_and_write(self, value: np.ndarray, tspec, ts_context):
        t = await ts.open(ts.Spec(tspec), create=True, open=True, context=ts_context)
        chunk = tuple(t.chunk_layout.write_chunk.shape)
        for region in chunk_regions(value.shape, chunk):
            await t[region].write(value[region], can_reference_source_data_indefinitely=True)


def _numpy_handler():
    try:
        return _ChunkwiseNumpyHandler(deepcopy_host_arrays=False)
    except TypeError:  # Orbax versions before the option did not copy
        return _ChunkwiseNumpyHandler()


class LeafWriter:
    """Saves numpy leaves, each as its own Orbax checkpoint: uncompressed zarr chunks of at most
    ``CHUNK_BYTES``, written without copying the leaf."""

    def __init__(self):
        registry = ocp.type_handlers.create_type_handler_registry((np.ndarray, _numpy_handler()))
        options = {"use_ocdbt": False, "type_handler_registry": registry}
        if "use_compression" in inspect.signature(ocp.PyTreeCheckpointHandler).parameters:
            options["use_compression"] = False  # weights barely compress; zstd would cost time and a buffer
        with _quiet_orbax():
            self._checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(**options))

    def write(self, directory: Path, leaf: np.ndarray) -> None:
        args = ocp.args.PyTreeSave({ITEM: leaf}, save_args={ITEM: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES)})
        with _quiet_orbax():
            self._checkpointer.save(directory.absolute(), args=args)


def _return_freed_buffers_to_os() -> None:
    """Makes glibc serve every allocation of 1 MiB or more (tensors, leaves, chunk buffers) by its own
    mmap, returned to the OS when freed. By default glibc raises that threshold up to 32 MiB as it
    goes, and the freed buffers of tensorstore's many threads then stay in per-thread heaps: the
    process grows by about one leaf more than it uses. A no-op elsewhere than glibc."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(ctypes.c_int(-3), ctypes.c_int(1 << 20))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


class LeafReader:
    """Restores leaves saved by ``LeafWriter`` onto a sharding or as numpy."""

    def __init__(self):
        with _quiet_orbax():
            self._checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())

    def _restore(self, directory: Path, target, restore_args):
        if not directory.is_dir():
            raise CheckpointError(f"{directory}: missing param checkpoint")
        try:
            with _quiet_orbax():
                out = self._checkpointer.restore(
                    directory.absolute(), args=ocp.args.PyTreeRestore({ITEM: target}, restore_args={ITEM: restore_args}))
        except CheckpointError:
            raise
        except Exception as e:  # Orbax and tensorstore raise many types for unreadable data
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{directory}: cannot restore ({reason})") from None
        return out[ITEM]

    def read(self, directory: Path, target: jax.ShapeDtypeStruct) -> jax.Array:
        """The leaf as a ``jax.Array`` with ``target``'s shape, dtype (cast on read) and sharding."""
        args = ocp.ArrayRestoreArgs(sharding=target.sharding, dtype=target.dtype, global_shape=target.shape)
        value = self._restore(directory, target, args)
        if value.shape != target.shape:
            raise CheckpointError(f"{directory}: shape {value.shape}, expected {target.shape}")
        return value

    def read_numpy(self, directory: Path, dtype) -> np.ndarray:
        value = self._restore(directory, np.empty(0, dtype), ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype))
        return np.asarray(value, dtype)


def stored_leaves(abstract: dict[tuple, jax.ShapeDtypeStruct], quantization: str | None
                  ) -> dict[tuple, jax.ShapeDtypeStruct]:
    """The leaves a converted checkpoint stores for the flattened float params ``abstract``: the same,
    except that with ``quantization`` each feed-forward weight ``path`` becomes ``path + ("q",)`` (int8)
    and ``path + ("scale",)`` (fp32, the contraction axis dropped)."""
    out = {}
    for path, sds in abstract.items():
        if quantization is not None and is_quantized(path):
            out[path + ("q",)] = jax.ShapeDtypeStruct(sds.shape, jnp.int8)
            out[path + ("scale",)] = jax.ShapeDtypeStruct(sds.shape[:-2] + sds.shape[-1:], jnp.float32)
        else:
            out[path] = sds
    return out


def quantize_leaf(leaf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ExpertsInt8 of a numpy weight ``[..., in, out]``: (q int8, scale fp32), by ``quant.quantize`` one
    ``[in, out]`` matrix at a time, so the extra memory is the int8 leaf plus one matrix. The same values
    as ``load(..., quantize="experts-int8")`` gives for the weight in the same dtype."""
    q = np.empty(leaf.shape, np.int8)
    scale = np.empty(leaf.shape[:-2] + leaf.shape[-1:], np.float32)
    for index in np.ndindex(*leaf.shape[:-2]):
        w = quantize(jnp.asarray(leaf[index]))
        q[index], scale[index] = np.asarray(w.q), np.asarray(w.scale)
    return q, scale


def hf_to_orbax(src: str | Path, dst: str | Path, *, dtype=None, overwrite: bool = False,
                progress: bool = True, quantize: str | None = None) -> Path:
    """Converts the HF checkpoint directory ``src`` into a converted checkpoint at ``dst``.

    ``dtype`` (default: the checkpoint's) is the stored dtype. ``quantize="experts-int8"`` stores every
    MoE expert and dense MLP weight as int8 + fp32 scales (quantized from the weight in ``dtype``) and
    records it in the manifest. Every key and shape is checked before anything is written; the output
    appears at ``dst`` only when complete. Raises ``CheckpointError`` / ``ConfigError`` naming the file
    or key."""
    check_quantize(quantize)
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a directory; expected an HF checkpoint directory")
    if is_converted(src):
        raise CheckpointError(f"{src}: already a converted checkpoint (has {MANIFEST_FILE}); use --to-hf?")
    config = JambaConfig.from_json(src / CONFIG_FILE)
    np_dtype = np.dtype(jnp.dtype(dtype if dtype is not None else config.dtype))
    ckpt = open_hf_checkpoint(src, config)
    check_distinct(src, dst)
    _return_freed_buffers_to_os()
    with atomic_output_dir(dst, overwrite=overwrite) as tmp:
        (tmp / PARAMS_DIR).mkdir()
        writer = LeafWriter()
        total = len(ckpt.nbytes)
        with tqdm(total=sum(ckpt.nbytes.values()), desc="converting", unit="B", unit_scale=True,
                  disable=None if progress else True) as bar:
            done = 0

            def tick(nbytes: int) -> None:
                nonlocal done
                done += 1
                bar.set_postfix_str(f"{done}/{total} tensors", refresh=False)
                bar.update(nbytes)

            for path, leaf in iter_hf_leaves(ckpt, np_dtype, tick):
                if quantize is not None and is_quantized(path):
                    q, scale = quantize_leaf(leaf)
                    del leaf
                    writer.write(tmp / leaf_dir(path + ("q",)), q)
                    writer.write(tmp / leaf_dir(path + ("scale",)), scale)
                    del q, scale
                else:
                    writer.write(tmp / leaf_dir(path), leaf)
                    del leaf
        write_config(src, tmp, np_dtype)
        aux = copy_aux_files(src, tmp)
        floats = {p: jax.ShapeDtypeStruct(shape, np_dtype) for p, (shape, _) in ckpt.leaves.items()}
        stored = stored_leaves(floats, quantize)
        manifest = build_manifest(dtype=np_dtype, source_files=ckpt.source_files, aux_files=aux,
                                  params={p: s.shape for p, s in stored.items()}, quantization=quantize,
                                  param_dtypes={p: s.dtype for p, s in stored.items() if s.dtype != np_dtype})
        _write_json(tmp / MANIFEST_FILE, manifest)  # last: its presence marks a complete checkpoint
    return dst


def restore_params(directory: str | Path, *, dtype=None, mesh: Mesh | None = None,
                   shardings: Any = None) -> tuple[JambaConfig, dict, str | None]:
    """``(config, params, quantization)`` of the converted checkpoint in ``directory`` (``quantization``:
    the manifest's, ``"experts-int8"`` or None). With ``mesh`` and/or
    ``shardings`` each leaf is restored straight into its sharding (see ``placement.leaf_shardings``):
    every device reads only its shard, so no host holds the model.

    ``dtype`` defaults to the stored dtype; other dtypes are cast while reading. A quantized checkpoint
    (manifest ``quantization``) gives ``quant.QuantizedWeight`` feed-forward weights (int8 + fp32 scales,
    whatever ``dtype``), each scale sharded like its weight minus the contraction axis."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    config = JambaConfig.from_json(directory / CONFIG_FILE)
    dtype = jnp.dtype(dtype if dtype is not None else manifest["dtype"])
    abstract = traverse_util.flatten_dict(abstract_params(config, dtype))
    quantization = manifest.get("quantization")
    check_params(directory, manifest, {p: s.shape for p, s in stored_leaves(abstract, quantization).items()})
    reader = LeafReader()
    placement = None
    if mesh is not None or shardings is not None:
        placement = leaf_shardings(abstract, mesh=mesh, shardings=shardings)

    def read(path, sds, sharding):
        if placement is None:
            # Like the HF loader: uncommitted arrays on the default device (jit treats committed ones as
            # a different signature, so the two loaders would not share compilations).
            return jnp.asarray(reader.read_numpy(directory / leaf_dir(path), sds.dtype))
        return reader.read(directory / leaf_dir(path), jax.ShapeDtypeStruct(sds.shape, sds.dtype, sharding=sharding))

    params = {}
    for path, sds in abstract.items():
        sharding = None if placement is None else placement[path]
        if quantization is not None and is_quantized(path):
            parts = stored_leaves({path: sds}, quantization)
            where = quantized_sharding(sharding, sds.ndim) if sharding is not None else QuantizedWeight(None, None)
            params[path] = QuantizedWeight(read(path + ("q",), parts[path + ("q",)], where.q),
                                           read(path + ("scale",), parts[path + ("scale",)], where.scale))
        else:
            params[path] = read(path, sds, sharding)
    return config, traverse_util.unflatten_dict(params), quantization


def _write_json(file: Path, obj) -> None:
    file.write_text(json.dumps(obj, indent=2) + "\n")
