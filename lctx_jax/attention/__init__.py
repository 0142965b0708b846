"""Attention: `attend` validates its arguments and dispatches to an implementation.

Implementations (one module each, the same contract: un-rotated q and k, `rope` and positions,
the mask's pieces): "xla" (plain JAX, ./xla.py), "flash" (Pallas kernel with RoPE fused in,
./flash.py), "ring" (sequence parallel over a mesh, ./ring.py), "s2" (LongLoRA's shifted sparse
attention for training, ./s2.py), "splash" (JAX's splash attention TPU kernel, ./splash.py),
"cudnn" (cuDNN flash attention on NVIDIA GPUs via jax.nn.dot_product_attention, ./cudnn.py).
Infini-attention (./infini.py, `infini.attend`) is its own function: a segment recurrence with
a gate and a memory, not another way to compute softmax attention; models select it with
attention="infini". Shared math: which keys a query sees and which blocks can be skipped
(./masks.py), the online softmax and its backward (./online_softmax.py), the rotation of q and
k (`rotate_qk`, defined in lctx_jax.rope; "flash" rotates in-kernel with the same
`rope.rotation`), and the kernels' shard_map on a mesh (`flash.attend_on_mesh`, for "flash",
"splash" and "cudnn").
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from lctx_jax import rope as rope_lib
from lctx_jax.attention import cudnn, flash, infini, masks, online_softmax, ring, s2, splash, xla
from lctx_jax.rope import rotate_qk

IMPLEMENTATIONS = ("xla", "flash", "ring", "s2", "splash", "cudnn")
_KERNELS = {"flash": flash.attend, "splash": splash.attend, "cudnn": cudnn.attend}

__all__ = ["IMPLEMENTATIONS", "attend", "cudnn", "flash", "infini", "masks", "online_softmax",
           "ring", "rotate_qk", "s2", "splash", "xla"]


def attend(q: jax.Array, k: jax.Array, v: jax.Array, impl: str = "xla", causal: bool = True,
           segment_ids: jax.Array | None = None,
           rope: rope_lib.RopeConfig | rope_lib.RopeArrays | None = None,
           positions: jax.Array | None = None, mesh: Any = None, *,
           kv_positions: jax.Array | None = None, kv_segment_ids: jax.Array | None = None,
           scale: float | None = None, block_size: int | None = None,
           group_size: int | None = None, window: int | None = None,
           chunk_size: int | None = None, inputs_reordered: bool = False) -> jax.Array:
    """softmax(scale · q kᵀ, masked) · v: q [B, T, Hq, D], k, v [B, S, Hkv, D] -> [B, T, Hq, D].

    Hq % Hkv == 0 (grouped-query attention: query head h uses key/value head h // (Hq/Hkv)).
    Output in q's dtype; scores, softmax and accumulation in f32. scale defaults to 1/sqrt(D).

    positions [B, T] int (default arange(T)); kv_positions [B, S] (default: positions if S == T,
    else arange(S)). segment_ids [B, T], kv_segment_ids [B, S] (default: segment_ids if S == T).
    Key j is visible to query i iff (./masks.py, all by position, so a decode step against a
    cache of S and left padding just work):
      causal       kv_positions[j] <= positions[i]
      window w     positions[i] − kv_positions[j] < w (sliding window; with causal: the w most
                   recent positions, as transformers' `sliding_window`)
      chunk_size c positions[i] // c == kv_positions[j] // c (block-diagonal chunks)
      segment ids  equal ids
    window and chunk_size: positive ints or None (off). A query that sees no key gets zeros
    (and zero gradients).

    rope: q and k are passed un-rotated; every impl rotates them at their positions (one
    seq_len for both, `rotate_qk`). A RopeConfig works with every impl; a RopeArrays (runtime
    frequencies, `lctx_jax.rope.longrope_arrays`) with "xla" and "s2" ("flash" and "ring" take
    the frequencies as static kernel settings; "splash" and "cudnn", like them, RopeConfig).
    impl: "xla" (see xla.py; `block_size` forces its blockwise path); "flash" (see flash.py: a
    Pallas kernel that rotates q and k blocks in-kernel; `block_size` is its q and kv block,
    interpreted on CPU); "ring" (see ring.py: self-attention only, S == T, split over the
    mesh axis "sequence", causal load balancing by zigzag reordering; `block_size` is its
    largest tile); "s2" (see s2.py: LongLoRA's S²-Attn, a training-time approximation:
    self-attention only, S == T; queries see keys only within groups of `group_size` tokens
    (by index; even, dividing T; default T/4), shifted by half a group for the second half of
    the query heads; `block_size` as for "xla", within each group); "splash" (see splash.py:
    JAX's splash attention TPU kernel, interpreted on CPU; `block_size` a multiple of 128) and
    "cudnn" (see cudnn.py: cuDNN flash attention, NVIDIA GPU, bf16 / fp16; no `block_size`):
    both mask by token index, not position, which equals the rule above when positions are
    consecutive within each segment (arange, or packed documents restarting at 0; for
    chunk_size with "splash", arange): self-attention only, S == T, no kv_segment_ids.
    group_size: "s2" only.
    mesh: for "ring" (required), "flash", "splash" and "cudnn" (the kernel runs under a
    shard_map over the batch and head axes: `flash.attend_on_mesh`); unused by "xla" and "s2".
    inputs_reordered: "ring" only: tokens (q, k, v, positions, segment ids) already in ring
    order, output left in it (ring.py's).
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention impl {impl!r} is unknown; use one of "
                         f"{', '.join(map(repr, IMPLEMENTATIONS))}")
    _check_shapes(q, k, v)
    if impl == "s2" and q.shape[1] != k.shape[1]:
        raise ValueError(f"impl='s2' is self-attention for training: q has {q.shape[1]} tokens "
                         f"but k, v have {k.shape[1]}; generation with a KV cache uses full "
                         "attention (impl='xla')")
    if impl in ("splash", "cudnn"):
        _check_self_attention(impl, q, k, kv_segment_ids)
    batch, q_len, kv_len = q.shape[0], q.shape[1], k.shape[1]
    positions, kv_positions = _resolve_positions(positions, kv_positions, batch, q_len, kv_len)
    segment_ids, kv_segment_ids = _resolve_segment_ids(segment_ids, kv_segment_ids, batch,
                                                       q_len, kv_len)
    if block_size is not None and block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size}")
    masks.Mask(causal, window, chunk_size)  # ValueError naming window / chunk_size
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if impl in ("flash", "ring", "splash", "cudnn") and isinstance(rope, rope_lib.RopeArrays):
        raise NotImplementedError(
            f"attention impl {impl!r} takes rope as a RopeConfig; a RopeArrays (runtime "
            "frequencies, as the LongRoPE search uses) runs with impl 'xla': use "
            "attention='xla' for the search")
    args = {"causal": causal, "positions": positions, "kv_positions": kv_positions,
            "segment_ids": segment_ids, "kv_segment_ids": kv_segment_ids, "scale": scale,
            "rope": rope, "block_size": block_size, "window": window, "chunk_size": chunk_size}
    if impl in _KERNELS:
        if mesh is None:
            return _KERNELS[impl](q, k, v, **args)
        return flash.attend_on_mesh(q, k, v, mesh=mesh, kernel=_KERNELS[impl], impl=impl,
                                    **args)
    if impl == "ring":
        return ring.attend(q, k, v, mesh=mesh, inputs_reordered=inputs_reordered, **args)
    if impl == "s2":
        return s2.attend(q, k, v, group_size=group_size, **args)
    return xla.attend(q, k, v, **args)


def _check_self_attention(impl: str, q: jax.Array, k: jax.Array,
                          kv_segment_ids: jax.Array | None) -> None:
    """"splash" and "cudnn" mask by token index: queries and keys are the same tokens."""
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"impl={impl!r} masks by token index, so it is self-attention only: q "
                         f"has {q.shape[1]} tokens but k, v have {k.shape[1]}; use impl='xla' "
                         "or 'flash' for decoding against a KV cache")
    if kv_segment_ids is not None:
        raise ValueError(f"impl={impl!r} is self-attention: the keys take the queries' "
                         "segment_ids; drop kv_segment_ids, or use impl='xla' or 'flash' for "
                         "keys with segment ids of their own")


def _check_shapes(q: jax.Array, k: jax.Array, v: jax.Array) -> None:
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"expected q [B, T, Hq, D] and k, v [B, S, Hkv, D] of equal shape; got "
                         f"q {q.shape}, k {k.shape}, v {v.shape}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {q.shape} and k {k.shape} differ in batch or head_dim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} must be a multiple of key/value heads "
                         f"{k.shape[2]}")


