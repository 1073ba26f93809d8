"""ExpertsInt8: quantized feed-forward weights, the int8 kernel inside the MoE, accuracy against bf16, load()."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec

import jamba_jax
from jamba_jax import JambaConfig, JambaLM, Kernels
from jamba_jax.moe import experts_ffn
from jamba_jax.params import is_quantized
from helpers import rel_err, scaled_params
from jamba_jax.quant import (QuantizedWeight, pallas_config, quantize, quantize_params,
                             quantized_sharding)

TINY = JambaConfig.named("jamba-tiny")
# 3 layers: a scanned block of two (Mamba + MoE, attention + dense MLP) and a 1-layer tail (Mamba + MoE).
SMALL = dataclasses.replace(TINY, hidden_size=32, intermediate_size=64, vocab_size=128, num_hidden_layers=3,
                            attn_layer_period=2, attn_layer_offset=1, expert_layer_offset=0)
# The released layer plan on 10 layers: stacked and tail copies of both the dense MLP and the MoE.
PLAN = dataclasses.replace(TINY, num_hidden_layers=10)


def rms_err(got, ref):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.sqrt(np.mean((got - ref) ** 2) / np.mean(ref ** 2)))


def test_quantize_params_layout_round_trip_and_bytes():
    params = scaled_params(PLAN, 0, jnp.bfloat16)
    qparams = quantize_params(params, PLAN)
    flat, qflat = traverse_util.flatten_dict(params), traverse_util.flatten_dict(qparams)
    assert set(flat) == set(qflat)
    kinds = set()
    for path, w in flat.items():
        qw = qflat[path]
        if not is_quantized(path):
            assert qw is w, path  # everything else untouched
            continue
        kinds.add((path[0], path[-2]))
        assert isinstance(qw, QuantizedWeight), path
        assert qw.q.dtype == jnp.int8 and qw.q.shape == w.shape
        assert qw.scale.dtype == jnp.float32 and qw.scale.shape == w.shape[:-2] + w.shape[-1:]
        q = np.asarray(qw.q, np.int32)
        assert np.abs(q).max() <= 127
        scale = np.asarray(qw.scale, np.float64)[..., None, :]
        err = np.abs(q * scale - np.asarray(w, np.float64))
        assert np.all(err <= scale * (0.5 + 1e-5)), path  # within half a quantization step
        # bf16 -> int8: exactly half the bytes, plus one fp32 scale per (expert, output channel).
        assert qw.q.nbytes * 2 == w.nbytes
        assert qw.scale.nbytes == 4 * w.size // w.shape[-2]
        assert qw.nbytes == qw.q.nbytes + qw.scale.nbytes
    # stacked and tail copies of the expert weights and of the dense MLP kernels
    assert kinds == {("blocks", "experts"), ("tail", "experts"), ("blocks", "gate_proj"), ("blocks", "up_proj"),
                     ("blocks", "down_proj"), ("tail", "gate_proj"), ("tail", "up_proj"), ("tail", "down_proj")}
    again = traverse_util.flatten_dict(quantize_params(qparams, PLAN))  # idempotent
    assert all(again[p] is qflat[p] for p in qflat)
    assert quantize_params(params, PLAN, None) is params
    with pytest.raises(ValueError, match="experts-int8"):
        quantize_params(params, PLAN, "int4")
    with pytest.raises(ValueError, match="12 layers"):
        quantize_params(params, dataclasses.replace(PLAN, num_hidden_layers=12))


def test_quantized_weight_shards_like_the_weight():
    mesh = jax.make_mesh((1, 1), ("experts", "model"))
    w = jax.random.normal(jax.random.key(0), (2, 4, 32, 16), jnp.float32)  # [blocks, experts, in, out]
    for spec, scale_spec in [(PartitionSpec(None, "experts", None, "model"), PartitionSpec(None, "experts", "model")),
                             (PartitionSpec(None, "experts", "model"), PartitionSpec(None, "experts", None)),
                             (PartitionSpec("experts"), PartitionSpec("experts", None, None))]:
        sharding = NamedSharding(mesh, spec)
        expected = quantized_sharding(sharding, w.ndim)
        assert expected.q == sharding and expected.scale == NamedSharding(mesh, scale_spec)
        qw = quantize(jax.device_put(w, sharding))
        assert qw.q.sharding.is_equivalent_to(expected.q, 4)
        assert qw.scale.sharding.is_equivalent_to(expected.scale, 3)


def _expert_inputs(tokens, expert_ids, num_experts=6, hidden=32, inter=40, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((tokens, hidden)), jnp.float32)
    ids = jnp.asarray(expert_ids, jnp.int32)
    weights = jnp.asarray(rng.uniform(0.1, 1.0, ids.shape), jnp.float32)
    projs = [rng.standard_normal(s).astype(np.float32) / np.sqrt(s[1])
             for s in ((num_experts, hidden, inter), (num_experts, hidden, inter), (num_experts, inter, hidden))]
    return x, ids, weights, [quantize(jnp.asarray(p)) for p in projs]


# expert ids [tokens, k] over 6 experts, covering the three kernel designs that ``pallas_config`` picks:
# one decode token (2 rows: "tile"); 5 tokens ("item") with experts 0 and 4 empty, a 1-row group (2) and
# several rows (1, 3); 10 tokens ("group") all on two experts (4 of the 6 empty).
ROUTINGS = [[[5, 1]], [[1, 3], [3, 5], [1, 2], [5, 3], [1, 5]], [[3, 2], [2, 3], [3, 2], [3, 3], [2, 2]] * 2]


@pytest.mark.parametrize("routing", range(len(ROUTINGS)))
def test_int8_kernel_matches_xla_inside_the_moe(routing):
    ids = ROUTINGS[routing]
    x, expert_ids, weights, projs = _expert_inputs(len(ids), ids, seed=routing)
    assert pallas_config(2 * len(ids), 32, 40)["design"] == ("tile", "item", "group")[routing]
    run = jax.jit(experts_ffn, static_argnames="impl")
    xla = np.asarray(run(x, expert_ids, weights, *projs, impl="xla"))
    kernel = np.asarray(run(x, expert_ids, weights, *projs, impl="pallas-interpret"))
    assert rel_err(kernel, xla) < 1e-5
    # off GPU, "pallas" is the XLA path
    np.testing.assert_array_equal(np.asarray(run(x, expert_ids, weights, *projs, impl="pallas")), xla)
    # the int8 path computes the float MoE of the dequantized weights
    dequantized = [p.dequantize() for p in projs]
    assert rel_err(xla, run(x, expert_ids, weights, *dequantized)) < 1e-5
    with pytest.raises(ValueError, match="Kernels.moe_int8 'triton'"):
        experts_ffn(x, expert_ids, weights, *projs, impl="triton")


def test_model_int8_kernel_matches_xla():
    """The whole model in fp32 with int8 weights: the Pallas kernel (interpret mode) equals the XLA path.
    6 (token, choice) rows over 8 experts: at least two experts get no rows, the others one or two."""
    config = dataclasses.replace(SMALL, num_experts=8)
    params = quantize_params(scaled_params(config, 1), config)
    ids = np.random.default_rng(1).integers(1, config.vocab_size, (1, 3))

    def logits(impl):
        return np.asarray(jax.jit(lambda p, i: JambaLM(config, kernels=Kernels(moe_int8=impl)).apply({"params": p}, i))(params, ids))

    assert rel_err(logits("pallas-interpret"), logits("xla")) < 1e-5


def test_int8_logit_error_at_most_twice_bf16():
    """Against the fp32 model, the bf16 model with int8 feed-forward weights (quantized from the bf16
    weights, as ``load(dtype="bfloat16", quantize=...)`` does) is at most 2x further off than the bf16
    model, averaged over seeds; by the max error (the README's measure) and by the RMS error."""
    errs = {"bf16": [], "int8": []}
    rms = {"bf16": [], "int8": []}
    for seed in range(4):
        fp32 = jamba_jax.Jamba(SMALL, scaled_params(SMALL, seed))
        bf16 = fp32.replace(params=jax.tree.map(lambda p: p.astype(jnp.bfloat16), fp32.params))
        int8 = bf16.replace(params=quantize_params(bf16.params, SMALL), quantize="experts-int8")
        ids = np.random.default_rng(seed).integers(1, SMALL.vocab_size, (2, 16))
        ref = np.asarray(jamba_jax.forward(fp32, ids))
        for name, model in (("bf16", bf16), ("int8", int8)):
            got = np.asarray(jamba_jax.forward(model, ids).astype(jnp.float32))
            errs[name].append(rel_err(got, ref))
            rms[name].append(rms_err(got, ref))
    assert np.mean(errs["int8"]) <= 2 * np.mean(errs["bf16"]), errs
    assert np.mean(rms["int8"]) <= 2 * np.mean(rms["bf16"]), rms


def assert_same_params(got, expected):
    """Same tree, same leaf types, bitwise-equal arrays."""
    got, expected = traverse_util.flatten_dict(got), traverse_util.flatten_dict(expected)
    assert set(got) == set(expected)
    for path, leaf in got.items():
        assert type(leaf) is type(expected[path]), path
        for a, b in zip(jax.tree.leaves(leaf), jax.tree.leaves(expected[path])):
            assert a.dtype == b.dtype, path
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg="/".join(path))


