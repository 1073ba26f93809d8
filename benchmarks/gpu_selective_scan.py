"""GPU benchmark of the Pallas selective scan against the XLA scans (Jamba-1.5-Mini shapes).

    python3 benchmarks/gpu_selective_scan.py --out $OUT/scan.json [--configs 20-23] [--lengths 4096,65536]
    python3 benchmarks/gpu_selective_scan.py --dry-run --out /tmp/scan.json   # CPU: tiny shapes, interpret mode

It checks the Pallas kernel (compiled, not interpreted) against ``selective_scan_sequential`` on a small
random case and a Mini-shaped case, measures the copy bandwidth (``common.copy_bandwidth``), times several
kernel configurations and the two XLA scans at d_inner 8192, d_state 16, batch 1, bf16 activations, lengths
4096/16384/65536 (the median of up to 5 calls after a compile), prints a table and writes JSON. At each
length every timed configuration's output is also compared with the first one's (``consistency``).
``--variants`` keeps only the named kernel variants and ``--configs`` only the listed entries of
``CONFIGS``; the best ``--top-k`` configurations at the first length, plus the best of each variant, are
carried to the longer lengths. Every section is guarded, so one failing lowering or an out-of-memory does
not stop the rest, the JSON is rewritten after each, and a time budget (``--budget``, seconds since the
start) skips whatever would run past it.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp

from jamba_jax.scan import selective_scan_associative, selective_scan_sequential
from pallas_kernels import selective_scan_pallas

from common import Report, copy_bandwidth, environment, log, rel_err, time_call

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


def make_inputs(key, batch, seq, d_inner, d_state, dtype, *, state=False, mask=False):
    ks = jax.random.split(key, 10)
    n = lambda k, s, dt=dtype: jax.random.normal(k, s, jnp.float32).astype(dt)  # noqa: E731
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


def cfg_name(cfg):
    name = f"{cfg[0]} bd={cfg[1]} T={cfg[2]} w={cfg[3]}"
    if cfg[0] == "segmented":
        name += f" S={cfg[4] if cfg[4] else 'auto'}"
    return name


def pick_configs(a):
    """The ``CONFIGS`` entries ``--configs`` and ``--variants`` keep (a few of each variant in a dry run)."""
    configs = CONFIGS[:2] + [CONFIGS[7], CONFIGS[9], CONFIGS[11], CONFIGS[-1]] if a.dry_run else CONFIGS
    if a.configs:
        picked = []
        for part in a.configs.split(","):
            lo, _, hi = part.partition("-")
            picked += range(int(lo), int(hi or lo) + 1)
        configs = [CONFIGS[i] for i in picked]
    if a.variants:
        keep = a.variants.split(",")
        configs = [c for c in configs if c[0] in keep]
    return configs


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

    dry = a.dry_run
    interpret = dry
    d_inner, d_state, batch = (64, 16, 1) if dry else (8192, 16, 1)
    lengths = [int(s) for s in a.lengths.split(",")] if a.lengths else ([32, 64] if dry else [4096, 16384, 65536])
    configs = pick_configs(a)
    act_dtype = jnp.bfloat16

    report = Report(a.out, dict(
        **environment(), dry_run=dry, shapes=dict(d_inner=d_inner, d_state=d_state, batch=batch, lengths=lengths,
                                                  activations=str(jnp.dtype(act_dtype))),
        correctness=[], timings=[], copy_bandwidth_GBps=None,
    ), budget=a.budget)
    data = report.data
    log(f"jax {data['jax_version']}  device {data['device']}  kind {data['card']}  dry_run={dry}")

    # ---- correctness -------------------------------------------------------------------------
    seq_ref = jax.jit(selective_scan_sequential)
    checks = [("small", (2, 48 if dry else 300, 40 if dry else 200, 12), True, True),
              ("mini", (1, 40 if dry else 512, d_inner, d_state), False, False)]
    for name, (b, L, d, s), state, mask in checks:
        try:
            args, kw = make_inputs(jax.random.PRNGKey(1), b, L, d, s, act_dtype if name == "mini" else jnp.float32,
                                   state=state, mask=mask)
            y_ref, h_ref = jax.block_until_ready(seq_ref(*order(args), **kw))
        except Exception as e:
            report.error(f"correctness {name}: reference", e)
            continue
        for variant in dict.fromkeys(c[0] for c in configs):
            cfg = next(c for c in configs if c[0] == variant)
            try:
                y, h = jax.block_until_ready(pallas_fn(cfg, interpret)(*order(args), **kw))
                ey, eh = rel_err(y, y_ref), rel_err(h, h_ref)
                ok = ey < REL_TOL and eh < REL_TOL
                report.add("correctness", dict(case=name, shape=[b, L, d, s], config=cfg_name(cfg),
                                               rel_err_y=ey, rel_err_state=eh, ok=ok))
                log(f"correctness {name:5s} {cfg_name(cfg):30s} rel_err y {ey:.2e} state {eh:.2e} "
                    f"{'OK' if ok else 'FAIL'}")
            except Exception as e:
                report.error(f"correctness {name} {cfg_name(cfg)}", e)

    # ---- copy bandwidth ----------------------------------------------------------------------
    try:
        data["copy_bandwidth_GBps"] = copy_bandwidth() / 1e9
        log(f"copy bandwidth: {data['copy_bandwidth_GBps']:.1f} GB/s")
    except Exception as e:
        report.error("copy bandwidth", e)
    copy_bw = data["copy_bandwidth_GBps"]
    report.write()

    # ---- timings -----------------------------------------------------------------------------
    def io_bytes(L):
        item = jnp.dtype(act_dtype).itemsize
        return batch * L * (3 * d_inner * item + 2 * d_state * item + 4 * d_inner)

    def add_timing(impl, cfg, L, t, note=""):
        gbps = io_bytes(L) / t / 1e9
        row = dict(impl=impl, config=cfg, seq=L, ms=t * 1e3, GBps=gbps,
                   frac_of_copy=(gbps / copy_bw) if copy_bw else None, note=note)
        frac = f"{row['frac_of_copy']:.2f}" if copy_bw else "-"
        log(f"  {impl:11s} {cfg:30s} L={L:6d} {t * 1e3:10.3f} ms {gbps:8.1f} GB/s  frac {frac} {note}")
        report.add("timings", row)

    pallas_best = {}
    seq_t_per_pos = None
    for li, L in enumerate(lengths):
        if not report.have_time(f"L={L} and later", 15):
            break
        log(f"--- L={L} ---")
        try:
            args, _ = make_inputs(jax.random.PRNGKey(L), batch, L, d_inner, d_state, act_dtype)
            jax.block_until_ready(args)
        except Exception as e:
            report.error(f"inputs L={L}", e)
            continue
        if li == 0:
            todo = configs
        else:
            ranked = [c for c, _ in sorted(pallas_best.items(), key=lambda kv: kv[1])]
            todo = list(dict.fromkeys(ranked[: a.top_k] + [next(c for c in ranked if c[0] == v)
                                                            for v in dict.fromkeys(c[0] for c in ranked)]))
        first_out = None
        for cfg in todo:
            if not report.have_time(f"pallas {cfg_name(cfg)} L={L}", 10):
                continue
            try:
                timing = time_call(pallas_fn(cfg, interpret), *order(args), runs=5, max_seconds=3.0)
                t, out = timing.median, timing.output
                if li == 0:
                    pallas_best[cfg] = t
                if first_out is None:
                    first_out, note = out, "reference for consistency"
                else:
                    ey, eh = (float(device_rel_err(o, r)) for o, r in zip(out, first_out))
                    report.add("consistency", dict(config=cfg_name(cfg), seq=L, rel_diff_y=ey, rel_diff_state=eh))
                    note = f"vs first: y {ey:.1e} h {eh:.1e}"
                del out, timing
                add_timing("pallas", cfg_name(cfg), L, t, note)
            except Exception as e:
                report.error(f"pallas {cfg_name(cfg)} L={L}", e)
        del first_out
        if report.left() > 20:
            try:
                assoc = jax.jit(selective_scan_associative)
                add_timing("associative", "chunk=256", L,
                           time_call(assoc, *order(args), runs=3, max_seconds=5.0).median)
            except Exception as e:
                report.error(f"associative L={L}", e)
        est = None if seq_t_per_pos is None else seq_t_per_pos * L
        if est is not None and (est > a.sequential_max_s or 2 * est > report.left() - 10):
            report.error(f"sequential L={L}", f"skipped: estimated {est:.1f} s")
        elif report.left() > 20:
            try:
                t = time_call(seq_ref, *order(args), runs=3, max_seconds=5.0).median
                seq_t_per_pos = t / L
                add_timing("sequential", "lax.scan", L, t)
            except Exception as e:
                report.error(f"sequential L={L}", e)
        del args

    # ---- summary -----------------------------------------------------------------------------
    log("=== summary (" + data["card"] + ") ===")
    if copy_bw:
        log(f"copy bandwidth {copy_bw:.1f} GB/s")
    log(f"{'impl':11s} {'config':30s} {'L':>6s} {'ms':>10s} {'GB/s':>8s} {'frac':>5s}")
    for r in data["timings"]:
        frac = f"{r['frac_of_copy']:.2f}" if r["frac_of_copy"] is not None else "-"
        log(f"{r['impl']:11s} {r['config']:30s} {r['seq']:6d} {r['ms']:10.3f} {r['GBps']:8.1f} {frac:>5s}")
    for L in lengths:
        rows = {r["impl"]: r for r in sorted(data["timings"], key=lambda r: -r["ms"]) if r["seq"] == L}
        if "pallas" in rows:
            best, others = rows["pallas"], [k for k in ("associative", "sequential") if k in rows]
            vs = ", ".join(f"{k} takes {rows[k]['ms'] / best['ms']:.2f}x as long" for k in others)
            log(f"best pallas at L={L}: {best['config']} {best['ms']:.3f} ms" + (f" ({vs})" if vs else ""))
            data.setdefault("best_pallas", {})[str(L)] = dict(config=best["config"], ms=best["ms"])
    for c in data["correctness"]:
        log(f"correctness {c['case']:5s} {c['config']:30s} y {c['rel_err_y']:.2e} state {c['rel_err_state']:.2e}"
            f" {'OK' if c['ok'] else 'FAIL'}")
    if data["errors"]:
        log(f"{len(data['errors'])} errors/skips (see JSON)")
    report.write(finished=True)
    log(f"wrote {a.out} in {data['elapsed_s']:.1f} s")


if __name__ == "__main__":
    main()
