"""JAX's persistent compilation cache for the ``jamba`` commands that compile a model (``generate``,
``serve``): compiled programs are written to disk, so a second start loads them instead of compiling.

The directory is, in order: the ``--compilation-cache`` option, the ``JAMBA_COMPILATION_CACHE``
environment variable, ``$XDG_CACHE_HOME/jamba_jax/xla`` (``~/.cache/jamba_jax/xla``). ``off`` turns it off.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VARIABLE = "JAMBA_COMPILATION_CACHE"
OFF = "off"


def default_directory() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jamba_jax" / "xla"


def enable_compilation_cache(directory: str | os.PathLike | None = None) -> Path | None:
    """Points JAX's persistent compilation cache at ``directory`` (default: see the module docstring) and
    caches every program, however quick to compile. Returns the directory, or None when turned off.
    Call it before the first compile."""
    import jax

    choice = str(directory) if directory is not None else os.environ.get(ENV_VARIABLE)
    if choice is not None and choice.strip().lower() == OFF:
        return None
    path = Path(choice).expanduser() if choice else default_directory()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"compilation cache directory {path}: {e.strerror}; pass --compilation-cache DIR "
                         f"or --compilation-cache off") from None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
