"""The converted checkpoint's on-disk format: one Orbax checkpoint (readable by Orbax alone), checked on load
against the manifest (shape, dtype, checksum), and the version-1 format (one checkpoint per leaf) still read."""

import json
import pickle
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from flax import traverse_util

import jamba_jax
from hf_reference import SMALL_CHECKPOINT, make_checkpoint
from jamba_jax import CheckpointError
from jamba_jax.cli import main
from jamba_jax.quant import QuantizedWeight

CONFIG = SMALL_CHECKPOINT


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("format")
    make_checkpoint(root / "hf", seed=7, max_shard_size="20KB", **CONFIG)
    assert main(["convert", str(root / "hf"), str(root / "converted")]) == 0
    assert main(["convert", str(root / "hf"), str(root / "int8"), "--quantize", "experts-int8"]) == 0
    return root


@pytest.fixture
def copy(made, tmp_path):
    """A copy of the float32 conversion the test may break."""
    shutil.copytree(made / "converted", tmp_path / "ckpt")
    return tmp_path / "ckpt"


def flat(params) -> dict[tuple, np.ndarray]:
    """``load``'s params as Orbax stores them: a QuantizedWeight is {"q", "scale"}."""
    out = {}
    for path, v in traverse_util.flatten_dict(params, is_leaf=lambda _, x: isinstance(x, QuantizedWeight)).items():
        if isinstance(v, QuantizedWeight):
            out[path + ("q",)], out[path + ("scale",)] = np.asarray(v.q), np.asarray(v.scale)
        else:
            out[path] = np.asarray(v)
    return out


ORBAX_ONLY = textwrap.dedent("""
    import pickle, sys
    import numpy as np
    from orbax.checkpoint import v1 as ocp
    tree = ocp.load(sys.argv[1])
    assert not any(m.startswith("jamba_jax") for m in sys.modules), "jamba_jax imported"

    def walk(prefix, node, out):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(prefix + (k,), v, out)
        else:
            a = np.asarray(node)
            out[prefix] = (a.dtype.name, a.shape, a.tobytes())
        return out

    sys.stdout.buffer.write(pickle.dumps(walk((), tree, {})))
""")


