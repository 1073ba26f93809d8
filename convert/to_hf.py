"""Converted checkpoint -> HF safetensors (``model-0000i-of-0000n.safetensors`` + index), leaf by leaf.

Tensors are written in param-leaf order (not layer order; HF loaders read the index), so one leaf
is restored at a time; host memory peaks at one leaf plus one output shard (``max_shard_size``)."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from ..config import JambaConfig
from ..params import abstract_params
from .atomic_dir import atomic_output_dir, check_distinct, is_empty_dir
from .hf_checkpoint import INDEX_FILE, SINGLE_FILE, CheckpointError, hf_shape, tensor_files
from .hf_keys import Entry, checkpoint_entries
from .manifest import CONFIG_FILE, PARAMS_DIR, copy_aux_files, leaf_dir, read_manifest, write_config
from .orbax_checkpoint import LeafReader, checked_manifest, restore_tree, verify_checksum

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9


def plan_shards(leaves: dict[tuple, list[Entry]], shapes: dict[tuple, tuple[int, ...]], itemsize: int,
                max_shard_bytes: int) -> list[list[str]]:
    """HF keys per output shard, in leaf order, each shard at most ``max_shard_bytes`` unless one
    tensor alone is larger."""
    shards: list[list[str]] = [[]]
    size = 0
    for path, entries in leaves.items():
        for e in entries:
            nbytes = itemsize * int(np.prod(hf_shape(e, shapes[path])))
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(e.hf_key)
            size += nbytes
    return shards


def shard_names(n: int) -> list[str]:
    return [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def is_hf_checkpoint_or_empty(directory: Path) -> bool:
    """What ``--to-hf --overwrite`` may replace: an empty directory or an HF checkpoint."""
    if is_empty_dir(directory):
        return True
    try:
        tensor_files(directory)
    except CheckpointError:
        return False
    return (directory / CONFIG_FILE).is_file()


def orbax_to_hf(src: str | Path, dst: str | Path, *, dtype=None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                overwrite: bool = False, progress: bool = True, verify: bool = True) -> Path:
    """Writes the converted checkpoint ``src`` as an HF checkpoint directory ``dst`` (safetensors
    shards + ``model.safetensors.index.json`` when there are several, config.json, tokenizer files).

    ``dtype`` defaults to the stored dtype. Every leaf's shape and dtype are checked against the manifest
    (and its checksum, unless ``verify=False``). The output appears at ``dst`` only when complete."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a directory; expected a converted checkpoint directory")
    manifest = read_manifest(src)
    if manifest.get("quantization") is not None:
        raise CheckpointError(f"{src}: a {manifest['quantization']} checkpoint (int8 feed-forward weights) cannot be "
                              "written as HF safetensors; convert the HF source again without --quantize")
    config = JambaConfig.from_json(src / CONFIG_FILE)
    np_dtype = np.dtype(jnp.dtype(dtype if dtype is not None else manifest["dtype"]))
    shapes = {p: s.shape for p, s in traverse_util.flatten_dict(abstract_params(config)).items()}
    manifest, stored = checked_manifest(src, config)
    check_distinct(src, dst)
    leaves: dict[tuple, list[Entry]] = {}
    for e in checkpoint_entries(config):
        leaves.setdefault(e.path, []).append(e)
    shards = plan_shards(leaves, shapes, np_dtype.itemsize, max_shard_bytes)
    names = shard_names(len(shards))
    file_of = {key: name for name, keys in zip(names, shards) for key in keys}
    total_bytes = 0

    def read_leaf(path) -> np.ndarray:
        if manifest["format_version"] < 2:
            return reader.read_numpy(src / leaf_dir(path), np_dtype)
        # one leaf of the single Orbax checkpoint (partial restore), in its stored dtype when verifying
        leaf = restore_tree(src / manifest.get("params_dir", PARAMS_DIR),
                            {path: np.empty(stored[path].shape, stored[path].dtype if verify else np_dtype)},
                            partial=True)[path]
        if verify:
            verify_checksum(src, manifest, path, leaf)
        return np.asarray(leaf, np_dtype)

    with atomic_output_dir(dst, overwrite=overwrite, replaceable=is_hf_checkpoint_or_empty) as tmp:
        reader = LeafReader()
        pending: dict[str, np.ndarray] = {}
        shard = 0
        with tqdm(total=len(file_of), desc="writing HF", unit="tensor", disable=None if progress else True) as bar:
            for path, entries in leaves.items():
                leaf = read_leaf(path)
                if leaf.shape != shapes[path]:
                    raise CheckpointError(f"{src}: param {'/'.join(path)!r} has shape {leaf.shape}, "
                                          f"expected {shapes[path]}")
                for e in entries:
                    pending[e.hf_key] = np.ascontiguousarray(e.layout.to_hf(leaf[e.index]))
                    total_bytes += pending[e.hf_key].nbytes
                    bar.update()
                    if len(pending) == len(shards[shard]):
                        save_file(pending, str(tmp / names[shard]), metadata={"format": "pt"})
                        pending, shard = {}, shard + 1
                del leaf
        if len(names) > 1:
            index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(file_of.items()))}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        write_config(src, tmp, np_dtype)
        copy_aux_files(src, tmp)
    return dst


def parse_size(text: str) -> int:
    """``"5GB"`` -> 5e9, ``"200MiB"`` -> 200 * 2**20, ``"1000"`` -> 1000 (bytes)."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    t = text.strip().upper()
    number = t.rstrip("KMGTIB")
    unit = t[len(number):]
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"invalid size {text!r}; use e.g. 5GB, 500MB, 200MiB") from None
    if unit not in units or value <= 0:
        raise ValueError(f"invalid size {text!r}; use e.g. 5GB, 500MB, 200MiB")
    return int(value * units[unit])
