"""One job over several processes on this machine (``jax.distributed``, gloo collectives on CPU):
2 processes x 4 fake devices give the logits and greedy tokens of 1 process x 8 devices, loading only
their shards; a dead process ends the job with one line. Each process runs ``tests/multiprocess_worker.py``
or ``jamba generate --distributed``. The sliced HF reader is checked in-process against whole leaves."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import rel_err
from hf_reference import HF_CONFIGS, hf_logits, make_checkpoint
from multiprocess_worker import inputs

WORKER = Path(__file__).with_name("multiprocess_worker.py")
ROOT = WORKER.parent.parent
TOL = 1e-5
MESHES = ("1x2x4", "2x1x4")  # (data, expert, tensor)
# The memory check's checkpoint (180 MB fp32): an embedding, LM head and expert weights split over the
# tensor axis dominate it, as in the released models. Large enough that a load's fixed staging (Orbax and
# tensorstore: ~15-25 MB a process, whatever its share) does not decide the ratio.
MEMORY_CONFIG = dict(HF_CONFIGS["released_plan"], vocab_size=16384, hidden_size=256, intermediate_size=2048,
                     num_attention_heads=8, num_key_value_heads=8, mamba_d_state=8, mamba_dt_rank=16)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)
    return env


def start(processes: int, devices: int, out: Path, check: str, *args: str) -> list[subprocess.Popen]:
    port = free_port()
    out.mkdir(parents=True, exist_ok=True)
    return [subprocess.Popen([sys.executable, str(WORKER), str(processes), str(i), str(port), str(devices), str(out),
                              check, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=ROOT, env=environment()) for i in range(processes)]


def finish(procs: list[subprocess.Popen], timeout: float = 600) -> list[dict]:
    """Every process's JSON answer; all must exit 0."""
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout))
    finally:
        for p in procs:
            p.kill()
    errors = [f"process {i}: {stderr[-3000:]}" for i, (p, (_, stderr)) in enumerate(zip(procs, outputs))
              if p.returncode != 0]
    assert not errors, "\n".join(errors)
    return [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in outputs]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A small HF checkpoint (a scanned block of 8 layers and a tail; 4 experts, 2 kv heads: replicated on
    a 4-way tensor axis) and its ``jamba convert``; the torch model for the reference logits."""
    from jamba_jax.cli import main

    root = tmp_path_factory.mktemp("multiprocess")
    hf_model = make_checkpoint(root / "hf", seed=3, **HF_CONFIGS["released_plan"])
    assert main(["convert", str(root / "hf"), str(root / "converted")]) == 0
    return root, hf_model


def test_regions_read_from_the_files_equal_the_whole_leaves(tmp_path):
    """``read_leaf_region`` (what a process reads of each leaf) against the whole leaves, for random boxes
    of every leaf of a checkpoint with every layout (Mamba projection biases included), with the staging
    buffer shrunk so that boxes are read row by row and in staged groups; every layout's view is used."""
    from jamba_jax import JambaConfig
    from jamba_jax.convert import hf_checkpoint as hc
    from jamba_jax.params import PARAM_TABLE
    from hf_reference import SMALL_CHECKPOINT

    make_checkpoint(tmp_path, seed=2, mamba_proj_bias=True, **SMALL_CHECKPOINT)
    config = JambaConfig.from_json(tmp_path / "config.json")
    ckpt = hc.open_hf_checkpoint(tmp_path, config)
    whole = dict(hc.iter_hf_leaves(ckpt, np.float32))
    layouts = {e.layout.name for _, entries in ckpt.leaves.values() for e in entries}
    table = {row.layout.name for row in PARAM_TABLE}  # every layout the param table uses
    assert layouts == table, layouts ^ table
    rng = np.random.default_rng(0)
    saved = hc.STAGE_BYTES
    try:
        for stage in (48, 1 << 20):
            hc.STAGE_BYTES = stage
            for path, leaf in whole.items():
                for _ in range(3):
                    starts = [int(rng.integers(0, n)) for n in leaf.shape]
                    box = tuple(slice(a, int(rng.integers(a + 1, n + 1))) for a, n in zip(starts, leaf.shape))
                    got = hc.read_leaf_region(ckpt, path, box, np.float32)
                    np.testing.assert_array_equal(got, leaf[box], err_msg=f"{path} {box}")
    finally:
        hc.STAGE_BYTES = saved


