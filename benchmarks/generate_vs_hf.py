"""Prefill and decode throughput of jamba_jax against HF transformers (torch, CPU) on the same weights.

    python benchmarks/generate_vs_hf.py [--config jamba-small] [--prompt 1024] [--new 64] [--rounds 3]
                                        [--scan IMPL] [--compare-scan IMPL] [--out FILE]
    python benchmarks/generate_vs_hf.py --config jamba-tiny --prompt 64 --new 8 --rounds 1   # a quick check

Writes an HF checkpoint (fp32) of the model's own random init (``common.random_params``), loads it in both
(HF with its eager attention), and times, after one warm-up: prefill (the prompt through the model, filling
the cache) and decode (greedy new tokens), the two sides in turn for ``--rounds`` rounds, keeping each side's
best; records the machine's load average around them (both sides run under it, and a load change between
rounds hits both). ``--scan`` picks jamba_jax's selective scan (``Kernels(scan=...)``); ``--compare-scan``
also times jamba_jax with another one in the same rounds. Under ``taskset -c N`` both sides use only the
CPUs allowed (torch's thread count follows them).
Also times jamba_jax's compiled decode step (``steps.decode_logits``) at several cache positions, on the
hybrid and on a Mamba-only model of the same widths, to show it does not grow with the number of tokens
already in the Mamba state, and reports the step's compiled memory.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import torch
from transformers import JambaForCausalLM, StoppingCriteria, StoppingCriteriaList

import jamba_jax
from jamba_jax import Kernels, moe
from jamba_jax.bench import prompt_ids
from jamba_jax.cache import init_cache_arrays
from jamba_jax.info import model_info
from jamba_jax.steps import ModelSpec, decode_logits
from jamba_jax.train import save_pretrained

from common import environment, log, random_params, time_call, write_json

PROFILE_LEN = 16384  # the decode-step profile's cache length
PROFILE_POSITIONS = (16, 1024, 4096, PROFILE_LEN - 1)


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
        jamba_jax.generate(model, [prompt], max_new_tokens=new_tokens, stop_ids=[])  # compile
    rows = []
    for _ in range(rounds):
        hf_prefill, hf_decode, hf_tokens = hf_generate(hf_model, prompt, new_tokens)
        row = {"hf_prefill_s": hf_prefill, "hf_decode_s": hf_decode, "greedy_tokens_equal": True}
        for name, model in ours.items():
            r = jamba_jax.generate(model, [prompt], max_new_tokens=new_tokens, stop_ids=[])
            row.update({f"{name}_prefill_s": r.prefill_seconds, f"{name}_decode_s": r.decode_seconds})
            row["greedy_tokens_equal"] &= r.tokens[0] == hf_tokens[:len(r.tokens[0])]
        rows.append(row)
    return rows


def decode_step_profile(model, positions=PROFILE_POSITIONS, max_len=PROFILE_LEN):
    """Median time of one compiled decode step (``decode_logits``) with the cache filled up to each position.
    The step donates its cache: every call gets a fresh copy (untimed)."""
    spec = ModelSpec.of(model)
    cache = init_cache_arrays(model.config, 1, max_len, model.dtype)
    token = jnp.array([5], jnp.int32)
    mem = decode_logits.lower(model.params, cache, token, spec=spec).compile().memory_analysis()
    rows = []
    for pos in positions:
        filled = dict(cache, pos=jnp.int32(pos), valid=cache["valid"].at[:, :pos].set(True))
        timing = time_call(lambda c: decode_logits(model.params, c, token, spec=spec)[0], runs=7,
                           fresh=lambda: (jax.tree.map(jnp.copy, filled),))
        rows.append({"cached_tokens": pos, "step_ms": 1e3 * timing.median})
    return {"max_len": max_len, "temp_bytes": getattr(mem, "temp_size_in_bytes", None), "rows": rows}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="jamba-small")
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--scan", default="xla", help="jamba_jax's selective scan (Kernels.scan)")
    parser.add_argument("--compare-scan", default=None,
                        help="also time jamba_jax with this selective scan, in the same rounds")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds; the best of each side is kept")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    config = jamba_jax.JambaConfig.named(args.config)
    info = model_info(config, context=args.prompt + args.new, dtype="float32")
    prompt = prompt_ids(config, args.prompt, 0)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(tmp, config, random_params(config))
        # HF's eager attention, as in the earlier results (transformers' own keyword).
        hf_model = JambaForCausalLM.from_pretrained(tmp, dtype=torch.float32, attn_implementation="eager").eval()
        ours = jamba_jax.load(tmp, dtype="float32", kernels=Kernels(scan=args.scan))
    models = {"ours": ours}
    if args.compare_scan:
        models[f"ours_scan_{args.compare_scan}"] = ours.with_kernels(Kernels(scan=args.compare_scan))
    log(f"models ready; {args.rounds} rounds")
    load_before = os.getloadavg()
    rounds = timed_rounds(hf_model, models, prompt, args.new, args.rounds)
    load_after = os.getloadavg()
    steps = args.new - 1
    result = {
        **environment(),
        "load_average_1_5_15_min": {"before": [round(v, 2) for v in load_before],
                                    "after": [round(v, 2) for v in load_after]},
        "config": args.config,
        "scan_impl": ours.kernels.scan,  # Kernels.scan, under the name earlier results used
        "hf_attention": "eager",
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
    log("decode step profile")
    mamba_only = jamba_jax.JambaConfig.from_dict({**config.to_dict(), "attn_layer_period": config.num_hidden_layers + 1,
                                                  "attn_layer_offset": config.num_hidden_layers})
    result["decode_step_vs_position"] = {
        "hybrid": decode_step_profile(ours),
        "mamba_only": decode_step_profile(jamba_jax.Jamba(mamba_only, random_params(mamba_only), kernels=ours.kernels)),
    }
    if args.out:
        write_json(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
