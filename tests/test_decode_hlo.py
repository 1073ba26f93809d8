"""The compiled decode step of a model of scanned blocks, read from its optimized HLO (``jamba_jax.hlo_stats``):
no kernel writes a whole stacked weight (``[blocks, ...]``) nor a block's whole expert stack
(``[experts, in, out]``) on a step, on the CPU's default decode path and on the slots; the detector finds
the expert-stack copy the tiled loop makes (docs/generate.md); kernels are counted per step, the block
loop's once per block. The counts by kind are printed (``pytest -s``)."""

import collections
import dataclasses

import jax
import jax.numpy as jnp
import pytest

import jamba_jax
from jamba_jax import JambaConfig, hlo_stats
from jamba_jax.cache import init_cache_arrays
from jamba_jax.moe import forced_decode_matmul
from jamba_jax.params import abstract_params
from jamba_jax.steps import ModelSpec, decode_logits

# Three scanned blocks of 4 layers (Mamba, attention + MoE, Mamba, Mamba + MoE); widths chosen so that no
# activation has a weight's shape. 4 experts: batch 1 is 2 rows (the one-row-at-a-time CPU path), batch 2
# is 4 rows (the tiled loop on CPU: more than half the experts).
CONFIG = dataclasses.replace(JambaConfig.named("jamba-tiny"), num_hidden_layers=12, hidden_size=72,
                             intermediate_size=88, num_experts=4, vocab_size=136, attn_layer_period=4,
                             attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1)


@pytest.fixture(scope="module")
def params():
    return abstract_params(CONFIG)  # compiling needs only shapes


def decode_kernels(params, batch, grouped=None):
    model = jamba_jax.Jamba(CONFIG, params)
    cache = jax.eval_shape(lambda: init_cache_arrays(CONFIG, batch, 16, jnp.float32))
    ids = jnp.zeros((batch,), jnp.int32)

    def compile_text():
        return decode_logits.lower(params, cache, ids, spec=ModelSpec.of(model)).compile().as_text()

    if grouped is None:
        return hlo_stats.kernels(compile_text())
    with forced_decode_matmul(grouped):
        return hlo_stats.kernels(compile_text())


def stack_shapes(params):
    """Whole stacked weights ``[blocks, ...]`` and each block's expert stacks ``[experts, in, out]``."""
    blocks = jax.tree.leaves(params["blocks"])
    shapes = {tuple(a.shape) for a in blocks}
    shapes |= {tuple(a.shape[1:]) for a in blocks if a.ndim == 4}  # the experts' [blocks, experts, in, out]
    assert (CONFIG.num_experts, CONFIG.hidden_size, CONFIG.intermediate_size) in shapes
    return shapes


def block_slice_shapes(params):
    """One block's slice of each stacked weight of two or more dims (what ``nn.scan`` hands a block)."""
    return {tuple(a.shape[1:]) for a in jax.tree.leaves(params["blocks"]) if a.ndim >= 3}


def test_no_whole_weight_stack_written_per_step(params, grouped=None):
    """Batch 1 on the CPU's default path (the slots: ``test_detector_...``)."""
    items = decode_kernels(params, 1, grouped)
    copies = hlo_stats.materialized(items, stack_shapes(params))
    assert not copies, [(k.opcode, k.shape, k.op_name) for k in copies]
    weights = hlo_stats.weight_kinds(params)
    by_kind = hlo_stats.kernel_counts(items, lambda k: hlo_stats.jamba_kind(k, weights))
    sliced = hlo_stats.materialized(items, block_slice_shapes(params))
    print(f"\ndecode step, {grouped or 'default'} MoE: {by_kind['total']} kernels per step "
          f"({CONFIG.num_blocks} blocks); by kind {by_kind}; by opcode {hlo_stats.kernel_counts(items)}; "
          f"block weight slices written per step: {sum(k.count for k in sliced)} "
          f"({sum(k.count * k.bytes for k in sliced)} bytes)")
    assert by_kind["experts"] > 0 and by_kind["attention"] > 0 and by_kind["router"] > 0
    # the block loop's body (where the blocks' kernels are; XLA may hoist a loop-invariant one out) runs
    # once per block
    in_blocks = [k for k in items if "/while/body/closed_call/blocks/" in k.op_name]
    body = collections.Counter(k.computation for k in in_blocks).most_common(1)[0][0]
    in_body = [k for k in items if k.computation == body]
    assert len(in_body) > 0.9 * len(in_blocks) and all(k.count == CONFIG.num_blocks for k in in_body)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the copy is the CPU compiler's")
def test_detector_finds_the_tiled_loops_expert_stack_copy(params):
    """Batch 2 is 4 rows of 4 experts: on the tiled loop XLA copies each block's whole expert stack out of
    the stacked params on every step (docs/generate.md); the slots do not."""
    expert_stack = {(CONFIG.num_experts, CONFIG.hidden_size, CONFIG.intermediate_size),
                    (CONFIG.num_experts, CONFIG.intermediate_size, CONFIG.hidden_size)}
    tiled = hlo_stats.materialized(decode_kernels(params, 2, "tiled"), expert_stack)
    assert tiled and all(k.count == CONFIG.num_blocks for k in tiled)
    assert not hlo_stats.materialized(decode_kernels(params, 2, "slots"), stack_shapes(params))
