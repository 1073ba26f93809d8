"""The HLO collective counter (``jamba_jax.hlo_stats``): bytes and counts on a hand-made HLO module, and the
collectives of the sharded decode step on 8 fake CPU devices against those the sharding rules imply, counted
from the layer plan. The compiles run in a fresh process (``python tests/test_hlo_collectives.py``): the
fake device count is fixed when JAX starts."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jamba_jax.hlo_stats import collective_seconds, collective_table, collectives, shape_bytes

# A while loop of 3 iterations holding an async all-reduce (bf16), an async all-gather (iota groups of 4)
# and a reduce-scatter wrapped in async-start / async-done; at the top level a two-buffer all-reduce over
# every device (empty groups), an all-to-all in groups of 2, an all-reduce whose operand is printed with its
# shape, one with mesh-axis replica groups, a collective-permute, and a loop of unknown trip count.
HLO = """HloModule jit_step, is_scheduled=true, num_partitions=8

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(%x, %y)
}

%wrapped_reduce_scatter (p: f32[64]) -> f32[32] {
  %p = f32[64]{0} parameter(0)
  ROOT %rs = f32[32]{0} reduce-scatter(%p), channel_id=3, replica_groups={{0,1},{2,3},{4,5},{6,7}}, dimensions={0}, to_apply=%add
}

%body (state: (s32[], bf16[4,8], f32[2,16])) -> (s32[], bf16[4,8], f32[2,16]) {
  %state = (s32[], bf16[4,8]{1,0}, f32[2,16]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%state), index=0
  %h = bf16[4,8]{1,0} get-tuple-element(%state), index=1
  %g = f32[2,16]{1,0} get-tuple-element(%state), index=2
  %ars = bf16[4,8]{1,0} all-reduce-start(%h), channel_id=1, replica_groups=[2,4]<=[8], to_apply=%add
  %ard = bf16[4,8]{1,0} all-reduce-done(%ars)
  %ags = (f32[2,16]{1,0}, f32[8,16]{1,0}) all-gather-start(%g), channel_id=2, replica_groups=[2,4]<=[2,4]T(1,0), dimensions={0}
  %agd = f32[8,16]{1,0} all-gather-done(%ags)
  %flat = f32[128]{0} bitcast(%agd)
  %half = f32[64]{0} slice(%flat), slice={[0:64]}
  %rs-start = ((f32[64]{0}), f32[32]{0}) async-start(%half), calls=%wrapped_reduce_scatter
  %rs-done = f32[32]{0} async-done(%rs-start), calls=%wrapped_reduce_scatter
  ROOT %next = (s32[], bf16[4,8]{1,0}, f32[2,16]{1,0}) tuple(%i, %ard, %g)
}

%cond (state.1: (s32[], bf16[4,8], f32[2,16])) -> pred[] {
  %state.1 = (s32[], bf16[4,8]{1,0}, f32[2,16]{1,0}) parameter(0)
  %j = s32[] get-tuple-element(%state.1), index=0
  %n = s32[] constant(3)
  ROOT %lt = pred[] compare(%j, %n), direction=LT
}

%body.2 (v: f32[8]) -> f32[8] {
  %v = f32[8]{0} parameter(0)
  ROOT %cp = f32[8]{0} collective-permute(%v), channel_id=7, source_target_pairs={{0,1},{1,0}}
}

%cond.2 (v.1: f32[8]) -> pred[] {
  %v.1 = f32[8]{0} parameter(0)
  ROOT %t = pred[] constant(false)
}

