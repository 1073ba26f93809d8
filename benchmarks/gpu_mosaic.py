"""GPU check and benchmark of the Mosaic GPU kernels against their Triton twins, XLA and cuDNN: the ExpertsInt8
grouped matmul (``pallas_kernels.int8_ragged_dot_mgpu``) and the flash prefill attention
(``pallas_kernels.flash_attention_mgpu``).

    python benchmarks/gpu_mosaic.py --out $OUT/mosaic.json
    python benchmarks/gpu_mosaic.py --only attention --out $OUT/mosaic_attention.json
    python benchmarks/gpu_mosaic.py --dry-run --out /tmp/mosaic.json   # CPU: tiny shapes, interpret modes

Sections, each guarded (an error is recorded and the script goes on), the JSON rewritten after each row:

1. ``environment`` (``common.environment``), the measured copy bandwidth (``common.copy_bandwidth``) and
   dense bf16 matmul rate (``gpu_prefill.matmul_rate``), the floors every time is read against;
2. ``check``: does the Mosaic int8 kernel lower and compile, and is it right? A small ragged case (empty
   experts, a group over two row chunks, padding rows), bf16 and fp32 lhs, bf16 and fp32 outputs, against
   a float64 numpy oracle and the XLA int8 reference (``rel_err`` = max |got - ref| / max |ref|), with the
   XLA path's own error next to it;
   ``attention_check``: the same for the flash kernel, both operand variants (``"fa3"``: K transposed by
   the wgmma descriptor, P from registers; ``"smem"``: K transposed by the wrapper, P through SMEM; only
   ``"smem"`` runs in interpret mode), each also warp-specialized (bf16 only): 40 queries of 2 kv heads x
   GQA 4 at slots 150 and 20 of a 200-slot cache whose first row is left-padded for 70 slots, fp32 (bound
   1e-5) and bf16 (bound ``2^-9 (1 + max|v| / max|out|)``, ``tests/test_mosaic_attention.py``), real
   queries only;
3. ``runs``: Jamba-1.5-Mini expert shapes (E=16, H=4096, I=14336; ``gate_up`` ``[16, 4096, 14336]``,
   ``down`` ``[16, 14336, 4096]``), 1/8/64/256 tokens with top-2 random routing (M = 2 * tokens rows),
   bf16 lhs and output. Per run: ``kernel`` (the weight shape), ``impl`` (``xla-bf16``:
   ``jax.lax.ragged_dot`` on bf16 weights; ``xla-int8``: ``int8_ragged_dot_reference``; ``triton``:
   ``int8_ragged_dot_pallas`` with ``quant.pallas_config``; ``mosaic``: ``int8_ragged_dot_mgpu`` with
   ``mosaic_config``; ``mosaic-sweep``: other tiles, while the budget lasts), ``tokens``, ``ms`` (median of
   ``--iters`` calls after a compile and warm-up), ``pipelined_ms`` (calls dispatched back to back),
   ``fraction_of_floor`` (bytes of the touched experts' weights, int8 with their scales or bf16, over the
   time, over the copy bandwidth), ``rel_err_vs_xla_int8``, ``config``;
   ``attention_runs``: Jamba-1.5-Mini attention (8 kv heads x GQA 4, head_dim 128, bf16, batch 1) at 4K,
   16K and 64K tokens: ``case`` ``self`` (causal self-attention of the whole prompt) and ``chunk`` (a
   2048-query chunk at the end of the context). Per run: ``kernel`` ``flash_prefill``, ``impl``
   (``mosaic``: the ``"fa3"`` variant with one warpgroup per CTA, ``mosaic-ws``: warp-specialized,
   ``mosaic-smem``: the ``"smem"`` variant; a dry run has ``mosaic-smem`` and ``mosaic-ws-smem``; ``triton``:
   ``flash_attention_pallas``, ``xla``:
   ``blocked_attention``, ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")`` on K/V in its
   own ``[b, t, kv, d]`` layout, causal for ``self``, unmasked for ``chunk`` (its causal mask is aligned
   to the first key: it does more work there); ``mosaic-sweep``: other tiles), ``length``, ``tokens``
   (queries), ``ms``, ``tflops`` (useful FLOPs: 4 x head_dim x heads x visible (query, key) pairs),
   ``fraction_of_floor`` (that rate over the measured bf16 matmul rate), ``rel_err_vs_xla`` (bf16
   outputs against the XLA path's), ``config``;
4. ``summary`` / ``attention_summary``: per (kernel, tokens) / (case, length) the best time of each impl
   and mosaic's ratio to the others.

``--budget-s`` (seconds since the start) skips the remaining runs once spent; what ran is in the JSON. The
main runs of both kernels come before either sweep. ``--only int8|attention`` runs one kernel's sections.
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

from gpu_attention import cudnn_attention, make_qkv, seq_major
from gpu_prefill import matmul_rate

from jamba_jax.attention import blocked_attention, naive_attention
from jamba_jax.quant import pallas_config
from pallas_kernels import mosaic_gpu
from pallas_kernels.flash_attention import flash_attention_pallas
from pallas_kernels.flash_attention_mgpu import OPERANDS, flash_attention_mgpu, mosaic_attention_config
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
# attention: batch, kv heads, GQA group, head_dim, context lengths, the chunk's queries
ATTN_MINI = dict(batch=1, kv_heads=8, group=4, head_dim=128, lengths=(4096, 16384, 65536), chunk=2048)
ATTN_TINY = dict(batch=1, kv_heads=2, group=2, head_dim=64, lengths=(128,), chunk=64)


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


def attention_float64(q, k, v, q_start: int, kv_valid) -> np.ndarray:
    """float64 numpy attention written from the masking rule (a fully masked row: a uniform average)."""
    q, k, v = (np.asarray(jnp.asarray(a, jnp.float32), np.float64) for a in (q, k, v))
    slots = np.arange(k.shape[2])
    mask = (slots[None, :] <= q_start + np.arange(q.shape[1])[:, None])[None] & np.asarray(kv_valid)[:, None, :]
    s = np.einsum("bqhgd,bhkd->bhgqk", q, k) / np.sqrt(q.shape[-1])
    s = np.where(mask[:, None, None], s, -1e300)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhgqk,bhkd->bqhgd", p / p.sum(-1, keepdims=True), v)


def attention_check(interpret: bool, head_dim: int) -> dict:
    """The Mosaic flash kernel, each operand variant that can run, fp32 and bf16, chunks at two offsets into a
    left-padded cache, against the float64 oracle and XLA (real queries only)."""
    out = {}
    rng = np.random.default_rng(1)
    batch, q_len, k_len, n_kv, group = 2, 40, 200, 2, 4
    q32 = jnp.asarray(rng.standard_normal((batch, q_len, n_kv, group, head_dim)), jnp.float32)
    k32, v32 = (jnp.asarray(rng.standard_normal((batch, n_kv, k_len, head_dim)), jnp.float32) for _ in range(2))
    valid = np.ones((batch, k_len), bool)
    valid[0, :70] = False
    for q_start in (150, 20):
        real = valid[:, q_start:q_start + q_len]
        ws_options = (False,) if interpret and q_start == 20 else (False, True)  # interpret mode: slow threads
        for dname, dtype in (("f32", jnp.float32), ("bf16", jnp.bfloat16)):
            q, k, v = (a.astype(dtype) for a in (q32, k32, v32))
            exact = attention_float64(q, k, v, q_start, valid)
            with jax.default_matmul_precision("highest"):
                xla = np.asarray(jnp.asarray(naive_attention(q, k, v, q_start, jnp.asarray(valid)), jnp.float32))
            bound = 1e-5 if dname == "f32" else 2.0 ** -9 * (
                1 + float(np.abs(np.asarray(v, np.float32)).max()) / float(np.abs(exact[real]).max()))
            variants = [(operands, ws) for operands in (("smem",) if interpret else OPERANDS)
                        for ws in (ws_options if dname == "bf16" else (False,))]  # fp32 x 2 wgs: no SMEM
            for operands, ws in variants:
                key = f"{dname}_{operands}{'_ws' if ws else ''}_q_start{q_start}"
                try:
                    got = np.asarray(jnp.asarray(flash_attention_mgpu(q, k, v, q_start, jnp.asarray(valid),
                                                                      operands=operands, warp_specialized=ws,
                                                                      interpret=interpret), jnp.float32))
                    row = dict(rel_err_vs_oracle=rel_err(got, exact, real),
                               xla_rel_err_vs_oracle=rel_err(xla, exact, real),
                               rel_err_vs_xla=rel_err(got, xla, real), bound=bound,
                               finite=bool(np.all(np.isfinite(got))))
                    row["pass"] = bool(row["rel_err_vs_oracle"] <= bound and row["finite"])
                    log(f"attention check {key}: {row}")
                except Exception as e:  # noqa: BLE001
                    row = dict(error=short_error(e, 20), **{"pass": False})
                    log(f"attention check {key} FAILED:\n{row['error']}")
                    if interpret:
                        mosaic_gpu.reset_interpret_state()
                out[key] = row
    return out


def attention_sweep_configs(dry_run: bool) -> list[dict]:
    """Mosaic flash tiles to try besides the default: deeper pipelines, longer key tiles and 128-row blocks
    at one CTA per SM (a config that overflows SMEM or registers fails to compile and is recorded)."""
    if dry_run:
        return [dict(block_q=128, block_kv=64, max_concurrent_steps=2)]
    return [dict(block_q=64, block_kv=64, max_concurrent_steps=3),  # the default is 64 / 64 / 2 at head_dim 128
            dict(block_q=64, block_kv=128, max_concurrent_steps=2),  # one CTA per SM from here on
            dict(block_q=128, block_kv=64, max_concurrent_steps=2),
            dict(block_q=64, block_kv=64, max_concurrent_steps=4, warp_specialized=True),  # default: 64 / 128 / 2
            dict(block_q=128, block_kv=64, max_concurrent_steps=2, warp_specialized=True),
            dict(block_q=64, block_kv=128, max_concurrent_steps=1)]


MOSAIC_IMPLS = ("mosaic", "mosaic-ws", "mosaic-smem", "mosaic-ws-smem")


def _mosaic_impl(operands: str, warp_specialized: bool) -> str:
    """The ``impl`` name of a Mosaic flash variant: ``mosaic`` (``"fa3"`` operands, one warpgroup per CTA),
    ``-ws`` (warp-specialized), ``-smem`` (``"smem"`` operands)."""
    return "mosaic" + ("-ws" if warp_specialized else "") + ("-smem" if operands == "smem" else "")


def summarize_attention(runs: list[dict]) -> list[dict]:
    best = {}
    for r in runs:
        if r.get("ms") is None:
            continue
        impl = r["impl"]
        if impl == "mosaic-sweep":
            impl = _mosaic_impl(r["config"]["operands"], r["config"].get("warp_specialized", False))
        cur = best.setdefault((r["case"], r["length"]), {}).get(impl)
        if cur is None or r["ms"] < cur["ms"]:
            best[(r["case"], r["length"])][impl] = r
    rows = []
    for (case, length), by_impl in best.items():
        row = dict(kernel="flash_prefill", case=case, length=length,
                   **{f"{i}_ms": r["ms"] for i, r in by_impl.items()},
                   **{f"{i}_fraction_of_floor": r["fraction_of_floor"] for i, r in by_impl.items()})
        for mine in MOSAIC_IMPLS:
            if mine not in by_impl:
                continue
            row[f"{mine}_config"] = by_impl[mine]["config"]
            for other in ("cudnn", "triton", "xla"):
                if other in by_impl:
                    row[f"{mine}_over_{other}"] = by_impl[mine]["ms"] / by_impl[other]["ms"]
        rows.append(row)
    return rows


def int8_section(report: Report, shapes: dict, tokens_list, interpret: bool, dry_run: bool, iters: int,
                 bandwidth: float):
    """The int8 grouped matmul's main runs; returns the function that runs its sweep."""
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

    def sweep():
        try:  # other Mosaic tiles while time is left
            for kernel, tokens, x, q, s, g, int8_bytes, ref in cases:
                for cfg in sweep_configs(x.shape[0], *q.shape[1:], dry_run):
                    run(kernel, "mosaic-sweep", tokens, mosaic(cfg), (x, q, s, g), int8_bytes, ref, cfg)
        except Exception as e:  # noqa: BLE001
            report.error("sweep", e)

    return sweep


