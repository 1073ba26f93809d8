"""What the benchmark scripts share: logging, timing, the copy-bandwidth floor, the machine they ran on,
their JSON reports and random weights.

The scripts run as ``python benchmarks/NAME.py`` from the repository root; Python then finds modules in the
script's own directory first, so they ``import common``, and they import ``jamba_jax`` / ``pallas_kernels``
as installed packages (``pip install -e .``; on a GPU machine ``PYTHONPATH=$PWD`` does as well).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import jamba_jax
from jamba_jax.bench import machine_info

START = time.perf_counter()  # the scripts import this module first: times count from their start


# ---- logging ---------------------------------------------------------------------------------------

def script_parser(doc: str, *, out: str | None, budget_s: float, dry_run: str) -> argparse.ArgumentParser:
    """The options the GPU scripts share: ``--out`` (required when ``out`` is None), ``--dry-run`` (what it
    does: ``dry_run``) and ``--budget-s`` (no new run starts past it)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=out is None, default=out)
    p.add_argument("--dry-run", action="store_true", help=dry_run)
    p.add_argument("--budget-s", type=float, default=budget_s, help="seconds; no new run starts past it")
    return p


def elapsed() -> float:
    """Seconds since the script started."""
    return time.perf_counter() - START


def log(*parts) -> None:
    """``print`` with the seconds since the script started in front, flushed."""
    print(f"[{elapsed():7.1f}s]", *parts, flush=True)


def short_error(e: BaseException, lines: int = 6, chars: int = 1500) -> str:
    """The first ``lines`` lines (at most ``chars`` characters) of an exception's message."""
    text = "".join(traceback.format_exception_only(type(e), e)).strip().splitlines()
    return "\n".join(text[:lines])[:chars]


# ---- timing ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class Timing:
    """Seconds of each timed call, the output of the first call and, when asked, the per-call seconds of
    calls dispatched back to back (``pipelined``)."""

    times: list[float]
    output: Any = None
    pipelined: float | None = None

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def time_call(fn: Callable, *args, warmup: int = 1, runs: int = 5, max_seconds: float | None = None,
              pipelined: bool = False, fresh: Callable[[], tuple] | None = None) -> Timing:
    """Times ``fn(*args)``, each call ended by ``jax.block_until_ready``: ``warmup`` untimed calls (the first
    compiles), then ``runs`` timed ones; with ``max_seconds``, fewer when the first timed call says that
    ``runs`` would take longer. ``pipelined`` adds ``runs`` calls dispatched back to back and waited for once.
    ``fresh`` (for programs that donate an argument) returns new ``args`` before each call, untimed."""
    output = None

    def call():
        nonlocal output
        call_args = args if fresh is None else jax.block_until_ready(fresh())
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*call_args))
        if output is None:
            output = out
        return time.perf_counter() - t0

    for _ in range(warmup):
        call()
    times = [call()]
    n = runs if max_seconds is None else int(min(runs, max(1, max_seconds / max(times[0], 1e-9))))
    times += [call() for _ in range(n - 1)]
    timing = Timing(times, output)
    if pipelined:
        arg_sets = [args if fresh is None else jax.block_until_ready(fresh()) for _ in range(runs)]
        t0 = time.perf_counter()
        for a in arg_sets:
            out = fn(*a)  # the device runs them in order: the last one done means all are
        jax.block_until_ready(out)
        timing.pipelined = (time.perf_counter() - t0) / runs
    return timing


def copy_bandwidth(n: int | None = None, calls: int = 5) -> float:
    """Bytes per second of device memory that ``x + 1`` on ``n`` float32 reads and writes (1 GiB on a GPU):
    ``calls`` calls dispatched back to back after a warm-up, the best of 3 such rounds. The floor a
    memory-bound kernel is read against."""
    n = n or (1 << 28 if jax.default_backend() == "gpu" else 1 << 20)
    x = jnp.ones((n,), jnp.float32)
    add_one = jax.jit(lambda a: a + 1.0)
    per_call = min(time_call(add_one, x, warmup=int(i == 0), runs=calls, pipelined=True).pipelined for i in range(3))
    return 2 * x.nbytes / per_call


