"""``jamba bench``: the serving protocol of the Jamba-1.5 paper (Figs. 3-4) at a scale the machine allows.

Batch 1; for each context length ``L`` a prompt of ``L`` random token ids, then ``new`` greedy output
tokens (512 in the paper) with no EOS stop. Each run reports end-to-end latency, output tokens/s
(``new / latency``), prefill tokens/s, decode tokens/s (and its inverse, the time per output token) and
the peak memory the run added. Three models, measured one after another at each length so that they
share the machine's load:

- ``jamba_jax``: random weights of a Jamba config (default ``jamba-small``), loaded from an HF checkpoint
  written by ``train.save_pretrained``;
- ``hf``: HF transformers' ``JambaForCausalLM`` (torch) reading the same checkpoint, so the same weights;
- ``attention``: jamba_jax on the all-attention baseline (``attention_baseline``): the same config with
  attention on every layer and the intermediate size set so that the total parameter count matches.

Warm-up is excluded from every timing: jamba_jax compiles its prefill chunk and decode loop for each
length's cache shape first; HF runs a full-length forward pass once per length (torch's first pass at a
new size is several times slower than the next).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from .api import Jamba
from .cache import cache_bytes
from .generate import generate, prefill_layout
from .steps import init_cache, prefill
from .config import JambaConfig

DEFAULT_CONFIG = "jamba-small"
DEFAULT_LENGTHS = (1024, 2048, 4096, 8192)
DEFAULT_NEW = 512  # output tokens in the paper's Figs. 3-4
MODEL_LABELS = {
    "jamba_jax": "jamba_jax (hybrid)",
    "hf": "HF transformers (hybrid, torch)",
    "attention": "jamba_jax, all-attention baseline",
}


class BenchError(ValueError):
    """Bad input to the benchmark (a one-line message for the command line)."""


# ---- inputs --------------------------------------------------------------------------------------

def parse_lengths(text: str) -> list[int]:
    """``"1K,2k,4096"`` -> ``[1024, 2048, 4096]`` (sorted, unique, each at least 1)."""
    out = set()
    for part in str(text).split(","):
        part = part.strip()
        scale = 1
        if part[-1:] in ("k", "K"):
            part, scale = part[:-1], 1024
        try:
            n = int(part) * scale
        except ValueError:
            raise BenchError(f"bad context length {part!r} in {text!r}: expected integers such as 1024 or 1K, "
                             "comma-separated") from None
        if n < 1:
            raise BenchError(f"context lengths must be positive, got {n}")
        out.add(n)
    if not out:
        raise BenchError("no context lengths given")
    return sorted(out)


@functools.lru_cache(maxsize=32)
def _param_shapes(config: JambaConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    from flax import traverse_util

    from .params import abstract_params

    return {path: a.shape for path, a in traverse_util.flatten_dict(abstract_params(config)).items()}


def param_counts(config: JambaConfig) -> dict[str, int]:
    """Total and active (per token: all but the unused experts) parameter counts, from abstract shapes."""
    shapes = _param_shapes(config)
    total = sum(int(np.prod(s)) for s in shapes.values())
    expert = sum(int(np.prod(s)) for path, s in shapes.items() if "experts" in path)
    active = total - expert + expert * config.num_experts_per_tok // max(config.num_experts, 1)
    return {"total": total, "active": active}


def attention_baseline(config: JambaConfig, multiple_of: int = 8) -> JambaConfig:
    """``config`` with attention on every layer (same widths, heads, experts and MoE layers) and the
    intermediate size (multiple of ``multiple_of``) whose total parameter count is nearest the hybrid's.
    Total params are linear in the intermediate size, so two evaluations give it."""
    target = param_counts(config)["total"]
    base = dataclasses.replace(config, attn_layer_period=1, attn_layer_offset=0)
    size0 = config.intermediate_size
    p0 = param_counts(base)["total"]
    slope = (param_counts(dataclasses.replace(base, intermediate_size=size0 + multiple_of))["total"] - p0) / multiple_of
    size = size0 + round((target - p0) / slope / multiple_of) * multiple_of
    return dataclasses.replace(base, intermediate_size=max(multiple_of, size))


def prompt_ids(config: JambaConfig, length: int, seed: int) -> list[int]:
    """``length`` random token ids (ids 0-2 are pad/BOS/EOS in the Jamba vocabularies: left out)."""
    rng = np.random.default_rng([seed, length])
    return rng.integers(3, config.vocab_size, length).tolist()


def machine_info() -> dict:
    """What ran the benchmark: processor, cores, memory, load, library versions, JAX backend."""
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu": platform.processor() or
            platform.machine(), "cpu_count": os.cpu_count(), "jax": jax.__version__,
            "jax_backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
            "device_count": jax.device_count()}
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            info["cpu"] = names[0]
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    info["memory_bytes"] = int(line.split()[1]) * 1024
    except OSError:
        pass
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    try:  # the source measured, when run from a git checkout
        root = Path(__file__).resolve().parents[1]
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        if head.returncode == 0:
            info["source"] = head.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    if "torch" in sys.modules:
        import torch
        import transformers

        info.update(torch=torch.__version__, transformers=transformers.__version__,
                    torch_threads=torch.get_num_threads())
    return info


# ---- measuring -----------------------------------------------------------------------------------

def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _device_bytes() -> int | None:
    if jax.default_backend() == "cpu":
        return None
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 -- some backends do not implement it
        return None
    return stats.get("bytes_in_use")


class PeakMemory:
    """Samples, every ``interval`` seconds on a thread, this process's resident memory and, on an
    accelerator, the device bytes in use; ``added`` is the peak over the value on entry (the memory
    the measured code took on top of what was already resident, the loaded weights included)."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.before: int | None = None
        self.peak: int | None = None
        self.source = "device bytes in use" if _device_bytes() is not None else "process RSS"
        self._read = _device_bytes if self.source == "device bytes in use" else _rss_bytes
        self._stop = threading.Event()

    def _sample(self):
        while not self._stop.is_set():
            value = self._read()
            if value is not None:
                self.peak = max(self.peak or 0, value)
            self._stop.wait(self.interval)

    def __enter__(self):
        self.before = self._read()
        self.peak = self.before
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        value = self._read()
        if value is not None:
            self.peak = max(self.peak or 0, value)

    @property
    def added(self) -> int | None:
        return None if self.before is None or self.peak is None else self.peak - self.before