ENTRY %main (a: bf16[4,8], b: f32[2,16], c: f32[8], d: bf16[8], e: s8[6,10]) -> f32[8] {
  %a = bf16[4,8]{1,0} parameter(0)
  %b = f32[2,16]{1,0} parameter(1)
  %c = f32[8]{0} parameter(2)
  %d = bf16[8]{0} parameter(3)
  %e = s8[6,10]{1,0} parameter(4)
  %zero = s32[] constant(0)
  %init = (s32[], bf16[4,8]{1,0}, f32[2,16]{1,0}) tuple(%zero, %a, %b)
  %loop = (s32[], bf16[4,8]{1,0}, f32[2,16]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %pair = (f32[8]{0}, bf16[8]{0}) all-reduce(%c, %d), channel_id=4, replica_groups={}, to_apply=%add
  %a2a = s8[6,10]{1,0} all-to-all(%e), channel_id=5, replica_groups={{0,1},{2,3},{4,5},{6,7}}, dimensions={0}
  %typed = bf16[8]{0} all-reduce(bf16[8]{0} %d), channel_id=8, replica_groups=[4,2]<=[8], to_apply=%add
  %meshed = f32[8]{0} all-reduce(%c), channel_id=9, replica_groups=mesh['axis_0'=2,'axis_1'=1,'axis_2'=4], device_ids=([2,4]T(1,0)) {'axis_0','axis_2'}, use_global_device_ids=true, to_apply=%add
  %cps = (f32[8]{0}, f32[8]{0}, u32[], u32[]) collective-permute-start(%c), channel_id=6, source_target_pairs={{0,1},{1,0}}
  %cpd = f32[8]{0} collective-permute-done(%cps)
  ROOT %tail = f32[8]{0} while(%cpd), condition=%cond.2, body=%body.2
}
"""


def test_shape_bytes():
    assert shape_bytes("bf16[4,8]{1,0}") == 64
    assert shape_bytes("(f32[8]{0}, bf16[8]{0}, s8[3])") == 32 + 16 + 3
    assert shape_bytes("f32[]") == 4 and shape_bytes("token[]") == 0 and shape_bytes("f8e4m3fn[10]") == 10


def test_hand_made_module():
    found = {c.name: c for c in collectives(HLO)}
    assert set(found) == {"ars", "ags", "rs", "pair", "a2a", "typed", "meshed", "cps", "cp"}  # no -done halves
    expect = {  # kind, bytes per run, group, runs
        "ars": ("all-reduce", 4 * 8 * 2, 4, 3),
        "ags": ("all-gather", 2 * 16 * 4 * 4, 4, 3),  # the gathered result: operand x group
        "rs": ("reduce-scatter", 64 * 4, 2, 3),  # once, though async-start and async-done both call it
        "pair": ("all-reduce", 8 * 4 + 8 * 2, 8, 1),  # empty groups: all num_partitions devices
        "a2a": ("all-to-all", 60, 2, 1),
        "typed": ("all-reduce", 16, 2, 1),
        "meshed": ("all-reduce", 32, 8, 1),  # the product of the named mesh axes
        "cps": ("collective-permute", 8 * 4, 2, 1),
        "cp": ("collective-permute", 8 * 4, 2, 1),
    }
    for name, (kind, nbytes, group, runs) in expect.items():
        c = found[name]
        assert (c.kind, c.bytes, c.group, c.count) == (kind, nbytes, group, runs), c
    assert found["cp"].count_exact is False and found["ars"].count_exact is True  # a loop without trip count
    assert found["ars"].bus_bytes == 2 * 3 / 4 * 64 and found["pair"].bus_bytes == 2 * 7 / 8 * 48
    assert found["ags"].bus_bytes == 3 / 4 * 512 and found["cp"].bus_bytes == 32
    rows = {(r["kind"], r["group"], r["dtype"]): r for r in collective_table(list(found.values()))}
    assert rows[("all-reduce", 4, "bf16")]["count"] == 3 and rows[("all-reduce", 4, "bf16")]["bytes"] == 192
    assert rows[("all-reduce", 8, "bf16,f32")]["bytes"] == 48
    assert rows[("collective-permute", 2, "f32")]["count"] == 2
    assert not rows[("collective-permute", 2, "f32")]["count_exact"]
    total_bus = sum(c.count * c.bus_bytes for c in found.values())
    assert collective_seconds(list(found.values()), 1e9, latency=1e-6) == pytest.approx(total_bus / 1e9 + 15e-6)


def test_unknown_operand_is_an_error():
    bad = HLO.replace("all-to-all(%e)", "all-to-all(%nowhere)")
    with pytest.raises(ValueError, match="nowhere"):
        collectives(bad)


# ---- the sharded decode step on 8 fake CPU devices --------------------------------------------------------

def small_config():
    """Layers M+MoE, A+MLP, M+MoE, A+MLP, M+MoE: two scanned blocks of two layers and a one-layer tail; 8
    experts, 8 heads and 8 kv heads (every split divides on both meshes)."""
    from jamba_jax import JambaConfig

    return dataclasses.replace(
        JambaConfig.named("jamba-tiny"), num_hidden_layers=5, attn_layer_period=2, attn_layer_offset=1,
        expert_layer_period=2, expert_layer_offset=0, num_experts=8, num_attention_heads=8,
        num_key_value_heads=8, hidden_size=64, intermediate_size=64, vocab_size=128)


def expected_collectives(config, expert: int, tensor: int) -> dict:
    """The decode step's collectives (fp32, batch 1) that the sharding rules imply, as ``collective_table``
    rows keyed by (kind, group): one all-reduce of the embedding row (vocab split over ``tensor``); per
    Mamba layer, one of x_proj's output (its d_inner rows split) and one of out_proj's (rows split); per
    attention layer one of o_proj's, per dense MLP one of down_proj's (rows split); per MoE layer one
    ``psum`` over ``expert`` x ``tensor``. The logits stay split by vocab: no collective."""
    h, f32 = config.hidden_size, 4
    mamba = config.num_mamba_layers
    attention = config.num_attention_layers
    moe = sum(is_moe for _, is_moe in config.layer_plan)
    dense = config.num_hidden_layers - moe
    x_proj = config.mamba_dt_rank + 2 * config.mamba_d_state
    rows: dict[tuple, dict] = {}

    def add(group, count, nbytes):
        row = rows.setdefault(("all-reduce", group), {"count": 0, "bytes": 0})
        row["count"] += count
        row["bytes"] += nbytes

    add(tensor, 1 + 2 * mamba + attention + dense, f32 * (h + mamba * (x_proj + h) + attention * h + dense * h))
    add(expert * tensor, moe, f32 * moe * h)
    return rows


def _child():
    """Runs in a fresh process with 8 fake CPU devices; prints one JSON line."""
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    import io
    from contextlib import redirect_stdout

    import jamba_jax
    from jamba_jax.cli import main
    from jamba_jax.memory_plan import compile_plan, plan_devices

    devices, found = plan_devices(8)
    config = small_config()
    out = {"found": found, "platform": devices[0].platform, "meshes": {}}
    for expert, tensor in ((2, 4), (1, 8)):
        mesh = jamba_jax.make_mesh(8, expert=expert, devices=devices)
        plan, programs = compile_plan(config, mesh, context=64, dtype="float32", chunk=16)
        rows = collective_table(collectives(programs["decode"].as_text()))
        out["meshes"][f"{expert}x{tensor}"] = {"compiler": plan["compiler"], "rows": rows}
    text = io.StringIO()
    with redirect_stdout(text):
        code = main(["info", "--config", "jamba-tiny", "--mesh", "2", "--context", "64"])
    out["info"] = {"code": code, "text": text.getvalue()}
    print(json.dumps(out))


@pytest.fixture(scope="module")
def sharded():
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("expert,tensor", [(2, 4), (1, 8)])
def test_sharded_decode_collectives(sharded, expert, tensor):
    """(data, expert, tensor) = (1, 2, 4) and (1, 1, 8): the compiled decode step's collectives are exactly
    those of ``expected_collectives`` (count per step, loop trip counts applied, and bytes)."""
    result = sharded["meshes"][f"{expert}x{tensor}"]
    got: dict[tuple, dict] = {}
    for r in result["rows"]:
        assert r["count_exact"] and r["dtype"] == "f32", r
        row = got.setdefault((r["kind"], r["group"]), {"count": 0, "bytes": 0})
        row["count"] += r["count"]
        row["bytes"] += r["bytes"]
    assert got == expected_collectives(small_config(), expert, tensor)
    assert result["compiler"] == "cpu fp32 proxy"


def test_info_mesh_says_which_compiler(sharded):
    assert sharded["found"] == "fake cpu devices" and sharded["platform"] == "cpu"
    assert sharded["info"]["code"] == 0
    assert "compiled by" in sharded["info"]["text"] and "cpu fp32 proxy" in sharded["info"]["text"]


@pytest.mark.slow
def test_gpu_mesh_plan_dry_run(tmp_path):
    """``benchmarks/gpu_mesh_plan.py --dry-run``: the GPU script's code on 8 fake CPU devices. The mocked GPU
    topology fails without a GPU and is recorded; the CPU devices then compile every plan, and each saved
    decode HLO recounts to the collectives in the JSON."""
    import gzip

    out = tmp_path / "plan.json"
    root = Path(__file__).parent.parent
    proc = subprocess.run([sys.executable, "benchmarks/gpu_mesh_plan.py", "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    mock, cpu = data["providers"]
    assert mock["provider"] == "mock-topology" and not mock["compiled"] and "no GPU" in mock["errors"][0]["error"]
    assert cpu["provider"] == "cpu" and len(cpu["compiled"]) == 4 and not cpu["errors"] and not data["missing"]
    for plan in data["plans"]:
        assert plan["compiler"] == "cpu fp32 proxy"
        resident = plan["params_bytes"] + plan["cache_bytes"]
        assert plan["prefill_peak_bytes"] > resident and plan["decode_peak_bytes"] > resident
        assert 0 < plan["decode_weight_read_bytes"] <= plan["params_bytes"] and plan["weight_read_floor_s"] > 0
        with gzip.open(tmp_path / "plan_hlo" / f"{plan['plan']}.decode.hlo.gz", "rt") as f:
            assert collective_table(collectives(f.read())) == plan["collectives"]
        devices = math.prod(plan["mesh"].values())
        assert (plan["collective_count"] > 0) == (devices > 1), plan["plan"]


if __name__ == "__main__":
    _child()
