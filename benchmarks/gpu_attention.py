"""GPU benchmark of the Pallas attention kernels against the XLA paths and cuDNN (Jamba-1.5-Mini shapes).

    python3 benchmarks/gpu_attention.py --out $OUT/attn.json
    python3 benchmarks/gpu_attention.py --dry-run --out /tmp/attn.json   # CPU: tiny shapes, interpret mode

Sections, each guarded (an error prints its first lines and the script goes on) and each followed by
a JSON write:

(a) correctness: ``flash_attention_pallas`` and ``decode_attention_pallas`` (compiled, not
    interpreted) against ``naive_attention`` at a small shape with left padding and a partly
    filled cache: fp32 (IEEE products on both sides) and bf16 (error against the fp32 result,
    next to the XLA bf16 path's error); and a check that ``attend(impl="pallas")`` uses the kernels.
(b) prefill at 32 query heads, 8 kv heads, head_dim 128, bf16, batch 1: a 2048-query chunk at the
    end of a 4K/16K/64K context, and full causal self-attention at 4K/16K; the Pallas flash
    kernel, ``blocked_attention`` (XLA) and ``jax.nn.dot_product_attention(implementation="cudnn")``
    (GQA-shaped K/V; for the chunk it has no causal mask, as its causal mask is aligned to the
    first key: it computes up to 2048 x 2048 / 2 more scores than the others).
(c) decode: one query over a full cache of 4K/16K/64K/256K tokens; ``decode_attention_pallas``,
    ``split_k_attention`` (XLA) and cuDNN, with the bandwidth achieved (K/V bytes read / time)
    against the measured copy bandwidth (``common.copy_bandwidth``).
(d) if time is left, a few other kernel configurations (blocks, warps, stages, splits).

Each time is the per-call time of the operation iterated in an on-device ``fori_loop`` (its output,
shaped like q, is the next call's q), so there is no dispatch overhead in decode times. A global
``--budget`` (seconds since start) skips sections that would run past it, and a watchdog writes the
JSON and exits at ``--hard-limit`` seconds whatever is running. ``--dry-run`` runs the same code
on tiny shapes in Pallas interpret mode (for CPU-only machines; cuDNN then fails and is recorded).
"""

from __future__ import annotations

import argparse
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jamba_jax.attention import attend, blocked_attention, naive_attention, split_k_attention
from pallas_kernels import decode_attention_pallas, flash_attention_pallas

from common import Report, copy_bandwidth, elapsed, environment, log, rel_err, time_call

# (block_q, block_k, num_warps, num_stages): the first is the kernel's default and the one timed in (b).
PREFILL_CONFIGS = [(128, 64, 8, 2), (64, 64, 4, 2), (128, 128, 8, 2), (128, 64, 8, 3), (64, 128, 4, 2),
                   (128, 64, 4, 2)]
# (block_k, num_splits, num_warps, num_stages): the first is the kernel's default.
DECODE_CONFIGS = [(64, None, 4, 3), (128, None, 4, 3), (64, 64, 4, 3), (128, 32, 8, 3), (32, None, 2, 4),
                  (64, 16, 4, 2)]
REL_TOL = 1e-4  # fp32 correctness threshold on GPU (the CPU tests use 1e-5)


def start_watchdog(report, hard_limit):
    """Writes the report and exits the process at ``hard_limit`` seconds since the start, whatever runs."""
    def fire():
        log(f"!! watchdog: {hard_limit:.0f} s reached; writing {report.path} and exiting")
        try:
            report.write(watchdog_exit=True)
        finally:
            os._exit(3)

    timer = threading.Timer(max(1.0, hard_limit - elapsed()), fire)
    timer.daemon = True
    timer.start()
    return timer


def looped(fn):
    """``loop(n, q, *rest)``: ``q <- fn(q, *rest)`` ``n`` times on device (``n`` traced)."""

    @jax.jit
    def loop(n, q, *rest):
        return lax.fori_loop(0, n, lambda i, q: fn(q, *rest).astype(q.dtype), q)

    return loop