def test_cli_distributed_without_settings_is_one_line():
    env = environment()
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, "-m", "jamba_jax.cli", "generate", "--distributed", "--prompt", "Hi"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "JAX_COORDINATOR_ADDRESS" in lines[0] and "JAX_PROCESS_ID" in lines[0], lines


@pytest.mark.slow
def test_two_processes_equal_one_process_and_hf(checkpoints, tmp_path):
    """HF and converted checkpoints, meshes (1, 2, 4) and (2, 1, 4): logits of 2 processes x 4 devices within
    1e-5 of 1 process x 8 devices (and of HF's), greedy tokens equal, in both processes."""
    root, hf_model = checkpoints
    args = (str(root / "hf"), str(root / "converted"))
    one = finish(start(1, 8, tmp_path / "one", "infer", *args))[0]
    two = finish(start(2, 4, tmp_path / "two", "infer", *args))
    assert len(one) == 2 * len(MESHES)
    ids, mask = inputs(HF_CONFIGS["released_plan"]["vocab_size"])
    reference = hf_logits(hf_model, ids, mask)
    for name, tokens in one.items():
        assert two[0][name] == two[1][name] == tokens, (name, two[0][name], two[1][name], tokens)
        single = np.load(tmp_path / "one" / f"{name}.npy")
        multi = np.load(tmp_path / "two" / f"{name}.npy")
        errors = rel_err(multi, single, mask), rel_err(multi, reference, mask)
        print(name, "against 1 process x 8 devices, HF:", errors)
        assert errors[0] <= TOL and errors[1] <= 1e-4, (name, errors)


@pytest.mark.slow
def test_each_process_reads_only_its_shards(checkpoints, tmp_path):
    """Peak resident memory added while loading a 180 MB checkpoint split 8 ways over the tensor axis:
    each of 2 processes (4 devices each) at most 0.6x of one process with all 8 devices, from HF
    safetensors and from a converted checkpoint (after a first load of the small checkpoint of the same
    kind, see the worker)."""
    from jamba_jax.cli import main

    root, _ = checkpoints
    make_checkpoint(tmp_path / "hf", seed=1, max_shard_size="20MB", **MEMORY_CONFIG)
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "converted")]) == 0
    ratios = {}
    for kind in ("hf", "converted"):
        args = ("load_memory", str(tmp_path / kind), "1,1,8", str(root / kind))
        one = finish(start(1, 8, tmp_path / "out", *args))[0]
        two = finish(start(2, 4, tmp_path / "out", *args))
        assert one["model"] > 150e6 and one["held"] >= one["model"], one  # replicated leaves counted per device
        for r in two:
            assert r["held"] < 0.55 * one["model"], r  # half the split leaves, plus small replicated ones
        ratios[kind] = [r["peak_growth"] / one["peak_growth"] for r in two]
        print(kind, "one process:", one, "two:", two, "ratios:", ratios[kind])
    # Measured: 0.51 from HF, 0.52-0.56 converted (Orbax's staging varies from run to run); with the
    # 98 MB checkpoint used before, 0.52-0.67 converted. A process reading every leaf whole would be near 1.
    assert max(ratios["hf"]) <= 0.6, ratios
    assert max(ratios["converted"]) <= 0.6, ratios


