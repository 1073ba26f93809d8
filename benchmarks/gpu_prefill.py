"""Prefill near the matmul peak, and a 256K-token prompt, on one GPU: full Jamba-1.5-Mini (32 layers, random
weights).

    python benchmarks/gpu_prefill.py --out results.json [--budget-s 450] [--chunk N]
    python benchmarks/gpu_prefill.py --dry-run --out /tmp/prefill.json   # CPU: jamba-tiny, tiny lengths

Sections, in order (the JSON is rewritten after each row; what the budget leaves no time for is recorded
under ``errors`` as skipped):

1. ``matmul``: the dense bf16 matmul rate of this chip, measured in this run (a large square ``jnp.dot``).
2. ``prefill``: ``jamba_jax.init_cache`` + ``jamba_jax.prefill`` of 1K / 4K / 16K / 64K-token prompts for
   bf16 and ExpertsInt8 weights, each with ``Kernels.named("xla")`` and ``("pallas")``; the compiled
   programs are warmed up first (one chunk into a cache of the same length: the same shapes). Per run:
   ``prefill_seconds``, ``prefill_tokens_per_second``, ``mfu`` (``jamba_jax.flops.prefill_flops`` total /
   seconds / the measured matmul rate) and ``peak_device_bytes`` (the process's peak so far).
3. ``profile``: one prefill chunk at full widths, each layer kind's compiled function on its own (attention
   mixer, Mamba mixer, MoE FFN, dense MLP, RMSNorm, LM head), bf16, with its FLOPs and rate.
4. ``chunk_sweep``: prefill of a 16K prompt (ExpertsInt8, Pallas) at chunks 512 .. 8K.
5. ``long_context``: a 256K-token prompt with ExpertsInt8 (Pallas): prefill time, decode ms/token
   (``jamba_jax.decode_step`` with 256K cached tokens) and peak device memory.

bf16 Mini is ~104 GB of weights: the bf16 runs come first, then the weights are quantized one leaf at a time,
each bf16 leaf freed as its int8 copy is made (the whole bf16 tree plus the int8 one would not fit 141 GB).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

import jamba_jax
from jamba_jax import JambaConfig, steps
from jamba_jax.attention import Attention
from jamba_jax.flops import layer_flops, prefill_flops
from jamba_jax.layers import RMSNorm
from jamba_jax.mamba import Mamba
from jamba_jax.moe import MLP, MoE
from jamba_jax import quant

from common import Report, environment, log, random_params, script_parser, time_call

FULL = {"config": "jamba-1.5-mini", "layers": 32, "prompts": (1024, 4096, 16384, 65536), "matmul_n": 8192,
        "sweep": (512, 1024, 2048, 4096, 8192), "sweep_prompt": 16384, "long": 262144, "decode_steps": 32}
# Dry run: 2 layers of jamba-tiny's widths (Mamba + dense MLP, attention + MoE): every kind, fast compiles.
DRY = {"config": "jamba-tiny", "layers": 2, "overrides": {"attn_layer_period": 2, "attn_layer_offset": 1}, "prompts": (64,), "matmul_n": 256, "chunk": 32,
       "sweep": (16, 64), "sweep_prompt": 64, "long": 256, "decode_steps": 4}
KEY_BLOCK = 512  # attention.KEY_BLOCK: a cache of whole key blocks spares the attention a padded K/V copy


def peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() if hasattr(jax.devices()[0], "memory_stats") else None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def matmul_rate(n: int) -> dict:
    """TFLOP/s of a bf16 ``[n, n] @ [n, n]`` (fp32 accumulation inside the dot, bf16 out)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    timing = time_call(jax.jit(jnp.dot), a, b, warmup=2, runs=10, pipelined=True)
    seconds = min(timing.best, timing.pipelined)
    return {"n": n, "seconds": seconds, "tflops": 2 * n ** 3 / seconds / 1e12}


def quantize_freeing(params, config):
    """ExpertsInt8 params (the same as ``jamba_jax.quantize_params``), each bf16 feed-forward leaf deleted
    from the device as soon as its int8 copy exists. ``params`` is unusable afterwards."""
    flat = traverse_util.flatten_dict(params)
    for path, leaf in flat.items():
        if quant.is_quantized(path) and not isinstance(leaf, quant.QuantizedWeight):
            flat[path] = jax.block_until_ready(quant.quantize(leaf))
            leaf.delete()
    return jamba_jax.quantize_params(traverse_util.unflatten_dict(flat), config)  # checks it is complete


