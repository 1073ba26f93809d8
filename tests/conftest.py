"""Test-session settings. Under pytest-xdist (``-n``, the default in pyproject.toml) each worker runs
whole files on its share of the cores; torch then uses one thread, because OpenMP's spinning threads
on a core another worker is using run an order of magnitude slower (docs/benchmarks.md)."""

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    torch.set_num_threads(1)
