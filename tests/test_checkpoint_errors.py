"""Bad checkpoints give one clear error naming the file or key."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jamba_jax
from hf_reference import SMALL_CHECKPOINT, make_checkpoint
from jamba_jax import CheckpointError, ConfigError

CONFIG = SMALL_CHECKPOINT


@pytest.fixture(scope="module")
def single_file_checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("single")
    make_checkpoint(directory, max_shard_size=None, **CONFIG)
    assert (directory / "model.safetensors").is_file()
    return directory


@pytest.fixture
def broken(single_file_checkpoint, tmp_path):
    """A copy of the checkpoint whose tensors the test rewrites."""
    directory = tmp_path / "ckpt"
    shutil.copytree(single_file_checkpoint, directory)
    return directory


def rewrite(directory, edit):
    file = directory / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file)


def test_single_file_checkpoint_loads(single_file_checkpoint):
    model = jamba_jax.load(single_file_checkpoint)
    assert model.config.num_hidden_layers == 3 and model.tokenizer is None
    assert np.isfinite(np.asarray(jamba_jax.forward(model, [[1, 2, 3]]))).all()


def test_unexpected_tensor(broken):
    rewrite(broken, lambda t: t.update({"model.layers.9.mamba.D": np.ones(32, np.float32)}))
    with pytest.raises(CheckpointError, match=r"model.safetensors: unexpected tensor 'model.layers.9.mamba.D'"):
        jamba_jax.load(broken)


def test_missing_tensor(broken):
    rewrite(broken, lambda t: t.pop("model.layers.0.mamba.A_log"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model.layers.0.mamba.A_log'"):
        jamba_jax.load(broken)


def test_misshaped_tensor(broken):
    rewrite(broken, lambda t: t.update({"model.layers.1.self_attn.k_proj.weight": np.ones((7, 16), np.float32)}))
    with pytest.raises(CheckpointError,
                       match=r"'model.layers.1.self_attn.k_proj.weight' has shape \(7, 16\), expected \(8, 16\)"):
        jamba_jax.load(broken)


def test_corrupt_file(broken):
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="model.safetensors: unreadable safetensors file"):
        jamba_jax.load(broken)


def test_missing_shard(tmp_path):
    make_checkpoint(tmp_path, max_shard_size="20KB", **CONFIG)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match=f"{shards[-1].name}: shard listed in .* is missing"):
        jamba_jax.load(tmp_path)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        jamba_jax.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(ConfigError, match="model_type is 'mamba'"):
        jamba_jax.load(tmp_path)
    with pytest.raises(CheckpointError, match="not a directory"):
        jamba_jax.load(tmp_path / "nope")


def test_tokenizer_is_loaded_when_present(broken):
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"[UNK]": 0, "hi": 1}, unk_token="[UNK]")).save(str(broken / "tokenizer.json"))
    assert jamba_jax.load(broken).tokenizer.token_to_id("hi") == 1