def attention_section(report: Report, shapes: dict, interpret: bool, dry_run: bool, iters: int, matmul_tflops: float,
                      no_cudnn: bool):
    """The flash prefill kernels' main runs; returns the function that runs the Mosaic kernel's tile sweep."""
    batch, n_kv, group, hd = shapes["batch"], shapes["kv_heads"], shapes["group"], shapes["head_dim"]
    dtype = jnp.bfloat16

    def mosaic(operands, cfg=None):
        return jax.jit(lambda q, k, v, s, valid: flash_attention_mgpu(q, k, v, s, valid, operands=operands,
                                                                      interpret=interpret, **(cfg or {})))

    def cudnn(causal):
        return jax.jit(lambda q, k, v, s, valid: cudnn_attention(q, k, v, causal))

    xla = jax.jit(blocked_attention)
    triton = jax.jit(lambda q, k, v, s, valid: flash_attention_pallas(q, k, v, s, valid, interpret=interpret))

    def run(case, length, q_len, impl, fn, args, flops, ref, config=None):
        row = dict(kernel="flash_prefill", case=case, impl=impl, length=length, tokens=q_len, config=config)
        if not report.have_time(f"flash_prefill {case} {impl} length={length} {config or ''}"):
            return None
        out = None
        try:
            call_args = (*seq_major(args[:4]), args[4]) if impl == "cudnn" else args
            timing = time_call(fn, *call_args, warmup=1, runs=1 if interpret else iters, max_seconds=10.0)
            out = timing.output
            seconds = timing.median
            row.update(ms=seconds * 1e3, tflops=flops / seconds / 1e12,
                       fraction_of_floor=flops / seconds / 1e12 / matmul_tflops)
            if ref is not None and not (impl == "cudnn" and case == "chunk"):  # unmasked cuDNN: other numbers
                row["rel_err_vs_xla"] = rel_err(jnp.asarray(out, jnp.float32), ref)
            log(f"attention {case:5s} L={length:6d} {impl:12s} {row['ms']:10.3f} ms {row['tflops']:8.2f} TFLOP/s "
                f"floor {row['fraction_of_floor']:.3f} err {row.get('rel_err_vs_xla', '-')} {config or ''}")
        except Exception as e:  # noqa: BLE001
            row["error"] = short_error(e, 12)
            log(f"attention {case} L={length} {impl} {config or ''} FAILED:\n{row['error']}")
            if interpret:
                mosaic_gpu.reset_interpret_state()
        report.add("attention_runs", row)
        return out

    cases = []
    for length in shapes["lengths"]:
        for case, q_len in (("self", length), ("chunk", shapes["chunk"])):
            q_start = length - q_len
            try:
                q, k, v = make_qkv(jax.random.key(length + q_len), batch, q_len, length, n_kv, group, hd, dtype)
                valid = jnp.ones((batch, length), bool)
                args = jax.block_until_ready((q, k, v, jnp.int32(q_start), valid))
            except Exception as e:  # noqa: BLE001
                report.error(f"attention inputs {case} L={length}", e)
                continue
            pairs = q_len * q_start + q_len * (q_len + 1) // 2  # visible (query, key) pairs
            flops = 4 * pairs * hd * n_kv * group * batch
            ref = run(case, length, q_len, "xla", xla, args, flops, None, "blocked block_k=512")
            ref = None if ref is None else np.asarray(jnp.asarray(ref, jnp.float32))
            if case == "self":  # the sweep's cases
                cases.append((case, length, q_len, args, flops, ref))
            variants = [("smem", False), ("smem", True)] if interpret else [("fa3", False), ("fa3", True),
                                                                             ("smem", False)]
            impls = [(_mosaic_impl(ops, ws), mosaic(ops, dict(warp_specialized=ws)),
                      dict(mosaic_attention_config(length, hd, dtype, ops, ws), operands=ops, warp_specialized=ws))
                     for ops, ws in variants]
            impls.append(("triton", triton, "default"))
            if not no_cudnn:
                impls.append(("cudnn", cudnn(case == "self"), "is_causal" if case == "self" else "no mask"))
            for impl, fn, config in impls:
                run(case, length, q_len, impl, fn, args, flops, ref, config)

    def sweep():
        operands = "smem" if interpret else "fa3"
        try:
            for case, length, q_len, args, flops, ref in cases:
                for cfg in attention_sweep_configs(dry_run):
                    run(case, length, q_len, "mosaic-sweep", mosaic(operands, cfg), args, flops, ref,
                        dict(cfg, operands=operands, warp_specialized=cfg.get("warp_specialized", False)))
        except Exception as e:  # noqa: BLE001
            report.error("attention sweep", e)

    return sweep


