"""`jamba bench` (the serving protocol on a tiny config) and `jamba info --table` (paper Table 1)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jamba_jax.bench import BenchError, attention_baseline, param_counts, parse_lengths
from jamba_jax.cli import main
from jamba_jax.config import JambaConfig
from jamba_jax.info import kv_cache_table


def test_parse_lengths():
    assert parse_lengths("2K, 1k,512,1024") == [512, 1024, 2048]
    for bad in ("", "1K,x", "0", "-4", "1.5K"):
        with pytest.raises(BenchError):
            parse_lengths(bad)


def test_attention_baseline_matches_parameter_count():
    hybrid = JambaConfig.named("jamba-tiny")
    base = attention_baseline(hybrid)
    assert base.num_attention_layers == base.num_hidden_layers == hybrid.num_hidden_layers
    assert (base.hidden_size, base.num_experts, base.num_key_value_heads) == (
        hybrid.hidden_size, hybrid.num_experts, hybrid.num_key_value_heads)
    assert [moe for _, moe in base.layer_plan] == [moe for _, moe in hybrid.layer_plan]
    total, base_total = param_counts(hybrid)["total"], param_counts(base)["total"]
    assert abs(base_total / total - 1) < 0.02


def test_kv_cache_table_reproduces_paper_table_1(capsys):
    rows = kv_cache_table(262144, "bfloat16")
    assert {r["model"] for r in rows} >= {"jamba-1.5-mini", "jamba-1.5-large", "LLaMA-3.1-70B", "Mixtral-8x22B"}
    for r in rows:
        assert r["kv_cache_bytes"] == r["paper_gb"] * 2**30, r["model"]
    assert main(["info", "--table", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == rows
    assert main(["info", "--table", "--context", "131072"]) == 0
    out = capsys.readouterr().out
    assert "jamba-1.5-mini" in out and "2.00 GiB" in out and "44.00 GiB" in out  # Mistral-Large-2 at 128K


def test_bench_cli_writes_json_and_plots(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "--config", "jamba-tiny", "--lengths", "16", "--new", "4", "--out", str(out)]) == 0
    result = json.loads((out / "bench.json").read_text())
    assert set(result["models"]) == {"jamba_jax", "hf", "attention"}
    for model in result["models"].values():
        (row,) = model["rows"]
        assert row["context"] == 16 and row["new_tokens"] == 4
        assert row["latency_s"] > 0 and row["prefill_tok_s"] > 0 and row["decode_tok_s"] > 0
    assert result["models"]["attention"]["attention_layers"] == 8
    assert result["machine"]["cpu_count"] >= 1 and "load_average_at_start" in result["machine"]
    (ratio,) = result["ratios"]
    assert ratio["prefill_vs_hf"] > 0 and ratio["decode_vs_hf"] > 0
    for name in ("latency", "output_tokens_per_second", "time_per_output_token", "prefill", "memory"):
        assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert "jamba_jax (hybrid)" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["--config", "no-such-model"], "unknown config 'no-such-model'"),
    (["--lengths", "1K,two"], "bad context length 'two'"),
    (["--lengths", "0"], "context lengths must be positive"),
    (["--new", "1"], "--new must be at least 2"),
    (["--repeats", "0"], "--repeats must be at least 1"),
])
def test_bench_bad_input_is_one_line_error(capsys, args, message):
    assert main(["bench", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("jamba bench: error: ") and message in err


def test_bench_console_script_bad_input():
    beside = Path(sys.executable).with_name("jamba")  # the venv's script, activated or not
    exe = str(beside) if beside.is_file() else shutil.which("jamba")
    assert exe, "the `jamba` console script is not installed"
    bad = subprocess.run([exe, "bench", "--lengths", "abc"], capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and bad.stderr.count("\n") == 1
