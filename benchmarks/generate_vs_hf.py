"""Prefill and decode throughput of jamba_jax against HF transformers (torch, CPU) on the same weights.

    python benchmarks/generate_vs_hf.py [--config jamba-small] [--prompt 1024] [--new 64] [--out FILE]

Builds a random HF checkpoint of the config (fp32), loads it in both, and times, after one warm-up:
prefill (the prompt through the model, filling the cache) and decode (greedy new tokens). Also times
jamba_jax's compiled decode step at several cache positions to show it does not grow with the number
of tokens already in the Mamba state, and reports the step's compiled memory.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from hf_reference import make_checkpoint  # noqa: E402

import jamba_jax  # noqa: E402
from jamba_jax.cache import init_cache  # noqa: E402
from jamba_jax.generate import _decode_step, _spec, generate  # noqa: E402
from jamba_jax.info import model_info  # noqa: E402


def hf_times(model, prompt, new_tokens):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        model(ids[:, :32], use_cache=True)  # warm-up
        t0 = time.perf_counter()
        model(ids, use_cache=True)
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0)
        total = time.perf_counter() - t0
    return prefill, total - prefill, out[0, len(prompt):].tolist()


def ours_times(model, prompt, new_tokens):
    generate(model, [prompt], max_new_tokens=new_tokens, stop_ids=[])  # compile
    best = None
    for _ in range(2):
        r = generate(model, [prompt], max_new_tokens=new_tokens, stop_ids=[])
        if best is None or r.prefill_seconds + r.decode_seconds < best.prefill_seconds + best.decode_seconds:
            best = r
    return best


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
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    config = jamba_jax.JambaConfig.named(args.config)
    info = model_info(config, context=args.prompt + args.new, dtype="float32")
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, config.vocab_size, args.prompt).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        hf_config = {k: v for k, v in config.to_dict().items() if k not in ("architectures", "model_type", "dtype")}
        hf_model = make_checkpoint(Path(tmp), seed=0, max_shard_size=None, **hf_config)
        ours = jamba_jax.load(tmp, dtype="float32")
    torch.set_num_threads(torch.get_num_threads())
    hf_prefill, hf_decode, hf_tokens = hf_times(hf_model, prompt, args.new)
    r = ours_times(ours, prompt, args.new)
    steps = args.new - 1
    result = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip() + f", {torch.get_num_threads()} torch threads, jax {jax.__version__} on {jax.default_backend()}",
        "date": time.strftime("%Y-%m-%d"),
        "config": args.config,
        "total_params": info["total_params"],
        "active_params": info["active_params"],
        "prompt_tokens": args.prompt,
        "new_tokens": args.new,
        "hf": {"prefill_s": hf_prefill, "prefill_tok_s": args.prompt / hf_prefill,
               "decode_tok_s": steps / hf_decode},
        "jamba_jax": {"prefill_s": r.prefill_seconds, "prefill_tok_s": args.prompt / r.prefill_seconds,
                      "decode_tok_s": steps / r.decode_seconds},
        "greedy_tokens_equal": r.tokens[0] == hf_tokens[:len(r.tokens[0])],
    }
    result["speedup_prefill"] = result["jamba_jax"]["prefill_tok_s"] / result["hf"]["prefill_tok_s"]
    result["speedup_decode"] = result["jamba_jax"]["decode_tok_s"] / result["hf"]["decode_tok_s"]
    mamba_only = jamba_jax.JambaConfig.from_dict({**config.to_dict(), "attn_layer_period": config.num_hidden_layers + 1,
                                                  "attn_layer_offset": config.num_hidden_layers})
    from test_padding_and_structure import random_model  # noqa: E402
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
