"""Converted checkpoints: HF safetensors -> one Orbax checkpoint of all params, and back into arrays.

A converted directory (manifest ``format_version`` 2) holds::

    manifest.json                  format, versions, dtype, source files, every stored leaf's shape,
                                   dtype and checksum (``checksum.py``)
    config.json                    the HF config, its dtype set to the stored dtype
    tokenizer.json, ...            copied from the source (see ``manifest.AUX_FILES``)
    params/                        ONE Orbax PyTree checkpoint: the nested param dict, e.g.
                                   {"blocks": {"layer_0": {"mamba": {"A_log": ...}}}, ...}

``orbax.checkpoint.v1.load(DIR / "params")`` (or ``load_pytree``) restores it without jamba_jax.

Quantized (``jamba convert --quantize experts-int8``, manifest ``"quantization": "experts-int8"``): each
feed-forward weight ``{..., "gate_proj": w}`` is stored as ``{..., "gate_proj": {"q": int8, "scale": fp32}}``
(the scale without the contraction axis) and restored as a ``quant.QuantizedWeight``.

The converter writes the checkpoint leaf by leaf with Orbax's partial saving (``partial.save`` once per group
of consecutive leaves, ``partial.finalize`` at the end), so host memory peaks near the largest leaf (e.g. a stacked expert
kernel ``[num_blocks, experts, hidden, intermediate]``), not the model. The loader restores the whole tree in
one ``orbax.checkpoint.v1.load`` call into an abstract tree that carries each leaf's sharding: every device reads only
the chunks of its shard. Version-1 checkpoints (one Orbax checkpoint per leaf, ``params/<a.b.c>/``) are
still read, by ``LeafReader``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import itertools
import json
import logging
import math
import threading
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from flax import traverse_util
from jax.sharding import Mesh
from orbax.checkpoint import v1 as ocp_v1
from tqdm.auto import tqdm

from ..config import JambaConfig
from ..params import abstract_params, is_quantized
from ..quant import QuantizedWeight, check_quantize, quantize, quantized_sharding
from .atomic_dir import atomic_output_dir, check_distinct, is_empty_dir
from .checksum import array_checksum, checksum
from .hf_checkpoint import CheckpointError, iter_hf_leaves, open_hf_checkpoint
from .manifest import (CONFIG_FILE, MANIFEST_FILE, PARAMS_DIR, build_manifest, check_params, copy_aux_files,
                       is_converted, leaf_dir, leaf_key, read_manifest, write_config)
from .placement import leaf_shardings

ITEM = "value"  # format version 1: each leaf's checkpoint is {"value": leaf}
# Orbax chunks each stored array into zarr chunks of at most this many bytes: a device restoring a shard
# reads only the chunks it covers, and tensorstore stages one chunk at a time, not the leaf.
CHUNK_BYTES = 4 << 20
# Chunks written concurrently (each staged by tensorstore). 4 did not measurably speed up the `large`
# preset on 2 cores (save 14-16 s either way) and raised the peak from 1.15x to 1.3x the largest leaf.
CHUNKS_IN_FLIGHT = 1
# Consecutive leaves are saved together, up to this many bytes per ``partial.save`` (None: the largest
# leaf's bytes, at least ``MIN_GROUP_BYTES``; 0: one leaf per save). Each call costs ~90 ms of Orbax
# bookkeeping (a pending directory, metadata, an OCDBT manifest, a merge at ``finalize``), and each one
# reads the metadata of all the saves before it, so the calls cost quadratically in their number. A group
# is written before the next leaf is read whenever that leaf would not fit: host memory holds at most
# the group budget (the largest leaf) of leaves, as with one leaf per save.
GROUP_BYTES: int | None = None
MIN_GROUP_BYTES = 16 << 20


@contextlib.contextmanager
def _quiet_orbax():
    """Orbax logs INFO/WARNING lines through absl on every save; a CLI run keeps only errors."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(max(level, logging.ERROR))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _orbax_context(*, partial_load: bool = False, read_bytes: int | None = None) -> ocp_v1.Context:
    ctx = ocp_v1.Context()
    saving = ctx.array.saving
    saving.use_compression = False  # weights barely compress; zstd would cost time and a buffer per chunk
    saving.storage_options.chunk_byte_size = CHUNK_BYTES
    # The leaf is not touched while Orbax writes it (save() blocks), so no defensive copy of it.
    ctx.memory.deepcopy_host_arrays = False
    if partial_load:
        ctx.pytree.loading.partial_load = True
    if read_bytes is not None:
        ctx.memory.read_concurrent_bytes = read_bytes
    return ctx