@pytest.mark.parametrize("name", ["converted", "int8"])
def test_orbax_alone_restores_what_load_gives(made, name):
    out = subprocess.run([sys.executable, "-c", ORBAX_ONLY, str(made / name / "params")], capture_output=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr.decode()[-3000:]
    restored = pickle.loads(out.stdout)
    expected = flat(jamba_jax.load(made / name).params)
    assert sorted(restored) == sorted(expected)
    for path, a in expected.items():
        assert restored[path] == (a.dtype.name, a.shape, a.tobytes()), path


def rewrite_params(directory, edit):
    """Rewrites ``directory/params`` with Orbax after ``edit(flat leaves)``: a checkpoint whose data no
    longer match the manifest."""
    from orbax.checkpoint import v1 as ocp

    leaves = traverse_util.flatten_dict(ocp.load(directory / "params"))
    edit(leaves)
    shutil.rmtree(directory / "params")
    ocp.save(directory / "params", traverse_util.unflatten_dict(leaves))


def test_swapped_leaves_are_refused_by_name(copy):
    a, b = ("blocks", "layer_0", "input_layernorm", "weight"), ("blocks", "layer_1", "input_layernorm", "weight")

    def swap(leaves):
        assert leaves[a].shape == leaves[b].shape and not np.array_equal(leaves[a], leaves[b])
        leaves[a], leaves[b] = leaves[b], leaves[a]

    rewrite_params(copy, swap)
    with pytest.raises(CheckpointError, match=r"param '(blocks/layer_0|blocks/layer_1)/input_layernorm/weight' "
                                              r"fails its checksum") as e:
        jamba_jax.load(copy)
    assert "\n" not in str(e.value)
    jamba_jax.load(copy, verify=False)  # shapes and dtypes match: only the checksum can tell
    with pytest.raises(CheckpointError, match="fails its checksum"):
        jamba_jax.load(copy, dtype="bfloat16")  # checked before the cast
    err = subprocess.run([sys.executable, "-m", "jamba_jax.cli", "convert", "--to-hf", str(copy),
                          str(copy.parent / "back")], capture_output=True, text=True, timeout=120).stderr
    assert "fails its checksum" in err and err.count("\n") == 1, err
    assert main(["convert", "--to-hf", str(copy), str(copy.parent / "back"), "--no-verify"]) == 0


def test_retyped_leaf_is_refused_by_name(copy):
    key = ("blocks", "layer_0", "mamba", "D")
    rewrite_params(copy, lambda leaves: leaves.update({key: leaves[key].astype(np.float16)}))
    for verify in (True, False):
        with pytest.raises(CheckpointError, match=r"param 'blocks/layer_0/mamba/D' has dtype float16, expected "
                                                  r"float32"):
            jamba_jax.load(copy, verify=verify)


def test_reshaped_or_missing_leaf_is_refused_by_name(copy):
    key = ("final_layernorm", "weight")
    rewrite_params(copy, lambda leaves: leaves.update({key: leaves[key][:8]}))
    with pytest.raises(CheckpointError, match=r"param 'final_layernorm/weight' has shape \(8,\), expected \(16,\)"):
        jamba_jax.load(copy)
    rewrite_params(copy, lambda leaves: leaves.pop(key))
    with pytest.raises(CheckpointError, match=r"missing param 'final_layernorm/weight'"):
        jamba_jax.load(copy)


def test_manifest_disagreeing_with_config_is_refused(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["params"]["blocks/layer_0/mamba/D"]["dtype"] = "bfloat16"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"manifest.json: param 'blocks/layer_0/mamba/D' has dtype bfloat16, "
                                              r"expected float32"):
        jamba_jax.load(copy)
    manifest["params"]["blocks/layer_0/mamba/D"]["dtype"] = "float32"
    manifest["dtype"] = "bfloat16"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"config.json: dtype float32, but manifest.json says bfloat16"):
        jamba_jax.load(copy)


