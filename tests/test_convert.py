"""`jamba convert`: HF safetensors <-> converted (Orbax) checkpoints, streaming, restore onto a mesh."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import jamba_jax
from hf_reference import make_checkpoint
from jamba_jax.cli import main
from jamba_jax.convert import orbax_checkpoint

# 2 scanned blocks of (mamba, attention+MoE) and a 1-layer tail.
CONFIG = dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=5, num_attention_heads=2,
              num_key_value_heads=1, num_experts=2, num_experts_per_tok=1, attn_layer_period=2,
              attn_layer_offset=1, mamba_d_state=4)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
IDS = [[1, 5, 9, 2, 33, 7], [4, 4, 60, 1, 0, 12]]


def add_tokenizer_files(directory: Path) -> None:
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"[UNK]": 0, "hi": 1}, unk_token="[UNK]")).save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 256}))
    (directory / "special_tokens_map.json").write_text(json.dumps({"unk_token": "[UNK]"}))


class Checkpoints:
    """One random HF checkpoint per dtype (sharded, with tokenizer files) and its conversion, made once."""

    def __init__(self, root: Path):
        self.root = root
        self._made = {}

    def __call__(self, dtype: str) -> tuple[Path, Path]:
        if dtype not in self._made:
            hf, out = self.root / f"hf-{dtype}", self.root / f"converted-{dtype}"
            make_checkpoint(hf, seed=3, torch_dtype=DTYPES[dtype], max_shard_size="20KB", **CONFIG)
            add_tokenizer_files(hf)
            assert (hf / "model.safetensors.index.json").is_file()
            assert main(["convert", str(hf), str(out)]) == 0
            self._made[dtype] = hf, out
        return self._made[dtype]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return Checkpoints(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture
def converted(checkpoints):
    return checkpoints("float32")[1]


def all_tensors(directory: Path) -> dict[str, np.ndarray]:
    tensors = {}
    for f in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def leftovers(parent: Path, name: str) -> list[str]:
    """Anything a failed conversion to ``parent / name`` could have left behind."""
    return sorted(p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}."))


# ---- round trips ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_converted_logits_bitwise_equal_hf_load(dtype, tmp_path):
    hf_dir = tmp_path / "hf"
    # one block and a tail, which compiles in half the time of CONFIG's two blocks
    make_checkpoint(hf_dir, seed=4, torch_dtype=DTYPES[dtype], max_shard_size="20KB", **dict(CONFIG, num_hidden_layers=3))
    add_tokenizer_files(hf_dir)
    assert main(["convert", str(hf_dir), str(tmp_path / "converted")]) == 0
    direct, restored = jamba_jax.load(hf_dir), jamba_jax.load(tmp_path / "converted")
    assert restored.config == direct.config and restored.dtype == direct.dtype == np.dtype(dtype)
    assert restored.tokenizer.token_to_id("hi") == 1
    for a, b in zip(jax_leaves(direct.params), jax_leaves(restored.params)):
        assert a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8))
    logits = np.asarray(jamba_jax.forward(direct, IDS))
    assert np.array_equal(np.asarray(jamba_jax.forward(restored, IDS)), logits)


def jax_leaves(params):
    return [np.asarray(x) for x in jax.tree.leaves(params)]


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_round_trip_to_hf_is_bit_exact(checkpoints, dtype, tmp_path):
    hf_dir, converted = checkpoints(dtype)
    out = tmp_path / "hf"
    assert main(["convert", "--to-hf", str(converted), str(out), "--max-shard-size", "30KB"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert all((out / name).is_file() for name in index["weight_map"].values())
    original, back = all_tensors(hf_dir), all_tensors(out)
    assert sorted(back) == sorted(original)
    for key, t in original.items():
        assert back[key].dtype == t.dtype and back[key].shape == t.shape, key
        assert back[key].tobytes() == t.tobytes(), key
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert (out / name).read_bytes() == (hf_dir / name).read_bytes()
    assert jamba_jax.JambaConfig.from_json(out / "config.json") == jamba_jax.JambaConfig.from_json(hf_dir / "config.json")


def test_converted_back_loads_in_transformers(tmp_path):
    from transformers import JambaForCausalLM

    hf = tmp_path / "hf"
    model = make_checkpoint(hf, seed=5, max_shard_size=None, **CONFIG)
    assert main(["convert", str(hf), str(tmp_path / "ox")]) == 0
    assert main(["convert", "--to-hf", str(tmp_path / "ox"), str(tmp_path / "back"), "--max-shard-size", "50KB"]) == 0
    reloaded = JambaForCausalLM.from_pretrained(tmp_path / "back").eval()
    expected = model.state_dict()
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, expected[key]), key


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_manifest(checkpoints, dtype):
    hf_dir, converted = checkpoints(dtype)
    manifest = json.loads((converted / "manifest.json").read_text())
    assert manifest["format"] == "jamba_jax.orbax" and manifest["format_version"] == 2
    assert manifest["jamba_jax_version"] == jamba_jax.__version__
    assert manifest["quantization"] is None
    assert manifest["dtype"] == dtype == jamba_jax.JambaConfig.from_json(hf_dir / "config.json").dtype
    sources = {f["name"]: f["bytes"] for f in manifest["source"]["files"]}
    assert sources == {f.name: f.stat().st_size for f in hf_dir.glob("*.safetensors")}
    entry = manifest["params"]["blocks/layer_1/feed_forward/experts/gate_proj"]
    assert entry["shape"] == [2, 2, 16, 24] and entry["dtype"] == dtype and len(entry["checksum"]) == 32
    assert manifest["params_dir"] == "params" and (converted / "params" / "_CHECKPOINT_METADATA").is_file()


def test_dtype_option_and_cast_on_load(tmp_path):
    hf = tmp_path / "hf"
    make_checkpoint(hf, seed=1, max_shard_size=None, **CONFIG)
    assert main(["convert", str(hf), str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    restored = jamba_jax.load(tmp_path / "bf16")
    assert restored.dtype == np.dtype("bfloat16")
    direct = jamba_jax.load(hf, dtype="bfloat16")
    for a, b in zip(jax_leaves(direct.params), jax_leaves(restored.params)):
        assert np.array_equal(a.view(np.uint16), b.view(np.uint16))
    up = jamba_jax.load(tmp_path / "bf16", dtype="float32")  # cast while restoring
    assert up.dtype == np.dtype("float32")
    for a, b in zip(jax_leaves(up.params), jax_leaves(restored.params)):
        assert np.array_equal(a, b.astype(np.float32))


def test_overwrite_replaces_only_a_previous_conversion_or_an_empty_dir(checkpoints, tmp_path, capsys):
    hf_dir, _ = checkpoints("float32")
    out = tmp_path / "ckpt"
    out.mkdir()
    assert main(["convert", str(hf_dir), str(out), "--overwrite"]) == 0  # empty
    (out / "stale.txt").write_text("old")  # a previous conversion, with an extra file
    assert main(["convert", str(hf_dir), str(out), "--overwrite"]) == 0
    assert not (out / "stale.txt").exists() and (out / "manifest.json").is_file()
    assert leftovers(tmp_path, "ckpt") == ["ckpt"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    run_cli(["convert", hf_dir, other, "--overwrite"], capsys, "neither empty nor a previous conversion")
    assert (other / "notes.txt").read_text() == "mine" and leftovers(tmp_path, "other") == ["other"]


# ---- restore onto a mesh -------------------------------------------------------------------------

SHARDED_RESTORE = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import jamba_jax

    hf, converted = sys.argv[1:]
    assert len(jax.devices()) == 8
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("blocks", "model"))

    def rules(path, sds):
        if path == ("embed_tokens", "embedding"):
            return NamedSharding(mesh, P("model", None))
        if path[-1] == "gate_proj" and path[0] == "blocks":  # [blocks, experts, hidden, intermediate]
            return NamedSharding(mesh, P("blocks", None, None, "model"))
        return None  # replicated on the mesh

    reference = jamba_jax.load(converted)
    for source in (converted, hf):
        model = jamba_jax.load(source, mesh=mesh, shardings=rules)
        embed = model.params["embed_tokens"]["embedding"]
        assert {s.data.shape for s in embed.addressable_shards} == {(16, 16)}, embed.sharding
        experts = model.params["blocks"]["layer_1"]["feed_forward"]["experts"]["gate_proj"]
        assert experts.shape == (2, 2, 16, 24)
        assert {s.data.shape for s in experts.addressable_shards} == {(1, 2, 16, 6)}
        norm = model.params["final_layernorm"]["weight"]
        assert norm.sharding == NamedSharding(mesh, P()) and len(norm.addressable_shards) == 8
        for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(reference.params)):
            assert np.array_equal(np.asarray(a), np.asarray(b))
    tree = jax.tree.map(lambda _: NamedSharding(mesh, P()), reference.params)
    tree["embed_tokens"]["embedding"] = NamedSharding(mesh, P(None, "model"))
    model = jamba_jax.load(converted, shardings=tree)
    assert {s.data.shape for s in model.params["embed_tokens"]["embedding"].addressable_shards} == {(64, 4)}
    print("ok")
""")


