"""Test-session settings. Under pytest-xdist (``-n``, the default in pyproject.toml) each worker runs
whole files on its share of the cores; torch then uses one thread, because OpenMP's spinning threads
on a core another worker is using run an order of magnitude slower (docs/benchmarks.md)."""

import os

# The CLI's persistent compilation cache stays off in tests (compile counts and times must be real, and
# nothing is written under the user's home); tests that exercise it pass a directory of their own.
os.environ.setdefault("JAMBA_COMPILATION_CACHE", "off")

if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    torch.set_num_threads(1)
