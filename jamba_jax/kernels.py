"""`Kernels`: the one option that picks which implementation runs each of the model's three hot spots.

Given once (``jamba_jax.load(..., kernels="pallas")``, ``Jamba.with_kernels``, ``TrainConfig.kernels``)
and honoured everywhere the model runs: ``forward``, ``prefill``, ``decode_step``, ``generate`` and the
training loss. Every field names the implementation of one computation:

- ``scan``: the Mamba selective scan (``scan.SCAN_IMPLS``): ``"xla"`` (the backend's best XLA scan),
  ``"associative"``, ``"sequential"`` (the float32 oracle), ``"pallas"``, ``"pallas-interpret"``,
  ``"pallas-single"``, ``"pallas-single-interpret"`` (the single-pass kernel, its exp2s split with an FMA
  polynomial; not a preset).
- ``attention``: the attention over the cache (``attention.ATTENTION_IMPLS``): ``"xla"``, ``"pallas"``,
  ``"pallas-interpret"``, ``"mosaic"``, ``"mosaic-interpret"`` (prefill chunks by the Mosaic GPU flash
  kernel, TMA + wgmma; decode by XLA's split-K path; not a preset).
- ``moe_int8``: the grouped matmul of ExpertsInt8 weights (``quant.MOE_INT8_IMPLS``): ``"xla"``,
  ``"pallas"``, ``"pallas-interpret"``, ``"mosaic"``, ``"mosaic-interpret"`` (the Mosaic GPU kernel, TMA +
  wgmma; not a preset). Float expert weights always take XLA's grouped matmul, chosen by the backend
  (``moe.grouped_matmul``). At decode sizes (at most ``experts`` (token, choice) rows) off CPU the MoE
  reads only its routed experts (``moe``'s ``"slots"``): there ``"pallas"`` runs the expert-indexed kernel
  of ``pallas_kernels/expert_slots.py`` for int8 weights, the other values XLA.

``"pallas"`` runs the Pallas kernel on GPU and the XLA path on other backends; ``"pallas-interpret"`` runs
the kernel in Pallas's interpreter on any backend (slow; for tests). ``"mosaic"`` / ``"mosaic-interpret"``
do the same with the Mosaic GPU kernel (its interpreter: Pallas's GPU interpret mode).
"""

from __future__ import annotations

import dataclasses

PRESETS = ("xla", "pallas", "pallas-interpret")


def _choices(field: str) -> tuple[str, ...]:
    # Imported here: the implementations import the modules that import this one.
    if field == "scan":
        from .scan import SCAN_IMPLS
        return tuple(SCAN_IMPLS)
    if field == "attention":
        from .attention import ATTENTION_IMPLS
        return ATTENTION_IMPLS
    from .quant import MOE_INT8_IMPLS
    return MOE_INT8_IMPLS


@dataclasses.dataclass(frozen=True)
class Kernels:
    """The implementation of each hot spot; see the module docstring. Hashable: it is a static argument of
    the compiled functions."""

    scan: str = "xla"
    attention: str = "xla"
    moe_int8: str = "xla"

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value, known = getattr(self, field.name), _choices(field.name)
            if value not in known:
                raise ValueError(f"unknown Kernels.{field.name} {value!r}; expected one of "
                                 f"{', '.join(map(repr, known))}")

    @classmethod
    def named(cls, name: "str | Kernels") -> "Kernels":
        """``Kernels`` given as itself or by a preset name: ``"xla"``, ``"pallas"`` or ``"pallas-interpret"``
        (every field set to it)."""
        if isinstance(name, Kernels):
            return name
        if name not in PRESETS:
            raise ValueError(f"unknown kernels {name!r}; expected one of {', '.join(map(repr, PRESETS))} "
                             "or a jamba_jax.Kernels")
        return cls(name, name, name)

    def replace(self, **changes) -> "Kernels":
        return dataclasses.replace(self, **changes)