def _resolve_positions(positions: jax.Array | None, kv_positions: jax.Array | None,
                       batch: int, q_len: int, kv_len: int) -> tuple[jax.Array, jax.Array]:
    if positions is None:
        positions = jnp.arange(q_len)
    positions = jnp.broadcast_to(jnp.asarray(positions, jnp.int32), (batch, q_len))
    if kv_positions is None:
        kv_positions = positions if kv_len == q_len else jnp.arange(kv_len)
    kv_positions = jnp.broadcast_to(jnp.asarray(kv_positions, jnp.int32), (batch, kv_len))
    return positions, kv_positions


def _resolve_segment_ids(segment_ids: jax.Array | None, kv_segment_ids: jax.Array | None,
                         batch: int, q_len: int, kv_len: int
                         ) -> tuple[jax.Array | None, jax.Array | None]:
    if segment_ids is None and kv_segment_ids is None:
        return None, None
    if segment_ids is None:
        raise ValueError("kv_segment_ids needs segment_ids for the queries too")
    if kv_segment_ids is None:
        if kv_len != q_len:
            raise ValueError(f"with {q_len} queries and {kv_len} keys, pass kv_segment_ids "
                             "as well as segment_ids")
        kv_segment_ids = segment_ids
    return (jnp.broadcast_to(jnp.asarray(segment_ids, jnp.int32), (batch, q_len)),
            jnp.broadcast_to(jnp.asarray(kv_segment_ids, jnp.int32), (batch, kv_len)))