def test_load_and_convert_quantize(tmp_path):
    from hf_reference import make_checkpoint

    hf = tmp_path / "hf"
    make_checkpoint(hf, seed=0, vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                    attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=0,
                    mamba_d_state=4, mamba_d_conv=4, mamba_expand=2)
    plain = jamba_jax.load(hf, dtype="bfloat16")
    model = jamba_jax.load(hf, dtype="bfloat16", quantize="experts-int8", kernels=Kernels(moe_int8="pallas"))
    assert model.quantize == "experts-int8" and model.kernels.moe_int8 == "pallas" and plain.quantize is None
    assert model.dtype == jnp.bfloat16
    assert_same_params(model.params, quantize_params(plain.params, plain.config))
    quantized = sum(isinstance(leaf, QuantizedWeight) for leaf in traverse_util.flatten_dict(model.params).values())
    assert quantized == 9  # two MoE layers (one stacked, one tail) and a dense MLP, 3 projections each
    with pytest.raises(ValueError, match="unknown quantize='int4'.*experts-int8"):
        jamba_jax.load(hf, quantize="int4")
    with pytest.raises(ValueError, match="unknown kernels 'cuda'"):
        jamba_jax.load(hf, kernels="cuda")
    with pytest.raises(ValueError, match="Kernels.moe_int8 'cuda'"):
        model.with_kernels(Kernels(moe_int8="cuda"))

    # `jamba convert --quantize experts-int8`: int8 + scales in the Orbax checkpoint, restored as they are.
    from jamba_jax.cli import main

    out = tmp_path / "converted"
    assert main(["convert", str(hf), str(out), "--dtype", "bfloat16", "--quantize", "experts-int8"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quantization"] == "experts-int8" and manifest["dtype"] == "bfloat16"
    entry = manifest["params"]["blocks/layer_0/feed_forward/experts/gate_proj/scale"]
    assert entry["dtype"] == "float32" and entry["shape"] == [1, 4, 48]
    assert manifest["params"]["tail/layer_0/feed_forward/experts/down_proj/q"]["dtype"] == "int8"
    assert "blocks/layer_0/feed_forward/experts/gate_proj" not in manifest["params"]
    restored = jamba_jax.load(out)  # no quantize= needed: the checkpoint is quantized
    assert restored.quantize == "experts-int8" and restored.dtype == jnp.bfloat16
    assert_same_params(restored.params, model.params)
    # onto a mesh: each scale sharded like its weight minus the contraction axis
    mesh = jax.make_mesh((1,), ("experts",))
    experts = NamedSharding(mesh, PartitionSpec(None, "experts", None, None))
    sharded = jamba_jax.load(out, mesh=mesh, shardings=lambda path, sds: experts if len(sds.shape) == 4 else None)
    gate = sharded.params["blocks"]["layer_0"]["feed_forward"]["experts"]["gate_proj"]
    assert gate.q.sharding.spec == experts.spec and gate.scale.sharding.spec == PartitionSpec(None, "experts", None)
    assert_same_params(sharded.params, model.params)
    # int8 weights cannot go back to HF safetensors
    assert main(["convert", "--to-hf", str(out), str(tmp_path / "back")]) == 2
    assert main(["convert", "--to-hf", str(out), str(tmp_path / "back"), "--quantize", "experts-int8"]) == 2
    assert not (tmp_path / "back").exists()
