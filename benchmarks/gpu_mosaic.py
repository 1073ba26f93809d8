"""GPU check and benchmark of the Mosaic GPU ExpertsInt8 grouped matmul (``pallas_kernels.int8_ragged_dot_mgpu``)
against its Triton twin and XLA.

    python benchmarks/gpu_mosaic.py --out $OUT/mosaic.json
    python benchmarks/gpu_mosaic.py --dry-run --out /tmp/mosaic.json   # CPU: tiny shapes, interpret modes

Sections, each guarded (an error is recorded and the script goes on), the JSON rewritten after each row:

1. ``environment`` (``common.environment``) and the measured copy bandwidth (``common.copy_bandwidth``),
   the floor every time is read against;
2. ``check``: does the Mosaic kernel lower and compile, and is it right? A small ragged case (empty
   experts, a group over two row chunks, padding rows), bf16 and fp32 lhs, bf16 and fp32 outputs, against
   a float64 numpy oracle and the XLA int8 reference (``rel_err`` = max |got - ref| / max |ref|), with the
   XLA path's own error next to it;
3. ``runs``: Jamba-1.5-Mini expert shapes (E=16, H=4096, I=14336; ``gate_up`` ``[16, 4096, 14336]``,
   ``down`` ``[16, 14336, 4096]``), 1/8/64/256 tokens with top-2 random routing (M = 2 * tokens rows),
   bf16 lhs and output. Per run: ``kernel`` (the weight shape), ``impl`` (``xla-bf16``:
   ``jax.lax.ragged_dot`` on bf16 weights; ``xla-int8``: ``int8_ragged_dot_reference``; ``triton``:
   ``int8_ragged_dot_pallas`` with ``quant.pallas_config``; ``mosaic``: ``int8_ragged_dot_mgpu`` with
   ``mosaic_config``; ``mosaic-sweep``: other tiles, while the budget lasts), ``tokens``, ``ms`` (median of
   ``--iters`` calls after a compile and warm-up), ``pipelined_ms`` (calls dispatched back to back),
   ``fraction_of_floor`` (bytes of the touched experts' weights, int8 with their scales or bf16, over the
   time, over the copy bandwidth), ``rel_err_vs_xla_int8``, ``config``;
4. ``summary``: per (kernel, tokens) the best time of each impl and mosaic's ratio to triton and XLA.

``--budget-s`` (seconds since the start) skips the remaining runs once spent; what ran is in the JSON.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
from common import (
    Report,
    copy_bandwidth,
    environment,
    log,
    rel_err,
    script_parser,
    short_error,
    time_call,
)

from jamba_jax.quant import pallas_config
from pallas_kernels import mosaic_gpu
from pallas_kernels.int8_ragged_dot import (
    int8_ragged_dot_float64,
    int8_ragged_dot_pallas,
    int8_ragged_dot_reference,
    quantize_int8,
)
from pallas_kernels.int8_ragged_dot_mgpu import int8_ragged_dot_mgpu, mosaic_config

TOKENS = (1, 8, 64, 256)
MINI = dict(E=16, H=4096, I=14336)
TINY = dict(E=4, H=128, I=192)


def routing(tokens: int, experts: int, seed: int):
    """Group sizes of top-2 random routing of ``tokens`` tokens."""
    r = np.random.default_rng(seed)
    choice = np.argsort(r.random((tokens, experts)), axis=1)[:, :2]
    return jnp.asarray(np.bincount(choice.reshape(-1), minlength=experts).astype(np.int32))


def check(interpret: bool) -> dict:
    """The Mosaic kernel on a small ragged case, every lhs/output dtype pair, against the oracle and XLA."""
    out = {}
    rng = np.random.default_rng(0)
    m, k, n, gs = 83, 256, 128, [0, 70, 0, 9]  # padding rows 79..82
    w = jnp.asarray(rng.standard_normal((len(gs), k, n)) / np.sqrt(k), jnp.float32)
    q, s = quantize_int8(w)
    g = jnp.asarray(gs, jnp.int32)
    x32 = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    for lname, lhs in (("bf16", x32.astype(jnp.bfloat16)), ("f32", x32)):
        exact = int8_ragged_dot_float64(lhs, q, s, g)
        for oname, odt in (("f32", jnp.float32), ("bf16", jnp.bfloat16)):
            key = f"lhs_{lname}_out_{oname}"
            try:
                with jax.default_matmul_precision("highest"):
                    ref = np.asarray(jnp.asarray(int8_ragged_dot_reference(lhs, q, s, g, preferred_element_type=odt),
                                                 jnp.float32))
                got = np.asarray(jnp.asarray(int8_ragged_dot_mgpu(lhs, q, s, g, preferred_element_type=odt,
                                                                  interpret=interpret), jnp.float32))
                row = dict(rel_err_vs_oracle=rel_err(got, exact), xla_rel_err_vs_oracle=rel_err(ref, exact),
                           rel_err_vs_xla=rel_err(got, ref), padding_rows_zero=bool(np.all(got[sum(gs):] == 0)))
                bound = 1e-5 if oname == "f32" else max(2 * row["xla_rel_err_vs_oracle"], 2.0 ** -9)
                row["pass"] = bool(row["rel_err_vs_oracle"] <= bound and row["padding_rows_zero"])
                log(f"check {key}: {row}")
            except Exception as e:  # noqa: BLE001
                row = dict(error=short_error(e, 20), **{"pass": False})
                log(f"check {key} FAILED:\n{short_error(e, 20)}")
                if interpret:
                    mosaic_gpu.reset_interpret_state()
            out[key] = row
    return out


def sweep_configs(m: int, k: int, n: int, dry_run: bool) -> list[dict]:
    """Mosaic tiles to try besides the default: narrower/wider column tiles, deeper pipelines, longer K."""
    if dry_run:
        return [dict(block_m=64, block_n=64, block_k=64, max_concurrent_steps=2)]
    bm = 64 if m <= 256 else 128
    out = [dict(block_m=bm, block_n=64, block_k=64, max_concurrent_steps=6),
           dict(block_m=bm, block_n=256, block_k=64, max_concurrent_steps=3),
           dict(block_m=bm, block_n=128, block_k=128, max_concurrent_steps=3),
           dict(block_m=bm, block_n=128, block_k=64, max_concurrent_steps=6)]
    if m > 128:
        out.append(dict(block_m=64, block_n=128, block_k=64, max_concurrent_steps=4))
    return [c for c in out if n % c["block_n"] == 0 and k % c["block_k"] == 0]


def summarize(runs: list[dict]) -> list[dict]:
    best = {}
    for r in runs:
        if r.get("ms") is None:
            continue
        impl = "mosaic" if r["impl"].startswith("mosaic") else r["impl"]
        key = (r["kernel"], r["tokens"])
        cur = best.setdefault(key, {}).get(impl)
        if cur is None or r["ms"] < cur["ms"]:
            best[key][impl] = r
    rows = []
    for (kernel, tokens), by_impl in best.items():
        row = dict(kernel=kernel, tokens=tokens, **{f"{i}_ms": r["ms"] for i, r in by_impl.items()},
                   **{f"{i}_fraction_of_floor": r["fraction_of_floor"] for i, r in by_impl.items()})
        if "mosaic" in by_impl:
            row["mosaic_config"] = by_impl["mosaic"]["config"]
            for other in ("triton", "xla-int8", "xla-bf16"):
                if other in by_impl:
                    row[f"mosaic_over_{other}"] = by_impl["mosaic"]["ms"] / by_impl[other]["ms"]
        rows.append(row)
    return rows


def main():
    ap = script_parser(__doc__, out="mosaic.json", budget_s=300.0,
                       dry_run="CPU: tiny shapes, the kernels in interpret mode")
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    interpret = args.dry_run
    shapes = TINY if args.dry_run else MINI
    tokens_list = (1, 8) if args.dry_run else TOKENS
    iters = 2 if args.dry_run else args.iters

    # ---- 1. environment ------------------------------------------------------------------------------
    report = Report(args.out, {**environment(), "dry_run": args.dry_run, "shapes": shapes, "runs": []},
                    budget=args.budget_s)
    data = report.data
    log("jax", data["jax_version"], "| device:", data["device"], "|", data["card"])
    try:
        data["copy_bandwidth_gbps"] = copy_bandwidth() / 1e9
        log(f"copy bandwidth {data['copy_bandwidth_gbps']:.1f} GB/s")
    except Exception as e:  # noqa: BLE001
        report.error("copy_bandwidth", e)
    report.write()
    bandwidth = data.get("copy_bandwidth_gbps", float("nan")) * 1e9

    # ---- 2. check ------------------------------------------------------------------------------------
    try:
        data["check"] = check(interpret)
    except Exception as e:  # noqa: BLE001
        report.error("check", e)
    report.write()

    # ---- 3. runs -------------------------------------------------------------------------------------
    E, H, I = shapes["E"], shapes["H"], shapes["I"]
    weights = {}
    try:
        make = jax.jit(lambda key, shape: (jax.random.normal(key, shape, jnp.float32) * 0.02).astype(jnp.bfloat16),
                       static_argnums=1)
        for name, key, shape in (("gate_up", 0, (E, H, I)), ("down", 1, (E, I, H))):
            wb = make(jax.random.key(key), shape)
            q, s = jax.block_until_ready(jax.jit(quantize_int8)(wb))
            weights[name] = (wb, q, s)
            log(f"weights {name} {shape}: bf16 {wb.nbytes / 2**30:.2f} GiB, int8 {q.nbytes / 2**30:.2f} GiB")
    except Exception as e:  # noqa: BLE001
        report.error("weights", e)
    report.write()

    bf16 = jnp.bfloat16
    xla_bf16 = jax.jit(lambda x, w, g: jax.lax.ragged_dot(x, w, g, preferred_element_type=bf16))
    xla_int8 = jax.jit(lambda x, q, s, g: int8_ragged_dot_reference(x, q, s, g, preferred_element_type=bf16))

    def triton(x, q, s, g):
        return int8_ragged_dot_pallas(x, q, s, g, preferred_element_type=bf16, interpret=interpret,
                                      **pallas_config(x.shape[0], *q.shape[1:]))

    def mosaic(cfg):
        return jax.jit(lambda x, q, s, g: int8_ragged_dot_mgpu(x, q, s, g, preferred_element_type=bf16,
                                                               interpret=interpret, **cfg))

    def run(kernel, impl, tokens, fn, fargs, weight_bytes, ref, config=None):
        row = dict(kernel=kernel, impl=impl, tokens=tokens, M=2 * tokens, config=config)
        if not report.have_time(f"{kernel} {impl} tokens={tokens} {config or ''}"):
            return
        try:
            timing = time_call(fn, *fargs, warmup=2, runs=iters, pipelined=True)
            row.update(ms=timing.median * 1e3, pipelined_ms=timing.pipelined * 1e3, weight_bytes=weight_bytes,
                       fraction_of_floor=weight_bytes / timing.median / bandwidth)
            if ref is not None:
                row["rel_err_vs_xla_int8"] = rel_err(jnp.asarray(timing.output, jnp.float32), ref)
            log(f"{kernel:8s} {impl:12s} tok={tokens:4d} {row['ms']:9.4f} ms  floor {row['fraction_of_floor']:.3f}  "
                f"err {row.get('rel_err_vs_xla_int8', '-')}  {config or ''}")
        except Exception as e:  # noqa: BLE001
            row["error"] = short_error(e, 12)
            log(f"{kernel} {impl} tokens={tokens} {config or ''} FAILED:\n{row['error']}")
            if interpret:
                mosaic_gpu.reset_interpret_state()
        report.add("runs", row)

    cases = []
    try:
        for name, (wb, q, s) in weights.items():
            kernel = f"{name}{list(q.shape)}"
            _, k, n = q.shape
            for tokens in tokens_list:
                m = 2 * tokens
                g = routing(tokens, E, seed=tokens)
                x = jax.random.normal(jax.random.key(100 + tokens), (m, k), bf16)
                touched = int(np.sum(np.asarray(g) > 0))
                int8_bytes, bf16_bytes = touched * (k * n + 4 * n), touched * k * n * 2
                ref = np.asarray(jnp.asarray(xla_int8(x, q, s, g), jnp.float32))
                cases.append((kernel, tokens, x, q, s, g, int8_bytes, ref))
                run(kernel, "xla-bf16", tokens, xla_bf16, (x, wb, g), bf16_bytes, None)
                run(kernel, "xla-int8", tokens, xla_int8, (x, q, s, g), int8_bytes, None)
                run(kernel, "triton", tokens, jax.jit(triton), (x, q, s, g), int8_bytes, ref,
                    pallas_config(m, k, n))
                cfg = mosaic_config(m, k, n, bf16, bf16)
                run(kernel, "mosaic", tokens, mosaic(cfg), (x, q, s, g), int8_bytes, ref, cfg)
    except Exception as e:  # noqa: BLE001
        report.error("runs", e)
    try:  # other Mosaic tiles while time is left
        for kernel, tokens, x, q, s, g, int8_bytes, ref in cases:
            for cfg in sweep_configs(x.shape[0], *q.shape[1:], args.dry_run):
                run(kernel, "mosaic-sweep", tokens, mosaic(cfg), (x, q, s, g), int8_bytes, ref, cfg)
    except Exception as e:  # noqa: BLE001
        report.error("sweep", e)

    # ---- 4. summary ----------------------------------------------------------------------------------
    try:
        data["summary"] = summarize(data["runs"])
        for row in data["summary"]:
            log("summary", row)
    except Exception as e:  # noqa: BLE001
        report.error("summary", e)
    report.write(finished=True)
    log(f"JSON -> {args.out}")


if __name__ == "__main__":
    main()
