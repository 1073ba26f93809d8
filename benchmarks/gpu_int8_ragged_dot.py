"""GPU benchmark and check of the ExpertsInt8 Pallas grouped matmul (``pallas_kernels.int8_ragged_dot``).

    python3 benchmarks/gpu_int8_ragged_dot.py --out $OUT/int8.json
    python3 benchmarks/gpu_int8_ragged_dot.py --dry-run --out /tmp/int8.json   # CPU: tiny shapes, interpret mode

Sections, each guarded (an error is recorded and the script goes on), the JSON rewritten after each:

1. the environment (``common.environment``);
2. correctness on a small ragged case (every kernel design, bf16 and f32 lhs) against a float64 numpy
   reference and the XLA int8 reference;
3. timings at Jamba-1.5-Mini expert shapes (E=16, H=4096, I=14336; gate/up ``[E, 4096, 14336]``, down
   ``[E, 14336, 4096]``) for 1/8/64/256 tokens with top-2 random routing (M = 2 * tokens rows): bf16
   ``jax.lax.ragged_dot``, the XLA int8 reference (dequantize + ragged_dot), the Pallas int8 kernel over
   several block configurations, and tokamax if importable. Each time is the median of ``--iters`` calls
   after a compile and two warm-up calls, next to the per-call time of ``--iters`` calls dispatched back
   to back (``pipelined``);
4. a summary: the int8 kernel's time over bf16's and the bandwidth achieved (bytes of the touched experts'
   weights over the time).

A time budget (``--budget-s``, seconds since the start) skips the remaining configurations once spent.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.int8_ragged_dot import (int8_ragged_dot_float64, int8_ragged_dot_pallas, int8_ragged_dot_reference,
                                            quantize_int8)

from common import Report, environment, log, script_parser, short_error, time_call

DESIGNS = (("group", False), ("group", True), ("item", False), ("tile", False))  # (design, swap_ab)


def correctness(interpret: bool) -> dict:
    """Every kernel design on a small ragged case (with padding rows), bf16 and f32 lhs."""
    check = {}
    rng = np.random.default_rng(0)
    m, k, n = 40, 300, 200
    gs = jnp.asarray([0, 7, 20, 0, 9], jnp.int32)  # sum 36 < 40: padding rows
    w = jnp.asarray(rng.standard_normal((5, k, n)), jnp.float32) * 0.05
    q, s = quantize_int8(w)
    lhs32 = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    for dname, lhs in (("bf16", lhs32.astype(jnp.bfloat16)), ("f32", lhs32)):
        exact = int8_ragged_dot_float64(lhs, q, s, gs)
        denom = np.abs(exact).max()
        try:
            with jax.default_matmul_precision("highest"):
                ref = np.asarray(int8_ragged_dot_reference(lhs, q, s, gs))
            check[f"xla_ref_{dname}_relerr"] = float(np.abs(ref - exact).max() / denom)
        except Exception as e:  # noqa: BLE001
            check[f"xla_ref_{dname}_error"] = short_error(e)
        for design, swap in DESIGNS:
            key = f"pallas_{design}{'_swap' if swap else ''}_{dname}"
            try:
                out = np.asarray(int8_ragged_dot_pallas(lhs, q, s, gs, block_m=16, block_n=64, block_k=64,
                                                        design=design, swap_ab=swap, interpret=interpret))
                err = float(np.abs(out - exact).max() / denom)
                pad_zero = bool(np.all(out[int(np.sum(gs)):] == 0))
                check.update({key + "_relerr": err, key + "_padding_rows_zero": pad_zero,
                              key + "_pass": bool(err < 1e-4 and pad_zero)})
                log(f"check {key}: rel err {err:.2e} padding-zero {pad_zero}")
            except Exception as e:  # noqa: BLE001
                check[key + "_error"] = short_error(e, 15)
                check[key + "_pass"] = False
                log(f"check {key} FAILED:\n{short_error(e, 15)}")
    return check


def config(design, bm, bn, bk, warps=4, stages=4, swap=False) -> dict:
    return dict(design=design, block_m=bm, block_n=bn, block_k=bk, swap_ab=swap, num_warps=warps, num_stages=stages)


def configs_for(m: int, dry_run: bool):
    """The kernel configurations for ``m`` rows: the two timed first, then the others while time is left."""
    bm = 16 if m <= 128 else 32
    base = [config("group", bm, 128, 128), config("group", bm, 128, 128, swap=True)]
    extra = [config("item", bm, 128, 128), config("group", bm, 64, 256), config("group", bm, 256, 64),
             config("group", bm, 64, 256, swap=True), config("group", bm, 128, 256, warps=8, stages=3),
             config("tile", bm, 128, 128)]
    if m > 128:
        extra += [config("group", 64, 128, 128), config("group", 64, 256, 64),
                  config("group", 64, 128, 256, warps=8, stages=3)]
    if dry_run:
        base = [dict(c, block_n=64, block_k=64) for c in base]
        extra = [dict(c, block_n=64, block_k=64) for c in extra[:2]]
    return base, extra


def routing(tokens: int, experts: int, seed: int):
    """Group sizes of top-2 random routing of ``tokens`` tokens."""
    r = np.random.default_rng(seed)
    choice = np.argsort(r.random((tokens, experts)), axis=1)[:, :2]
    return jnp.asarray(np.bincount(choice.reshape(-1), minlength=experts).astype(np.int32))


def summarize(cases: dict, results: list) -> list:
    """Per (projection, tokens): bf16, XLA int8 and the best Pallas configuration (whose output agrees)."""
    summary = []
    for (proj, tokens), c in cases.items():
        rows = [r for r in results if r["proj"] == proj and r["tokens"] == tokens and "median_us" in r]
        bf = [r for r in rows if r["method"] == "bf16"]
        xi = [r for r in rows if r["method"] == "xla_int8"]
        pk = [r for r in rows if r["method"] == "pallas" and r.get("relerr_vs_xla_int8", 0.0) < 2e-2]
        best = min(pk, key=lambda r: r["median_us"]) if pk else None
        bf_us = bf[0]["median_us"] if bf else None
        row = dict(proj=proj, tokens=tokens, M=c["M"], touched=c["touched"], bf16_us=bf_us,
                   xla_int8_us=xi[0]["median_us"] if xi else None,
                   pallas_best_us=best["median_us"] if best else None,
                   pallas_best_cfg=best["config"] if best else None,
                   pallas_best_gbps=best["gbps"] if best else None, bf16_gbps=bf[0]["gbps"] if bf else None)
        if best and bf_us:
            row["ratio_int8_over_bf16"] = best["median_us"] / bf_us
            row["ratio_pipelined"] = best["pipelined_us"] / bf[0]["pipelined_us"]
        summary.append(row)
    return summary


def print_summary(data: dict, out: str) -> None:
    def f(v, fmt="{:.1f}"):
        return "-" if v is None else fmt.format(v)

    print()
    print(f"card: {data.get('card')}  jax {data.get('jax_version')}  date {data['date']}")
    print("correctness:", json.dumps(data["sections"].get("check"), default=str))
    print(f"{'proj':8s}{'tok':>5s}{'M':>5s}{'exp':>4s}{'bf16 us':>10s}{'xla-i8 us':>11s}{'pallas us':>11s}"
          f"{'ratio':>7s}{'r(pipe)':>8s}{'GB/s':>8s}{'bf16 GB/s':>10s}  best config")
    for r in data["summary"]:
        c = r["pallas_best_cfg"]
        cfg = "" if not c else (f"{c['design']}{'/swap' if c['swap_ab'] else ''} m{c['block_m']} n{c['block_n']} "
                                f"k{c['block_k']} w{c['num_warps']} s{c['num_stages']}")
        print(f"{r['proj']:8s}{r['tokens']:5d}{r['M']:5d}{r['touched']:4d}{f(r['bf16_us']):>10s}"
              f"{f(r['xla_int8_us']):>11s}{f(r['pallas_best_us']):>11s}"
              f"{f(r.get('ratio_int8_over_bf16'), '{:.2f}'):>7s}{f(r.get('ratio_pipelined'), '{:.2f}'):>8s}"
              f"{f(r['pallas_best_gbps']):>8s}{f(r['bf16_gbps']):>10s}  {cfg}")
    print(f"elapsed {data['elapsed_s']:.1f}s; JSON -> {out}")


def main():
    ap = script_parser(__doc__, out="int8_ragged_dot.json", budget_s=200.0,
                       dry_run="tiny shapes, Pallas interpret mode (CPU)")
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    interpret = args.dry_run

    # ---- 1. environment ----------------------------------------------------------------------------
    report = Report(args.out, {**environment(), "dry_run": args.dry_run, "sections": {}, "results": []},
                    budget=args.budget_s)
    data = report.data
    log("jax", data["jax_version"], "| device:", data["device"], "|", data["card"])
    report.write()

    # ---- 2. correctness ----------------------------------------------------------------------------
    try:
        data["sections"]["check"] = correctness(interpret)
    except Exception as e:  # noqa: BLE001
        data["sections"]["check"] = {"error": short_error(e)}
        log("check section error:", short_error(e))
    report.write()

    # ---- 3. timings --------------------------------------------------------------------------------
    if args.dry_run:
        E, H, I, token_counts, iters = 4, 128, 192, [1, 8], 2
    else:
        E, H, I, token_counts, iters = 16, 4096, 14336, [1, 8, 64, 256], args.iters

    weights = {}
    try:
        kg, kd = jax.random.split(jax.random.PRNGKey(0))
        make = jax.jit(lambda key, shape: (jax.random.normal(key, shape, jnp.float32) * 0.02).astype(jnp.bfloat16),
                       static_argnums=1)
        for name, (key, shape) in (("gate_up", (kg, (E, H, I))), ("down", (kd, (E, I, H)))):
            wb = make(key, shape)
            q, s = jax.block_until_ready(jax.jit(quantize_int8)(wb))
            weights[name] = (wb, q, s)
            log(f"weights {name}: bf16 {wb.shape} {wb.nbytes / 2**30:.2f} GiB, int8 {q.nbytes / 2**30:.2f} GiB")
    except Exception as e:  # noqa: BLE001
        report.error("weights", e)
    report.write()

    try:
        import tokamax
    except Exception:  # noqa: BLE001 -- not installed, or it does not import on this JAX
        tokamax = None
    data["tokamax_available"] = tokamax is not None

    bf16_dot = jax.jit(lambda x, w, g: jax.lax.ragged_dot(x, w, g, preferred_element_type=jnp.bfloat16))
    xla_int8 = jax.jit(lambda x, q, s, g: int8_ragged_dot_reference(x, q, s, g, preferred_element_type=jnp.bfloat16))

    def pallas_fn(cfg):
        return jax.jit(lambda x, q, s, g: int8_ragged_dot_pallas(x, q, s, g, preferred_element_type=jnp.bfloat16,
                                                                 interpret=interpret, **cfg))

    cases = {}  # (proj, tokens) -> dict(M, g, x, touched, ref)

    def record(proj, tokens, method, cfg, fn, fargs, bytes_per_weight):
        c = cases[(proj, tokens)]
        row = dict(proj=proj, tokens=tokens, M=c["M"], touched=c["touched"], method=method, config=cfg)
        if report.left() < 0:
            row["skipped"] = "time budget"
            report.add("results", row)
            return
        try:
            timing = time_call(fn, *fargs, warmup=3, runs=iters, pipelined=True)
            med = timing.median
            k, n = weights[proj][1].shape[1:]
            wbytes = c["touched"] * k * n * bytes_per_weight
            row.update(median_us=med * 1e6, pipelined_us=timing.pipelined * 1e6, weight_bytes=wbytes,
                       gbps=wbytes / med / 1e9)
            if c.get("ref") is not None and method != "xla_int8":
                o, r = np.asarray(jnp.asarray(timing.output, jnp.float32)), c["ref"]
                row["relerr_vs_xla_int8"] = float(np.abs(o - r).max() / max(np.abs(r).max(), 1e-30))
            log(f"{proj:7s} tok={tokens:4d} {method:10s} {med * 1e6:9.1f} us (pipelined {timing.pipelined * 1e6:9.1f}) "
                f"{row['gbps']:7.1f} GB/s {cfg if cfg else ''} err={row.get('relerr_vs_xla_int8', '-')}")
        except Exception as e:  # noqa: BLE001
            row["error"] = short_error(e, 8)
            log(f"{proj} tok={tokens} {method} {cfg} FAILED:\n{short_error(e, 8)}")
        report.add("results", row)

    # Pass 1: the baselines and the two default Pallas configurations for every case.
    try:
        for proj, (wb, q, s) in weights.items():
            for tokens in token_counts:
                m = 2 * tokens
                g = routing(tokens, E, seed=tokens)
                x = jax.random.normal(jax.random.PRNGKey(tokens), (m, wb.shape[1]), jnp.bfloat16)
                cases[(proj, tokens)] = dict(M=m, g=g, x=x, touched=int(np.sum(np.asarray(g) > 0)), ref=None)
                record(proj, tokens, "bf16", None, bf16_dot, (x, wb, g), 2)
                record(proj, tokens, "xla_int8", None, xla_int8, (x, q, s, g), 1)
                try:
                    cases[(proj, tokens)]["ref"] = np.asarray(jnp.asarray(xla_int8(x, q, s, g), jnp.float32))
                except Exception as e:  # noqa: BLE001
                    log("xla int8 ref output failed:", short_error(e))
                if tokamax is not None:
                    tk = jax.jit(lambda x_, w_, g_: tokamax.ragged_dot(x_, w_, group_sizes=g_,
                                                                       preferred_element_type=jnp.bfloat16))
                    record(proj, tokens, "tokamax", None, tk, (x, wb, g), 2)
                for cfg in configs_for(m, args.dry_run)[0]:
                    record(proj, tokens, "pallas", cfg, pallas_fn(cfg), (x, q, s, g), 1)
    except Exception as e:  # noqa: BLE001
        report.error("pass1", e)

    # Pass 2: the other configurations while time remains.
    try:
        for proj, (_, q, s) in weights.items():
            for tokens in token_counts:
                c = cases.get((proj, tokens))
                if c is not None:
                    for cfg in configs_for(c["M"], args.dry_run)[1]:
                        record(proj, tokens, "pallas", cfg, pallas_fn(cfg), (c["x"], q, s, c["g"]), 1)
    except Exception as e:  # noqa: BLE001
        report.error("pass2", e)

    # ---- 4. summary --------------------------------------------------------------------------------
    try:
        data["summary"] = summarize(cases, data["results"])
    except Exception as e:  # noqa: BLE001
        data["summary"] = []
        report.error("summary", e)
    report.write(finished=True)
    print_summary(data, args.out)


if __name__ == "__main__":
    main()
