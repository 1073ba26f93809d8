"""Feed-forward blocks: the dense SiLU-gated MLP and the top-k mixture of experts.

The MoE is dropless: every (token, choice) pair goes through its expert, and the grouped matmul that does
it is picked in one place, ``grouped_matmul()``, at trace time from ``jax.default_backend()`` and the
number of pairs:

- ``"ragged_dot"`` (GPU, TPU, above decode sizes): the pairs are sorted by expert and each projection is one
  ``jax.lax.ragged_dot`` over the experts' contiguous runs of rows. The GPU benchmarks measured this path.
- ``"tiled"`` (CPU): XLA's CPU ``ragged_dot`` runs several times slower than a dense matmul of the same
  FLOPs, so the pairs are laid out expert by expert, each expert's run padded with zero rows to a multiple
  of ``row_quantum(tile)`` rows (16 for the usual 64-row tile), and a static-length loop runs the whole
  FFN piece by piece with that piece's expert weights: whole tiles of ``row_tile`` rows, then one smaller
  piece for the rest of the run (a ``lax.switch`` over the few piece sizes), skipping the pieces past the
  last expert's run. At most ``rows + min(experts, rows) * (quantum - 1)`` rows, rounded up to a quantum;
  the padding rows are zero and dropped again.
  A few rows (at most half the expert count: decode) skip the loop: each (token, choice) row runs its
  expert's FFN on its own (``_rows_ffn``). The same products as ``ragged_dot``, summed in
  pieces of the contraction (``_split_dot``): fp32 results agree within 5e-7 of the largest output at
  jamba-small shapes. Reverse-differentiable (a static-length loop). ``benchmarks/moe_grouped_cpu.py``
  times the two against CPU ``ragged_dot``, which masks the rows and contracts over every expert at once
  (results in ``docs/generate.md``).

- ``"slots"`` (decode sizes off CPU: at most ``experts`` (token, choice) rows): the distinct experts the
  tokens were routed to, in at most ``min(rows, experts)`` static slots, each running its expert's FFN on
  every token (``_slots_ffn``): a step reads only its routed experts' weights, where ``ragged_dot`` on GPU
  streams all of them (docs/generate.md). A token routes to an expert at most once (top-k ids are
  distinct), so a slot's products are the grouped path's for the tokens routed there; the other tokens'
  are computed and weighted 0: free while the matmul is bound by reading the weight (2 FLOPs per token
  and weight element read, at most 16 at decode sizes of 16 experts top-2, against a ridge point of
  ~300 FLOPs a byte for bf16 on an H100/H200). Past ``experts`` rows every expert is likely routed, and
  the grouped matmul reads each once without the slots' extra FLOPs. ``forced_decode_matmul`` switches
  decode sizes to another path (benchmarks, tests).

Int8 weights (``QuantizedWeight``): on the tiled path each piece dequantizes only its expert's matrices
(``_expert_dot``), so the whole expert stack never exists in float; with ``impl="pallas-interpret"``, and
on GPU, the sorted layout with ``quant.int8_ragged_dot``, whose ``impl`` picks its kernel. On the slots
path ``quant.slot_matmul`` runs each slot's matmul, ``impl`` picking XLA or the Pallas kernel
(``pallas_kernels.expert_slots``); ``"mosaic"`` keeps the sorted layout (its kernel loads nothing for
experts without rows)."""

from __future__ import annotations

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp

from .config import JambaConfig
from .layers import Dtype, Linear
from .moe_parallel import sharded_experts_ffn
from .params import normal_init
from .quant import MOE_INT8_IMPLS, QuantizedWeight, int8_ragged_dot, slot_matmul


class MLP(nn.Module):
    """``down(silu(gate(x)) * up(x))``: ``[..., hidden]`` -> ``[..., hidden]`` in ``dtype``."""

    config: JambaConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        cfg = self.config
        gate = Linear(cfg.intermediate_size, dtype=self.dtype, name="gate_proj")(x)
        up = Linear(cfg.intermediate_size, dtype=self.dtype, name="up_proj")(x)
        return Linear(cfg.hidden_size, dtype=self.dtype, name="down_proj")(nn.silu(gate) * up)


def route(router_logits: jnp.ndarray, top_k: int):
    """fp32 softmax over all experts, then top-k; the k weights are not renormalised.

    router_logits ``[tokens, experts]`` -> (weights ``[tokens, k]`` fp32, expert ids ``[tokens, k]`` int32)."""
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    return jax.lax.top_k(probs, top_k)


GROUPED_MATMULS = ("ragged_dot", "tiled", "slots")
MAX_ROW_TILE = 128
ROW_QUANTUM = 16
DOT_PIECE, MAX_DOT_PIECES = 128, 8
_decode_override: list[str | None] = [None]  # set by ``forced_decode_matmul``


def decode_sized(rows: int, num_experts: int) -> bool:
    """Whether ``rows`` (token, choice) rows take the decode path (``"slots"``): at most ``num_experts``."""
    return rows <= num_experts


def grouped_matmul(rows: int | None = None, num_experts: int | None = None, int8_impl: str | None = None) -> str:
    """The MoE's grouped matmul on the default backend for ``rows`` (token, choice) rows over ``num_experts``
    experts (None: a prefill-sized input), with int8 weights multiplied by ``int8_impl`` (``Kernels.moe_int8``;
    None for float weights): ``"tiled"`` on CPU, else ``"slots"`` at decode sizes (``decode_sized``) and
    ``"ragged_dot"`` above. An interpreted kernel runs where it runs on GPU: ``"pallas-interpret"`` on the
    slots at decode sizes, both interpreted kernels on the sorted layout above; ``"mosaic"`` keeps the
    sorted layout at every size. Within ``forced_decode_matmul(name)``, decode sizes take ``name``."""
    decode = rows is not None and decode_sized(rows, num_experts)
    if decode and _decode_override[0] is not None:
        return _decode_override[0]
    mosaic = (int8_impl or "").startswith("mosaic")
    if (int8_impl or "").endswith("-interpret"):
        return "slots" if decode and not mosaic else "ragged_dot"
    if jax.default_backend() == "cpu":
        return "tiled"
    return "slots" if decode and not mosaic else "ragged_dot"


@contextlib.contextmanager
def forced_decode_matmul(name: str):
    """Within: every MoE input of decode size (``decode_sized``) runs the grouped matmul ``name`` (one of
    ``GROUPED_MATMULS``) instead of the backend's choice; larger inputs are unchanged. For comparing the
    decode paths in one process (benchmarks, tests). Compiled programs are dropped on entry and exit: the
    jit caches do not see the switch."""
    if name not in GROUPED_MATMULS:
        raise ValueError(f"unknown grouped matmul {name!r}; expected one of {GROUPED_MATMULS}")
    previous = _decode_override[0]
    jax.clear_caches()
    _decode_override[0] = name
    try:
        yield
    finally:
        _decode_override[0] = previous
        jax.clear_caches()


def row_tile(rows: int, num_experts: int) -> int:
    """Rows per tile of the ``"tiled"`` path: the power of two at or above the mean rows per expert, at most
    ``MAX_ROW_TILE`` (measured on CPU at jamba-small shapes, from 2 to 2048 rows). 1 for decode."""
    mean = -(-rows // num_experts)
    return min(MAX_ROW_TILE, 1 << (mean - 1).bit_length())


def experts_ffn(x, expert_ids, weights, gate_proj, up_proj, down_proj, impl: str = "xla",
                grouped: str | None = None):
    """Dropless grouped expert FFN.

    x ``[tokens, hidden]``; expert_ids, weights ``[tokens, k]``; gate_proj, up_proj
    ``[experts, hidden, inter]``; down_proj ``[experts, inter, hidden]``. Returns
    ``[tokens, hidden]`` in ``x.dtype``: ``sum_k weights[:, k] * down_e(silu(gate_e(x)) * up_e(x))``.
    Ids at or past the expert count contribute nothing. ``grouped`` (one of ``GROUPED_MATMULS``; default
    ``grouped_matmul(rows, experts, ...)``) picks the grouped matmul.
    A projection may be a ``QuantizedWeight`` (int8): ``impl`` (``Kernels.moe_int8``) then picks its matmul
    (``quant.int8_ragged_dot`` on the sorted layout, ``quant.slot_matmul`` on the slots).
    """
    if impl not in MOE_INT8_IMPLS:
        raise ValueError(f"unknown Kernels.moe_int8 {impl!r}; expected one of {', '.join(map(repr, MOE_INT8_IMPLS))}")
    projs = (gate_proj, up_proj, down_proj)
    quantized = any(isinstance(w, QuantizedWeight) for w in projs)
    grouped = grouped or grouped_matmul(expert_ids.size, gate_proj.shape[0], impl if quantized else None)
    if grouped not in GROUPED_MATMULS:
        raise ValueError(f"unknown grouped matmul {grouped!r}; expected one of {GROUPED_MATMULS}")
    if grouped == "slots":
        return _slots_ffn(x, expert_ids, weights, *projs, impl)
    if grouped == "tiled" and not (quantized and impl.endswith("-interpret")):  # the kernel needs the sorted layout
        projs = tuple(w if isinstance(w, QuantizedWeight) else w.astype(x.dtype) for w in projs)
        out = (_rows_ffn if few_rows(expert_ids, gate_proj.shape[0]) else _tiled_ffn)(x, expert_ids, *projs)
    else:
        out = _sorted_ffn(x, expert_ids, *projs, impl)
    out = out.reshape(*expert_ids.shape, -1) * weights[..., None].astype(x.dtype)
    return out.sum(axis=1)


def _sorted_ffn(x, expert_ids, gate_proj, up_proj, down_proj, impl):
    """The ``"ragged_dot"`` path: ``[tokens * k, hidden]``, the expert output of each (token, choice)."""
    tokens, top_k = expert_ids.shape
    num_experts = gate_proj.shape[0]
    flat_ids = expert_ids.reshape(-1)
    order = jnp.argsort(flat_ids, stable=True)  # rows of one expert become contiguous
    rows = x[order // top_k]  # [tokens * k, hidden]
    group_sizes = jnp.bincount(flat_ids, length=num_experts).astype(jnp.int32)

    def grouped(lhs, rhs):
        if isinstance(rhs, QuantizedWeight):
            return int8_ragged_dot(lhs, rhs, group_sizes, impl)
        return jax.lax.ragged_dot(lhs, rhs.astype(lhs.dtype), group_sizes)

    h = nn.silu(grouped(rows, gate_proj)) * grouped(rows, up_proj)
    out = grouped(h, down_proj)
    return jnp.zeros_like(out).at[order].set(out)


def slot_experts(expert_ids, num_experts: int):
    """``[min(rows, experts)]`` int32: the distinct experts ``expert_ids`` route to, ascending, then
    ``num_experts`` (an unused slot) for the slots left over. Ids at or past ``num_experts`` are ignored."""
    routed = jnp.zeros((num_experts,), bool).at[expert_ids.reshape(-1)].set(True, mode="drop")
    slots = min(expert_ids.size, num_experts)
    return jnp.nonzero(routed, size=slots, fill_value=num_experts)[0].astype(jnp.int32)


def _slots_ffn(x, expert_ids, weights, gate_proj, up_proj, down_proj, impl):
    """The ``"slots"`` path: ``[tokens, hidden]`` in ``x.dtype``, the weighted sum over each token's choices.

    Slot ``s`` runs expert ``e_s``'s FFN on every token, ``[slots, tokens, hidden]``; token ``t`` takes it
    with its routing weight for ``e_s`` (0 where it did not choose ``e_s``), summed in fp32. Each slot
    reads one expert's three matrices (``quant.slot_matmul``); an unused slot reads nothing with the Pallas
    kernel and a repeat of the last expert in XLA (none at one token: its top-k experts are distinct)."""
    num_experts = gate_proj.shape[0]
    slot_expert = slot_experts(expert_ids, num_experts)  # [slots]
    chose = (expert_ids[..., None] == slot_expert) & (expert_ids < num_experts)[..., None]  # [tokens, k, slots]
    coef = jnp.sum(jnp.where(chose, weights[..., None].astype(jnp.float32), 0.0), axis=1)  # [tokens, slots]
    h = nn.silu(slot_matmul(x, gate_proj, slot_expert, impl)) * slot_matmul(x, up_proj, slot_expert, impl)
    y = slot_matmul(h, down_proj, slot_expert, impl)  # [slots, tokens, hidden]
    return jnp.einsum("ts,sth->th", coef, y.astype(jnp.float32)).astype(x.dtype)


def _split_dot(a, w):
    """``a [rows, k] @ w [k, n]`` as a sum of dots over pieces of ``DOT_PIECE`` of the contraction (at most
    ``MAX_DOT_PIECES``). A single CPU dot sums all ``k`` products in one running fp32 sum; in pieces the
    rounding error is less than half of that (at jamba-small shapes), close to ``ragged_dot``'s, for ~10%
    more time."""
    k = a.shape[-1]
    piece = max(DOT_PIECE, -(-k // MAX_DOT_PIECES))
    out = a[:, :piece] @ w[:piece]
    for start in range(piece, k, piece):
        out = out + a[:, start:start + piece] @ w[start:start + piece]
    return out


def _expert_dot(a, w, e):
    """``a @ w[e]``; an int8 ``QuantizedWeight`` has only expert ``e``'s matrix dequantized (to ``a.dtype``),
    with fp32 accumulation and the scale applied after, as ``quant.int8_ragged_dot``'s XLA path."""
    if isinstance(w, QuantizedWeight):
        y = jnp.dot(a, w.q[e].astype(a.dtype), preferred_element_type=jnp.float32) * w.scale[e]
        return y.astype(a.dtype)
    return _split_dot(a, w[e])


def few_rows(expert_ids, num_experts: int) -> bool:
    """Whether the tiled path runs these (token, choice) pairs one row at a time (``_rows_ffn``): at most
    half the expert count of them, i.e. a decode step of a few sequences."""
    return expert_ids.size <= num_experts // 2


def _rows_ffn(x, expert_ids, gate_proj, up_proj, down_proj):
    """The ``"tiled"`` path's products for a few rows, one (token, choice) row at a time: ``[tokens * k,
    hidden]``. Each row indexes its expert's matrices directly. Inside a scanned block the expert stack is
    itself a dynamic slice of the stacked params, and XLA merges the two slices into one that reads that
    expert only; behind ``_tiled_ffn``'s loop it copies the block's whole stack out first."""
    tokens, top_k = expert_ids.shape
    num_experts = gate_proj.shape[0]
    flat_ids = expert_ids.reshape(-1)
    ids = jnp.minimum(flat_ids, num_experts - 1)
    out = []
    for row in range(tokens * top_k):
        a, e = x[row // top_k][None], ids[row]
        h = nn.silu(_expert_dot(a, gate_proj, e)) * _expert_dot(a, up_proj, e)
        out.append(_expert_dot(h, down_proj, e))
    return jnp.where((flat_ids < num_experts)[:, None], jnp.concatenate(out), 0)


def row_quantum(tile: int) -> int:
    """Rows each expert's run is padded to a multiple of on the ``"tiled"`` path: ``ROW_QUANTUM``, or the
    whole tile when that is smaller, and at least a quarter tile (so a tile comes in at most 4 sizes)."""
    return max(min(ROW_QUANTUM, tile), tile // 4)


def _tiled_ffn(x, expert_ids, gate_proj, up_proj, down_proj):
    """The ``"tiled"`` path: ``[tokens * k, hidden]``, the expert output of each (token, choice).

    Each expert's rows are padded to a multiple of ``q = row_quantum(tile)`` and run as whole tiles of
    ``tile`` rows, then one smaller piece of the remaining multiple of ``q`` (a ``lax.switch`` over the
    sizes): an expert computes fewer than ``q`` padding rows instead of fewer than ``tile``."""
    tokens, top_k = expert_ids.shape
    rows = tokens * top_k
    num_experts = gate_proj.shape[0]
    tile = row_tile(rows, num_experts)
    q = row_quantum(tile)
    sizes = tile // q  # a piece is 1..sizes quanta
    used = min(num_experts, rows)  # experts that can have rows
    size = -(-(rows + used * (q - 1)) // q) * q  # static bound on the padded rows
    num_items = size // tile + used  # static bound on the pieces: whole tiles plus one remainder each
    flat_ids = expert_ids.reshape(-1)  # [rows]
    counts = jnp.cumsum(flat_ids[:, None] == jnp.arange(num_experts), axis=0, dtype=jnp.int32)  # [rows, experts]
    ids = jnp.minimum(flat_ids, num_experts - 1)
    rank = jnp.take_along_axis(counts, ids[:, None], axis=1)[:, 0] - 1  # among its expert's rows
    quanta = -(-counts[-1] // q)  # [experts]: each expert's padded run, in quanta
    starts = (jnp.cumsum(quanta) - quanta) * q
    slot = starts[ids] + rank  # [rows]: the padded row of each (token, choice)
    slot = jnp.where(flat_ids < num_experts, slot, size)  # ids past the experts: no row, output 0
    # ``tile`` spare rows at the end: every piece writes a whole tile (see ``body``).
    source = jnp.full((size + tile,), tokens, jnp.int32).at[slot].set(jnp.arange(rows) // top_k, mode="drop")
    lhs = jnp.concatenate([x, jnp.zeros_like(x[:1])])[source]  # [size + tile, hidden]; padding reads zeros

    # The pieces, expert by expert: ``quanta // sizes`` whole tiles, then the rest (if any) as one piece.
    pieces = quanta // sizes + (quanta % sizes > 0)  # [experts]
    piece_ends = jnp.cumsum(pieces)
    item = jnp.arange(num_items)
    item_expert = jnp.minimum(jnp.searchsorted(piece_ends, item, side="right"), num_experts - 1)
    j = item - (piece_ends - pieces)[item_expert]  # the piece's index within its expert
    # 0 past the last piece (skipped): there j >= pieces of the last expert, so j * sizes >= its quanta.
    item_quanta = jnp.clip(quanta[item_expert] - j * sizes, 0, sizes)
    item_start = jnp.where(item_quanta > 0, starts[item_expert] + j * tile, size)  # skipped: the spare rows

    def piece(n):  # the FFN on ``n`` quanta of rows at ``start`` with expert ``e``, zero-padded to a tile
        def run(start, e):
            a = jax.lax.dynamic_slice_in_dim(lhs, start, n * q)
            h = nn.silu(_expert_dot(a, gate_proj, e)) * _expert_dot(a, up_proj, e)
            y = _expert_dot(h, down_proj, e)
            return jnp.pad(y, ((0, tile - n * q), (0, 0)))
        return run

    branches = [lambda start, e: jnp.zeros((tile, x.shape[1]), x.dtype)] + [piece(n) for n in range(1, sizes + 1)]

    # The switch only computes; the write is outside it, so the loop updates ``out`` in place (a buffer
    # passed through the branches is copied on every step). A piece's padding rows land on the next
    # expert's rows, which a later piece overwrites, or on the spare rows.
    def body(i, out):
        y = jax.lax.switch(item_quanta[i], branches, item_start[i], item_expert[i])
        return jax.lax.dynamic_update_slice_in_dim(out, y, item_start[i], 0)

    out = jax.lax.fori_loop(0, num_items, body, jnp.zeros_like(lhs))
    return out.at[slot].get(mode="fill", fill_value=0)


class MoE(nn.Module):
    """Top-k mixture of SiLU-gated experts: ``[batch, seq, hidden]`` -> same, in ``dtype``.
    Params: ``router/kernel [hidden, experts]`` and ``experts/{gate,up}_proj [experts, hidden, inter]``,
    ``experts/down_proj [experts, inter, hidden]``. ``moe_impl`` picks the int8 grouped matmul."""

    config: JambaConfig
    dtype: Dtype = jnp.float32
    moe_impl: str = "xla"

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        cfg = self.config
        E, H, inter = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
        flat = x.reshape(-1, H)
        logits = Linear(E, dtype=self.dtype, name="router")(flat)
        self.sow("intermediates", "router_logits", logits)  # [tokens, experts], for the aux loss
        with jax.named_scope("router"):  # named scopes: profiles and HLO metadata tell the parts apart
            weights, expert_ids = route(logits, cfg.num_experts_per_tok)
        experts = Experts(E, H, inter, self.dtype, name="experts")
        args = (flat, expert_ids, weights.astype(self.dtype), *experts(), self.moe_impl)
        with jax.named_scope("experts"):
            out = sharded_experts_ffn(*args, experts_ffn)  # on a mesh: expert- and tensor-parallel
            if out is None:
                out = experts_ffn(*args)
        return out.reshape(x.shape)


class Experts(nn.Module):
    """Holds the stacked expert weights; ``__call__`` returns (gate_proj, up_proj, down_proj)."""

    num_experts: int
    hidden: int
    inter: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self):
        E, H, inter = self.num_experts, self.hidden, self.inter
        return (self.param("gate_proj", normal_init, (E, H, inter), self.dtype),
                self.param("up_proj", normal_init, (E, H, inter), self.dtype),
                self.param("down_proj", normal_init, (E, inter, H), self.dtype))
