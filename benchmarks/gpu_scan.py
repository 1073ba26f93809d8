"""GPU benchmark of the single-pass selective-scan kernel against the two-pass one, the XLA scans and the copy
bandwidth, and of the decode-step state update (Jamba-1.5-Mini shapes: d_inner 8192, d_state 16, batch 1,
bf16 x/dt/z/B/C, fp32 state).

    python3 benchmarks/gpu_scan.py --out $OUT/gpu_scan.json                 # H100/H200, under 8 minutes
    python3 benchmarks/gpu_scan.py --dry-run --out /tmp/gpu_scan.json       # CPU: tiny shapes, interpret mode

In order, each section guarded (an error or out-of-memory is recorded and the rest goes on) and the JSON
rewritten after every row:

1. correctness: every kernel configuration, compiled, against ``selective_scan_sequential`` (f32) on a small
   case with a mask, an initial state and a length that is not a multiple of the chunk, and the default
   configurations on a Mini-width case;
2. the copy bandwidth (``common.copy_bandwidth``: read + write of 1 GiB of f32);
3. the decode update, ``selective_state_update_pallas`` and the fused XLA ``selective_state_update``, at
   batch 1 to 128: updates chained in one ``fori_loop`` (``gpu_scan_decode.chained``), state read and
   written once per step;
4. at each length (16K, 64K, 256K): the two-pass kernel with ``PALLAS_SCAN_CONFIG`` (the reference output
   at that length), the single-pass kernel at every configuration of ``SINGLE_PASS`` (block_d, chunk,
   polynomial share of the exp2s, prefetch, warps), each output compared with the two-pass one, then the
   associative and (while a call is estimated under ``--sequential-max-s``) the sequential scan.

Every row has ``kernel``, ``config``, ``batch``, ``length``, ``ms`` (median of up to 5 calls after a compile),
``GBps`` (necessary traffic: x, dt, z, B, C read in bf16 and y written in f32; for the update, the state
read and written in f32 plus its inputs and y) and ``fraction_of_copy_bandwidth``. ``--budget-s`` (seconds
since the start) skips whatever would run past it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jamba_jax.scan import (PALLAS_SCAN_CONFIG, PALLAS_SINGLE_PASS_CONFIG, selective_scan_associative,
                            selective_scan_sequential)
from pallas_kernels import selective_scan_pallas, selective_state_update, selective_state_update_pallas
from pallas_kernels.selective_scan_single_pass import selective_scan_single_pass

from common import Report, copy_bandwidth, environment, log, rel_err, script_parser, time_call
from gpu_scan_decode import chained, inputs as update_inputs

# Single-pass configurations: (block_d, chunk, poly_fraction, prefetch, num_warps). The polynomial share is
# swept at block_d 8 (1024 programs at batch 1) and 32 (256 programs, the two-pass kernel's width); the
# estimate in docs/selective_scan.md puts the best share near 1/16 to 1/8, hence the finer steps there.
# Without prefetch and polynomial the kernel walks the sequence as the two-pass module's "unroll" variant.
SINGLE_PASS = [
    (8, 8, 0.0, True, 1), (8, 8, 0.125, True, 1), (8, 8, 0.25, True, 1), (8, 8, 0.5, True, 1),
    (8, 8, 1.0, True, 1), (8, 8, 0.125, False, 1), (8, 16, 0.0625, True, 1), (8, 4, 0.25, True, 1),
    (32, 4, 0.0, True, 1), (32, 4, 0.25, True, 1), (32, 8, 0.125, True, 1), (32, 4, 0.0, False, 1),
    (16, 8, 0.125, True, 1), (4, 8, 0.125, True, 1),
]
DRY_SINGLE_PASS = [(16, 4, 0.0, False, 1), (16, 4, 0.5, True, 1), (16, 4, 1.0, True, 1)]
REL_TOL = 1e-4  # compiled f32 kernels against the f32 lax.scan (the CPU tests hold interpret mode to 1e-5)
UPDATE_BATCHES = (1, 8, 32, 64, 128)
UPDATE_STEPS = 200


def scan_inputs(key, batch, seq, d_inner, d_state, dtype, *, state=False, mask=False):
    """Random scan operands in the kernels' order (x, dt, A, B, C, D, z, dt_bias) and the keyword arguments
    (initial_state, mask) asked for. dt is centred at -1 (softplus ~0.3) so states keep a memory."""
    ks = jax.random.split(key, 10)
    n = lambda k, s, dt=dtype: jax.random.normal(k, s, jnp.float32).astype(dt)  # noqa: E731
    args = (n(ks[0], (batch, seq, d_inner)), (n(ks[1], (batch, seq, d_inner), jnp.float32) - 1.0).astype(dtype),
            -jnp.exp(0.5 * n(ks[2], (d_inner, d_state), jnp.float32)), n(ks[3], (batch, seq, d_state)),
            n(ks[4], (batch, seq, d_state)), n(ks[5], (d_inner,), jnp.float32), n(ks[6], (batch, seq, d_inner)),
            0.3 * n(ks[7], (d_inner,), jnp.float32))
    kw = {}
    if state:
        kw["initial_state"] = n(ks[8], (batch, d_inner, d_state), jnp.float32)
    if mask:
        kw["mask"] = (jax.random.uniform(ks[9], (batch, seq)) > 0.2).at[0, : seq // 4].set(False)
    return args, kw


def single_name(cfg):
    block_d, chunk, frac, prefetch, warps = cfg
    return f"bd={block_d} T={chunk} poly={frac:g}{' prefetch' if prefetch else ''} w={warps}"


def kernels(a, interpret):
    """{(kernel, config name): jitted scan} for the two-pass kernel and every single-pass configuration."""
    two_pass = dict(PALLAS_SCAN_CONFIG)
    if a.dry_run:  # short sequences: force two segments so that both passes run
        two_pass.update(segments=2)
    name = "segmented bd={block_d} T={chunk} S={segments} w={num_warps}".format(**two_pass)
    out = {("two-pass", name): jax.jit(functools.partial(selective_scan_pallas, interpret=interpret, **two_pass))}
    for cfg in (DRY_SINGLE_PASS if a.dry_run else SINGLE_PASS):
        block_d, chunk, frac, prefetch, warps = cfg
        out[("single-pass", single_name(cfg))] = jax.jit(functools.partial(
            selective_scan_single_pass, block_d=block_d, chunk=chunk, poly_fraction=frac, prefetch=prefetch,
            num_warps=warps, interpret=interpret))
    return out


@jax.jit
def device_rel_err(got, ref):
    return jnp.max(jnp.abs(got - ref)) / jnp.maximum(jnp.max(jnp.abs(ref)), 1e-30)


def main():
    p = script_parser(__doc__, out=None, budget_s=420.0, dry_run="tiny shapes, Pallas interpret mode (CPU)")
    p.add_argument("--lengths", default=None, help="comma-separated sequence lengths (default 16K, 64K, 256K)")
    p.add_argument("--sequential-max-s", type=float, default=6.0,
                   help="skip the lax.scan where one call is estimated to take longer")
    a = p.parse_args()
    dry = interpret = a.dry_run
    d_inner, d_state, batch = (64, 16, 1) if dry else (8192, 16, 1)
    lengths = [int(s) for s in a.lengths.split(",")] if a.lengths else ([40] if dry else [16384, 65536, 262144])
    act = jnp.bfloat16
    impls = kernels(a, interpret)
    c = PALLAS_SINGLE_PASS_CONFIG
    default_single = single_name(DRY_SINGLE_PASS[1] if dry else
                                 (c["block_d"], c["chunk"], c["poly_fraction"], c["prefetch"], c["num_warps"]))

    report = Report(a.out, dict(**environment(), dry_run=dry, shapes=dict(
        d_inner=d_inner, d_state=d_state, batch=batch, lengths=lengths, activations="bfloat16", state="float32"),
        single_pass_default=PALLAS_SINGLE_PASS_CONFIG, two_pass_default=PALLAS_SCAN_CONFIG,
        correctness=[], rows=[], copy_bandwidth_GBps=None), budget=a.budget_s)
    data = report.data
    log(f"jax {data['jax_version']}  device {data['device']}  card {data['card']}  dry_run={dry}")

    # ---- 1. correctness ------------------------------------------------------------------------
    sequential = jax.jit(selective_scan_sequential)
    checks = [("small", (2, 45 if dry else 301, 40 if dry else 200, 12), jnp.float32, True),
              ("mini", (1, 24 if dry else 512, d_inner, d_state), act, False)]
    for case, (b, L, d, s), dtype, extras in checks:
        try:
            args, kw = scan_inputs(jax.random.key(1), b, L, d, s, dtype, state=extras, mask=extras)
            ref = jax.block_until_ready(sequential(*args, **kw))
        except Exception as e:  # noqa: BLE001 -- keep the other sections
            report.error(f"correctness {case}: reference", e)
            continue
        for (kernel, cfg), fn in impls.items():
            if case == "mini" and kernel == "single-pass" and cfg != default_single:
                continue  # Mini width: the default configurations only
            try:
                y, h = jax.block_until_ready(fn(*args, **kw))
                ey, eh = rel_err(y, ref[0]), rel_err(h, ref[1])
                ok = ey < REL_TOL and eh < REL_TOL
                report.add("correctness", dict(case=case, shape=[b, L, d, s], kernel=kernel, config=cfg,
                                               rel_err_y=ey, rel_err_state=eh, ok=ok))
                log(f"correctness {case:5s} {kernel:11s} {cfg:34s} y {ey:.1e} state {eh:.1e} {'OK' if ok else 'FAIL'}")
            except Exception as e:  # noqa: BLE001
                report.error(f"correctness {case} {kernel} {cfg}", e)

    # ---- 2. copy bandwidth ---------------------------------------------------------------------
    try:
        data["copy_bandwidth_GBps"] = copy_bandwidth() / 1e9
        log(f"copy bandwidth {data['copy_bandwidth_GBps']:.0f} GB/s")
    except Exception as e:  # noqa: BLE001
        report.error("copy bandwidth", e)
    copy_bw = data["copy_bandwidth_GBps"]

    def add_row(kernel, cfg, b, length, seconds, nbytes, **extra):
        gbps = nbytes / seconds / 1e9
        row = dict(kernel=kernel, config=cfg, batch=b, length=length, ms=seconds * 1e3, GBps=gbps,
                   fraction_of_copy_bandwidth=gbps / copy_bw if copy_bw else None, **extra)
        frac = f"{row['fraction_of_copy_bandwidth']:.2f}" if copy_bw else "-"
        log(f"  {kernel:13s} {cfg:34s} b={b:3d} L={length:6d} {seconds * 1e3:9.3f} ms {gbps:7.0f} GB/s "
            f"of copy {frac} " + " ".join(f"{k} {v:.1e}" for k, v in extra.items()))
        report.add("rows", row)

    # ---- 3. decode update ----------------------------------------------------------------------
    updates = {"decode-xla": ("fused jnp", selective_state_update),
               "decode-pallas": ("bd=32 w=1", functools.partial(selective_state_update_pallas, interpret=interpret))}
    steps = 3 if dry else UPDATE_STEPS
    for b in ((2,) if dry else UPDATE_BATCHES):
        if not report.have_time(f"decode update batch {b}", 5):
            break
        state, args = update_inputs(jax.random.key(b), b, d_inner, d_state)
        nbytes = b * (d_inner * d_state * 8 + d_inner * (3 * 2 + 4) + 2 * d_state * 2)
        ref = None
        for kernel, (cfg, update) in updates.items():
            try:
                one = jax.jit(update)(state, *args)
                ref = one if ref is None else ref
                err = max(rel_err(g, r) for g, r in zip(one, ref))
                t = time_call(chained(update, steps), state, args, runs=5).best / steps
                add_row(kernel, cfg, b, 1, t, nbytes, rel_diff_vs_xla=err)
            except Exception as e:  # noqa: BLE001
                report.error(f"{kernel} batch {b}", e)

    # ---- 4. scans at each length ---------------------------------------------------------------
    def scan_bytes(L):
        return batch * L * (3 * d_inner * 2 + 2 * d_state * 2 + 4 * d_inner)

    seq_s_per_pos = None
    for L in lengths:
        if not report.have_time(f"L={L} and later", 20):
            break
        log(f"--- L={L} ---")
        try:
            args, _ = scan_inputs(jax.random.key(L), batch, L, d_inner, d_state, act)
            jax.block_until_ready(args)
        except Exception as e:  # noqa: BLE001
            report.error(f"inputs L={L}", e)
            continue
        reference = None
        for (kernel, cfg), fn in impls.items():
            if not report.have_time(f"{kernel} {cfg} L={L}", 8, reserve=25):
                continue
            try:
                timing = time_call(fn, *args, runs=5, max_seconds=3.0)
                extra = {}
                if reference is None:
                    reference = timing.output
                else:
                    extra = dict(rel_diff_y=float(device_rel_err(timing.output[0], reference[0])),
                                 rel_diff_state=float(device_rel_err(timing.output[1], reference[1])))
                timing.output = None
                add_row(kernel, cfg, batch, L, timing.median, scan_bytes(L), **extra)
            except Exception as e:  # noqa: BLE001
                report.error(f"{kernel} {cfg} L={L}", e)
        del reference
        if report.have_time(f"associative L={L}", 15):
            try:
                t = time_call(jax.jit(selective_scan_associative), *args, runs=3, max_seconds=5.0).median
                add_row("associative", "chunk=256", batch, L, t, scan_bytes(L))
            except Exception as e:  # noqa: BLE001
                report.error(f"associative L={L}", e)
        est = None if seq_s_per_pos is None else seq_s_per_pos * L
        if est is not None and (est > a.sequential_max_s or 3 * est > report.left() - 10):
            report.error(f"sequential L={L}", f"skipped: a call estimated at {est:.1f} s")
        elif report.have_time(f"sequential L={L}", 15):
            try:
                t = time_call(sequential, *args, runs=3, max_seconds=5.0).median
                seq_s_per_pos = t / L
                add_row("sequential", "lax.scan", batch, L, t, scan_bytes(L))
            except Exception as e:  # noqa: BLE001
                report.error(f"sequential L={L}", e)
        del args

    # ---- summary -------------------------------------------------------------------------------
    log(f"=== summary ({data['card']}, copy {copy_bw or 0:.0f} GB/s) ===")
    summary = {}
    for L in lengths:
        rows = [r for r in data["rows"] if r["length"] == L and r["batch"] == batch]
        best = {k: min((r for r in rows if r["kernel"] == k), key=lambda r: r["ms"], default=None)
                for k in ("single-pass", "two-pass", "associative", "sequential")}
        sp = best["single-pass"]
        if sp is None:
            continue
        entry = dict(best_single_pass=sp["config"], ms=sp["ms"],
                     fraction_of_copy_bandwidth=sp["fraction_of_copy_bandwidth"])
        for k in ("two-pass", "associative", "sequential"):
            if best[k]:
                entry[f"{k}_over_single_pass"] = best[k]["ms"] / sp["ms"]
        summary[str(L)] = entry
        log(f"L={L}: best single-pass {sp['config']} {sp['ms']:.3f} ms, of copy "
            f"{sp['fraction_of_copy_bandwidth'] or 0:.2f}; " + ", ".join(
                f"{k} {v:.2f}x" for k, v in entry.items() if k.endswith("_over_single_pass")))
    data["summary"] = summary
    bad = [c for c in data["correctness"] if not c["ok"]]
    log(f"correctness: {len(data['correctness']) - len(bad)} OK, {len(bad)} FAIL; {len(data['errors'])} errors/skips")
    report.write(finished=True)
    log(f"wrote {a.out}")


if __name__ == "__main__":
    main()
