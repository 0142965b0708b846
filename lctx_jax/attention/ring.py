"""Ring attention (Liu et al. 2023): self-attention split over the mesh axis "sequence".

Each of the P devices of the ring keeps one chunk of T/P queries. The key/value chunks, with
their positions and segment ids, travel around the ring by `lax.ppermute` (P − 1 hops), and every
device folds each chunk that passes by into an online softmax (./online_softmax.py, in ./xla.py's
grouped layout: `xla.fold_block`):

    s = scale · q kᵀ (−inf where masks.visible is False),   m' = max(m, rowmax s),
    l' = l·e^(m − m') + Σ e^(s − m'),   acc' = acc·e^(m − m') + e^(s − m') v,
    out = acc / l,   lse = m + log l   (a query with no visible key: out 0, lse +inf).

Same semantics as the "xla" reference: the mask of ./masks.py (causal by position, sliding
window, chunks, segment ids), grouped-query attention without repeating k/v (query head h uses
key/value head h // G), f32 statistics.

Backward (`jax.custom_vjp`, FlashAttention-2 recomputation): the forward saves out and lse. The
kv chunks go around the ring again, each followed one hop behind by its f32 dK, dV accumulator,
to which every device adds its queries' contribution; after the last hop it reaches the chunk's
owner. Per tile pair, with δ = rowsum(dout ⊙ out):

    p = e^(s − lse),  dV += pᵀ dout,  dS = scale · p ⊙ (dout vᵀ − δ),  dQ += dS k,  dK += dSᵀ q.

A device holds its own chunk, the visiting one (two while a hop is in flight) and [bq, bk] score
tiles: never T×T scores, nor all of K, V or their gradients.

Tiles. Within a hop, queries and the visiting chunk are cut into tiles (`tile_size`), visited
by two nested loops (q tiles, kv tiles). A tile pair is skipped by `lax.cond` when in every
batch row `masks.may_see` rules it out from the tiles' position bounds (causal: every key after
every query; a window: every key too far back; chunks: no chunk in common) or, with segment
ids, the tiles' [min, max] segment-id ranges are disjoint (then no id is in common, whatever
the ids; with documents packed contiguously under non-decreasing ids, as lctx_jax.data packs
them, that is every pair of tiles with no document in common). So whole hops of invisible
chunks cost nothing. `work_per_device` counts the pairs each device computes.
Every loop here (hops and tiles) is a `lax.while_loop`, not a scan: see `_repeat` for why a
layer-scanned model would otherwise keep O(T²/P) of masks and probabilities per device.

Load balancing (causal only; a non-causal ring is balanced as it is). Contiguous chunks give the
last device P times the work of the first. `scheme` reorders tokens along T before the ring and
restores the output after (`reorder`, `restore`): "zigzag" (device i holds chunks i and
2P−1−i of 2P; tiles split the two halves) or "striped" (token t on device t mod P); "none" keeps
contiguous chunks. Positions and segment ids move with their tokens, so the mask and RoPE see
true positions and the result does not depend on the scheme, only the work does.
A caller that keeps its tokens in ring order passes `inputs_reordered=True`: attend then skips
the reorder and restore, cross-device permutations of q, k, v, positions, segment ids and out
on every call. The LLaMA decoder (lctx_jax.models.llama) does so: with attention="ring" on a
mesh splitting "sequence" (no KV cache) it reorders input_ids, positions and segment ids once
before its layers (by DEFAULT_SCHEME, what attend uses when causal) and restores the final
hidden states once; norms and MLPs act per token, so the logits are unchanged.

RoPE: q and the local k are rotated once per device before the ring, from their true positions,
by `lx.rope.rotate_qk` with seq_len = global max position + 1 (`lax.pmax` over the ring and batch
axes); rotated keys then travel. Autodiff takes the rotation's gradient.

Sharding: in_specs P(batch, "sequence", heads, None) with batch = the mesh's "data" and "fsdp"
axes (those present) and heads = "tensor" if present (the names: lctx_jax.sharding's
BATCH_AXES, SEQUENCE_AXIS, TENSOR_AXIS). Ordinary arrays may be passed: `shard_map` (eager or
inside jit) moves them to those shardings; arrays already placed there are not copied.

Overlap: every hop issues the ppermute of the next chunk (in the backward also of the arriving
dK, dV accumulator) before computing on the current one, and nothing in the hop's compute waits
for it, so an asynchronous collective can run behind the compute.

Verified on CPU only (8 simulated devices; tests/test_ring.py): values and gradients against
the "xla" path; the arrays each pass sends (P − 1 kv hops forward; P − 1 kv and P dK, dV hops
backward); that the tiles computed per device equal `work_per_device`; that `reorder` compiles
to chunk-sized collectives, no all-gather; that a ring LLaMA equals an "xla" one and its
compiled forward has no reorder collective left in its layer loop. Not verified: that GPU/TPU
schedulers do overlap the ppermutes, speed, memory at scale.

Inner block. `inner="flash"` runs the Pallas kernels of ./flash.py on each visiting chunk
(`flash.chunk_forward` gives the chunk's normalised out and lse, merged by logsumexp; the
backward runs flash's dq and dk, dv kernels with the global lse and δ), so no f32 score tile
goes through HBM; within a hop the kernels skip kv blocks by their position ranges (causal,
window, chunks) but not by segment id, and a hop with nothing visible still runs its grid
(every step skipped). tests/test_ring.py checks it, interpreted, on 8 simulated devices
against the xla path. The default stays this module's XLA tiles (`inner="xla"`, the only
inner block on CPU, where Pallas only interprets) until the kernels have run on a GPU or TPU:
the pod sizings in the README were compiled with it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec

from lctx_jax import rope as rope_lib
from lctx_jax import sharding
from lctx_jax.attention import flash, masks, online_softmax, xla

SCHEMES = ("zigzag", "striped", "none")
INNER = ("xla", "flash")
DEFAULT_SCHEME = "zigzag"  # attend's (and work_per_device's) scheme unless told otherwise

Tree = Any


# ----------------------------------------------------------------------------- public helpers


def reorder(x: jax.Array, ring_size: int, scheme: str, axis: int = 1) -> jax.Array:
    """Tokens along `axis` (length T) into ring order: contiguous chunk i of T/P is what device
    i holds. zigzag: chunks i and 2P−1−i of 2P; striped: tokens i, i+P, i+2P, ...; none: as is.
    Pure reshapes and transposes, which XLA partitions into chunk-sized collectives."""
    _check_scheme(scheme)
    x = jnp.moveaxis(jnp.asarray(x), axis, 0)
    length, rest = x.shape[0], x.shape[1:]
    _check_length(length, ring_size, scheme)
    if scheme == "zigzag":
        halves = x.reshape(2, ring_size, length // (2 * ring_size), *rest)
        x = jnp.stack([halves[0], halves[1, ::-1]], axis=1)  # [P, 2, T/2P, ...]
    elif scheme == "striped":
        x = x.reshape(length // ring_size, ring_size, *rest).swapaxes(0, 1)  # [P, T/P, ...]
    return jnp.moveaxis(x.reshape(length, *rest), 0, axis)


def restore(x: jax.Array, ring_size: int, scheme: str, axis: int = 1) -> jax.Array:
    """The inverse of `reorder`: ring order back to token order along `axis`."""
    _check_scheme(scheme)
    x = jnp.moveaxis(jnp.asarray(x), axis, 0)
    length, rest = x.shape[0], x.shape[1:]
    _check_length(length, ring_size, scheme)
    if scheme == "zigzag":
        pairs = x.reshape(ring_size, 2, length // (2 * ring_size), *rest)
        x = jnp.concatenate([pairs[:, 0], pairs[::-1, 1]])  # chunks 0..P−1, then P..2P−1
    elif scheme == "striped":
        x = x.reshape(ring_size, length // ring_size, *rest).swapaxes(0, 1)
    return jnp.moveaxis(x.reshape(length, *rest), 0, axis)


def tile_size(chunk: int, scheme: str, block_size: int | None = None) -> int:
    """Tile length within a device's chunk of `chunk` tokens: the largest divisor of the chunk
    (of its half for zigzag, so tiles never straddle the two halves) that is at most
    block_size (default xla.DEFAULT_BLOCK_SIZE). A chunk length with no divisor near block_size
    gives small tiles: correct, but slow."""
    unit = chunk // 2 if scheme == "zigzag" else chunk
    block = min(block_size or xla.DEFAULT_BLOCK_SIZE, unit)
    return next(d for d in range(block, 0, -1) if unit % d == 0)


def work_per_device(positions: Any, ring_size: int, scheme: str = DEFAULT_SCHEME, *,
                    causal: bool = True, block_size: int | None = None,
                    inputs_reordered: bool = False, window: int | None = None,
                    chunk_size: int | None = None, segment_ids: Any = None) -> np.ndarray:
    """Tile pairs each device computes in one ring pass (the backward computes the same ones):
    int [ring_size], from positions [B, T] or [T] and segment_ids [B, T], [T] or None as given
    to `attend` (same arguments; self-attention: the keys' are the queries').

    A device computes pair (q tile, kv tile) unless, in every batch row, `masks.may_see` rules
    it out from the tiles' position bounds or their segment-id ranges are disjoint. Each device
    meets every kv chunk once, so the total over devices and the balance (max / mean) follow
    from the layout alone.
    """
    mask = masks.Mask(causal, window, chunk_size)
    positions, segment_ids = (None if x is None else np.atleast_2d(np.asarray(x))
                              for x in (positions, segment_ids))
    if segment_ids is not None:
        positions, segment_ids = np.broadcast_arrays(positions, segment_ids)
    batch, length = positions.shape
    scheme = _scheme(scheme, causal)
    _check_length(length, ring_size, scheme)
    chunk = length // ring_size
    tile = tile_size(chunk, scheme, block_size)

    def tiles(x: np.ndarray | None) -> np.ndarray | None:  # [B, T] -> ring order [B, P, n, tile]
        if x is None:
            return None
        if not inputs_reordered:
            x = np.asarray(reorder(x, ring_size, scheme))
        return x.reshape(batch, ring_size, chunk // tile, tile)

    bounds = _bounds(tiles(positions), tiles(segment_ids))  # each [B, P, n] (or None)
    # q tiles along [B, P, n, 1, 1], kv tiles along [B, 1, 1, P, n]: seen [B, P, n, P, n]
    seen = _may_see(mask, [None if x is None else x[..., None, None] for x in bounds],
                    [None if x is None else x[:, None, None] for x in bounds])
    if seen is None:
        return np.full(ring_size, ring_size * (chunk // tile) ** 2)
    return seen.any(axis=0).sum(axis=(1, 2, 3))


# ----------------------------------------------------------------------------- attend


@dataclasses.dataclass(frozen=True)
class _Config:
    """What the ring core needs to know statically (a custom_vjp nondiff argument)."""
    mask: masks.Mask
    scale: float
    ring_size: int
    tile: int
    axes: tuple[str, ...]  # the mesh axes q, k, v are split over (they vary along them)
    inner: str = "xla"     # per-hop block: "xla" tiles, or "flash" (Pallas kernels)
    backend: str = "cpu"   # the mesh's platform, for inner="flash"
    block_size: int | None = None  # inner="flash": its blocks (None: its default)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, mesh: Any, positions: jax.Array,
           kv_positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
           kv_segment_ids: jax.Array | None = None, causal: bool = True,
           scale: float | None = None, rope: rope_lib.RopeConfig | None = None,
           scheme: str = DEFAULT_SCHEME, inputs_reordered: bool = False,
           block_size: int | None = None, window: int | None = None,
           chunk_size: int | None = None, inner: str | None = None) -> jax.Array:
    """Self-attention q [B, T, Hq, D], k, v [B, T, Hkv, D] (un-rotated) -> [B, T, Hq, D] in q's
    dtype, T split over mesh axis "sequence" (P devices; T % P == 0, T % 2P == 0 for zigzag).

    positions [B, T] int (or [T]); kv_positions default positions; segment_ids [B, T] or None;
    kv_segment_ids default segment_ids. scale default 1/sqrt(D). rope: rotated inside from the
    positions. causal, window, chunk_size: the mask (./masks.py). scheme: "zigzag" |
    "striped" | "none", the causal load balancing (ignored when not causal). inputs_reordered:
    all of q, k, v, positions and segment ids are already in `reorder(·, P, scheme)` order, and
    the output is returned in that order. block_size: the largest tile (see `tile_size`; with
    inner="flash" the kernels' block). inner: the per-hop block, "xla" (this module's tiles;
    the default) or "flash" (the Pallas kernels of ./flash.py, `chunk_forward` /
    `chunk_backward`, for GPU and TPU meshes; see "Inner block" in the module docstring).
    """
    ring_size = _ring_size(mesh)
    batch, length, q_heads, head_dim = q.shape
    if k.shape[1] != length or v.shape[1] != length:
        raise ValueError(f"ring attention is self-attention: q has {length} tokens but k, v "
                         f"have {k.shape[1]}, {v.shape[1]}; use impl='xla' or 'flash' for "
                         "decoding against a cache")
    scheme = _scheme(scheme, causal)
    _check_length(length, ring_size, scheme)
    batch_axes, head_axis = _mesh_axes(mesh, batch, q_heads, k.shape[2])

    def tokens(x: Any) -> jax.Array | None:  # [B, T] int32
        return None if x is None else jnp.broadcast_to(jnp.asarray(x, jnp.int32),
                                                       (batch, length))

    positions, segment_ids = tokens(positions), tokens(segment_ids)
    kv_positions = positions if kv_positions is None else tokens(kv_positions)
    kv_segment_ids = segment_ids if kv_segment_ids is None else tokens(kv_segment_ids)
    if (segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("pass segment_ids for the queries as well as kv_segment_ids")
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    axes = (*batch_axes, sharding.SEQUENCE_AXIS) + ((head_axis,) if head_axis else ())
    backend = mesh.devices.flat[0].platform
    inner = inner or "xla"
    if inner not in INNER:
        raise ValueError(f"ring inner block {inner!r} is unknown; use one of "
                         f"{', '.join(map(repr, INNER))}")
    cfg = _Config(mask=masks.Mask(causal, window, chunk_size), scale=float(scale),
                  ring_size=ring_size, tile=tile_size(length // ring_size, scheme, block_size),
                  axes=axes, inner=inner, backend=backend, block_size=block_size)
    run = _compiled(cfg, rope, mesh, batch_axes, head_axis,
                    None if inputs_reordered else scheme)
    return run(q, k, v, positions, kv_positions, segment_ids, kv_segment_ids)


@functools.lru_cache(maxsize=32)
def _compiled(cfg: _Config, rope: rope_lib.RopeConfig | None, mesh: Any,
              batch_axes: tuple[str, ...], head_axis: str | None, scheme: str | None
              ) -> Callable[..., jax.Array]:
    """jit(reorder by `scheme` (None: inputs already in ring order), shard_map, restore) for
    one static configuration. Cached, so eager callers compile once; inside an outer jit it is
    inlined."""
    batch_spec = batch_axes or None
    heads = PartitionSpec(batch_spec, sharding.SEQUENCE_AXIS, head_axis, None)
    rows = PartitionSpec(batch_spec, sharding.SEQUENCE_AXIS)
    local = functools.partial(_local_attention, cfg, rope,
                              (*batch_axes, sharding.SEQUENCE_AXIS))
    # Pallas calls carry no varying-axes types: the kernel inner block runs unchecked.
    sharded = jax.shard_map(local, mesh=mesh, in_specs=(heads,) * 3 + (rows,) * 4,
                            out_specs=heads, check_vma=cfg.inner == "xla")

    def run(*arrays: jax.Array | None) -> jax.Array:
        if scheme is None:
            return sharded(*arrays)
        arrays = tuple(None if x is None else reorder(x, cfg.ring_size, scheme)
                       for x in arrays)
        return restore(sharded(*arrays), cfg.ring_size, scheme)

    return jax.jit(run)


def _local_attention(cfg: _Config, rope: rope_lib.RopeConfig | None,
                     position_axes: tuple[str, ...], q: jax.Array, k: jax.Array, v: jax.Array,
                     positions: jax.Array, kv_positions: jax.Array,
                     segment_ids: jax.Array | None, kv_segment_ids: jax.Array | None
                     ) -> jax.Array:
    """One device's part (inside shard_map): local chunks [b, T/P, ...] -> out [b, T/P, hq, D]."""
    if rope is not None:
        seq_len = lax.pmax(jnp.maximum(positions.max(), kv_positions.max()), position_axes) + 1
        q, k = rope_lib.rotate_qk(q, k, rope, positions, kv_positions, seq_len=seq_len)
    return _ring_attention(cfg, q, k, v, positions, kv_positions, segment_ids, kv_segment_ids)


