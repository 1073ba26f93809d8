"""Reads an HF safetensors checkpoint (one file, or shards with ``model.safetensors.index.json``)
into this project's param pytree, checking every key and shape against ``hf_keys``.

``iter_hf_leaves`` streams the checkpoint one param leaf at a time (the loader and the converter
both use it): every file, key, shape and dtype is checked through ``safe_open`` and the file headers
before any tensor data is read; each tensor is then read with one ``np.fromfile`` at its offset
rather than through a memory map, whose pages would count as resident until the file is closed
(that would double the peak memory of a conversion).

``load_hf_params(..., shardings=)`` reads only the parts of each leaf that this process's devices hold
(``read_leaf_region``): in a job of several processes no process reads the whole checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from ..config import JambaConfig
from ..params import abstract_params
from .hf_keys import Entry, checkpoint_entries

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# safetensors dtype -> little-endian numpy dtype
NP_DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
             "BF16": np.dtype(jnp.bfloat16)}


class CheckpointError(ValueError):
    """A checkpoint that does not match its config: the message names the file or key."""


def tensor_files(directory: Path) -> dict[str, Path]:
    """Maps each tensor key of the checkpoint in ``directory`` to the safetensors file holding it."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{index}: not a valid safetensors index (needs a 'weight_map' object)") from None
        if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                       for k, v in weight_map.items()):
            raise CheckpointError(f"{index}: 'weight_map' must map tensor names to file names (strings)")
        files = {key: _shard_path(directory, index, key, name) for key, name in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.is_file():
                raise CheckpointError(f"{f}: shard listed in {INDEX_FILE} is missing")
        return files
    single = directory / SINGLE_FILE
    if single.is_file():
        with _open(single) as f:
            return {key: single for key in f.keys()}
    raise CheckpointError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}; is this an HF Jamba checkpoint?")


def _shard_path(directory: Path, index: Path, key: str, name: str) -> Path:
    """The shard file an index entry names: a plain relative path that stays inside the checkpoint."""
    path = Path(name)
    if not name or path.is_absolute() or ".." in path.parts or \
            not (directory / path).resolve().is_relative_to(directory.resolve()):
        raise CheckpointError(f"{index}: entry {key!r} names {name!r}, not a file inside the checkpoint directory")
    return directory / path


def _open(path: Path):
    try:
        return safe_open(str(path), framework="np")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None


