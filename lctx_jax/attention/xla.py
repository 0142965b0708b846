"""Attention in plain JAX (XLA): the reference implementation, and the one used on CPU.

    out[b, i, h] = Σ_j p_ij · v[b, j, h // G],
    p_ij = softmax_j(scale · q'[b, i, h] · k'[b, j, h // G]) over the keys j visible to i,

with q', k' the RoPE-rotated q, k (`lx.rope.rotate_qk`, when `rope` is given), the mask of
./masks.py, and G = Hq / Hkv query heads sharing each key/value head (grouped-query attention,
contracted as [B, T, Hkv, G, D] against [B, S, Hkv, D]; k and v are never repeated). Scores,
softmax statistics and accumulation are f32 whatever the input dtype. A query with no visible
key gets 0.

Two paths, equal up to f32 rounding, both on rotated q and k:
  plain      the [T, S] score matrix at once; used while T·S <= BLOCKWISE_THRESHOLD. Its VJP is
             the textbook one, written by hand (see `_softmax_attention`).
  blockwise  flash attention's online softmax in plain JAX: `lax.map` over query blocks,
             `lax.scan` over key/value blocks carrying (running max, denominator, accumulator).
             Memory O(block²) per head; the backward pass recomputes blocks (`jax.checkpoint`)
             instead of storing T×S probabilities. Every block is computed (none skipped).
The softmax math is ./online_softmax.py's. `masked_scores`, `fold_block` and the layout helpers
(`group_heads`, `split_blocks`) are shared with ./ring.py.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from lctx_jax import rope as rope_lib
from lctx_jax.attention import masks, online_softmax

BLOCKWISE_THRESHOLD = 2048 * 2048  # T·S above which the blockwise path is taken
DEFAULT_BLOCK_SIZE = 512


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool, positions: jax.Array,
           kv_positions: jax.Array, segment_ids: jax.Array | None,
           kv_segment_ids: jax.Array | None, scale: float, block_size: int | None,
           rope: rope_lib.RopeConfig | rope_lib.RopeArrays | None = None,
           window: int | None = None, chunk_size: int | None = None) -> jax.Array:
    """q [B, T, Hq, D], k, v [B, S, Hkv, D] (un-rotated); positions [B, T], kv_positions [B, S];
    segment ids [B, T], [B, S] or both None -> [B, T, Hq, D] in q's dtype.

    rope: q and k are rotated first (`lx.rope.rotate_qk`). causal, window, chunk_size: the
    mask (./masks.py). `block_size` None picks the path by T·S; an int forces the blockwise
    path with that block.
    """
    if rope is not None:
        q, k = rope_lib.rotate_qk(q, k, rope, positions, kv_positions)
    args = dict(mask=masks.Mask(causal, window, chunk_size), positions=positions,
                kv_positions=kv_positions, segment_ids=segment_ids,
                kv_segment_ids=kv_segment_ids, scale=scale)
    if block_size is None and q.shape[1] * k.shape[1] <= BLOCKWISE_THRESHOLD:
        return plain(q, k, v, **args)
    return blockwise(q, k, v, block_size=block_size or DEFAULT_BLOCK_SIZE, **args)


def plain(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: masks.Mask, positions: jax.Array,
          kv_positions: jax.Array, segment_ids: jax.Array | None,
          kv_segment_ids: jax.Array | None, scale: float) -> jax.Array:
    """The whole score matrix at once (q, k rotated), as batched matrix products over
    [B, Hkv, G·T, S].

    Heads are moved in front of the tokens so both contractions are plain batched matmuls
    (XLA's CPU backend runs the [B, T, H, D] einsum forms 2-3x slower).
    """
    batch, q_len, q_heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    groups = q_heads // kv_heads
    visible = masks.visible(mask, positions, kv_positions, segment_ids, kv_segment_ids)
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
    products = jnp.einsum("bhqd,bhsd->bhqs", q, k, preferred_element_type=jnp.float32)
    probs = online_softmax.softmax(online_softmax.scores(products, visible, scale))
    out = jnp.einsum("bhqs,bhsd->bhqd", probs, v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype), (q, k, v, visible, probs, out)


def _softmax_attention_bwd(scale: float, residuals: tuple, d_out: jax.Array) -> tuple:
    """dV = Pᵀ dO; dS = scale · P ⊙ (dO Vᵀ − rowsum(dO ⊙ O)); dQ = dS K; dK = dSᵀ Q."""
    q, k, v, visible, probs, out = residuals
    d_out = d_out.astype(jnp.float32)
    d_v = jnp.einsum("bhqs,bhqd->bhsd", probs, d_out)
    d_probs = jnp.einsum("bhqd,bhsd->bhqs", d_out, v, preferred_element_type=jnp.float32)
    d_scores = online_softmax.score_grads(probs, d_probs, online_softmax.delta(d_out, out),
                                          scale)
    d_q = jnp.einsum("bhqs,bhsd->bhqd", d_scores, k, preferred_element_type=jnp.float32)
    d_k = jnp.einsum("bhqs,bhqd->bhsd", d_scores, q, preferred_element_type=jnp.float32)
    return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), None


_softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


def blockwise(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: masks.Mask,
              positions: jax.Array, kv_positions: jax.Array, segment_ids: jax.Array | None,
              kv_segment_ids: jax.Array | None, scale: float, block_size: int) -> jax.Array:
    """Online softmax over [block, block] tiles (q, k rotated). Lengths the block does not
    divide are padded; padded keys are masked out and padded queries dropped."""
    batch, q_len, q_heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    block_q, block_k = min(block_size, q_len), min(block_size, kv_len)
    kv_valid = jnp.ones((batch, kv_len), dtype=bool)  # False where split_blocks pads
    kv_blocks = tuple(split_blocks(x, block_k) for x in
                      (k, v, kv_positions, kv_segment_ids, kv_valid))
    q_blocks = tuple(split_blocks(x, block_q) for x in
                     (group_heads(q, kv_heads), positions, segment_ids))
    rows = (batch, kv_heads, q_heads // kv_heads, block_q)

    def query_block(q_block_inputs: tuple) -> jax.Array:
        q_block, q_pos, q_seg = q_block_inputs

        def kv_step(carry: online_softmax.Stats, kv_block: tuple
                    ) -> tuple[online_softmax.Stats, None]:
            k_block, v_block, kv_pos, kv_seg, valid = kv_block
            visible = masks.visible(mask, q_pos, kv_pos, q_seg, kv_seg) & valid[:, None, :]
            return fold_block(carry, q_block, k_block, v_block, visible, scale), None

        stats, _ = lax.scan(jax.checkpoint(kv_step, prevent_cse=False),
                            online_softmax.init(rows, v.shape[-1]), kv_blocks)
        return online_softmax.finish(stats)[0]

    # Checkpointing the query block too keeps only its inputs for the backward pass, not the
    # scan's per-step carries for every query block (which would be O(T · S/block · D)).
    out = lax.map(jax.checkpoint(query_block, prevent_cse=False), q_blocks)
    out = out.transpose(1, 0, 4, 2, 3, 5)  # [T/bq, B, Hkv, G, bq, D] -> [B, T/bq, bq, Hkv, G, D]
    return out.reshape(batch, -1, q_heads, head_dim)[:, :q_len].astype(q.dtype)


def fold_block(stats: online_softmax.Stats, q_block: jax.Array, k_block: jax.Array,
               v_block: jax.Array, visible: jax.Array, scale: float) -> online_softmax.Stats:
    """`online_softmax.fold` of one key/value block in the grouped layout: q_block
    [B, bq, Hkv, G, D], k_block, v_block [B, bk, Hkv, D], visible bool [B, bq, bk]; stats
    m, l [B, Hkv, G, bq, 1], acc [B, Hkv, G, bq, D]."""
    def weighted_values(weights: jax.Array) -> jax.Array:
        return jnp.einsum("bhgqk,bkhd->bhgqd", weights, v_block,
                          preferred_element_type=jnp.float32)

    return online_softmax.fold(stats, masked_scores(q_block, k_block, visible, scale),
                               weighted_values)


def masked_scores(q_block: jax.Array, k_block: jax.Array, visible: jax.Array,
                  scale: float) -> jax.Array:
    """`online_softmax.scores` in the grouped layout: f32 [B, Hkv, G, bq, bk] from q_block
    [B, bq, Hkv, G, D], k_block [B, bk, Hkv, D] and visible [B, bq, bk]."""
    products = jnp.einsum("bqhgd,bkhd->bhgqk", q_block, k_block,
                          preferred_element_type=jnp.float32)
    return online_softmax.scores(products, visible[:, None, None], scale)


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
