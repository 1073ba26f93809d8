"""GPU benchmark of the Mamba decode-step state update: the fused XLA ``selective_state_update`` against the
Pallas ``selective_state_update_pallas`` (Jamba-1.5-Mini shapes: d_inner 8192, d_state 16).

    python3 benchmarks/gpu_scan_decode.py --out $OUT/scan_decode.json
    python3 benchmarks/gpu_scan_decode.py --dry-run --out /tmp/scan_decode.json   # CPU: tiny shapes, interpret mode

For each batch size, both updates are first checked against each other (f32, compiled), then timed as
``--steps`` updates chained inside one jitted ``fori_loop`` (the new state feeds the next step, so there is
no dispatch overhead in the time; best of 5). The bandwidth counts the state read and written (f32) plus
x, dt, z (bf16), B, C and y; it is compared with the measured copy bandwidth (``common.copy_bandwidth``).
The JSON is rewritten after every batch size.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import selective_state_update, selective_state_update_pallas

from common import Report, copy_bandwidth, environment, log, time_call


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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="scan_decode.json")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes, Pallas interpret mode (CPU)")
    p.add_argument("--steps", type=int, default=200)
    a = p.parse_args()
    interpret = a.dry_run
    d_inner, d_state, batches, steps = (64, 4, (1, 2), 3) if a.dry_run else (8192, 16, (1, 8, 32, 128), a.steps)
    report = Report(a.out, {**environment(), "dry_run": a.dry_run, "steps": steps, "d_inner": d_inner,
                            "d_state": d_state, "rows": []})
    data = report.data
    data["copy_GBps"] = copy_bandwidth() / 1e9
    log(f"{data['card']} jax {data['jax_version']}; copy {data['copy_GBps']:.0f} GB/s")
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
                t = time_call(chained(update, steps), state, args, runs=5).best / steps
                nbytes = batch * (d_inner * d_state * 8 + d_inner * (3 * 2 + 4) + 2 * d_state * 2)
                row = {"impl": name, "batch": batch, "us_per_step": 1e6 * t, "rel_err_vs_xla": err,
                       "GBps": nbytes / t / 1e9, "fraction_of_copy": nbytes / t / 1e9 / data["copy_GBps"]}
                log(row)
                report.add("rows", row)
            except Exception as e:  # noqa: BLE001 -- keep the other implementations and batch sizes
                report.error(f"{name} batch {batch}", e)
    report.write(finished=True)
    log(f"wrote {a.out}")


if __name__ == "__main__":
    main()
