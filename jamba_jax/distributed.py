"""One job over several processes (one per host, or several on one machine): start-up, one source of
truth for the inputs, checksums of leaves no process holds whole, and ending the job when a process dies.

    jax.distributed.initialize  <-  initialize(): the coordinator address, process count and id from the
                                    arguments or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
                                    (else JAX's cluster detection: SLURM, Open MPI, ...)

Every process runs the same program; arrays are global (``jax.Array`` over all processes' devices) and
each process holds only its devices' shards. A process that dies would leave the others waiting in their
next collective or barrier: a watchdog thread in each process beats a counter in the coordinator's
key-value store every second and ends the process with one line when another process's counter stops
(``PEER_TIMEOUT_S``), the coordinator is unreachable, or another process reports a failure. When the
coordinator itself dies, JAX's runtime aborts the other processes at once with a native stack trace;
``route_native_output`` makes that one line. JAX's own heartbeat timeout is twice ``PEER_TIMEOUT_S``, as
the backstop.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any, Callable

import jax
import numpy as np

PEER_TIMEOUT_S = 20  # a process whose counter has not moved for this long is taken as dead
_BEAT_S = 1.0
_KEY = "jamba_jax/watchdog"
RUNNING, OK, FAILED = "running", "ok", "failed"


def env_settings() -> dict[str, Any]:
    """``coordinator_address``, ``num_processes``, ``process_id`` from JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES, JAX_PROCESS_ID (each None when unset; JAX reads the first itself)."""
    out: dict[str, Any] = {"coordinator_address": os.environ.get("JAX_COORDINATOR_ADDRESS") or None}
    for name, var in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
        value = os.environ.get(var)
        if value is None or value == "":
            out[name] = None
            continue
        try:
            out[name] = int(value)
        except ValueError:
            raise ValueError(f"{var}={value!r} is not an integer; set it to this process's "
                             f"{'count of processes' if name == 'num_processes' else 'index (0 on the coordinator)'}"
                             ) from None
    return out


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, peer_timeout_s: float = PEER_TIMEOUT_S,
               name: str = "jamba") -> None:
    """``jax.distributed.initialize`` (arguments left out come from ``env_settings``) and the watchdog.
    Call before any other JAX call. ``name`` prefixes the watchdog's one-line error."""
    settings = env_settings()
    coordinator_address = coordinator_address or settings["coordinator_address"]
    num_processes = num_processes if num_processes is not None else settings["num_processes"]
    process_id = process_id if process_id is not None else settings["process_id"]
    backstop = int(2 * peer_timeout_s)
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   initialization_timeout=max(backstop, 60), heartbeat_timeout_seconds=backstop,
                                   shutdown_timeout_seconds=backstop)
    except ValueError as e:  # JAX names the missing setting; say where each one comes from
        raise ValueError(f"cannot start the distributed job ({' '.join(str(e).split())}); set "
                         "JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID on every host, "
                         "or run under a launcher JAX detects (SLURM, Open MPI)") from None
    global _watchdog
    _watchdog = _Watchdog(peer_timeout_s, name)
    _watchdog.start()


def route_native_output(name: str = "jamba") -> None:
    """Sends the process's native output (file descriptors 1 and 2: C++ logs, gloo's notes) through the
    filter of ``native_output.py``, a small process of its own; Python's ``sys.stdout`` and ``sys.stderr``
    keep the real ones. What the program prints stays clean, and the native abort JAX's runtime ends a
    process with when another one died becomes one line (see ``native_output``). Call after
    ``initialize``."""
    global _routed
    sys.stdout.flush()
    sys.stderr.flush()
    real_out, real_err = os.dup(1), os.dup(2)
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "native_output.py")
    filt = subprocess.Popen([sys.executable, script, name, str(jax.process_index()), str(jax.process_count())],
                            stdin=subprocess.PIPE, stdout=real_err, stderr=real_err)
    os.dup2(filt.stdin.fileno(), 1)
    os.dup2(filt.stdin.fileno(), 2)
    filt.stdin.close()
    sys.stdout = os.fdopen(real_out, "w", buffering=1, encoding=sys.stdout.encoding, errors=sys.stdout.errors)
    sys.stderr = os.fdopen(real_err, "w", buffering=1, encoding=sys.stderr.encoding, errors=sys.stderr.errors)
    _routed = True


def is_primary() -> bool:
    """True in the process that prints (process 0), and in a single-process run."""
    return jax.process_index() == 0


def to_host(x) -> np.ndarray:
    """The whole of ``x`` as numpy in every process, also when it spans several processes' devices
    (replicated: this process's copy; split: gathered from all, a collective every process must join)."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def agree(value: Any) -> Any:
    """Process 0's ``value`` (anything JSON can hold), in every process: the job's one source of truth for
    inputs that each process read on its own (prompts, seeds, stop conditions)."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(value).encode(), np.uint8) if is_primary() else np.zeros(0, np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.int32(data.size)))
    padded = np.zeros(size, np.uint8)
    padded[:data.size] = data[:size]
    return json.loads(bytes(np.asarray(multihost_utils.broadcast_one_to_all(padded))).decode())


