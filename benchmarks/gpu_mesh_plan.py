"""Per-device memory of 8-GPU inference, compiled by XLA's GPU compiler on one GPU (docs/sharding.md,
"Compiled for GPUs").

    python benchmarks/gpu_mesh_plan.py --out docs/results/gpu_memory_plan_h200.json   # one GPU, < 8 min
    python benchmarks/gpu_mesh_plan.py --dry-run --out /tmp/mesh_plan.json            # CPU, 8 fake devices

Plans: Jamba-1.5-Large, bf16 and ExpertsInt8, a 256K-token cache, batch 1, on 8 devices as (data, expert,
tensor) = (1, 1, 8) and (1, 2, 4); Jamba-1.5-Mini on 1 and 2 devices. Each plan is
``jamba_jax.memory_plan.compile_plan``: the sharded prefill chunk and decode step compiled from abstract
arrays (nothing is allocated), per device the params, K/V cache and Mamba state (exact, from the shard
shapes) and each program's ``memory_analysis()``; then the decode step's collectives
(``jamba_jax.hlo_stats``, from its compiled HLO, saved gzipped next to the JSON) with the time they take on
NVLink (``NVLINK_BYTES_PER_S``, and an assumed latency per collective) next to the per-device weight-read
floor (the bytes one decode step reads / the copy bandwidth measured in this run).

Where the devices come from (``PROVIDERS``, tried in this order; each in a fresh process, since JAX reads
the mock settings when it starts its GPU client; the plans one provider could not compile go to the next,
and every error is recorded under ``providers``):

- ``mock-topology``: ``jax_mock_gpu_topology="1x8x1"``, eight one-GPU hosts with a mocked NCCL. XLA requires
  a mocked host to have as many devices as the local machine (``"1x1x8"``, one 8-GPU host, fails on one GPU).
- ``mock-processes``: ``mock_num_gpu_processes=8``, the same topology by the older flag.
- ``compile-only``: ``memory_plan.compile_only_gpus``, 8 compile-only GPUs of the attached kind in one host
  (``jax.experimental.topologies``); the path ``jamba info --mesh 8`` takes on a one-GPU machine.
- ``cpu``: 8 fake CPU devices and the fp32 proxy (``--dry-run`` only, on small configs).

jax 0.10.2 has both mock flags (``jax/_src/xla_bridge.py``: they set the GPU client's ``enable_mock_nccl``,
``num_nodes`` and ``mock_gpu_topology``); a later JAX that renames them fails its provider's setup, which
is recorded, and the next provider runs. The GPU compiles run with ``--xla_gpu_autotune_level=0``
(``--autotune`` keeps XLA's default): autotuning picks kernels and does not change buffer assignment beyond
library workspaces, and it would time every GEMM shape of a 398B model on the one real GPU.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # several processes share the one GPU

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402

from common import Report, copy_bandwidth, elapsed, environment, log, script_parser  # noqa: E402

# NVLink 4 (H100 / H200 SXM): 18 links x 25 GB/s each way, 450 GB/s per GPU and direction; the ring
# all-reduce's bus bytes (hlo_stats.Collective.bus_bytes) move at most at this rate.
NVLINK_BYTES_PER_S = 450e9
# An assumption, not a measurement: a small NCCL all-reduce within one NVLink node takes ~10 us; the decode
# step's collectives are a few KB each, so their count times this bounds them, not the bandwidth.
LATENCY_S = 10e-6
CONTEXT = 262144
PROVIDERS = ("mock-topology", "mock-processes", "compile-only")
DRY_OVERRIDES = (("num_hidden_layers", 2), ("attn_layer_period", 2), ("attn_layer_offset", 1))
DRY_PROVIDERS = ("mock-topology", "cpu")  # the first fails without a GPU: the fallback is exercised too


@dataclasses.dataclass(frozen=True)
class Plan:
    model: str
    quantize: str | None
    data: int
    expert: int
    tensor: int
    context: int
    overrides: tuple = ()  # (field, value) pairs replaced in the named config
    chunk: int | None = None  # prefill chunk; default: steps.default_chunk of the compiler's platform

    @property
    def devices(self) -> int:
        return self.data * self.expert * self.tensor

    @property
    def name(self) -> str:
        return f"{self.model}_{self.quantize or 'bf16'}_{self.data}x{self.expert}x{self.tensor}"


def plans(dry_run: bool) -> list[Plan]:
    """In order of importance (a budget cut drops the last)."""
    if dry_run:  # two layers of jamba-tiny's widths (Mamba + MLP, attention + MoE): every kind, fast compiles
        tiny = dict(context=256, overrides=DRY_OVERRIDES, chunk=64)
        return [Plan("jamba-tiny", "experts-int8", 1, 1, 8, **tiny), Plan("jamba-tiny", None, 1, 2, 4, **tiny),
                Plan("jamba-tiny", "experts-int8", 1, 1, 1, **tiny), Plan("jamba-tiny", None, 1, 1, 2, **tiny)]
    large, mini, int8 = "jamba-1.5-large", "jamba-1.5-mini", "experts-int8"
    return [Plan(large, int8, 1, 1, 8, CONTEXT), Plan(large, None, 1, 1, 8, CONTEXT), Plan(mini, int8, 1, 1, 1, CONTEXT),
            Plan(large, int8, 1, 2, 4, CONTEXT), Plan(large, None, 1, 2, 4, CONTEXT), Plan(mini, None, 1, 1, 1, CONTEXT),
            Plan(mini, int8, 1, 1, 2, CONTEXT), Plan(mini, None, 1, 1, 2, CONTEXT)]


# ---- one provider's plans, in a fresh process ------------------------------------------------------------

def start_provider(provider: str, autotune: bool):
    """Sets up JAX for ``provider`` (before its backends start) and returns ``devices(n)``."""
    from jamba_jax.memory_plan import compile_only_gpus, fake_cpu_devices

    if provider == "cpu":
        fake_cpu_devices(8)
        return lambda n: jax.devices("cpu")[:n]
    if not autotune:
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_gpu_autotune_level=0"
    if provider == "mock-topology":
        jax.config.update("jax_mock_gpu_topology", "1x8x1")
    elif provider == "mock-processes":
        jax.config.update("mock_num_gpu_processes", 8)
    devices = jax.devices()
    if devices[0].platform != "gpu":
        raise RuntimeError(f"{provider}: no GPU backend (devices: {devices[0].platform} x {len(devices)})")
    if provider == "compile-only":
        return compile_only_gpus
    if len(devices) < 8:
        raise RuntimeError(f"{provider}: {len(devices)} devices, 8 needed")
    return lambda n: devices[:n]


def plan_row(plan: Plan, devices, hlo_dir: Path) -> dict:
    """Compiles ``plan`` for ``devices`` and returns its JSON row (decode HLO saved under ``hlo_dir``)."""
    import jamba_jax
    from jamba_jax import JambaConfig
    from jamba_jax.hlo_stats import collective_seconds, collective_table, collectives
    from jamba_jax.memory_plan import compile_plan

    mesh = jamba_jax.make_mesh(plan.devices, data=plan.data, expert=plan.expert, devices=devices)
    t0 = time.perf_counter()
    config = dataclasses.replace(JambaConfig.named(plan.model), **dict(plan.overrides))
    p, programs = compile_plan(config, mesh, context=plan.context, quantize=plan.quantize, chunk=plan.chunk)
    compile_s = time.perf_counter() - t0
    hlo = programs["decode"].as_text()
    hlo_dir.mkdir(parents=True, exist_ok=True)
    with gzip.open(hlo_dir / f"{plan.name}.decode.hlo.gz", "wt") as f:
        f.write(hlo)
    items = collectives(hlo)
    return {
        "plan": plan.name, "model": plan.model, "quantize": plan.quantize,
        "mesh": {"data": plan.data, "expert": plan.expert, "tensor": plan.tensor}, "context": plan.context,
        "batch": p["batch"], "compiler": p["compiler"], "compiled_for": p["compiled_for"],
        "params_bytes": p["params"], "cache_bytes": p["kv_cache"] + p["mamba_state"], "kv_cache_bytes": p["kv_cache"],
        "mamba_state_bytes": p["mamba_state"], "prefill_chunk": p["prefill_chunk"],
        "prefill_peak_bytes": p["prefill_peak"], "decode_peak_bytes": p["decode_peak"],
        "prefill_memory": p["prefill_memory"], "decode_memory": p["decode_memory"],
        "decode_weight_read_bytes": p["decode_weight_read"], "collectives": collective_table(items),
        "collective_count": sum(c.count for c in items),
        "collectives_bandwidth_s": collective_seconds(items, NVLINK_BYTES_PER_S),
        "collectives_latency_s": collective_seconds(items, float("inf"), latency=LATENCY_S),
        "compile_s": round(compile_s, 1),
    }


def child(args) -> None:
    """``--child PROVIDER``: the plans ``--plans`` (indices) with one provider; rows go to ``--out``."""
    todo = [plans(args.dry_run)[int(i)] for i in args.plans.split(",")]
    report = Report(args.out, {"provider": args.child, "rows": []})
    try:
        devices = start_provider(args.child, args.autotune)
    except Exception as e:  # noqa: BLE001 -- recorded: the parent tries the next provider
        report.error(f"{args.child}: setup", e)
        return
    for plan in todo:
        log(f"{args.child}: compiling {plan.name} ...")
        try:
            row = plan_row(plan, devices(plan.devices), Path(args.hlo_dir))
        except Exception as e:  # noqa: BLE001 -- one plan's failure must not lose the others
            report.error(f"{args.child}: {plan.name}", e)
            continue
        log(f"{args.child}: {plan.name}: prefill peak {row['prefill_peak_bytes'] / 1e9:.2f} GB, decode peak "
            f"{row['decode_peak_bytes'] / 1e9:.2f} GB, {row['collective_count']} collectives, {row['compile_s']} s")
        report.add("rows", row | {"provider": args.child})


# ---- the parent: providers in order, plans split over parallel processes --------------------------------

def run_provider(args, provider: str, todo: list[int], work: Path, deadline: float) -> list[dict]:
    """Runs ``todo`` (plan indices) under ``provider`` in ``args.jobs`` processes; returns their reports."""
    groups = [todo[i::args.jobs] for i in range(args.jobs) if todo[i::args.jobs]]
    procs = []
    for j, group in enumerate(groups):
        out = work / f"{provider}_{j}.json"
        cmd = [sys.executable, __file__, "--child", provider, "--plans", ",".join(map(str, group)), "--out", str(out),
               "--hlo-dir", str(Path(args.out).with_suffix("")) + "_hlo"]
        cmd += ["--dry-run"] * args.dry_run + ["--autotune"] * args.autotune
        procs.append((subprocess.Popen(cmd), out))
    reports = []
    for proc, out in procs:
        try:
            proc.wait(timeout=max(1.0, deadline - elapsed()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        data = json.loads(out.read_text()) if out.exists() else {"rows": [], "errors": []}
        if proc.returncode != 0:
            data["errors"].append({"where": f"{provider}: process", "error": f"exit code {proc.returncode}"})
        reports.append(data)
    return reports


def main() -> None:
    ap = script_parser(__doc__, out="gpu_memory_plan.json", budget_s=420.0,
                       dry_run="jamba-tiny plans on 8 fake CPU devices (the mock provider fails and is skipped)")
    ap.add_argument("--jobs", type=int, default=None, help="parallel compile processes (default 2 on GPU, 1 dry)")
    ap.add_argument("--autotune", action="store_true", help="keep XLA's GPU autotuning (slower compiles)")
    for hidden in ("--child", "--plans", "--hlo-dir"):  # the parent's calls of itself
        ap.add_argument(hidden, default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    args.jobs = args.jobs or (1 if args.dry_run else 2)
    all_plans = plans(args.dry_run)
    report = Report(args.out, {**environment(), "dry_run": args.dry_run, "nvlink_bytes_per_s": NVLINK_BYTES_PER_S,
                               "assumed_latency_s_per_collective": LATENCY_S, "providers": [], "plans": []},
                    budget=args.budget_s)
    bandwidth = copy_bandwidth()
    report.write(copy_bandwidth_bytes_per_s=bandwidth)
    log(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    work = Path(args.out).with_suffix("")
    work = work.with_name(work.name + "_parts")
    work.mkdir(parents=True, exist_ok=True)
    todo = list(range(len(all_plans)))
    for provider in DRY_PROVIDERS if args.dry_run else PROVIDERS:
        if not todo or not report.have_time(f"provider {provider}", need=30):
            break
        log(f"provider {provider}: {len(todo)} plans")
        reports = run_provider(args, provider, todo, work, args.budget_s)
        rows = [row for r in reports for row in r["rows"]]
        errors = [e for r in reports for e in r["errors"]]
        report.add("providers", {"provider": provider, "compiled": [row["plan"] for row in rows], "errors": errors})
        for row in rows:
            floor = row["decode_weight_read_bytes"] / bandwidth
            report.add("plans", row | {"weight_read_floor_s": floor,
                                       "decode_read_floor_s": (row["decode_weight_read_bytes"] + row["cache_bytes"])
                                       / bandwidth})
        done = {row["plan"] for row in rows}
        todo = [i for i in todo if all_plans[i].name not in done]
    for i in todo:
        report.error(all_plans[i].name, "no provider compiled this plan (see providers)")
    report.write(missing=[all_plans[i].name for i in todo])
    print_table(report.data)


def print_table(data: dict) -> None:
    log(f"{'plan':<40} {'provider':<15} {'params':>8} {'cache':>7} {'prefill':>8} {'decode':>8} "
        f"{'coll.':>6} {'NVLink':>9} {'latency':>9} {'floor':>9}  (GB per device; ms per decode step)")
    for r in data["plans"]:
        log(f"{r['plan']:<40} {r['provider']:<15} {r['params_bytes'] / 1e9:8.2f} {r['cache_bytes'] / 1e9:7.2f} "
            f"{r['prefill_peak_bytes'] / 1e9:8.2f} {r['decode_peak_bytes'] / 1e9:8.2f} {r['collective_count']:6d} "
            f"{r['collectives_bandwidth_s'] * 1e3:9.4f} {r['collectives_latency_s'] * 1e3:9.3f} "
            f"{r['weight_read_floor_s'] * 1e3:9.3f}")


if __name__ == "__main__":
    main()
