"""JambaConfig: HF config.json round trip, the layer plan and the bundled configs."""

import json

import pytest
from transformers import JambaConfig as HFJambaConfig

from jamba_jax import ConfigError, JambaConfig, config_names


@pytest.mark.parametrize("kw", [
    dict(num_hidden_layers=32),
    dict(num_hidden_layers=13, attn_layer_period=3, attn_layer_offset=1, expert_layer_period=4,
         expert_layer_offset=3),
    dict(num_hidden_layers=5, num_experts=1),
])
def test_layer_plan_matches_hf(kw):
    hf = HFJambaConfig(**kw)
    ours = JambaConfig.from_dict(hf.to_dict())
    assert [m for m, _ in ours.layer_plan] == hf.layers_block_type
    assert [ours.num_experts if moe else 1 for _, moe in ours.layer_plan] == hf.layers_num_experts
    period = ours.block_size
    for i in range(ours.num_hidden_layers):  # the plan repeats with the block
        assert ours.layer_plan[i] == ours.layer_plan[i % period]
    assert ours.num_blocks * period + ours.num_tail_layers == ours.num_hidden_layers


def test_dt_rank_auto_and_derived_sizes():
    c = JambaConfig.from_dict({"model_type": "jamba", "hidden_size": 100, "num_attention_heads": 4,
                               "num_key_value_heads": 2, "mamba_dt_rank": "auto", "eos_token_id": [2, 518]})
    assert c.mamba_dt_rank == 7 and c.head_dim == 25 and c.d_inner == 200
    assert c.eos_token_ids == (2, 518)
    assert hash(c) == hash(JambaConfig.from_dict(c.to_dict()))  # frozen, hashable, round-trips


def test_bundled_configs(tmp_path):
    assert {"jamba-v0.1", "jamba-1.5-mini", "jamba-1.5-large", "jamba-tiny"} <= set(config_names())
    large = JambaConfig.named("jamba-1.5-large")
    assert (large.hidden_size, large.num_hidden_layers, large.mamba_dt_rank) == (8192, 72, 512)
    (tmp_path / "config.json").write_text(json.dumps(large.to_dict()))
    assert JambaConfig.named(tmp_path) == large
    assert JambaConfig.named(tmp_path / "config.json") == large


@pytest.mark.parametrize("change,message", [
    ({"model_type": "llama"}, "model_type is 'llama', expected 'jamba'"),
    ({"attn_layer_offset": 8}, "attn_layer_offset 8 must be in"),
    ({"num_experts_per_tok": 17}, "num_experts_per_tok 17"),
    ({"num_key_value_heads": 5}, "not a multiple of num_key_value_heads 5"),
])
def test_bad_configs_are_clear_errors(tmp_path, change, message):
    d = JambaConfig.named("jamba-tiny").to_dict() | change
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=message):
        JambaConfig.named(tmp_path)


def test_unknown_name_lists_bundled():
    with pytest.raises(ConfigError, match="bundled configs are .*jamba-1.5-mini"):
        JambaConfig.named("jamba-2-huge")