def _row(length: int, new: int, prefill_s: float, decode_s: float, latency_s: float, mem: PeakMemory,
         tokens: list[int]) -> dict:
    steps = new - 1
    row = {"context": length, "new_tokens": new, "latency_s": latency_s, "prefill_s": prefill_s,
           "decode_s": decode_s, "output_tok_s": new / latency_s, "prefill_tok_s": length / prefill_s,
           "decode_tok_s": steps / decode_s if decode_s > 0 else None,
           "ms_per_output_token": 1e3 * decode_s / steps if steps else None,
           "peak_memory_added_bytes": mem.added, "resident_bytes_before": mem.before,
           "memory_source": mem.source, "tokens": tokens}
    if hasattr(os, "getloadavg"):
        row["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return row


def warm_up_jamba(model: Jamba, prompt: list[int], new: int) -> None:
    """Compiles and runs once what ``generate(model, [prompt], max_new_tokens=new)`` runs, without the
    decode: a full prefill of the prompt through a cache of that shape (HF's warm-up is one full-length
    forward; after one piece of each shape only, the first full prefill of a 4K prompt ran 9% slower than
    the next ones), then ``generate`` itself with the first token as its EOS, which compiles the decode
    loop and stops it at once."""
    length, max_len, _ = prefill_layout(len(prompt), new)  # generate's padded prompt and cache
    valid = np.arange(length) >= length - len(prompt)
    ids = np.zeros((1, length), np.int32)
    ids[0, valid] = prompt
    logits, _ = prefill(model, ids, init_cache(model, 1, max_len), valid[None])
    first = int(np.argmax(np.asarray(logits[0], np.float32)))
    generate(model, [prompt], max_new_tokens=new, stop_ids=[first])


def time_jamba(model: Jamba, prompt: list[int], new: int) -> dict:
    """One warm run of ``jamba_jax.generate`` (greedy, no EOS), after ``warm_up_jamba``."""
    warm_up_jamba(model, prompt, new)
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        r = generate(model, [prompt], max_new_tokens=new, stop_ids=[])
        latency = time.perf_counter() - t0
    row = _row(len(prompt), new, r.prefill_seconds, r.decode_seconds, latency, mem, r.tokens[0])
    _, max_len, _ = prefill_layout(len(prompt), new)  # the cache generate allocated
    row.update({f"analytic_{k}": v for k, v in cache_bytes(model.config, 1, max_len, model.dtype).items()})
    return row


class _Clock:
    """An HF ``generate`` streamer that only records when it is called: once with the prompt, then once
    per new token (the first of them right after the prefill)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        self.times.append(time.perf_counter())


def time_hf(model, prompt: list[int], new: int) -> dict:
    """One run of HF ``generate`` (greedy, exactly ``new`` tokens), after a full-length forward pass:
    prefill is the time to the first new token, decode the time from it to the last."""
    import torch

    ids = torch.tensor([prompt])
    with torch.no_grad():
        model(ids, use_cache=True, logits_to_keep=1)  # warm-up at this size
        clock = _Clock()
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                 min_new_tokens=new, do_sample=False, pad_token_id=0, streamer=clock)
            latency = time.perf_counter() - t0
    token_times = clock.times[1:-1]  # after the prompt put, before end()
    prefill = token_times[0] - t0
    decode = token_times[-1] - token_times[0]
    return _row(len(prompt), new, prefill, decode, latency, mem, out[0, len(prompt):].tolist())


def choose_torch_threads(model, prompt: list[int], new: int = 16) -> dict:
    """Sets torch's intra-op thread count to the faster (end-to-end, on a short run) of 1 and the default,
    and returns both timings. On a CPU that other processes load, OpenMP's spinning barriers can make
    several threads an order of magnitude slower than one; HF gets whichever serves it better."""
    import torch

    default = torch.get_num_threads()
    seconds = {}
    for threads in sorted({1, default}):
        torch.set_num_threads(threads)
        seconds[threads] = time_hf(model, prompt, new)["latency_s"]
    chosen = min(seconds, key=seconds.get)
    torch.set_num_threads(chosen)
    return {"chosen": chosen, "default": default, "calibration_latency_s": {str(k): v for k, v in seconds.items()},
            "calibration": f"prompt {len(prompt)} tokens, {new} output tokens"}


# ---- the benchmark ---------------------------------------------------------------------------------

def random_params(config: JambaConfig, seed: int = 0, dtype="float32"):
    """Random weights in numpy (fast on a CPU): normal(0, 0.02) matrices, unit norm weights and ``D``,
    ``A_log = log(1..d_state)``, dt bias -4.6 (dt ~ 0.01), zero conv bias."""
    from flax import traverse_util

    rng = np.random.default_rng(seed)
    out = {}
    for path, shape in sorted(_param_shapes(config).items()):
        name = "/".join(path[-2:])
        if path[-1] == "A_log":
            v = np.broadcast_to(np.log(np.arange(1, shape[-1] + 1, dtype=np.float32)), shape)
        elif path[-1] == "D" or "norm" in name:
            v = np.ones(shape, np.float32)
        elif path[-1] == "dt_bias":
            v = np.full(shape, -4.6, np.float32)
        elif path[-1].endswith("bias"):
            v = np.zeros(shape, np.float32)
        else:
            v = rng.standard_normal(shape, np.float32) * 0.02
        out[path] = jnp.asarray(v, jnp.dtype(dtype))
    return traverse_util.unflatten_dict(out)


def _hf_available() -> bool:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def run_bench(config_name: str = DEFAULT_CONFIG, lengths=DEFAULT_LENGTHS, new: int = DEFAULT_NEW, *,
              hf: bool = True, baseline: bool = True, dtype: str = "float32", seed: int = 0, repeats: int = 1,
              log: Callable[[str], None] = lambda m: None) -> dict:
    """Runs the protocol for every length and returns the results (see ``write_results``). With
    ``repeats > 1`` each model runs that many times per length and the fastest run is kept (all
    latencies are recorded), which filters out other processes' bursts on a shared machine."""
    from .api import load
    from .train import save_pretrained

    if repeats < 1:
        raise BenchError(f"--repeats must be at least 1, got {repeats}")
    if new < 2:
        raise BenchError(f"--new must be at least 2 (one prefill token and one decode step), got {new}")
    lengths = sorted(set(int(n) for n in lengths))
    if not lengths or lengths[0] < 1:
        raise BenchError("context lengths must be positive")
    if hf and not _hf_available():
        raise BenchError("the HF comparison needs torch and transformers (pip install torch==2.13.0 && "
                         "pip install -e '.[test]'); or pass --no-hf")
    config = JambaConfig.named(config_name)
    start = time.perf_counter()
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "config": str(config_name),
              "protocol": {"batch": 1, "lengths": lengths, "new_tokens": new, "dtype": dtype, "repeats": repeats,
                           "prompt": "random token ids", "decoding": "greedy, no EOS stop",
                           "warm_up": "excluded: compile (jamba_jax) / one full-length forward (HF) per length"},
              "models": {}}
    models: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(tmp, config, random_params(config, seed, dtype))
        models["jamba_jax"] = load(tmp, dtype=dtype)
        if hf:
            import torch
            from transformers import JambaForCausalLM

            models["hf"] = JambaForCausalLM.from_pretrained(tmp, dtype=getattr(torch, dtype)).eval()
    if baseline:
        base_config = attention_baseline(config)
        models["attention"] = Jamba(base_config, random_params(base_config, seed + 1, dtype))
    result["machine"] = machine_info()
    for key, model in models.items():
        cfg = config if key != "attention" else base_config
        result["models"][key] = {
            "label": MODEL_LABELS[key], "params": param_counts(cfg), "layers": cfg.num_hidden_layers,
            "attention_layers": cfg.num_attention_layers, "intermediate_size": cfg.intermediate_size,
            "framework": "torch" if key == "hf" else "jax", "rows": []}
    if hf:
        time_hf(models["hf"], prompt_ids(config, 16, seed), 4)  # first-call costs that no later call repeats
        result["models"]["hf"]["attn_implementation"] = models["hf"].config._attn_implementation
        result["models"]["hf"]["torch_threads"] = choose_torch_threads(models["hf"], prompt_ids(config, 128, seed))
        log(f"HF runs with {result['models']['hf']['torch_threads']['chosen']} torch threads")
    for length in lengths:
        prompt = prompt_ids(config, length, seed)
        for key, model in models.items():
            runs = [time_hf(model, prompt, new) if key == "hf" else time_jamba(model, prompt, new)
                    for _ in range(repeats)]
            row = min(runs, key=lambda r: r["latency_s"])  # the least disturbed run on a shared machine
            if repeats > 1:
                row["repeat_latencies_s"] = [r["latency_s"] for r in runs]
            result["models"][key]["rows"].append(row)
            log(f"{key:>9} L={length:>6}: latency {row['latency_s']:7.2f} s, "
                f"prefill {row['prefill_tok_s']:8.0f} tok/s, "
                f"decode {row['decode_tok_s']:6.1f} tok/s ({row['ms_per_output_token']:.1f} ms/token), "
                f"load {row.get('load_average', ['?'])[0]}")
    result["ratios"] = ratios(result)
    result["duration_s"] = time.perf_counter() - start
    if hasattr(os, "getloadavg"):
        result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return result