# ----------------------------------------------------------------------------- ring core


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring_attention(cfg: _Config, q: jax.Array, k: jax.Array, v: jax.Array,
                    positions: jax.Array, kv_positions: jax.Array,
                    segment_ids: jax.Array | None, kv_segment_ids: jax.Array | None
                    ) -> jax.Array:
    return _ring_forward(cfg, q, k, v, positions, kv_positions, segment_ids, kv_segment_ids)[0]


def _ring_forward(cfg: _Config, q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array,
                  kv_positions: jax.Array, segment_ids: jax.Array | None,
                  kv_segment_ids: jax.Array | None) -> tuple[jax.Array, tuple]:
    if cfg.inner == "flash":
        return _kernel_forward(cfg, q, k, v, positions, kv_positions, segment_ids,
                               kv_segment_ids)
    q_tiles = _q_tiles(cfg, q, k.shape[2], positions, segment_ids)
    step = functools.partial(_forward_step, cfg, q_tiles)
    n, b, bq, kv_heads, groups, _ = q_tiles[0].shape
    stats = _varying(cfg, online_softmax.init((n, b, kv_heads, groups, bq), v.shape[-1]))
    kv = _kv_tiles(cfg, k, v, kv_positions, kv_segment_ids)
    out, lse = online_softmax.finish(_forward_hops(cfg, step, stats, kv))  # [n, b, Hkv, G, bq, ·]
    out = _merge_tiles(out.transpose(0, 1, 4, 2, 3, 5), q.shape).astype(q.dtype)
    return out, (q, k, v, positions, kv_positions, segment_ids, kv_segment_ids, out, lse)


