"""End-to-end generation on one GPU at Jamba-1.5-Mini widths (random weights, as many blocks as asked).

    python3 benchmarks/gpu_generate.py --out results.json [--blocks 1] [--prompt 1024] [--new 64] [--budget 150]

For each variant (bf16 and ExpertsInt8 weights, each with ``kernels="xla"`` and ``kernels="pallas"``: the
Pallas scan, attention and int8 grouped-matmul kernels; and bf16 ``xla`` with the MoE's decode-sized inputs
on the CPU path's one-row-at-a-time products, ``moe._rows_ffn``, instead of ``ragged_dot``, which reads
every expert: a what-if for the GPU default, prefill unchanged) it runs
``jamba_jax.generate`` once to compile, then once timed, and reports prefill tokens/s, decode tokens/s
and the decode memory-bandwidth floor: bytes of weights one token reads (every non-expert weight plus
top-k experts per MoE layer) over the measured device-to-device copy bandwidth. Every section is
guarded and the JSON is rewritten after each, so a failure or the time budget never loses results.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

import jamba_jax
from jamba_jax import JambaConfig, abstract_params, moe


def random_params(config, dtype, seed=0):
    shapes = traverse_util.flatten_dict(abstract_params(config, dtype))

    @jax.jit
    def make(key):
        out = {}
        for i, (path, a) in enumerate(sorted(shapes.items())):
            k = jax.random.fold_in(key, i)
            name = path[-1] if path[-1] not in ("kernel", "weight", "embedding") else "/".join(path[-2:])
            if name == "A_log":
                v = jnp.broadcast_to(jnp.log(jnp.arange(1, a.shape[-1] + 1, dtype=jnp.float32)), a.shape)
            elif name.endswith("weight") or name == "D":
                v = jnp.ones(a.shape, jnp.float32)
            else:
                v = 0.02 * jax.random.normal(k, a.shape, jnp.float32)
            out[path] = v.astype(a.dtype)
        return out

    return traverse_util.unflatten_dict(make(jax.random.key(seed)))


@contextlib.contextmanager
def moe_rows_decode():
    """Within: ``experts_ffn`` sends inputs of at most half the expert count of rows (decode) to the tiled
    path, where they run one row at a time; larger inputs keep the backend's default. Compiled programs
    are dropped on entry and exit (the jit caches do not see the switch)."""
    default = moe.experts_ffn

    def experts_ffn(x, expert_ids, weights, *projs_and_impl, grouped=None):
        few = moe.few_rows(expert_ids, projs_and_impl[0].shape[0])
        return default(x, expert_ids, weights, *projs_and_impl, grouped="tiled" if few else grouped)

    jax.clear_caches()
    moe.experts_ffn = experts_ffn
    try:
        yield
    finally:
        moe.experts_ffn = default
        jax.clear_caches()


def weight_bytes_per_token(config, params) -> int:
    """Bytes one decode token reads: all weights but the unused experts (top-k of E per MoE layer)."""
    total = 0
    for path, leaf in traverse_util.flatten_dict(params, is_leaf=lambda _, x: hasattr(x, "q")).items():
        arrays = [leaf.q, leaf.scale] if hasattr(leaf, "q") else [leaf]
        nbytes = sum(a.size * a.dtype.itemsize for a in arrays)
        if "experts" in path:
            nbytes = nbytes * config.num_experts_per_tok // config.num_experts
        if path[0] == "embed_tokens":
            nbytes = 0  # a gather of one row
        total += nbytes
    return total


def copy_bandwidth() -> float:
    x = jnp.ones((1 << 28,) if jax.default_backend() == "gpu" else (1 << 20,), jnp.float32)
    f = jax.jit(lambda a: a + 1)
    f(x).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(5):
        y = f(x)
    y.block_until_ready()
    return 2 * x.nbytes * 5 / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--blocks", type=int, default=1)
    p.add_argument("--prompt", type=int, default=1024)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--budget", type=float, default=150.0)
    p.add_argument("--config", default="jamba-1.5-mini", help="widths to use (jamba-tiny for a CPU dry run)")
    args = p.parse_args()
    start = time.perf_counter()
    base = JambaConfig.named(args.config)
    config = dataclasses.replace(base, num_hidden_layers=8 * args.blocks)
    out = {"card": jax.devices()[0].device_kind, "jax": jax.__version__,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "layers": config.num_hidden_layers,
           "prompt_tokens": args.prompt, "new_tokens": args.new, "runs": [], "errors": []}

    def save():
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)

    try:
        out["copy_bandwidth_GBps"] = copy_bandwidth() / 1e9
        print(f"copy bandwidth {out['copy_bandwidth_GBps']:.0f} GB/s", flush=True)
    except Exception as e:  # noqa: BLE001
        out["errors"].append(f"copy: {e!r}"[:400])
    params = random_params(config, jnp.bfloat16)
    jax.block_until_ready(params)
    print(f"params ready {time.perf_counter() - start:.1f}s", flush=True)
    prompt = np.random.default_rng(0).integers(3, config.vocab_size, args.prompt).tolist()
    variants = [("bf16 xla", "xla", False), ("bf16 xla, MoE rows decode", "xla", False),
                ("bf16 pallas", "pallas", False), ("int8 xla", "xla", True), ("int8 pallas", "pallas", True)]
    quantized = None
    for name, kernels, int8 in variants:
        if time.perf_counter() - start > args.budget:
            out["errors"].append(f"{name}: skipped (time budget)")
            break
        try:
            if int8 and quantized is None:
                from jamba_jax.quant import quantize_params

                t0 = time.perf_counter()
                quantized = jax.block_until_ready(quantize_params(params, config))
                out["quantize_seconds"] = time.perf_counter() - t0
            model = jamba_jax.Jamba(config, quantized if int8 else params).with_kernels(kernels)
            with moe_rows_decode() if "rows decode" in name else contextlib.nullcontext():
                t0 = time.perf_counter()
                first = jamba_jax.generate(model, [prompt], max_new_tokens=args.new, stop_ids=[])
                compile_s = time.perf_counter() - t0
                r = jamba_jax.generate(model, [prompt], max_new_tokens=args.new, stop_ids=[])
            floor_s = weight_bytes_per_token(config, model.params) / (out.get("copy_bandwidth_GBps", 1) * 1e9)
            row = {"variant": name, "first_call_s": compile_s, "compile_s": first.compile_seconds,
                   "prefill_tok_s": r.prefill_tokens_per_second,
                   "decode_tok_s": r.decode_tokens_per_second, "decode_ms_per_token": 1e3 / r.decode_tokens_per_second,
                   "floor_ms_per_token": 1e3 * floor_s,
                   "fraction_of_floor": floor_s * r.decode_tokens_per_second}
            out["runs"].append(row)
            print(json.dumps(row), flush=True)
        except Exception as e:  # noqa: BLE001
            out["errors"].append(f"{name}: " + "".join(traceback.format_exception_only(e))[:600])
            print("ERROR", name, repr(e)[:300], flush=True)
        save()
    save()
    print(f"done in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
