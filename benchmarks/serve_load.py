"""Load generator for the serving engine (``jamba_jax.serve.Engine``), against ``generate`` one request at a
time and ``generate`` of all the prompts as one static batch (the ceiling batching allows on the machine).

Requests arrive as a Poisson process at each ``--rates`` value (requests/s; ``inf``: all at once) with
prompts of mixed lengths (random token ids) and ``--new`` output tokens each (EOS off, so every request
makes exactly that many). Reported per rate: requests/s, output tokens/s, time to first token (TTFT) and
inter-token latency (ITL) percentiles; and the TTFT of a request arriving while the other slots decode,
against one prefill chunk plus one decode step. ``--startup`` also times two starts of ``jamba generate``
and of an engine warm-up with a fresh persistent compilation cache (the second start reads the cache).

    python benchmarks/serve_load.py --out docs/results/serve_cpu.json          # + serve_cpu.png
"""

from __future__ import annotations

import math
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import common  # noqa: F401 -- first: times count from the script's start
import jax
import jax.numpy as jnp
import numpy as np

import jamba_jax
from common import Report, environment, log
from jamba_jax.demo import DEMO_DIR
from jamba_jax.serve import Engine, Params
from jamba_jax.serve.engine import DEFAULT_DECODE_STEPS
from jamba_jax.serve import slots as slot_programs
from jamba_jax.steps import ModelSpec, init_cache, prefill_chunk


def percentiles(values) -> dict:
    values = np.asarray(values, float)
    if not len(values):
        return {}
    return {f"p{q}": float(np.percentile(values, q)) for q in (50, 90, 99)}


def make_prompts(n: int, lengths: tuple[int, int], vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, int(rng.integers(*lengths))).tolist() for _ in range(n)]


def run_generate(model, prompts, new: int, batched: bool, warm: bool = True) -> dict:
    """``generate`` on ``prompts`` (one call, or one call per prompt), after a warm-up pass of the same calls
    (``warm``)."""
    calls = [prompts] if batched else [[p] for p in prompts]
    for call in calls if warm else ():  # compiles every shape
        jamba_jax.generate(model, call, max_new_tokens=new, stop_ids=())
    start = time.perf_counter()
    tokens = sum(sum(map(len, jamba_jax.generate(model, call, max_new_tokens=new, stop_ids=()).tokens))
                 for call in calls)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "output_tokens": tokens, "output_tokens_per_s": tokens / seconds,
            "requests_per_s": len(prompts) / seconds}


def run_engine(engine: Engine, prompts, new: int, rate: float, seed: int) -> dict:
    """Submits ``prompts`` at Poisson arrival times of ``rate`` per second; waits for all."""
    rng = np.random.default_rng(seed)
    gaps = np.zeros(len(prompts)) if math.isinf(rate) else rng.exponential(1 / rate, len(prompts))
    arrivals = np.cumsum(gaps) - gaps[0]
    times: list[list[float]] = [[] for _ in prompts]
    done = threading.Semaphore(0)
    streams = []
    start = time.perf_counter()
    for i, (prompt, at) in enumerate(zip(prompts, arrivals)):
        time.sleep(max(0.0, start + at - time.perf_counter()))

        def listener(event, stamps=times[i]):
            if event.token is not None:
                stamps.append(time.perf_counter())
            if event.finish_reason is not None:
                done.release()

        streams.append(engine.submit(prompt, Params(max_tokens=new), listener=listener))
    for _ in prompts:
        done.acquire()
    makespan = time.perf_counter() - start
    ttft = [stamps[0] - (start + at) for stamps, at in zip(times, arrivals)]
    itl = [b - a for stamps in times for a, b in zip(stamps, stamps[1:])]
    tokens = sum(len(s.tokens) for s in streams)
    return {"rate": rate, "seconds": makespan, "output_tokens": tokens, "output_tokens_per_s": tokens / makespan,
            "requests_per_s": len(prompts) / makespan, "ttft_s": percentiles(ttft), "itl_s": percentiles(itl)}


