"""The param table and the cache table describe exactly what the model holds: one row for every leaf of the
Flax params and of the decode cache, with the same shapes and dtypes; a path with no row is an error."""

import dataclasses
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jamba_jax import JambaConfig, JambaLM, abstract_params, init_params
from jamba_jax.cache import CACHE_TABLE, cache_entry, cache_logical_axes, init_cache_arrays
from jamba_jax.convert.hf_keys import checkpoint_entries
from jamba_jax.params import PARAM_TABLE, is_quantized, param_leaves, param_logical_axes, param_row
from jamba_jax.sharding import RULES, spec_for

TINY = JambaConfig.named("jamba-tiny")
CONFIGS = {
    "tiny": TINY,
    # two scanned blocks and a tail, projection biases, no conv bias, tied embeddings
    "tail_biases_tied": dataclasses.replace(TINY, num_hidden_layers=2 * TINY.block_size + 3, mamba_proj_bias=True,
                                            mamba_conv_bias=False, tie_word_embeddings=True),
    "dense_only": dataclasses.replace(TINY, num_experts=1),  # every feed-forward a dense MLP; no blocks of 8+
    "tail_only": dataclasses.replace(TINY, num_hidden_layers=3),  # fewer layers than one block: no "blocks"
}


def flax_params(config, dtype=jnp.float32):
    """The params the Flax modules declare, as ``ShapeDtypeStruct`` leaves (nothing allocated)."""
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return jax.eval_shape(lambda k, i: JambaLM(config, dtype).init(k, i)["params"], jax.random.key(0), ids)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_flax_param_has_exactly_one_row(name):
    config = CONFIGS[name]
    flax_flat = traverse_util.flatten_dict(flax_params(config, jnp.bfloat16))
    table_flat = traverse_util.flatten_dict(abstract_params(config, jnp.bfloat16))
    assert set(flax_flat) == set(table_flat)
    for path, sds in flax_flat.items():
        assert (sds.shape, sds.dtype) == (table_flat[path].shape, table_flat[path].dtype), path
        assert len(param_logical_axes(path, sds.ndim)) == sds.ndim
    rows = Counter(param_row(path) for path in flax_flat)
    assert all(r.path == path[-len(r.path):] for path in flax_flat for r in [param_row(path)])
    # every row a config can have is used by some leaf; rows name distinct paths
    assert len({r.path for r in PARAM_TABLE}) == len(PARAM_TABLE)
    assert set(rows) == {r for r in PARAM_TABLE if r.present(config) and any(r is leaf.row for leaf in
                                                                               param_leaves(config))}


def test_table_covers_the_released_layer_kinds():
    """Mini has every kind of layer (attention/Mamba x dense/MoE): the table's layer rows all appear."""
    config = JambaConfig.named("jamba-1.5-mini")
    used = {leaf.row for leaf in param_leaves(config)}
    assert used == {r for r in PARAM_TABLE if r.present(config)}
    assert {r.path[-2] if r.path[-1] == "kernel" else r.path[-1] for r in PARAM_TABLE if r.quantized} == {
        "gate_proj", "up_proj", "down_proj"}
    gate = ("blocks", "layer_1", "feed_forward", "experts", "gate_proj")
    assert is_quantized(gate) and not is_quantized(("blocks", "layer_1", "feed_forward", "router", "kernel"))


def test_a_path_with_no_row_is_an_error():
    for path in [("blocks", "layer_0", "mamba", "bogus"), ("lm_head", "bias"), ("mamba", "A_log"),
                 ("blocks", "layer_0", "embed_tokens", "embedding")]:
        with pytest.raises(ValueError, match="no row in params.PARAM_TABLE"):
            param_row(path)
    with pytest.raises(ValueError, match="no row in cache.CACHE_TABLE"):
        cache_entry(("blocks", "layer_0", "scratch"))
    with pytest.raises(ValueError, match="no rule in sharding.RULES"):
        spec_for(None, (4,), ("bogus_axis",))
    assert all(name in RULES for r in PARAM_TABLE for name in r.axes if name is not None)
    assert all(name in RULES for e in CACHE_TABLE for name in e.axes)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_cache_leaf_has_exactly_one_row(name):
    config, batch, max_len = CONFIGS[name], 3, 40
    cache = jax.eval_shape(lambda: init_cache_arrays(config, batch, max_len, jnp.bfloat16))
    names = Counter()
    for path, leaf in jax.tree_util.tree_flatten_with_path(cache)[0]:
        entry = cache_entry(path)
        names[entry.name] += 1
        lead = (config.num_blocks,) if path[0].key == "blocks" else ()
        assert leaf.shape == lead + entry.shape(config, batch, max_len), path
        assert leaf.dtype == (entry.dtype or jnp.bfloat16), path
        assert len(cache_logical_axes(path, leaf.ndim)) == leaf.ndim
        if entry.mixer is not None:
            layer = int(path[1].key.removeprefix("layer_"))
            assert config.mixer_type(layer) == entry.mixer, path
    assert set(names) == {e.name for e in CACHE_TABLE if e.mixer is None or e.mixer in
                          {config.mixer_type(j) for j in range(config.num_hidden_layers)}}


@pytest.mark.parametrize("name", CONFIGS)
def test_hf_keys_fill_every_leaf_index_exactly_once(name):
    """Every HF tensor names a leaf and an index into it (block and/or expert); together they cover every
    index of every leaf exactly once."""
    config = CONFIGS[name]
    shapes = traverse_util.flatten_dict(abstract_params(config))
    counts = {}
    keys = [e.hf_key for e in checkpoint_entries(config)]
    assert len(keys) == len(set(keys))
    for e in checkpoint_entries(config):
        assert e.path in shapes, e
        c = counts.setdefault(e.path, np.zeros(shapes[e.path].shape[:len(e.index)], int))
        c[e.index] += 1
    assert set(counts) == set(shapes)
    for path, c in counts.items():
        assert c.min() == c.max() == 1, path


def test_init_params_follow_the_rows_initializers():
    config = CONFIGS["tail_biases_tied"]
    flat = traverse_util.flatten_dict(init_params(config, jax.random.key(0)))
    a_log = np.log(np.arange(1, config.mamba_d_state + 1, dtype=np.float64))
    for path, value in flat.items():
        value = np.asarray(value)
        name = "/".join(path[-2:])
        if path[-1] == "A_log":
            np.testing.assert_allclose(value, np.broadcast_to(a_log, value.shape), rtol=2**-23)  # XLA's log: 1 ulp
        elif path[-1] in ("D", "weight"):
            np.testing.assert_array_equal(value, 1.0)
        elif path[-1] in ("bias", "conv_bias"):
            np.testing.assert_array_equal(value, 0.0)
        elif path[-1] == "conv_kernel":
            assert np.abs(value).max() <= 1 / np.sqrt(config.mamba_d_conv) and value.std() > 0.1, name
        elif value.size >= 1000:
            assert 0.015 < value.std() < 0.025, name
    stacked = flat[("blocks", "layer_0", "mamba", "x_proj", "kernel")]
    assert not np.array_equal(stacked[0], stacked[1])  # each block its own draw