def job_checksums(arrays: dict[Any, jax.Array]) -> dict[Any, str]:
    """``convert.checksum`` of each array (any sharding), over the whole array even where no process holds
    it whole: each process sums the shards it holds (replica 0 of each), one allgather adds the parts.
    Every process must call it with the same keys, in the same order."""
    from .convert.checksum import combine, partial_sums

    keys = list(arrays)
    local = np.zeros((len(keys), 2), np.uint64)
    for row, key in enumerate(keys):
        x = arrays[key]
        for shard in x.addressable_shards:
            if shard.replica_id != 0:
                continue
            start = tuple(0 if s.start is None else s.start for s in shard.index)
            start += (0,) * (x.ndim - len(start))
            s0, s1 = partial_sums(np.asarray(shard.data), start)
            with np.errstate(over="ignore"):
                local[row] += np.array([s0, s1], np.uint64)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        # 32-bit halves: without jax_enable_x64 an allgather would truncate 64-bit integers
        halves = np.stack([local >> np.uint64(32), local & np.uint64(0xFFFFFFFF)], -1).astype(np.uint32)
        gathered = np.asarray(multihost_utils.process_allgather(halves)).astype(np.uint64)
        with np.errstate(over="ignore"):
            local = ((gathered[..., 0] << np.uint64(32)) | gathered[..., 1]).sum(0, dtype=np.uint64)
    return {key: combine([(int(a), int(b))]) for key, (a, b) in zip(keys, local)}


def run_job(fn: Callable[[], int], exit_code: Callable[[BaseException], int]) -> int:
    """``fn()`` as this process's part of the job (after ``initialize``): on success the process waits
    for the others and shuts JAX's distributed runtime down; on an exception the others are told (their
    watchdogs end them with one line) and this process exits with ``exit_code(exception)`` right after its
    own error line is printed, without waiting at the shutdown barrier for processes that may be gone."""
    watchdog = _watchdog
    if watchdog is None:
        raise RuntimeError("run_job needs distributed.initialize() first")
    try:
        code = fn()
    except BaseException as e:
        watchdog.finish(FAILED)
        atexit.register(_exit_now, exit_code(e))
        raise
    watchdog.finish(OK)
    atexit.register(_leave)
    return code


def _exit_now(code: int) -> None:
    """Ends the process now, after its one-line error: the native output filter drops what follows."""
    sys.stdout.flush()
    sys.stderr.flush()
    if _routed:
        from .native_output import END_MARKER

        os.write(2, (END_MARKER + "\n").encode())
    os._exit(code)


def _leave() -> None:
    """Waits (the watchdog still guarding) until every process has finished, then shuts down."""
    _watchdog.wait_all_finished()
    jax.distributed.shutdown()


class _Watchdog(threading.Thread):
    """Beats this process's counter in the coordinator's key-value store and watches the others'."""

    def __init__(self, timeout_s: float, name: str):
        super().__init__(name="jamba-watchdog", daemon=True)
        from jax._src import distributed as jax_distributed  # the client JAX started (no public handle)

        self.client = jax_distributed.global_state.client
        self.me, self.n = jax.process_index(), jax.process_count()
        self.timeout_s, self.prefix = timeout_s, name
        self.state = RUNNING
        self.all_finished = threading.Event()
        self._set(RUNNING)

    def _set(self, state: str) -> None:
        self.client.key_value_set(f"{_KEY}/state/{self.me}", state, allow_overwrite=True)

    def finish(self, state: str) -> None:
        self.state = state
        try:
            self._set(state)
        except Exception:  # noqa: BLE001 -- the coordinator is gone: the watchdog reports that
            pass

    def wait_all_finished(self) -> None:
        self.all_finished.wait()

    def _end(self, message: str) -> None:
        if self.state != FAILED:  # a failed process has printed its own line
            print(f"{self.prefix}: error: {message}; ending process {self.me} of {self.n}", file=sys.stderr,
                  flush=True)
        _exit_now(1)

    def run(self) -> None:
        beats = 0
        now = time.monotonic()
        seen = {p: (None, now) for p in range(self.n) if p != self.me}  # peer -> (last counter, when it moved)
        reached = now  # the last successful exchange with the coordinator
        failed_at = None  # when a peer was first seen failed
        while True:
            time.sleep(_BEAT_S)
            now = time.monotonic()
            try:
                beats += 1
                self.client.key_value_set(f"{_KEY}/beat/{self.me}", str(beats), allow_overwrite=True)
                states = dict(self.client.key_value_dir_get(f"{_KEY}/state/"))
                counters = dict(self.client.key_value_dir_get(f"{_KEY}/beat/"))
                reached = now
            except Exception as e:  # noqa: BLE001 -- any RPC error: the coordinator is unreachable
                if now - reached > self.timeout_s:
                    reason = " ".join(str(e).split())[:200]
                    self._end(f"the job's coordinator (process 0) has been unreachable for "
                              f"{now - reached:.0f} s ({reason})")
                continue
            finished = True
            for peer, (last, moved) in seen.items():
                state = _lookup(states, peer)
                if state == FAILED:
                    # a moment's grace: a failure all processes meet (a bad checkpoint) is reported by each
                    failed_at = failed_at or now
                    if now - failed_at >= 2 * _BEAT_S:
                        self._end(f"process {peer} of {self.n} failed (its output has the error)")
                if state != OK:
                    finished = False
                counter = _lookup(counters, peer)
                if counter != last:
                    seen[peer] = (counter, now)
                elif state != OK and now - moved > self.timeout_s:
                    self._end(f"process {peer} of {self.n} stopped responding {now - moved:.0f} s ago "
                              "(it died, or its host is unreachable)")
            if finished and self.state == OK:
                self.all_finished.set()
                return


def _lookup(entries: dict[str, str], process: int) -> str | None:
    """The value stored under ``.../<process>`` in a ``key_value_dir_get`` answer (full or relative keys)."""
    for key, value in entries.items():
        if key.rsplit("/", 1)[-1] == str(process):
            return value
    return None


_watchdog: _Watchdog | None = None
_routed = False  # route_native_output was called

__all__ = ["PEER_TIMEOUT_S", "env_settings", "initialize", "route_native_output", "is_primary", "to_host", "agree",
           "job_checksums", "run_job"]