def main():
    ap = script_parser(__doc__, out="mosaic.json", budget_s=400.0,
                       dry_run="CPU: tiny shapes, the kernels in interpret mode")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--only", choices=("int8", "attention"), default=None, help="one kernel's sections only")
    ap.add_argument("--no-cudnn", action="store_true", help="leave cuDNN attention out")
    args = ap.parse_args()
    interpret = args.dry_run
    shapes = TINY if args.dry_run else MINI
    attn_shapes = ATTN_TINY if args.dry_run else ATTN_MINI
    tokens_list = (1, 8) if args.dry_run else TOKENS
    iters = 2 if args.dry_run else args.iters
    want_int8, want_attention = args.only in (None, "int8"), args.only in (None, "attention")

    # ---- 1. environment ------------------------------------------------------------------------------
    report = Report(args.out, {**environment(), "dry_run": args.dry_run, "shapes": shapes,
                               "attention_shapes": attn_shapes, "runs": [], "attention_runs": []},
                    budget=args.budget_s)
    data = report.data
    log("jax", data["jax_version"], "| device:", data["device"], "|", data["card"])
    try:
        data["copy_bandwidth_gbps"] = copy_bandwidth() / 1e9
        log(f"copy bandwidth {data['copy_bandwidth_gbps']:.1f} GB/s")
    except Exception as e:  # noqa: BLE001
        report.error("copy_bandwidth", e)
    if want_attention:
        try:
            data["matmul"] = matmul_rate(256 if args.dry_run else 8192)
            log(f"bf16 matmul {data['matmul']['tflops']:.1f} TFLOP/s")
        except Exception as e:  # noqa: BLE001
            report.error("matmul", e)
    report.write()
    bandwidth = data.get("copy_bandwidth_gbps", float("nan")) * 1e9
    matmul_tflops = data.get("matmul", {}).get("tflops", float("nan"))

    # ---- 2. checks -----------------------------------------------------------------------------------
    if want_int8:
        try:
            data["check"] = check(interpret)
        except Exception as e:  # noqa: BLE001
            report.error("check", e)
        report.write()
    if want_attention:
        try:
            data["attention_check"] = attention_check(interpret, attn_shapes["head_dim"])
        except Exception as e:  # noqa: BLE001
            report.error("attention_check", e)
        report.write()

    # ---- 3. runs, then the sweeps while time is left -----------------------------------------------------
    sweeps = []
    if want_int8:
        sweeps.append(int8_section(report, shapes, tokens_list, interpret, args.dry_run, iters, bandwidth))
    if want_attention:
        try:
            sweeps.append(attention_section(report, attn_shapes, interpret, args.dry_run, iters, matmul_tflops,
                                            args.no_cudnn))
        except Exception as e:  # noqa: BLE001
            report.error("attention runs", e)
    for sweep in sweeps:
        sweep()

    # ---- 4. summary ----------------------------------------------------------------------------------
    for key, fn, runs in (("summary", summarize, "runs"),
                          ("attention_summary", summarize_attention, "attention_runs")):
        try:
            data[key] = fn(data[runs])
            for row in data[key]:
                log(key, row)
        except Exception as e:  # noqa: BLE001
            report.error(key, e)
    report.write(finished=True)
    log(f"JSON -> {args.out}")


if __name__ == "__main__":
    main()
