"""ExpertsInt8 on CPU: logit error against fp32 (int8 vs bf16), weight bytes, and quantization time.

    python benchmarks/experts_int8_cpu.py --out docs/results/experts_int8_cpu.json
    python benchmarks/experts_int8_cpu.py --sections bytes,logit_error --seeds 1 --out /tmp/int8.json   # quick

1. Logit error: random models (``scaled_params``) in fp32 (the reference), bf16,
   and bf16 with int8 feed-forward weights quantized from the bf16 weights (what
   ``load(dtype="bfloat16", quantize="experts-int8")`` gives), plus int8 weights with fp32 compute
   (the quantization error alone). Error = max |logits - ref| / max |ref| and RMS(logits - ref) / RMS(ref).
2. Bytes of the released configs (shapes only, nothing allocated): feed-forward weights in bf16 vs int8
   plus fp32 scales, and the whole model.
3. Quantization time: ``quantize_params`` on jamba-small (cold = with compiles, warm), one Mini-sized
   expert leaf ``[16, 4096, 14336]`` bf16, and ``load`` with and without ``quantize`` on a jamba-small
   HF checkpoint of random weights (``common.random_params``, written by ``train.save_pretrained``).

Sections not run (``--sections``) are kept from an existing ``--out`` file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jamba_jax
from jamba_jax import JambaConfig
from jamba_jax.params import scaled_params
from jamba_jax.quant import QuantizedWeight, quantize, quantize_params
from jamba_jax.train import save_pretrained

from common import environment, log, random_params, rel_err, time_call, write_json

# Three layers: a scanned block of two (Mamba + MoE, attention + dense MLP) and a one-layer tail (Mamba + MoE).
SMALL = dataclasses.replace(JambaConfig.named("jamba-tiny"), hidden_size=32, intermediate_size=64, vocab_size=128,
                            num_hidden_layers=3, attn_layer_period=2, attn_layer_offset=1, expert_layer_offset=0)
CONFIGS = {
    "moe_top2_e4": SMALL,
    "moe_top2_e8": dataclasses.replace(SMALL, num_experts=8),
    "moe_top1_e8": dataclasses.replace(SMALL, num_experts=8, num_experts_per_tok=1),
    "dense": dataclasses.replace(SMALL, num_experts=1, num_experts_per_tok=1),
}


# Not common.random_params: the logit errors are relative to the logits' scale, and the model's 0.02 init
# leaves them nearly flat; jamba_jax.params.scaled_params keeps activations O(1) through the layers.


def rms_err(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.sqrt(np.mean((got - ref) ** 2) / np.mean(ref ** 2)))


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
            log(name, row)
        mean = {label: {m: float(np.mean([r[label][m] for r in rows])) for m in ("max", "rms")}
                for label in ("bf16", "int8_bf16", "int8_fp32")}
        out[name] = {"per_seed": rows, "mean": mean,
                     "ratio_int8_over_bf16": {m: mean["int8_bf16"][m] / mean["bf16"][m] for m in ("max", "rms")}}
        log(name, "mean", mean)
    return out


def nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def quantized_leaves(tree) -> list:
    """The ``QuantizedWeight`` leaves of a param tree (concrete or abstract)."""
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, QuantizedWeight))
    return [leaf for leaf in leaves if isinstance(leaf, QuantizedWeight)]


def released_bytes() -> dict:
    out = {}
    for name in ("jamba-1.5-mini", "jamba-1.5-large"):
        config = JambaConfig.named(name)
        params = jamba_jax.abstract_params(config, jnp.bfloat16)
        qparams = jax.eval_shape(lambda p, c=config: quantize_params(p, c), params)
        q = quantized_leaves(qparams)
        ffn_int8 = sum(nbytes(leaf.q) for leaf in q)
        ffn_scales = sum(nbytes(leaf.scale) for leaf in q)
        out[name] = {"ffn_bf16_bytes": 2 * ffn_int8, "ffn_int8_bytes": ffn_int8, "ffn_scale_bytes": ffn_scales,
                     "model_bf16_bytes": nbytes(params), "model_int8_bytes": nbytes(qparams)}
        log(name, out[name])
    return out


def quantize_times(tmp: Path) -> dict:
    out = {}
    config = JambaConfig.named("jamba-small")
    params = random_params(config, jnp.bfloat16)
    timing = time_call(lambda: quantize_params(params, config), warmup=0, runs=2)  # cold (compiles), then warm
    ffn = 2 * sum(nbytes(leaf.q) for leaf in quantized_leaves(timing.output))  # the bf16 weights int8 replaced
    out["jamba-small_quantize_params"] = {"ffn_bf16_bytes": ffn, "cold_s": timing.times[0], "warm_s": timing.times[1]}
    log(out)

    out["mini_expert_leaf"] = leaf_quantize_time((16, 4096, 14336))
    log(out)

    save_pretrained(tmp, config, random_params(config))  # fp32
    for label, kw in (("plain", {}), ("experts-int8", {"quantize": "experts-int8"})):
        # the second run has the quantize compiles cached
        times = time_call(lambda kw=kw: jax.tree.leaves(jamba_jax.load(tmp, dtype="bfloat16", **kw).params),
                          warmup=0, runs=2).times
        out[f"load_jamba-small_{label}"] = {"first_s": times[0], "second_s": times[1]}
    log(out)
    return out


def leaf_quantize_time(shape) -> dict:
    """``quantize`` of one random bf16 expert leaf: cold (compiles) and warm."""
    w = jax.block_until_ready(jax.random.normal(jax.random.key(1), shape, jnp.bfloat16))
    cold, warm = time_call(lambda: quantize(w), warmup=0, runs=2).times
    return {"shape": list(w.shape), "bf16_bytes": w.nbytes, "cold_s": cold, "warm_s": warm,
            "GB_per_s": w.nbytes / warm / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="experts_int8_cpu.json")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--sections", default="bytes,quantize_time,logit_error",
                    help="comma-separated; sections not run are kept from an existing --out file")
    args = ap.parse_args()
    out = Path(args.out)
    report = json.loads(out.read_text()) if out.is_file() else {}
    report.update(environment())
    sections = args.sections.split(",")
    if "bytes" in sections:
        report["bytes"] = released_bytes()
        write_json(out, report)
    if "quantize_time" in sections:
        with tempfile.TemporaryDirectory() as tmp:
            report["quantize_time"] = quantize_times(Path(tmp))
        write_json(out, report)
    if "logit_error" in sections:
        report["logit_error"] = logit_errors(args.seeds)
        write_json(out, report)
    log("wrote", args.out)


if __name__ == "__main__":
    main()
