"""A checksum of a param leaf that can be summed from the shards of a sharded array.

Over the leaf's raw bits ``b`` (each element's bytes as an unsigned integer) at index ``(i_0, ..., i_k)``:

    s0 = sum b                     s1 = sum b * (1 + sum_d P_d * i_d)       (both mod 2**64)

``s1`` weighs each element by its position (a different odd weight per axis), so swapped, transposed or
shifted data change it, and both sums are additive over any partition of the leaf: each device's shard
(any ``jax.sharding.Sharding``) adds its part, with its own offset, without gathering the leaf. Not a
cryptographic hash: it catches swapped, mis-typed, truncated or corrupted leaves, not forgeries.

Each part costs one pass over the shard on the host (numpy, a band of rows at a time: no copy of the shard).
"""

from __future__ import annotations

import numpy as np

# odd 64-bit constants, one per axis (from the golden ratio's and sqrt(2)'s expansions)
_P = (0x9E3779B97F4A7C15, 0x6A09E667F3BCC909, 0xBB67AE8584CAA73B, 0x3C6EF372FE94F82B,
      0xA54FF53A5F1D36F1, 0x510E527FADE682D1, 0x9B05688C2B3E6C1F, 0x1F83D9ABFB41BD6B)
_U = np.uint64
# elements widened to uint64 at a time (a 2 MiB buffer)
BAND_ELEMENTS = 1 << 18


def _bits(x: np.ndarray) -> np.ndarray:
    return x.view(np.dtype(f"u{x.dtype.itemsize}"))


def partial_sums(block: np.ndarray, start: tuple[int, ...]) -> tuple[int, int]:
    """``(s0, s1)`` of the part ``block`` of a leaf whose corner is at index ``start``.

    One pass over ``block``, a band of rows at a time: each band is widened to uint64 once, into a
    buffer that stays in cache, and gives its sums along the last axis (every other axis's marginal
    follows from that much smaller array) and its column sums. Two numpy reductions of the whole
    block, each widening it again from memory, took twice as long."""
    b = _bits(np.asarray(block))
    if b.ndim == 0:
        b = b.reshape(1)
        start = (0,)
    width = b.shape[-1]
    flat = b.reshape(-1, width)
    rows = np.empty(flat.shape[0], _U)                       # shape[:-1], flattened
    last = np.zeros(width, _U)                               # the last axis's marginal
    band = max(1, BAND_ELEMENTS // max(width, 1))
    buffer = np.empty((min(band, flat.shape[0]), width), _U)
    with np.errstate(over="ignore"):
        for r in range(0, flat.shape[0], band):
            part = flat[r:r + band]
            wide = buffer[:len(part)]
            np.copyto(wide, part, casting="unsafe")
            np.add.reduce(wide, axis=1, out=rows[r:r + len(part)])
            last += np.add.reduce(wide, axis=0)
        rows = rows.reshape(b.shape[:-1])
        total = last.sum(dtype=_U)
        s1 = total
        for d in range(b.ndim):
            if d == b.ndim - 1:
                marginal = last
            else:
                others = tuple(a for a in range(b.ndim - 1) if a != d)
                marginal = rows.sum(axis=others, dtype=_U) if others else rows
            coords = np.arange(start[d], start[d] + b.shape[d], dtype=_U)
            s1 = s1 + _U(_P[d % len(_P)]) * (marginal * coords).sum(dtype=_U)
    return int(total), int(s1)


def combine(parts) -> str:
    s0 = s1 = 0
    for a, b in parts:
        s0, s1 = (s0 + a) % 2**64, (s1 + b) % 2**64
    return f"{s0:016x}{s1:016x}"


def checksum(leaf: np.ndarray) -> str:
    """The checksum of a whole numpy leaf."""
    return combine([partial_sums(leaf, (0,) * leaf.ndim)])


def array_checksum(x) -> str | None:
    """The checksum of a ``jax.Array`` (any sharding, on any device) or numpy array: the sum of the parts
    of its distinct addressable shards, each copied to the host one at a time. None for an array
    spread over several hosts (each sees only part of it)."""
    if isinstance(x, np.ndarray):
        return checksum(x)
    if not x.is_fully_addressable:  # multi-host: this host sees part of the leaf
        return None
    parts = []
    for shard in x.addressable_shards:
        if shard.replica_id != 0:
            continue
        start = tuple(0 if s.start is None else s.start for s in shard.index) + (0,) * (x.ndim - len(shard.index))
        parts.append(partial_sums(np.asarray(shard.data), start))
    return combine(parts)
