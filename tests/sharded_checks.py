"""Sharded runs on fake CPU devices, in a fresh process (the device count is fixed when JAX starts).

    python tests/sharded_checks.py CHECK [ARGS...]   ->   one JSON object on the last line of stdout

Used by ``tests/test_sharding.py``; every check compares against the same model run on one device.
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import dataclasses  # noqa: E402
import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jamba_jax  # noqa: E402
from jamba_jax import JambaConfig  # noqa: E402
from jamba_jax.sharding import param_shardings  # noqa: E402
from helpers import random_params, rel_err  # noqa: E402

# Layer 0: Mamba + MoE (8 experts, top-2), layer 1: attention (8 heads, 4 kv heads) + dense MLP; one block.
CONFIG = dataclasses.replace(
    JambaConfig.named("jamba-tiny"), num_hidden_layers=2, attn_layer_period=2, attn_layer_offset=1,
    expert_layer_period=2, expert_layer_offset=0, num_experts=8, num_attention_heads=8, num_key_value_heads=4,
    hidden_size=64, intermediate_size=64, vocab_size=128)
MESHES = {"8x1": dict(tensor=8), "4x2": dict(tensor=4, expert=2), "2x4": dict(tensor=2, expert=4),
          "dp2": dict(data=2, tensor=2, expert=2)}


def inputs():
    ids = np.random.default_rng(0).integers(1, CONFIG.vocab_size, (2, 12)).astype(np.int32)
    mask = np.ones(ids.shape, bool)
    mask[0, :3] = False
    return ids, mask


def sharded(model, mesh_name):
    mesh = jamba_jax.make_mesh(8, **MESHES[mesh_name])
    return model.replace(params=jax.device_put(model.params, param_shardings(mesh, model.params)), mesh=mesh)


def check_forward(mesh_names: str, quantize: str = "", kernels: str = "xla"):
    """Forward logits of each mesh against one device; also with int8 experts or interpret-mode kernels."""
    params = random_params(CONFIG)
    if quantize:
        params = jamba_jax.quantize_params(params, CONFIG)
    model = jamba_jax.Jamba(CONFIG, params, quantize=quantize or None).with_kernels(kernels)
    ids, mask = inputs()
    ref = jamba_jax.forward(model.with_kernels("xla"), ids, mask)
    return {name: rel_err(jamba_jax.forward(sharded(model, name), ids, mask), ref, mask)
            for name in mesh_names.split(",")}


def check_generate(mesh_name: str):
    """Greedy tokens (prompts of different lengths, batched) on a mesh and on one device."""
    model = jamba_jax.Jamba(CONFIG, random_params(CONFIG))
    prompts = [[5, 9, 17, 3, 22], [7, 8]]
    ref = jamba_jax.generate(model, prompts, max_new_tokens=6, stop_ids=[]).tokens
    got = jamba_jax.generate(sharded(model, mesh_name), prompts, max_new_tokens=6, stop_ids=[]).tokens
    return {"equal": got == ref, "tokens": got, "reference": ref}


def check_placement(mesh_name: str):
    """How many ways each param is split: devices / (devices holding the same shard), by param path."""
    model = sharded(jamba_jax.Jamba(CONFIG, random_params(CONFIG)), mesh_name)
    flat = jax.tree_util.tree_flatten_with_path(model.params)[0]
    out = {}
    for path, leaf in flat:
        shards = {tuple((s.start, s.stop) for s in shard.index) for shard in leaf.addressable_shards}
        out["/".join(str(getattr(k, "key", k)) for k in path)] = len(shards)
    return out


def check_load(mesh_name: str, directory: str):
    """``jamba_jax.load(mesh=)`` of an HF checkpoint written here: params placed by the rules, forward equal."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from hf_reference import make_checkpoint

    make_checkpoint(directory, **CONFIG.to_dict())
    mesh = jamba_jax.make_mesh(8, **MESHES[mesh_name])
    model = jamba_jax.load(directory, dtype="float32", mesh=mesh)
    ref = jamba_jax.load(directory, dtype="float32")
    ids, mask = inputs()
    in_proj = model.params["blocks"]["layer_0"]["mamba"]["in_proj"]["kernel"]
    return {"rel_err": rel_err(jamba_jax.forward(model, ids, mask), jamba_jax.forward(ref, ids, mask), mask),
            "in_proj_spec": [str(a) for a in in_proj.sharding.spec], "mesh": model.mesh is mesh}


def check_plan(config_name: str, quantize: str, context: str, devices: str):
    from jamba_jax.memory_plan import memory_plan

    mesh = jamba_jax.make_mesh(int(devices))
    return memory_plan(JambaConfig.named(config_name), mesh, context=int(context), quantize=quantize or None)


def check_suite():
    """The default test run's checks in one process (one JAX start)."""
    return {"forward": check_forward("8x1,2x4,dp2"), "int8": check_forward("4x2", "experts-int8"),
            "generate": check_generate("2x4"), "placement": check_placement("4x2")}


if __name__ == "__main__":
    check, *args = sys.argv[1:]
    jnp.zeros(())  # start the backend before printing anything
    print(json.dumps(globals()[f"check_{check}"](*args)))
