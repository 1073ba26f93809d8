"""Training losses and gradients against HF `JambaForCausalLM` (labels + output_router_logits), the
activation loss against torch forward hooks, bit-exact resume, and the bundled demo model."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

import jamba_jax
from jamba_jax import Kernels
from hf_reference import make_checkpoint
from jamba_jax.convert.hf_keys import checkpoint_entries
from jamba_jax.train import TrainCheckpoints, TrainConfig, Trainer, compute_loss, data_mesh, sample_batch
from helpers import random_params, rel_err

# Two MoE configs: a 1-block + tail plan with top-2 and GQA; top-1 with biases and tied embeddings.
# One runs the associative scan, the other the sequential one.
CONFIGS = {
    "top2_tail": dict(vocab_size=61, hidden_size=32, intermediate_size=24, num_hidden_layers=5,
                      num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                      attn_layer_period=4, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=0,
                      mamba_d_state=5, mamba_d_conv=4, mamba_expand=2, router_aux_loss_coef=0.3),
    "top1_bias_tied": dict(vocab_size=50, hidden_size=24, intermediate_size=16, num_hidden_layers=6,
                           num_attention_heads=3, num_key_value_heads=1, num_experts=3, num_experts_per_tok=1,
                           attn_layer_period=3, attn_layer_offset=2, expert_layer_period=3, expert_layer_offset=1,
                           mamba_d_state=4, mamba_d_conv=3, mamba_expand=1, mamba_dt_rank=3, mamba_proj_bias=True,
                           tie_word_embeddings=True, router_aux_loss_coef=0.05),
}
SCAN = {"top2_tail": "associative", "top1_bias_tied": "sequential"}
LENGTHS = (11, 7, 11)  # right-padded rows (HF's labels -100 on padding)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, tmp_path_factory):
    """HF's loss, aux loss, gradients and mean squared Mamba/feed-forward output (torch forward hooks),
    and ours (one compiled value-and-grad at alpha = 0)."""
    directory = tmp_path_factory.mktemp(request.param)
    hf = make_checkpoint(directory, seed=3, max_shard_size=None, **CONFIGS[request.param])
    ours = jamba_jax.load(directory, dtype="float32")
    rng = np.random.default_rng(0)
    mask = np.zeros((len(LENGTHS), max(LENGTHS)), np.int64)
    for row, n in enumerate(LENGTHS):
        mask[row, :n] = 1
    ids = np.where(mask == 1, rng.integers(1, ours.config.vocab_size, mask.shape), 0)

    acts = []
    hooks = [m.register_forward_hook(lambda mod, args, out: acts.append(out[0] if isinstance(out, tuple) else out))
             for name, m in hf.named_modules() if name.endswith((".mamba", ".feed_forward"))]
    labels = torch.where(torch.as_tensor(mask) == 1, torch.as_tensor(ids), -100)
    out = hf(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), labels=labels,
             output_router_logits=True, use_cache=False)
    out.loss.backward()
    for h in hooks:
        h.remove()
    valid = mask.astype(bool)
    ref = {"loss": out.loss.item(), "aux_loss": out.aux_loss.item(),
           "act_sq": float(np.mean(np.concatenate([a.detach().numpy()[valid].reshape(-1) for a in acts]) ** 2)),
           "grads": {name: p.grad.numpy() for name, p in hf.named_parameters() if p.grad is not None}}

    batch = {"input_ids": jnp.asarray(ids, jnp.int32), "attention_mask": jnp.asarray(mask, bool)}
    tc = TrainConfig(kernels=Kernels(scan=SCAN[request.param]))
    value_and_grad = jax.value_and_grad(lambda p: compute_loss(p, batch, config=ours.config, tc=tc), has_aux=True)
    (loss, metrics), grads = jax.jit(value_and_grad)(ours.params)
    return ours, batch, tc, ref, (loss, metrics, grads)


def test_loss_and_aux_loss_match_hf(case):
    ours, _, _, ref, (loss, m, _) = case
    assert abs(float(m["aux_loss"]) - ref["aux_loss"]) < 1e-5 * ref["aux_loss"]
    assert abs(float(loss) - ref["loss"]) < 1e-5 * ref["loss"]
    # alpha = 0: the LM loss plus the scaled aux loss, to fp32 rounding
    expected = np.float32(m["lm_loss"]) + np.float32(ours.config.router_aux_loss_coef) * np.float32(m["aux_loss"])
    np.testing.assert_allclose(np.float32(loss), expected, rtol=2.0**-23, atol=0)


def hf_grad(grads: dict, key: str) -> np.ndarray:
    """The gradient of checkpoint tensor ``key``; HF holds the experts fused in memory
    (``experts.gate_up_proj [E, 2 * inter, hidden]``, ``experts.down_proj [E, hidden, inter]``)."""
    m = re.fullmatch(r"(.*\.experts)\.(\d+)\.(gate|up|down)_proj\.weight", key)
    if m is None:
        return grads[key]
    prefix, e, proj = m.group(1), int(m.group(2)), m.group(3)
    if proj == "down":
        return grads[f"{prefix}.down_proj"][e]
    gate, up = np.split(grads[f"{prefix}.gate_up_proj"][e], 2, axis=0)
    return gate if proj == "gate" else up


def test_gradients_match_torch_autograd(case):
    ours, _, _, ref, (_, _, grads) = case
    flat = traverse_util.flatten_dict(grads)
    config = ours.config
    moe = next(i for i, (_, is_moe) in enumerate(config.layer_plan) if is_moe)
    mamba = next(i for i, (mixer, _) in enumerate(config.layer_plan) if mixer == "mamba")
    attn = next(i for i, (mixer, _) in enumerate(config.layer_plan) if mixer == "attention")
    keys = ["model.embed_tokens.weight", f"model.layers.{moe}.feed_forward.router.weight",
            f"model.layers.{moe}.feed_forward.experts.1.down_proj.weight",
            f"model.layers.{moe}.feed_forward.experts.0.up_proj.weight", f"model.layers.{mamba}.mamba.A_log",
            f"model.layers.{mamba}.mamba.x_proj.weight", f"model.layers.{mamba}.mamba.conv1d.weight",
            f"model.layers.{attn}.self_attn.k_proj.weight",
            f"model.layers.{config.num_hidden_layers - 1}.pre_ff_layernorm.weight"]
    entries = {e.hf_key: e for e in checkpoint_entries(config)}
    for key in keys:
        e = entries[key]
        got = e.layout.to_hf(np.asarray(flat[e.path])[e.index])
        want = hf_grad(ref["grads"], key)
        assert got.shape == want.shape, key
        assert rel_err(got, want) < 1e-4, key


def test_activation_loss_adds_alpha_mean_square(case):
    ours, batch, tc, ref, (base, m, _) = case
    assert abs(float(m["activation_loss"]) - ref["act_sq"]) < 1e-5 * ref["act_sq"]
    if tc.kernels.scan != "sequential":
        return  # one config compiles the alpha > 0 loss: the term does not depend on the scan
    alpha = 0.01
    loss, m = jax.jit(lambda p: compute_loss(p, batch, config=ours.config,
                                             tc=dataclasses.replace(tc, alpha=alpha)))(ours.params)
    assert abs(float(m["activation_loss"]) - ref["act_sq"]) < 1e-5 * ref["act_sq"]
    # the LM + aux loss of HF, plus alpha times the mean square of HF's activations, to fp32 rounding
    assert abs(float(loss) - (ref["loss"] + alpha * ref["act_sq"])) < 1e-5 * ref["loss"]
    added = float(loss) - float(m["lm_loss"] + ours.config.router_aux_loss_coef * m["aux_loss"])
    assert abs(added - alpha * ref["act_sq"]) < 4 * 2.0**-23 * float(loss) + 1e-5 * alpha * ref["act_sq"]


def test_resume_is_bit_exact(tmp_path):
    """N steps straight equal N/2 steps, save, restore into a fresh state, N/2 steps: bitwise. Runs the
    data-parallel path (a one-device mesh), gradient checkpointing and the activation loss."""
    config = jamba_jax.JambaConfig(vocab_size=40, hidden_size=16, intermediate_size=16, num_hidden_layers=4,
                                   num_attention_heads=2, num_key_value_heads=1, num_experts=2, num_experts_per_tok=1,
                                   attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                                   expert_layer_offset=1, mamba_d_state=4, dtype="float32")
    tc = TrainConfig(steps=4, warmup_steps=2, learning_rate=1e-2, alpha=1e-3, remat=True,
                     kernels=Kernels(scan="sequential"))
    trainer = Trainer(config, tc, mesh=data_mesh(jax.devices()[:1]))
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, 500).astype(np.int32)
    params = random_params(config, 0)

    def run(state, steps):
        for s in steps:
            state, _ = trainer.step(state, sample_batch(tokens, s, 2, 16, seed=1))
        return state

    straight = run(trainer.init_state(params), range(4))
    ckpt = TrainCheckpoints(tmp_path / "state", keep=2)
    half = run(trainer.init_state(params), range(2))
    ckpt.save(half)
    del half
    restored = ckpt.restore(trainer.init_state(params))
    assert int(restored["step"]) == 2
    resumed = run(restored, range(2, 4))
    ckpt.save(resumed)
    assert ckpt.all_steps() == [2, 4]
    ckpt.close()
    assert jax.tree.structure(straight) == jax.tree.structure(resumed)
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(straight["params"]["lm_head"]["kernel"]),
                              np.asarray(params["lm_head"]["kernel"]))


def test_bundled_demo_generates_readable_text():
    from jamba_jax.demo import DEMO_DIR

    model = jamba_jax.load(DEMO_DIR)
    out = jamba_jax.generate(model, "The", max_new_tokens=48)
    text = out.text[0]
    assert len(out.tokens[0]) > 8
    assert all(c.isprintable() or c in "\n\t" for c in text), text
    words = set(re.findall(r"[A-Za-z]{2,}", text))
    assert len(words) >= 5, text


DATA_PARALLEL_SCRIPT = """
import jax, numpy as np
import jamba_jax
from helpers import random_params
from jamba_jax import Kernels
from jamba_jax.train import Trainer, TrainConfig, data_mesh, sample_batch
assert jax.device_count() == 2
config = jamba_jax.JambaConfig(vocab_size=40, hidden_size=16, intermediate_size=16, num_hidden_layers=4,
                               num_attention_heads=2, num_key_value_heads=1, num_experts=2, num_experts_per_tok=1,
                               attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                               expert_layer_offset=1, mamba_d_state=4, dtype="float32")
tc = TrainConfig(steps=4, warmup_steps=1, learning_rate=1e-2, alpha=1e-3, kernels=Kernels(scan="sequential"))
tokens = np.random.default_rng(0).integers(0, 40, 500).astype(np.int32)
params = random_params(config, 0)
states = []
for mesh in (None, data_mesh()):
    trainer = Trainer(config, tc, mesh=mesh)
    state = trainer.init_state(params)
    for s in range(3):
        state, _ = trainer.step(state, sample_batch(tokens, s, 4, 16, 1))
    states.append(state)
for a, b in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1]), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
"""


@pytest.mark.slow
def test_data_parallel_matches_single_device():
    """3 steps with the batch split over 2 (host) devices equal 3 steps on one device, to fp32 rounding."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", DATA_PARALLEL_SCRIPT], cwd=Path(__file__).parent, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