def make_version_1(src, dst):
    """The checkpoint ``src`` rewritten in format version 1: one Orbax PyTree checkpoint {"value": leaf}
    per leaf under params/<path joined by ".">, manifest without dtypes (but for non-default ones) or checksums."""
    import orbax.checkpoint as ocp
    from orbax.checkpoint import v1

    dst.mkdir()
    for name in ("config.json",):
        shutil.copyfile(src / name, dst / name)
    manifest = json.loads((src / "manifest.json").read_text())
    leaves = traverse_util.flatten_dict(v1.load(src / "params"))
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False))
    params = {}
    for path, leaf in leaves.items():
        directory = dst / "params" / ".".join(path)
        checkpointer.save(directory, args=ocp.args.PyTreeSave({"value": leaf}))
        entry = {"shape": list(leaf.shape), "dir": f"params/{'.'.join(path)}"}
        if leaf.dtype != np.dtype(manifest["dtype"]):
            entry["dtype"] = leaf.dtype.name
        params["/".join(path)] = entry
    manifest.update(format_version=1, params=params)
    manifest.pop("params_dir")
    (dst / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("name", ["converted", "int8"])
def test_version_1_checkpoints_still_load(made, tmp_path, name):
    make_version_1(made / name, tmp_path / "v1")
    old, new = jamba_jax.load(tmp_path / "v1"), jamba_jax.load(made / name)
    assert old.quantize == new.quantize
    a, b = flat(old.params), flat(new.params)
    assert sorted(a) == sorted(b)
    for path in a:
        assert a[path].dtype == b[path].dtype and a[path].tobytes() == b[path].tobytes(), path
    if name == "converted":
        assert main(["convert", "--to-hf", str(tmp_path / "v1"), str(tmp_path / "back")]) == 0
        assert main(["convert", "--to-hf", str(made / name), str(tmp_path / "back2")]) == 0
        for f in (tmp_path / "back2").glob("*.safetensors"):
            assert (tmp_path / "back" / f.name).read_bytes() == f.read_bytes()


def test_checksum_is_additive_over_any_sharding():
    from jamba_jax.convert.checksum import checksum, combine, partial_sums

    x = np.random.default_rng(0).standard_normal((4, 6, 10)).astype(np.float32)
    whole = checksum(x)
    parts = [partial_sums(x[i:i + 2, :, j:j + 5], (i, 0, j)) for i in (0, 2) for j in (0, 5)]
    assert combine(parts) == whole
    swapped = x.copy()
    swapped[0, 0, 0], swapped[3, 5, 9] = x[3, 5, 9], x[0, 0, 0]
    assert checksum(swapped) != whole
    assert checksum(np.ascontiguousarray(x.transpose(0, 2, 1)).reshape(x.shape)) != whole


@pytest.mark.parametrize("band", [1 << 18, 7])
def test_checksum_matches_its_definition(band, monkeypatch):
    """``partial_sums`` against its definition in Python integers (random bits, so the sums wrap), also
    with bands of rows much smaller than the part (several bands, a ragged last one)."""
    from jamba_jax.convert import checksum as ck

    monkeypatch.setattr(ck, "BAND_ELEMENTS", band)
    rng = np.random.default_rng(1)
    cases = [((), np.uint32, ()), ((9,), np.uint16, (3,)), ((5, 3, 4), np.uint32, (0, 2, 1)),
             ((2, 3, 2, 5), np.uint8, (1, 0, 4, 2)), ((4, 7), np.uint64, (6, 0))]
    for shape, bits, start in cases:
        b = rng.integers(0, np.iinfo(bits).max, size=shape, dtype=bits, endpoint=True)
        s0 = s1 = 0
        for index in np.ndindex(*shape):
            corner = [i + s for i, s in zip(index, start)]
            s0 += int(b[index])
            s1 += int(b[index]) * (1 + sum(ck._P[d] * i for d, i in enumerate(corner)))
        assert ck.partial_sums(b, start) == (s0 % 2**64, s1 % 2**64), (shape, bits)
        if bits in (np.uint16, np.uint32):  # a float leaf with these raw bits has the same sums
            floats = b.view(np.dtype(f"f{np.dtype(bits).itemsize}"))
            assert ck.partial_sums(floats, start) == (s0 % 2**64, s1 % 2**64)


SHARDED_VERIFY = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, numpy as np
    import jamba_jax
    from jamba_jax.convert.checksum import array_checksum, checksum

    converted, int8 = sys.argv[1:]
    assert len(jax.devices()) == 8
    mesh = jamba_jax.make_mesh(8)
    for path in (converted, int8):
        model = jamba_jax.load(path, mesh=mesh)  # every leaf's checksum summed from its shards
        plain = jamba_jax.load(path)
        for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(plain.params)):
            assert np.array_equal(np.asarray(a), np.asarray(b))
            assert array_checksum(a) == checksum(np.asarray(b))
            # each device holds exactly its shard
            for s in a.addressable_shards:
                assert np.array_equal(np.asarray(s.data), np.asarray(b)[s.index])
        sharded = [x for x in jax.tree.leaves(model.params) if len({str(s.index) for s in x.addressable_shards}) > 1]
        assert sharded, "nothing was sharded"
    print("ok")
""")


def test_sharded_restore_verifies_checksums_from_shards(made):
    import os

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", SHARDED_VERIFY, str(made / "converted"), str(made / "int8")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_read_staging_cap():
    """A restore's reads in flight: 1/16 of what the process reads, at most 1 GiB, always above the
    largest leaf (Orbax refuses a leaf that is not below the cap)."""
    import jax

    from jamba_jax.convert.orbax_checkpoint import READ_STAGING_MAX, read_staging_bytes

    small = {("a", str(i)): np.empty((256, 1024), np.float32) for i in range(100)}  # 100 x 1 MiB
    assert read_staging_bytes(small) == 100 * 2**20 // 16
    assert read_staging_bytes({**small, ("big",): np.empty((64 << 20,), np.uint8)}) == (64 << 20) + 1
    huge = {("a", str(i)): jax.ShapeDtypeStruct((2**19, 256), np.float32) for i in range(64)}  # 64 x 0.5 GiB
    assert read_staging_bytes(huge) == READ_STAGING_MAX
