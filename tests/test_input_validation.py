"""Bad input is refused before anything is sized or allocated from it, in one line: configs (randomized
mutations of every field), generation bounds, sampling values and token ids, chat-template output, and the
CLI's own errors."""

import json

import numpy as np
import pytest

import jamba_jax
from helpers import random_model
from jamba_jax import ConfigError, JambaConfig
from jamba_jax.chat_template import render_chat
from jamba_jax.cli import main

TINY = JambaConfig.named("jamba-tiny")
BAD_VALUES = [-1, 0, 2**40, 1.5, float("nan"), "abc", "", None, True, [], {}, [3, "x"]]


def run_cli(capsys, *argv):
    """``jamba ARGV`` in this process: (exit code, stderr lines)."""
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    return code, capsys.readouterr().err.strip().splitlines()


def test_randomized_config_mutations_end_in_one_line(tmp_path, capsys):
    """Seeded mutations of config.json (a field replaced by a value of a wrong type, sign or magnitude, or
    removed): `jamba info` either accepts the result (still a valid config) or exits 2 with one line."""
    base = TINY.to_dict()
    rng = np.random.default_rng(0)
    refused = 0
    for case in range(300):
        d = dict(base)
        field = sorted(d)[rng.integers(len(d))]
        if rng.random() < 0.15:
            del d[field]
        else:
            d[field] = BAD_VALUES[rng.integers(len(BAD_VALUES))]
        file = tmp_path / f"config_{case}.json"
        file.write_text(json.dumps(d))
        code, err = run_cli(capsys, "info", "--config", str(file))
        assert code in (0, 2), (field, d.get(field), err)
        if code == 2:
            refused += 1
            assert len(err) == 1 and err[0].startswith("jamba info: error: "), (field, d.get(field), err)
    assert refused > 150  # most mutations make a config that cannot describe a model
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"config_{i}.json" for i in range(300))


@pytest.mark.parametrize("change,message", [
    ({"hidden_size": 10**9}, "hidden_size is 1000000000; expected an integer in \\[1, 65,536\\]"),
    ({"num_hidden_layers": -3}, "num_hidden_layers is -3"),
    ({"num_attention_heads": 0}, "num_attention_heads is 0"),
    ({"vocab_size": 1e6}, "vocab_size is 1000000.0"),
    ({"mamba_conv_bias": "yes"}, "mamba_conv_bias is 'yes'; expected true or false"),
    ({"rms_norm_eps": -1e-6}, "rms_norm_eps is -1e-06"),
    ({"dtype": "int8"}, "dtype is 'int8'; expected one of float32, bfloat16, float16"),
    ({"eos_token_id": [2, 10**9]}, "eos_token_id is"),
    ({"attn_layer_offset": 1.0}, "attn_layer_offset is 1.0; expected an integer >= 0"),
])
def test_config_values_are_checked_before_use(change, message):
    with pytest.raises(ConfigError, match=message):
        JambaConfig.from_dict(TINY.to_dict() | change)


def test_generation_is_bounded_before_allocating():
    model = random_model(TINY)
    with pytest.raises(ValueError, match="the largest max_new_tokens whose cache fits is [0-9,]+$"):
        jamba_jax.generate(model, [[1, 2, 3]], max_new_tokens=10**12)
    with pytest.raises(ValueError, match="a cache of 1 x 100,000,000,000 tokens needs .* GiB free"):
        jamba_jax.init_cache(model, 1, 10**11)
    for bad in (2.5, True, 0):
        with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
            jamba_jax.generate(model, [[1, 2, 3]], max_new_tokens=bad)
    with pytest.raises(ValueError, match="token id 2.7, not an integer"):
        jamba_jax.generate(model, [[1, 2.7, 3]])
    with pytest.raises(ValueError, match="temperature must be >= 0, got nan"):
        jamba_jax.generate(model, [[1, 2, 3]], temperature=float("nan"))