def ratios(result: dict) -> list[dict]:
    """Per length: jamba_jax over HF (prefill and decode tokens/s, latency) and the all-attention
    baseline's time per output token over the hybrid's."""
    models = result["models"]
    ours = {r["context"]: r for r in models.get("jamba_jax", {}).get("rows", [])}
    out = []
    for length, r in ours.items():
        entry = {"context": length}
        hf = {h["context"]: h for h in models.get("hf", {}).get("rows", [])}.get(length)
        if hf:
            entry["prefill_vs_hf"] = r["prefill_tok_s"] / hf["prefill_tok_s"]
            entry["decode_vs_hf"] = r["decode_tok_s"] / hf["decode_tok_s"]
            entry["latency_hf_over_ours"] = hf["latency_s"] / r["latency_s"]
            n = next((i for i, (a, b) in enumerate(zip(r["tokens"], hf["tokens"])) if a != b), None)
            entry["greedy_tokens_equal_hf"] = n is None
            entry["first_token_differing_from_hf"] = n
        att = {a["context"]: a for a in models.get("attention", {}).get("rows", [])}.get(length)
        if att:
            entry["attention_ms_per_token_over_hybrid"] = att["ms_per_output_token"] / r["ms_per_output_token"]
        out.append(entry)
    return out


# ---- output ----------------------------------------------------------------------------------------

