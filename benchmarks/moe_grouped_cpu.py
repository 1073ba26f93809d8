"""The MoE's float grouped matmuls on CPU: ``"ragged_dot"`` against ``"tiled"`` (see ``jamba_jax/moe.py``).

    python benchmarks/moe_grouped_cpu.py [--config jamba-small] [--repeats 20] [--out docs/results/moe_grouped_cpu.json]
    taskset -c 1 python benchmarks/moe_grouped_cpu.py ...   # one core: steadier on a shared machine

1. ``experts_ffn`` (gate, up, SiLU, down, weighted sum over the top-k) at jamba-small shapes (hidden 256,
   inter 512, 8 experts, top-2, fp32) for 1, 8, 256 and 1024 tokens (2 to 2048 rows), routed by the top-2
   of random logits. Also a dense FFN over the same rows with one expert's weights: the same FLOPs as
   a perfect grouped matmul. Times are ms per call, the calls of all variants interleaved (min and median).
2. One 256-token prefill chunk of a random jamba-small model (``generate``'s chunk: ``steps.apply_step``,
   ``Kernels()``) with each grouped matmul, and the max relative difference of its logits.
3. Where that chunk's time goes: each kind of sublayer alone on the chunk (``[1, 256, hidden]``, first
   chunk of a 1280-slot cache), times the number of layers of that kind; the Mamba mixer with the
   default selective scan (``"xla"``: on CPU the sequential scan with its cheaper exp and softplus) and
   with the oracle ``"sequential"``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

import jamba_jax
from jamba_jax import moe
from jamba_jax.attention import Attention
from jamba_jax.cache import init_cache_arrays
from jamba_jax.mamba import Mamba
from jamba_jax.steps import ModelSpec, apply_step

from common import environment, log, random_params, write_json

CACHE_LEN = 1280  # the first chunk of a 1280-slot cache


def interleaved(calls: dict, repeats: int) -> dict:
    """ms per call of each ``name -> (function, args)`` (already compiled), one call of each in turn per round,
    so that a change of the machine's load hits them all."""
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, (f, args) in calls.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args))
            times[name].append(time.perf_counter() - t0)
    return {name: {"min_ms": 1e3 * min(t), "median_ms": 1e3 * float(np.median(t))} for name, t in times.items()}


def ffn_rows(config, tokens: int, repeats: int) -> dict:
    E, H, inter, k = config.num_experts, config.hidden_size, config.intermediate_size, config.num_experts_per_tok
    rng = np.random.default_rng(tokens)
    x = jnp.asarray(rng.standard_normal((tokens, H)), jnp.float32)
    weights, ids = moe.route(jnp.asarray(rng.standard_normal((tokens, E)), jnp.float32), k)
    projs = [jnp.asarray(rng.standard_normal(s) * 0.05, jnp.float32) for s in ((E, H, inter),) * 2 + ((E, inter, H),)]
    fns = {g: jax.jit(lambda *a, g=g: moe.experts_ffn(*a, grouped=g)) for g in moe.GROUPED_MATMULS}

    @jax.jit
    def dense(x, ids, weights, gate, up, down):  # same FLOPs, no grouping: every row through expert 0
        rows = jnp.repeat(x, k, axis=0)
        return (jax.nn.silu(rows @ gate[0]) * (rows @ up[0])) @ down[0]

    fns["dense_same_flops"] = dense
    args = (x, ids, weights, *projs)
    outs = {name: f(*args) for name, f in fns.items()}  # compile
    ref = np.asarray(outs["ragged_dot"])
    row = {"tokens": tokens, "rows": tokens * k, "row_tile": moe.row_tile(tokens * k, E),
           "group_sizes": np.bincount(np.ravel(ids), minlength=E).tolist(),
           "max_rel_diff": float(np.abs(np.asarray(outs["tiled"]) - ref).max() / np.abs(ref).max())}
    row.update(interleaved({name: (f, args) for name, f in fns.items()}, repeats))
    row["speedup"] = row["ragged_dot"]["min_ms"] / row["tiled"]["min_ms"]
    return row