def test_restore_onto_a_mesh_of_8_cpu_devices(checkpoints):
    hf_dir, converted = checkpoints("float32")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", SHARDED_RESTORE, str(hf_dir), str(converted)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_bad_shardings_are_rejected(converted):
    with pytest.raises(ValueError, match="shardings has entries for params that do not exist: nope"):
        jamba_jax.load(converted, shardings={"nope": None})


# ---- memory --------------------------------------------------------------------------------------

def _benchmark_module():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # it imports benchmarks/common.py
    import convert_memory

    return convert_memory


@pytest.mark.slow  # ~20 s: writes and converts 250 MiB
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset peak RSS")
def test_peak_memory_is_bounded_by_the_largest_leaf(tmp_path):
    """Converting a ~250 MiB checkpoint whose largest leaf is 32 MiB grows the process by less than
    two leaves, far from the model size (docs/convert.md has the numbers)."""
    result = _benchmark_module().run("test", tmp_path)
    assert result["model_bytes"] > 7 * result["largest_leaf_bytes"]
    assert result["peak_rss_growth_bytes"] < 2 * result["largest_leaf_bytes"], result
    assert result["peak_rss_growth_bytes"] < result["model_bytes"] / 3, result


def test_leaves_are_saved_in_groups_within_the_budget(checkpoints, tmp_path, monkeypatch):
    """Consecutive leaves share one ``partial.save`` up to the group budget: the held group is written
    before the next leaf is read whenever that leaf would not fit, so the leaves held never exceed the
    budget (a larger leaf goes alone), and no two consecutive groups could have been one. The result is
    the default conversion's."""
    hf, default = checkpoints("float32")
    budget = 5000
    monkeypatch.setattr(orbax_checkpoint, "GROUP_BYTES", budget)
    writers, groups, read = [], [], []
    init, write, iter_leaves = (orbax_checkpoint.LeafWriter.__init__, orbax_checkpoint.LeafWriter.write,
                                orbax_checkpoint.iter_hf_leaves)

    def recording_init(self, directory):
        init(self, directory)
        writers.append(self)

    def recording_write(self, leaves):
        groups.append([a.nbytes for a in leaves.values()])
        write(self, leaves)

    def watched_leaves(*args, **kwargs):
        leaves = iter_leaves(*args, **kwargs)
        while True:
            held = writers[0].pending_bytes  # before the next leaf is read
            try:
                path, leaf = next(leaves)
            except StopIteration:
                return
            assert held == 0 or held + leaf.nbytes <= budget, (path, held, leaf.nbytes)
            read.append(path)
            yield path, leaf

    monkeypatch.setattr(orbax_checkpoint.LeafWriter, "__init__", recording_init)
    monkeypatch.setattr(orbax_checkpoint.LeafWriter, "write", recording_write)
    monkeypatch.setattr(orbax_checkpoint, "iter_hf_leaves", watched_leaves)
    assert main(["convert", str(hf), str(tmp_path / "out")]) == 0
    assert sum(len(g) for g in groups) == len(read)
    assert any(len(g) > 1 for g in groups) and any(g[0] > budget for g in groups)
    for g in groups:
        assert sum(g) <= budget or len(g) == 1, g
    for g, h in zip(groups, groups[1:]):
        assert sum(g) + h[0] > budget, (g, h)
    want, got = jamba_jax.load(default), jamba_jax.load(tmp_path / "out")
    for a, b in zip(jax.tree.leaves(want.params), jax.tree.leaves(got.params), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names fsynced files through Linux /proc")
def test_output_is_on_disk_before_it_appears(checkpoints, tmp_path, monkeypatch):
    """Every file and directory of the output is fsynced before the rename that makes it appear, and its
    parent directory after that rename: a crash of the machine never leaves an incomplete OUT_DIR."""
    from jamba_jax.convert import atomic_dir

    hf, _ = checkpoints("float32")
    events = []
    fsync, rename = os.fsync, atomic_dir._rename_noreplace

    def recording_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def recording_rename(src, dst):
        rename(src, dst)
        events.append(("rename", str(src.absolute()), str(dst.absolute())))

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(atomic_dir, "_rename_noreplace", recording_rename)
    out = tmp_path / "out"
    assert main(["convert", str(hf), str(out)]) == 0
    (at,) = [i for i, e in enumerate(events) if e[0] == "rename"]
    _, tmp, dst = events[at]
    synced = {path.replace(tmp, dst, 1) for kind, path in events[:at] if path.startswith(tmp)}
    on_disk = {str(out)} | {str(p) for p in out.rglob("*")}
    assert on_disk <= synced, sorted(on_disk - synced)[:5]
    assert ("fsync", str(tmp_path)) in events[at + 1:]


# ---- bad input: one line on stderr, exit code 2, nothing left behind --------------------------------

@pytest.fixture
def hf_copy(tmp_path):
    """A fresh sharded fp32 checkpoint the test may break."""
    directory = tmp_path / "src"
    make_checkpoint(directory, seed=2, max_shard_size="40KB", **CONFIG)
    return directory


def run_cli(args, capsys, expect: str):
    capsys.readouterr()
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("jamba convert: error: "), err
    assert expect in err, err
    return err


def rewrite_shard(directory: Path, key: str, edit):
    """Applies ``edit`` to the tensors of the shard holding ``key`` and lists the result in the index."""
    index_file = directory / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    file = directory / index["weight_map"][key]
    tensors = load_file(file)
    before = set(tensors)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})
    for k in before - set(tensors):
        del index["weight_map"][k]
    index["weight_map"].update(dict.fromkeys(set(tensors) - before, file.name))
    index_file.write_text(json.dumps(index))
    return file


