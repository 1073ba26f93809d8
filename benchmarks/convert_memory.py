"""Peak host memory of ``jamba convert`` against the largest param leaf and the model size.

    python benchmarks/convert_memory.py                      # the preset in docs/convert.md
    python benchmarks/convert_memory.py --preset test --json  # the size the tests use; one JSON line
    git archive OLD | tar -x -C /tmp/old                      # another version's source tree, then
    python benchmarks/convert_memory.py --baseline /tmp/old --repeats 3   # both, alternating

Writes a synthetic HF checkpoint (random numpy tensors, sharded safetensors + index; no torch) for a
config, then converts it in a fresh subprocess (this script with ``--child``) that reports the growth of
its peak RSS over its RSS just before the conversion, the seconds (wall and CPU, all threads) to convert,
and the seconds to ``load`` the result (with the checksum check, and without it where ``load`` has
``verify=``). With ``--baseline`` the same checkpoint is also converted and loaded by the jamba_jax of
another source tree, the two runs alternating ``--repeats`` times: on a shared machine only such
back-to-back pairs compare. Each number is the median over the repeats.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def use_source_tree(root: Path) -> None:
    """Makes ``import jamba_jax`` load the source tree ``root`` (another version; its ``jamba_jax.convert``
    package lives at ``root/convert``, as in this repository) instead of the installed one."""
    sys.path.insert(0, str(root))
    spec = importlib.util.spec_from_file_location("jamba_jax.convert", root / "convert" / "__init__.py",
                                                  submodule_search_locations=[str(root / "convert")])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)


if __name__ == "__main__" and "--source" in sys.argv:  # a baseline's child: before anything imports jamba_jax
    use_source_tree(Path(sys.argv[sys.argv.index("--source") + 1]).absolute())

import numpy as np  # noqa: E402

from common import environment, hwm_bytes, reset_peak_rss, rss_bytes  # noqa: E402

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


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


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
        t, cpu = time.perf_counter(), cpu_seconds()
        orbax_checkpoint.hf_to_orbax(source, target, progress=False)
        return {"rss_before": before, "growth": hwm_bytes() - before, "seconds": time.perf_counter() - t,
                "cpu_seconds": cpu_seconds() - cpu}

    def load(target, **kwargs):
        t = time.perf_counter()
        model = jamba_jax.load(target, **kwargs)
        jax.block_until_ready(model.params)
        del model
        return time.perf_counter() - t

    out = {"code": [jamba_jax.__file__, orbax_checkpoint.__file__], "first": convert(tiny_dir, tiny_out),
           "measured": convert(src, dst)}
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


def measure(workdir: Path, source: Path | None = None) -> dict:
    """One conversion and load of ``workdir/hf`` in a fresh process, by this jamba_jax or that of ``source``."""
    dirs = [workdir / d for d in ("tiny", "tiny-converted", "hf", "converted")]
    for d in (dirs[1], dirs[3]):
        shutil.rmtree(d, ignore_errors=True)
    extra = [] if source is None else ["--source", str(source)]
    out = subprocess.run([sys.executable, __file__, "--child", *map(str, dirs), *extra], capture_output=True,
                         text=True, check=True)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    if source is not None and not all(Path(f).is_relative_to(source.absolute()) for f in m["code"]):
        raise RuntimeError(f"the baseline ran {m['code']}, not code from {source}")
    return m


def summary(runs: list[dict], model: int, largest: int) -> dict:
    """The medians over ``runs`` (from ``measure``)."""
    med = lambda values: statistics.median(values)  # noqa: E731
    growth = med([r["measured"]["growth"] for r in runs])
    out = {"model_bytes": model, "largest_leaf_bytes": largest,
           "rss_before_bytes": med([r["measured"]["rss_before"] for r in runs]), "peak_rss_growth_bytes": growth,
           "first_conversion_growth_bytes": med([r["first"]["growth"] for r in runs]),
           "growth_over_largest_leaf": growth / largest, "growth_over_model": growth / model,
           "convert_seconds": round(med([r["measured"]["seconds"] for r in runs]), 2),
           "convert_cpu_seconds": round(med([r["measured"]["cpu_seconds"] for r in runs]), 2),
           "load_seconds": round(med([r["load_seconds"] for r in runs]), 2),
           "load_noverify_seconds": None, "repeats": len(runs)}
    if all("load_noverify_seconds" in r for r in runs):
        out["load_noverify_seconds"] = round(med([r["load_noverify_seconds"] for r in runs]), 2)
    return out


def run(preset: str, workdir: Path, baseline: Path | None = None, repeats: int = 1) -> dict:
    config = PRESETS[preset]
    t = time.perf_counter()
    model, largest = write_synthetic_checkpoint(workdir / "hf", config)
    written = time.perf_counter() - t
    write_synthetic_checkpoint(workdir / "tiny", tiny_version(config))
    runs, base_runs = [], []
    for _ in range(repeats):
        if baseline is not None:
            base_runs.append(measure(workdir, baseline))
        runs.append(measure(workdir))
    result = {"preset": preset, **summary(runs, model, largest), "write_synthetic_seconds": round(written, 2)}
    if baseline is not None:
        base = summary(base_runs, model, largest)
        result["baseline"] = {"source": str(baseline), **base}
        result["ratio_to_baseline"] = {k: round(result[k] / base[k], 3) for k in
                                       ("convert_seconds", "convert_cpu_seconds", "load_seconds",
                                        "growth_over_largest_leaf") if base[k]}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="large")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--baseline", type=Path, default=None, metavar="DIR",
                        help="also measure the jamba_jax source tree DIR (e.g. from git archive), alternating")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each version (default 1)")
    parser.add_argument("--child", nargs=4, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--source", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    if args.baseline is not None and not (args.baseline / "convert" / "orbax_checkpoint.py").is_file():
        parser.error(f"--baseline {args.baseline}: not a jamba_jax source tree (no convert/orbax_checkpoint.py)")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args.preset, Path(tmp), args.baseline, args.repeats)
    if args.json:
        print(json.dumps({**environment(), **result}))
        return
    mib = lambda n: f"{n / 2**20:,.0f} MiB"  # noqa: E731

    def report(r: dict, name: str) -> None:
        print(f"{name}: peak RSS growth during conversion {mib(r['peak_rss_growth_bytes'])} "
              f"= {r['growth_over_largest_leaf']:.2f} x largest leaf = {r['growth_over_model']:.3f} x model "
              f"(RSS before: {mib(r['rss_before_bytes'])}); convert {r['convert_seconds']} s "
              f"({r['convert_cpu_seconds']} s CPU)")
        print(f"{name}: load {r['load_seconds']} s (checksums checked); without the checksum check: "
              f"{r['load_noverify_seconds']} s")

    print(f"preset {result['preset']}: model {mib(result['model_bytes'])}, largest leaf "
          f"{mib(result['largest_leaf_bytes'])}; medians of {result['repeats']} run(s)")
    report(result, "this version")
    if "baseline" in result:
        report(result["baseline"], f"baseline {result['baseline']['source']}")
        print("ratio to the baseline: " + ", ".join(f"{k} {v}" for k, v in result["ratio_to_baseline"].items()))
    print(f"one-time costs (growth of a first, tiny conversion in the process): "
          f"{mib(result['first_conversion_growth_bytes'])}")


if __name__ == "__main__":
    main()