@pytest.mark.slow
def test_checksums_cover_leaves_split_over_processes(checkpoints, tmp_path):
    """A converted checkpoint whose manifest checksum of the embedding (split over both processes' devices)
    no longer matches its data: both processes refuse it, naming the leaf (each sums its shards, one
    allgather adds them)."""
    import shutil

    root, _ = checkpoints
    changed = tmp_path / "converted"
    shutil.copytree(root / "converted", changed)
    manifest = json.loads((changed / "manifest.json").read_text())
    entry = manifest["params"]["embed_tokens/embedding"]
    entry["checksum"] = entry["checksum"][::-1]
    (changed / "manifest.json").write_text(json.dumps(manifest))
    procs = start(2, 4, tmp_path / "out", "load", str(changed), "1,1,8")
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, stderr) in zip(procs, outputs):
        assert p.returncode == 1 and "embed_tokens/embedding" in stderr and "fails its checksum" in stderr, stderr
        assert len(stderr.strip().splitlines()) == 1, stderr


def _wait_ready(procs, timeout=300):
    """Waits until every process printed ``ready`` on stdout."""
    deadline = time.monotonic() + timeout
    for p in procs:
        while True:
            line = p.stdout.readline()
            assert line or p.poll() is None, p.stderr.read()[-3000:]
            if line.strip() == "ready":
                break
            assert time.monotonic() < deadline, "no ready line"


@pytest.mark.slow
@pytest.mark.parametrize("victim,mode", [(1, "collectives"), (1, "idle"), (0, "idle")])
def test_a_killed_process_ends_the_job_with_one_line(checkpoints, tmp_path, victim, mode):
    """Process ``victim`` is killed (SIGKILL) while the other runs sharded forward passes (a failed
    collective or its watchdog ends it) or waits on the host (its watchdog finds the victim's counter
    stopped; or, the victim being the coordinator, JAX's runtime aborts it and the output filter makes
    that one line); the survivor exits non-zero within 60 s with one line on stderr."""
    root, _ = checkpoints
    procs = start(2, 4, tmp_path, "serve", str(root / "hf"), mode)
    try:
        _wait_ready(procs)
        procs[victim].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        survivor = procs[1 - victim]
        _, stderr = survivor.communicate(timeout=90)
        elapsed = time.monotonic() - killed
    finally:
        for p in procs:
            p.kill()
    lines = [line for line in stderr.splitlines() if line.strip()]
    print(f"survivor ended {elapsed:.1f} s after the kill: {lines}")
    assert survivor.returncode not in (0, None) and elapsed < 60, (survivor.returncode, elapsed, stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("worker: error: "), stderr[-3000:]


def _cli(processes: int, devices: int, port: int, process_id: int, *args: str) -> subprocess.Popen:
    env = environment()
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    if processes > 1:
        env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes),
                   JAX_PROCESS_ID=str(process_id))
    return subprocess.Popen([sys.executable, "-m", "jamba_jax.cli", "generate", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)


@pytest.mark.slow
def test_cli_distributed_takes_process_0s_inputs_and_only_it_prints():
    """``jamba generate --distributed --mesh 8`` on the demo model, 2 processes x 4 devices, process 1 given
    another prompt and seed (sampling at temperature 1): process 0 prints the text of one process with 8
    devices on its own prompt and seed; process 1 prints nothing on stdout."""
    common = ["--mesh", "8", "--max-new-tokens", "12", "--temperature", "1.0"]
    mine = ["--prompt", "The river", "--seed", "3"]
    other = ["--prompt", "A mountain", "--seed", "11"]
    port = free_port()
    procs = [_cli(2, 4, port, 0, "--distributed", *common, *mine),
             _cli(2, 4, port, 1, "--distributed", *common, *other)]
    single = _cli(1, 8, 0, 0, *common, *mine)
    outputs = []
    try:
        for p in (*procs, single):
            outputs.append(p.communicate(timeout=600))
    finally:
        for p in (*procs, single):
            p.kill()
    for p, (_, stderr) in zip((*procs, single), outputs):
        assert p.returncode == 0, stderr[-3000:]
    (out0, err0), (out1, err1), (want, _) = outputs
    assert out0 == want and want.strip(), (out0, want)
    assert out1 == "" and err1.strip() == "", (out1, err1)
    assert err0.strip().startswith("[") and len(err0.strip().splitlines()) == 1, err0