def test_missing_shard(hf_copy, tmp_path, capsys):
    shard = sorted(hf_copy.glob("model-*.safetensors"))[-1]
    shard.unlink()
    run_cli(["convert", hf_copy, tmp_path / "out"], capsys, f"{shard.name}: shard listed in")
    assert leftovers(tmp_path, "out") == []


def test_truncated_safetensors(hf_copy, tmp_path, capsys):
    shard = sorted(hf_copy.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    run_cli(["convert", hf_copy, tmp_path / "out"], capsys, f"{shard}: unreadable safetensors file")
    assert leftovers(tmp_path, "out") == []


def test_corrupt_safetensors(hf_copy, tmp_path, capsys):
    shard = sorted(hf_copy.glob("model-*.safetensors"))[0]
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    run_cli(["convert", hf_copy, tmp_path / "out"], capsys, f"{shard}: unreadable safetensors file")
    assert leftovers(tmp_path, "out") == []


def test_missing_key(hf_copy, tmp_path, capsys):
    key = "model.layers.4.mamba.A_log"
    rewrite_shard(hf_copy, key, lambda t: t.pop(key))
    run_cli(["convert", hf_copy, tmp_path / "out"], capsys, f"{hf_copy}: missing tensor {key!r}")
    assert leftovers(tmp_path, "out") == []


def test_key_listed_in_index_but_not_in_shard(hf_copy, tmp_path, capsys):
    key = "model.layers.2.mamba.D"
    index = json.loads((hf_copy / "model.safetensors.index.json").read_text())
    file = hf_copy / index["weight_map"][key]
    tensors = load_file(file)
    del tensors[key]
    save_file(tensors, file, metadata={"format": "pt"})
    run_cli(["convert", hf_copy, tmp_path / "out"], capsys, f"{file}: missing tensor {key!r} (listed in")
    assert leftovers(tmp_path, "out") == []


def test_unexpected_key(hf_copy, tmp_path, capsys):
    key = "model.layers.0.mamba.D"
    file = rewrite_shard(hf_copy, key, lambda t: t.update({"model.layers.9.mamba.D": np.ones(32, np.float32)}))
    run_cli(["convert", hf_copy, tmp_path / "out"], capsys, f"{file.name}: unexpected tensor 'model.layers.9.mamba.D'")
    assert leftovers(tmp_path, "out") == []


def test_misshaped_key(hf_copy, tmp_path, capsys):
    key = "model.layers.3.self_attn.k_proj.weight"
    rewrite_shard(hf_copy, key, lambda t: t.update({key: np.ones((7, 16), np.float32)}))
    run_cli(["convert", hf_copy, tmp_path / "out"], capsys, f"{key!r} has shape (7, 16), expected (8, 16)")
    assert leftovers(tmp_path, "out") == []


def test_wrong_model_type(hf_copy, tmp_path, capsys):
    config = json.loads((hf_copy / "config.json").read_text())
    (hf_copy / "config.json").write_text(json.dumps(dict(config, model_type="mamba")))
    run_cli(["convert", hf_copy, tmp_path / "out"], capsys, "config.json: model_type is 'mamba', expected 'jamba'")
    assert leftovers(tmp_path, "out") == []


def test_unwritable_output(hf_copy, tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    run_cli(["convert", hf_copy, tmp_path / "a-file" / "out"], capsys, "a-file: output's parent directory does not exist")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        run_cli(["convert", hf_copy, locked / "out"], capsys, f"{locked / 'out'}: cannot create output")


def test_existing_output_without_overwrite(hf_copy, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    run_cli(["convert", hf_copy, out], capsys, f"{out}: already exists; pass --overwrite")
    assert list(out.iterdir()) == []
    run_cli(["convert", hf_copy, hf_copy, "--overwrite"], capsys, "output must not be, contain or lie inside the input")


def test_failure_while_writing_leaves_nothing(hf_copy, tmp_path, capsys, monkeypatch):
    calls = []
    write = orbax_checkpoint.LeafWriter.write

    def failing_write(self, leaves):
        calls.append(leaves)
        if len(calls) == 4:
            raise OSError(28, "No space left on device", str(self.directory / "state" / "d" / "0"))
        write(self, leaves)

    monkeypatch.setattr(orbax_checkpoint, "GROUP_BYTES", 0)  # one leaf per write
    monkeypatch.setattr(orbax_checkpoint.LeafWriter, "write", failing_write)
    err = run_cli(["convert", hf_copy, tmp_path / "out"], capsys, "No space left on device")
    assert str(tmp_path / "out" / "params") in err and ".partial" not in err
    assert leftovers(tmp_path, "out") == []

    def interrupted(self, leaves):
        raise KeyboardInterrupt

    monkeypatch.setattr(orbax_checkpoint.LeafWriter, "write", interrupted)
    assert main(["convert", str(hf_copy), str(tmp_path / "out")]) == 130
    assert leftovers(tmp_path, "out") == []


def test_to_hf_bad_inputs(hf_copy, converted, tmp_path, capsys):
    run_cli(["convert", "--to-hf", hf_copy, tmp_path / "back"], capsys, "manifest.json: missing; not a converted")
    run_cli(["convert", converted, tmp_path / "again"], capsys, "already a converted checkpoint")
    broken = tmp_path / "broken"
    main(["convert", str(hf_copy), str(broken)])
    params = broken / "params"
    shutil.rmtree(params)
    run_cli(["convert", "--to-hf", broken, tmp_path / "back"], capsys, f"{params}: missing params checkpoint")
    assert leftovers(tmp_path, "back") == []
    manifest = json.loads((broken / "manifest.json").read_text())
    (broken / "manifest.json").write_text(json.dumps(dict(manifest, format_version=99)))
    run_cli(["convert", "--to-hf", broken, tmp_path / "back"], capsys, "format_version 99 is not supported")


def test_console_script_prints_no_traceback(hf_copy, tmp_path):
    jamba = Path(sys.executable).with_name("jamba")
    command = [str(jamba)] if jamba.exists() else [sys.executable, "-m", "jamba_jax.cli"]
    (tmp_path / "out").mkdir()
    out = subprocess.run([*command, "convert", str(hf_copy), str(tmp_path / "out")], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
    assert "already exists" in out.stderr
