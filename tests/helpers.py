"""What the tests share: the relative error they bound, and random params and models.

- ``random_params``: the model's own init plus N(0, 0.3) noise, larger than the 0.02 init so that every
  branch matters (norm weights stay near 1, ``A_log`` near ``log(1..d_state)``).
- ``scaled_params`` (``jamba_jax.params.scaled_params``): params at the scales of ``hf_reference.py``, so
  activations stay O(1) through the layers: for tests that compare int8 or bf16 errors.
"""

import functools

import jax
import numpy as np

import jamba_jax
from jamba_jax import init_params
from jamba_jax.params import scaled_params  # noqa: F401  (shared with the benchmarks)


def rel_err(got, ref, mask=None) -> float:
    """``max |got - ref| / max |ref|`` in float64, over ``mask`` (a boolean index) when given."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    if mask is not None:
        got, ref = got[np.asarray(mask)], ref[np.asarray(mask)]
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))


@functools.lru_cache(maxsize=16)
def random_params(config, seed: int = 0):
    """Params of ``config`` (fp32). The init runs compiled with an ``unsafe_rbg`` key (threefry's bit
    generator, once per param, makes the compile several times slower) and numpy draws the noise."""
    params = init_params(config, jax.random.key(seed, impl="unsafe_rbg"))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: p + (0.3 * rng.standard_normal(p.shape)).astype(p.dtype), params)


def random_model(config, seed: int = 0, scan: str = "associative") -> jamba_jax.Jamba:
    """A model of ``config`` on ``random_params``, running the scan named ``scan`` (``Kernels.scan``)."""
    return jamba_jax.Jamba(config, random_params(config, seed), kernels=jamba_jax.Kernels(scan=scan))


def triton_kernels_for_cuda(fn, *args) -> int:
    """The number of Pallas Triton kernels in ``fn`` lowered for CUDA on abstract ``args`` (any backend: the
    lowering needs no GPU); skips the test where this jaxlib has no Triton dialect."""
    import pytest
    from jax import export

    try:
        exported = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[
            export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
    except (ImportError, ModuleNotFoundError) as e:  # a jaxlib built without the Triton dialect
        pytest.skip(f"no Triton lowering in this jaxlib: {e}")
    return exported.mlir_module().count("xla.gpu.triton")