# Orbax reads every leaf of a restore at once: its staging grew with the checkpoint (12-15% of what a
# process read, at 180 and 350 MB). A restore's reads in flight are capped at this fraction of the bytes
# the process reads, at most READ_STAGING_MAX, and never below the largest leaf: Orbax reserves a leaf's
# global bytes before reading any part of it, and refuses a leaf that is not below the cap.
READ_STAGING_FRACTION = 1 / 16
READ_STAGING_MAX = 1 << 30


def read_staging_bytes(abstract: dict[tuple, Any]) -> int:
    """The cap on a restore's reads in flight for the leaves ``abstract`` (as ``restore_tree`` takes them):
    ``READ_STAGING_FRACTION`` of the bytes this process reads (its leaves' distinct addressable shards),
    at most ``READ_STAGING_MAX``, and above the largest leaf."""
    largest = total = 0
    for leaf in abstract.values():
        itemsize = np.dtype(leaf.dtype).itemsize
        largest = max(largest, math.prod(leaf.shape) * itemsize)
        sharding = getattr(leaf, "sharding", None)
        if sharding is None:  # a host leaf, read whole
            shapes = [leaf.shape]
        else:
            distinct = {tuple((s.start, s.stop) for s in index)
                        for index in sharding.addressable_devices_indices_map(leaf.shape).values()}
            shapes = [index_shape(tuple(slice(*bounds) for bounds in index), leaf.shape) for index in distinct]
        total += sum(math.prod(shape) for shape in shapes) * itemsize
    return max(largest + 1, min(int(total * READ_STAGING_FRACTION), READ_STAGING_MAX))  # Orbax: request < cap


