#!/usr/bin/env python3
"""GPU benchmark + check of the ExpertsInt8 Pallas grouped matmul.

Run from the repo root on a GPU machine:
    python3 benchmarks/gpu_int8_ragged_dot.py --out $OUT/int8.json
CPU smoke test (tiny shapes, Pallas interpret mode):
    python3 benchmarks/gpu_int8_ragged_dot.py --dry-run --out /tmp/int8.json

Sections (each guarded by try/except, JSON rewritten after each one):
  1. environment (jax version, device);
  2. correctness on a small ragged case (both kernel designs, bf16 and f32
     lhs) against a float64 numpy reference and the XLA int8 reference;
  3. timings at Jamba-1.5-Mini expert shapes (E=16, H=4096, I=14336;
     gate/up [E, 4096, 14336], down [E, 14336, 4096]) for 1/8/64/256 tokens
     with top-2 random routing (M = 2 * tokens rows):
       bf16 jax.lax.ragged_dot, XLA int8 reference (dequant + ragged_dot),
       Pallas int8 kernel over several block configs, tokamax if importable.
  4. summary: int8-kernel / bf16 time ratio (goal <= 0.6 at decode sizes)
     and achieved bandwidth = bytes of the touched experts' weights / time.
A global time budget (--budget-s) skips the remaining configs when exceeded.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import statistics
import sys
import time
import traceback

import numpy as np

T_START = time.time()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def log(*a):
  print(f"[{time.time() - T_START:7.1f}s]", *a, flush=True)


def short_err(ex, lines=6):
  txt = "".join(traceback.format_exception_only(type(ex), ex)).strip()
  return "\n".join(txt.splitlines()[:lines])[:1500]


def load_kernel_module():
  """Loads pallas_kernels/int8_ragged_dot.py without the package __init__."""
  path = os.path.join(REPO, "pallas_kernels", "int8_ragged_dot.py")
  spec = importlib.util.spec_from_file_location("_int8_ragged_dot", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default="int8_ragged_dot.json")
  ap.add_argument("--dry-run", action="store_true",
                  help="tiny shapes, interpret=True (CPU smoke test)")
  ap.add_argument("--budget-s", type=float, default=200.0,
                  help="stop starting new timings after this many seconds")
  ap.add_argument("--iters", type=int, default=20)
  args = ap.parse_args()

  import jax
  import jax.numpy as jnp

  report = {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
      "dry_run": args.dry_run,
      "sections": {},
      "results": [],
      "errors": [],
  }

  def dump():
    try:
      d = os.path.dirname(os.path.abspath(args.out))
      os.makedirs(d, exist_ok=True)
      with open(args.out, "w") as f:
        json.dump(report, f, indent=1, default=str)
    except Exception as ex:  # never die on reporting
      log("could not write JSON:", short_err(ex))

  def over_budget():
    return time.time() - T_START > args.budget_s

  # ---------------------------------------------------------------- 1. env
  try:
    dev = jax.devices()[0]
    report.update(jax_version=jax.__version__, card=dev.device_kind,
                  platform=dev.platform, device=str(dev),
                  python=sys.version.split()[0])
    log("jax", jax.__version__, "| device:", dev, "|", dev.device_kind)
  except Exception as ex:
    report["errors"].append(("env", short_err(ex)))
    log("env error:", short_err(ex))
  dump()

  try:
    k8 = load_kernel_module()
  except Exception as ex:
    report["errors"].append(("import", short_err(ex, 20)))
    log("cannot import kernel module:", short_err(ex, 20))
    dump()
    return
  interpret = bool(args.dry_run)

  # ------------------------------------------------------- 2. correctness
  def np_reference(lhs, q, s, gs):
    lhs = np.asarray(jnp.asarray(lhs, jnp.float32), np.float64)
    w = np.asarray(q, np.float64) * np.asarray(s, np.float64)[:, None, :]
    out = np.zeros((lhs.shape[0], w.shape[2]))
    start = 0
    for e, g in enumerate(np.asarray(gs)):
      out[start:start + g] = lhs[start:start + g] @ w[e]
      start += g
    return out

  check = {}
  try:
    rng = np.random.default_rng(0)
    m, k, n = 40, 300, 200
    gs = jnp.asarray([0, 7, 20, 0, 9], jnp.int32)  # sum 36 < 40: padding rows
    w = jnp.asarray(rng.standard_normal((5, k, n)), jnp.float32) * 0.05
    q, s = k8.quantize_int8(w)
    lhs32 = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    for dname, lhs in (("bf16", lhs32.astype(jnp.bfloat16)), ("f32", lhs32)):
      exact = np_reference(lhs, q, s, gs)
      denom = np.abs(exact).max()
      try:
        with jax.default_matmul_precision("highest"):
          ref = np.asarray(k8.int8_ragged_dot_reference(lhs, q, s, gs))
        check[f"xla_ref_{dname}_relerr"] = float(
            np.abs(ref - exact).max() / denom)
      except Exception as ex:
        check[f"xla_ref_{dname}_error"] = short_err(ex)
      for design, swap in (("group", False), ("group", True),
                           ("item", False), ("tile", False)):
        key = f"pallas_{design}{'_swap' if swap else ''}_{dname}"
        try:
          out = k8.int8_ragged_dot_pallas(
              lhs, q, s, gs, block_m=16, block_n=64, block_k=64,
              design=design, swap_ab=swap, interpret=interpret)
          out = np.asarray(out)
          err = float(np.abs(out - exact).max() / denom)
          pad_zero = bool(np.all(out[int(np.sum(gs)):] == 0))
          check[key + "_relerr"] = err
          check[key + "_padding_rows_zero"] = pad_zero
          check[key + "_pass"] = bool(err < 1e-4 and pad_zero)
          log(f"check {key}: rel err {err:.2e} padding-zero {pad_zero}")
        except Exception as ex:
          check[key + "_error"] = short_err(ex, 15)
          check[key + "_pass"] = False
          log(f"check {key} FAILED:\n{short_err(ex, 15)}")
  except Exception as ex:
    check["error"] = short_err(ex)
    log("check section error:", short_err(ex))
  report["sections"]["check"] = check
  dump()

  # ----------------------------------------------------------- 3. timings
  if args.dry_run:
    E, H, I = 4, 128, 192
    token_counts = [1, 8]
    iters = 2
  else:
    E, H, I = 16, 4096, 14336
    token_counts = [1, 8, 64, 256]
    iters = args.iters

  def time_fn(f, *a):
    out = jax.block_until_ready(f(*a))  # compile
    for _ in range(2):
      jax.block_until_ready(f(*a))
    ts = []
    for _ in range(iters):
      t0 = time.perf_counter()
      jax.block_until_ready(f(*a))
      ts.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    o = None
    for _ in range(iters):
      o = f(*a)
    jax.block_until_ready(o)
    pipe = (time.perf_counter() - t0) / iters
    return statistics.median(ts), pipe, out

  def make_w(k_, shp):
    return (jax.random.normal(k_, shp, jnp.float32) * 0.02).astype(
        jnp.bfloat16)

  weights = {}
  try:
    key = jax.random.PRNGKey(0)
    kg, kd = jax.random.split(key)
    for name, (kk, shp) in (("gate_up", (kg, (E, H, I))),
                            ("down", (kd, (E, I, H)))):
      wb = jax.jit(make_w, static_argnums=1)(kk, shp)
      q, s = jax.jit(k8.quantize_int8)(wb)
      jax.block_until_ready((wb, q, s))
      weights[name] = (wb, q, s)
      log(f"weights {name}: bf16 {wb.shape} {wb.nbytes / 2**30:.2f} GiB, "
          f"int8 {q.nbytes / 2**30:.2f} GiB")
  except Exception as ex:
    report["errors"].append(("weights", short_err(ex)))
    log("weight creation failed:", short_err(ex))
  dump()

  try:
    import tokamax  # noqa: F401
    have_tokamax = True
  except Exception:
    have_tokamax = False
  report["tokamax_available"] = have_tokamax

  def routing(tokens, seed):
    r = np.random.default_rng(seed)
    choice = np.argsort(r.random((tokens, E)), axis=1)[:, :2]  # top-2
    gs = np.bincount(choice.reshape(-1), minlength=E).astype(np.int32)
    return jnp.asarray(gs)

  bf16_dot = jax.jit(lambda x, w, g: jax.lax.ragged_dot(
      x, w, g, preferred_element_type=jnp.bfloat16))
  xla_int8 = jax.jit(lambda x, q, s, g: k8.int8_ragged_dot_reference(
      x, q, s, g, preferred_element_type=jnp.bfloat16))

  def pallas_fn(cfg):
    return jax.jit(lambda x, q, s, g: k8.int8_ragged_dot_pallas(
        x, q, s, g, preferred_element_type=jnp.bfloat16, interpret=interpret,
        **cfg))

  def mkcfg(design, bm, bn, bk, warps=4, stages=4, swap=False):
    return dict(design=design, block_m=bm, block_n=bn, block_k=bk,
                swap_ab=swap, num_warps=warps, num_stages=stages)

  def configs_for(m):
    bm = 16 if m <= 128 else 32
    base = [mkcfg("group", bm, 128, 128), mkcfg("group", bm, 128, 128, swap=True)]
    extra = [
        mkcfg("item", bm, 128, 128),
        mkcfg("group", bm, 64, 256),
        mkcfg("group", bm, 256, 64),
        mkcfg("group", bm, 64, 256, swap=True),
        mkcfg("group", bm, 128, 256, warps=8, stages=3),
        mkcfg("tile", bm, 128, 128),
    ]
    if m > 128:
      extra += [mkcfg("group", 64, 128, 128), mkcfg("group", 64, 256, 64),
                mkcfg("group", 64, 128, 256, warps=8, stages=3)]
    if args.dry_run:
      base = [dict(c, block_n=64, block_k=64) for c in base]
      extra = [dict(c, block_n=64, block_k=64) for c in extra[:2]]
    return base, extra

  cases = {}  # (proj, tokens) -> dict(x, g, ref_out, touched)
  results = report["results"]

  def record(proj, tokens, method, cfg, fn, fargs, nbytes_per_elem):
    c = cases[(proj, tokens)]
    row = dict(proj=proj, tokens=tokens, M=c["M"], touched=c["touched"],
               method=method, config=cfg)
    if over_budget():
      row["skipped"] = "time budget"
      results.append(row)
      return
    try:
      med, pipe, out = time_fn(fn, *fargs)
      kk_, nn_ = weights[proj][1].shape[1:]
      wbytes = c["touched"] * kk_ * nn_ * nbytes_per_elem
      row.update(median_us=med * 1e6, pipelined_us=pipe * 1e6,
                 weight_bytes=wbytes, gbps=wbytes / med / 1e9)
      if c.get("ref") is not None and method != "xla_int8":
        o = np.asarray(jnp.asarray(out, jnp.float32))
        r = c["ref"]
        row["relerr_vs_xla_int8"] = float(
            np.abs(o - r).max() / max(np.abs(r).max(), 1e-30))
      log(f"{proj:7s} tok={tokens:4d} {method:10s} {med * 1e6:9.1f} us "
          f"(pipelined {pipe * 1e6:9.1f}) {row['gbps']:7.1f} GB/s "
          f"{cfg if cfg else ''} err={row.get('relerr_vs_xla_int8', '-')}")
    except Exception as ex:
      row["error"] = short_err(ex, 8)
      log(f"{proj} tok={tokens} {method} {cfg} FAILED:\n{short_err(ex, 8)}")
    results.append(row)
    dump()

  # Pass 1: baselines + the two default Pallas configs for every case.
  try:
    for proj in ("gate_up", "down"):
      if proj not in weights:
        continue
      wb, q, s = weights[proj]
      for tokens in token_counts:
        m = 2 * tokens
        g = routing(tokens, seed=tokens)
        x = jax.random.normal(jax.random.PRNGKey(tokens), (m, wb.shape[1]),
                              jnp.bfloat16)
        cases[(proj, tokens)] = dict(M=m, g=g, x=x,
                                     touched=int(np.sum(np.asarray(g) > 0)),
                                     ref=None)
        record(proj, tokens, "bf16", None, bf16_dot, (x, wb, g), 2)
        record(proj, tokens, "xla_int8", None, xla_int8, (x, q, s, g), 1)
        try:
          cases[(proj, tokens)]["ref"] = np.asarray(
              jnp.asarray(xla_int8(x, q, s, g), jnp.float32))
        except Exception as ex:
          log("xla int8 ref output failed:", short_err(ex))
        if have_tokamax:
          try:
            import tokamax
            tk = jax.jit(lambda x_, w_, g_: tokamax.ragged_dot(
                x_, w_, group_sizes=g_, preferred_element_type=jnp.bfloat16))
            record(proj, tokens, "tokamax", None, tk, (x, wb, g), 2)
          except Exception as ex:
            log("tokamax failed:", short_err(ex))
        base, _ = configs_for(m)
        for cfg in base:
          record(proj, tokens, "pallas", cfg, pallas_fn(cfg), (x, q, s, g), 1)
  except Exception as ex:
    report["errors"].append(("pass1", short_err(ex)))
    log("pass 1 error:", short_err(ex))

  # Pass 2: extra configs while time remains.
  try:
    for proj in ("gate_up", "down"):
      if proj not in weights:
        continue
      _, q, s = weights[proj]
      for tokens in token_counts:
        c = cases.get((proj, tokens))
        if c is None:
          continue
        _, extra = configs_for(c["M"])
        for cfg in extra:
          record(proj, tokens, "pallas", cfg, pallas_fn(cfg),
                 (c["x"], q, s, c["g"]), 1)
  except Exception as ex:
    report["errors"].append(("pass2", short_err(ex)))
    log("pass 2 error:", short_err(ex))

  # ----------------------------------------------------------- 4. summary
  summary = []
  try:
    for (proj, tokens), c in cases.items():
      rows = [r for r in results if r["proj"] == proj and r["tokens"] == tokens
              and "median_us" in r]
      bf = [r for r in rows if r["method"] == "bf16"]
      xi = [r for r in rows if r["method"] == "xla_int8"]
      pk = [r for r in rows if r["method"] == "pallas"
            and r.get("relerr_vs_xla_int8", 0.0) < 2e-2]
      best = min(pk, key=lambda r: r["median_us"]) if pk else None
      bf_us = bf[0]["median_us"] if bf else None
      srow = dict(proj=proj, tokens=tokens, M=c["M"], touched=c["touched"],
                  bf16_us=bf_us,
                  xla_int8_us=xi[0]["median_us"] if xi else None,
                  pallas_best_us=best["median_us"] if best else None,
                  pallas_best_cfg=best["config"] if best else None,
                  pallas_best_gbps=best["gbps"] if best else None,
                  bf16_gbps=bf[0]["gbps"] if bf else None)
      if best and bf_us:
        srow["ratio_int8_over_bf16"] = best["median_us"] / bf_us
        srow["ratio_pipelined"] = best["pipelined_us"] / bf[0]["pipelined_us"]
      summary.append(srow)
  except Exception as ex:
    report["errors"].append(("summary", short_err(ex)))
  report["summary"] = summary
  report["elapsed_s"] = time.time() - T_START
  dump()

  def f(v, fmt="{:.1f}"):
    return "-" if v is None else fmt.format(v)

  print()
  print(f"card: {report.get('card')}  jax {report.get('jax_version')}  "
        f"date {report['date']}")
  print("correctness:", json.dumps(check, default=str))
  hdr = (f"{'proj':8s}{'tok':>5s}{'M':>5s}{'exp':>4s}{'bf16 us':>10s}"
         f"{'xla-i8 us':>11s}{'pallas us':>11s}{'ratio':>7s}{'r(pipe)':>8s}"
         f"{'GB/s':>8s}"
         f"{'bf16 GB/s':>10s}  best config")
  print(hdr)
  for r in summary:
    c_ = r["pallas_best_cfg"]
    cfg_s = ("" if not c_ else
             f"{c_['design']}{'/swap' if c_['swap_ab'] else ''} "
             f"m{c_['block_m']} n{c_['block_n']} "
             f"k{c_['block_k']} w{c_['num_warps']} s{c_['num_stages']}")
    print(f"{r['proj']:8s}{r['tokens']:5d}{r['M']:5d}{r['touched']:4d}"
          f"{f(r['bf16_us']):>10s}{f(r['xla_int8_us']):>11s}"
          f"{f(r['pallas_best_us']):>11s}"
          f"{f(r.get('ratio_int8_over_bf16'), '{:.2f}'):>7s}"
          f"{f(r.get('ratio_pipelined'), '{:.2f}'):>8s}"
          f"{f(r['pallas_best_gbps']):>8s}{f(r['bf16_gbps']):>10s}  {cfg_s}")
  print(f"elapsed {report['elapsed_s']:.1f}s; JSON -> {args.out}")


if __name__ == "__main__":
  main()
