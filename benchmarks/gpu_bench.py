"""The ``jamba bench`` protocol on one GPU at Jamba-1.5-Mini widths (random weights), within a time budget.

    python3 benchmarks/gpu_bench.py --out DIR [--blocks 1] [--lengths 1K,4K,16K,64K] [--new 512] [--budget 480]
    python3 benchmarks/gpu_bench.py --dry-run --out /tmp/bench   # CPU: jamba-tiny, lengths 32 and 64, 8 new tokens

Batch 1, a prompt of L random tokens, ``--new`` greedy output tokens (512 in the paper's Figs. 3-4), for
the hybrid in bf16, the all-attention baseline of matched parameter count in bf16
(``jamba_jax.bench.attention_baseline``) and the hybrid in ExpertsInt8, each at ``--blocks`` blocks of 8
layers. Per run (``jamba_jax.bench.time_jamba``: compile excluded): end-to-end latency, output tokens/s,
prefill and decode tokens/s, the device memory the run added, and the decode memory-bandwidth floor: the
bytes one output token must read (the weights it uses, ``common.weight_bytes_per_token``, plus the K/V of
the L cached tokens and the Mamba state) over the measured copy bandwidth (``common.copy_bandwidth``).
``DIR/bench.json`` and the plots of ``jamba bench`` are rewritten after every run, so a failure or the time
budget (``--budget``, seconds since the start) never loses what was measured; runs go shortest context first, the two bf16 models side by side,
then int8.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp

import jamba_jax
from jamba_jax import JambaConfig
from jamba_jax.bench import (attention_baseline, machine_info, param_counts, parse_lengths, prompt_ids, ratios,
                             time_jamba, write_results)
from jamba_jax.cache import cache_bytes
from jamba_jax.quant import quantize_params

from common import Report, copy_bandwidth, elapsed, log, now, random_params, weight_bytes_per_token

LABELS = {"jamba_jax": "jamba_jax hybrid (bf16)", "attention": "all-attention baseline (bf16)",
          "jamba_jax_int8": "jamba_jax hybrid (ExpertsInt8)"}


def save(out_dir, result: dict) -> None:
    """``jamba bench``'s files (bench.json and the plots), with the ratios of what is measured so far."""
    result.update(ratios=ratios(result), duration_s=elapsed())
    write_results(result, out_dir)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for bench.json and the plots")
    p.add_argument("--config", default="jamba-1.5-mini", help="widths to use")
    p.add_argument("--blocks", type=int, default=1, help="blocks of 8 layers (1 block at Mini widths: 13.3B params)")
    p.add_argument("--lengths", default="1K,4K,16K,64K")
    p.add_argument("--new", type=int, default=512)
    p.add_argument("--budget", type=float, default=480.0, help="seconds; later runs are skipped past it")
    p.add_argument("--no-int8", action="store_true")
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="--config jamba-tiny --lengths 32,64 --new 8 (CPU)")
    args = p.parse_args()
    if args.dry_run:
        args.config, args.lengths, args.new = "jamba-tiny", "32,64", 8
    lengths = parse_lengths(args.lengths)
    base = JambaConfig.named(args.config)
    hybrid = dataclasses.replace(base, num_hidden_layers=base.block_size * args.blocks)
    configs = {"jamba_jax": hybrid}
    if not args.no_baseline:
        configs["attention"] = attention_baseline(hybrid)
    # jamba bench's layout (its machine_info, its plots), which bench.write_results reads back.
    report = Report(args.out, {
        "date": now(), "config": f"{args.config} widths, {hybrid.num_hidden_layers} layers, random weights",
        "protocol": {"batch": 1, "lengths": lengths, "new_tokens": args.new, "dtype": "bfloat16",
                     "prompt": "random token ids", "decoding": "greedy, no EOS stop",
                     "warm_up": "excluded: compile per length"},
        "machine": machine_info(), "models": {}}, budget=args.budget, save=save)
    result = report.data
    bandwidth = None
    try:
        bandwidth = copy_bandwidth()
        result["copy_bandwidth_GBps"] = bandwidth / 1e9
        log(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    except Exception as e:  # noqa: BLE001
        report.error("copy bandwidth", e)

    models = {key: jamba_jax.Jamba(config, random_params(config, jnp.bfloat16, seed))
              for seed, (key, config) in enumerate(configs.items())}
    if not args.no_int8:
        t0 = time.perf_counter()
        models["jamba_jax_int8"] = jamba_jax.Jamba(hybrid, jax.block_until_ready(
            quantize_params(models["jamba_jax"].params, hybrid)), quantize="experts-int8")
        result["quantize_seconds"] = time.perf_counter() - t0
        configs["jamba_jax_int8"] = hybrid
    log("params ready")
    for key, model in models.items():
        cfg = configs[key]
        result["models"][key] = {"label": LABELS[key], "params": param_counts(cfg), "layers": cfg.num_hidden_layers,
                                 "attention_layers": cfg.num_attention_layers,
                                 "intermediate_size": cfg.intermediate_size, "framework": "jax",
                                 "weight_bytes_per_token": weight_bytes_per_token(cfg, model.params), "rows": []}

    order = sorted(((length, key) for key in ("jamba_jax", "attention") if key in models for length in lengths),
                   key=lambda item: item[0])
    order += [(length, "jamba_jax_int8") for length in lengths if "jamba_jax_int8" in models]
    for length, key in order:
        if not report.have_time(f"{key} L={length}"):
            continue
        model, entry = models[key], result["models"][key]
        try:
            row = time_jamba(model, prompt_ids(configs[key], length, 0), args.new)
            row.pop("tokens", None)
            if bandwidth:
                state = cache_bytes(configs[key], 1, length, jnp.bfloat16)
                floor_bytes = entry["weight_bytes_per_token"] + state["kv_cache_bytes"] + state["mamba_state_bytes"]
                row["floor_ms_per_token"] = 1e3 * floor_bytes / bandwidth
                row["fraction_of_floor"] = row["floor_ms_per_token"] / row["ms_per_output_token"]
            entry["rows"].append(row)
            log(f"{key:>14} L={length:>7}: latency {row['latency_s']:7.2f} s, prefill {row['prefill_tok_s']:9.0f} "
                f"tok/s, decode {row['decode_tok_s']:7.1f} tok/s ({row['ms_per_output_token']:.2f} ms/token; floor "
                f"{row.get('floor_ms_per_token', float('nan')):.2f}), "
                f"+{(row['peak_memory_added_bytes'] or 0) / 2**30:.2f} GiB")
        except Exception as e:  # noqa: BLE001 -- keep the other runs (an out-of-memory length, say)
            report.error(f"{key} L={length}", e)
        report.write()
    report.write(finished=True)
    log(f"done; wrote {args.out}/bench.json")


if __name__ == "__main__":
    main()