def _ring_backward(cfg: _Config, residuals: tuple, d_out: jax.Array) -> tuple:
    if cfg.inner == "flash":
        return _kernel_backward(cfg, residuals, d_out)
    q, k, v, positions, kv_positions, segment_ids, kv_segment_ids, out, lse = residuals
    kv_heads = k.shape[2]
    q_tiles = _q_tiles(cfg, q, kv_heads, positions, segment_ids)
    d_out_tiles = _split_tiles(cfg, xla.group_heads(d_out, kv_heads))
    out_tiles = _split_tiles(cfg, xla.group_heads(out, kv_heads))
    delta = online_softmax.delta(jnp.moveaxis(d_out_tiles, 2, 4), jnp.moveaxis(out_tiles, 2, 4))
    step = functools.partial(_backward_step, cfg, (*q_tiles, d_out_tiles, lse, delta))
    d_q = _varying(cfg, jnp.zeros(q_tiles[0].shape, jnp.float32))
    d_q, (d_k, d_v) = _backward_hops(cfg, step, d_q,
                                     _kv_tiles(cfg, k, v, kv_positions, kv_segment_ids))
    return (*(_merge_tiles(grad, x.shape).astype(x.dtype)
              for grad, x in ((d_q, q), (d_k, k), (d_v, v))), None, None, None, None)


