"""Splash attention: JAX's sparse flash attention kernel for TPU
(`jax.experimental.pallas.ops.tpu.splash_attention`), with RoPE applied outside it.

    out[b, i, h] = Σ_j p_ij · v[b, j, h // G],   p_ij = softmax_j((scale · q'_i) · k'_j)

over the visible keys j (the softmax of ./xla.py; splash computes it as flash attention does).

q', k': q, k rotated at positions / kv_positions by `lx.rope.rotate_qk` (one seq_len for both, as
every impl). Splash has no scale argument: scale multiplies the rotated q (in f32, then back to
q's dtype) before the kernel. Scores, softmax and accumulation are f32 in the kernel (its
backward rounds p and dS to the input dtype for its matrix products). Layout
[H, T, D] per example: `jax.vmap` over the batch. Grouped-query attention: the kernel's MHA form
takes k, v with Hkv heads and sends query head h to key/value head h // G (k, v never repeated).

The mask is by token index, not by position. Splash builds its block sparsity from a static
mask at trace time, in numpy, and takes segment ids at run time (`SegmentIds`). Ours is
`_IndexMask`: our `masks.Mask` on indices, evaluated (at trace time, and in the kernel on index
tiles) by `masks.may_see` on one-token blocks, so causal, window, chunk_size and any combination
are one mask class; its base, splash's `_ComputableMask`, is private to JAX. The trace-time
pass visits every block pair, as for splash's own masks: ~3 s at T = 32k, quadratic in T
(splash caches it per mask and block size).

The index mask equals the position mask of ./masks.py when, within each segment, positions are
consecutive (p_i − p_j = i − j): positions = arange(T), or packed documents whose positions
restart at 0 in each document (the segment ids cut every pair across documents, so restarting
positions change nothing). chunk_size is by index too, so it needs positions = arange(T) (chunk
boundaries at multiples of c from the row's start). Other positions (ring's reordering, left
padding inside a segment, a KV cache) are not what this kernel computes: hence self-attention
only (S == T) with the keys taking the queries' segment ids, which `attend` checks; positions
themselves (traced values) cannot be checked.

A query that sees no key gets zeros in the other impls; here it cannot arise: by index every
mask piece keeps the diagonal (a query sees itself), and a query shares its own segment id.
(Splash itself would return the mean of all values there, not zeros: one reason `attend`
refuses kv_segment_ids of their own.)

Lengths: splash needs block sizes that divide T and are multiples of 128 (its kv compute block
is lane-aligned, and its segment-id masks tile 128 lanes). T is padded up to a multiple of 128
(then of the block); padded keys get a segment id of their own, padded queries are dropped.
Default block: the largest of 512, 384, 256, 128 that divides the padded T.

On a mesh: `flash.attend_on_mesh` with this kernel (shard_map over the batch axes and "tensor"
heads; a mesh that splits "sequence" is refused). CPU: the kernel runs interpreted
(`interpret=True`, what the tests run); GPU: refused (a Mosaic TPU kernel).

Verified in interpret mode on CPU against ./xla.py (tests/test_splash_cudnn.py: values and
gradients, GQA, packed documents, windows, chunks, rope types, bf16, a mesh of 8 simulated
devices, a model and its training step); forward and backward lowered to Mosaic for TPU
(`lower(lowering_platforms=("tpu",))`) and compiled by XLA's TPU compiler for a compile-only
v5p topology under the mesh's shard_map. Not run on a TPU (speed, VMEM use unmeasured).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash_lib
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

from lctx_jax import rope as rope_lib
from lctx_jax.attention import masks

LANES = 128  # splash's blocks are multiples of the TPU's 128 lanes
DEFAULT_BLOCK = 512


class _IndexMask(mask_lib._ComputableMask):
    """`masks.Mask` by token index, [T, T]: key j visible to query i iff `masks.may_see` with
    the one-token blocks [i, i] and [j, j] (exactly the visibility of ./masks.py at positions
    i and j). A splash computable mask (as its CausalMask, LocalMask, ChunkedCausalMask): the
    kernel evaluates it on index tiles instead of loading it from memory."""

    def __init__(self, mask: masks.Mask, length: int):
        self.pieces = mask
        super().__init__((length, length), functools.partial(_by_index, mask))

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, _IndexMask) and self.shape == other.shape
                and self.pieces == other.pieces)

    def __hash__(self) -> int:
        return hash((_IndexMask, self.shape, self.pieces))


def _by_index(mask: masks.Mask, q_ids: Any, kv_ids: Any) -> Any:
    """bool, broadcast shape of the query and key indices (numpy at trace time, jax in-kernel)."""
    return masks.may_see(mask, q_min=q_ids, q_max=q_ids, kv_min=kv_ids, kv_max=kv_ids)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool, positions: jax.Array,
           kv_positions: jax.Array, segment_ids: jax.Array | None,
           kv_segment_ids: jax.Array | None, scale: float,
           rope: rope_lib.RopeConfig | None = None, block_size: int | None = None,
           backend: str | None = None, seq_len: jax.Array | None = None,
           window: int | None = None, chunk_size: int | None = None) -> jax.Array:
    """q [B, T, Hq, D], k, v [B, T, Hkv, D] un-rotated; positions, kv_positions [B, T] (for the
    rotation only); segment ids [B, T] (kv_segment_ids equal to segment_ids) or both None ->
    [B, T, Hq, D] in q's dtype.

    causal, window, chunk_size: the mask (./masks.py) by index. block_size: splash's q and kv
    block (a multiple of 128; default: see the module docstring). backend: "cpu" (interpreted)
    or "tpu", default jax.default_backend(). seq_len: the rotation's sequence length (default
    max position + 1).
    """
    backend = backend or jax.default_backend()
    if backend not in ("tpu", "cpu"):
        raise ValueError(f"splash attention is a TPU kernel (interpreted on CPU), not for "
                         f"{backend!r}; use impl='flash' or 'cudnn' on GPU")
    batch, length, q_heads, _ = q.shape
    block, padded = _blocks(block_size, length)
    if rope is not None:
        q, k = rope_lib.rotate_qk(q, k, rope, positions, kv_positions, seq_len=seq_len)
    q = (q.astype(jnp.float32) * scale).astype(q.dtype)

    def heads_major(x):  # [B, T, H, D] -> [B, H, padded T, D]
        return jnp.pad(x, [(0, 0), (0, padded - length), (0, 0), (0, 0)]).transpose(0, 2, 1, 3)

    segments = ()
    if segment_ids is not None or padded > length:
        segments = (splash_lib.SegmentIds(*(_pad_segments(ids, padded, batch, length)
                                             for ids in (segment_ids, kv_segment_ids))),)
    pieces = masks.Mask(causal, window, chunk_size)
    mask = (mask_lib.FullMask((padded, padded)) if pieces == masks.Mask(causal=False)
            else _IndexMask(pieces, padded))
    blocks = splash_lib.BlockSizes(*(block,) * 8)  # every q and kv block, forward and backward
    kernel = splash_lib.make_splash_mha(mask_lib.MultiHeadMask([mask] * q_heads),
                                        block_sizes=blocks, head_shards=1, q_seq_shards=1,
                                        interpret=backend == "cpu")
    out = jax.vmap(kernel)(heads_major(q), heads_major(k), heads_major(v), *segments)
    return out.transpose(0, 2, 1, 3)[:, :length]


def _blocks(block_size: int | None, length: int) -> tuple[int, int]:
    """(block, padded length): the padded length is a multiple of the block, which is a
    multiple of 128."""
    padded = -(-length // LANES) * LANES
    if block_size is None:
        return next(b for b in range(DEFAULT_BLOCK, 0, -LANES) if padded % b == 0), padded
    if block_size % LANES:
        raise ValueError(f"block_size for splash attention must be a multiple of {LANES}, got "
                         f"{block_size}")
    block = min(block_size, padded)
    return block, -(-length // block) * block


def _pad_segments(ids: jax.Array | None, padded: int, batch: int, length: int) -> jax.Array:
    """[B, T] ids (None: one segment) -> [B, padded T]: padded tokens get an id no real token
    has (the largest + 1)."""
    ids = jnp.zeros((batch, length), jnp.int32) if ids is None else ids.astype(jnp.int32)
    pad_id = jnp.max(ids, axis=1, keepdims=True) + 1
    return jnp.concatenate([ids, jnp.broadcast_to(pad_id, (batch, padded - length))], axis=1)
