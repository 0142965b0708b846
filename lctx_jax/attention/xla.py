"""Attention in plain JAX (XLA): the reference implementation, and the one used on CPU.

    out[b, i, h] = Σ_j p_ij · v[b, j, h // G],
    p_ij = softmax_j(scale · q[b, i, h] · k[b, j, h // G]) over the keys j visible to i,

with G = Hq / Hkv query heads sharing each key/value head (grouped-query attention, contracted
as [B, T, Hkv, G, D] against [B, S, Hkv, D]; k and v are never repeated). Scores, softmax
statistics and accumulation are f32 whatever the input dtype. A query with no visible key gets 0.

Two paths, equal up to f32 rounding:
  plain      the [T, S] score matrix at once; used while T·S <= BLOCKWISE_THRESHOLD.
  blockwise  flash attention's online softmax in plain JAX: `lax.map` over query blocks,
             `lax.scan` over key/value blocks carrying (running max, denominator, accumulator).
             Memory O(block²) per head; the backward pass recomputes blocks (`jax.checkpoint`)
             instead of storing T×S probabilities.
The online-softmax pieces (`empty_stats`, `online_softmax_step`, `masked_scores`, `normalize`)
and the block layout helpers are shared with ./ring.py.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from lctx_jax.attention import masks

BLOCKWISE_THRESHOLD = 2048 * 2048  # T·S above which the blockwise path is taken
DEFAULT_BLOCK_SIZE = 512

# Online-softmax state of a query block: running max m and denominator l [B, Hkv, G, bq], and
# the unnormalised accumulator [B, Hkv, G, bq, D]; all f32. Shared with ./ring.py.
Stats = tuple[jax.Array, jax.Array, jax.Array]


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool, positions: jax.Array,
           kv_positions: jax.Array, segment_ids: jax.Array | None,
           kv_segment_ids: jax.Array | None, scale: float, block_size: int | None) -> jax.Array:
    """q [B, T, Hq, D]; k, v [B, S, Hkv, D]; positions [B, T], kv_positions [B, S]; segment ids
    [B, T], [B, S] or both None -> [B, T, Hq, D] in q's dtype.

    `block_size` None picks the path by T·S; an int forces the blockwise path with that block.
    """
    args = dict(causal=causal, positions=positions, kv_positions=kv_positions,
                segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, scale=scale)
    if block_size is None and q.shape[1] * k.shape[1] <= BLOCKWISE_THRESHOLD:
        return plain(q, k, v, **args)
    return blockwise(q, k, v, block_size=block_size or DEFAULT_BLOCK_SIZE, **args)


def plain(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool, positions: jax.Array,
          kv_positions: jax.Array, segment_ids: jax.Array | None,
          kv_segment_ids: jax.Array | None, scale: float) -> jax.Array:
    """The whole score matrix at once, as batched matrix products over [B, Hkv, G·T, S].

    Heads are moved in front of the tokens so both contractions are plain batched matmuls
    (XLA's CPU backend runs the [B, T, H, D] einsum forms 2-3x slower).
    """
    batch, q_len, q_heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    groups = q_heads // kv_heads
    visible = masks.visible(positions, kv_positions, segment_ids, kv_segment_ids, causal=causal)
    visible = jnp.broadcast_to(visible[:, None, None], (batch, 1, groups, q_len, kv_len))
    visible = visible.reshape(batch, 1, groups * q_len, kv_len)
    q_rows = group_heads(q, kv_heads).transpose(0, 2, 3, 1, 4)  # [B, Hkv, G, T, D]
    q_rows = q_rows.reshape(batch, kv_heads, groups * q_len, head_dim)
    out = _softmax_attention(q_rows, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
                             visible, scale)
    out = out.reshape(batch, kv_heads, groups, q_len, head_dim).transpose(0, 3, 1, 2, 4)
    return out.reshape(q.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array,
                       scale: float) -> jax.Array:
    """softmax(scale · q kᵀ over visible keys) v: q [B, H, Q, D], k, v [B, H, S, D], visible
    [B, 1, Q, S] -> [B, H, Q, D] in q's dtype. Its VJP is the textbook one (below), which XLA
    runs faster than the autodiff of the masked, guarded forward."""
    return _softmax_attention_fwd(q, k, v, visible, scale)[0]


def _softmax_attention_fwd(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array,
                           scale: float) -> tuple[jax.Array, tuple]:
    scores = jnp.einsum("bhqd,bhsd->bhqs", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(visible, scores, -jnp.inf)
    weights = jnp.exp(scores - zero_if_infinite(scores.max(axis=-1, keepdims=True)))
    denominator = weights.sum(axis=-1, keepdims=True)
    probs = weights / jnp.where(denominator > 0, denominator, 1.0)
    out = jnp.einsum("bhqs,bhsd->bhqd", probs, v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype), (q, k, v, visible, probs, out)


def _softmax_attention_bwd(scale: float, residuals: tuple, d_out: jax.Array) -> tuple:
    """dV = Pᵀ dO; dS = P ⊙ (dO Vᵀ − rowsum(dO ⊙ O)); dQ = scale · dS K; dK = scale · dSᵀ Q."""
    q, k, v, visible, probs, out = residuals
    d_out = d_out.astype(jnp.float32)
    d_v = jnp.einsum("bhqs,bhqd->bhsd", probs, d_out)
    d_probs = jnp.einsum("bhqd,bhsd->bhqs", d_out, v, preferred_element_type=jnp.float32)
    d_scores = probs * (d_probs - jnp.sum(d_out * out, axis=-1, keepdims=True)) * scale
    d_q = jnp.einsum("bhqs,bhsd->bhqd", d_scores, k, preferred_element_type=jnp.float32)
    d_k = jnp.einsum("bhqs,bhqd->bhsd", d_scores, q, preferred_element_type=jnp.float32)
    return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), None


_softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


def blockwise(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool, positions: jax.Array,
              kv_positions: jax.Array, segment_ids: jax.Array | None,
              kv_segment_ids: jax.Array | None, scale: float, block_size: int) -> jax.Array:
    """Online softmax over [block, block] tiles. Lengths the block does not divide are padded;
    padded keys are masked out and padded queries dropped."""
    batch, q_len, q_heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    block_q, block_k = min(block_size, q_len), min(block_size, kv_len)
    kv_valid = jnp.ones((batch, kv_len), dtype=bool)  # False where split_blocks pads
    kv_blocks = tuple(split_blocks(x, block_k) for x in
                      (k, v, kv_positions, kv_segment_ids, kv_valid))
    q_blocks = tuple(split_blocks(x, block_q) for x in
                     (group_heads(q, kv_heads), positions, segment_ids))

    def query_block(q_block_inputs: tuple) -> jax.Array:
        q_block, q_pos, q_seg = q_block_inputs

        def kv_step(carry: Stats, kv_block: tuple) -> tuple[Stats, None]:
            k_block, v_block, kv_pos, kv_seg, valid = kv_block
            visible = masks.visible(q_pos, kv_pos, q_seg, kv_seg, causal=causal)
            visible &= valid[:, None, :]
            return online_softmax_step(carry, q_block, k_block, v_block, visible, scale), None

        (_, denominator, acc), _ = lax.scan(jax.checkpoint(kv_step, prevent_cse=False),
                                            empty_stats(q_block), kv_blocks)
        return normalize(denominator, acc)

    # Checkpointing the query block too keeps only its inputs for the backward pass, not the
    # scan's per-step carries for every query block (which would be O(T · S/block · D)).
    out = lax.map(jax.checkpoint(query_block, prevent_cse=False), q_blocks)
    out = out.transpose(1, 0, 4, 2, 3, 5)  # [T/bq, B, Hkv, G, bq, D] -> [B, T/bq, bq, Hkv, G, D]
    return out.reshape(batch, -1, q_heads, head_dim)[:, :q_len].astype(q.dtype)


def empty_stats(q_block: jax.Array) -> Stats:
    """(m = −inf, l = 0, acc = 0), the state before any key is seen, for q_block
    [..., bq, Hkv, G, D]: m, l [..., Hkv, G, bq], acc [..., Hkv, G, bq, D]."""
    *lead, block, kv_heads, groups, head_dim = q_block.shape
    stats_shape = (*lead, kv_heads, groups, block)
    return (jnp.full(stats_shape, -jnp.inf, jnp.float32), jnp.zeros(stats_shape, jnp.float32),
            jnp.zeros((*stats_shape, head_dim), jnp.float32))


def online_softmax_step(stats: Stats, q_block: jax.Array, k_block: jax.Array,
                        v_block: jax.Array, visible: jax.Array, scale: float) -> Stats:
    """Folds one key/value block into `stats`: q_block [B, bq, Hkv, G, D], k_block, v_block
    [B, bk, Hkv, D], visible bool [B, bq, bk].

        s = scale · q kᵀ (−inf where not visible),  m' = max(m, rowmax s),
        l' = l·e^(m − m') + Σ_k e^(s − m'),          acc' = acc·e^(m − m') + e^(s − m') v
    """
    row_max, denominator, acc = stats
    scores = masked_scores(q_block, k_block, visible, scale)
    # The max only keeps exp() in range; the result does not depend on it.
    new_max = lax.stop_gradient(jnp.maximum(row_max, scores.max(axis=-1)))
    shift = zero_if_infinite(new_max)
    rescale = jnp.exp(row_max - shift)
    weights = jnp.exp(scores - shift[..., None])
    denominator = denominator * rescale + weights.sum(axis=-1)
    acc = acc * rescale[..., None] + jnp.einsum(
        "bhgqk,bkhd->bhgqd", weights, v_block, preferred_element_type=jnp.float32)
    return new_max, denominator, acc


def masked_scores(q_block: jax.Array, k_block: jax.Array, visible: jax.Array,
                  scale: float) -> jax.Array:
    """scale · q kᵀ, −inf where not visible: f32 [B, Hkv, G, bq, bk] from q_block
    [B, bq, Hkv, G, D], k_block [B, bk, Hkv, D] and visible [B, bq, bk]."""
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", q_block, k_block,
                        preferred_element_type=jnp.float32) * scale
    return jnp.where(visible[:, None, None], scores, -jnp.inf)


def normalize(denominator: jax.Array, acc: jax.Array) -> jax.Array:
    """acc / l, f32 [..., bq, D]; 0 for a query that saw no key (l = 0)."""
    return acc / jnp.where(denominator > 0, denominator, 1.0)[..., None]


def group_heads(q: jax.Array, kv_heads: int) -> jax.Array:
    """[B, T, Hq, D] -> [B, T, Hkv, G, D]: query head h uses key/value head h // G."""
    batch, q_len, q_heads, head_dim = q.shape
    return q.reshape(batch, q_len, kv_heads, q_heads // kv_heads, head_dim)


def split_blocks(x: jax.Array | None, block: int) -> jax.Array | None:
    """[B, L, ...] -> [ceil(L / block), B, block, ...], zero-padded at the end of L."""
    if x is None:
        return None
    padded_len = math.ceil(x.shape[1] / block) * block
    x = jnp.pad(x, [(0, 0), (0, padded_len - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(x.shape[0], -1, block, *x.shape[2:]), 1, 0)


def zero_if_infinite(row_max: jax.Array) -> jax.Array:
    """A row with no visible key has max −inf; shifting by 0 instead keeps exp() at 0, not NaN."""
    return jnp.where(jnp.isfinite(row_max), row_max, 0.0)