def index_shape(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of ``array[index]`` for an array of ``shape`` (``index``: slices, as shardings give them)."""
    return tuple(len(range(*s.indices(n))) for s, n in zip(index, shape)) + tuple(shape[len(index):])


def chunk_regions(shape: tuple[int, ...], chunk: tuple[int, ...]):
    """The index of every chunk of an array of ``shape`` split into ``chunk``-shaped blocks."""
    starts = [range(0, n, c) for n, c in zip(shape, chunk)]
    for corner in itertools.product(*starts):
        yield tuple(slice(i, min(i + c, n)) for i, c, n in zip(corner, chunk, shape))


# Tensorstore fsyncs every file write by default (its ``file_io_sync`` context resource); under OCDBT that
# is two fsyncs per zarr chunk (the data, then the database's manifest), ~4 per MiB at 4 MiB chunks. The
# converter writes without them and makes the whole output durable once, before it is renamed into place
# (``atomic_dir.sync_tree``), the data mostly written back by the kernel meanwhile. Eight 128 MiB leaves
# saved one by one, then flushed: 5.7 s against 9.2 s with per-chunk fsyncs (medians of 3, alternating).
_UNSYNCED = {"file_io_sync": False}
_unsynced_contexts: dict[int, tuple[ts.Context, ts.Context]] = {}  # id(Orbax's context) -> (it, child)


def _unsynced(ts_context: ts.Context) -> ts.Context:
    """A child of Orbax's tensorstore context (sharing its resources) whose file writes are not fsynced;
    one per parent, so that the arrays of one save share one OCDBT database handle."""
    held = _unsynced_contexts.get(id(ts_context))
    if held is None:
        held = _unsynced_contexts[id(ts_context)] = (ts_context, ts.Context(_UNSYNCED, ts_context))
    return held[1]


async def _write_chunkwise(self, value: np.ndarray, tspec, ts_context):
    """Orbax's numpy write (``NumpyHandler._open_and_write``), ``CHUNKS_IN_FLIGHT`` zarr chunks at a time,
    without fsyncs."""
    t = await ts.open(ts.Spec(tspec), create=True, open=True, context=_unsynced(ts_context))
    chunk = tuple(t.chunk_layout.write_chunk.shape)
    regions = list(chunk_regions(value.shape, chunk))
    for i in range(0, len(regions), CHUNKS_IN_FLIGHT):
        await asyncio.gather(*(t[r].write(value[r], can_reference_source_data_indefinitely=True)
                               for r in regions[i:i + CHUNKS_IN_FLIGHT]))


_patch_lock = threading.Lock()


@contextlib.contextmanager
def _chunkwise_numpy_writes():
    """While saving, Orbax writes each numpy leaf one chunk at a time.

    Still needed (measured with Orbax 0.12.8, uncompressed, no defensive copy, 16 MiB chunks; peak RSS
    growth over six leaves saved one by one with ``partial.save``, / one leaf): Orbax's single tensorstore
    write of a multi-chunk array stages every chunk before storing any, 2.5x for 64 MiB leaves and 2.75x
    for 256 MiB ones; chunk by chunk 2.0x and 1.25x. Without chunks (one chunk per leaf) a plain save
    stays at 1.0x, but then a sharded restore decodes the whole leaf for every shard (2.25x a 256 MiB leaf
    over 8 devices, against 1.23x chunked), defeating "each device reads only its shard". Orbax v1 has no
    public hook for a custom numpy leaf handler under partial saving, so the method of its v0
    ``NumpyHandler`` (which v1's numpy leaf handler instantiates) is swapped for the duration of a save."""
    handler = ocp.type_handlers.NumpyHandler
    with _patch_lock:
        original = handler.__dict__.get("_open_and_write")
        handler._open_and_write = _write_chunkwise
        try:
            yield
        finally:
            _unsynced_contexts.clear()
            if original is None:
                del handler._open_and_write
            else:
                handler._open_and_write = original


def _glibc(function: str, *args) -> None:
    """Calls the C library's ``function`` (a glibc memory tuning call); a no-op where there is none."""
    try:
        getattr(ctypes.CDLL(None), function)(*args)
    except (OSError, AttributeError):
        pass


def _return_freed_buffers_to_os() -> None:
    """Makes glibc serve every allocation of 1 MiB or more (tensors, leaves, chunk buffers) by its own
    mmap, returned to the OS when freed. By default glibc raises that threshold up to 32 MiB as it goes,
    and the freed buffers of tensorstore's many threads then stay in per-thread heaps.

    Still needed with partial saving (measured, ``benchmarks/convert_memory.py --preset test``: peak RSS
    growth 2.99x the largest leaf without it, 2.05x with it)."""
    _glibc("mallopt", ctypes.c_int(-3), ctypes.c_int(1 << 20))  # M_MMAP_THRESHOLD


def _trim_heaps() -> None:
    """Hands the free memory of glibc's heaps back to the OS (``malloc_trim``): what tensorstore's threads
    freed while writing a group stays in their per-thread heaps otherwise, and how much depends on which
    thread ran where."""
    _glibc("malloc_trim", ctypes.c_size_t(0))


def group_budget(leaf_bytes) -> int:
    """Bytes of leaves saved per ``partial.save`` for a model whose leaves have ``leaf_bytes`` bytes."""
    if GROUP_BYTES is not None:
        return GROUP_BYTES
    return max(MIN_GROUP_BYTES, max(leaf_bytes, default=0))


class LeafWriter:
    """Writes numpy leaves into the single Orbax checkpoint ``directory`` (partial saving), a group of
    leaves per ``partial.save``; ``finalize`` makes it a complete checkpoint (an atomic rename inside the
    output directory)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory).absolute()
        self._pending: dict[tuple[str, ...], np.ndarray] = {}

    @property
    def pending_bytes(self) -> int:
        return sum(a.nbytes for a in self._pending.values())

    def add(self, path: tuple[str, ...], leaf: np.ndarray) -> None:
        """Holds ``leaf`` until the next ``flush``."""
        self._pending[path] = leaf

    def flush(self) -> None:
        """Writes the held leaves, if any, and lets them go."""
        if self._pending:
            leaves, self._pending = self._pending, {}
            self.write(leaves)
            del leaves
            _trim_heaps()

    def write(self, leaves: dict[tuple[str, ...], np.ndarray]) -> None:
        """One ``partial.save`` of the leaves ``path -> array`` (disjoint from those already written)."""
        with _quiet_orbax(), _orbax_context(), _chunkwise_numpy_writes():
            ocp_v1.partial.save(self.directory, traverse_util.unflatten_dict(leaves))

    def finalize(self) -> None:
        with _quiet_orbax(), _orbax_context():
            ocp_v1.partial.finalize(self.directory)


def _orbax_error(where, e: Exception) -> CheckpointError:
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return CheckpointError(f"{where}: cannot restore ({reason})")


def restore_tree(directory: Path, abstract: dict[tuple, Any], *, partial: bool = False) -> dict[tuple, Any]:
    """The leaves ``abstract`` (flat ``path -> jax.ShapeDtypeStruct with a sharding`` (a ``jax.Array``) or
    ``np.ndarray`` (numpy; only its shape and dtype matter)) restored from the Orbax checkpoint ``directory``
    in one ``orbax.checkpoint.v1.load`` call, with at most ``read_staging_bytes`` in flight; ``partial``:
    ``abstract`` is a subset of the stored leaves."""
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: missing params checkpoint")
    try:
        with _quiet_orbax(), _orbax_context(partial_load=partial, read_bytes=read_staging_bytes(abstract)):
            out = ocp_v1.load(directory.absolute(), traverse_util.unflatten_dict(abstract))
    except CheckpointError:
        raise
    except Exception as e:  # Orbax and tensorstore raise many types for unreadable data
        raise _orbax_error(directory, e) from None
    return traverse_util.flatten_dict(out)


def stored_metadata(directory: Path) -> dict[tuple, tuple[tuple[int, ...], np.dtype]]:
    """``path -> (shape, dtype)`` of every leaf of the Orbax checkpoint ``directory``, from its metadata."""
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: missing params checkpoint")
    try:
        with _quiet_orbax():
            meta = ocp_v1.pytree_metadata(directory.absolute()).metadata
    except Exception as e:
        raise _orbax_error(directory, e) from None
    flat = traverse_util.flatten_dict(meta, is_leaf=lambda _, v: not isinstance(v, dict))
    return {p: (tuple(m.shape), np.dtype(m.dtype)) for p, m in flat.items()}


def check_stored(directory: Path, manifest: dict, paths) -> None:
    """The Orbax checkpoint holds exactly ``paths``, each with the shape and dtype of its manifest entry:
    a leaf replaced by one of another shape or dtype is refused by name before anything is read."""
    params_dir = directory / manifest.get("params_dir", PARAMS_DIR)
    stored = stored_metadata(params_dir)
    for path in paths:
        entry = manifest["params"][leaf_key(path)]
        if path not in stored:
            raise CheckpointError(f"{params_dir}: missing param {leaf_key(path)!r}")
        shape, dtype = stored[path]
        if shape != tuple(entry["shape"]):
            raise CheckpointError(f"{params_dir}: param {leaf_key(path)!r} has shape {shape}, "
                                  f"expected {tuple(entry['shape'])} (manifest)")
        if dtype.name != entry["dtype"]:
            raise CheckpointError(f"{params_dir}: param {leaf_key(path)!r} has dtype {dtype.name}, "
                                  f"expected {entry['dtype']} (manifest)")
    extra = sorted(set(stored) - set(paths))
    if extra:
        raise CheckpointError(f"{params_dir}: unexpected param {leaf_key(extra[0])!r}")


def verify_checksum(directory: Path, manifest: dict, path: tuple, value, got: str | None = None) -> None:
    """``value`` (numpy or a ``jax.Array`` in the stored dtype) has the checksum the manifest recorded;
    ``got``: its checksum already computed (``distributed.job_checksums`` for a leaf spread over processes)."""
    want = manifest["params"][leaf_key(path)].get("checksum")
    got = got if got is not None else array_checksum(value)
    if want is not None and got is not None and got != want:
        raise CheckpointError(f"{directory / manifest.get('params_dir', PARAMS_DIR)}: param {leaf_key(path)!r} "
                              f"fails its checksum (stored data differ from the conversion's; swapped or "
                              f"corrupted?)")


class LeafReader:
    """Format version 1: restores the per-leaf Orbax checkpoints (``params/<a.b.c>/``, ``{"value": leaf}``)
    onto a sharding or as numpy."""

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


def is_previous_conversion(directory: Path) -> bool:
    """What ``--overwrite`` may replace: an empty directory or a converted checkpoint."""
    return is_empty_dir(directory) or is_converted(directory)


def hf_to_orbax(src: str | Path, dst: str | Path, *, dtype=None, overwrite: bool = False,
                progress: bool = True, quantize: str | None = None, allow_nonfinite: bool = False) -> Path:
    """Converts the HF checkpoint directory ``src`` into a converted checkpoint at ``dst``.

    ``dtype`` (default: the checkpoint's) is the stored dtype. ``quantize="experts-int8"`` stores every
    MoE expert and dense MLP weight as int8 + fp32 scales (quantized from the weight in ``dtype``) and
    records it in the manifest. Every key and shape is checked before anything is written; the output
    appears at ``dst`` only when complete (see ``atomic_dir``: one writer at a time, ``overwrite`` replaces
    only an empty directory or a previous conversion). Raises ``CheckpointError`` / ``ConfigError``
    naming the file or key."""
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
    with atomic_output_dir(dst, overwrite=overwrite, replaceable=is_previous_conversion) as tmp:
        writer = LeafWriter(tmp / PARAMS_DIR)
        entries: dict[tuple, dict] = {}
        total = len(ckpt.nbytes)
        with tqdm(total=sum(ckpt.nbytes.values()), desc="converting", unit="B", unit_scale=True,
                  disable=None if progress else True) as bar:
            done = 0

            def tick(nbytes: int) -> None:
                nonlocal done
                done += 1
                bar.set_postfix_str(f"{done}/{total} tensors", refresh=False)
                bar.update(nbytes)

            order = list(ckpt.leaves)
            upcoming = dict(zip(order, order[1:]))  # each source leaf's successor in read order
            leaf_bytes = {p: np_dtype.itemsize * math.prod(shape) for p, (shape, _) in ckpt.leaves.items()}
            budget = group_budget(leaf_bytes.values())

            def write(path, leaf):
                entries[path] = {"shape": leaf.shape, "dtype": leaf.dtype, "checksum": checksum(leaf)}
                writer.add(path, leaf)

            for path, leaf in iter_hf_leaves(ckpt, np_dtype, tick, allow_nonfinite=allow_nonfinite):
                if quantize is not None and is_quantized(path):
                    q, scale = quantize_leaf(leaf)
                    del leaf
                    write(path + ("q",), q)
                    write(path + ("scale",), scale)
                    del q, scale
                else:
                    write(path, leaf)
                    del leaf
                after = upcoming.get(path)
                if after is None or writer.pending_bytes + leaf_bytes[after] > budget:
                    writer.flush()  # before the next leaf is read
            writer.flush()
        writer.finalize()
        write_config(src, tmp, np_dtype)
        aux = copy_aux_files(src, tmp)
        manifest = build_manifest(dtype=np_dtype, source_files=ckpt.source_files, aux_files=aux,
                                  params=entries, quantization=quantize)
        _write_json(tmp / MANIFEST_FILE, manifest)  # last: its presence marks a complete checkpoint
    return dst


def checked_manifest(directory: Path, config: JambaConfig) -> tuple[dict, dict[tuple, jax.ShapeDtypeStruct]]:
    """The manifest of ``directory`` checked against ``config`` and against the Orbax checkpoint's own
    metadata (every stored leaf's shape and dtype), and the stored leaves ``path -> ShapeDtypeStruct``."""
    manifest = read_manifest(directory)
    stored_dtype = np.dtype(manifest["dtype"])
    if np.dtype(jnp.dtype(config.dtype)) != stored_dtype:
        raise CheckpointError(f"{directory / CONFIG_FILE}: dtype {config.dtype}, but {MANIFEST_FILE} says "
                              f"{stored_dtype.name}")
    abstract = traverse_util.flatten_dict(abstract_params(config, stored_dtype))
    stored = stored_leaves(abstract, manifest.get("quantization"))
    check_params(directory, manifest, {p: s.shape for p, s in stored.items()},
                 {p: s.dtype for p, s in stored.items()})
    if manifest["format_version"] >= 2:
        check_stored(directory, manifest, stored)
    return manifest, stored


def restore_params(directory: str | Path, *, dtype=None, mesh: Mesh | None = None,
                   shardings: Any = None, verify: bool = True) -> tuple[JambaConfig, dict, str | None]:
    """``(config, params, quantization)`` of the converted checkpoint in ``directory`` (``quantization``:
    the manifest's, ``"experts-int8"`` or None). With ``mesh`` and/or
    ``shardings`` each leaf is restored straight into its sharding (see ``placement.leaf_shardings``):
    every device reads only its shard, so no host holds the model.

    ``dtype`` defaults to the stored dtype; other dtypes are cast while reading (with ``verify``: after
    checking the stored values). A quantized checkpoint (manifest ``quantization``) gives
    ``quant.QuantizedWeight`` feed-forward weights (int8 + fp32 scales, whatever ``dtype``), each scale
    sharded like its weight minus the contraction axis.

    Every leaf's shape and dtype are checked against the manifest and ``config.json`` (and, format 2,
    the Orbax metadata) before anything is read; ``verify`` (format 2) also checks every leaf's checksum
    after reading it. A mismatch raises a one-line ``CheckpointError`` naming the leaf."""
    directory = Path(directory)
    config = JambaConfig.from_json(directory / CONFIG_FILE)
    manifest, stored = checked_manifest(directory, config)
    dtype = jnp.dtype(dtype if dtype is not None else manifest["dtype"])
    abstract = traverse_util.flatten_dict(abstract_params(config, dtype))
    quantization = manifest.get("quantization")
    placement = None
    if mesh is not None or shardings is not None:
        placement = leaf_shardings(abstract, mesh=mesh, shardings=shardings)
    # the stored leaves (q and scale for a quantized weight): their sharding, and the dtype to read them in
    targets: dict[tuple, tuple[Any, Any]] = {}
    for path, sds in abstract.items():
        sharding = None if placement is None else placement[path]
        if quantization is not None and is_quantized(path):
            where = quantized_sharding(sharding, sds.ndim) if sharding is not None else QuantizedWeight(None, None)
            targets[path + ("q",)] = (where.q, stored[path + ("q",)].dtype)
            targets[path + ("scale",)] = (where.scale, stored[path + ("scale",)].dtype)
        else:
            targets[path] = (sharding, dtype)
    if manifest["format_version"] < 2:
        values = _restore_v1(directory, stored, targets)
    else:
        check = verify
        # With verify, leaves are read in their stored dtype (the checksum is of the stored bits), then cast.
        read_as = {p: (sh, stored[p].dtype if check else dt) for p, (sh, dt) in targets.items()}
        abstract_tree = {p: np.empty(stored[p].shape, dt) if sh is None else
                         jax.ShapeDtypeStruct(stored[p].shape, dt, sharding=sh) for p, (sh, dt) in read_as.items()}
        values = restore_tree(directory / manifest.get("params_dir", PARAMS_DIR), abstract_tree)
        sums = {}
        if check and jax.process_count() > 1:  # no process holds the leaves split over processes whole
            from ..distributed import job_checksums

            sums = job_checksums({p: values[p] for p, (sh, _) in targets.items() if sh is not None})
        # A host leaf's checksum runs on a second thread while the leaf is copied into its jax array
        # (numpy's reductions and the copy both release the GIL): the check then costs little wall time.
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as summer:
            for p, (sh, dt) in targets.items():
                v = values[p]
                pending = summer.submit(array_checksum, v) if check and p not in sums else None
                if check and v.dtype != dt:
                    v = v.astype(dt)
                if sh is None:
                    # Like the HF loader: uncommitted arrays on the default device (jit treats committed ones
                    # as a different signature, so the two loaders would not share compilations).
                    v = jnp.asarray(v)
                if check:
                    verify_checksum(directory, manifest, p, values[p], pending.result() if pending else sums[p])
                values[p] = v  # the numpy leaf is freed as its array replaces it: peak model + one leaf
    params = {}
    for path in abstract:
        if quantization is not None and is_quantized(path):
            params[path] = QuantizedWeight(values.pop(path + ("q",)), values.pop(path + ("scale",)))
        else:
            params[path] = values.pop(path)
    return config, traverse_util.unflatten_dict(params), quantization


def _restore_v1(directory: Path, stored, targets) -> dict[tuple, Any]:
    """Format version 1: one Orbax checkpoint per leaf, read one at a time (no checksums to verify)."""
    reader = LeafReader()
    out = {}
    for p, (sharding, dt) in targets.items():
        if sharding is None:
            out[p] = jnp.asarray(reader.read_numpy(directory / leaf_dir(p), dt))
        else:
            out[p] = reader.read(directory / leaf_dir(p), jax.ShapeDtypeStruct(stored[p].shape, dt, sharding=sharding))
    return out


def _write_json(file: Path, obj) -> None:
    file.write_text(json.dumps(obj, indent=2) + "\n")