def prompt(config, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, config.vocab_size, (1, n)).astype(np.int32)


def run_prefill(model, ids, chunk: int, slots: int | None = None) -> tuple[float, object]:
    """Seconds of one prefill of ``ids`` into a fresh cache of ``slots`` (default: the prompt's length),
    after a warm-up of one piece of each size into a cache of the same size (the same compiled programs)."""
    n = ids.shape[1]
    slots = slots or n
    for size in sorted(set(steps.prefill_pieces(n, chunk))):
        jax.block_until_ready(jamba_jax.prefill(model, ids[:, :size], jamba_jax.init_cache(model, 1, slots),
                                                chunk_size=chunk))
    cache = jax.block_until_ready(jamba_jax.init_cache(model, 1, slots))
    t0 = time.perf_counter()
    logits, cache = jamba_jax.prefill(model, ids, cache, chunk_size=chunk)
    jax.block_until_ready(logits)
    return time.perf_counter() - t0, cache


def prefill_row(variant, config, n, chunk, seconds, rate_tflops) -> dict:
    flops = prefill_flops(config, n)["total"]
    return {"variant": variant, "prompt_tokens": n, "chunk": chunk, "prefill_seconds": seconds,
            "prefill_tokens_per_second": n / seconds, "model_tflop": flops / 1e12,
            "tflops": flops / seconds / 1e12,
            "mfu": flops / seconds / (rate_tflops * 1e12) if rate_tflops else None,
            "peak_device_bytes": peak_bytes()}


def profile_kinds(config, chunk: int, dtype, report: Report, rate_tflops):
    """Each layer kind's compiled function on one chunk ``[1, chunk, hidden]`` at full widths."""
    x = jax.random.normal(jax.random.key(2), (1, chunk, config.hidden_size), dtype)
    valid = jnp.ones((1, chunk), bool)
    per = layer_flops(config, chunk)
    kinds = [("attention xla", Attention(config, dtype, "xla"), (x, valid), sum(per["attention"].values())),
             ("attention pallas", Attention(config, dtype, "pallas"), (x, valid), sum(per["attention"].values())),
             ("mamba xla", Mamba(config, dtype, "xla"), (x, valid), sum(per["mamba"].values())),
             ("mamba pallas", Mamba(config, dtype, "pallas"), (x, valid), sum(per["mamba"].values())),
             ("moe ffn", MoE(config, dtype), (x,), sum(per["moe"].values())),
             ("dense mlp", MLP(config, dtype), (x,), per["dense_mlp"]["dense_mlp"]),
             ("rmsnorm", RMSNorm(config.rms_norm_eps, dtype), (x,), 0)]
    for name, module, args, flops in kinds:
        if not report.have_time(f"profile {name}", 20):
            return
        try:
            variables = jax.jit(module.init)(jax.random.key(0, impl="unsafe_rbg"), *args)
            variables = jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                                     variables)
            fn = jax.jit(module.apply)
            t = time_call(fn, variables, *args, warmup=1, runs=5, max_seconds=5).best
            del variables
            report.add("profile", kind_row(name, chunk, t, flops, rate_tflops))
        except Exception as e:  # noqa: BLE001
            report.error(f"profile {name}", e)
    try:  # the LM head: the last position (what prefill computes) and every position
        w = jax.random.normal(jax.random.key(3), (config.hidden_size, config.vocab_size), dtype)
        for name, rows in (("lm head last", x[:, -1]), ("lm head all", x[0])):
            t = time_call(jax.jit(jnp.dot), rows, w, warmup=1, runs=5, max_seconds=5).best
            report.add("profile", kind_row(name, chunk, t, 2 * rows.shape[0] * w.size, rate_tflops))
    except Exception as e:  # noqa: BLE001
        report.error("profile lm head", e)


def kind_row(name, chunk, seconds, flops, rate_tflops) -> dict:
    row = {"kind": name, "chunk": chunk, "seconds": seconds, "model_flops": flops,
           "tflops": flops / seconds / 1e12, "mfu": flops / seconds / (rate_tflops * 1e12) if rate_tflops else None}
    log(row)
    return row


