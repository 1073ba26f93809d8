"""End-to-end generation on one GPU at Jamba-1.5-Mini widths (random weights, as many blocks of 8 layers as asked).

    python3 benchmarks/gpu_generate.py --out results.json [--blocks 1] [--prompt 1024] [--new 64] [--budget 150]
    python3 benchmarks/gpu_generate.py --dry-run --out /tmp/generate.json   # CPU: jamba-tiny, 32 + 8 tokens

Variants: bf16 and ExpertsInt8 weights, each with ``Kernels.named("xla")`` and ``Kernels.named("pallas")``
(the Pallas scan, attention and int8 grouped-matmul kernels), and bf16 ``xla`` with the MoE's decode-sized
inputs on the one-row-at-a-time products of the ``"tiled"`` grouped matmul (``moe.few_rows``) instead of
``ragged_dot``, which reads every expert: a what-if for the GPU default, prefill unchanged. Each runs
``jamba_jax.generate`` once to compile, then once timed, and reports prefill tokens/s, decode tokens/s and
the decode memory-bandwidth floor: the bytes of weights one token reads (``common.weight_bytes_per_token``)
over the measured copy bandwidth (``common.copy_bandwidth``). Every variant is guarded and the JSON is
rewritten after each, so a failure or the time budget never loses results.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import time

import jax
import jax.numpy as jnp

import jamba_jax
from jamba_jax import JambaConfig, moe
from jamba_jax.bench import prompt_ids
from jamba_jax.quant import quantize_params

from common import Report, copy_bandwidth, environment, log, random_params, weight_bytes_per_token

VARIANTS = [("bf16 xla", "xla", False), ("bf16 xla, MoE rows decode", "xla", False),
            ("bf16 pallas", "pallas", False), ("int8 xla", "xla", True), ("int8 pallas", "pallas", True)]


@contextlib.contextmanager
def moe_rows_decode():
    """Within: ``experts_ffn`` sends inputs of at most half the expert count of rows (decode) to the tiled
    path, where they run one row at a time; larger inputs keep the backend's default. Compiled programs
    are dropped on entry and exit (the jit caches do not see the switch)."""
    default = moe.experts_ffn

    def experts_ffn(x, expert_ids, weights, *projs_and_impl, grouped=None):
        few = moe.few_rows(expert_ids, projs_and_impl[0].shape[0])
        return default(x, expert_ids, weights, *projs_and_impl, grouped="tiled" if few else grouped)

    jax.clear_caches()
    moe.experts_ffn = experts_ffn
    try:
        yield
    finally:
        moe.experts_ffn = default
        jax.clear_caches()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--blocks", type=int, default=1)
    p.add_argument("--prompt", type=int, default=1024)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--budget", type=float, default=150.0, help="seconds; later variants are skipped past it")
    p.add_argument("--config", default="jamba-1.5-mini", help="widths to use")
    p.add_argument("--dry-run", action="store_true", help="--config jamba-tiny --prompt 32 --new 8 (CPU)")
    args = p.parse_args()
    if args.dry_run:
        args.config, args.prompt, args.new = "jamba-tiny", 32, 8
    base = JambaConfig.named(args.config)
    config = dataclasses.replace(base, num_hidden_layers=8 * args.blocks)
    report = Report(args.out, {**environment(), "layers": config.num_hidden_layers, "prompt_tokens": args.prompt,
                               "new_tokens": args.new, "dry_run": args.dry_run, "runs": []}, budget=args.budget)
    data = report.data
    try:
        data["copy_bandwidth_GBps"] = copy_bandwidth() / 1e9
        log(f"copy bandwidth {data['copy_bandwidth_GBps']:.0f} GB/s")
    except Exception as e:  # noqa: BLE001
        report.error("copy bandwidth", e)
    params = random_params(config, jnp.bfloat16)
    log("params ready")
    prompt = prompt_ids(config, args.prompt, 0)
    quantized = None
    for name, kernels, int8 in VARIANTS:
        if not report.have_time(name):
            break
        try:
            if int8 and quantized is None:
                t0 = time.perf_counter()
                quantized = jax.block_until_ready(quantize_params(params, config))
                data["quantize_seconds"] = time.perf_counter() - t0
            model = jamba_jax.Jamba(config, quantized if int8 else params, kernels=kernels)
            with moe_rows_decode() if "rows decode" in name else contextlib.nullcontext():
                t0 = time.perf_counter()
                first = jamba_jax.generate(model, [prompt], max_new_tokens=args.new, stop_ids=[])
                compile_s = time.perf_counter() - t0
                r = jamba_jax.generate(model, [prompt], max_new_tokens=args.new, stop_ids=[])
            floor_s = weight_bytes_per_token(config, model.params) / (data.get("copy_bandwidth_GBps", 1) * 1e9)
            row = {"variant": name, "first_call_s": compile_s, "compile_s": first.compile_seconds,
                   "prefill_tok_s": r.prefill_tokens_per_second, "decode_tok_s": r.decode_tokens_per_second,
                   "decode_ms_per_token": 1e3 / r.decode_tokens_per_second, "floor_ms_per_token": 1e3 * floor_s,
                   "fraction_of_floor": floor_s * r.decode_tokens_per_second}
            log(row)
            report.add("runs", row)
        except Exception as e:  # noqa: BLE001 -- keep the other variants
            report.error(name, e)
    report.write(finished=True)
    log(f"done; wrote {args.out}")


if __name__ == "__main__":
    main()
