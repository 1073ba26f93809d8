"""One process of a multi-process job on fake CPU devices, or the single-process run it is compared with.

    python tests/multiprocess_worker.py PROCESSES PROCESS_ID PORT DEVICES OUT CHECK [ARGS...]

PROCESSES 1 runs without ``jax.distributed``; otherwise the process joins the job whose coordinator
(process 0) listens on 127.0.0.1:PORT. Each process prints one JSON object on the last line of stdout;
process 0 also writes arrays into the directory OUT. Used by ``tests/test_multiprocess.py``.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # the device count is fixed when JAX starts
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={sys.argv[4]}"

import ctypes  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

import jamba_jax  # noqa: E402
from jamba_jax import distributed  # noqa: E402

MESHES = ("1,2,4", "2,1,4")
OUT = "."
PROMPTS = [[5, 9, 17, 3, 22, 40, 7], [7, 8, 30]]


def inputs(vocab: int):
    ids = np.random.default_rng(0).integers(3, vocab, (2, 9)).astype(np.int32)
    mask = np.ones(ids.shape, bool)
    mask[1, :4] = False  # left padding
    return ids, mask


def mesh_of(spec: str):
    data, expert, tensor = (int(n) for n in spec.split(","))
    return jamba_jax.make_mesh(data * expert * tensor, data=data, expert=expert, tensor=tensor)


def check_infer(*checkpoints: str):
    """Forward logits and greedy tokens of every checkpoint on both meshes; logits saved by process 0."""
    out = {}
    for ckpt in checkpoints:
        for spec in MESHES:
            model = jamba_jax.load(ckpt, dtype="float32", mesh=mesh_of(spec))
            ids, mask = inputs(model.config.vocab_size)
            logits = distributed.to_host(jamba_jax.forward(model, ids, mask))
            tokens = jamba_jax.generate(model, PROMPTS, max_new_tokens=6, stop_ids=[]).tokens
            name = f"{Path(ckpt).name}-{spec.replace(',', 'x')}"
            if distributed.is_primary():
                np.save(Path(OUT) / f"{name}.npy", logits)
            out[name] = tokens
    return out


def check_load(checkpoint: str, spec: str):
    model = jamba_jax.load(checkpoint, mesh=mesh_of(spec))
    return {"leaves": len(jax.tree.leaves(model.params))}


def _rss() -> int:
    return _status("VmRSS")


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def check_load_memory(checkpoint: str, spec: str, warmup: str):
    """Peak resident memory added while loading ``checkpoint`` onto the mesh: the kernel's high-water mark
    (VmHWM, reset through /proc/self/clear_refs just before loading) minus the resident set before. The
    small checkpoint ``warmup`` (of the same kind) is loaded first: a first load's fixed costs (Orbax's
    code and thread pools: 22 MB for a 0.7 MB converted checkpoint) are not the checkpoint's data."""
    ctypes.CDLL(None).mallopt(ctypes.c_int(-3), ctypes.c_int(1 << 20))  # freed buffers go back to the OS
    mesh = mesh_of(spec)
    jax.block_until_ready(jamba_jax.load(warmup, mesh=mesh).params)
    before = _rss()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    model = jamba_jax.load(checkpoint, mesh=mesh)
    jax.block_until_ready(model.params)
    peak = _status("VmHWM")
    held = sum(s.data.nbytes for leaf in jax.tree.leaves(model.params) for s in leaf.addressable_shards)
    total = sum(leaf.nbytes for leaf in jax.tree.leaves(model.params))
    return {"peak_growth": peak - before, "held": held, "model": total}


def check_serve(checkpoint: str, mode: str):
    """Loads, prints ``ready``, then either runs forward passes for a minute (``collectives``) or sleeps
    (``idle``): a process killed meanwhile must end this one."""
    model = jamba_jax.load(checkpoint, dtype="float32", mesh=mesh_of("1,1,8"))
    ids, mask = inputs(model.config.vocab_size)
    distributed.to_host(jamba_jax.forward(model, ids, mask))
    print("ready", flush=True)
    end = time.monotonic() + 90
    while time.monotonic() < end:
        if mode == "collectives":
            distributed.to_host(jamba_jax.forward(model, ids, mask))
        else:
            time.sleep(1)
    return {"finished": True}


def main() -> int:
    global OUT
    processes, process_id, port, _ = (int(a) for a in sys.argv[1:5])
    OUT, check, args = sys.argv[5], sys.argv[6], sys.argv[7:]
    if processes > 1:
        distributed.initialize(f"127.0.0.1:{port}", processes, process_id, name="worker")
        distributed.route_native_output("worker")
    run = lambda: print(json.dumps(globals()[f"check_{check}"](*args)), flush=True) or 0  # noqa: E731
    try:
        return distributed.run_job(run, lambda e: 1) if processes > 1 else run()
    except Exception as e:  # noqa: BLE001 -- one line, as the CLI prints it
        if os.environ.get("JAMBA_TRACEBACK"):
            import traceback

            traceback.print_exc()
        print(f"worker: error: {type(e).__name__}: {' '.join(str(e).split())[:300]}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
