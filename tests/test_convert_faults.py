"""Faults during `jamba convert`, with real processes: signals, two writers, a directory appearing at the
destination, a dead run's partial output."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hf_reference import SMALL_CHECKPOINT, make_checkpoint
from jamba_jax.cli import main

CONFIG = SMALL_CHECKPOINT

# `jamba convert SRC DST` that, after writing its third leaf, writes READY and waits for GO to exist.
PAUSING_CONVERT = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    from jamba_jax.cli import main
    from jamba_jax.convert import orbax_checkpoint

    # A process started in the background by a non-interactive shell (as a CI runner may start the suite)
    # inherits SIGINT ignored; give this one Ctrl-C's default, as a terminal would.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    src, dst, ready, go = sys.argv[1:]
    write, count = orbax_checkpoint.LeafWriter.write, [0]

    def pausing_write(self, leaves):
        write(self, leaves)
        count[0] += 1
        if count[0] == 3:
            Path(ready).write_text(str(os.getpid()))
            while not Path(go).exists():
                time.sleep(0.02)

    orbax_checkpoint.LeafWriter.write = pausing_write
    orbax_checkpoint.GROUP_BYTES = 0  # one leaf per write
    sys.exit(main(["convert", src, dst]))
""")


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    directory = tmp_path_factory.mktemp("faults") / "hf"
    make_checkpoint(directory, seed=2, max_shard_size="40KB", **CONFIG)
    return directory


def leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}."))


class Paused:
    """A conversion into ``dst`` in its own process, paused after its third leaf."""

    def __init__(self, hf: Path, dst: Path):
        self.ready, self.go = dst.parent / f"ready-{dst.name}", dst.parent / f"go-{dst.name}"
        self.proc = subprocess.Popen([sys.executable, "-c", PAUSING_CONVERT, str(hf), str(dst), str(self.ready),
                                      str(self.go)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while not self.ready.exists():
            assert self.proc.poll() is None, self.proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the conversion did not start"
            time.sleep(0.05)

    def resume(self):
        self.go.write_text("")
        return self.finish()

    def finish(self):
        try:
            _, err = self.proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # never leave a paused conversion behind
            self.proc.communicate()
            raise
        return self.proc.returncode, err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signal_mid_conversion_leaves_nothing(hf, tmp_path, sig):
    run = Paused(hf, tmp_path / "out")
    assert leftovers(tmp_path, "out")  # the partial output and the lock exist while it runs
    run.proc.send_signal(sig)
    code, err = run.finish()
    assert code == 130 and "interrupted" in err and "Traceback" not in err, err
    assert leftovers(tmp_path, "out") == []


def test_a_second_writer_fails_cleanly(hf, tmp_path, capsys):
    run = Paused(hf, tmp_path / "out")
    capsys.readouterr()
    assert main(["convert", str(hf), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another conversion is writing it" in err and str(run.proc.pid) in err, err
    code, err = run.resume()
    assert code == 0, err
    assert leftovers(tmp_path, "out") == ["out"] and (tmp_path / "out" / "manifest.json").is_file()


def test_a_directory_created_at_the_destination_mid_run_survives(hf, tmp_path):
    run = Paused(hf, tmp_path / "out")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep me")
    code, err = run.resume()
    assert code == 2 and err.count("\n") == 1 and "created by another process during the conversion" in err, err
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep me"
    assert leftovers(tmp_path, "out") == ["out"]
    # an empty one too (a plain rename would replace it silently)
    (tmp_path / "out" / "mine.txt").unlink()
    run = Paused(hf, tmp_path / "out2")
    (tmp_path / "out2").mkdir()
    code, err = run.resume()
    assert code == 2 and "created by another process" in err, err
    assert list((tmp_path / "out2").iterdir()) == []


def test_a_dead_runs_partial_is_reported_and_removed(hf, tmp_path, capsys):
    run = Paused(hf, tmp_path / "out")
    run.proc.kill()  # SIGKILL: no cleanup
    run.finish()
    partials = [p for p in leftovers(tmp_path, "out") if ".partial-" in p]
    assert len(partials) == 1
    capsys.readouterr()
    assert main(["convert", str(hf), str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert f"removing {tmp_path / partials[0]}, left by an interrupted conversion" in err, err
    assert leftovers(tmp_path, "out") == ["out"]


def test_lock_is_not_taken_by_a_refused_run(hf, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    assert main(["convert", str(hf), str(tmp_path / "out")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert leftovers(tmp_path, "out") == ["out"]
    assert os.listdir(tmp_path / "out") == []