def time_op(fn, args, *, target_s=0.03, max_iters=2000, repeats=3):
    """Per-call seconds of ``fn(*args)`` (``fn`` returns an array shaped like ``args[0]``): one
    warm-up/compile call, then ``repeats`` device loops of about ``target_s`` each. Returns the
    median, the loop length and the output of one call."""
    loop = looped(fn)
    first = time_call(loop, jnp.int32(1), *args, runs=1)
    n = int(min(max_iters, max(1, target_s / max(first.best, 1e-6))))
    return time_call(loop, jnp.int32(n), *args, warmup=0, runs=repeats).median / n, n, first.output


def make_qkv(key, batch, q_len, k_len, n_kv, group, hd, dtype):
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (batch, q_len, n_kv, group, hd), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (batch, n_kv, k_len, hd), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (batch, n_kv, k_len, hd), jnp.float32).astype(dtype)
    return q, k, v


def seq_major(args):
    """(q, k, v, start) with K/V moved to ``[batch, k_len, kv_heads, head_dim]``, cuDNN's layout (done
    before timing, so that cuDNN is timed on its own layout)."""
    q, k, v, start = args
    return jax.block_until_ready((q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), start))


def cudnn_attention(q, k, v, causal):
    """``jax.nn.dot_product_attention`` (cuDNN): q ``[b, t, kv, g, d]`` as ``[b, t, kv * g, d]`` (query
    head n uses kv head n // g, as here), K/V ``[b, k_len, kv, d]`` (``seq_major``), not repeated."""
    b, t, n_kv, g, d = q.shape
    out = jax.nn.dot_product_attention(q.reshape(b, t, n_kv * g, d), k, v, is_causal=causal,
                                       implementation="cudnn")
    return out.reshape(q.shape)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="attn.json")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes, Pallas interpret mode (CPU)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds since start after which measurements are skipped (default 88; 600 with --dry-run)")
    p.add_argument("--hard-limit", type=float, default=None,
                   help="seconds since start: the watchdog writes the JSON and exits (default 96; 700 with "
                        "--dry-run)")
    p.add_argument("--decode-reserve", type=float, default=25.0,
                   help="seconds of the budget that the prefill section leaves to the decode section")
    p.add_argument("--no-cudnn", action="store_true")
    p.add_argument("--no-sweep", action="store_true", help="skip section (d)")
    a = p.parse_args()

    dry = a.dry_run
    interpret = dry
    if a.budget is None:
        a.budget = 600.0 if dry else 88.0
    if a.hard_limit is None:
        a.hard_limit = max(a.budget + 8.0, 700.0 if dry else 96.0)
    if dry:
        n_kv, group, hd = 2, 4, 16
        chunk, prefill_lengths, self_lengths = 32, [64, 128, 256], [64, 128]
        decode_lengths = [64, 256, 1024, 4096]
        prefill_cfgs, decode_cfgs = [(32, 16, 4, 2)] + PREFILL_CONFIGS[1:2], [(16, None, 4, 3)] + DECODE_CONFIGS[2:3]
    else:
        n_kv, group, hd = 8, 4, 128
        chunk, prefill_lengths, self_lengths = 2048, [4096, 16384, 65536], [4096, 16384]
        decode_lengths = [4096, 16384, 65536, 262144]
        prefill_cfgs, decode_cfgs = PREFILL_CONFIGS, DECODE_CONFIGS
    batch, dtype = 1, jnp.bfloat16
    itemsize = jnp.dtype(dtype).itemsize

    report = Report(a.out, dict(
        **environment(), dry_run=dry,
        shapes=dict(batch=batch, kv_heads=n_kv, group=group, q_heads=n_kv * group, head_dim=hd,
                    dtype=str(jnp.dtype(dtype)), prefill_chunk=chunk, prefill_lengths=prefill_lengths,
                    self_attention_lengths=self_lengths, decode_lengths=decode_lengths),
        correctness=[], prefill=[], decode=[], sweep=[], copy_bandwidth_GBps=None,
    ), budget=a.budget)
    start_watchdog(report, a.hard_limit)
    on_gpu = report.data["platform"] == "gpu"
    log(f"jax {jax.__version__}  device {report.data['device']}  kind {report.data['card']}  dry_run={dry}")
    record_error, have_time = report.error, report.have_time

    # ---- (a) correctness ---------------------------------------------------------------------------
    def correctness():
        b, q_len, k_len, kvh, g, d = (2, 24, 80, 2, 4, 16) if dry else (2, 100, 300, 2, 4, 128)
        q_start = k_len - q_len - 20  # the last 20 slots are filled but after the queries: masked
        pads = (7, 0)
        valid = jnp.arange(k_len)[None, :] >= jnp.asarray(pads)[:, None]
        q, k, v = make_qkv(jax.random.PRNGKey(1), b, q_len, k_len, kvh, g, d, jnp.float32)
        real = np.asarray(valid)[:, q_start:q_start + q_len]
        with jax.default_matmul_precision("highest"):  # IEEE fp32 products in the XLA reference
            ref_fn = jax.jit(naive_attention)
            ref = ref_fn(q, k, v, q_start, valid)
            q1 = q[:, -1:]
            ref_dec = {s: ref_fn(q1, k, v, s, valid) for s in (k_len - 1, k_len // 3)}
        flash = jax.jit(lambda *x: flash_attention_pallas(*x, interpret=interpret))
        decode = jax.jit(lambda *x: decode_attention_pallas(*x, interpret=interpret))
        kinds = [("flash", lambda qq, kk, vv, s: flash(qq, kk, vv, s, valid), q, q_start, ref, real)]
        for s, r in ref_dec.items():
            kinds.append((f"decode fill {s + 1}", lambda qq, kk, vv, s: decode(qq, kk, vv, s, valid), q1, s, r,
                          np.asarray(valid)[:, s:s + 1]))
        low = [x.astype(dtype) for x in (q, k, v)]
        xla_low = {"flash": lambda qq, kk, vv, s: blocked_attention(qq, kk, vv, s, valid),
                   "decode": lambda qq, kk, vv, s: split_k_attention(qq, kk, vv, s, valid)}
        for name, fn, qq, s, r, rq in kinds:
            try:
                got = jax.block_until_ready(fn(qq, k, v, s))
                e32 = rel_err(got, r, rq)
                ql = qq.astype(dtype)
                e16 = rel_err(jax.block_until_ready(fn(ql, low[1], low[2], s)), r, rq)
                xla = jax.jit(xla_low[name.split()[0]])
                e16_xla = rel_err(jax.block_until_ready(xla(ql, low[1], low[2], s)), r, rq)
                ok = e32 < REL_TOL and e16 < max(2e-2, 2 * e16_xla)
                row = dict(case=name, shape=[b, qq.shape[1], k_len, kvh, g, d], q_start=int(s), rel_err_fp32=e32,
                           rel_err_bf16=e16, rel_err_bf16_xla=e16_xla, ok=ok)
                report.add("correctness", row)
                log(f"correctness {name:18s} fp32 {e32:.2e}  bf16 {e16:.2e} (XLA bf16 {e16_xla:.2e})  "
                    f"{'OK' if ok else 'FAIL'}")
            except Exception as e:
                record_error(f"correctness {name}", e)
        try:  # attend(impl="pallas") takes the kernels on GPU (the XLA path elsewhere)
            jaxpr = str(jax.make_jaxpr(lambda *x: attend(*x, impl="pallas"))(low[0], low[1], low[2], q_start, valid))
            uses = "pallas_call" in jaxpr
            report.add("correctness", dict(case="attend impl=pallas uses the kernel",
                                           ok=uses == on_gpu))
            log(f"attend(impl='pallas') uses the Pallas kernel: {uses}")
        except Exception as e:
            record_error("attend dispatch", e)

    try:
        correctness()
    except Exception as e:
        record_error("correctness", e)
    report.write()

    # ---- copy bandwidth ----------------------------------------------------------------------------
    copy_bw = None
    try:
        copy_bw = report.data["copy_bandwidth_GBps"] = copy_bandwidth() / 1e9
        log(f"copy bandwidth: {copy_bw:.1f} GB/s")
    except Exception as e:
        record_error("copy bandwidth", e)
    report.write()

    # ---- (b) prefill -------------------------------------------------------------------------------
    def prefill_cases():
        for L in prefill_lengths:
            yield "chunk", L, chunk, L - chunk
        for L in self_lengths:
            yield "self", L, L, 0

    def flash_fn(cfg, valid):
        bq, bk, w, st = cfg
        return lambda q, k, v, s: flash_attention_pallas(q, k, v, s, valid, block_q=bq, block_k=bk, num_warps=w,
                                                         num_stages=st, interpret=interpret)

    def time_row(section, impl, config, case, L, q_len, fn, args, flops=None, kv_bytes=None, note=""):
        t, iters, out = time_op(fn, args)
        row = dict(impl=impl, config=config, case=case, length=L, q_len=q_len, ms=t * 1e3, iters=iters, note=note)
        extra = ""
        if flops:
            row["TFLOPs"] = flops / t / 1e12
            extra += f" {row['TFLOPs']:7.1f} TFLOP/s"
        if kv_bytes:
            row["GBps"] = kv_bytes / t / 1e9
            row["frac_of_copy"] = row["GBps"] / copy_bw if copy_bw else None
            extra += f" {row['GBps']:8.1f} GB/s" + (f" ({row['frac_of_copy']:.2f} of copy)" if copy_bw else "")
        report.add(section, row)
        log(f"  {impl:7s} {config:22s} {case:5s} L={L:6d} q={q_len:5d} {t * 1e3:9.3f} ms{extra} {note}")
        return out

    def compare(section, case, label, L, q_len, impls, args, reserve=0.0, **measure):
        """Times each ``(impl, config, fn, note)`` of ``impls`` on ``args``, then compares the bf16 outputs of
        the Pallas kernel and the XLA path (``consistency``, under ``label``)."""
        outs = {}
        for impl, config, fn, note in impls:
            if not have_time(f"{section} {impl} {label} L={L}", 5, reserve):
                continue
            try:
                out = time_row(section, impl, config, case, L, q_len, fn, seq_major(args) if impl == "cudnn" else args,
                               note=note, **measure)
                if impl in ("pallas", "xla"):
                    outs[impl] = out
            except Exception as e:
                record_error(f"{section} {impl} {label} L={L}", e)
        if len(outs) == 2:
            try:
                diff = rel_err(outs["pallas"], outs["xla"])
                report.add("consistency", dict(case=label, length=L, rel_diff_pallas_vs_xla_bf16=diff))
                log(f"  pallas vs xla (bf16 outputs): rel diff {diff:.2e}")
            except Exception as e:
                record_error(f"{section} consistency {label} L={L}", e)

    for case, L, q_len, q_start in prefill_cases():
        if not have_time(f"prefill {case} L={L}", 10, a.decode_reserve):
            continue
        log(f"--- prefill {case} L={L} queries={q_len} at slot {q_start} ---")
        try:
            q, k, v = make_qkv(jax.random.PRNGKey(L + q_len), batch, q_len, L, n_kv, group, hd, dtype)
            valid = jnp.ones((batch, L), bool)
            start = jnp.int32(q_start)
            args = (q, k, v, start)
            jax.block_until_ready(args)
        except Exception as e:
            record_error(f"prefill inputs {case} L={L}", e)
            continue
        # useful FLOPs: 2 matmuls x 2 flops x head_dim x q heads x visible (query, key) pairs
        pairs = q_len * q_start + q_len * (q_len + 1) // 2
        flops = 4 * pairs * hd * n_kv * group * batch
        impls = [("pallas", "bq=%d bk=%d w=%d s=%d" % prefill_cfgs[0], flash_fn(prefill_cfgs[0], valid), ""),
                 ("xla", "blocked bk=512", lambda q, k, v, s: blocked_attention(q, k, v, s, valid), "")]
        if not a.no_cudnn:
            causal = case == "self"
            impls.append(("cudnn", "is_causal" if causal else "no mask",
                          lambda q, k, v, s: cudnn_attention(q, k, v, causal),
                          "" if causal else "all keys visible (more work)"))
        compare("prefill", case, case, L, q_len, impls, args, a.decode_reserve, flops=flops)
        del q, k, v, args

    # ---- (c) decode --------------------------------------------------------------------------------
    def decode_fn(cfg, valid):
        bk, splits, w, st = cfg
        return lambda q, k, v, s: decode_attention_pallas(q, k, v, s, valid, block_k=bk, num_splits=splits,
                                                          num_warps=w, num_stages=st, interpret=interpret)

    def decode_cfg_name(cfg):
        return f"bk={cfg[0]} S={cfg[1] or 'auto'} w={cfg[2]} s={cfg[3]}"

    for L in decode_lengths:
        if not have_time(f"decode L={L}", 8):
            continue
        log(f"--- decode cache L={L} (full) ---")
        try:
            q, k, v = make_qkv(jax.random.PRNGKey(7 + L), batch, 1, L, n_kv, group, hd, dtype)
            valid = jnp.ones((batch, L), bool)
            args = (q, k, v, jnp.int32(L - 1))
            jax.block_until_ready(args)
        except Exception as e:
            record_error(f"decode inputs L={L}", e)
            continue
        kv_bytes = 2 * batch * L * n_kv * hd * itemsize
        impls = [("pallas", decode_cfg_name(decode_cfgs[0]), decode_fn(decode_cfgs[0], valid), ""),
                 ("xla", "split_k S=16", lambda q, k, v, s: split_k_attention(q, k, v, s, valid), "")]
        if not a.no_cudnn:
            impls.append(("cudnn", "no mask", lambda q, k, v, s: cudnn_attention(q, k, v, False), ""))
        compare("decode", "dec", "decode", L, 1, impls, args, kv_bytes=kv_bytes)
        del q, k, v, args

    # ---- (d) other kernel configurations -----------------------------------------------------------
    if not a.no_sweep and have_time("sweep prefill", 8):
        L = prefill_lengths[1]
        try:
            q, k, v = make_qkv(jax.random.PRNGKey(11), batch, chunk, L, n_kv, group, hd, dtype)
            valid = jnp.ones((batch, L), bool)
            args = (q, k, v, jnp.int32(L - chunk))
            pairs = chunk * (L - chunk) + chunk * (chunk + 1) // 2
            for cfg in prefill_cfgs[1:]:
                if not have_time(f"sweep prefill {cfg}", 6, reserve=12):  # leave time for the decode sweep
                    break
                try:
                    time_row("sweep", "pallas", "bq=%d bk=%d w=%d s=%d" % cfg, "chunk", L, chunk, flash_fn(cfg, valid),
                             args, flops=4 * pairs * hd * n_kv * group * batch)
                except Exception as e:
                    record_error(f"sweep prefill {cfg}", e)
            del q, k, v, args
        except Exception as e:
            record_error("sweep prefill", e)
    if not a.no_sweep and have_time("sweep decode", 6):
        L = decode_lengths[2]
        try:
            q, k, v = make_qkv(jax.random.PRNGKey(12), batch, 1, L, n_kv, group, hd, dtype)
            valid = jnp.ones((batch, L), bool)
            args = (q, k, v, jnp.int32(L - 1))
            for cfg in decode_cfgs[1:]:
                if not have_time(f"sweep decode {cfg}", 5):
                    break
                try:
                    time_row("sweep", "pallas", decode_cfg_name(cfg), "dec", L, 1, decode_fn(cfg, valid), args,
                             kv_bytes=2 * batch * L * n_kv * hd * itemsize)
                except Exception as e:
                    record_error(f"sweep decode {cfg}", e)
            del q, k, v, args
        except Exception as e:
            record_error("sweep decode", e)

    # ---- summary -----------------------------------------------------------------------------------
    log(f"=== summary ({report.data['card']}, jax {jax.__version__}) ===")
    if copy_bw:
        log(f"copy bandwidth {copy_bw:.1f} GB/s")
    for c in report.data["correctness"]:
        log(f"correctness {c['case']:34s} " + ("OK" if c["ok"] else "FAIL")
            + (f"  fp32 {c['rel_err_fp32']:.1e} bf16 {c['rel_err_bf16']:.1e}" if "rel_err_fp32" in c else ""))
    log(f"{'section':8s} {'impl':7s} {'config':22s} {'case':5s} {'L':>7s} {'ms':>9s} {'TFLOP/s':>8s} {'GB/s':>8s} "
        f"{'of copy':>7s}")
    for section in ("prefill", "decode", "sweep"):
        for r in report.data[section]:
            tf = f"{r['TFLOPs']:8.1f}" if "TFLOPs" in r else f"{'-':>8s}"
            gb = f"{r['GBps']:8.1f}" if "GBps" in r else f"{'-':>8s}"
            fr = f"{r['frac_of_copy']:7.2f}" if r.get("frac_of_copy") else f"{'-':>7s}"
            log(f"{section:8s} {r['impl']:7s} {r['config']:22s} {r['case']:5s} {r['length']:7d} {r['ms']:9.3f} "
                f"{tf} {gb} {fr}")
    if report.data["errors"]:
        log(f"{len(report.data['errors'])} errors/skips (see JSON)")
    report.write(finished=True)
    log(f"wrote {a.out} in {elapsed():.1f} s")


if __name__ == "__main__":
    main()
