"""Prefill and decode throughput of jamba_jax against HF transformers (torch, CPU) on the same weights.

    python benchmarks/generate_vs_hf.py [--config jamba-small] [--prompt 1024] [--new 64] [--rounds 3]
                                        [--scan-impl IMPL] [--compare-scan-impl IMPL] [--out FILE]

Builds a random HF checkpoint of the config (fp32), loads it in both, and times, after one warm-up:
prefill (the prompt through the model, filling the cache) and decode (greedy new tokens), the two sides
in turn for ``--rounds`` rounds, keeping each side's best; records the machine's load average around
them (both sides run under it, and a load change between rounds hits both). Under ``taskset -c N`` both
sides use only the CPUs allowed (torch's thread count follows them).
Also times jamba_jax's compiled decode step at several cache positions to show it does not grow with
the number of tokens already in the Mamba state, and reports the step's compiled memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from hf_reference import make_checkpoint  # noqa: E402

import jamba_jax  # noqa: E402
from jamba_jax import moe  # noqa: E402
from jamba_jax.cache import init_cache  # noqa: E402
from jamba_jax.generate import _decode_step, _spec, generate  # noqa: E402
from jamba_jax.info import model_info  # noqa: E402


class TokenClock(StoppingCriteria):
    """Never stops HF ``generate``; records when each new token is ready."""

    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores, **kwargs):
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def hf_generate(model, prompt, new_tokens):
    """One greedy HF ``generate``: (prefill seconds: the prompt to the first new token; decode seconds:
    the first to the last new token; the new tokens)."""
    ids = torch.tensor([prompt])
    clock = TokenClock()
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0, stopping_criteria=StoppingCriteriaList([clock]))
    return clock.times[0] - t0, clock.times[-1] - clock.times[0], out[0, len(prompt):].tolist()


def timed_rounds(hf_model, ours: dict, prompt, new_tokens, rounds):
    """HF and each of ``ours`` (name -> model) in turn, ``rounds`` times (so a change of machine load hits
    all), after one warm-up each. Prefill: the prompt to the first new token; decode: the other
    ``new_tokens - 1`` tokens."""
    hf_generate(hf_model, prompt[:32], 2)
    for model in ours.values():
        generate(model, [prompt], max_new_tokens=new_tokens, stop_ids=[])  # compile
    rows = []
    for _ in range(rounds):
        hf_prefill, hf_decode, hf_tokens = hf_generate(hf_model, prompt, new_tokens)
        row = {"hf_prefill_s": hf_prefill, "hf_decode_s": hf_decode, "greedy_tokens_equal": True}
        for name, model in ours.items():
            r = generate(model, [prompt], max_new_tokens=new_tokens, stop_ids=[])
            row.update({f"{name}_prefill_s": r.prefill_seconds, f"{name}_decode_s": r.decode_seconds})
            row["greedy_tokens_equal"] &= r.tokens[0] == hf_tokens[:len(r.tokens[0])]
        rows.append(row)
    return rows


def decode_step_profile(model, positions, max_len):
    """Median time of one compiled decode step with the cache filled up to each position."""
    spec = _spec(model, 0.0, None, None)
    cache = init_cache(model.config, 1, max_len, model.dtype)
    token = jnp.array([5], jnp.int32)
    key = jax.random.key(0)
    lowered = _decode_step.lower(model.params, cache, token, key, spec=spec).compile()
    mem = lowered.memory_analysis()
    rows = []
    for pos in positions:
        c = dict(cache, pos=jnp.int32(pos), valid=cache["valid"].at[:, :pos].set(True))
        _decode_step(model.params, c, token, key, spec=spec)[0].block_until_ready()
        times = []
        for _ in range(7):
            t0 = time.perf_counter()
            _decode_step(model.params, c, token, key, spec=spec)[0].block_until_ready()
            times.append(time.perf_counter() - t0)
        rows.append({"cached_tokens": pos, "step_ms": 1e3 * float(np.median(times))})
    temp = getattr(mem, "temp_size_in_bytes", None)
    return {"max_len": max_len, "temp_bytes": temp, "rows": rows}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="jamba-small")
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--scan-impl", default=None, help="jamba_jax's selective scan (default: load's)")
    parser.add_argument("--compare-scan-impl", default=None,
                        help="also time jamba_jax with this selective scan, in the same rounds")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds; the best of each side is kept")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    config = jamba_jax.JambaConfig.named(args.config)
    info = model_info(config, context=args.prompt + args.new, dtype="float32")
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, config.vocab_size, args.prompt).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        hf_config = {k: v for k, v in config.to_dict().items() if k not in ("architectures", "model_type", "dtype")}
        hf_model = make_checkpoint(Path(tmp), seed=0, max_shard_size=None, **hf_config)
        ours = jamba_jax.load(tmp, dtype="float32", scan_impl=args.scan_impl)
        models = {"ours": ours}
        if args.compare_scan_impl:
            models[f"ours_scan_{args.compare_scan_impl}"] = jamba_jax.load(tmp, dtype="float32",
                                                                           scan_impl=args.compare_scan_impl)
    torch.set_num_threads(torch.get_num_threads())
    load_before = os.getloadavg()
    rounds = timed_rounds(hf_model, models, prompt, args.new, args.rounds)
    load_after = os.getloadavg()
    steps = args.new - 1
    result = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip() + f", {torch.get_num_threads()} torch threads, jax {jax.__version__} on {jax.default_backend()}",
        "cpus_allowed": len(os.sched_getaffinity(0)),
        "date": time.strftime("%Y-%m-%d"),
        "load_average_1_5_15_min": {"before": [round(v, 2) for v in load_before],
                                    "after": [round(v, 2) for v in load_after]},
        "config": args.config,
        "scan_impl": ours.scan_impl,
        "moe_grouped_matmul": moe.grouped_matmul(),
        "total_params": info["total_params"],
        "active_params": info["active_params"],
        "prompt_tokens": args.prompt,
        "new_tokens": args.new,
    }
    sides = {"hf": "hf", "jamba_jax": "ours"}
    sides.update({f"jamba_jax_{name[len('ours_'):]}": name for name in models if name != "ours"})
    for side, key in sides.items():
        prefill = min(row[f"{key}_prefill_s"] for row in rounds)
        decode = min(row[f"{key}_decode_s"] for row in rounds)
        result[side] = {"prefill_s": prefill, "prefill_tok_s": args.prompt / prefill, "decode_tok_s": steps / decode}
        if side != "hf":
            result[side]["speedup_prefill"] = result[side]["prefill_tok_s"] / result["hf"]["prefill_tok_s"]
            result[side]["speedup_decode"] = result[side]["decode_tok_s"] / result["hf"]["decode_tok_s"]
    result["greedy_tokens_equal"] = all(row["greedy_tokens_equal"] for row in rounds)
    result["rounds"] = rounds
    result["speedup_prefill"] = result["jamba_jax"]["speedup_prefill"]
    result["speedup_decode"] = result["jamba_jax"]["speedup_decode"]
    mamba_only = jamba_jax.JambaConfig.from_dict({**config.to_dict(), "attn_layer_period": config.num_hidden_layers + 1,
                                                  "attn_layer_offset": config.num_hidden_layers})
    from random_weights import random_model  # noqa: E402
    result["decode_step_vs_position"] = {
        "hybrid": decode_step_profile(ours, [16, 1024, 4096, 16384 - 1], 16384),
        "mamba_only": decode_step_profile(random_model(mamba_only), [16, 1024, 4096, 16384 - 1], 16384),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
