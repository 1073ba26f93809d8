"""The one table between HF checkpoint keys and this project's param pytree.

Each HF tensor maps to a param leaf ``path``, an ``index`` into that leaf (block and/or expert axes
for stacked params; empty for whole leaves) and a layout ``transform`` with its inverse. The loader
and the converter both read this table.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import numpy as np

from ..config import ATTENTION, JambaConfig
from ..model import layer_location


@dataclasses.dataclass(frozen=True)
class Layout:
    """How an HF tensor becomes ours (``to_jax``) and back (``to_hf``)."""

    name: str
    to_jax: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


SAME = Layout("same", lambda a: a, lambda a: a)
# torch Linear weight [out, in] <-> kernel [in, out]
LINEAR = Layout("linear", lambda a: a.T, lambda a: a.T)
# Mamba in_proj weight [2 * d_inner, in] <-> kernel [in, 2, d_inner] (x and z halves on their own axis)
IN_PROJ = Layout("in_proj", lambda a: a.T.reshape(a.shape[1], 2, -1), lambda a: a.reshape(a.shape[0], -1).T)
IN_PROJ_BIAS = Layout("in_proj_bias", lambda a: a.reshape(2, -1), lambda a: a.reshape(-1))
# torch depthwise Conv1d weight [channels, 1, width] <-> [width, channels]
CONV = Layout("conv", lambda a: a[:, 0, :].T, lambda a: a.T[:, None, :])


@dataclasses.dataclass(frozen=True)
class Entry:
    hf_key: str
    path: tuple[str, ...]
    index: tuple[int, ...]
    layout: Layout


_NORMS = {"input_layernorm.weight": ("input_layernorm", "weight"),
          "pre_ff_layernorm.weight": ("pre_ff_layernorm", "weight")}


def _mixer_keys(config: JambaConfig, mixer: str):
    if mixer == ATTENTION:
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            yield f"self_attn.{p}.weight", ("self_attn", p, "kernel"), LINEAR
        return
    m = "mamba"
    yield f"{m}.in_proj.weight", (m, "in_proj", "kernel"), IN_PROJ
    yield f"{m}.x_proj.weight", (m, "x_proj", "kernel"), LINEAR
    yield f"{m}.dt_proj.weight", (m, "dt_proj", "kernel"), LINEAR
    yield f"{m}.dt_proj.bias", (m, "dt_bias"), SAME
    yield f"{m}.out_proj.weight", (m, "out_proj", "kernel"), LINEAR
    if config.mamba_proj_bias:
        yield f"{m}.in_proj.bias", (m, "in_proj", "bias"), IN_PROJ_BIAS
        yield f"{m}.out_proj.bias", (m, "out_proj", "bias"), SAME
    yield f"{m}.conv1d.weight", (m, "conv_kernel"), CONV
    if config.mamba_conv_bias:
        yield f"{m}.conv1d.bias", (m, "conv_bias"), SAME
    yield f"{m}.A_log", (m, "A_log"), SAME
    yield f"{m}.D", (m, "D"), SAME
    for n in ("dt", "b", "c"):
        yield f"{m}.{n}_layernorm.weight", (m, f"{n}_layernorm", "weight"), SAME


def _ffn_keys(config: JambaConfig, moe: bool):
    f = "feed_forward"
    projs = ("gate_proj", "up_proj", "down_proj")
    if not moe:
        for p in projs:
            yield f"{f}.{p}.weight", (f, p, "kernel"), LINEAR, ()
        return
    yield f"{f}.router.weight", (f, "router", "kernel"), LINEAR, ()
    for e in range(config.num_experts):
        for p in projs:
            yield f"{f}.experts.{e}.{p}.weight", (f, "experts", p), LINEAR, (e,)


def checkpoint_entries(config: JambaConfig) -> Iterator[Entry]:
    """Every tensor of an HF Jamba checkpoint for ``config``, in layer order."""
    yield Entry("model.embed_tokens.weight", ("embed_tokens", "embedding"), (), SAME)
    for i, (mixer, moe) in enumerate(config.layer_plan):
        prefix, block = layer_location(config, i)
        stack = () if block is None else (block,)
        hf = f"model.layers.{i}."
        for key, path in _NORMS.items():
            yield Entry(hf + key, prefix + path, stack, SAME)
        for key, path, layout in _mixer_keys(config, mixer):
            yield Entry(hf + key, prefix + path, stack, layout)
        for key, path, layout, expert in _ffn_keys(config, moe):
            yield Entry(hf + key, prefix + path, stack + expert, layout)
    yield Entry("model.final_layernorm.weight", ("final_layernorm", "weight"), (), SAME)
    if not config.tie_word_embeddings:
        yield Entry("lm_head.weight", ("lm_head", "kernel"), (), LINEAR)
