"""The ``jamba bench`` protocol on one GPU at Jamba-1.5-Mini widths (random weights), in under 10 minutes.

    python3 benchmarks/gpu_bench.py --out DIR [--blocks 1] [--lengths 1K,4K,16K,64K] [--new 512] [--budget 480]
    python3 benchmarks/gpu_bench.py --config jamba-tiny --lengths 32,64 --new 8 --out DIR   # CPU dry run

Batch 1, a prompt of L random tokens, ``--new`` greedy output tokens (512 in the paper's Figs. 3-4), for
the hybrid in bf16, the all-attention baseline of matched parameter count in bf16
(``jamba_jax.bench.attention_baseline``) and the hybrid in ExpertsInt8, each at ``--blocks`` blocks of 8
layers. Per run (``jamba_jax.bench.time_jamba``: compile excluded): end-to-end latency, output tokens/s,
prefill and decode tokens/s, the device memory the run added, and the decode memory-bandwidth floor: the
bytes one output token must read (the weights it uses, from ``gpu_generate.weight_bytes_per_token``, plus
the K/V of the L cached tokens and the Mamba state) over the measured copy bandwidth. ``DIR/bench.json``
and the plots of ``jamba bench`` are rewritten after every run, so a failure or the time budget never
loses what was measured; runs go shortest context first, the two bf16 models side by side, then int8.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import time
import traceback

import jax
import jax.numpy as jnp

from gpu_generate import copy_bandwidth, random_params, weight_bytes_per_token

import jamba_jax
from jamba_jax import JambaConfig
from jamba_jax.bench import (attention_baseline, machine_info, param_counts, parse_lengths, prompt_ids, ratios,
                             time_jamba, write_results)
from jamba_jax.cache import cache_bytes


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for bench.json and the plots")
    p.add_argument("--config", default="jamba-1.5-mini", help="widths to use (jamba-tiny for a CPU dry run)")
    p.add_argument("--blocks", type=int, default=1, help="blocks of 8 layers (1 block at Mini widths: 13.3B params)")
    p.add_argument("--lengths", default="1K,4K,16K,64K")
    p.add_argument("--new", type=int, default=512)
    p.add_argument("--budget", type=float, default=480.0, help="seconds; later runs are skipped past it")
    p.add_argument("--no-int8", action="store_true")
    p.add_argument("--no-baseline", action="store_true")
    args = p.parse_args()
    start = time.perf_counter()
    lengths = parse_lengths(args.lengths)
    base = JambaConfig.named(args.config)
    hybrid = dataclasses.replace(base, num_hidden_layers=base.block_size * args.blocks)
    configs = {"jamba_jax": hybrid}
    if not args.no_baseline:
        configs["attention"] = attention_baseline(hybrid)
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "config": f"{args.config} widths, {hybrid.num_hidden_layers} layers, random weights",
              "protocol": {"batch": 1, "lengths": lengths, "new_tokens": args.new, "dtype": "bfloat16",
                           "prompt": "random token ids", "decoding": "greedy, no EOS stop",
                           "warm_up": "excluded: compile per length"},
              "machine": machine_info(), "models": {}, "errors": []}
    labels = {"jamba_jax": "jamba_jax hybrid (bf16)", "attention": "all-attention baseline (bf16)",
              "jamba_jax_int8": "jamba_jax hybrid (ExpertsInt8)"}

    def save():
        result["ratios"] = ratios(result)
        result["duration_s"] = time.perf_counter() - start
        write_results(result, args.out)

    try:
        bandwidth = copy_bandwidth()
        result["copy_bandwidth_GBps"] = bandwidth / 1e9
        print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s", flush=True)
    except Exception as e:  # noqa: BLE001
        bandwidth = None
        result["errors"].append(f"copy bandwidth: {e!r}"[:400])

    models = {}
    for seed, (key, config) in enumerate(configs.items()):
        models[key] = jamba_jax.Jamba(config, jax.block_until_ready(random_params(config, jnp.bfloat16, seed)))
    if not args.no_int8:
        from jamba_jax.quant import quantize_params

        t0 = time.perf_counter()
        models["jamba_jax_int8"] = jamba_jax.Jamba(hybrid, jax.block_until_ready(
            quantize_params(models["jamba_jax"].params, hybrid)), quantize="experts-int8")
        result["quantize_seconds"] = time.perf_counter() - t0
        configs["jamba_jax_int8"] = hybrid
    print(f"params ready {time.perf_counter() - start:.1f} s", flush=True)
    for key, model in models.items():
        cfg = configs[key]
        result["models"][key] = {"label": labels[key], "params": param_counts(cfg), "layers": cfg.num_hidden_layers,
                                 "attention_layers": cfg.num_attention_layers,
                                 "intermediate_size": cfg.intermediate_size, "framework": "jax",
                                 "weight_bytes_per_token": weight_bytes_per_token(cfg, model.params), "rows": []}

    order = [(length, key) for key in ("jamba_jax", "attention") if key in models for length in lengths]
    order.sort(key=lambda item: item[0])
    order += [(length, "jamba_jax_int8") for length in lengths if "jamba_jax_int8" in models]
    for length, key in order:
        if time.perf_counter() - start > args.budget:
            result["errors"].append(f"{key} L={length}: skipped (time budget)")
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
            print(f"{key:>14} L={length:>7}: latency {row['latency_s']:7.2f} s, prefill {row['prefill_tok_s']:9.0f} "
                  f"tok/s, decode {row['decode_tok_s']:7.1f} tok/s ({row['ms_per_output_token']:.2f} ms/token; floor "
                  f"{row.get('floor_ms_per_token', float('nan')):.2f}), "
                  f"+{(row['peak_memory_added_bytes'] or 0) / 2**30:.2f} GiB", flush=True)
        except Exception as e:  # noqa: BLE001 -- keep the other runs (an out-of-memory length, say)
            result["errors"].append(f"{key} L={length}: " + "".join(traceback.format_exception_only(e))[:600])
            print("ERROR", key, length, repr(e)[:300], flush=True)
        save()
    save()
    print(f"done in {time.perf_counter() - start:.1f} s; wrote {args.out}/bench.json")


if __name__ == "__main__":
    main()
