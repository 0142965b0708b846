"""Shifted sparse attention, S²-Attn (Chen et al. 2023, LongLoRA §3.2): training only.

The T tokens are cut into groups of G (default G = T/4) and attention stays inside a group:

    query heads [0, Hq/2)    groups [0, G), [G, 2G), …, [T−G, T)
    query heads [Hq/2, Hq)   groups shifted by G/2: [0, G/2), [G/2, 3G/2), …, [T−G/2, T)

with the usual mask inside each group (./masks.py: causal by position, sliding window, chunks,
equal segment ids).
Groups are by token index. The shifted half has half-size groups at both ends and no
wraparound: this is LongLoRA's flash-attention (varlen) path. Their roll-based fallback
instead wraps the last half-group onto the first, which lets the first tokens see the last.

RoPE: q and k are rotated once, at their true positions with one sequence length for the
whole sequence (`lx.rope.rotate_qk`), before they are cut into groups.

Cost O(T·G) per head, not O(T²): each half runs ./xla.py's attention on [B·T/G, G] groups.
The shifted half is padded with G/2 tokens at each end (T + G tokens, T/G + 1 groups) under a
segment id no real token has, so padding is never seen; its outputs are dropped. Gradients
flow through xla.attend's VJP and the reshapes.

Grouped-query attention: query head h uses key/value head h // (Hq/Hkv), so with Hkv even the
first half of the query heads uses exactly the first half of the key/value heads. With Hkv odd
(MQA: Hkv = 1) a key/value head is shared across the split; k and v are then repeated twice
along heads (2·Hkv heads; Hq/Hkv is even since Hq is even and Hkv odd), the least repetition
that keeps the head → key/value head map and makes the split exact.

LongLoRA uses S²-Attn in fine-tuning only; evaluation and generation use full attention.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lctx_jax import rope as rope_lib
from lctx_jax.attention import xla

GROUP_FRACTION = 4  # default G = T / 4, as in LongLoRA


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool, positions: jax.Array,
           kv_positions: jax.Array, segment_ids: jax.Array | None,
           kv_segment_ids: jax.Array | None, scale: float, group_size: int | None = None,
           block_size: int | None = None,
           rope: rope_lib.RopeConfig | rope_lib.RopeArrays | None = None,
           window: int | None = None, chunk_size: int | None = None) -> jax.Array:
    """q [B, T, Hq, D]; k, v [B, T, Hkv, D] (self-attention, un-rotated); positions,
    kv_positions [B, T]; segment ids [B, T] or both None -> [B, T, Hq, D] in q's dtype.

    group_size G: even, divides T; default T/4. block_size, causal, window, chunk_size: passed
    to xla.attend per group. rope: q and k are rotated here, before grouping.
    """
    batch, length, q_heads, _ = q.shape
    group = check_group_size(length, group_size)
    if q_heads % 2:
        raise ValueError(f"S²-Attn splits the query heads into two halves, so their number must "
                         f"be even; got Hq = {q_heads}")
    if rope is not None:
        q, k = rope_lib.rotate_qk(q, k, rope, positions, kv_positions)
    if k.shape[2] % 2:
        k, v = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)
    if segment_ids is None:
        segment_ids = kv_segment_ids = jnp.zeros((batch, length), jnp.int32)
    half_q, half_kv = q_heads // 2, k.shape[2] // 2
    args = dict(causal=causal, scale=scale, block_size=block_size, window=window,
                chunk_size=chunk_size)
    plain = _grouped(q[:, :, :half_q], k[:, :, :half_kv], v[:, :, :half_kv], positions,
                     kv_positions, segment_ids, kv_segment_ids, group, **args)
    pad = _pad_id(segment_ids, kv_segment_ids)
    shifted = _grouped(*(_pad(x, group // 2, 0) for x in (
        q[:, :, half_q:], k[:, :, half_kv:], v[:, :, half_kv:], positions, kv_positions)),
        *(_pad(x, group // 2, pad) for x in (segment_ids, kv_segment_ids)), group, **args)
    shifted = shifted[:, group // 2:group // 2 + length]
    return jnp.concatenate([plain, shifted], axis=2)


def check_group_size(length: int, group_size: int | None) -> int:
    """The group size G for T = `length` tokens: `group_size`, or T/4; ValueError unless G is
    even and divides T."""
    if group_size is None:
        if length % (2 * GROUP_FRACTION):
            raise ValueError(f"sequence length T = {length} must be a multiple of "
                             f"{2 * GROUP_FRACTION} for S²-Attn with G = T/{GROUP_FRACTION} "
                             "(G must be even and divide T)")
        return length // GROUP_FRACTION
    if group_size < 2 or group_size % 2 or length % group_size:
        raise ValueError(f"S²-Attn group_size G = {group_size} must be even and divide the "
                         f"sequence length T = {length}; use an even divisor of T, or a T "
                         f"that is a multiple of {group_size} (G even)")
    return group_size


def _grouped(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array,
             kv_positions: jax.Array, segment_ids: jax.Array, kv_segment_ids: jax.Array,
             group: int, **args) -> jax.Array:
    """xla.attend within consecutive groups of `group` tokens: [B, L, ...] inputs, L a multiple
    of `group` -> [B, L, Hq, D]."""
    def split(x: jax.Array) -> jax.Array:  # [B, L, ...] -> [B·L/group, group, ...]
        return x.reshape(-1, group, *x.shape[2:])

    out = xla.attend(split(q), split(k), split(v), positions=split(positions),
                     kv_positions=split(kv_positions), segment_ids=split(segment_ids),
                     kv_segment_ids=split(kv_segment_ids), **args)
    return out.reshape(q.shape)


def _pad(x: jax.Array, width: int, value: int | jax.Array) -> jax.Array:
    """x [B, L, ...] -> [B, L + 2·width, ...], `value` at both ends of L."""
    return jnp.pad(x, [(0, 0), (width, width)] + [(0, 0)] * (x.ndim - 2),
                   constant_values=jnp.asarray(value, x.dtype))


def _pad_id(segment_ids: jax.Array, kv_segment_ids: jax.Array) -> jax.Array:
    """A segment id no query or key has: one below the smallest."""
    return jnp.minimum(segment_ids.min(), kv_segment_ids.min()) - 1