_ring_attention.defvjp(_ring_forward, _ring_backward)


def _chunk_args(cfg: _Config, positions: jax.Array, segment_ids: jax.Array | None,
                kv: tuple) -> dict:
    """`flash.chunk_forward` / `chunk_backward`'s keywords for the visiting chunk kv."""
    return dict(positions=positions, kv_positions=kv[2], segment_ids=segment_ids,
                kv_segment_ids=kv[3], mask=cfg.mask, scale=cfg.scale,
                block_size=cfg.block_size, backend=cfg.backend)


def _kernel_forward(cfg: _Config, q: jax.Array, k: jax.Array, v: jax.Array,
                    positions: jax.Array, kv_positions: jax.Array,
                    segment_ids: jax.Array | None, kv_segment_ids: jax.Array | None
                    ) -> tuple[jax.Array, tuple]:
    """inner="flash": each visiting chunk through `flash.chunk_forward` (out f32 [b, T/P, Hq, D]
    over the chunk, lse [b, T/P, Hq]), merged by logsumexp:
        lse' = log(e^lse + e^lse_c),   out' = out·e^(lse − lse') + out_c·e^(lse_c − lse')
    (a chunk with no visible key has lse_c = +inf there: weight 0)."""
    def step(stats: tuple, kv: tuple) -> tuple:
        out, lse = stats
        part, part_lse = flash.chunk_forward(q, kv[0], kv[1],
                                             **_chunk_args(cfg, positions, segment_ids, kv))
        part_lse = jnp.where(jnp.isinf(part_lse), -jnp.inf, part_lse)
        merged = jnp.logaddexp(lse, part_lse)
        safe = jnp.where(jnp.isneginf(merged), 0.0, merged)
        out = (out * jnp.exp(lse - safe)[..., None]
               + part * jnp.exp(part_lse - safe)[..., None])
        return out, merged

    init = _varying(cfg, (jnp.zeros(q.shape, jnp.float32),
                          jnp.full(q.shape[:3], -jnp.inf, jnp.float32)))
    out, lse = _forward_hops(cfg, step, init, (k, v, kv_positions, kv_segment_ids))
    lse = jnp.where(jnp.isneginf(lse), jnp.inf, lse)  # no visible key: p = e^(s − lse) = 0
    out = out.astype(q.dtype)
    return out, (q, k, v, positions, kv_positions, segment_ids, kv_segment_ids, out, lse)


