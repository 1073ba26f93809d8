#!/usr/bin/env python3
"""ExpertsInt8 on CPU: logit error against fp32 (int8 vs bf16), weight bytes, and quantization time.

    python benchmarks/experts_int8_cpu.py --out docs/results/experts_int8_cpu.json

1. Logit error: random models (tests/test_quant.py ``scaled_params``) in fp32 (the reference), bf16,
   and bf16 with int8 feed-forward weights quantized from the bf16 weights (what
   ``load(dtype="bfloat16", quantize="experts-int8")`` gives), plus int8 weights with fp32 compute
   (the quantization error alone). Error = max |logits - ref| / max |ref| and RMS(logits - ref) / RMS(ref).
2. Bytes of the released configs (shapes only, nothing allocated): feed-forward weights in bf16 vs int8
   plus fp32 scales, and the whole model.
3. Quantization time: ``quantize_params`` on jamba-small (cold = with compiles, warm), one Mini-sized
   expert leaf ``[16, 4096, 14336]`` bf16, and ``load`` with and without ``quantize`` on a jamba-small
   HF checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_quant import SMALL, rel_err, rms_err, scaled_params  # noqa: E402

import jamba_jax  # noqa: E402
from jamba_jax import JambaConfig  # noqa: E402
from jamba_jax.quant import QuantizedWeight, is_quantized_path, quantize, quantize_params  # noqa: E402

CONFIGS = {
    "moe_top2_e4": SMALL,
    "moe_top2_e8": dataclasses.replace(SMALL, num_experts=8),
    "moe_top1_e8": dataclasses.replace(SMALL, num_experts=8, num_experts_per_tok=1),
    "dense": dataclasses.replace(SMALL, num_experts=1, num_experts_per_tok=1),
}


def logit_errors(seeds: int) -> dict:
    out = {}
    for name, config in CONFIGS.items():
        rows = []
        for seed in range(seeds):
            fp32 = jamba_jax.Jamba(config, scaled_params(config, seed))
            bf16 = fp32.replace(params=jax.tree.map(lambda p: p.astype(jnp.bfloat16), fp32.params))
            models = {"bf16": bf16, "int8_bf16": bf16.replace(params=quantize_params(bf16.params, config)),
                      "int8_fp32": fp32.replace(params=quantize_params(fp32.params, config))}
            ids = np.random.default_rng(seed).integers(1, config.vocab_size, (2, 16))
            ref = np.asarray(jamba_jax.forward(fp32, ids))
            row = {"seed": seed}
            for label, model in models.items():
                got = np.asarray(jamba_jax.forward(model, ids).astype(jnp.float32))
                row[label] = {"max": rel_err(got, ref), "rms": rms_err(got, ref)}
            rows.append(row)
            print(name, row, flush=True)
        mean = {label: {m: float(np.mean([r[label][m] for r in rows])) for m in ("max", "rms")}
                for label in ("bf16", "int8_bf16", "int8_fp32")}
        out[name] = {"per_seed": rows, "mean": mean,
                     "ratio_int8_over_bf16": {m: mean["int8_bf16"][m] / mean["bf16"][m] for m in ("max", "rms")}}
        print(name, "mean", mean, flush=True)
    return out


def nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def released_bytes() -> dict:
    out = {}
    for name in ("jamba-1.5-mini", "jamba-1.5-large"):
        config = JambaConfig.named(name)
        params = jamba_jax.abstract_params(config, jnp.bfloat16)
        qparams = jax.eval_shape(lambda p, c=config: quantize_params(p, c), params)
        flat = jax.tree_util.tree_flatten_with_path(qparams, is_leaf=lambda x: isinstance(x, QuantizedWeight))[0]
        q = [leaf for _, leaf in flat if isinstance(leaf, QuantizedWeight)]
        ffn_int8 = sum(nbytes(leaf.q) for leaf in q)
        ffn_scales = sum(nbytes(leaf.scale) for leaf in q)
        out[name] = {"ffn_bf16_bytes": 2 * ffn_int8, "ffn_int8_bytes": ffn_int8, "ffn_scale_bytes": ffn_scales,
                     "model_bf16_bytes": nbytes(params), "model_int8_bytes": nbytes(qparams)}
        print(name, out[name], flush=True)
    return out


def timed(fn):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    return time.perf_counter() - t0, out


def quantize_times(tmp: Path) -> dict:
    from hf_reference import make_checkpoint

    out = {}
    config = JambaConfig.named("jamba-small")
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), jamba_jax.init_params(config, jax.random.key(0)))
    ffn = sum(nbytes(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]
              if is_quantized_path(tuple(k.key for k in p)))
    cold, _ = timed(lambda: quantize_params(params, config))
    warm, _ = timed(lambda: quantize_params(params, config))
    out["jamba-small_quantize_params"] = {"ffn_bf16_bytes": ffn, "cold_s": cold, "warm_s": warm}
    print(out, flush=True)

    w = jax.block_until_ready(jax.random.normal(jax.random.key(1), (16, 4096, 14336), jnp.bfloat16))
    cold, _ = timed(lambda: quantize(w))
    warm, _ = timed(lambda: quantize(w))
    out["mini_expert_leaf"] = {"shape": list(w.shape), "bf16_bytes": w.nbytes, "cold_s": cold, "warm_s": warm,
                               "GB_per_s": w.nbytes / warm / 1e9}
    del w
    print(out, flush=True)

    hf = json.loads((Path(jamba_jax.__file__).parents[1] / "configs" / "jamba-small.json").read_text())
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "num_experts", "num_experts_per_tok", "expert_layer_period",
            "expert_layer_offset", "attn_layer_period", "attn_layer_offset", "mamba_d_state", "mamba_d_conv",
            "mamba_expand")
    make_checkpoint(tmp, seed=0, max_shard_size=None, **{k: hf[k] for k in keys})
    for label, kw in (("plain", {}), ("experts-int8", {"quantize": "experts-int8"})):
        times = []
        for _ in range(2):  # the second run has the quantize compiles cached
            t, _ = timed(lambda: jax.tree.leaves(jamba_jax.load(tmp, dtype="bfloat16", **kw).params))
            times.append(t)
        out[f"load_jamba-small_{label}"] = {"first_s": times[0], "second_s": times[1]}
    print(out, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="experts_int8_cpu.json")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--sections", default="bytes,quantize_time,logit_error",
                    help="comma-separated; sections not run are kept from an existing --out file")
    args = ap.parse_args()
    out = Path(args.out)
    report = json.loads(out.read_text()) if out.is_file() else {}
    report.update(date=datetime.datetime.now(datetime.timezone.utc).isoformat(), jax_version=jax.__version__,
                  device=str(jax.devices()[0].device_kind), platform=platform.platform(), cpu_count=os.cpu_count())
    sections = args.sections.split(",")
    if "bytes" in sections:
        report["bytes"] = released_bytes()
    if "quantize_time" in sections:
        with tempfile.TemporaryDirectory() as tmp:
            report["quantize_time"] = quantize_times(Path(tmp))
    if "logit_error" in sections:
        report["logit_error"] = logit_errors(args.seeds)
    out.write_text(json.dumps(report, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
