"""GPU benchmark of the Pallas selective scan against the XLA scans (Jamba-1.5-Mini shapes).

Run from the repository root on a GPU machine:

    python3 benchmarks/gpu_selective_scan.py --out $OUT/scan.json

It prints the JAX version and device, checks the Pallas kernel (compiled, not interpreted) against
``selective_scan_sequential`` on a small random case and a Mini-shaped case, measures copy
bandwidth, times several kernel configurations and the two XLA scans at d_inner 8192, d_state 16,
batch 1, bf16 activations, lengths 4096/16384/65536, prints a table and writes JSON. At each
length every timed configuration's output is also compared with the first one's (``consistency``).
``--variants`` keeps only the named kernel variants and ``--configs`` only the listed entries of
``CONFIGS``; the best ``--top-k`` configurations at the
first length, plus the best of each variant, are carried to the longer lengths. Every section
is guarded, so one failing lowering or an out-of-memory does not stop the rest, and a time budget
(``--budget``, seconds) skips whatever would run past it.

``--dry-run`` runs the same code on tiny shapes in Pallas interpret mode (for CPU-only machines).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jamba_jax.scan import selective_scan_associative, selective_scan_sequential  # noqa: E402
from pallas_kernels.selective_scan import selective_scan_pallas  # noqa: E402

# (variant, block_d, chunk, num_warps, segments); the first of each variant is also used for the
# correctness checks. segments only matters for "segmented" (None: the kernel's automatic choice).
CONFIGS = [
    ("unroll", 32, 8, 1, None),  # the module default
    ("unroll", 8, 8, 1, None),
    ("unroll", 8, 16, 1, None),
    ("unroll", 16, 8, 1, None),
    ("unroll", 32, 16, 1, None),
    ("unroll", 64, 8, 2, None),
    ("unroll", 64, 8, 4, None),
    ("loop", 32, 1, 1, None),
    ("loop", 8, 1, 1, None),
    ("tile", 32, 16, 1, None),
    ("tile", 8, 16, 1, None),
    ("segmented", 8, 16, 1, 4),
    ("segmented", 8, 16, 1, 8),
    ("segmented", 8, 16, 1, 16),
    ("segmented", 8, 8, 1, 32),
    ("segmented", 16, 8, 1, 16),
    ("segmented", 32, 8, 1, 8),
    ("segmented", 32, 8, 1, 16),
    ("segmented", 32, 8, 1, 32),
    ("segmented", 32, 8, 1, 64),
    ("segmented", 32, 8, 1, None),
    ("segmented", 32, 16, 1, None),
    ("segmented", 32, 4, 1, None),
    ("segmented", 64, 8, 2, None),
]
TOP_K = 3  # configs carried from the shortest length to the longer ones (plus each variant's best)
REL_TOL = 1e-4  # correctness threshold (f32 vs f32 on GPU; CPU tests use 1e-5)
SEQUENTIAL_MAX_S = 20.0  # default of --sequential-max-s


class Budget:
    def __init__(self, seconds):
        self.start, self.seconds = time.perf_counter(), seconds

    def left(self):
        return self.seconds - (time.perf_counter() - self.start)


def log(*a):
    print(*a, flush=True)


def short_error(e, lines=6):
    text = "".join(traceback.format_exception_only(type(e), e)).strip().splitlines()
    return "\n".join(text[:lines])


def block(tree):
    return jax.tree_util.tree_map(lambda a: a.block_until_ready(), tree)


def time_fn(fn, *args, runs=5, max_seconds=10.0):
    """Median wall time (s) of ``fn(*args)`` after one warm-up call (which also compiles); fewer
    runs when one call is slow, so the whole measurement stays near ``max_seconds``."""
    block(fn(*args))
    t0 = time.perf_counter()
    block(fn(*args))
    first = time.perf_counter() - t0
    times = [first]
    n = int(min(runs, max(1, max_seconds / max(first, 1e-6)))) - 1
    for _ in range(n):
        t0 = time.perf_counter()
        block(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_inputs(key, batch, seq, d_inner, d_state, dtype, *, state=False, mask=False):
    ks = jax.random.split(key, 10)
    n = lambda k, s, dt=dtype: jax.random.normal(k, s, jnp.float32).astype(dt)
    args = dict(
        x=n(ks[0], (batch, seq, d_inner)), dt=(n(ks[1], (batch, seq, d_inner), jnp.float32) - 1.0).astype(dtype),
        A=-jnp.exp(0.5 * n(ks[2], (d_inner, d_state), jnp.float32)), B=n(ks[3], (batch, seq, d_state)),
        C=n(ks[4], (batch, seq, d_state)), D=n(ks[5], (d_inner,), jnp.float32),
        z=n(ks[6], (batch, seq, d_inner)), dt_bias=0.3 * n(ks[7], (d_inner,), jnp.float32),
    )
    kw = {}
    if state:
        kw["initial_state"] = n(ks[8], (batch, d_inner, d_state), jnp.float32)
    if mask:
        m = jax.random.uniform(ks[9], (batch, seq)) > 0.2
        kw["mask"] = m.at[0, : seq // 4].set(False)
    return args, kw


def order(a):
    return (a["x"], a["dt"], a["A"], a["B"], a["C"], a["D"], a["z"], a["dt_bias"])


def pallas_fn(cfg, interpret):
    variant, block_d, chunk, num_warps, segments = cfg
    return jax.jit(functools.partial(selective_scan_pallas, block_d=block_d, chunk=chunk, variant=variant,
                                     segments=segments, num_warps=num_warps, interpret=interpret))


@jax.jit
def device_rel_err(got, ref):
    return jnp.max(jnp.abs(got - ref)) / jnp.maximum(jnp.max(jnp.abs(ref)), 1e-30)


def rel_err(got, ref):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(got - ref)) / max(float(np.max(np.abs(ref))), 1e-30))


def cfg_name(cfg):
    name = f"{cfg[0]} bd={cfg[1]} T={cfg[2]} w={cfg[3]}"
    if cfg[0] == "segmented":
        name += f" S={cfg[4] if cfg[4] else 'auto'}"
    return name


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="scan.json")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes, Pallas interpret mode (CPU)")
    p.add_argument("--budget", type=float, default=180.0, help="seconds; later sections are skipped")
    p.add_argument("--lengths", default=None, help="comma-separated sequence lengths")
    p.add_argument("--variants", default=None, help="comma-separated kernel variants to keep (default: all)")
    p.add_argument("--configs", default=None, help="comma-separated indices into CONFIGS, ranges a-b allowed")
    p.add_argument("--top-k", type=int, default=TOP_K, help="configs carried to the longer lengths")
    p.add_argument("--sequential-max-s", type=float, default=SEQUENTIAL_MAX_S,
                   help="skip the lax.scan oracle where one call is estimated to take longer")
    a = p.parse_args()

    budget = Budget(a.budget)
    dry = a.dry_run
    interpret = dry
    d_inner, d_state, batch = (64, 16, 1) if dry else (8192, 16, 1)
    lengths = [int(s) for s in a.lengths.split(",")] if a.lengths else ([32, 64] if dry else [4096, 16384, 65536])
    configs = CONFIGS[:2] + [CONFIGS[7], CONFIGS[9], CONFIGS[11], CONFIGS[-1]] if dry else CONFIGS
    if a.configs:
        picked = []
        for part in a.configs.split(","):
            lo, _, hi = part.partition("-")
            picked += range(int(lo), int(hi or lo) + 1)
        configs = [CONFIGS[i] for i in picked]
    if a.variants:
        keep = a.variants.split(",")
        configs = [c for c in configs if c[0] in keep]
    act_dtype = jnp.bfloat16

    dev = jax.devices()[0]
    report = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        jax_version=jax.__version__, device=str(dev), card=getattr(dev, "device_kind", str(dev)),
        platform=dev.platform, dry_run=dry, shapes=dict(d_inner=d_inner, d_state=d_state, batch=batch,
                                                         lengths=lengths, activations=str(jnp.dtype(act_dtype))),
        correctness=[], timings=[], errors=[], copy_bandwidth_GBps=None,
    )
    log(f"jax {jax.__version__}  device {dev}  kind {report['card']}  dry_run={dry}")

    def record_error(where, e):
        msg = short_error(e)
        log(f"  !! {where}: {msg}")
        report["errors"].append(dict(where=where, error=msg))

    def write():
        with open(a.out, "w") as f:
            json.dump(report, f, indent=2)

    # ---- correctness -------------------------------------------------------------------------
    seq_ref = jax.jit(selective_scan_sequential)
    checks = [("small", (2, 48 if dry else 300, 40 if dry else 200, 12), True, True),
              ("mini", (1, 40 if dry else 512, d_inner, d_state), False, False)]
    for name, (b, L, d, s), state, mask in checks:
        try:
            args, kw = make_inputs(jax.random.PRNGKey(1), b, L, d, s, act_dtype if name == "mini" else jnp.float32,
                                   state=state, mask=mask)
            y_ref, h_ref = block(seq_ref(*order(args), **kw))
        except Exception as e:
            record_error(f"correctness {name}: reference", e)
            continue
        for variant in dict.fromkeys(c[0] for c in configs):
            cfg = next(c for c in configs if c[0] == variant)
            try:
                y, h = block(pallas_fn(cfg, interpret)(*order(args), **kw))
                ey, eh = rel_err(y, y_ref), rel_err(h, h_ref)
                ok = ey < REL_TOL and eh < REL_TOL
                report["correctness"].append(dict(case=name, shape=[b, L, d, s], config=cfg_name(cfg),
                                                  rel_err_y=ey, rel_err_state=eh, ok=ok))
                log(f"correctness {name:5s} {cfg_name(cfg):30s} rel_err y {ey:.2e} state {eh:.2e} "
                    f"{'OK' if ok else 'FAIL'}")
            except Exception as e:
                record_error(f"correctness {name} {cfg_name(cfg)}", e)
    write()

    # ---- copy bandwidth ----------------------------------------------------------------------
    try:
        n = (1 << 16) if dry else (1 << 28)  # 1 GiB of f32 on the GPU
        buf = jnp.ones((n,), jnp.float32)
        copy = jax.jit(lambda v: v + 1.0)
        t = time_fn(copy, buf, runs=10, max_seconds=3.0)
        report["copy_bandwidth_GBps"] = 2 * n * 4 / t / 1e9
        log(f"copy bandwidth: {report['copy_bandwidth_GBps']:.1f} GB/s (read+write of {n * 4 / 2**30:.2f} GiB)")
        del buf
    except Exception as e:
        record_error("copy bandwidth", e)
    copy_bw = report["copy_bandwidth_GBps"]
    write()

    # ---- timings -----------------------------------------------------------------------------
    def io_bytes(L):
        item = jnp.dtype(act_dtype).itemsize
        return batch * L * (3 * d_inner * item + 2 * d_state * item + 4 * d_inner)

    def add_timing(impl, cfg, L, t, note=""):
        gbps = io_bytes(L) / t / 1e9
        row = dict(impl=impl, config=cfg, seq=L, ms=t * 1e3, GBps=gbps,
                   frac_of_copy=(gbps / copy_bw) if copy_bw else None, note=note)
        report["timings"].append(row)
        frac = f"{row['frac_of_copy']:.2f}" if copy_bw else "-"
        log(f"  {impl:11s} {cfg:30s} L={L:6d} {t * 1e3:10.3f} ms {gbps:8.1f} GB/s  frac {frac} {note}")
        write()

    pallas_best = {}
    seq_t_per_pos = None
    for li, L in enumerate(lengths):
        if budget.left() < 15:
            log(f"budget exhausted; skipping L={L} and later")
            report["errors"].append(dict(where=f"L={L}", error="skipped: time budget"))
            break
        log(f"--- L={L} ---")
        try:
            args, _ = make_inputs(jax.random.PRNGKey(L), batch, L, d_inner, d_state, act_dtype)
            block(args)
        except Exception as e:
            record_error(f"inputs L={L}", e)
            continue
        if li == 0:
            todo = configs
        else:
            ranked = [c for c, _ in sorted(pallas_best.items(), key=lambda kv: kv[1])]
            todo = list(dict.fromkeys(ranked[: a.top_k] + [next(c for c in ranked if c[0] == v)
                                                            for v in dict.fromkeys(c[0] for c in ranked)]))
        first_out = None
        for cfg in todo:
            if budget.left() < 10:
                report["errors"].append(dict(where=f"pallas {cfg_name(cfg)} L={L}", error="skipped: time budget"))
                continue
            try:
                fn = pallas_fn(cfg, interpret)
                t = time_fn(fn, *order(args), runs=5, max_seconds=3.0)
                if li == 0:
                    pallas_best[cfg] = t
                out = block(fn(*order(args)))
                if first_out is None:
                    first_out, note = out, "reference for consistency"
                else:
                    ey, eh = (float(device_rel_err(o, r)) for o, r in zip(out, first_out))
                    report.setdefault("consistency", []).append(
                        dict(config=cfg_name(cfg), seq=L, rel_diff_y=ey, rel_diff_state=eh))
                    note = f"vs first: y {ey:.1e} h {eh:.1e}"
                del out
                add_timing("pallas", cfg_name(cfg), L, t, note)
            except Exception as e:
                record_error(f"pallas {cfg_name(cfg)} L={L}", e)
        del first_out
        if budget.left() > 20:
            try:
                assoc = jax.jit(selective_scan_associative)
                add_timing("associative", "chunk=256", L, time_fn(assoc, *order(args), runs=3, max_seconds=5.0))
            except Exception as e:
                record_error(f"associative L={L}", e)
        est = None if seq_t_per_pos is None else seq_t_per_pos * L
        if est is not None and (est > a.sequential_max_s or 2 * est > budget.left() - 10):
            log(f"  sequential skipped at L={L} (estimated {est:.1f} s per call)")
            report["errors"].append(dict(where=f"sequential L={L}", error=f"skipped: estimated {est:.1f} s"))
        elif budget.left() > 20:
            try:
                t = time_fn(seq_ref, *order(args), runs=3, max_seconds=5.0)
                seq_t_per_pos = t / L
                add_timing("sequential", "lax.scan", L, t)
            except Exception as e:
                record_error(f"sequential L={L}", e)
        del args

    # ---- summary -----------------------------------------------------------------------------
    log("\n=== summary (" + report["card"] + ") ===")
    if copy_bw:
        log(f"copy bandwidth {copy_bw:.1f} GB/s")
    log(f"{'impl':11s} {'config':30s} {'L':>6s} {'ms':>10s} {'GB/s':>8s} {'frac':>5s}")
    for r in report["timings"]:
        frac = f"{r['frac_of_copy']:.2f}" if r["frac_of_copy"] is not None else "-"
        log(f"{r['impl']:11s} {r['config']:30s} {r['seq']:6d} {r['ms']:10.3f} {r['GBps']:8.1f} {frac:>5s}")
    for L in lengths:
        rows = {r["impl"]: r for r in sorted(report["timings"], key=lambda r: -r["ms"]) if r["seq"] == L}
        if "pallas" in rows:
            best, others = rows["pallas"], [k for k in ("associative", "sequential") if k in rows]
            vs = ", ".join(f"{k} takes {rows[k]['ms'] / best['ms']:.2f}x as long" for k in others)
            log(f"best pallas at L={L}: {best['config']} {best['ms']:.3f} ms" + (f" ({vs})" if vs else ""))
            report.setdefault("best_pallas", {})[str(L)] = dict(config=best["config"], ms=best["ms"])
    for c in report["correctness"]:
        log(f"correctness {c['case']:5s} {c['config']:30s} y {c['rel_err_y']:.2e} state {c['rel_err_state']:.2e}"
            f" {'OK' if c['ok'] else 'FAIL'}")
    if report["errors"]:
        log(f"{len(report['errors'])} errors/skips (see JSON)")
    report["elapsed_s"] = time.perf_counter() - budget.start
    write()
    log(f"wrote {a.out} in {report['elapsed_s']:.1f} s")


if __name__ == "__main__":
    main()
