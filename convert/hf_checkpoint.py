"""Reads an HF safetensors checkpoint (one file, or shards with ``model.safetensors.index.json``)
into this project's param pytree, checking every key and shape against ``hf_keys``."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from ..config import JambaConfig
from ..model import abstract_params
from .hf_keys import checkpoint_entries

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that does not match its config: the message names the file or key."""


def tensor_files(directory: Path) -> dict[str, Path]:
    """Maps each tensor key of the checkpoint in ``directory`` to the safetensors file holding it."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{index}: not a valid safetensors index (needs a 'weight_map' object)") from None
        files = {key: directory / name for key, name in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.is_file():
                raise CheckpointError(f"{f}: shard listed in {INDEX_FILE} is missing")
        return files
    single = directory / SINGLE_FILE
    if single.is_file():
        with _open(single) as f:
            return {key: single for key in f.keys()}
    raise CheckpointError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}; is this an HF Jamba checkpoint?")


def _open(path: Path):
    try:
        return safe_open(str(path), framework="np")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None


def load_hf_params(directory: str | Path, config: JambaConfig, dtype=jnp.float32):
    """The params of the HF checkpoint in ``directory`` as a pytree of ``jnp`` arrays in ``dtype``.

    Raises ``CheckpointError`` naming the key on an unexpected, missing or mis-shaped tensor."""
    directory = Path(directory)
    files = tensor_files(directory)
    entries = list(checkpoint_entries(config))
    expected = {e.hf_key for e in entries}
    if config.tie_word_embeddings:
        expected_extra = {"lm_head.weight"}  # some tied checkpoints still store the head; it is ignored
    else:
        expected_extra = set()
    for key in sorted(files):
        if key not in expected and key not in expected_extra:
            raise CheckpointError(f"{files[key]}: unexpected tensor {key!r} for this config "
                                  f"({config.num_hidden_layers} layers); wrong config.json?")
    for e in entries:
        if e.hf_key not in files:
            raise CheckpointError(f"{directory}: missing tensor {e.hf_key!r}")

    np_dtype = np.dtype(jnp.dtype(dtype))
    shapes = traverse_util.flatten_dict(abstract_params(config, dtype))
    buffers = {path: np.empty(leaf.shape, np_dtype) for path, leaf in shapes.items()}
    by_file: dict[Path, list] = {}
    for e in entries:
        by_file.setdefault(files[e.hf_key], []).append(e)

    with tqdm(total=len(entries), desc="loading tensors", unit="tensor", disable=None) as bar:
        for path in sorted(by_file):
            with _open(path) as f:
                for e in by_file[path]:
                    try:
                        tensor = f.get_tensor(e.hf_key)
                    except (SafetensorError, OSError) as err:
                        raise CheckpointError(f"{path}: cannot read {e.hf_key!r} ({err})") from None
                    target = buffers[e.path]
                    hf_shape = e.layout.to_hf(np.empty(target.shape[len(e.index):], np.uint8)).shape
                    if tuple(tensor.shape) != hf_shape:
                        raise CheckpointError(f"{path}: tensor {e.hf_key!r} has shape {tuple(tensor.shape)}, "
                                              f"expected {hf_shape}")
                    target[e.index] = e.layout.to_jax(tensor).astype(np_dtype)
                    bar.update()
    return traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in buffers.items()})
