"""The manifest of a converted checkpoint (``manifest.json``) and the files copied beside the weights.

A directory is a converted checkpoint iff it holds a manifest with ``"format": FORMAT``; the manifest
is the last file written, so a partial output never looks like one. Importing this module does not
import Orbax.
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
FORMAT_VERSION = 1
PARAMS_DIR = "params"
# Copied verbatim between HF and converted checkpoints when present.
AUX_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
             "added_tokens.json", "generation_config.json", "chat_template.jinja", "chat_template.json")


def leaf_key(path: tuple[str, ...]) -> str:
    """``("blocks", "layer_0", "mamba", "A_log")`` -> ``"blocks/layer_0/mamba/A_log"``."""
    return "/".join(path)


def leaf_dir(path: tuple[str, ...]) -> str:
    """The Orbax checkpoint of a leaf, relative to the converted directory."""
    return f"{PARAMS_DIR}/{'.'.join(path)}"


def is_converted(directory: str | Path) -> bool:
    return (Path(directory) / MANIFEST_FILE).is_file()


def build_manifest(*, dtype: np.dtype, source_files: list[Path], params: dict[tuple, tuple[int, ...]],
                   aux_files: list[str], quantization: str | None = None,
                   param_dtypes: dict[tuple, np.dtype] | None = None) -> dict[str, Any]:
    """``param_dtypes`` records the stored dtype of the leaves not stored in ``dtype`` (the int8 weights
    and fp32 scales of a quantized checkpoint)."""
    import jamba_jax  # not at import time: this module is imported while jamba_jax initialises

    param_dtypes = param_dtypes or {}

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "jamba_jax_version": jamba_jax.__version__,
        "dtype": np.dtype(dtype).name,
        "quantization": quantization,
        "source": {"format": "hf_safetensors",
                   "files": [{"name": f.name, "bytes": f.stat().st_size} for f in source_files]},
        "params": {leaf_key(p): {"shape": list(shape), "dir": leaf_dir(p),
                                 **({"dtype": np.dtype(param_dtypes[p]).name} if p in param_dtypes else {})}
                   for p, shape in params.items()},
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
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{file}: format_version {version!r} is not supported (this jamba_jax reads "
                              f"up to {FORMAT_VERSION}); upgrade jamba_jax")
    if manifest.get("quantization") is not None and manifest["quantization"] not in QUANTIZE_MODES:
        raise CheckpointError(f"{file}: quantization {manifest['quantization']!r} is not supported")
    for field in ("dtype", "params"):
        if field not in manifest:
            raise CheckpointError(f"{file}: no {field!r} field")
    return manifest


def check_params(directory: Path, manifest: dict, shapes: dict[tuple, tuple[int, ...]]) -> None:
    """Every param of the config is in the manifest with its shape, and nothing else is."""
    listed = manifest["params"]
    file = directory / MANIFEST_FILE
    for path, shape in shapes.items():
        entry = listed.get(leaf_key(path))
        if entry is None:
            raise CheckpointError(f"{file}: missing param {leaf_key(path)!r} for this config.json")
        if tuple(entry.get("shape", ())) != tuple(shape):
            raise CheckpointError(f"{file}: param {leaf_key(path)!r} has shape {tuple(entry.get('shape', ()))}, "
                                  f"expected {tuple(shape)}")
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
