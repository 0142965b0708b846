"""Which keys each query may see: the mask every attention implementation shares.

Key j is visible to query i iff
    (not causal or kv_positions[j] <= positions[i]) and (segment_ids[i] == kv_segment_ids[j]).
Causality is by position, not by index, so a decode step (T=1 against a cache of S) and
left-padded rows need no special case. Segment ids separate packed documents; padding gets an
id of its own.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def visible(positions: jax.Array, kv_positions: jax.Array,
            segment_ids: jax.Array | None = None, kv_segment_ids: jax.Array | None = None,
            *, causal: bool) -> jax.Array:
    """bool [B, T, S] from positions [B, T], kv_positions [B, S] and optional segment ids
    [B, T], [B, S] (both or neither)."""
    batch, q_len, kv_len = positions.shape[0], positions.shape[1], kv_positions.shape[1]
    mask = jnp.ones((batch, q_len, kv_len), dtype=bool)
    if causal:
        mask &= kv_positions[:, None, :] <= positions[:, :, None]
    if segment_ids is not None:
        mask &= kv_segment_ids[:, None, :] == segment_ids[:, :, None]
    return mask
