"""`jamba info`: parameter counts and cache sizes of the released configs (paper Table 1)."""

import json

import pytest

from jamba_jax.cli import main

GiB = 2**30


def info_json(capsys, *args):
    assert main(["info", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("name,total,active,kv_gib", [
    ("jamba-1.5-mini", 51.57e9, 12.11e9, 4),
    ("jamba-1.5-large", 398.6e9, 94.2e9, 9),
])
def test_released_sizes(capsys, name, total, active, kv_gib):
    info = info_json(capsys, "--config", name, "--context", "262144")
    assert abs(info["total_params"] / total - 1) < 0.01
    assert abs(info["active_params"] / active - 1) < 0.01
    assert info["kv_cache_bytes"] == kv_gib * GiB
    assert info["param_bytes_by_dtype"] == {"bfloat16": 2 * info["total_params"]}
    assert 0 < info["mamba_state_bytes"] < 0.1 * GiB


def test_cache_bytes_scale_with_context_and_batch(capsys):
    a = info_json(capsys, "--config", "jamba-1.5-mini", "--context", "1024")
    b = info_json(capsys, "--config", "jamba-1.5-mini", "--context", "2048", "--batch", "3")
    assert b["kv_cache_bytes"] == 6 * a["kv_cache_bytes"]
    assert b["mamba_state_bytes"] == 3 * a["mamba_state_bytes"]  # O(1) in context


def test_text_output(capsys):
    assert main(["info", "--config", "jamba-1.5-mini"]) == 0
    out = capsys.readouterr().out
    assert "51.57B" in out and "12.11B" in out and "4.00 GiB" in out


def test_bad_config_is_one_line_error(capsys):
    assert main(["info", "--config", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("jamba info: error: unknown config 'no-such-model'")


def test_console_entry_point():
    import shutil
    import subprocess

    exe = shutil.which("jamba")
    assert exe, "the `jamba` console script is not installed"
    ok = subprocess.run([exe, "info", "--config", "jamba-tiny"], capture_output=True, text=True)
    assert ok.returncode == 0 and "total params" in ok.stdout
    bad = subprocess.run([exe, "info", "--config", "jamba-tiny", "--context", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and bad.stderr.count("\n") == 1
