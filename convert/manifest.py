"""The manifest of a converted checkpoint (``manifest.json``) and the files copied beside the weights.

A directory is a converted checkpoint iff it holds a manifest with ``"format": FORMAT``; the manifest
is the last file written, so a partial output never looks like one. Importing this module does not
import Orbax.

``format_version`` 2 (this version writes): ``params/`` is ONE Orbax PyTree checkpoint of the nested
param dict; every stored leaf's manifest entry has its ``shape``, ``dtype`` and ``checksum``
(``checksum.py``). Version 1 (still read): one Orbax checkpoint per leaf under ``params/<path joined
by ".">`` (the entry's ``dir``), ``dtype`` only where it differs from the manifest's, no checksum.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ..quant import QUANTIZE_MODES
from .hf_checkpoint import CheckpointError

MANIFEST_FILE = "manifest.json"
CONFIG_FILE = "config.json"
FORMAT = "jamba_jax.orbax"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
PARAMS_DIR = "params"
# Copied verbatim between HF and converted checkpoints when present.
AUX_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
             "added_tokens.json", "generation_config.json", "chat_template.jinja", "chat_template.json")


def leaf_key(path: tuple[str, ...]) -> str:
    """``("blocks", "layer_0", "mamba", "A_log")`` -> ``"blocks/layer_0/mamba/A_log"``."""
    return "/".join(path)


def leaf_dir(path: tuple[str, ...]) -> str:
    """Format version 1: the Orbax checkpoint of a leaf, relative to the converted directory."""
    return f"{PARAMS_DIR}/{'.'.join(path)}"


def is_converted(directory: str | Path) -> bool:
    return (Path(directory) / MANIFEST_FILE).is_file()


def build_manifest(*, dtype: np.dtype, source_files: list[Path], params: dict[tuple, dict[str, Any]],
                   aux_files: list[str], quantization: str | None = None) -> dict[str, Any]:
    """``params`` maps each stored leaf path to its ``{"shape", "dtype", "checksum"}``."""
    import jamba_jax  # not at import time: this module is imported while jamba_jax initialises

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "jamba_jax_version": jamba_jax.__version__,
        "dtype": np.dtype(dtype).name,
        "quantization": quantization,
        "source": {"format": "hf_safetensors",
                   "files": [{"name": f.name, "bytes": f.stat().st_size} for f in source_files]},
        "params_dir": PARAMS_DIR,
        "params": {leaf_key(p): {"shape": list(e["shape"]), "dtype": np.dtype(e["dtype"]).name,
                                 "checksum": e["checksum"]}
                   for p, e in params.items()},
        "aux_files": aux_files,
    }


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The checked manifest of the converted checkpoint in ``directory``."""
    file = Path(directory) / MANIFEST_FILE
    try:
        manifest = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing; not a converted jamba_jax checkpoint") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{file}: not a {FORMAT} manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version not in READABLE_VERSIONS:
        raise CheckpointError(f"{file}: format_version {version!r} is not supported (this jamba_jax reads "
                              f"up to {FORMAT_VERSION}); upgrade jamba_jax")
    if manifest.get("quantization") is not None and manifest["quantization"] not in QUANTIZE_MODES:
        raise CheckpointError(f"{file}: quantization {manifest['quantization']!r} is not supported")
    for field in ("dtype", "params"):
        if field not in manifest:
            raise CheckpointError(f"{file}: no {field!r} field")
    return manifest


def check_params(directory: Path, manifest: dict, shapes: dict[tuple, tuple[int, ...]],
                 dtypes: dict[tuple, Any] | None = None) -> None:
    """Every param of the config is in the manifest with its shape (and, given ``dtypes``, its stored
    dtype: a version-1 entry without one is in the manifest's ``dtype``), and nothing else is."""
    listed = manifest["params"]
    file = directory / MANIFEST_FILE
    for path, shape in shapes.items():
        entry = listed.get(leaf_key(path))
        if not isinstance(entry, dict):
            raise CheckpointError(f"{file}: missing param {leaf_key(path)!r} for this config.json")
        if tuple(entry.get("shape", ())) != tuple(shape):
            raise CheckpointError(f"{file}: param {leaf_key(path)!r} has shape {tuple(entry.get('shape', ()))}, "
                                  f"expected {tuple(shape)}")
        if dtypes is not None:
            stored = entry.get("dtype", manifest["dtype"])
            if str(stored) != np.dtype(dtypes[path]).name:
                raise CheckpointError(f"{file}: param {leaf_key(path)!r} has dtype {stored}, "
                                      f"expected {np.dtype(dtypes[path]).name}")
    extra = sorted(set(listed) - {leaf_key(p) for p in shapes})
    if extra:
        raise CheckpointError(f"{file}: unexpected param {extra[0]!r} for this config.json")


def write_config(src: Path, dst: Path, dtype: np.dtype) -> None:
    """Copies ``src/config.json`` to ``dst`` with its dtype fields set to ``dtype``."""
    config = json.loads((src / CONFIG_FILE).read_text())
    config["dtype"] = np.dtype(dtype).name
    if "torch_dtype" in config:
        config["torch_dtype"] = np.dtype(dtype).name
    (dst / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def copy_aux_files(src: Path, dst: Path) -> list[str]:
    """Copies the tokenizer and generation files that exist in ``src``; returns their names."""
    copied = []
    for name in AUX_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied
