"""The HF checkpoint keys of a config, derived from the param table (``jamba_jax.params``).

Each HF tensor maps to a param leaf ``path``, an ``index`` into that leaf (block and/or expert axes
for stacked params; empty for whole leaves) and the row's layout (``to_jax`` and its inverse ``to_hf``).
The loader and both converters read this list.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

from ..config import JambaConfig
from ..params import MODEL, Layout, layer_location, param_leaves


@dataclasses.dataclass(frozen=True)
class Entry:
    hf_key: str
    path: tuple[str, ...]
    index: tuple[int, ...]
    layout: Layout


def checkpoint_entries(config: JambaConfig) -> Iterator[Entry]:
    """Every tensor of an HF Jamba checkpoint for ``config``: the top-level ones, then layer by layer."""
    by_layer: dict[tuple[str, ...], list] = {}
    for leaf in param_leaves(config):
        if leaf.row.scope == MODEL:
            yield Entry(leaf.row.hf_key, leaf.path, (), leaf.row.layout)
        else:
            by_layer.setdefault(leaf.path[:2], []).append(leaf)
    for i in range(config.num_hidden_layers):
        prefix, block = layer_location(config, i)
        stack = () if block is None else (block,)
        for leaf in by_layer[prefix]:
            key = f"model.layers.{i}.{leaf.row.hf_key}"
            experts = range(config.num_experts) if leaf.row.per_expert else (None,)
            for e in experts:
                yield Entry(key.format(e=e), leaf.path, stack + (() if e is None else (e,)), leaf.row.layout)