def rel_err(got, ref, where=None) -> float:
    """``max |got - ref| / max |ref|`` in float64, over the entries ``where`` selects (all by default)."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    if where is not None:
        got, ref = got[where], ref[where]
    return float(np.max(np.abs(got - ref)) / max(float(np.max(np.abs(ref))), 1e-30))


# ---- what ran --------------------------------------------------------------------------------------

def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def environment(**extra) -> dict:
    """The machine and software a result came from: date, ``jax_version``, the device (``platform``: the
    backend, ``device``, ``card``: its kind), ``os``, ``python``, ``cpu`` model and counts, memory, load and the
    git commit measured (``source``), from ``jamba_jax.bench.machine_info``; then ``extra``."""
    info = machine_info()
    dev = jax.devices()[0]
    return {"date": now(), "jax_version": info.pop("jax"), "platform": dev.platform, "device": str(dev),
            "card": info.pop("device"), "os": info.pop("platform"), "usable_cpus": len(os.sched_getaffinity(0)),
            **info, **extra}


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def rss_bytes() -> int:
    """This process's resident memory now (Linux ``VmRSS``)."""
    return _status_bytes("VmRSS")


def hwm_bytes() -> int:
    """This process's peak resident memory (``VmHWM``) since it started or since ``reset_peak_rss``."""
    return _status_bytes("VmHWM")


def reset_peak_rss() -> bool:
    """Sets the peak-RSS mark (``VmHWM``) to the current RSS (``/proc/self/clear_refs``); False where the
    kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return hwm_bytes() <= rss_bytes() + 4 * 2**20


# ---- reports ---------------------------------------------------------------------------------------

def _jsonable(value):
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def write_json(path, data, indent: int = 2) -> None:
    """Writes ``data`` to ``path`` whole or not at all (a temporary file renamed over it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=indent, default=_jsonable) + "\n")
    os.replace(tmp, path)


class Report:
    """A result dict saved after every ``add``, ``error`` and ``write`` (``save(path, data)``, by default
    ``write_json``), so that an error, the time budget or a killed run never loses what was measured.
    ``budget`` (seconds since the script started) is what ``have_time`` checks. Safe to use from two threads."""

    def __init__(self, path, data: dict, *, budget: float | None = None,
                 save: Callable[[Any, dict], None] = write_json):
        self.path, self.data, self.budget, self._save = path, data, budget, save
        self.data.setdefault("errors", [])
        self._lock = threading.RLock()

    def write(self, **extra) -> None:
        with self._lock:
            self.data.update(extra, elapsed_s=elapsed())
            try:
                self._save(self.path, self.data)
            except Exception as e:  # noqa: BLE001 -- a report that cannot be written must not stop the run
                log(f"!! could not write {self.path}: {short_error(e)}")

    def add(self, key: str, row) -> None:
        """Appends ``row`` to the list ``data[key]`` and saves."""
        with self._lock:
            self.data.setdefault(key, []).append(row)
            self.write()

    def error(self, where: str, e) -> None:
        """Records an exception (its first lines) or a message under ``errors`` and logs it."""
        msg = short_error(e) if isinstance(e, BaseException) else str(e)
        log(f"!! {where}: {msg}")
        self.add("errors", {"where": where, "error": msg})

    def left(self) -> float:
        return float("inf") if self.budget is None else self.budget - elapsed()

    def have_time(self, where: str, need: float = 0.0, reserve: float = 0.0) -> bool:
        """Whether ``need`` seconds are left of the budget besides ``reserve``; if not, records ``where`` as
        skipped."""
        if self.left() - reserve >= need:
            return True
        self.error(where, f"skipped: time budget ({elapsed():.0f} of {self.budget:.0f} s used)")
        return False


# ---- weights ---------------------------------------------------------------------------------------

def random_params(config: jamba_jax.JambaConfig, dtype=jnp.float32, seed: int = 0):
    """The model's own random init (``jamba_jax.init_params``: HF Jamba's) in ``dtype``, on the default device.
    An ``unsafe_rbg`` key: the init compiles about twice as fast as with threefry's."""
    return jax.block_until_ready(jamba_jax.init_params(config, jax.random.key(seed, impl="unsafe_rbg"), dtype))


def weight_bytes_per_token(config: jamba_jax.JambaConfig, params) -> int:
    """Bytes of weights one decode token reads: every weight but the unused experts (top-k of E per MoE
    layer) and the embedding (a gather of one row); int8 weights count with their scales."""
    from flax import traverse_util

    total = 0
    for path, leaf in traverse_util.flatten_dict(params, is_leaf=lambda _, x: hasattr(x, "q")).items():
        arrays = [leaf.q, leaf.scale] if hasattr(leaf, "q") else [leaf]
        nbytes = sum(a.size * a.dtype.itemsize for a in arrays)
        if "experts" in path:
            nbytes = nbytes * config.num_experts_per_tok // config.num_experts
        if path[0] == "embed_tokens":
            nbytes = 0
        total += nbytes
    return total
