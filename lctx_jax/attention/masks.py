"""Which keys each query may see: the mask every attention implementation shares.

With p = positions[i] and p' = kv_positions[j], key j is visible to query i iff every piece
that applies holds:

    causal         p' <= p
    window w       p − p' < w          sliding window: with causal, the w most recent positions,
                                       p itself included (transformers' `sliding_window`:
                                       Mistral, Qwen2, Phi-3); without causal it only bounds
                                       how far back a key may be
    chunk_size c   p // c == p' // c   block-diagonal chunks (chunked attention, e.g. MEGALODON,
                                       Llama 4's `attention_chunk_size`)
    segments       segment_ids[i] == kv_segment_ids[j]

Everything is by position, not by index, so a decode step (T=1 against a cache of S), left
padding, packed documents (positions restarting per document) and ring attention's reordered
tokens need no special case. Padding gets a segment id of its own.

`Mask` carries the static pieces; `visible` builds the bool mask on any leading dims
(`visible_pairs` on arrays already laid out as columns and rows, as the Pallas kernels hold
them); `may_see` is the block-skip test that every implementation which skips blocks uses,
from per-block position bounds (`Mask.bounds` names the ones it reads).
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

BOUNDS = ("q_min", "q_max", "kv_min", "kv_max")


@dataclasses.dataclass(frozen=True)
class Mask:
    """The static pieces of the mask (hashable: usable in a kernel or jit configuration).

    window, chunk_size: positive ints or None (ValueError naming the argument otherwise).
    """

    causal: bool = True
    window: int | None = None
    chunk_size: int | None = None

    def __post_init__(self) -> None:
        for name in ("window", "chunk_size"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
            object.__setattr__(self, name, int(value))

    @property
    def bounds(self) -> tuple[str, ...]:
        """The block position bounds `may_see` reads, in BOUNDS order; () if it skips nothing."""
        needed = set()
        if self.causal:
            needed |= {"q_max", "kv_min"}
        if self.window is not None:
            needed |= {"q_min", "kv_max"}
        if self.chunk_size is not None:
            needed |= set(BOUNDS)
        return tuple(name for name in BOUNDS if name in needed)


def visible(mask: Mask, positions: jax.Array, kv_positions: jax.Array,
            segment_ids: jax.Array | None = None,
            kv_segment_ids: jax.Array | None = None) -> jax.Array:
    """bool [..., T, S] from positions [..., T], kv_positions [..., S] and optional segment ids
    [..., T], [..., S] (both or neither); the leading dims broadcast."""
    def column(x):
        return None if x is None else x[..., :, None]

    def row(x):
        return None if x is None else x[..., None, :]

    return visible_pairs(mask, column(positions), row(kv_positions), column(segment_ids),
                         row(kv_segment_ids))


def visible_pairs(mask: Mask, q_positions: jax.Array, kv_positions: jax.Array,
                  segment_ids: jax.Array | None = None,
                  kv_segment_ids: jax.Array | None = None) -> jax.Array:
    """`visible` on arrays that already broadcast against each other, e.g. a column [bq, 1] of
    query positions and a row [1, bk] of key positions (the layouts of the Pallas kernels)."""
    pieces = []
    if mask.causal:
        pieces.append(kv_positions <= q_positions)
    if mask.window is not None:
        pieces.append(q_positions - kv_positions < mask.window)
    if mask.chunk_size is not None:
        pieces.append(q_positions // mask.chunk_size == kv_positions // mask.chunk_size)
    if segment_ids is not None:
        pieces.append(segment_ids == kv_segment_ids)
    if not pieces:
        return jnp.ones(jnp.broadcast_shapes(q_positions.shape, kv_positions.shape), bool)
    return functools.reduce(operator.and_, pieces)


def may_see(mask: Mask, *, q_min: Any = None, q_max: Any = None, kv_min: Any = None,
            kv_max: Any = None) -> Any:
    """Whether a (q block, kv block) pair can hold a visible pair, from the smallest and largest
    position of each block (numpy or jax arrays of any broadcasting shapes, or kernel scalars);
    None when the mask skips no block. Only the bounds in `mask.bounds` are read.

    False guarantees that no key of the kv block is visible to any query of the q block:
        causal:  kv_min > q_max;   window w:  kv_max <= q_min − w;
        chunk c: the chunk ranges [q_min // c, q_max // c] and [kv_min // c, kv_max // c] are
                 disjoint.
    Segment ids are not considered (True may still hide everything).
    """
    pieces = []
    if mask.causal:
        pieces.append(kv_min <= q_max)
    if mask.window is not None:
        pieces.append(q_min - kv_max < mask.window)
    if mask.chunk_size is not None:
        chunk = mask.chunk_size
        pieces.append((kv_min // chunk <= q_max // chunk) & (q_min // chunk <= kv_max // chunk))
    return functools.reduce(operator.and_, pieces) if pieces else None