def mid_run_arrival(engine: Engine, model, prompts, new: int, trials: int = 5) -> dict:
    """TTFT of a one-chunk request arriving while ``slots - 1`` others decode (``trials`` times), against one
    prefill chunk plus one decode step, each timed alone (median of 5 after a warm call): the chunk on a
    one-row cache, the step of every slot on a slot cache as the engine runs it."""
    ttfts = []
    for trial in range(trials):
        stamps: list[float] = []
        others = [engine.submit(p, Params(max_tokens=new)) for p in prompts[:engine.slots - 1]]
        for stream in others:
            next(iter(stream))  # all decoding
        time.sleep(0.05 + 0.01 * trial)  # arrivals at different points of a step
        submitted = time.perf_counter()
        late = engine.submit(prompts[-1][:engine.chunk], Params(max_tokens=4),
                             listener=lambda e, stamps=stamps: e.token is not None and stamps.append(time.perf_counter()))
        for stream in others:
            stream.result()
        while late.finish_reason is None:
            time.sleep(0.005)
        ttfts.append(stamps[0] - submitted)
    spec = ModelSpec.of(model)

    def median_of_5(run) -> float:
        run()
        times = []
        for _ in range(5):
            t = time.perf_counter()
            jax.block_until_ready(run())
            times.append(time.perf_counter() - t)
        return float(np.median(times))

    def chunk():
        ids, valid = np.ones((1, engine.chunk), np.int32), np.ones((1, engine.chunk), bool)
        cache = init_cache(model, 1, engine.length)
        jax.block_until_ready(cache)
        return prefill_chunk(model.params, cache, ids, valid, spec=spec)

    slots = engine.slots
    state = {"cache": init_cache(model, slots, engine.length)}
    state["cache"]["pos"] = jnp.asarray(engine.span, jnp.int32)
    ones, zeros = np.ones(slots, np.int32), np.zeros(slots, np.int32)

    def step():
        out = slot_programs.decode_steps(
            model.params, state["cache"], zeros, np.zeros((slots, 2), np.uint32), np.zeros(slots, bool), zeros,
            np.zeros((slots, 2), np.uint32), ones, np.zeros(slots, np.float32), zeros, np.ones(slots, np.float32),
            spec=spec, steps=1, eos=engine.eos)
        state["cache"] = out[-1]
        state["cache"]["pos"] = jnp.asarray(engine.span, jnp.int32)
        return out[0]

    chunk_s = median_of_5(chunk)
    step_s = median_of_5(step)
    ttft = float(np.median(ttfts))
    return {"ttft_s": ttft, "ttft_trials_s": ttfts, "prefill_chunk_s": chunk_s, "decode_step_s": step_s,
            "chunk_plus_step_s": chunk_s + step_s, "within": ttft <= chunk_s + step_s}