def test_chat_template_output_is_bounded():
    looping = "{% for i in range(100000) %}{% for j in range(100000) %}{{ messages[0].content }}{% endfor %}{% endfor %}"
    with pytest.raises(ValueError, match="rendered more than 1,000 characters"):
        render_chat([{"role": "user", "content": "abcdefgh"}], looping, max_chars=1000)
    with pytest.raises(ValueError, match="chat template error: Range too big"):  # the sandbox's own limit
        render_chat([{"role": "user", "content": "a"}], "{% for i in range(10**9) %}{% endfor %}")
    assert render_chat([{"role": "user", "content": "hi"}]).endswith("<|assistant|>")


def test_cli_errors_are_one_line(capsys, monkeypatch):
    code, err = run_cli(capsys, "generate", "--prompt", "x", "--dtype", "foo")
    assert code == 2 and len(err) == 1 and "invalid choice: 'foo'" in err[0]
    code, err = run_cli(capsys, "generate", "--prompt", "ab\udcff")  # bytes that are not UTF-8
    assert code == 2 and err == ["jamba generate: error: --prompt is not valid UTF-8 (at character 2); "
                                 "pass UTF-8 text"]
    code, err = run_cli(capsys, "generate", "--prompt", "x", "--max-new-tokens", str(10**12))
    assert code == 2 and len(err) == 1 and "whose cache fits" in err[0]

    def broken(*args, **kwargs):
        raise RuntimeError("something\nunexpected")

    monkeypatch.setattr(jamba_jax.config.JambaConfig, "named", broken)
    monkeypatch.delenv("JAMBA_TRACEBACK", raising=False)
    code, err = run_cli(capsys, "info", "--config", "jamba-tiny")
    assert code == 1 and err == ["jamba info: internal error: RuntimeError: something unexpected "
                                 "(set JAMBA_TRACEBACK=1 to see the traceback)"]
    monkeypatch.setenv("JAMBA_TRACEBACK", "1")
    with pytest.raises(RuntimeError, match="something"):
        main(["info", "--config", "jamba-tiny"])


def _index(directory):
    return directory / "model.safetensors.index.json"


@pytest.fixture()
def sharded_checkpoint(tmp_path):
    from hf_reference import SMALL_CHECKPOINT, make_checkpoint

    make_checkpoint(tmp_path, seed=0, max_shard_size="20KB", **SMALL_CHECKPOINT)
    assert _index(tmp_path).is_file()
    return tmp_path


@pytest.mark.parametrize("name,message", [
    ("../outside.safetensors", "not a file inside the checkpoint directory"),
    ("/etc/passwd", "not a file inside the checkpoint directory"),
    ("", "not a file inside the checkpoint directory"),
    (7, "'weight_map' must map tensor names to file names"),
])
def test_index_entries_stay_inside_the_checkpoint(sharded_checkpoint, name, message):
    index = json.loads(_index(sharded_checkpoint).read_text())
    key = sorted(index["weight_map"])[0]
    index["weight_map"][key] = name
    _index(sharded_checkpoint).write_text(json.dumps(index))
    with pytest.raises(jamba_jax.CheckpointError, match=message):
        jamba_jax.load(sharded_checkpoint)


def test_index_weight_map_must_be_an_object(sharded_checkpoint):
    _index(sharded_checkpoint).write_text(json.dumps({"weight_map": ["a", "b"]}))
    with pytest.raises(jamba_jax.CheckpointError, match="'weight_map' must map tensor names to file names"):
        jamba_jax.load(sharded_checkpoint)


def test_non_finite_weights_are_refused_by_name(sharded_checkpoint):
    from safetensors.numpy import load_file, save_file

    weight_map = json.loads(_index(sharded_checkpoint).read_text())["weight_map"]
    key = "model.layers.0.mamba.A_log"
    file = sharded_checkpoint / weight_map[key]
    tensors = load_file(file)
    tensors[key] = tensors[key].copy()
    tensors[key].flat[[0, 3]] = [np.nan, np.inf]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(jamba_jax.CheckpointError, match=f"tensor '{key}' holds 2 NaN/Inf value"):
        jamba_jax.load(sharded_checkpoint)
    out = sharded_checkpoint.parent / "converted"
    assert main(["convert", str(sharded_checkpoint), str(out)]) == 2 and not out.exists()
    model = jamba_jax.load(sharded_checkpoint, allow_nonfinite=True)
    assert np.isnan(np.asarray(model.params["blocks"]["layer_0"]["mamba"]["A_log"])).sum() == 1
    assert main(["convert", str(sharded_checkpoint), str(out), "--allow-nonfinite"]) == 0 and out.is_dir()


