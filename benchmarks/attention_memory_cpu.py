"""Host memory of a long chunked prefill on CPU: does it grow with the prompt beyond the cache?

    python benchmarks/attention_memory_cpu.py [--lengths 4096 16384 65536] [--aligned-lengths 4096 16384]
                                              [--chunk 256] [--out docs/results/attention_memory_cpu.json]

Each prompt length runs in a fresh subprocess (so its peak RSS is its own) on a small random model:
two layers (one Mamba, one attention), hidden 128, 8 query heads, 4 kv heads (head_dim 16), a dense
MLP, float32, batch 1. The child:

1. builds the model and runs ``generate`` on a 16-token prompt, streamed and not (compiles the small
   helper programs);
2. compiles, ahead of time, the public programs the long prompt will run, at its exact shapes: the prefill
   chunk (``steps.prefill_chunk``, ``[1, chunk]`` tokens against a ``max_len`` cache) and the decode step
   (``steps.decode_logits``); the AOT compile fills ``jit``'s cache, so the measured run compiles neither.
   It records their ``memory_analysis()``, with that of the chunk against a cache rounded up to a multiple
   of attention's 512-key block. (``generate(stream=False)``'s on-device decode loop is private to
   ``jamba_jax.generate`` and no longer compiled here: ``decode_step`` is the public decode program.)
3. takes the baseline: the RSS now (``VmRSS``), then resets the kernel's peak-RSS mark
   (``common.reset_peak_rss``) so that ``VmHWM`` afterwards is the peak of what follows alone;
4. runs ``generate(model, [prompt], max_new_tokens=n, stop_ids=[], chunk_size=chunk, stream=True)`` on
   a random prompt of the given length, sampling RSS every 0.25 s: the first ``next`` is the whole
   prefill (its peak is read then, and the mark reset), the rest are decode steps;
5. reports both peaks and ``growth = peak - baseline - cache``, where ``cache`` is every byte of
   ``init_cache`` at that ``max_len`` (K/V, Mamba state, the ``valid`` mask; ``cache_bytes`` gives the
   first two). ``ru_maxrss`` is recorded too; it is the whole process's peak.

``growth`` is what the prefill needs besides its cache: the compiled chunk's scratch, the prompt on the
host, allocator slack. It is bounded when it does not rise with the prompt length. For scale, the
report also gives the bytes one ``[chunk, max_len]`` fp32 score tensor over all query heads would take.

Two series: ``default`` (``--lengths``, ``--new-tokens`` 4) and ``aligned`` (``--aligned-lengths``, one
new token). Both get ``generate``'s cache length (``generate.prefill_layout``: whole 512-key blocks).
``--update`` keeps the series of ``--out`` that are not run. A quick check:
``--lengths 512 --aligned-lengths --out /tmp/attention_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import environment, hwm_bytes, log, random_params, reset_peak_rss, rss_bytes, write_json

MIB = 2**20
MODEL = {"num_hidden_layers": 2, "attn_layer_period": 2, "attn_layer_offset": 1, "hidden_size": 128,
         "intermediate_size": 256, "num_attention_heads": 8, "num_key_value_heads": 4, "num_experts": 1,
         "max_position_embeddings": 262144}


def child(length: int, chunk: int, new_tokens: int, seed: int) -> dict:
    import dataclasses
    import gc
    import resource
    import threading

    import jax
    import jax.numpy as jnp
    import numpy as np

    import jamba_jax
    from jamba_jax import JambaConfig
    from jamba_jax.bench import prompt_ids
    from jamba_jax.cache import cache_bytes, cache_shapes
    from jamba_jax.generate import prefill_layout
    from jamba_jax.steps import ModelSpec, decode_logits, prefill_chunk

    t_start = time.perf_counter()
    config = dataclasses.replace(JambaConfig.named("jamba-tiny"), **MODEL)
    model = jamba_jax.Jamba(config, random_params(config, seed=seed))
    rss_model = rss_bytes()

    # Step 1: the helper programs (key splits, casts, the cache's zeros) at a short prompt, both paths.
    jamba_jax.generate(model, [[5] * 16], max_new_tokens=2, stop_ids=[], chunk_size=chunk)
    list(jamba_jax.generate(model, [[5] * 16], max_new_tokens=2, stop_ids=[], chunk_size=chunk, stream=True))

    # Step 2: the long prompt's own programs at generate's shapes (generate.prefill_layout), compiled ahead
    # of time (this fills jit's cache: the measured run compiles none of them).
    new_tokens = new_tokens or 1  # generate's cache is always whole 512-key blocks (the "aligned" series)
    padded, max_len, pieces = prefill_layout(length, new_tokens, chunk)
    step = pieces[-1]  # the full chunk (the prompt lengths here are whole chunks)
    spec = ModelSpec.of(model)
    cache = cache_shapes(config, 1, max_len, model.dtype)
    ids, valid = jax.ShapeDtypeStruct((1, step), jnp.int32), jax.ShapeDtypeStruct((1, step), bool)
    token = jax.ShapeDtypeStruct((1,), jnp.int32)
    t0 = time.perf_counter()
    programs = {
        "prefill_chunk": prefill_chunk.lower(model.params, cache, ids, valid, spec=spec).compile(),
        "decode_step": decode_logits.lower(model.params, cache, token, spec=spec).compile(),
    }
    # The same chunk against a cache rounded up to a multiple of attention's 512-key block (analysis only).
    len512 = -(-max_len // 512) * 512
    programs["prefill_chunk_max_len_512_multiple"] = prefill_chunk.lower(
        model.params, cache_shapes(config, 1, len512, model.dtype), ids, valid, spec=spec).compile()
    compile_s = time.perf_counter() - t0

    def analysis(compiled):
        m = compiled.memory_analysis()
        return {k: int(getattr(m, k)) for k in ("temp_size_in_bytes", "argument_size_in_bytes",
                                                  "output_size_in_bytes", "alias_size_in_bytes")}

    analyses = {name: analysis(c) for name, c in programs.items()}
    analyses["prefill_chunk_max_len_512_multiple"]["max_len"] = len512
    cache_total = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(cache))
    prompt = prompt_ids(config, length, seed)
    del cache, programs
    gc.collect()

    # Step 3: baseline.
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    baseline = rss_bytes()
    peak_reset = reset_peak_rss()

    # Step 4: the measured run, RSS sampled on the side.
    samples, stop = [], threading.Event()
    t_run = time.perf_counter()

    def sample():
        while not stop.is_set():
            samples.append((time.perf_counter() - t_run, rss_bytes()))
            stop.wait(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    load_before = os.getloadavg()
    sampler.start()
    stream = jamba_jax.generate(model, [prompt], max_new_tokens=new_tokens, stop_ids=[], chunk_size=chunk,
                                stream=True)
    next(stream)  # the prefill (and its sampled first token)
    prefill_wall = time.perf_counter() - t_run
    peak_prefill = hwm_bytes() if peak_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rss_after_prefill = rss_bytes()
    maxrss_prefill = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    decode_reset = reset_peak_rss()
    t0 = time.perf_counter()
    try:
        while True:
            next(stream)
    except StopIteration as end:
        result = end.value
    decode_wall = time.perf_counter() - t0
    peak_decode = hwm_bytes() if decode_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    stop.set()
    sampler.join()
    maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    # At most 40 samples kept, evenly spaced, the largest always among them.
    keep = sorted(set(np.linspace(0, len(samples) - 1, min(40, len(samples))).round().astype(int).tolist())
                  | {int(np.argmax([s[1] for s in samples]))})
    return {
        "prompt_length": length, "chunk_size": chunk, "chunks": padded // step, "max_len": max_len,
        "new_tokens": len(result.tokens[0]), "max_new_tokens": new_tokens,
        "cache_bytes": {**cache_bytes(config, 1, max_len, model.dtype), "total": cache_total},
        "programs": analyses,
        "whole_context_scores_bytes": step * max_len * config.num_attention_heads * 4,
        "rss_after_model_bytes": rss_model, "baseline_rss_bytes": baseline, "peak_reset": peak_reset,
        "peak_prefill_rss_bytes": peak_prefill, "rss_after_prefill_bytes": rss_after_prefill,
        "peak_decode_rss_bytes": peak_decode,
        "prefill_growth_bytes": peak_prefill - baseline - cache_total,
        "decode_growth_bytes": peak_decode - baseline - cache_total,
        "ru_maxrss_before_run_bytes": maxrss_before, "ru_maxrss_after_prefill_bytes": maxrss_prefill,
        "ru_maxrss_after_run_bytes": maxrss_after,
        "rss_samples": [[round(samples[i][0], 2), samples[i][1]] for i in keep],
        "prefill_s": prefill_wall, "decode_s": decode_wall, "aot_compile_s": compile_s,
        "process_s": time.perf_counter() - t_start, "load_before": load_before, "load_after": os.getloadavg(),
    }


def table(runs: list[dict]) -> str:
    rows = ["| prompt | max_len | cache MiB | baseline RSS MiB | prefill peak MiB | prefill growth MiB "
            "| decode peak MiB | decode growth MiB | chunk temp MiB (512-multiple cache) | decode step temp MiB "
            "| one [chunk, max_len] score tensor MiB | prefill s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        p = r["programs"]
        rows.append("| {} | {} | {:.2f} | {:.1f} | {:.1f} | {:.1f} | {:.1f} | {:.1f} | {:.2f} ({:.2f}) | {:.2f} "
                    "| {:.0f} | {:.1f} |".format(
                        r["prompt_length"], r["max_len"], r["cache_bytes"]["total"] / MIB,
                        r["baseline_rss_bytes"] / MIB, r["peak_prefill_rss_bytes"] / MIB,
                        r["prefill_growth_bytes"] / MIB, r["peak_decode_rss_bytes"] / MIB,
                        r["decode_growth_bytes"] / MIB, p["prefill_chunk"]["temp_size_in_bytes"] / MIB,
                        p["prefill_chunk_max_len_512_multiple"]["temp_size_in_bytes"] / MIB,
                        p["decode_step"]["temp_size_in_bytes"] / MIB, r["whole_context_scores_bytes"] / MIB,
                        r["prefill_s"]))
    return "\n".join(rows)


def run_series(lengths: list[int], chunk: int, new_tokens: int, seed: int) -> dict:
    t0 = time.perf_counter()
    series = {"new_tokens": new_tokens, "uptime_start": subprocess.run(["uptime"], capture_output=True,
                                                                      text=True).stdout.strip(), "runs": []}
    for length in lengths:
        cmd = [sys.executable, __file__, "--child", str(length), "--chunk", str(chunk),
               "--new-tokens", str(new_tokens), "--seed", str(seed)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"prompt {length}: child failed\n{done.stderr[-4000:]}")
        run = json.loads(done.stdout.strip().splitlines()[-1])
        series["runs"].append(run)
        log(f"prompt {length}, max_len {run['max_len']}: baseline {run['baseline_rss_bytes'] / MIB:.1f} MiB, "
            f"cache {run['cache_bytes']['total'] / MIB:.2f} MiB, prefill peak "
            f"{run['peak_prefill_rss_bytes'] / MIB:.1f} MiB (growth {run['prefill_growth_bytes'] / MIB:.1f}), "
            f"decode peak {run['peak_decode_rss_bytes'] / MIB:.1f} MiB (growth "
            f"{run['decode_growth_bytes'] / MIB:.1f}), prefill {run['prefill_s']:.1f} s")
    series["machine"] = environment(uptime=subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    series["total_s"] = time.perf_counter() - t0
    print(table(series["runs"]))
    print(f"{len(lengths)} runs in {series['total_s']:.0f} s")
    return series


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="*", default=[4096, 16384, 65536])
    p.add_argument("--aligned-lengths", type=int, nargs="*", default=[4096, 16384],
                   help="prompt lengths run again with max_len a multiple of 512 (more new tokens)")
    p.add_argument("--chunk", type=int, default=256, help="generate's chunk_size (its default: 256)")
    p.add_argument("--new-tokens", type=int, default=4, help="tokens generated after the prefill")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    p.add_argument("--update", action="store_true", help="keep the series of --out that are not run now")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.chunk, args.new_tokens, args.seed)))
        return
    info = {"model": MODEL, "dtype": "float32", "batch": 1, "chunk_size": args.chunk, "attention_block_k": 512}
    if args.update and args.out and args.out.exists():
        info = json.loads(args.out.read_text())
    runs = (("default", args.lengths, args.new_tokens), ("aligned", args.aligned_lengths, 0))
    for series, lengths, new_tokens in runs:
        if lengths:
            info[series] = run_series(lengths, args.chunk, new_tokens, args.seed)
            if args.out:
                write_json(args.out, info)


if __name__ == "__main__":
    main()