def startup_times(checkpoint: str, slots: int, max_length: int) -> dict:
    """Wall seconds of two starts each of ``jamba generate`` and of an engine warm-up sharing a fresh
    persistent compilation cache."""
    out = {}
    with tempfile.TemporaryDirectory() as cache_dir:
        generate = [sys.executable, "-m", "jamba_jax.cli", "generate", "--checkpoint", checkpoint, "--prompt",
                    "The for statement", "--max-new-tokens", "16", "--compilation-cache", cache_dir]
        out["jamba_generate_s"] = []
        for _ in range(2):
            t = time.perf_counter()
            subprocess.run(generate, check=True, capture_output=True)
            out["jamba_generate_s"].append(time.perf_counter() - t)
    with tempfile.TemporaryDirectory() as cache_dir:
        code = ("import sys, time; t = time.perf_counter(); import jamba_jax;"
                "from jamba_jax.compilation_cache import enable_compilation_cache as e; e(sys.argv[1]);"
                "from jamba_jax.serve import Engine; m = jamba_jax.load(sys.argv[2]);"
                f"Engine(m, slots={slots}, max_length={max_length}).warm_up(); print(time.perf_counter() - t)")
        out["engine_start_and_warm_up_s"] = []
        for _ in range(2):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", code, cache_dir, checkpoint], check=True, capture_output=True)
            out["engine_start_and_warm_up_s"].append(time.perf_counter() - t)
    return out


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["engine"]
    labels = ["all at once" if math.isinf(r["rate"]) else f"{r['rate']:g}/s" for r in rows]
    x = np.arange(len(rows))
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.bar(x, [r["output_tokens_per_s"] for r in rows], color="tab:blue", label="engine")
    a.axhline(data["static_batch"]["output_tokens_per_s"], color="tab:green", ls="--", label="generate, static batch")
    a.axhline(data["one_at_a_time"]["output_tokens_per_s"], color="tab:red", ls=":", label="generate, one at a time")
    a.set_xticks(x, labels)
    a.set_xlabel("request rate")
    a.set_ylabel("output tokens/s")
    a.legend(fontsize=8)
    for q, style in (("p50", "-o"), ("p90", "--o")):
        b.plot(x, [r["ttft_s"][q] for r in rows], style, label=f"TTFT {q}")
        b.plot(x, [r["itl_s"][q] for r in rows], style, label=f"ITL {q}")
    b.set_xticks(x, labels)
    b.set_xlabel("request rate")
    b.set_ylabel("seconds")
    b.set_yscale("log")
    b.legend(fontsize=8)
    fig.suptitle(f"jamba serve engine, {data['config']['model']}, {data['config']['slots']} slots, "
                 f"{data['config']['requests']} requests x {data['config']['new']} tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON path; the plot goes next to it (.png)")
    p.add_argument("--checkpoint", default=str(DEMO_DIR))
    p.add_argument("--dtype", default=None)
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--prompt-lengths", default="16,200", help="min,max prompt tokens")
    p.add_argument("--chunk", type=int, default=128)
    p.add_argument("--decode-steps", type=int, default=DEFAULT_DECODE_STEPS, help="the engine's steps per call when full")
    p.add_argument("--rates", default="0.5,1,2,4,inf")
    p.add_argument("--startup", action="store_true", help="also time two starts with the compilation cache")
    p.add_argument("--pairs", type=int, default=3, help="back-to-back static batch / engine runs")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    low, high = (int(v) for v in args.prompt_lengths.split(","))
    model = jamba_jax.load(args.checkpoint, dtype=args.dtype)
    prompts = make_prompts(args.requests, (low, high), model.config.vocab_size, args.seed)
    report = Report(args.out, {"environment": environment(), "config": {
        "model": Path(args.checkpoint).name, "dtype": str(model.dtype), "slots": args.slots,
        "requests": args.requests, "new": args.new, "prompt_lengths": [low, high], "chunk": args.chunk,
        "decode_steps": args.decode_steps}})
    log("generate, one at a time")
    report.write(one_at_a_time=run_generate(model, prompts, args.new, batched=False))
    log("generate, one static batch")
    report.write(static_batch=run_generate(model, prompts, args.new, batched=True))
    engine = Engine(model, slots=args.slots, max_length=high + args.new, chunk=args.chunk,
                    decode_steps=args.decode_steps, eos=())
    t = time.perf_counter()
    engine.start()
    report.write(engine_warm_up_s=time.perf_counter() - t)
    for rate in (float(r) for r in args.rates.split(",")):
        log(f"engine at {rate} requests/s")
        report.add("engine", run_engine(engine, prompts, args.new, rate, args.seed))
    # On a shared machine the load changes between runs: the engine against the static batch back to back.
    pairs = []
    for _ in range(args.pairs):
        static = run_generate(model, prompts, args.new, batched=True, warm=False)["output_tokens_per_s"]
        served = run_engine(engine, prompts, args.new, math.inf, args.seed)["output_tokens_per_s"]
        pairs.append({"static_batch_tokens_per_s": static, "engine_tokens_per_s": served, "ratio": served / static})
    report.write(back_to_back=pairs, engine_vs_static_batch_median=float(np.median([p["ratio"] for p in pairs])))
    log("mid-run arrival")
    report.write(mid_run_arrival=mid_run_arrival(engine, model, prompts, args.new))
    report.write(compiles_after_warm_up=engine.compiles)
    engine.close()
    all_at_once = next((r for r in report.data["engine"] if math.isinf(r["rate"])), None)
    if all_at_once is not None:
        report.write(engine_vs_static_batch=all_at_once["output_tokens_per_s"]
                     / report.data["static_batch"]["output_tokens_per_s"])
    if args.startup:
        log("startup with the compilation cache")
        report.write(startup=startup_times(args.checkpoint, args.slots, high + args.new))
    plot(report.data, Path(args.out).with_suffix(".png"))
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