def write_results(result: dict, out_dir: str | Path, *, keep_tokens: bool = False) -> list[Path]:
    """Writes ``bench.json`` and the PNG plots into ``out_dir``; returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    saved = json.loads(json.dumps(result))
    if not keep_tokens:
        for model in saved["models"].values():
            for row in model["rows"]:
                row.pop("tokens", None)
    path = out_dir / "bench.json"
    path.write_text(json.dumps(saved, indent=2) + "\n")
    return [path, *plot(saved, out_dir)]


def plot(result: dict, out_dir: str | Path) -> list[Path]:
    """One PNG per metric against context length (log2 axis), one line per model."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BenchError("plots need matplotlib (pip install -e '.[test]'); bench.json was written") from None
    out_dir = Path(out_dir)
    machine = result.get("machine", {})
    if machine.get("jax_backend") == "cpu":
        where = f"{machine.get('cpu', 'CPU')}, {machine.get('cpu_count', '?')} cores"
    else:
        where = f"{machine.get('device', '?')}"
    where += f", {result.get('date', '')[:10]}"
    title = f"{result.get('config', '')}, batch 1, {result['protocol']['new_tokens']} output tokens; {where}"
    specs = {
        "latency": ("end-to-end latency (s)", lambda r: r["latency_s"], "End-to-end latency (paper Fig. 3)"),
        "output_tokens_per_second": ("output tokens / s", lambda r: r["output_tok_s"],
                                     "Output tokens per second (paper Fig. 4)"),
        "time_per_output_token": ("ms per output token (decode)", lambda r: r["ms_per_output_token"],
                                  "Time per output token"),
        "prefill": ("prefill tokens / s", lambda r: r["prefill_tok_s"], "Prefill throughput"),
        "memory": ("MiB", lambda r: (r["peak_memory_added_bytes"] or 0) / 2**20,
                   "Peak memory added by the run (solid); KV cache + Mamba state (dashed)"),
    }
    written = []
    for name, (ylabel, value, heading) in specs.items():
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for i, (key, model) in enumerate(result["models"].items()):
            rows = [r for r in model["rows"] if value(r) is not None]
            if not rows:
                continue
            color = f"C{i}"
            ax.plot([r["context"] for r in rows], [value(r) for r in rows], "o-", color=color,
                    label=model.get("label", key))
            if name == "memory" and "analytic_kv_cache_bytes" in rows[0]:
                ax.plot([r["context"] for r in rows],
                        [(r["analytic_kv_cache_bytes"] + r["analytic_mamba_state_bytes"]) / 2**20 for r in rows],
                        "s--", color=color, alpha=0.7, label=f"{model.get('label', key)}: cache")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (prompt tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{heading}\n{title}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def summary(result: dict) -> str:
    """A plain-text table of every run and the ratios."""
    lines = [f"{'model':<36} {'context':>8} {'latency s':>10} {'out tok/s':>10} {'prefill tok/s':>14} "
             f"{'decode tok/s':>13} {'ms/token':>9} {'peak +MiB':>10}"]
    for key, model in result["models"].items():
        for r in model["rows"]:
            mem = r["peak_memory_added_bytes"]
            lines.append(f"{model.get('label', key):<36} {r['context']:>8} {r['latency_s']:>10.2f} "
                         f"{r['output_tok_s']:>10.1f} {r['prefill_tok_s']:>14.0f} {r['decode_tok_s']:>13.1f} "
                         f"{r['ms_per_output_token']:>9.1f} {(mem or 0) / 2**20:>10.1f}")
    for e in result.get("ratios", []):
        parts = [f"context {e['context']}:"]
        if "prefill_vs_hf" in e:
            parts.append(f"prefill {e['prefill_vs_hf']:.2f}x HF, decode {e['decode_vs_hf']:.2f}x HF")
        if "attention_ms_per_token_over_hybrid" in e:
            parts.append(f"all-attention ms/token {e['attention_ms_per_token_over_hybrid']:.2f}x the hybrid's")
        if len(parts) > 1:
            lines.append(parts[0] + " " + "; ".join(parts[1:]))
    return "\n".join(lines)
