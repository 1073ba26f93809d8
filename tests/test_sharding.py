"""Sharding on 8 fake CPU devices (each check in a fresh process, ``tests/sharded_checks.py``): sharded
forward and greedy generation equal the single-device run; params are split as the rules say; the memory
plan. The rules themselves are checked in-process on an abstract mesh."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from flax import traverse_util
from jax.sharding import AbstractMesh, PartitionSpec

import jamba_jax
from jamba_jax import JambaConfig, abstract_params
from jamba_jax.params import param_logical_axes
from jamba_jax.sharding import MESH_AXES, cache_shardings, spec_for

TOL = 1e-5
CHECKS = Path(__file__).with_name("sharded_checks.py")


def run_check(*args, timeout=900):
    proc = subprocess.run([sys.executable, str(CHECKS), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=CHECKS.parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def abstract_mesh(data=1, expert=1, tensor=8):
    return AbstractMesh((data, expert, tensor), MESH_AXES)


def test_every_param_has_rules_and_large_ones_split_8_ways():
    """Jamba-1.5-Mini on an 8-way tensor mesh: every matrix of attention, Mamba, the MoE and the MLPs,
    and the embedding / LM head, is split 8 ways; only norms, biases of the hidden width, the router and
    the small dt/B/C norms stay whole."""
    config = JambaConfig.named("jamba-1.5-mini")
    mesh = abstract_mesh()
    whole = []
    for path, a in traverse_util.flatten_dict(abstract_params(config)).items():
        spec = spec_for(mesh, a.shape, param_logical_axes(path, a.ndim))
        if "tensor" not in spec:
            whole.append("/".join(path[-2:]))
            assert a.size <= config.hidden_size * config.num_experts * config.num_blocks, path
    assert set(whole) == {"input_layernorm/weight", "pre_ff_layernorm/weight", "dt_layernorm/weight",
                          "b_layernorm/weight", "c_layernorm/weight", "router/kernel", "final_layernorm/weight"}
    # Experts over "expert" and "tensor" together on a 2 x 4 mesh.
    mesh = abstract_mesh(expert=2, tensor=4)
    gate = ("blocks", "layer_1", "feed_forward", "experts", "gate_proj")
    assert spec_for(mesh, (4, 16, 4096, 14336), param_logical_axes(gate, 4)) == PartitionSpec(
        None, "expert", None, "tensor")


def test_rules_replicate_what_does_not_divide():
    mesh = abstract_mesh(tensor=8)
    assert spec_for(mesh, (1, 12, 4, 32), ("batch", "seq", "kv_heads", "head_dim")) == PartitionSpec(
        None, None, None, None)  # 4 kv heads on 8 devices
    assert spec_for(mesh, (1, 12, 16, 32), ("batch", "seq", "kv_heads", "head_dim")) == PartitionSpec(
        None, None, "tensor", None)
    with pytest.raises(ValueError, match="rank"):
        spec_for(mesh, (2, 3), ("batch",))


def test_cache_shardings_by_kv_heads_and_channels():
    config = JambaConfig.named("jamba-1.5-mini")
    mesh = jamba_jax.make_mesh(1)
    cache = jamba_jax.cache.cache_shapes(config, 1, 1024)
    specs = jax.tree.map(lambda s: s.spec, cache_shardings(mesh, cache))
    layer = specs["blocks"]["layer_0"]
    assert layer["ssm"] == PartitionSpec(None, None, None, None)  # one device: nothing split
    mesh = abstract_mesh()
    k = cache["blocks"]["layer_4"]["key"]
    assert spec_for(mesh, k.shape, ("layers", "batch", "kv_heads", "seq", "head_dim"))[2] == "tensor"


def test_make_mesh_sizes_and_errors():
    mesh = jamba_jax.make_mesh(1)
    assert dict(mesh.shape) == {"data": 1, "expert": 1, "tensor": 1}
    with pytest.raises(ValueError, match="devices"):
        jamba_jax.make_mesh(len(jax.devices()) + 1)
    with pytest.raises(ValueError, match="expert=3"):
        jamba_jax.make_mesh(1, expert=3)


@pytest.fixture(scope="module")
def suite():
    return run_check("suite")


def test_sharded_forward_equals_one_device(suite):
    """Meshes 8 (tensor), 2 x 4 (tensor x expert) and 2 x 2 x 2 (data x expert x tensor), fp32; 4 x 2 in
    the slow test below."""
    assert max(suite["forward"].values()) <= TOL, suite["forward"]


@pytest.mark.slow
def test_sharded_forward_4x2_and_int8_2x4():
    errors = run_check("forward", "4x2") | {"int8 " + k: v for k, v in run_check("forward", "2x4", "experts-int8").items()}
    assert max(errors.values()) <= TOL, errors


def test_sharded_int8_forward_equals_one_device(suite):
    """ExpertsInt8 weights sharded like the weights they replace; the expert-parallel MoE (4 x 2)."""
    assert max(suite["int8"].values()) <= TOL, suite["int8"]


def test_sharded_greedy_generate_equals_one_device(suite):
    assert suite["generate"]["equal"], suite["generate"]


def test_params_split_as_the_rules_say(suite):
    """From ``addressable_shards`` on a 4 (tensor) x 2 (expert) mesh: how many distinct shards each
    param has."""
    ways = suite["placement"]
    layer0, layer1 = "blocks/layer_0", "blocks/layer_1"
    assert ways[f"{layer0}/feed_forward/experts/gate_proj"] == 8  # experts over 2, hidden width over 4
    assert ways[f"{layer0}/feed_forward/experts/down_proj"] == 8
    assert ways[f"{layer0}/mamba/in_proj/kernel"] == 4  # d_inner over tensor
    assert ways[f"{layer0}/mamba/A_log"] == ways[f"{layer0}/mamba/out_proj/kernel"] == 4
    assert ways[f"{layer1}/self_attn/q_proj/kernel"] == ways[f"{layer1}/self_attn/k_proj/kernel"] == 4
    assert ways[f"{layer1}/feed_forward/gate_proj/kernel"] == 4
    assert ways["embed_tokens/embedding"] == ways["lm_head/kernel"] == 4
    assert ways[f"{layer0}/feed_forward/router/kernel"] == ways["final_layernorm/weight"] == 1


@pytest.mark.slow
def test_sharded_pallas_kernels_per_shard():
    """The interpret-mode scan and attention kernels under ``shard_map`` (one call per shard)."""
    errors = run_check("forward", "4x2", "", "pallas-interpret")
    assert max(errors.values()) <= TOL, errors


@pytest.mark.slow
def test_load_onto_a_mesh(tmp_path):
    """``jamba_jax.load(HF_DIR, mesh=)``: each leaf placed by the rules as it is read; logits as on one device."""
    result = run_check("load", "2x4", str(tmp_path / "hf"))
    assert result["rel_err"] <= TOL and result["mesh"], result
    assert result["in_proj_spec"] == ["None", "None", "None", "tensor"], result


def test_info_mesh_bad_arguments(capsys):
    from jamba_jax.cli import main

    assert main(["info", "--config", "jamba-tiny", "--mesh", "3", "--expert", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--expert" in err[0]


@pytest.mark.slow
def test_memory_plan_large_int8_fits_80gb_bf16_does_not():
    """The Jamba-1.5 paper's claim, from the compiled plan on 8 devices at 256K context, batch 1."""
    int8 = run_check("plan", "jamba-1.5-large", "experts-int8", "262144", "8", timeout=3600)
    bf16 = run_check("plan", "jamba-1.5-large", "", "262144", "8", timeout=3600)
    assert int8["peak"] < 80e9, int8
    assert bf16["params"] > 95e9, bf16
