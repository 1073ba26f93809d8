"""GPU benchmark of the Mamba decode-step state update: the fused XLA ``selective_state_update``
against the Pallas ``selective_state_update_pallas`` (Jamba-1.5-Mini shapes: d_inner 8192, d_state 16).

    python3 benchmarks/gpu_scan_decode.py --out $OUT/scan_decode.json [--dry-run]

For each batch size, both updates are first checked against each other (f32, compiled), then timed
as ``steps`` updates chained inside one jitted ``fori_loop`` (the new state feeds the next step, so
there is no dispatch overhead in the time). The bandwidth counts the state read and written (f32)
plus x, dt, z (bf16), B, C and y; it is compared with a measured copy bandwidth. ``--dry-run`` runs
tiny shapes with the kernel in interpret mode (CPU).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

from pallas_kernels.selective_scan import selective_state_update, selective_state_update_pallas  # noqa: E402


def inputs(key, batch, d_inner, d_state):
    ks = jax.random.split(key, 9)
    n = lambda k, s, dt=jnp.bfloat16: jax.random.normal(k, s, jnp.float32).astype(dt)  # noqa: E731
    state = n(ks[0], (batch, d_inner, d_state), jnp.float32)
    args = (n(ks[1], (batch, d_inner)), n(ks[2], (batch, d_inner)) - 1.0,
            -jnp.exp(0.5 * n(ks[3], (d_inner, d_state), jnp.float32)), n(ks[4], (batch, d_state)),
            n(ks[5], (batch, d_state)), n(ks[6], (d_inner,), jnp.float32), n(ks[7], (batch, d_inner)),
            0.3 * n(ks[8], (d_inner,), jnp.float32))
    return state, args


def chained(update, steps):
    """``steps`` updates in one program: the state and x are carried so no step can be skipped."""

    @jax.jit
    def run(state, args):
        x, dt, A, B, C, D, z, bias = args

        def body(_, carry):
            s, x = carry
            y, s = update(s, x, dt, A, B, C, D, z, bias)
            return s, y.astype(x.dtype)

        return lax.fori_loop(0, steps, body, (state, x))

    return run


def seconds(fn, *args, reps=5):
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def copy_bandwidth(n):
    x = jnp.ones((n,), jnp.float32)
    f = jax.jit(lambda a: a * 1.0001)
    return 2 * x.nbytes / seconds(f, x)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="scan_decode.json")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--steps", type=int, default=200)
    a = p.parse_args()
    interpret = a.dry_run
    d_inner, d_state, batches, steps = (64, 4, (1, 2), 3) if a.dry_run else (8192, 16, (1, 8, 32, 128), a.steps)
    report = {"card": jax.devices()[0].device_kind, "jax": jax.__version__, "steps": steps,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "d_inner": d_inner,
              "d_state": d_state, "rows": [], "errors": []}
    report["copy_GBps"] = copy_bandwidth(1 << (16 if a.dry_run else 28)) / 1e9
    print(f"{report['card']} jax {jax.__version__}; copy {report['copy_GBps']:.0f} GB/s", flush=True)
    impls = {"xla fused": selective_state_update,
             "pallas bd=32": functools.partial(selective_state_update_pallas, interpret=interpret),
             "pallas bd=64 w=2": functools.partial(selective_state_update_pallas, block_d=64, num_warps=2,
                                                   interpret=interpret)}
    for batch in batches:
        state, args = inputs(jax.random.key(batch), batch, d_inner, d_state)
        ref = None
        for name, update in impls.items():
            try:
                one = jax.jit(update)(state, *args)
                if ref is None:
                    ref = one
                err = max(float(jnp.max(jnp.abs(g - r)) / jnp.max(jnp.abs(r))) for g, r in zip(one, ref))
                t = seconds(chained(update, steps), state, args) / steps
                nbytes = batch * (d_inner * d_state * 8 + d_inner * (3 * 2 + 4) + 2 * d_state * 2)
                row = {"impl": name, "batch": batch, "us_per_step": 1e6 * t, "rel_err_vs_xla": err,
                       "GBps": nbytes / t / 1e9, "fraction_of_copy": nbytes / t / 1e9 / report["copy_GBps"]}
                report["rows"].append(row)
                print(json.dumps(row), flush=True)
            except Exception as e:  # noqa: BLE001
                report["errors"].append(f"{name} batch {batch}: {e!r}"[:500])
                print("ERROR", name, batch, repr(e)[:300], flush=True)
        with open(a.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