def _mutate_header(file, rng):
    """Rewrites the JSON header of a safetensors file with one entry's field replaced by a bad value; the
    data section is left as it is (its offsets are relative to the header's end)."""
    raw = file.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    key = sorted(k for k in header if k != "__metadata__")[rng.integers(len(header) - 1)]
    field = ["dtype", "shape", "data_offsets"][rng.integers(3)]
    value = header[key][field]
    choices = {"dtype": ["I8", "F64", "BOOL", "X", 3, None],
               "shape": [[], [-1], [2**40, 2**40], [0], "abc", value[::-1] if isinstance(value, list) else []],
               "data_offsets": [[0, 2**40], [5, 1], [-4, 8], "x", [0]]}[field]
    header[key][field] = choices[rng.integers(len(choices))]
    text = json.dumps(header).encode()
    file.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + size:])
    return f"{file.name}:{key}.{field}={header[key][field]!r}"


def _mutate_index(index, rng):
    d = json.loads(index.read_text())
    key = sorted(d["weight_map"])[rng.integers(len(d["weight_map"]))]
    kind = rng.integers(4)
    if kind == 0:
        d["weight_map"][key] = ["../x.safetensors", "/tmp", "", "nope.safetensors", 5, None][rng.integers(6)]
    elif kind == 1:
        del d["weight_map"][key]
    elif kind == 2:
        d["weight_map"]["model.layers.99.bogus.weight"] = d["weight_map"][key]
    else:
        d = {"weight_map": [[], "x", None, {"a": 1}][rng.integers(4)]}
    index.write_text(json.dumps(d))
    return f"index:{kind}:{key}"


def test_randomized_checkpoint_mutations_end_in_one_line(sharded_checkpoint, tmp_path_factory, capsys):
    """Seeded mutations of safetensors headers and of the index: `jamba convert` either converts (the
    mutation left a valid checkpoint) or exits 2 with one line, leaving nothing at or beside the
    destination."""
    import shutil

    rng = np.random.default_rng(0)
    shards = sorted(sharded_checkpoint.glob("*.safetensors"))
    refused = 0
    for case in range(120):
        work = tmp_path_factory.mktemp(f"case{case}")
        src = work / "hf"
        shutil.copytree(sharded_checkpoint, src)
        if rng.random() < 0.5:
            what = _mutate_header(src / shards[rng.integers(len(shards))].name, rng)
        else:
            what = _mutate_index(_index(src), rng)
        code, err = run_cli(capsys, "convert", str(src), str(work / "out"))
        assert code in (0, 2), (what, err)
        if code == 2:
            refused += 1
            assert len(err) == 1 and err[0].startswith("jamba convert: error: "), (what, err)
            assert sorted(p.name for p in work.iterdir()) == ["hf"], (what, list(work.iterdir()))
        shutil.rmtree(work)
    assert refused >= 100


def test_huge_generation_is_refused_under_a_memory_cap():
    """`jamba generate` asked for a trillion tokens, in a process capped at 6 GiB of address space: one line
    and exit 2, not an out-of-memory crash (the cache is sized before anything is allocated)."""
    import subprocess
    import sys

    script = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30)); "
              "from jamba_jax.cli import main; sys.exit(main(sys.argv[1:]))")
    out = subprocess.run([sys.executable, "-c", script, "generate", "--prompt", "x", "--max-new-tokens",
                          str(10**12)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "the largest max_new_tokens whose cache fits is" in lines[0], lines
