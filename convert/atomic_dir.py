"""Writing an output directory all-or-nothing, with one writer at a time.

``atomic_output_dir(dst)``:

- claims ``dst`` with an exclusive ``flock`` on ``.{name}.lock`` beside it; a second writer into the same
  place fails at once with one line (the lock dies with its process, so a killed run never blocks the next);
- finds the partial output (``.{name}.partial-*``, ``.{name}.old-*``) a dead run left there, reports it
  on stderr and removes it (under the lock no live run can own it);
- writes into a fresh hidden sibling ``.{name}.partial-<random>`` (exclusive ``mkdir``);
- turns SIGTERM and SIGHUP into ``KeyboardInterrupt`` while it runs, so they clean up like Ctrl-C;
- on success flushes the partial directory to the disk (every file and directory: writers need not
  fsync) and renames it to ``dst`` with ``RENAME_NOREPLACE``: a ``dst`` that appeared while it ran
  (another process's directory) is never replaced; with ``overwrite`` only the ``dst`` that was checked
  at the start (empty, or a previous output: ``replaceable``) is moved aside and removed;
- on any failure removes the partial directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import secrets
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from .hf_checkpoint import CheckpointError


def check_distinct(src: Path, dst: Path) -> None:
    """Refuses an output that is, contains or lies inside the input."""
    s, d = Path(src).resolve(), Path(dst).resolve()
    if s == d or d in s.parents or s in d.parents:
        raise CheckpointError(f"{dst}: output must not be, contain or lie inside the input {src}")


def _report(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- the lock ------------------------------------------------------------------------------------

def _lock_path(dst: Path) -> Path:
    return dst.absolute().parent / f".{dst.name}.lock"


def _acquire(dst: Path) -> int:
    """An fd holding an exclusive flock on ``.{name}.lock``, or ``CheckpointError`` if another process holds it.

    The lock file is removed on release; a waiter may have opened the old inode meanwhile, so after locking
    we check the path still names the inode we locked, and retry otherwise."""
    lock = _lock_path(dst)
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise CheckpointError(f"{dst}: cannot create output ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            owner = ""
            with contextlib.suppress(OSError, ValueError):
                owner = f" (pid {int(os.pread(fd, 32, 0).decode().strip())})"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise CheckpointError(f"{dst}: another conversion is writing it{owner}; "
                                      f"wait for it or stop it") from None
            raise CheckpointError(f"{dst}: cannot lock {lock.name} ({e.strerror or e})") from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)  # the holder removed the file between our open and our flock: take the new one


def _release(dst: Path, fd: int) -> None:
    with contextlib.suppress(OSError):
        os.unlink(_lock_path(dst))  # while still locked: a waiter then retries on a new file
    os.close(fd)


# ---- dead runs -----------------------------------------------------------------------------------

def _remove_dead_partials(dst: Path) -> None:
    """Removes (and reports) what a run that died while writing ``dst`` left beside it. Called under the
    lock, so no live run owns these."""
    parent = dst.absolute().parent
    for p in sorted(parent.glob(f".{dst.name}.partial-*")) + sorted(parent.glob(f".{dst.name}.old-*")):
        _report(f"jamba convert: removing {p}, left by an interrupted conversion into {dst}")
        _rmtree(p)


def _rmtree(path: Path) -> None:
    """``rmtree`` that also wins against writer threads still finishing inside ``path`` (an interrupted
    Orbax save keeps writing in background threads for a moment)."""
    for _ in range(50):
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.lexists(path):
            return
        time.sleep(0.05)


# ---- signals -------------------------------------------------------------------------------------

class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP during a conversion: handled like Ctrl-C (the partial output is removed)."""


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(signal.Signals(signum).name)

    previous = {}
    for s in (signal.SIGTERM, signal.SIGHUP):
        previous[s] = signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# ---- the final rename ----------------------------------------------------------------------------