def _kernel_backward(cfg: _Config, residuals: tuple, d_out: jax.Array) -> tuple:
    """inner="flash": `flash.chunk_backward` per visiting chunk with the global lse and
    δ = rowsum(dout ⊙ out); dq sums on the device, each chunk's dK, dV follow it round the
    ring (`_backward_hops`)."""
    q, k, v, positions, kv_positions, segment_ids, kv_segment_ids, out, lse = residuals
    delta = online_softmax.delta(d_out, out)

    def step(d_q: jax.Array, kv: tuple) -> tuple:
        dq, dk, dv = flash.chunk_backward(q, kv[0], kv[1], d_out, lse, delta[..., 0],
                                          **_chunk_args(cfg, positions, segment_ids, kv))
        return d_q + dq, (dk, dv)

    d_q = _varying(cfg, jnp.zeros(q.shape, jnp.float32))
    d_q, (d_k, d_v) = _backward_hops(cfg, step, d_q, (k, v, kv_positions, kv_segment_ids))
    return (d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype),
            None, None, None, None)


def _pass_on(cfg: _Config, tree: Tree) -> Tree:
    """Every device sends `tree` to the next one on the ring (i -> i + 1 mod P)."""
    size = cfg.ring_size
    return lax.ppermute(tree, sharding.SEQUENCE_AXIS,
                        [(i, (i + 1) % size) for i in range(size)])


