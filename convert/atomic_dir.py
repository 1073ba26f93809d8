"""Writing an output directory all-or-nothing: into a hidden sibling, renamed into place at the end."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path
from typing import Iterator

from .hf_checkpoint import CheckpointError


def check_distinct(src: Path, dst: Path) -> None:
    """Refuses an output that is, contains or lies inside the input."""
    s, d = Path(src).resolve(), Path(dst).resolve()
    if s == d or d in s.parents or s in d.parents:
        raise CheckpointError(f"{dst}: output must not be, contain or lie inside the input {src}")


@contextlib.contextmanager
def atomic_output_dir(dst: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yields an empty hidden directory next to ``dst``; when the block succeeds it becomes ``dst``
    (replacing an existing ``dst`` only if ``overwrite``), when it fails it is removed.

    An interrupted run leaves at most a ``.{name}.partial-*`` directory, never a ``dst``. ``OSError``s
    raised while writing become ``CheckpointError``s naming the file."""
    dst = Path(dst)
    if dst.exists() or dst.is_symlink():
        if not overwrite:
            raise CheckpointError(f"{dst}: already exists; pass --overwrite to replace it")
        if not dst.is_dir():
            raise CheckpointError(f"{dst}: exists and is not a directory; refusing to replace it")
    parent = dst.absolute().parent
    if not parent.is_dir():
        raise CheckpointError(f"{parent}: output's parent directory does not exist")
    tmp = parent / f".{dst.name}.partial-{secrets.token_hex(4)}"
    try:
        tmp.mkdir()
    except OSError as e:
        raise CheckpointError(f"{dst}: cannot create output ({e.strerror or e})") from None
    try:
        try:
            yield tmp
            if dst.exists():
                old = parent / f".{dst.name}.old-{secrets.token_hex(4)}"
                os.rename(dst, old)
                os.rename(tmp, dst)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, dst)
        except OSError as e:
            name = str(e.filename or dst).replace(str(tmp), str(dst))
            raise CheckpointError(f"{name}: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
