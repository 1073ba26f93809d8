"""Peak host memory of ``jamba convert`` against the largest param leaf and the model size.

    python benchmarks/convert_memory.py                      # the preset in docs/convert.md
    python benchmarks/convert_memory.py --preset test --json  # the size the tests use; one JSON line

Writes a synthetic HF checkpoint (random numpy tensors, sharded safetensors + index; no torch) for a
config, then converts it in a fresh subprocess (this script with ``--child``) that reports the growth of
its peak RSS over its RSS just before the conversion, and the seconds to convert and to ``load`` the result
(with the checksum check, and without it where ``load`` has ``verify=``).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import environment, hwm_bytes, reset_peak_rss, rss_bytes

PRESETS = {
    # 4 layers (mamba, mamba+MoE, attention, mamba+MoE), bf16: ~250 MiB, largest leaf (a stacked expert
    # kernel [1, 8, 512, 4096]) 32 MiB. The size the tests use.
    "test": dict(vocab_size=8192, hidden_size=512, intermediate_size=4096, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
                 attn_layer_period=4, attn_layer_offset=2, mamba_d_state=16, dtype="bfloat16"),
    # 16 layers, fp32: ~2.2 GiB, largest leaf [2, 8, 1024, 2048] 128 MiB
    "large": dict(vocab_size=16384, hidden_size=1024, intermediate_size=2048, num_hidden_layers=16,
                  num_attention_heads=8, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
                  mamba_d_state=16, dtype="float32"),
}


# Not common.random_params + save_pretrained: the conversion's memory depends on the checkpoint's layout
# (100 MiB safetensors shards and an index), and random bits are fast to draw at gigabytes.
def random_tensor(rng, shape, dtype: np.dtype) -> np.ndarray:
    """Random finite values, drawn as bits (fast): the top exponent bit cleared keeps |x| < 2."""
    bits = np.dtype(f"u{dtype.itemsize}")
    top_exponent_bit = 1 << (8 * dtype.itemsize - 2)
    raw = rng.integers(0, np.iinfo(bits).max, size=shape, dtype=bits, endpoint=True)
    return (raw & ~bits.type(top_exponent_bit)).view(dtype)


def write_synthetic_checkpoint(directory: Path, config: dict, shard_bytes: int = 100 * 2**20, seed: int = 0):
    """An HF-layout checkpoint of random tensors for ``config`` (an HF config.json dict); returns
    ``(model bytes, largest leaf bytes)``."""
    from flax import traverse_util
    from safetensors.numpy import save_file

    from jamba_jax import JambaConfig, abstract_params
    from jamba_jax.convert.hf_checkpoint import INDEX_FILE, hf_shape
    from jamba_jax.convert.hf_keys import checkpoint_entries

    directory.mkdir(parents=True, exist_ok=True)
    cfg = JambaConfig.from_dict(config)
    dtype = np.dtype(cfg.dtype)
    shapes = {p: s.shape for p, s in traverse_util.flatten_dict(abstract_params(cfg)).items()}
    entries = list(checkpoint_entries(cfg))
    rng = np.random.default_rng(seed)
    shards, current, size = [], {}, 0
    for e in entries:
        t = random_tensor(rng, hf_shape(e, shapes[e.path]), dtype)
        if current and size + t.nbytes > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[e.hf_key] = t
        size += t.nbytes
        if size >= shard_bytes:
            shards.append(current)
            current, size = {}, 0
    if current:
        shards.append(current)
    weight_map = {}
    for i, tensors in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    (directory / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps({**config, "model_type": "jamba"}))
    model = sum(dtype.itemsize * math.prod(s) for s in shapes.values())
    largest = max(dtype.itemsize * math.prod(s) for s in shapes.values())
    return model, largest


def child(tiny_dir: str, tiny_out: str, src: str, dst: str) -> dict:
    """Runs in a fresh interpreter. The first conversion, of a tiny checkpoint with the same layer plan, pays
    the costs that do not grow with the model (imports, tracing the param shapes, Orbax's and tensorstore's
    thread pools and metadata); the second is the one measured. Before each the peak-RSS mark is reset to
    the current RSS."""
    import inspect

    import jax

    import jamba_jax
    from jamba_jax.convert import orbax_checkpoint

    def convert(source, target):
        reset_peak_rss()
        before = rss_bytes()
        t = time.perf_counter()
        orbax_checkpoint.hf_to_orbax(source, target, progress=False)
        return {"rss_before": before, "growth": hwm_bytes() - before, "seconds": time.perf_counter() - t}

    def load(target, **kwargs):
        t = time.perf_counter()
        model = jamba_jax.load(target, **kwargs)
        jax.block_until_ready(model.params)
        del model
        return time.perf_counter() - t

    out = {"first": convert(tiny_dir, tiny_out), "measured": convert(src, dst)}
    load(tiny_out)  # the one-time costs of a first load
    has_verify = "verify" in inspect.signature(jamba_jax.load).parameters
    out["load_seconds"] = min(load(dst) for _ in range(2))
    if has_verify:
        out["load_noverify_seconds"] = min(load(dst, verify=False) for _ in range(2))
    return out


def tiny_version(config: dict) -> dict:
    """The same layer plan with every width tiny."""
    return dict(config, vocab_size=64, hidden_size=16, intermediate_size=16, num_attention_heads=2,
                num_key_value_heads=1, mamba_d_state=4)


def measure(workdir: Path, config: dict) -> dict:
    write_synthetic_checkpoint(workdir / "tiny", tiny_version(config))
    args = [str(workdir / d) for d in ("tiny", "tiny-converted", "hf", "converted")]
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(preset: str, workdir: Path) -> dict:
    config = PRESETS[preset]
    t = time.perf_counter()
    model, largest = write_synthetic_checkpoint(workdir / "hf", config)
    written = time.perf_counter() - t
    m = measure(workdir, config)
    growth, fixed = m["measured"]["growth"], m["first"]["growth"]
    return {"preset": preset, "model_bytes": model, "largest_leaf_bytes": largest,
            "rss_before_bytes": m["measured"]["rss_before"], "peak_rss_growth_bytes": growth,
            "first_conversion_growth_bytes": fixed, "growth_over_largest_leaf": growth / largest,
            "growth_over_model": growth / model, "convert_seconds": round(m["measured"]["seconds"], 2),
            "load_seconds": round(m["load_seconds"], 2),
            "load_noverify_seconds": round(m["load_noverify_seconds"], 2) if "load_noverify_seconds" in m else None,
            "write_synthetic_seconds": round(written, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="large")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--child", nargs=4, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args.preset, Path(tmp))
    if args.json:
        print(json.dumps({**environment(), **result}))
        return
    mib = lambda n: f"{n / 2**20:,.0f} MiB"  # noqa: E731
    print(f"preset {result['preset']}: model {mib(result['model_bytes'])}, largest leaf "
          f"{mib(result['largest_leaf_bytes'])}")
    print(f"peak RSS growth during conversion: {mib(result['peak_rss_growth_bytes'])} "
          f"= {result['growth_over_largest_leaf']:.2f} x largest leaf = {result['growth_over_model']:.3f} x model "
          f"(RSS before: {mib(result['rss_before_bytes'])}); convert {result['convert_seconds']} s")
    print(f"load {result['load_seconds']} s (checksums checked); without the checksum check: "
          f"{result['load_noverify_seconds']} s")
    print(f"one-time costs (growth of a first, tiny conversion in the process): "
          f"{mib(result['first_conversion_growth_bytes'])}")


if __name__ == "__main__":
    main()