def prefill_chunk(config, repeats: int) -> dict:
    model = jamba_jax.Jamba(config, random_params(config))
    spec = ModelSpec.of(model)
    cache = init_cache_arrays(config, 1, CACHE_LEN, model.dtype)
    ids = jnp.asarray(np.random.default_rng(0).integers(3, config.vocab_size, (1, 256)), jnp.int32)
    valid = jnp.ones((1, 256), bool)
    args = (model.params, cache, ids, valid)
    calls = {}
    for grouped in moe.GROUPED_MATMULS:  # apply_step uncompiled: no donation, the same cache every call
        f = jax.jit(lambda p, c, i, v: apply_step(p, c, i, v, spec=spec)[0])
        with mock.patch.object(moe, "grouped_matmul", lambda grouped=grouped: grouped):
            f(*args)  # traced and compiled with this grouped matmul
        calls[grouped] = (f, args)
    out = {g: np.asarray(f(*a)) for g, (f, a) in calls.items()}
    row = {"tokens": 256, "moe_layers": sum(m for _, m in config.layer_plan),
           "max_rel_logit_diff": float(np.abs(out["tiled"] - out["ragged_dot"]).max()
                                       / np.abs(out["ragged_dot"]).max())}
    row.update(interleaved(calls, max(3, repeats // 4)))
    return row


def chunk_breakdown(config, repeats: int) -> dict:
    x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 256, config.hidden_size)), jnp.float32)
    valid = jnp.ones((1, 256), bool)
    cache = init_cache_arrays(config, 1, CACHE_LEN, jnp.float32)
    kv_valid = cache["valid"].at[:, :256].set(True)
    layer_cache = {config.mixer_type(j): jax.tree.map(lambda a: a[0], cache["blocks"][f"layer_{j}"])
                   for j in range(config.block_size)}
    # Positional (config, dtype, implementation): the modules' implementation field.
    kinds = {"mamba": Mamba(config), "mamba_scan_sequential": Mamba(config, jnp.float32, "sequential"),
             "attention": Attention(config), "mlp": moe.MLP(config), "moe": moe.MoE(config)}
    inputs = {"mamba": (x, valid, layer_cache["mamba"]), "mamba_scan_sequential": (x, valid, layer_cache["mamba"]),
              "attention": (x, valid, layer_cache["attention"], jnp.int32(0), kv_valid), "mlp": (x,), "moe": (x,)}
    calls = {}
    for name, module in kinds.items():
        params = module.init(jax.random.key(0), *inputs[name])
        for grouped in moe.GROUPED_MATMULS if name == "moe" else (None,):
            f = jax.jit(lambda *a, module=module: module.apply(*a))  # a new function: its own trace
            with mock.patch.object(moe, "grouped_matmul", lambda grouped=grouped: grouped):
                jax.block_until_ready(f(params, *inputs[name]))
            calls[name if grouped is None else f"moe_{grouped}"] = (f, (params, *inputs[name]))
    plan = config.layer_plan
    count = {"mamba": sum(m == "mamba" for m, _ in plan), "mamba_scan_sequential": sum(m == "mamba" for m, _ in plan),
             "attention": sum(m == "attention" for m, _ in plan),
             "mlp": sum(not e for _, e in plan), "moe_ragged_dot": sum(e for _, e in plan),
             "moe_tiled": sum(e for _, e in plan)}
    return {name: {"layers": count[name], "min_ms_per_layer": t["min_ms"],
                   "min_ms_per_chunk": t["min_ms"] * count[name]} for name, t in interleaved(calls, repeats).items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="jamba-small")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    config = jamba_jax.JambaConfig.named(args.config)
    load_before = os.getloadavg()
    result = {**environment(), "config": args.config, "default_grouped_matmul": moe.grouped_matmul()}
    result["experts_ffn"] = [ffn_rows(config, t, args.repeats) for t in (1, 8, 256, 1024)]
    log("experts_ffn done")
    result["prefill_chunk"] = prefill_chunk(config, args.repeats)
    log("prefill chunk done")
    result["prefill_chunk_by_sublayer"] = chunk_breakdown(config, args.repeats)
    result["load_average_1_5_15_min"] = {"before": [round(v, 2) for v in load_before],
                                         "after": [round(v, 2) for v in os.getloadavg()]}
    if args.out:
        write_json(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