def _forward_hops(cfg: _Config, step: Callable[[Tree, Tree], Tree], stats: Tree, kv: Tree
                  ) -> Tree:
    """Folds the P chunks into `stats` (the tiles' online-softmax stats, or the kernel path's
    (out, lse)): at hop s a device holds the chunk of device i − s.
    The next chunk's ppermute is issued alongside the current chunk's compute."""
    def hop(_: jax.Array, carry: tuple) -> tuple:
        stats, kv = carry
        next_kv = _pass_on(cfg, kv)  # in flight while this hop computes
        return step(stats, kv), next_kv

    stats, kv = _repeat(cfg.ring_size - 1, hop, (stats, kv))
    return step(stats, kv)  # the last chunk goes no further


def _repeat(times: int, body: Callable[..., Tree], carry: Tree) -> Tree:
    """carry = body(i, carry) for i = 0 .. times − 1, as a `lax.while_loop`, never a scan.

    Why: when the layers' `lax.scan` is differentiated, JAX partially evaluates its body to
    hoist loop-invariant work out of it, and positions and segment ids are loop-invariant
    there. A scan in here would be split into a known scan
    (masks, cond predicates: functions of positions alone) and an unknown one, joined by their
    per-iteration values stacked over every hop and tile pair, O(T²/P) per device. A while
    loop is never split that way (it keeps no residuals), so the only residuals of a layer
    stay the custom VJP's q, k, v, out and lse."""
    def step(state: tuple) -> tuple:
        i, carry = state
        return i + 1, body(i, carry)

    return lax.while_loop(lambda state: state[0] < times, step, (jnp.int32(0), carry))[1]


def _backward_hops(cfg: _Config, step: Callable[[jax.Array, Tree], tuple[jax.Array, Tree]],
                   d_q: jax.Array, kv: Tree) -> tuple[jax.Array, Tree]:
    """Runs step(dq, chunk) -> (dq, chunk's dK, dV contribution) on the P chunks as they pass.
    Each chunk's accumulator follows it one hop behind (sent at the start of the next hop, so
    both ppermutes overlap the compute) and, after the last hop, goes home to its owner."""
    def hop(carry: tuple, send_kv: bool) -> tuple:
        d_q, kv, d_kv = carry  # d_kv: this device's sum for the chunk it held last hop
        next_kv = _pass_on(cfg, kv) if send_kv else kv
        arrived = _pass_on(cfg, d_kv)  # the previous device's sum for the chunk held now
        d_q, contribution = step(d_q, kv)
        return d_q, next_kv, jax.tree.map(jnp.add, arrived, contribution)

    size = cfg.ring_size
    next_kv = _pass_on(cfg, kv) if size > 1 else kv
    d_q, own = step(d_q, kv)  # hop 0: the device's own chunk, nothing arrived yet
    carry = (d_q, next_kv, own)
    if size > 2:
        carry = _repeat(size - 2, lambda _, c: hop(c, True), carry)
    if size > 1:
        carry = hop(carry, False)
    d_q, _, d_kv = carry
    return d_q, _pass_on(cfg, d_kv)  # held chunk i + 1's sum: to device i + 1


# ----------------------------------------------------------------------------- one hop


def _forward_step(cfg: _Config, q_tiles: tuple, stats: online_softmax.Stats, kv: tuple
                  ) -> online_softmax.Stats:
    """Folds one visiting chunk into every q tile's stats: q tiles [n, b, bq, Hkv, G, D] with
    positions and segment ids [n, b, bq]; kv tiles [n, b, bk, Hkv, D], [n, b, bk]; stats
    [n, b, Hkv, G, bq, ·]."""
    def q_tile(i: jax.Array, stats: online_softmax.Stats) -> online_softmax.Stats:
        q, q_pos, q_seg = _tile(q_tiles, i)

        def kv_tile(j: jax.Array, tile_stats: online_softmax.Stats) -> online_softmax.Stats:
            k, v, kv_pos, kv_seg = _tile(kv, j)

            def fold(tile_stats: online_softmax.Stats) -> online_softmax.Stats:
                visible = masks.visible(cfg.mask, q_pos, kv_pos, q_seg, kv_seg)
                return xla.fold_block(tile_stats, q, k, v, visible, cfg.scale)

            return _unless_hidden(cfg, (q_pos, q_seg), (kv_pos, kv_seg), fold, tile_stats)

        return _set_tile(stats, i, _repeat(_count(kv), kv_tile, _tile(stats, i)))

    return _repeat(_count(q_tiles), q_tile, stats)


