"""Pallas's Mosaic GPU backend (``plgpu``) and its GPU interpret mode, imported in one place.

Mosaic GPU is the Pallas GPU backend JAX keeps (the Triton one is deprecated since JAX 0.11). Its kernels
run on Hopper (TMA, wgmma) and, through *GPU interpret mode*, on any backend: ``plgpu.kernel(...,
interpret=interpret_params())`` simulates SMEM, TMA copies with their barriers and wgmma on the CPU.

- ``plgpu``: ``jax.experimental.pallas.mosaic_gpu`` (``None`` where it does not import; ``require_plgpu``
  raises the reason).
- ``interpret_params(**kw)``: an ``InterpretGPUParams``. Newer JAX exports it as
  ``jax.experimental.pallas.mosaic_gpu.InterpretGPUParams``; JAX 0.10.x only has the private
  ``jax._src.pallas.mosaic_gpu.interpret.params.InterpretGPUParams``. Either is used, else ImportError.
- ``reset_interpret_state()``: JAX asks for ``reset_gpu_interpret_mode_state`` after an exception inside
  an interpreted kernel, before the next one.
"""

from __future__ import annotations

import jax

try:
    from jax.experimental.pallas import mosaic_gpu as plgpu
    _IMPORT_ERROR: Exception | None = None
except Exception as e:  # noqa: BLE001  # pragma: no cover - a jax without the Mosaic GPU backend
    plgpu = None
    _IMPORT_ERROR = e


def mma_operands(dtype, kernel: str):
    """``(operand dtype, parts)`` of a Mosaic GPU kernel's wgmma for inputs of ``dtype``: bf16/fp16 as
    themselves (one part); fp32 as three bf16 parts whose fp32 sum is the value (wgmma has no full-fp32
    mode, and each bf16 x bf16 product is exact in fp32). Other dtypes: a TypeError naming ``kernel``."""
    import jax.numpy as jnp

    dtype = jnp.dtype(dtype)
    if dtype == jnp.float32:
        return jnp.dtype(jnp.bfloat16), 3
    if dtype in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return dtype, 1
    raise TypeError(f"{kernel}: inputs must be bfloat16, float16 or float32, got {dtype}")


def require_plgpu():
    """``plgpu``, or an ImportError saying why it is missing."""
    if plgpu is None:
        raise ImportError(f"jax {jax.__version__}: jax.experimental.pallas.mosaic_gpu does not import "
                          f"({_IMPORT_ERROR!r}); the Mosaic GPU kernels need it") from _IMPORT_ERROR
    return plgpu


def interpret_params_class():
    """The ``InterpretGPUParams`` class: the public name if this JAX has one, else the private module."""
    cls = getattr(plgpu, "InterpretGPUParams", None)
    if cls is not None:
        return cls
    try:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    except ImportError as e:
        raise ImportError(
            f"jax {jax.__version__} has no Pallas GPU interpret mode (neither "
            "jax.experimental.pallas.mosaic_gpu.InterpretGPUParams nor "
            "jax._src.pallas.mosaic_gpu.interpret.params.InterpretGPUParams); it appeared in jax 0.10. "
            "Run the Mosaic GPU kernels on a GPU, or use the XLA path") from e
    return InterpretGPUParams


def interpret_params(**kwargs):
    """``InterpretGPUParams(**kwargs)``: pass it as ``interpret=`` to run a Mosaic GPU kernel on any backend."""
    return interpret_params_class()(**kwargs)


def reset_interpret_state() -> None:
    """Clears GPU interpret mode's simulated memory; needed after an exception inside an interpreted kernel."""
    try:
        from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import (
            reset_gpu_interpret_mode_state,
        )
    except ImportError:  # pragma: no cover
        reset = getattr(plgpu, "reset_gpu_interpret_mode_state", None)
        if reset is not None:
            reset()
        return
    reset_gpu_interpret_mode_state()