def main():
    p = script_parser(__doc__, out=None, budget_s=450.0, dry_run="CPU: jamba-tiny, tiny lengths, the whole flow")
    p.add_argument("--chunk", type=int, default=None, help="prefill chunk (default: steps.default_chunk())")
    args = p.parse_args()
    plan = {**FULL, **(DRY if args.dry_run else {})}
    chunk = args.chunk or plan.get("chunk") or steps.default_chunk()
    config = dataclasses.replace(JambaConfig.named(plan["config"]), num_hidden_layers=plan["layers"],
                                 **plan.get("overrides", {}))
    report = Report(args.out, {**environment(), "config": plan["config"], "layers": config.num_hidden_layers,
                               "chunk": chunk, "dry_run": args.dry_run, "budget_s": args.budget_s,
                               "flops": "jamba_jax.flops.prefill_flops (logits of the last position only)"},
                    budget=args.budget_s)
    data = report.data
    rate = None
    try:
        data["matmul"] = matmul_rate(plan["matmul_n"])
        rate = data["matmul"]["tflops"]
        log(f"bf16 matmul {rate:.1f} TFLOP/s")
        report.write()
    except Exception as e:  # noqa: BLE001
        report.error("matmul", e)

    params = random_params(config, jnp.bfloat16)
    log("bf16 params ready")
    report.write(params_ready_s=time.perf_counter())
    # Estimated seconds of a prefill from the last measured rate (generous before the first).
    tok_s = {"value": None}

    def prefill_section(variant, model, prompts, key="prefill", reserve=0.0):
        for n in prompts:
            need = 30 + (2 * n / tok_s["value"] if tok_s["value"] else 0)
            if not report.have_time(f"{key} {variant} {n}", need, reserve):
                continue
            try:
                seconds, _ = run_prefill(model, prompt(config, n), chunk)
                row = prefill_row(variant, config, n, chunk, seconds, rate)
                tok_s["value"] = min(tok_s["value"] or row["prefill_tokens_per_second"], row["prefill_tokens_per_second"])
                log(row)
                report.add(key, row)
            except Exception as e:  # noqa: BLE001
                report.error(f"{key} {variant} {n}", e)

    reserve = 0.0 if args.dry_run else 150.0  # for the int8 runs, the sweep and the 256K prompt
    for kernels in ("xla", "pallas"):
        prefill_section(f"bf16 {kernels}", jamba_jax.Jamba(config, params, kernels=kernels), plan["prompts"],
                        reserve=reserve)
    if report.have_time("profile", 30, reserve):
        profile_kinds(config, chunk, jnp.bfloat16, report, rate)
    try:
        t0 = time.perf_counter()
        params = quantize_freeing(params, config)
        data["quantize_seconds"] = time.perf_counter() - t0
        report.write()
    except Exception as e:  # noqa: BLE001
        report.error("quantize", e)
        report.write(finished=True)
        return
    for kernels in ("xla", "pallas"):
        prefill_section(f"int8 {kernels}", jamba_jax.Jamba(config, params, kernels=kernels), plan["prompts"],
                        reserve=0.0 if args.dry_run else 90.0)

    model = jamba_jax.Jamba(config, params, kernels="pallas")
    n = plan["sweep_prompt"]
    for size in plan["sweep"]:
        if not report.have_time(f"chunk_sweep {size}", 30, 0.0 if args.dry_run else 60.0):
            continue
        try:
            seconds, _ = run_prefill(model, prompt(config, n), size)
            row = prefill_row("int8 pallas", config, n, size, seconds, rate)
            log(row)
            report.add("chunk_sweep", row)
        except Exception as e:  # noqa: BLE001
            report.error(f"chunk_sweep {size}", e)

    n = plan["long"]
    if report.have_time("long_context", 30 + (n / tok_s["value"] if tok_s["value"] else 0)):
        try:
            slots = -(-(n + plan["decode_steps"]) // KEY_BLOCK) * KEY_BLOCK  # room for the decode steps
            seconds, cache = run_prefill(model, prompt(config, n), chunk, slots)
            row = prefill_row("int8 pallas", config, n, chunk, seconds, rate)
            row["cache_slots"] = slots
            token = jnp.zeros((1,), jnp.int32)
            logits, cache = jamba_jax.decode_step(model, token, cache)  # compiles
            jax.block_until_ready(logits)
            t0 = time.perf_counter()
            for _ in range(plan["decode_steps"] - 1):
                logits, cache = jamba_jax.decode_step(model, token, cache)
            jax.block_until_ready(logits)
            row.update(decode_ms_per_token=1e3 * (time.perf_counter() - t0) / (plan["decode_steps"] - 1),
                       cached_tokens=n, peak_device_bytes=peak_bytes())
            log(row)
            report.add("long_context", row)
        except Exception as e:  # noqa: BLE001
            report.error("long_context", e)
    report.write(finished=True)
    log(f"done; wrote {args.out}")


if __name__ == "__main__":
    main()