def _backward_step(cfg: _Config, q_side: tuple, d_q: jax.Array, kv: tuple
                   ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """dq [n, b, bq, Hkv, G, D] f32 updated with one visiting chunk, and the chunk's dK, dV
    contribution [n, b, bk, Hkv, D] f32. q_side: q tiles, positions, segment ids, dout tiles,
    lse and δ [n, b, Hkv, G, bq, 1]."""
    def kv_tile(j: jax.Array, carry: tuple) -> tuple:
        d_q, d_kv = carry
        k, v, kv_pos, kv_seg = _tile(kv, j)

        def q_tile(i: jax.Array, carry: tuple) -> tuple:
            d_q, tile_d_kv = carry
            q, q_pos, q_seg, d_out, lse, delta = _tile(q_side, i)

            def grads(tile_grads: tuple) -> tuple:
                tile_d_q, (d_k, d_v) = tile_grads
                visible = masks.visible(cfg.mask, q_pos, kv_pos, q_seg, kv_seg)
                dq, dk, dv = _tile_grads(q, k, v, d_out, lse, delta, visible, cfg.scale)
                return tile_d_q + dq, (d_k + dk, d_v + dv)

            tile_d_q, tile_d_kv = _unless_hidden(cfg, (q_pos, q_seg), (kv_pos, kv_seg),
                                                 grads, (_tile(d_q, i), tile_d_kv))
            return _set_tile(d_q, i, tile_d_q), tile_d_kv

        zeros = _varying(cfg, tuple(jnp.zeros(x.shape, jnp.float32) for x in (k, v)))
        d_q, tile_d_kv = _repeat(_count(q_side), q_tile, (d_q, zeros))
        return d_q, _set_tile(d_kv, j, tile_d_kv)

    d_kv = _varying(cfg, tuple(jnp.zeros(x.shape, jnp.float32) for x in kv[:2]))
    return _repeat(_count(kv), kv_tile, (d_q, d_kv))


def _count(tiles: Tree) -> int:
    """The number of tiles n of [n, ...] arrays."""
    return jax.tree.leaves(tiles)[0].shape[0]


def _tile(tiles: Tree, i: jax.Array) -> Tree:
    """Tile i of every [n, ...] array (None stays None)."""
    return jax.tree.map(lambda x: lax.dynamic_index_in_dim(x, i, keepdims=False), tiles)


def _set_tile(tiles: Tree, i: jax.Array, values: Tree) -> Tree:
    """`tiles` with tile i replaced by `values` (in place inside the loops)."""
    return jax.tree.map(lambda x, y: lax.dynamic_update_index_in_dim(x, y, i, 0), tiles, values)


def _tile_grads(q: jax.Array, k: jax.Array, v: jax.Array, d_out: jax.Array, lse: jax.Array,
                delta: jax.Array, visible: jax.Array, scale: float
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One tile pair's f32 (dq [b, bq, Hkv, G, D], dk, dv [b, bk, Hkv, D]) from q, d_out
    [b, bq, Hkv, G, D], k, v [b, bk, Hkv, D], lse, δ [b, Hkv, G, bq, 1], visible [b, bq, bk]:
    `online_softmax`'s p and dS, contracted in the grouped layout."""
    probs = online_softmax.probabilities(xla.masked_scores(q, k, visible, scale), lse)
    d_v = jnp.einsum("bhgqk,bqhgd->bkhd", probs.astype(d_out.dtype), d_out,
                     preferred_element_type=jnp.float32)
    d_probs = jnp.einsum("bqhgd,bkhd->bhgqk", d_out, v, preferred_element_type=jnp.float32)
    d_scores = online_softmax.score_grads(probs, d_probs, delta, scale).astype(q.dtype)
    d_q = jnp.einsum("bhgqk,bkhd->bqhgd", d_scores, k, preferred_element_type=jnp.float32)
    d_k = jnp.einsum("bhgqk,bqhgd->bkhd", d_scores, q, preferred_element_type=jnp.float32)
    return d_q, d_k, d_v


def _varying(cfg: _Config, tree: Tree) -> Tree:
    """Fresh arrays (initial accumulators) typed as varying over the mesh axes like q, k, v, as
    shard_map's checks require of loop carries and cond branches mixing them."""
    return lax.pcast(tree, cfg.axes, to="varying")


def _unless_hidden(cfg: _Config, q_tokens: tuple, kv_tokens: tuple,
                   fn: Callable[[Tree], Tree], operand: Tree) -> Tree:
    """fn(operand), skipped (operand unchanged) when `_may_see` rules the tile pair out in every
    batch row: q_tokens (positions [b, bq], segment ids [b, bq] or None), kv_tokens alike."""
    may_see = _may_see(cfg.mask, _bounds(*q_tokens, axis=1), _bounds(*kv_tokens, axis=1))
    if may_see is None:
        return fn(operand)
    return lax.cond(jnp.any(may_see), fn, lambda x: x, operand)


def _bounds(positions: Any, segment_ids: Any, axis: int = -1) -> tuple:
    """(min, max position, min, max segment id) of tiles along `axis` (numpy or jax arrays;
    the segment bounds None without segment ids)."""
    segments = (None, None) if segment_ids is None else (segment_ids.min(axis),
                                                         segment_ids.max(axis))
    return positions.min(axis), positions.max(axis), *segments


def _may_see(mask: masks.Mask, q: Sequence[Any], kv: Sequence[Any]) -> Any:
    """Whether a (q tile, kv tile) pair can hold a visible pair, from their `_bounds`:
    `masks.may_see`, and with segment ids their [min, max] ranges overlapping (disjoint ranges
    share no id). None when nothing can be skipped."""
    seen = masks.may_see(mask, q_min=q[0], q_max=q[1], kv_min=kv[0], kv_max=kv[1])
    if q[2] is None:
        return seen
    overlap = (kv[2] <= q[3]) & (q[2] <= kv[3])
    return overlap if seen is None else seen & overlap


# ----------------------------------------------------------------------------- layout


def _split_tiles(cfg: _Config, x: jax.Array | None) -> jax.Array | None:
    """[b, L, ...] -> [L / tile, b, tile, ...] (the tile divides L: no padding)."""
    return xla.split_blocks(x, cfg.tile)


def _merge_tiles(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """[n, b, tile, ...] -> `shape` [b, n·tile, ...] (trailing dims regrouped)."""
    return jnp.moveaxis(x, 0, 1).reshape(shape)


def _q_tiles(cfg: _Config, q: jax.Array, kv_heads: int, positions: jax.Array,
             segment_ids: jax.Array | None) -> tuple:
    return tuple(_split_tiles(cfg, x) for x in
                 (xla.group_heads(q, kv_heads), positions, segment_ids))


def _kv_tiles(cfg: _Config, k: jax.Array, v: jax.Array, kv_positions: jax.Array,
              kv_segment_ids: jax.Array | None) -> tuple:
    return tuple(_split_tiles(cfg, x) for x in (k, v, kv_positions, kv_segment_ids))


# ----------------------------------------------------------------------------- checks


def _scheme(scheme: str, causal: bool) -> str:
    _check_scheme(scheme)
    return scheme if causal else "none"  # without causality every device has equal work


def _check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"ring scheme {scheme!r} is unknown; use one of "
                         f"{', '.join(map(repr, SCHEMES))}")


def _check_length(length: int, ring_size: int, scheme: str) -> None:
    parts = 2 * ring_size if scheme == "zigzag" else ring_size
    if length % parts:
        raise ValueError(f"ring attention over {ring_size} devices with scheme {scheme!r} needs "
                         f"a sequence length divisible by {parts}, got {length}")


def _ring_size(mesh: Any) -> int:
    axis = sharding.SEQUENCE_AXIS
    if mesh is None:
        raise ValueError(f"impl='ring' needs mesh=: a jax.sharding.Mesh with a {axis!r} axis, "
                         f"e.g. lx.make_mesh({axis}=N)")
    if axis not in mesh.axis_names:
        raise ValueError(f"impl='ring' splits the sequence over the mesh axis {axis!r}, but "
                         f"the mesh has axes {tuple(mesh.axis_names)}")
    return mesh.shape[axis]


def _mesh_axes(mesh: Any, batch: int, q_heads: int, kv_heads: int
               ) -> tuple[tuple[str, ...], str | None]:
    """(batch axes present in the mesh, the head axis or None), checking divisibility."""
    batch_axes = tuple(a for a in sharding.BATCH_AXES if a in mesh.axis_names)
    batch_devices = math.prod(mesh.shape[a] for a in batch_axes)
    if batch % batch_devices:
        raise ValueError(f"batch {batch} is not divisible by the {batch_devices} devices of "
                         f"mesh axes {batch_axes}")
    head_axis = sharding.TENSOR_AXIS
    if head_axis not in mesh.axis_names:
        return batch_axes, None
    tensor = mesh.shape[head_axis]
    if q_heads % tensor or kv_heads % tensor:
        raise ValueError(f"query heads {q_heads} and key/value heads {kv_heads} must both be "
                         f"divisible by the mesh's {head_axis!r} axis ({tensor})")
    return batch_axes, head_axis