_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _rename_noreplace(src: Path, dst: Path) -> None:
    """``rename(src, dst)`` that fails with ``FileExistsError`` if ``dst`` exists (``renameat2`` with
    ``RENAME_NOREPLACE``; a plain ``rename`` would silently replace an empty directory). Where the kernel
    or libc lack it, an exists-check then ``rename`` (a small race)."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        renameat2 = None
    if renameat2 is not None:
        if renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL):
            raise OSError(err, os.strerror(err), str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and next(path.iterdir(), None) is None


@contextlib.contextmanager
def atomic_output_dir(dst: str | Path, *, overwrite: bool = False,
                      replaceable: Callable[[Path], bool] = is_empty_dir) -> Iterator[Path]:
    """Yields an empty hidden directory next to ``dst``; when the block succeeds it becomes ``dst``,
    when it fails (an exception, Ctrl-C, SIGTERM, SIGHUP) it is removed. See the module docstring.

    An existing ``dst`` is replaced only with ``overwrite`` and only if ``replaceable(dst)`` (an empty
    directory, or what the caller's kind of run writes). ``OSError``s raised while writing become
    ``CheckpointError``s naming the file."""
    dst = Path(dst)
    parent = dst.absolute().parent
    if not parent.is_dir():
        raise CheckpointError(f"{parent}: output's parent directory does not exist")
    if (dst.exists() or dst.is_symlink()) and not overwrite:  # before the lock: a clear message, no lock file
        raise CheckpointError(f"{dst}: already exists; pass --overwrite to replace it")
    fd = _acquire(dst)
    try:
        _remove_dead_partials(dst)
        existing = None
        if dst.exists() or dst.is_symlink():
            if not overwrite:
                raise CheckpointError(f"{dst}: already exists; pass --overwrite to replace it")
            if dst.is_symlink() or not dst.is_dir():
                raise CheckpointError(f"{dst}: exists and is not a directory; refusing to replace it")
            if not replaceable(dst):
                raise CheckpointError(f"{dst}: exists and is neither empty nor a previous conversion; "
                                      "refusing to replace it")
            existing = os.stat(dst).st_ino
        tmp = parent / f".{dst.name}.partial-{secrets.token_hex(4)}"
        try:
            tmp.mkdir()
        except OSError as e:
            raise CheckpointError(f"{dst}: cannot create output ({e.strerror or e})") from None
        with _signals_interrupt():
            try:
                try:
                    yield tmp
                    _commit(tmp, dst, existing)
                except OSError as e:
                    name = str(e.filename or dst).replace(str(tmp), str(dst))
                    raise CheckpointError(f"{name}: {e.strerror or e}") from None
            except BaseException:
                _rmtree(tmp)
                raise
    finally:
        _release(dst, fd)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(root: Path) -> None:
    """Flushes every file and directory under ``root`` (and ``root``) to the disk."""
    for directory, _, files in os.walk(root):
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.islink(path):
                _fsync(path)
        _fsync(directory)


def _commit(tmp: Path, dst: Path, existing: int | None) -> None:
    """Makes ``tmp`` durable and renames it to ``dst``; replaces ``dst`` only if it is still the directory
    (inode ``existing``) that was checked at the start. Writers need not fsync: a ``dst`` that survives a
    crash or power loss is complete."""
    sync_tree(tmp)
    parent = str(dst.absolute().parent)
    if existing is not None and os.path.lexists(dst):
        old = dst.absolute().parent / f".{dst.name}.old-{secrets.token_hex(4)}"
        os.rename(dst, old)  # a fresh random name: replaces nothing
        if os.stat(old).st_ino != existing:
            with contextlib.suppress(OSError):
                _rename_noreplace(old, dst)
            raise CheckpointError(f"{dst}: replaced by another process during the conversion; left as is")
        _rename_noreplace(tmp, dst)
        _fsync(parent)  # the renames, before the old output goes
        _rmtree(old)
        return
    try:
        _rename_noreplace(tmp, dst)
        _fsync(parent)
    except FileExistsError:
        raise CheckpointError(f"{dst}: created by another process during the conversion; "
                              "left as is, nothing written") from None
