"""Decode against the memory-bandwidth floor on one GPU: full Jamba-1.5-Mini (32 layers, random weights),
the MoE's decode path on the slots (reads only the routed experts) against the grouped path it replaced.

    python benchmarks/gpu_decode.py --out decode.json [--budget-s 420]
    python benchmarks/gpu_decode.py --dry-run --out /tmp/decode.json   # CPU: jamba-tiny widths, tiny lengths

Sections, in order of importance within each weight format (the JSON is rewritten after every row; what the
budget leaves no time for is listed under ``errors`` as skipped):

1. ``copy_bandwidth_GBps``: ``x + 1`` over 1 GiB, measured in this run (``common.copy_bandwidth``).
2. ``runs``: ``jamba_jax.generate`` of a 1024-token prompt + 128 new tokens per row (vLLM's protocol for its
   ExpertsInt8 PR), greedy, no EOS; one call to compile, one timed. Variants: ``bf16 xla`` and ``int8 pallas``
   (decode MoE on the slots: the default), ``... grouped`` (decode MoE forced onto ``ragged_dot``, the path
   before), ``int8 xla`` (the slots in XLA). Per run: ``decode_ms_per_token`` (ms per decode step; every
   row gets a token), ``floor_ms_per_token``, ``fraction_of_floor``, ``e2e_seconds`` (prefill + decode,
   compile excluded), ``e2e_wall_seconds``.
3. ``floor``: the bytes one decode step must read: every weight but the embedding table and the experts,
   plus the distinct experts the step's tokens route to in each MoE layer (counted per step by replaying
   the tokens of the int8 run of batch 8 through the model, ``routed_experts``; batch ``b`` <= 8 takes the
   first ``b`` rows; batch 32 uses the bound ``min(E, batch * top_k)``, all 16), plus the K/V of the filled
   cache and the Mamba state (read and written); over the copy bandwidth. Mean over the steps.
4. ``profile``: one decode step (``jamba_jax.decode_step``) per variant at batch 1: ``jax.profiler`` trace
   of a few steps reduced to device time per kind (attention, Mamba parts, router, experts, norms, LM head,
   copies, other) through the compiled step's HLO (``jamba_jax.hlo_stats``), and from that HLO: kernels per
   step by kind, whole weight stacks written per step (``stack_copies``; want 0) and block weight slices
   written per step (``block_slices``). Also the logits of each variant's step against the ``grouped``
   one (``logits_rel_err``). A text table goes next to the JSON (``.txt``).

Memory: bf16 Mini is ~103 GB. When it fits the device (an H200) the bf16 runs come first and the weights
are then quantized leaf by leaf (``gpu_prefill.quantize_freeing``); otherwise (an H100) the int8 weights
are drawn leaf by leaf and the bf16 runs are skipped (``errors`` says so).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import gzip
import json
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

import jamba_jax
from jamba_jax import JambaConfig, hlo_stats, moe, quant
from jamba_jax.cache import cache_shapes
from jamba_jax.params import is_quantized, param_leaves
from jamba_jax.steps import ModelSpec, decode_logits

from common import Report, copy_bandwidth, environment, log, rel_err, script_parser
from gpu_prefill import peak_bytes, quantize_freeing

FULL = {"config": "jamba-1.5-mini", "layers": 32, "overrides": {}, "prompt": 1024, "new": 128,
        "int8_batches": (1, 4, 8, 32), "bf16_batches": (1, 8, 32), "profile_steps": 8,
        "reserve_int8_s": 230.0}
# Dry run: two scanned blocks of 2 layers (Mamba + dense MLP, attention + MoE), 8 experts: batches 1 and 2
# are decode sizes. Few layers, few shapes: every program compiles in seconds.
DRY = {"config": "jamba-tiny", "layers": 4, "prompt": 32, "new": 8, "int8_batches": (1, 2),
       "bf16_batches": (1,), "profile_steps": 2, "reserve_int8_s": 0.0,
       "overrides": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2,
                     "expert_layer_offset": 1, "num_experts": 8}}
HEADROOM = 12 * 2**30  # bytes beyond the weights: caches, prefill activations, compiled programs


# ---- weights ---------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _draw(key, init, shape, dtype):
    return init(key, shape, dtype)


def leafwise_params(config: JambaConfig, quantize: bool, seed: int = 0):
    """The model's random init (each leaf from its param-table initializer), bf16, drawn one leaf at a
    time; with ``quantize`` each feed-forward leaf is quantized as soon as it exists, so the bf16 model
    never needs to fit."""
    key = jax.random.key(seed, impl="unsafe_rbg")
    flat = {}
    for i, leaf in enumerate(param_leaves(config)):
        w = _draw(jax.random.fold_in(key, i), leaf.row.init, tuple(leaf.shape), jnp.dtype(jnp.bfloat16))
        if quantize and is_quantized(leaf.path):
            q = jax.block_until_ready(quant.quantize(w))
            w.delete()
            w = q
        flat[leaf.path] = w
    params = traverse_util.unflatten_dict(flat)
    return quant.quantize_params(params, config) if quantize else params  # checks it is complete


def weight_bytes(config: JambaConfig, quantized: bool) -> dict:
    """Bytes of the weights a decode step reads, from the param table: ``dense`` (every weight but the
    embedding table and the experts) and ``expert`` (one expert's three matrices in one layer)."""
    dense = experts = 0
    for leaf in param_leaves(config):
        n = int(np.prod(leaf.shape))
        q = quantized and is_quantized(leaf.path)
        # int8: one byte a weight plus an fp32 scale per output column (the contraction axis dropped)
        nbytes = n + 4 * n // leaf.shape[-2] if q else 2 * n
        if "experts" in leaf.path:
            experts += nbytes
        elif leaf.path[0] != "embed_tokens":
            dense += nbytes
    moe_layers = sum(config.is_moe(i) for i in range(config.num_hidden_layers))
    return {"dense": dense, "expert": experts // max(moe_layers * config.num_experts, 1),
            "moe_layers": moe_layers}


# ---- the floor -------------------------------------------------------------------------------------

def state_bytes(config: JambaConfig, batch: int, filled: int) -> int:
    """Bytes of cache one decode step reads with ``filled`` cached tokens: each attention layer's K and V
    of the filled slots; each Mamba layer's conv and ssm state, read and written."""
    shapes = cache_shapes(config, batch, max(filled, 1), jnp.bfloat16)
    total = 0
    for path, leaf in traverse_util.flatten_dict(shapes).items():
        nbytes = int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
        if path[-1] in ("key", "value"):
            total += nbytes
        elif path[-1] in ("conv", "ssm"):
            total += 2 * nbytes
    return total


def routed_experts(model, prompts: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """``[steps, moe layers, batch, top_k]``: the experts each decode step routes to, replaying ``tokens``
    ``[batch, steps]`` (the run's greedy output) after a prefill of ``prompts`` ``[batch, prompt]``."""
    batch, steps = tokens.shape
    slots = -(-(prompts.shape[1] + steps) // 512) * 512
    cache = jamba_jax.init_cache(model, batch, slots)
    _, cache = jamba_jax.prefill(model, prompts, cache)
    spec = ModelSpec.of(model)
    top_k = model.config.num_experts_per_tok

    @jax.jit
    def replay(params, cache, tokens):
        def step(cache, ids):
            (_, cache), state = spec.module.apply({"params": params}, ids[:, None], None, cache, last_only=True,
                                                  mutable=["intermediates"])
            flat = traverse_util.flatten_dict(state["intermediates"])
            logits = [v[0] if isinstance(v, tuple) else v for p, v in sorted(flat.items())
                      if p[-1] == "router_logits"]
            # a scanned layer's logits are stacked over blocks: [blocks, tokens, E]; a tail layer's [tokens, E]
            logits = jnp.concatenate([x.reshape(-1, batch, x.shape[-1]) for x in logits])
            return cache, jax.lax.top_k(logits, top_k)[1]
        return jax.lax.scan(step, cache, tokens.T)[1]

    return np.asarray(replay(model.params, cache, jnp.asarray(tokens, jnp.int32)))


def floor_row(config, quantized, batch, prompt, experts: np.ndarray | None, bandwidth) -> dict:
    """The decode floor at ``batch`` rows: bytes a step needs over ``bandwidth``; ``experts`` from
    ``routed_experts`` (its first ``batch`` rows), or None for the bound ``min(E, batch * top_k)``."""
    w = weight_bytes(config, quantized)
    steps = experts.shape[0] if experts is not None else 1
    if experts is not None:
        sub = experts[:, :, :batch]
        distinct = np.array([[len(np.unique(sub[t, layer])) for layer in range(sub.shape[1])]
                             for t in range(steps)])  # [steps, moe layers]
    else:
        bound = min(config.num_experts, batch * config.num_experts_per_tok)
        distinct = np.full((1, w["moe_layers"]), bound)
    per_step = [w["dense"] + int(distinct[t].sum()) * w["expert"] + state_bytes(config, batch, prompt + t)
                for t in range(steps)]
    nbytes = float(np.mean(per_step))
    return {"batch": batch, "bytes_per_step": nbytes, "floor_ms_per_token": 1e3 * nbytes / bandwidth,
            "distinct_experts_per_layer": float(distinct.mean()),
            "distinct_source": "replay" if experts is not None else "upper bound min(E, batch*top_k)",
            "dense_weight_bytes": w["dense"], "expert_bytes": w["expert"]}


# ---- the profile -----------------------------------------------------------------------------------

def _trace_events(directory: str) -> list[dict]:
    paths = [p for p in glob.glob(f"{directory}/**/*.trace.json.gz", recursive=True) if "perfetto" not in p]
    paths = paths or glob.glob(f"{directory}/**/perfetto_trace.json.gz", recursive=True)
    if not paths:
        raise RuntimeError(f"no trace written under {directory}")
    data = json.load(gzip.open(sorted(paths)[-1]))
    events = data["traceEvents"] if isinstance(data, dict) else data
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    device = {pid for pid, name in names.items() if name.startswith("/device:")}
    return [e for e in events if e.get("ph") == "X" and (not device or e.get("pid") in device)]


def profile_step(model, batch: int, filled: int, steps: int, reference=None) -> tuple[dict, np.ndarray]:
    """One decode step after ``filled`` cached tokens: its compiled HLO's kernels by kind, whole stacks and
    block slices written per step, and a ``jax.profiler`` trace of ``steps`` steps reduced to device ms per
    kind (per step); ``logits_rel_err`` against ``reference`` logits when given. Returns the row and this
    step's logits (fp32)."""
    spec = ModelSpec.of(model)
    slots = -(-(filled + steps + 2) // 512) * 512

    def fresh_cache():
        cache = jamba_jax.init_cache(model, batch, slots)
        cache["pos"] = jnp.int32(filled)  # attention reads ``filled`` (zero) keys, as after a prefill
        cache["valid"] = cache["valid"].at[:, :filled].set(True)
        return cache

    ids = jnp.full((batch,), 7, jnp.int32)
    text = decode_logits.lower(model.params, fresh_cache(), ids, spec=spec).compile().as_text()
    items = hlo_stats.kernels(text)
    weights = hlo_stats.weight_kinds(model.params)
    kind_of = {k.name: hlo_stats.jamba_kind(k, weights) for k in items}
    blocks = jax.tree.leaves(model.params["blocks"], is_leaf=lambda x: isinstance(x, quant.QuantizedWeight))
    arrays = [a.q if isinstance(a, quant.QuantizedWeight) else a for a in blocks]
    stacks = {tuple(a.shape) for a in arrays} | {tuple(a.shape[1:]) for a in arrays if a.ndim == 4}
    block_slices = {tuple(a.shape[1:]) for a in arrays if a.ndim >= 3}
    stack_copies = hlo_stats.materialized(items, stacks)
    sliced = hlo_stats.materialized(items, block_slices - stacks)
    row = {"kernels_per_step": hlo_stats.kernel_counts(items, lambda k: kind_of[k.name]),
           "kernels_by_opcode": hlo_stats.kernel_counts(items),
           "stack_copies": {"count": sum(k.count for k in stack_copies),
                            "bytes": sum(k.count * k.bytes for k in stack_copies),
                            "shapes": sorted({k.shape for k in stack_copies})[:8]},
           "block_slices": {"count": sum(k.count for k in sliced), "bytes": sum(k.count * k.bytes for k in sliced)}}

    cache = fresh_cache()
    logits, cache = jamba_jax.decode_step(model, ids, cache)  # compiles (the same program as above)
    first = np.asarray(logits, np.float32)
    if reference is not None:
        row["logits_rel_err"] = rel_err(first, reference)
    for _ in range(2):
        logits, cache = jamba_jax.decode_step(model, ids, cache)
    jax.block_until_ready(logits)
    with tempfile.TemporaryDirectory() as directory:
        with jax.profiler.trace(directory, create_perfetto_trace=True):
            t0 = time.perf_counter()
            for _ in range(steps):
                logits, cache = jamba_jax.decode_step(model, ids, cache)
            jax.block_until_ready(logits)
            row["step_wall_ms"] = 1e3 * (time.perf_counter() - t0) / steps
        events = _trace_events(directory)
    ms, launches = {}, {}
    for e in events:
        args = e.get("args") or {}
        op, module = args.get("hlo_op") or e.get("name"), str(args.get("hlo_module", ""))
        if "decode_logits" not in module:
            continue
        kind = kind_of.get(op, "unmatched")
        ms[kind] = ms.get(kind, 0.0) + float(e.get("dur", 0.0)) / 1e3 / steps
        launches[kind] = launches.get(kind, 0) + 1
    row["device_ms_per_step"] = dict(sorted(ms.items(), key=lambda kv: -kv[1]))
    row["device_ms_total"] = sum(ms.values())
    row["traced_kernels_per_step"] = sum(launches.values()) / steps
    return row, first


def profile_table(profiles: list[dict]) -> str:
    """The per-kind device ms of every profiled variant, one column each, as text."""
    kinds = sorted({k for p in profiles for k in p["device_ms_per_step"]},
                   key=lambda k: -max(p["device_ms_per_step"].get(k, 0.0) for p in profiles))
    head = f"{'kind':<26}" + "".join(f"{p['variant'][:22]:>24}" for p in profiles)
    lines = [head, "-" * len(head)]
    for kind in kinds + ["total"]:
        cells = []
        for p in profiles:
            ms = p["device_ms_total"] if kind == "total" else p["device_ms_per_step"].get(kind, 0.0)
            n = p["kernels_per_step"].get(kind, 0)
            cells.append(f"{ms:10.3f} ms {n:5d} krn")
        lines.append(f"{kind:<26}" + "".join(f"{c:>24}" for c in cells))
    lines.append("")
    for p in profiles:
        lines.append(f"{p['variant']}: step wall {p['step_wall_ms']:.3f} ms, whole stacks written per step "
                     f"{p['stack_copies']['count']} ({p['stack_copies']['bytes'] / 1e6:.1f} MB), block weight "
                     f"slices written {p['block_slices']['count']} ({p['block_slices']['bytes'] / 1e6:.1f} MB)")
    return "\n".join(lines) + "\n"


# ---- runs ------------------------------------------------------------------------------------------

def prompts_for(config, batch: int, length: int) -> np.ndarray:
    """``batch`` random prompts (row ``i`` the same whatever the batch: batch ``b`` is the first ``b`` rows
    of batch 32)."""
    rng = np.random.default_rng(0)
    return rng.integers(3, config.vocab_size, (max(batch, 32), length)).astype(np.int32)[:batch]


def run_generate(model, config, batch, plan) -> tuple[dict, np.ndarray]:
    ids = prompts_for(config, batch, plan["prompt"])
    first = jamba_jax.generate(model, ids.tolist(), max_new_tokens=plan["new"], stop_ids=[])
    t0 = time.perf_counter()
    r = jamba_jax.generate(model, ids.tolist(), max_new_tokens=plan["new"], stop_ids=[])
    wall = time.perf_counter() - t0
    steps = max(len(t) for t in r.tokens) - 1
    row = {"batch": batch, "prompt_tokens": plan["prompt"], "new_tokens": plan["new"],
           "first_call_s": first.compile_seconds + first.prefill_seconds + first.decode_seconds,
           "compile_s": first.compile_seconds, "prefill_seconds": r.prefill_seconds,
           "decode_ms_per_token": 1e3 * r.decode_seconds / max(steps, 1),
           "e2e_seconds": r.prefill_seconds + r.decode_seconds, "e2e_wall_seconds": wall,
           "tokens_equal_first_call": r.tokens == first.tokens, "peak_device_bytes": peak_bytes()}
    return row, np.asarray(r.tokens)


def main():
    p = script_parser(__doc__, out=None, budget_s=420.0, dry_run="CPU: jamba-tiny widths, tiny lengths, the whole flow")
    p.add_argument("--no-bf16", action="store_true", help="skip the bf16 runs (draw int8 weights directly)")
    args = p.parse_args()
    plan = {**FULL, **(DRY if args.dry_run else {})}
    config = dataclasses.replace(JambaConfig.named(plan["config"]), num_hidden_layers=plan["layers"],
                                 **plan["overrides"])
    report = Report(args.out, {**environment(), "config": plan["config"], "layers": config.num_hidden_layers,
                               "prompt_tokens": plan["prompt"], "new_tokens": plan["new"], "dry_run": args.dry_run,
                               "budget_s": args.budget_s, "runs": [], "floor": [], "profile": []},
                    budget=args.budget_s)
    data = report.data
    bandwidth = None
    try:
        bandwidth = copy_bandwidth()
        data["copy_bandwidth_GBps"] = bandwidth / 1e9
        log(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    except Exception as e:  # noqa: BLE001
        report.error("copy bandwidth", e)
    stats = jax.devices()[0].memory_stats() if hasattr(jax.devices()[0], "memory_stats") else None
    limit = int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None
    bf16_bytes = sum(2 * int(np.prod(leaf.shape)) for leaf in param_leaves(config))
    data.update(bf16_weight_bytes=bf16_bytes, device_bytes_limit=limit)
    bf16_fits = (limit is None or bf16_bytes + HEADROOM <= limit) and not args.no_bf16

    tokens = {}  # (variant, batch) -> generated tokens
    profiles, reference, replay = [], {}, {}

    def floor_for(quantized: bool, batch: int) -> dict:
        """The floor at ``batch``: from the replayed routing when it covers the batch, else the bound."""
        experts = replay.get("experts") if batch <= replay.get("batch", 0) else None
        return floor_row(config, quantized, batch, plan["prompt"], experts, bandwidth)

    def set_floor(row: dict) -> None:
        if bandwidth:
            floor = floor_for(row["variant"].startswith("int8"), row["batch"])
            row.update(floor_ms_per_token=floor["floor_ms_per_token"], floor_source=floor["distinct_source"],
                       fraction_of_floor=floor["floor_ms_per_token"] / row["decode_ms_per_token"])

    def run(variant, model, batch, grouped=None, reserve=0.0):
        if not report.have_time(f"{variant} batch {batch}", 20.0, reserve):
            return
        try:
            with moe.forced_decode_matmul(grouped) if grouped else contextlib.nullcontext():
                row, toks = run_generate(model, config, batch, plan)
            tokens[(variant, batch)] = toks
            row = {"variant": variant, **row}
            set_floor(row)
            log(row)
            report.add("runs", row)
        except Exception as e:  # noqa: BLE001 -- keep the other runs
            report.error(f"{variant} batch {batch}", e)

    def profile(variant, model, grouped=None, reserve=0.0):
        if not report.have_time(f"profile {variant}", 20.0, reserve):
            return
        try:
            with moe.forced_decode_matmul(grouped) if grouped else contextlib.nullcontext():
                row, logits = profile_step(model, 1, plan["prompt"], plan["profile_steps"],
                                           reference.get(model.quantize))
            reference.setdefault(model.quantize, logits)
            row = {"variant": variant, **row}
            log({k: row[k] for k in ("variant", "device_ms_total", "step_wall_ms", "stack_copies")})
            profiles.append(row)
            report.add("profile", row)
            Path(args.out).with_suffix(".txt").write_text(profile_table(profiles))
        except Exception as e:  # noqa: BLE001
            report.error(f"profile {variant}", e)

    def replay_routing(model):
        """Replays the tokens of the int8 run of the most rows to count each step's distinct experts; the
        floors of the runs so far (and later) at that many rows or fewer use them."""
        done = sorted(b for (v, b) in tokens if v == "int8 pallas")
        if not done or not bandwidth or not report.have_time("floor replay", 30.0):
            return
        try:
            batch = done[-1]
            replay["experts"] = routed_experts(model.with_kernels("xla"), prompts_for(config, batch, plan["prompt"]),
                                               tokens[("int8 pallas", batch)][:, :-1])
            replay["batch"] = batch
            data["routed_experts_shape"] = list(replay["experts"].shape)
            for row in data["runs"]:
                set_floor(row)
            report.write()
        except Exception as e:  # noqa: BLE001
            report.error("floor replay", e)

    reserve = plan["reserve_int8_s"]
    if bf16_fits:
        params = leafwise_params(config, quantize=False)
        log("bf16 params ready")
        model = jamba_jax.Jamba(config, params, kernels="xla")
        profile("bf16 xla grouped", model, "ragged_dot", reserve)  # the reference logits: the path before
        profile("bf16 xla", model, None, reserve)
        run("bf16 xla", model, 1, None, reserve)
        run("bf16 xla grouped", model, 1, "ragged_dot", reserve)
        for batch in plan["bf16_batches"][1:]:
            run("bf16 xla", model, batch, None, reserve)
        t0 = time.perf_counter()
        del model
        params = quantize_freeing(params, config)
        data["quantize_seconds"] = time.perf_counter() - t0
    else:
        why = "--no-bf16" if args.no_bf16 else (f"bf16 weights ({bf16_bytes / 1e9:.0f} GB) + headroom exceed the "
                                                f"device's {limit / 1e9:.0f} GB")
        report.error("bf16", f"skipped: {why}")
        params = leafwise_params(config, quantize=True)
    log("int8 params ready")
    model = jamba_jax.Jamba(config, params, kernels="pallas", quantize="experts-int8")
    batches = plan["int8_batches"]
    for batch in batches[:3]:  # the vLLM anchor's batches 1, 4, 8
        run("int8 pallas", model, batch)
    replay_routing(model)
    run("int8 pallas grouped", model, 1, "ragged_dot")
    profile("int8 pallas grouped", model, "ragged_dot")
    profile("int8 pallas", model)
    run("int8 xla", model.with_kernels("xla"), 1)
    for batch in batches[3:]:
        run("int8 pallas", model, batch)

    # the kernels' greedy tokens against the grouped path's (random weights: near-ties may differ)
    data["greedy_equal"] = {f"{v} vs {v} grouped": bool(np.array_equal(tokens[(v, 1)], tokens[(f"{v} grouped", 1)]))
                            for v in ("bf16 xla", "int8 pallas") if (v, 1) in tokens and (f"{v} grouped", 1) in tokens}
    if bandwidth:
        for weights, batch in sorted({(r["variant"].split()[0], r["batch"]) for r in data["runs"]}):
            report.add("floor", {"weights": weights, **floor_for(weights == "int8", batch)})
    report.write(finished=True)
    log(f"done; wrote {args.out} and {Path(args.out).with_suffix('.txt')}")


if __name__ == "__main__":
    main()