def hf_shape(entry: Entry, leaf_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF tensor shape of ``entry`` whose param leaf has shape ``leaf_shape``."""
    return entry.layout.to_hf(np.empty(leaf_shape[len(entry.index):], np.uint8)).shape


@dataclasses.dataclass(frozen=True)
class HFCheckpoint:
    """A checked HF checkpoint: where each entry's tensor lives and how many bytes it holds."""

    directory: Path
    files: dict[str, Path]       # hf_key -> safetensors file
    leaves: dict[tuple, tuple]   # param path -> (shape, entries filling it), in checkpoint order
    nbytes: dict[str, int]       # hf_key -> bytes on disk
    offsets: dict[Path, dict]    # file -> key -> (byte offset, dtype, shape)

    @property
    def source_files(self) -> list[Path]:
        return sorted(set(self.files.values()))


def open_hf_checkpoint(directory: str | Path, config: JambaConfig) -> HFCheckpoint:
    """Checks the checkpoint in ``directory`` against ``config`` from the file headers alone.

    Raises ``CheckpointError`` naming the file and key on an unexpected, missing, mis-shaped or
    non-float tensor, an unreadable file or a missing shard."""
    directory = Path(directory)
    files = tensor_files(directory)
    entries = list(checkpoint_entries(config))
    expected = {e.hf_key for e in entries}
    # some tied checkpoints still store the head; it is ignored
    ignored = {"lm_head.weight"} if config.tie_word_embeddings else set()
    for key in sorted(files):
        if key not in expected and key not in ignored:
            raise CheckpointError(f"{files[key]}: unexpected tensor {key!r} for this config "
                                  f"({config.num_hidden_layers} layers); wrong config.json?")
    for e in entries:
        if e.hf_key not in files:
            raise CheckpointError(f"{directory}: missing tensor {e.hf_key!r}")

    shapes = {path: leaf.shape for path, leaf in traverse_util.flatten_dict(abstract_params(config)).items()}
    leaves: dict[tuple, tuple] = {}
    for e in entries:
        leaves.setdefault(e.path, (shapes[e.path], []))[1].append(e)
    by_file: dict[Path, list[Entry]] = {}
    for e in entries:
        by_file.setdefault(files[e.hf_key], []).append(e)
    nbytes = {}
    for path in sorted(by_file):
        with _open(path) as f:
            for e in by_file[path]:
                try:
                    header = f.get_slice(e.hf_key)
                except SafetensorError:
                    raise CheckpointError(f"{path}: missing tensor {e.hf_key!r} (listed in {INDEX_FILE})") from None
                shape, dtype = tuple(header.get_shape()), header.get_dtype()
                want = hf_shape(e, shapes[e.path])
                if shape != want:
                    raise CheckpointError(f"{path}: tensor {e.hf_key!r} has shape {shape}, expected {want}")
                if dtype not in NP_DTYPES:
                    raise CheckpointError(f"{path}: tensor {e.hf_key!r} has dtype {dtype}, expected one of "
                                          f"{', '.join(NP_DTYPES)}")
                nbytes[e.hf_key] = NP_DTYPES[dtype].itemsize * int(np.prod(shape))
    offsets = {path: _data_offsets(path) for path in by_file}
    return HFCheckpoint(directory, files, {p: (s, tuple(es)) for p, (s, es) in leaves.items()}, nbytes, offsets)


def _data_offsets(path: Path) -> dict[str, tuple[int, str, tuple[int, ...]]]:
    """``key -> (absolute byte offset, safetensors dtype, shape)`` from the header of a file that
    ``safe_open`` has already validated (u64 little-endian header size, JSON header, data)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    return {key: (8 + size + info["data_offsets"][0], info["dtype"], tuple(info["shape"]))
            for key, info in header.items() if key != "__metadata__"}


def _read_tensor(path: Path, key: str, offsets: dict) -> np.ndarray:
    """One tensor read straight into a fresh array: no memory map, so nothing stays resident."""
    offset, dtype, shape = offsets[key]
    count = int(np.prod(shape))
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = np.fromfile(f, NP_DTYPES[dtype], count)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read {key!r} ({err})") from None
    if data.size != count:
        raise CheckpointError(f"{path}: cannot read {key!r} (file truncated)")
    return data.reshape(shape)


def _check_finite(file: Path, key: str, tensor: np.ndarray) -> None:
    bad = tensor.size - int(np.count_nonzero(np.isfinite(tensor)))
    if bad:
        raise CheckpointError(f"{file}: tensor {key!r} holds {bad:,} NaN/Inf value(s) of {tensor.size:,}; "
                              "refusing it (load(..., allow_nonfinite=True) / jamba convert --allow-nonfinite to accept)")


def iter_hf_leaves(ckpt: HFCheckpoint, dtype, progress: Callable[[int], None] | None = None,
                   allow_nonfinite: bool = False) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    """Yields ``(param path, leaf)`` one leaf at a time: the leaf is a fresh numpy array in ``dtype``
    with its final (stacked, transposed) shape. ``progress(nbytes)`` is called after each tensor. A tensor
    holding NaN or Inf is refused (``CheckpointError`` naming it and the count) unless ``allow_nonfinite``.

    Peak memory is one leaf plus one HF tensor."""
    np_dtype = np.dtype(jnp.dtype(dtype))
    for path, (shape, entries) in ckpt.leaves.items():
        whole = len(entries) == 1 and not entries[0].index
        leaf = None if whole else np.empty(shape, np_dtype)
        for e in entries:
            file = ckpt.files[e.hf_key]
            tensor = _read_tensor(file, e.hf_key, ckpt.offsets[file])
            if not allow_nonfinite:
                _check_finite(file, e.hf_key, tensor)
            if whole:  # no copy when the layout and dtype leave the tensor as it is
                leaf = np.ascontiguousarray(e.layout.to_jax(tensor), dtype=np_dtype)
            else:
                leaf[e.index] = e.layout.to_jax(tensor)  # casts to np_dtype on assignment
            del tensor
            if progress is not None:
                progress(ckpt.nbytes[e.hf_key])
        yield path, leaf
        del leaf  # before the next leaf is allocated


# A box that is not one contiguous run of the file is read through a buffer of at most this many bytes.
STAGE_BYTES = 8 << 20


def _box(index: tuple, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """``index`` (a sharding's tuple of slices, possibly shorter than ``shape``) as unit-step slices with
    explicit bounds."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    out = []
    for s, n in zip(index, shape):
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError(f"shard index {index} has a step; expected contiguous shards")
        out.append(slice(start, stop))
    return tuple(out)


def _readinto(f, out: np.ndarray, where: str) -> None:
    view = out.reshape(-1).view(np.uint8)
    if f.readinto(view) != view.size:
        raise CheckpointError(f"{where} (file truncated)")


def _read_box(f, offset: int, dtype: np.dtype, shape: tuple[int, ...], box: tuple[slice, ...],
              out: np.ndarray, where: str) -> None:
    """``out[...] =`` the ``box`` of the row-major array of ``shape`` at byte ``offset`` of the open file
    ``f``; ``out`` is C-contiguous with the box's shape. Extra memory: at most ``STAGE_BYTES``."""
    rest = shape[1:]
    row = dtype.itemsize * math.prod(rest)
    first = box[0]
    if all(b.start == 0 and b.stop == n for b, n in zip(box[1:], rest)):  # whole rows: one run
        f.seek(offset + first.start * row)
        _readinto(f, out, where)
    elif row > STAGE_BYTES:  # rows too large to stage whole: one row at a time
        for i in range(first.start, first.stop):
            _read_box(f, offset + i * row, dtype, rest, box[1:], out[i - first.start], where)
    else:
        step = max(1, STAGE_BYTES // row)
        for i in range(first.start, first.stop, step):
            n = min(step, first.stop - i)
            f.seek(offset + i * row)
            staged = np.empty((n,) + rest, dtype)
            _readinto(f, staged, where)
            out[i - first.start:i - first.start + n] = staged[(slice(None),) + box[1:]]


def _read_part(ckpt: HFCheckpoint, entry: Entry, region: tuple[slice, ...]) -> np.ndarray:
    """``entry.layout.to_jax(tensor)[region]`` (in the file's dtype), reading only that region's bytes."""
    file = ckpt.files[entry.hf_key]
    offset, dtype, hf_tensor_shape = ckpt.offsets[file][entry.hf_key]
    view = entry.layout.view(hf_tensor_shape)
    perm = entry.layout.perm or tuple(range(len(view)))
    view_box = [slice(None)] * len(view)
    for j, axis in enumerate(perm):  # part axis j is view axis perm[j]
        view_box[axis] = region[j]
    out = np.empty([b.stop - b.start for b in view_box], NP_DTYPES[dtype])
    try:
        with open(file, "rb") as f:
            _read_box(f, offset, NP_DTYPES[dtype], view, tuple(view_box), out, f"{file}: cannot read {entry.hf_key!r}")
    except OSError as err:
        raise CheckpointError(f"{file}: cannot read {entry.hf_key!r} ({err})") from None
    return out.transpose(perm)


def read_leaf_region(ckpt: HFCheckpoint, path: tuple[str, ...], index: tuple, dtype,
                     allow_nonfinite: bool = False) -> np.ndarray:
    """``leaf[index]`` of the param leaf ``path`` as a fresh numpy array in ``dtype``, reading from the
    files only the bytes of that region (``index``: a tuple of slices, as a sharding's
    ``addressable_devices_indices_map`` gives). NaN/Inf in the region is refused as in ``iter_hf_leaves``.

    Extra memory: one entry's part of the region plus ``STAGE_BYTES``."""
    shape, entries = ckpt.leaves[path]
    box = _box(index, shape)
    out = np.empty([b.stop - b.start for b in box], np.dtype(jnp.dtype(dtype)))
    for e in entries:
        stack = box[:len(e.index)]
        if not all(b.start <= i < b.stop for i, b in zip(e.index, stack)):
            continue  # a block or expert this region does not hold
        part = _read_part(ckpt, e, box[len(e.index):])
        if not allow_nonfinite:
            _check_finite(ckpt.files[e.hf_key], e.hf_key, part)
        out[tuple(i - b.start for i, b in zip(e.index, stack))] = part  # casts to dtype on assignment
        del part
    return out


def read_sharded_leaf(ckpt: HFCheckpoint, path: tuple[str, ...], sharding: jax.sharding.Sharding, dtype,
                      allow_nonfinite: bool = False) -> jax.Array:
    """The param leaf ``path`` as a ``jax.Array`` with ``sharding``, built from the regions this process's
    devices hold (each distinct region read once, then copied to the devices that hold it); with devices
    of other processes in ``sharding`` the array is global and this process reads only its part."""
    shape = ckpt.leaves[path][0]
    regions: dict[tuple, list] = {}
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        box = _box(index, shape)
        regions.setdefault(tuple((b.start, b.stop) for b in box), []).append(device)
    shards = []
    for bounds, devices in regions.items():
        block = read_leaf_region(ckpt, path, tuple(slice(*b) for b in bounds), dtype, allow_nonfinite)
        shards.extend(jax.device_put(block, d) for d in devices)
        del block
    return jax.make_array_from_single_device_arrays(shape, sharding, shards)


def load_hf_params(directory: str | Path, config: JambaConfig, dtype=jnp.float32,
                   shardings: dict[tuple[str, ...], jax.sharding.Sharding] | None = None,
                   transform: Callable[[tuple[str, ...], jax.Array], object] | None = None,
                   allow_nonfinite: bool = False):
    """The params of the HF checkpoint in ``directory`` as a pytree of arrays in ``dtype``.

    ``shardings`` (flat ``param path -> Sharding``, see ``placement.leaf_shardings``) places each leaf:
    only the regions this process's devices hold are read (``read_sharded_leaf``). Without it each leaf
    is read whole onto the default device. ``transform(path, array)`` then turns each leaf into the
    stored one (e.g. ExpertsInt8). Raises ``CheckpointError`` naming the key on an unexpected, missing or
    mis-shaped tensor, or one holding NaN/Inf unless ``allow_nonfinite`` (a process checks the regions it
    reads; together the processes read every element)."""
    ckpt = open_hf_checkpoint(directory, config)
    transform = transform or (lambda path, leaf: leaf)
    params = {}
    with tqdm(total=len(ckpt.nbytes), desc="loading tensors", unit="tensor", disable=None) as bar:
        if shardings is not None:
            for path, (_, entries) in ckpt.leaves.items():
                params[path] = transform(path, read_sharded_leaf(ckpt, path, shardings[path], dtype,
                                                                 allow_nonfinite))
                bar.update(len(entries))
        else:
            for path, leaf in iter_hf_leaves(ckpt, dtype, progress=lambda n: bar.update(),
                                              allow_nonfinite=allow_nonfinite):
                params[path] = transform(path, jnp.asarray(leaf))
                del leaf
    return traverse_util.unflatten_dict(params)
