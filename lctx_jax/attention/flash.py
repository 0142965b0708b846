"""Flash attention in Pallas with RoPE fused into the kernel: forward and backward, grouped-query,
with the mask of ./masks.py (causal by position, sliding window, chunks, segment ids). `attend`
takes un-rotated q and k.

    out[b, i, h] = Σ_j p_ij · v[b, j, h // G],   p_ij = softmax_j(scale · q'_i · k'_j), visible j
    q'_i = R(θ(positions[b, i])) q_i,             k'_j = R(θ(kv_positions[b, j])) k_j

Same semantics as ./xla.py (the reference): f32 scores, softmax and accumulation, zeros for a
query that sees no key. Inside the kernels, the mask of a block is `masks.visible_pairs` on a
column of query positions and a row of key positions (and segment ids; plus padded keys), and
the online softmax and its backward are ./online_softmax.py's functions on [bq, bk] blocks.

How RoPE enters. `lx.rope.frequencies(rope, seq_len)` runs once outside the kernel (seq_len =
max over positions and kv_positions + 1, as in `lx.rope.rotate_qk`), and so do the tables:
cos and sin [B, L, D'] of every query and key position (`rope_tables`, by `lx.rope.rotation`,
in q's dtype as transformers casts them), with the rotate-half sign folded into sin, so that
    R(θ)x = x·cos + swap(x)·sin,   swap([x₁, x₂]) = [x₂, x₁],   sin = [−sin₁, sin₂].
The tables stream block by block beside q and k, like k and v: the kernels run no sin or cos,
only 2 multiplies, an add and the swap per element (f32, then back to the input dtype for the
matrix unit). Rotated q and k never exist in HBM; the tables are rebuilt from the positions
for the backward, never saved. Partial rotary (rotary_dim r < head_dim D): outside the kernel
the dims of q and k (never v) are permuted, the same way for both, so that scores q·k do not
change, into [rot₁ | pass₁ | rot₂ | pass₂] with the halves of the rotary part D'/2 apart;
the tables hold cos = 1, sin = 0 on the pass-through lanes (which also keeps the attention
factor off them). The gradients of that permutation, the transposes and the padding are left
to autodiff.

Backward (FlashAttention-2 with recomputation, `jax.custom_vjp`): the forward saves out and the
logsumexp lse (f32 [B, H, T, 1]); delta = rowsum(dout · out) is an XLA reduction; one kernel
accumulates dq, another dk and dv. In the rotated frame, as usual (./online_softmax.py),
    p = exp(s − lse), dp = dout·vᵀ, dS = scale·p⊙(dp − delta), dq' = dS·k', dk' = dSᵀ·q',
    dv = Σ pᵀ·dout,
and the rotation is undone at the end with its transpose, the same rotation with sin negated:
with C = diag(cos), S = diag(signed sin) and P the swap (symmetric), R = C + S·P and
Rᵀ = C + P·S = C − S·P, since P·S = −S·P for a sin whose halves have opposite signs.

Block skipping by ranges. Positions may be arbitrary, so for each q block the kernels get the
range [lo, hi) of kv blocks from the first to the last pair that `masks.may_see` allows on the
blocks' position bounds (`block_ranges`, an XLA computation over [B, T/bq, S/bk]; for dk, dv
the range of q blocks per kv block). Causal, window and chunk masks with increasing positions
see exactly the blocks of their range; any other block of a range is computed and hidden by
the mask. Lengths the blocks do not divide are padded: padded keys are masked by index, padded
queries dropped. Two drivers run the same block math (`_fwd_step`, `_dq_step`, `_dkv_step`):
  "grid" (TPU; default in interpret mode): grid (B, Hq, T/bq, S/bk) with the kv axis
         innermost and sequential; running max m, denominator l, accumulator and the rotated q
         block live in VMEM scratch; dk, dv on grid (B, Hkv, S/bk, T/bq, G), reducing over the
         q blocks and the G query heads of the group (heads innermost, so the query side's
         positions and tables are fetched once per q block, not once per head). The ranges
         are scalar-prefetched (`PrefetchScalarGridSpec`, SMEM), and the kv (for dk, dv: q)
         index maps clamp the grid index into the range: a step outside it repeats the
         neighbouring block index, so Pallas fetches nothing for it, and `pl.when` skips its
         compute. Query positions and segment ids come as [bq, 128] blocks (broadcast over a
         vector register's lanes, as JAX's splash kernel passes segment ids), widened to
         [bq, bk] by whole registers (`jnp.tile`), keys' as [1, bk] rows: no lane-to-sublane
         relayout.
  "loop" (GPU, Triton): grid (B, Hq, T/bq) (dk, dv: (B, Hkv, S/bk)), a `fori_loop` over the
         range of the other sequence's blocks, m, l, accumulator as loop carries; refs to whole
         rows; no `lax.cond` (the loads of a step are unconditional, so Triton can pipeline
         them). q, k, their tables and gradients are held as two halves [blk, D'/2] read
         through ref slices: swap is then the order of the halves, and q'k'ᵀ the sum of two
         dots, with no lane shuffle and no permutation matmul.
Grouped-query attention: the k/v index maps send query head h to kv head h // G (in the dk/dv
kernel, kv head g and group member gi to query head g·G + gi), so k and v are never repeated.
Every pallas_call carries a `pl.CostEstimate` (matmul flops, one exp per score, operand bytes)
so that XLA schedules around it as the work it is.

On a mesh (`attend_on_mesh`, what `attend(impl="flash", mesh=...)` and the model call): the
kernel runs under a `shard_map` over the batch axes and the heads ("tensor", whole GQA groups
per device), since GSPMD cannot partition a Mosaic or Triton custom call; a mesh that splits
"sequence" is refused (that is attention="ring"'s job).

Backends. CPU: `interpret=True` (what the tests run, both drivers). TPU: Mosaic,
`pltpu.CompilerParams` dimension semantics, `pltpu.roll` for the swap, blocks of 512 by
default (multiples of 128). GPU: Triton (`plgpu.CompilerParams`): head dims padded to a power
of two >= 32 (halves >= 16 for Triton's dots), blocks powers of two >= 16.

Verified in interpret mode on CPU: every numeric result (tests/test_flash.py, against the xla
path, both drivers; the tables and both rotation layouts bitwise against lx.rope). Compiled
without hardware: forward and backward by XLA's TPU compiler for a v5p (Mosaic's passes
included; benchmarks/kernel_signals.py reads the compiled kernels' op counts), lowered to
Triton IR for GPU (tests) and compiled by Triton 3.9.0 to sm_90a PTX in the signals
benchmark (XLA compiles with its own Triton fork). Not run on hardware: speed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.sharding import PartitionSpec

from lctx_jax import rope as rope_lib, sharding
from lctx_jax.attention import masks, online_softmax

# Default (block_q, block_k) per backend. TPU: 512, where the matrix unit's utilisation
# plateaus (JAX's Pallas matmul guide) and the per-step vector work per MXU push is lowest in
# benchmarks/kernel_signals.py. In interpret mode every grid step is one iteration of an XLA
# loop, so fewer, larger blocks are faster.
DEFAULT_BLOCKS = {"tpu": (512, 512), "gpu": (64, 64), "cpu": (128, 128)}
LANES = 128  # a TPU vector register's lanes: the grid driver's query positions are [bq, 128]
_TRANS_B = (((1,), (1,)), ((), ()))  # x @ yᵀ


# ----------------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True)
class _Rope:
    factor: float          # attention factor, folded into cos and sin
    start_tokens: int      # LongRoPE kept start tokens (0: none)
    lanes: int             # D'/2: frequencies after zero padding; rotate-half pairs j, j + lanes
    freqs: int             # r/2: true frequencies; lanes j, j + lanes with j >= freqs pass through


@dataclasses.dataclass(frozen=True)
class _Config:
    """Everything static about one call (hashable: a custom_vjp nondiff argument)."""
    mask: masks.Mask
    scale: float
    block_q: int
    block_k: int
    q_blocks: int
    kv_blocks: int
    kv_len: int            # true S; keys at index >= kv_len are padding
    groups: int            # G = Hq / Hkv
    rope: _Rope | None
    backend: str           # "cpu" (interpret) | "gpu" | "tpu"
    driver: str            # "grid" | "loop"

    @property
    def kv_padded(self) -> bool:
        return self.kv_blocks * self.block_k != self.kv_len

    @property
    def interpret(self) -> bool:
        return self.backend == "cpu"

    @property
    def stat_lanes(self) -> int:
        """Lanes of the row statistics m, l, lse, δ: 128 on the grid driver (each row's value
        in every lane of a vector register, so no lane broadcast against a block), else 1."""
        return LANES if self.driver == "grid" else 1

    @property
    def halves(self) -> bool:
        """q, k, their tables and gradients held as two halves (loop driver with rope)."""
        return self.rope is not None and self.driver == "loop"


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool, positions: jax.Array,
           kv_positions: jax.Array, segment_ids: jax.Array | None,
           kv_segment_ids: jax.Array | None, scale: float,
           rope: rope_lib.RopeConfig | None = None, block_size: int | None = None,
           block_q: int | None = None, block_k: int | None = None, backend: str | None = None,
           driver: str | None = None, seq_len: jax.Array | None = None,
           window: int | None = None, chunk_size: int | None = None) -> jax.Array:
    """q [B, T, Hq, D] and k, v [B, S, Hkv, D], un-rotated; positions [B, T], kv_positions
    [B, S] int; segment ids [B, T], [B, S] or both None -> [B, T, Hq, D] in q's dtype.

    causal, window, chunk_size: the mask (./masks.py), static in the kernels.

    block_size sets block_q and block_k together (block_q / block_k override it). backend:
    "cpu" | "gpu" | "tpu", default jax.default_backend(); "cpu" runs the kernels interpreted.
    driver: "grid" | "loop" (see the module docstring), default "loop" on GPU, else "grid".
    seq_len: the rotation's sequence length (dynamic NTK, LongRoPE), default max position + 1.
    """
    cfg, arrays = _prepare(q, k, v, positions, kv_positions, segment_ids, kv_segment_ids,
                           masks.Mask(causal, window, chunk_size), scale, rope, block_size,
                           block_q, block_k, backend, driver, seq_len)
    out = _flash(cfg, *arrays)
    return out.transpose(0, 2, 1, 3)[:, :q.shape[1], :, :q.shape[3]]


def chunk_forward(q: jax.Array, k: jax.Array, v: jax.Array, *, positions: jax.Array,
                  kv_positions: jax.Array, segment_ids: jax.Array | None,
                  kv_segment_ids: jax.Array | None, mask: masks.Mask, scale: float,
                  block_size: int | None = None, backend: str | None = None
                  ) -> tuple[jax.Array, jax.Array]:
    """The forward kernel over one chunk of keys, for ring attention's hops: rotated q
    [B, T, Hq, D], k, v [B, S, Hkv, D] (no rope) -> (out f32 [B, T, Hq, D], normalised over
    this chunk's visible keys, and their logsumexp lse f32 [B, T, Hq], +inf where the chunk
    holds no visible key). Not differentiable: `chunk_backward` is its part of the VJP."""
    cfg, (qh, kh, vh, q_pos, kv_pos, q_seg, kv_seg, _, ranges) = _prepare(
        q, k, v, positions, kv_positions, segment_ids, kv_segment_ids, mask, scale, None,
        block_size, None, None, backend, None, None)
    layouts = _layouts(cfg, q_pos, kv_pos, q_seg, kv_seg)
    out, lse = _forward(cfg, qh, kh, vh, layouts, (None,) * 4, ranges, jnp.float32)
    length, dim = q.shape[1], q.shape[3]
    return (out.transpose(0, 2, 1, 3)[:, :length, :, :dim],
            lse[..., 0].transpose(0, 2, 1)[:, :length])  # lane 0 of the statistic


def chunk_backward(q: jax.Array, k: jax.Array, v: jax.Array, d_out: jax.Array, lse: jax.Array,
                   delta: jax.Array, *, positions: jax.Array, kv_positions: jax.Array,
                   segment_ids: jax.Array | None, kv_segment_ids: jax.Array | None,
                   mask: masks.Mask, scale: float, block_size: int | None = None,
                   backend: str | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One chunk's share of the attention gradients (FlashAttention-2's dq and dk, dv kernels
    with the global statistics): d_out [B, T, Hq, D], lse and delta = rowsum(d_out ⊙ out)
    f32 [B, T, Hq] of the whole attention -> (dq, dk, dv) f32, shaped like q, k, v."""
    cfg, (qh, kh, vh, q_pos, kv_pos, q_seg, kv_seg, _, ranges) = _prepare(
        q, k, v, positions, kv_positions, segment_ids, kv_segment_ids, mask, scale, None,
        block_size, None, None, backend, None, None)
    t_pad = qh.shape[2]

    def statistic(x, fill):  # [B, T, Hq] -> [B, Hq, Tp, 1]; padded queries see nothing
        x = jnp.pad(x.astype(jnp.float32), [(0, 0), (0, t_pad - x.shape[1]), (0, 0)],
                    constant_values=fill)
        return _stat_lanes(cfg, x.transpose(0, 2, 1)[..., None])

    args = (cfg, qh, kh, vh, _layouts(cfg, q_pos, kv_pos, q_seg, kv_seg), (None,) * 4, ranges,
            _heads_major(d_out, vh.shape[-1], t_pad), statistic(lse, jnp.inf),
            statistic(delta, 0.0))
    dq = _backward_dq(*args, jnp.float32)
    dk, dv = _backward_dkv(*args, jnp.float32)
    return tuple(grad.transpose(0, 2, 1, 3)[:, :x.shape[1], :, :x.shape[3]]
                 for grad, x in ((dq, q), (dk, k), (dv, v)))


def _prepare(q, k, v, positions, kv_positions, segment_ids, kv_segment_ids, mask, scale, rope,
             block_size, block_q, block_k, backend, driver, seq_len):
    """(static _Config, the kernels' arrays: q, k, v heads-major and padded, positions and
    segment ids padded, frequencies, `block_ranges`): the arguments of `_flash`."""
    backend = backend or jax.default_backend()
    if backend not in DEFAULT_BLOCKS:
        raise ValueError(f"flash attention runs on 'cpu' (interpreted), 'gpu' or 'tpu', "
                         f"not {backend!r}")
    driver = driver or ("loop" if backend == "gpu" else "grid")
    if driver not in ("grid", "loop"):
        raise ValueError(f"driver must be 'grid' or 'loop', got {driver!r}")
    if backend == "gpu" and driver == "grid":
        raise ValueError("the 'grid' driver needs sequential grid steps and scratch memory "
                         "(TPU, interpret mode); use driver='loop' on GPU")
    batch, q_len, q_heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    default_q, default_k = DEFAULT_BLOCKS[backend]
    block_q = _block_size(block_q or block_size or default_q, q_len, backend, "block_q")
    block_k = _block_size(block_k or block_size or default_k, kv_len, backend, "block_k")
    q_blocks, kv_blocks = -(-q_len // block_q), -(-kv_len // block_k)

    # Head dims: q, k permuted for partial rotary and padded; v padded (GPU: powers of two).
    rotary_dim = rope.rotary_dim if rope is not None else None
    qk_dim, pieces = _qk_layout(head_dim, rotary_dim, backend)
    v_dim = _pad_dim(head_dim, backend)

    def rows(x, length):  # [B, L] -> [B, Lp] int32, edge-padded (neutral for min and max)
        x = jnp.asarray(x, jnp.int32)
        return jnp.pad(x, [(0, 0), (0, length - x.shape[1])], mode="edge")

    t_pad, s_pad = q_blocks * block_q, kv_blocks * block_k
    qh = _heads_major(q, qk_dim, t_pad, pieces)
    kh = _heads_major(k, qk_dim, s_pad, pieces)
    vh = _heads_major(v, v_dim, s_pad)
    q_pos, kv_pos = rows(positions, t_pad), rows(kv_positions, s_pad)
    q_seg = kv_seg = None
    if segment_ids is not None:
        q_seg, kv_seg = rows(segment_ids, t_pad), rows(kv_segment_ids, s_pad)
    ranges = block_ranges(mask, q_pos, kv_pos, q_blocks, kv_blocks)

    freqs, rope_static = None, None
    if rope is not None:
        if seq_len is None:
            seq_len = jnp.maximum(jnp.max(positions), jnp.max(kv_positions)) + 1
        inv_freq, factor = rope_lib.frequencies(rope, seq_len)
        lanes = qk_dim // 2
        freqs = (_pad_freqs(inv_freq, lanes),)
        if rope.start_tokens:
            freqs += (_pad_freqs(rope_lib.default_frequencies(rope), lanes),)
        rope_static = _Rope(factor=float(factor), start_tokens=rope.start_tokens, lanes=lanes,
                            freqs=rope.rotary_dim // 2)

    cfg = _Config(mask=mask, scale=float(scale), block_q=block_q, block_k=block_k,
                  q_blocks=q_blocks, kv_blocks=kv_blocks, kv_len=kv_len,
                  groups=q_heads // kv_heads, rope=rope_static, backend=backend, driver=driver)
    return cfg, (qh, kh, vh, q_pos, kv_pos, q_seg, kv_seg, freqs, ranges)


def _heads_major(x, dim, length, pieces=None):
    """[B, L, H, D] -> [B, H, length, dim], zero-padded; `pieces`: the dims' new order."""
    x = jnp.pad(x, [(0, 0), (0, length - x.shape[1]), (0, 0), (0, dim - x.shape[3])])
    if pieces is not None:
        x = jnp.concatenate([x[..., start:stop] for start, stop in pieces], axis=-1)
    return x.transpose(0, 2, 1, 3)


def attend_on_mesh(q: jax.Array, k: jax.Array, v: jax.Array, *, mesh: Any,
                   positions: jax.Array, kv_positions: jax.Array,
                   segment_ids: jax.Array | None, kv_segment_ids: jax.Array | None,
                   rope: rope_lib.RopeConfig | None,
                   kernel: Callable[..., jax.Array] = attend, impl: str = "flash",
                   **kwargs: Any) -> jax.Array:
    """`kernel` on every device of `mesh` for its own rows and heads: a `shard_map` over the
    batch axes ("data", "fsdp") and the heads ("tensor", when it divides both the query and
    the key/value heads, so each device keeps whole GQA groups: query heads h·G .. h·G + G − 1
    with their key/value head h). GSPMD cannot partition a Mosaic or Triton kernel, so the
    call must not reach it bare. The kernel runs for the mesh's platform (a compile-only TPU
    topology included), and the rotation's sequence length is the maximum over all rows.

    kernel: this module's `attend`, or another taking its arguments (splash.attend,
    cudnn.attend), with backend= and seq_len=; impl: its attention name, for errors.
    A mesh that splits "sequence" is refused: the kernel attends whole sequences per device,
    and gathering the keys of every device is what attention="ring" avoids.
    """
    if mesh.shape.get(sharding.SEQUENCE_AXIS, 1) > 1:
        raise ValueError(
            f"attention={impl!r} needs every sequence whole on a device, but the mesh splits "
            f"tokens over 'sequence' ({mesh.shape[sharding.SEQUENCE_AXIS]} devices); use "
            "attention='ring' (sequence parallel), or a mesh with sequence=1")
    batch_spec = sharding.fit_spec(PartitionSpec(sharding.BATCH_AXES), q.shape[:1], mesh)
    batch_axes = tuple(a for entry in batch_spec for a in sharding.axes_of(entry))
    tensor = mesh.shape.get(sharding.TENSOR_AXIS, 1)
    heads = (sharding.TENSOR_AXIS if q.shape[2] % tensor == 0 and k.shape[2] % tensor == 0
             else None)
    rows = PartitionSpec(*batch_spec, None) if batch_axes else PartitionSpec()
    heads_spec = PartitionSpec(batch_axes or None, None, heads, None)
    backend = mesh.devices.flat[0].platform

    def local(q, k, v, positions, kv_positions, segment_ids, kv_segment_ids):
        seq_len = None
        if rope is not None:
            seq_len = jnp.maximum(jnp.max(positions), jnp.max(kv_positions)) + 1
            if batch_axes:
                seq_len = lax.pmax(seq_len, batch_axes)
        return kernel(q, k, v, positions=positions, kv_positions=kv_positions,
                      segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, rope=rope,
                      backend=backend, seq_len=seq_len, **kwargs)

    return jax.shard_map(local, mesh=mesh, in_specs=(heads_spec,) * 3 + (rows,) * 4,
                         out_specs=heads_spec, check_vma=False)(
        q, k, v, positions, kv_positions, segment_ids, kv_segment_ids)


def _block_size(block: int, length: int, backend: str, name: str) -> int:
    if block < 1:
        raise ValueError(f"{name} must be a positive int, got {block}")
    if backend == "gpu":  # Triton: power-of-two tensors, dot dims >= 16
        if block & (block - 1) or block < 16:
            raise ValueError(f"on GPU {name} must be a power of two >= 16, got {block}")
        return min(block, max(16, pl.next_power_of_2(length)))
    fitted = -(-length // 8) * 8  # one block covering everything (a multiple of 8 sublanes)
    if fitted <= block:
        return fitted
    if backend == "tpu" and block % 128:
        raise ValueError(f"on TPU {name} must be a multiple of 128 when the sequence needs "
                         f"more than one block, got {block}")
    return block


def _pad_dim(dim: int, backend: str) -> int:
    """GPU: a power of two >= 32, so that halves are Triton dot operands (>= 16)."""
    return max(32, pl.next_power_of_2(dim)) if backend == "gpu" else dim


def _qk_layout(head_dim: int, rotary_dim: int | None, backend: str
               ) -> tuple[int, tuple[tuple[int, int], ...] | None]:
    """(padded head dim D', the dim ranges to concatenate, or None for the identity) of q, k.

    With partial rotary the order becomes [rot₁ | pass₁ | rot₂ | pass₂]: rot₁ = dims [0, r/2),
    rot₂ = [r/2, r), pass = [r, D') split in two equal halves (D' - r made even by padding), so
    rotate-half partners are D'/2 apart as in a fully rotary head.
    """
    dim = _pad_dim(head_dim, backend)
    if rotary_dim is None or rotary_dim == dim:
        return dim, None
    dim += (dim - rotary_dim) % 2
    half, mid = rotary_dim // 2, (dim + rotary_dim) // 2
    return dim, ((0, half), (rotary_dim, mid), (half, rotary_dim), (mid, dim))


def _pad_freqs(inv_freq: jax.Array, lanes: int) -> jax.Array:
    inv_freq = jnp.asarray(inv_freq, jnp.float32)
    return jnp.pad(inv_freq, (0, lanes - inv_freq.shape[0]))


# ----------------------------------------------------------------------------- outside the kernels


def rope_tables(rope: _Rope, positions: jax.Array, freqs: tuple[jax.Array, ...], dtype: Any
                ) -> tuple[jax.Array, jax.Array]:
    """cos and signed sin [B, L, D'] in `dtype` for positions [B, L]: what the kernels stream
    beside q or k, block by block.

    `lx.rope.rotation` (attention factor folded in, LongRoPE's kept start tokens), then cos = 1,
    sin = 0 on the pass-through lanes of a partial rotary head, and the rotate-half sign folded
    into sin, so that R(θ)x = x·cos + swap(x)·sin with swap([x₁, x₂]) = [x₂, x₁] and
    sin = [−sin₁, sin₂]."""
    cos, sin = rope_lib.rotation(positions, freqs[0], rope.factor,
                                 start_tokens=rope.start_tokens,
                                 start_inv_freq=freqs[1] if rope.start_tokens else None)
    lane = jnp.arange(2 * rope.lanes)
    rotary = lane % rope.lanes < rope.freqs
    cos, sin = jnp.where(rotary, cos, 1.0), jnp.where(rotary, sin, 0.0)
    return cos.astype(dtype), jnp.where(lane < rope.lanes, -sin, sin).astype(dtype)


def block_ranges(mask: masks.Mask, q_pos: jax.Array, kv_pos: jax.Array, q_blocks: int,
                 kv_blocks: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(kv_lo, kv_hi) int32 [B, T/bq] and (q_lo, q_hi) [B, S/bk]: q block i computes kv blocks
    kv_lo[b, i] <= j < kv_hi[b, i], kv block j the q blocks q_lo[b, j] <= i < q_hi[b, j]; the
    span from the first to the last pair that `masks.may_see` allows, from the blocks' position
    bounds (padded positions [B, Tp], [B, Sp]). Blocks inside a span that may_see rules out
    (possible only with non-monotone positions) are computed, and their mask hides them."""
    batch = q_pos.shape[0]
    if not mask.bounds:
        return (jnp.zeros((batch, q_blocks), jnp.int32),
                jnp.full((batch, q_blocks), kv_blocks, jnp.int32),
                jnp.zeros((batch, kv_blocks), jnp.int32),
                jnp.full((batch, kv_blocks), q_blocks, jnp.int32))
    q, kv = q_pos.reshape(batch, q_blocks, -1), kv_pos.reshape(batch, kv_blocks, -1)
    bounds = {"q_min": q.min(-1)[:, :, None], "q_max": q.max(-1)[:, :, None],
              "kv_min": kv.min(-1)[:, None, :], "kv_max": kv.max(-1)[:, None, :]}
    seen = masks.may_see(mask, **{name: bounds[name] for name in mask.bounds})  # [B, nq, nk]
    return (*_span(seen, 2), *_span(seen, 1))


def _span(seen: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """[first, last + 1) of the True entries along `axis`; [0, 0) where there are none."""
    count, found = seen.shape[axis], seen.any(axis)
    first = jnp.argmax(seen, axis)
    end = count - jnp.argmax(jnp.flip(seen, axis), axis)
    return (jnp.where(found, first, 0).astype(jnp.int32),
            jnp.where(found, end, 0).astype(jnp.int32))


# ----------------------------------------------------------------------------- block math


def swap_halves(x: jax.Array, backend: str) -> jax.Array:
    """[x₂, x₁] for x = [x₁, x₂] along the last axis (TPU: a lane rotation, `pltpu.roll`)."""
    half = x.shape[-1] // 2
    if backend == "tpu":
        from jax.experimental.pallas import tpu as pltpu
        return pltpu.roll(x, half, x.ndim - 1)  # a shift of half the axis: either direction
    return jnp.roll(x, half, axis=-1)


def rotate(pieces: tuple[jax.Array, ...], cos: tuple[jax.Array, ...],
           sin: tuple[jax.Array, ...], backend: str) -> tuple[jax.Array, ...]:
    """R(θ)x = x·cos + swap(x)·sin in f32 (`rope_tables`' signed sin); with −sin,
    R(θ)ᵀx = R(−θ)x. x, cos and sin come as one whole [blk, D'] block, or as its two halves
    [blk, D'/2] (the GPU layout: swap is then the order of the halves, no lane movement)."""
    xs = tuple(x.astype(jnp.float32) for x in pieces)
    partners = (swap_halves(xs[0], backend),) if len(xs) == 1 else xs[::-1]
    return tuple(x * c.astype(jnp.float32) + y * s.astype(jnp.float32)
                 for x, y, c, s in zip(xs, partners, cos, sin))


def _pieces(cfg: _Config, ref, *lead) -> tuple[jax.Array, ...]:
    """ref[*lead, ..., :] as the kernels hold q, k, their tables and gradients: whole, or as
    the halves [..., :D'/2], [..., D'/2:] (`cfg.halves`)."""
    fill = (slice(None),) * (len(ref.shape) - 1 - len(lead))
    if not cfg.halves:
        return (ref[(*lead, *fill, slice(None))],)
    half = ref.shape[-1] // 2
    return tuple(ref[(*lead, *fill, part)] for part in (slice(0, half), slice(half, None)))


def _store(ref, pieces: tuple[jax.Array, ...]) -> None:
    """A whole block ref written from `_pieces`' layout, cast to the ref's dtype."""
    if len(pieces) == 1:
        ref[...] = pieces[0].astype(ref.dtype)
        return
    half = ref.shape[-1] // 2
    ref[..., :half] = pieces[0].astype(ref.dtype)
    ref[..., half:] = pieces[1].astype(ref.dtype)


def _rotated(cfg: _Config, x_ref, cos_ref, sin_ref, x_lead: tuple = (),
             table_lead: tuple = ()) -> tuple[jax.Array, ...]:
    """A q or k block rotated in-kernel from its streamed tables (identity without rope), in
    the block's dtype, as `_pieces`."""
    x = _pieces(cfg, x_ref, *x_lead)
    if cfg.rope is None:
        return x
    rotated = rotate(x, _pieces(cfg, cos_ref, *table_lead), _pieces(cfg, sin_ref, *table_lead),
                     cfg.backend)
    return tuple(y.astype(x_ref.dtype) for y in rotated)


def _unrotated(cfg: _Config, grads: tuple[jax.Array, ...], cos_ref, sin_ref
               ) -> tuple[jax.Array, ...]:
    """R(θ)ᵀ grad = R(−θ) grad, f32: a gradient w.r.t. rotated q/k back to un-rotated q/k."""
    if cfg.rope is None:
        return grads
    return rotate(grads, _pieces(cfg, cos_ref), tuple(-s for s in _pieces(cfg, sin_ref)),
                  cfg.backend)


def widen(values: jax.Array, width: int) -> jax.Array:
    """Per-row values [rows, lanes] that hold each row's value in every lane (the grid driver's
    128: query positions, segment ids, m, l, lse, δ) as [rows, width]: a copy of whole vector
    registers (`jnp.tile`, as JAX's kernels do) when width is a multiple of the lanes, a lane
    slice when it is at most the lanes; otherwise (and with 1 lane, the loop driver's) the
    column [rows, 1], which broadcasts."""
    lanes = values.shape[-1]
    if lanes == 1 or width % lanes and width > lanes:
        return values[:, :1]
    if width <= lanes:
        return values[:, :width]
    return jnp.tile(values, (1, width // lanes))


def _column(cfg: _Config, ref, *lead) -> jax.Array:
    """Query positions or segment ids against a kv block: `widen`ed to [bq, bk]."""
    return widen(ref[(*lead, slice(None))] if lead else ref[...], cfg.block_k)


def _visible(cfg: _Config, q_pos, kv_pos, q_seg, kv_seg, kv_start) -> jax.Array:
    """bool [bq, bk]: `masks.visible_pairs` on a column of query positions [bq, 1] and a row of
    key positions [1, bk] (and segment ids), keys past the true length (padding) hidden."""
    mask = masks.visible_pairs(cfg.mask, q_pos, kv_pos, q_seg, kv_seg)
    if cfg.kv_padded:
        index = kv_start + lax.broadcasted_iota(jnp.int32, mask.shape, 1)
        mask &= index < cfg.kv_len
    return mask


def _products(a: tuple[jax.Array, ...], b: tuple[jax.Array, ...]) -> jax.Array:
    """Σ over pieces of a bᵀ, f32 [rows of a, rows of b]."""
    return sum(lax.dot_general(x, y, _TRANS_B, preferred_element_type=jnp.float32)
               for x, y in zip(a, b))


def _scores(cfg: _Config, q_rot, k_rot, mask) -> jax.Array:
    """scale · q'k'ᵀ, f32 [bq, bk], −inf where not visible (`online_softmax.scores`)."""
    return online_softmax.scores(_products(q_rot, k_rot), mask, cfg.scale)


def _probs_and_dscores(cfg: _Config, q_rot, k_rot, v, mask, d_out, lse, delta):
    """Recomputed p = exp(s − lse) and dS = scale · p ⊙ (dout·vᵀ − delta), f32 [bq, bk]."""
    p = online_softmax.probabilities(_scores(cfg, q_rot, k_rot, mask), lse, widen)
    dp = lax.dot_general(d_out, v, _TRANS_B, preferred_element_type=jnp.float32)
    return p, online_softmax.score_grads(p, dp, delta, cfg.scale, widen)


def _fwd_step(cfg, q_rot, q_pos, q_seg, k_rot, v, kv_pos, kv_seg, kv_start, carry):
    """`online_softmax.fold` of one kv block into carry (m, l, acc)."""
    mask = _visible(cfg, q_pos, kv_pos, q_seg, kv_seg, kv_start)

    def weighted_values(p):
        return jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)

    return online_softmax.fold(carry, _scores(cfg, q_rot, k_rot, mask), weighted_values, widen)


def _dq_step(cfg, q_rot, q_pos, q_seg, d_out, lse, delta, k_rot, v, kv_pos, kv_seg, kv_start,
             dq):
    """dq' += dS·k' (f32 pieces) for one kv block."""
    mask = _visible(cfg, q_pos, kv_pos, q_seg, kv_seg, kv_start)
    _, ds = _probs_and_dscores(cfg, q_rot, k_rot, v, mask, d_out, lse, delta)
    return tuple(acc + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)
                 for acc, k in zip(dq, k_rot))


def _dkv_step(cfg, k_rot, v, kv_pos, kv_seg, kv_start, q_rot, q_pos, q_seg, d_out, lse, delta,
              carry):
    """dk' += dSᵀ·q' (f32 pieces) and dv += pᵀ·dout for one q block."""
    dk, dv = carry
    mask = _visible(cfg, q_pos, kv_pos, q_seg, kv_seg, kv_start)
    p, ds = _probs_and_dscores(cfg, q_rot, k_rot, v, mask, d_out, lse, delta)
    dv = dv + jnp.dot(p.astype(d_out.dtype).T, d_out, preferred_element_type=jnp.float32)
    dk = tuple(acc + jnp.dot(ds.astype(q.dtype).T, q, preferred_element_type=jnp.float32)
               for acc, q in zip(dk, q_rot))
    return dk, dv


# ----------------------------------------------------------------------------- kernels


class _Refs:
    """Kernel refs by name (inputs, outputs and scratch vary with segments/rope)."""

    def __init__(self, cfg, names, refs):
        assert len(names) == len(refs), (names, len(refs))
        self.__dict__.update(zip(names, refs))
        self.names, self.cfg = names, cfg

    def ref(self, name):
        return getattr(self, name) if name in self.names else None

    def column(self, name, *lead):
        return _column(self.cfg, getattr(self, name), *lead) if name in self.names else None

    def row(self, name, index=None):
        """Key positions or segment ids as a row [1, bk] (their layout: [1, S]): the whole
        block, or columns `index` of a whole row."""
        if name not in self.names:
            return None
        ref = getattr(self, name)
        return ref[...] if index is None else ref[:, index]


def _fwd_kernel(*refs, cfg: _Config, names):
    r = _Refs(cfg, names, refs)
    b, i = pl.program_id(0), pl.program_id(2)
    lo, hi = r.lo[b, i], r.hi[b, i]
    if cfg.driver == "grid":
        j = pl.program_id(3)

        @pl.when(j == 0)
        def _init():
            r.m[...], r.l[...], r.acc[...] = online_softmax.init(r.m.shape[:1], r.acc.shape[1],
                                                                 r.m.shape[1])
            _store(r.q_rot, _rotated(cfg, r.q, r.ref("q_cos"), r.ref("q_sin")))

        @pl.when((j >= lo) & (j < hi))
        def _step():
            k_rot = _rotated(cfg, r.k, r.ref("kv_cos"), r.ref("kv_sin"))
            carry = _fwd_step(cfg, (r.q_rot[...],), r.column("q_pos"), r.column("q_seg"),
                              k_rot, r.v[...], r.row("kv_pos"), r.row("kv_seg"),
                              j * cfg.block_k, (r.m[...], r.l[...], r.acc[...]))
            r.m[...], r.l[...], r.acc[...] = carry

        @pl.when(j == cfg.kv_blocks - 1)
        def _finish():
            out, lse = online_softmax.finish((r.m[...], r.l[...], r.acc[...]), widen)
            r.o[...], r.lse[...] = out.astype(r.o.dtype), lse
        return

    q_rot = _rotated(cfg, r.q, r.ref("q_cos"), r.ref("q_sin"))
    q_pos, q_seg = r.column("q_pos"), r.column("q_seg")

    def body(j, carry):
        kv = pl.ds(pl.multiple_of(j * cfg.block_k, cfg.block_k), cfg.block_k)
        k_rot = _rotated(cfg, r.k, r.ref("kv_cos"), r.ref("kv_sin"), (kv,), (kv,))
        return _fwd_step(cfg, q_rot, q_pos, q_seg, k_rot, r.v[kv, :], r.row("kv_pos", kv),
                         r.row("kv_seg", kv), j * cfg.block_k, carry)

    init = online_softmax.init(r.q.shape[:1], r.v.shape[-1])
    out, lse = online_softmax.finish(lax.fori_loop(lo, hi, body, init), widen)
    r.o[...], r.lse[...] = out.astype(r.o.dtype), lse


def _dq_kernel(*refs, cfg: _Config, names):
    r = _Refs(cfg, names, refs)
    b, i = pl.program_id(0), pl.program_id(2)
    lo, hi = r.lo[b, i], r.hi[b, i]
    if cfg.driver == "grid":
        j = pl.program_id(3)

        @pl.when(j == 0)
        def _init():
            r.dq_acc[...] = jnp.zeros(r.dq_acc.shape, jnp.float32)
            _store(r.q_rot, _rotated(cfg, r.q, r.ref("q_cos"), r.ref("q_sin")))

        @pl.when((j >= lo) & (j < hi))
        def _step():
            k_rot = _rotated(cfg, r.k, r.ref("kv_cos"), r.ref("kv_sin"))
            r.dq_acc[...], = _dq_step(
                cfg, (r.q_rot[...],), r.column("q_pos"), r.column("q_seg"), r.d_out[...],
                r.lse[...], r.delta[...], k_rot, r.v[...], r.row("kv_pos"), r.row("kv_seg"),
                j * cfg.block_k, (r.dq_acc[...],))

        @pl.when(j == cfg.kv_blocks - 1)
        def _finish():
            _store(r.dq, _unrotated(cfg, (r.dq_acc[...],), r.ref("q_cos"), r.ref("q_sin")))
        return

    q_rot = _rotated(cfg, r.q, r.ref("q_cos"), r.ref("q_sin"))
    q_pos, q_seg = r.column("q_pos"), r.column("q_seg")
    d_out, lse, delta = r.d_out[...], r.lse[...], r.delta[...]

    def body(j, dq):
        kv = pl.ds(pl.multiple_of(j * cfg.block_k, cfg.block_k), cfg.block_k)
        k_rot = _rotated(cfg, r.k, r.ref("kv_cos"), r.ref("kv_sin"), (kv,), (kv,))
        return _dq_step(cfg, q_rot, q_pos, q_seg, d_out, lse, delta, k_rot, r.v[kv, :],
                        r.row("kv_pos", kv), r.row("kv_seg", kv), j * cfg.block_k, dq)

    zeros = tuple(jnp.zeros(x.shape, jnp.float32) for x in q_rot)
    dq = lax.fori_loop(lo, hi, body, zeros)
    _store(r.dq, _unrotated(cfg, dq, r.ref("q_cos"), r.ref("q_sin")))


def _dkv_kernel(*refs, cfg: _Config, names):
    r = _Refs(cfg, names, refs)
    b, j = pl.program_id(0), pl.program_id(2)
    lo, hi = r.lo[b, j], r.hi[b, j]
    kv_start = j * cfg.block_k
    if cfg.driver == "grid":
        i, member = pl.program_id(3), pl.program_id(4)

        @pl.when((member == 0) & (i == 0))
        def _init():
            r.dk_acc[...] = jnp.zeros(r.dk_acc.shape, jnp.float32)
            r.dv_acc[...] = jnp.zeros(r.dv_acc.shape, jnp.float32)
            _store(r.k_rot, _rotated(cfg, r.k, r.ref("kv_cos"), r.ref("kv_sin")))

        @pl.when((i >= lo) & (i < hi))
        def _step():
            q_rot = _rotated(cfg, r.q, r.ref("q_cos"), r.ref("q_sin"))
            (r.dk_acc[...],), r.dv_acc[...] = _dkv_step(
                cfg, (r.k_rot[...],), r.v[...], r.row("kv_pos"), r.row("kv_seg"), kv_start,
                q_rot, r.column("q_pos"), r.column("q_seg"), r.d_out[...], r.lse[...],
                r.delta[...], ((r.dk_acc[...],), r.dv_acc[...]))

        @pl.when((member == cfg.groups - 1) & (i == cfg.q_blocks - 1))
        def _finish():
            _store(r.dk, _unrotated(cfg, (r.dk_acc[...],), r.ref("kv_cos"), r.ref("kv_sin")))
            r.dv[...] = r.dv_acc[...].astype(r.dv.dtype)
        return

    k_rot = _rotated(cfg, r.k, r.ref("kv_cos"), r.ref("kv_sin"))
    kv_pos, kv_seg, v = r.row("kv_pos"), r.row("kv_seg"), r.v[...]
    span = jnp.maximum(hi - lo, 1)

    def body(t, carry):  # t runs over (group member, q block in [lo, hi))
        member, i = lax.div(t, span), lo + lax.rem(t, span)
        qs = pl.ds(pl.multiple_of(i * cfg.block_q, cfg.block_q), cfg.block_q)
        q_rot = _rotated(cfg, r.q, r.ref("q_cos"), r.ref("q_sin"), (member, qs), (qs,))
        return _dkv_step(cfg, k_rot, v, kv_pos, kv_seg, kv_start, q_rot,
                         r.column("q_pos", qs), r.column("q_seg", qs), r.d_out[member, qs, :],
                         r.lse[member, qs, :], r.delta[member, qs, :], carry)

    zeros = (tuple(jnp.zeros(x.shape, jnp.float32) for x in k_rot),
             jnp.zeros(r.v.shape, jnp.float32))
    dk, dv = lax.fori_loop(0, cfg.groups * (hi - lo), body, zeros)
    _store(r.dk, _unrotated(cfg, dk, r.ref("kv_cos"), r.ref("kv_sin")))
    r.dv[...] = dv.astype(r.dv.dtype)


# ----------------------------------------------------------------------------- pallas_call


def _compiler_params(cfg: _Config, semantics: tuple[str, ...]):
    if cfg.backend == "tpu":
        from jax.experimental.pallas import tpu as pltpu
        return pltpu.CompilerParams(dimension_semantics=semantics)
    if cfg.backend == "gpu":
        from jax.experimental.pallas import triton as plgpu
        # 8 warps: no spills at D = 64 and in the forward and dq at D = 128 (4 warps spilled
        # up to 1.7 KB per thread in dk, dv; benchmarks/kernel_signals.py, Triton 3.9 sm_90a).
        return plgpu.CompilerParams(num_warps=8, num_stages=2)
    return None


def _call(kernel, cfg: _Config, grid, semantics, ranges, inputs, outputs, scratch, flops,
          name):
    """One pallas_call. ranges: the (lo, hi) block ranges [B, blocks] int32, scalar-prefetched
    by the grid driver (index maps then receive them after the grid indices), plain inputs of
    the loop driver (SMEM on TPU). inputs / outputs: lists of (name, array or
    ShapeDtypeStruct, BlockSpec), None arrays left out; scratch: (name, (shape, dtype)).
    flops: the XLA cost estimate's, with one exp per score and every operand read once."""
    from jax.experimental.pallas import tpu as pltpu  # scratch, SMEM, scalar prefetch
    inputs = [x for x in inputs if x[1] is not None]
    names = ("lo", "hi", *(n for n, _, _ in inputs), *(n for n, _, _ in outputs),
             *(n for n, _ in scratch))
    in_specs = [spec for _, _, spec in inputs]
    out_specs = [spec for _, _, spec in outputs]
    scratch_shapes = [pltpu.VMEM(shape, dtype) for _, (shape, dtype) in scratch]
    if cfg.driver == "grid":
        specs = dict(grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=grid, in_specs=in_specs, out_specs=out_specs,
            scratch_shapes=scratch_shapes))
    else:
        scalars = (pl.BlockSpec(memory_space=pltpu.SMEM) if cfg.backend == "tpu"
                   else pl.BlockSpec())
        specs = dict(grid=grid, in_specs=[scalars, scalars, *in_specs], out_specs=out_specs)
    arrays = [x for _, x, _ in inputs]
    q = inputs[0][1]
    cost = pl.CostEstimate(
        flops=int(flops), transcendentals=int(_score_count(cfg, q.shape)),
        bytes_accessed=int(sum(x.size * x.dtype.itemsize for x in arrays)
                           + sum(math.prod(s.shape) * s.dtype.itemsize for _, s, _ in outputs)))
    return pl.pallas_call(
        functools.partial(kernel, cfg=cfg, names=names),
        out_shape=[shape for _, shape, _ in outputs],
        compiler_params=_compiler_params(cfg, semantics), interpret=cfg.interpret,
        cost_estimate=cost, name=name, **specs)(*ranges, *arrays)


def _score_count(cfg: _Config, q_shape) -> float:
    """Scores a call computes: B·Hq·Tp·Sp, halved for a causal mask."""
    batch, heads, length, _ = q_shape
    pairs = batch * heads * length * cfg.kv_blocks * cfg.block_k
    return pairs / 2 if cfg.mask.causal else pairs


def _clamp(index, lo, hi):
    """The block fetched at grid index `index` when only blocks [lo, hi) are computed: the
    index itself inside, the nearest end of the range outside, so a skipped step repeats the
    block index before or after it and Pallas copies nothing in."""
    return jnp.minimum(jnp.maximum(index, lo), jnp.maximum(hi - 1, lo))


def _layouts(cfg: _Config, q_pos, kv_pos, q_seg, kv_seg):
    """Kernel layouts of positions and segment ids: queries [B, Tp, lanes] (broadcast over
    the lanes of a vector register on the grid driver, whose blocks are [bq, 128]), keys
    [B, 1, Sp] (rows)."""
    lanes = LANES if cfg.driver == "grid" else 1

    def column(x):
        return None if x is None else jnp.broadcast_to(x[:, :, None], (*x.shape, lanes))

    def row(x):
        return None if x is None else x[:, None, :]

    return column(q_pos), row(kv_pos), column(q_seg), row(kv_seg)


def _tables(cfg: _Config, q_pos, kv_pos, freqs, dtype):
    """(q_cos, q_sin, kv_cos, kv_sin) [B, L, D'] (`rope_tables`), or Nones without rope."""
    if cfg.rope is None:
        return None, None, None, None
    return (*rope_tables(cfg.rope, q_pos, freqs, dtype),
            *rope_tables(cfg.rope, kv_pos, freqs, dtype))


def _q_major(cfg: _Config, q, k, v, layouts, tables):
    """(grid, semantics, q block map, inputs) shared by the forward and dq kernels: one q
    block of one query head per program; the grid driver streams kv blocks along the last
    (sequential) grid axis, fetching only those in the q block's range, the loop driver reads
    whole kv rows."""
    batch, q_heads, s_pad = q.shape[0], q.shape[1], k.shape[2]
    g, bq = cfg.groups, cfg.block_q
    if cfg.driver == "grid":
        grid = (batch, q_heads, cfg.q_blocks, cfg.kv_blocks)
        semantics = ("parallel", "parallel", "parallel", "arbitrary")

        def kv_block(b, i, j, lo, hi):
            return _clamp(j, lo[b, i], hi[b, i])

        q_map = lambda b, h, i, j, *_: (b, h, i, 0)  # noqa: E731
        q_rows = lambda b, h, i, j, *_: (b, i, 0)  # noqa: E731
        kv_map = lambda b, h, i, j, *s: (b, lax.div(h, g), kv_block(b, i, j, *s), 0)  # noqa: E731
        kv_rows = lambda b, h, i, j, *s: (b, kv_block(b, i, j, *s), 0)  # noqa: E731
        kv_cols = lambda b, h, i, j, *s: (b, 0, kv_block(b, i, j, *s))  # noqa: E731
        kv_len = cfg.block_k
    else:
        grid = (batch, q_heads, cfg.q_blocks)
        semantics = ("parallel", "parallel", "parallel")
        q_map = lambda b, h, i: (b, h, i, 0)  # noqa: E731
        q_rows = lambda b, h, i: (b, i, 0)  # noqa: E731
        kv_map = lambda b, h, i: (b, lax.div(h, g), 0, 0)  # noqa: E731
        kv_rows = kv_cols = lambda b, h, i: (b, 0, 0)  # noqa: E731
        kv_len = s_pad
    inputs = _inputs(q, k, v, layouts, tables, bq, kv_len, None,
                     (q_map, kv_map, q_rows, kv_rows, kv_cols))
    return grid, semantics, q_map, inputs


def _inputs(q, k, v, layouts, tables, q_len: int, kv_len: int, q_heads: int | None, maps
            ) -> list:
    """(name, array, BlockSpec) of what every kernel reads: q, k, v, positions, segment ids
    and the RoPE tables, in blocks of q_len query rows (of q_heads query heads; None: one,
    squeezed) and kv_len key rows. maps: the index maps of q, k/v, query rows, key rows
    (tables) and key columns (positions, segment ids)."""
    q_pos, kv_pos, q_seg, kv_seg = layouts
    q_cos, q_sin, kv_cos, kv_sin = tables
    q_map, kv_map, q_rows, kv_rows, kv_cols = maps
    qk_dim, v_dim, lanes = q.shape[-1], v.shape[-1], q_pos.shape[-1]
    return [("q", q, pl.BlockSpec((None, q_heads, q_len, qk_dim), q_map)),
            ("k", k, pl.BlockSpec((None, None, kv_len, qk_dim), kv_map)),
            ("v", v, pl.BlockSpec((None, None, kv_len, v_dim), kv_map)),
            ("q_pos", q_pos, pl.BlockSpec((None, q_len, lanes), q_rows)),
            ("kv_pos", kv_pos, pl.BlockSpec((None, 1, kv_len), kv_cols)),
            ("q_seg", q_seg, pl.BlockSpec((None, q_len, lanes), q_rows)),
            ("kv_seg", kv_seg, pl.BlockSpec((None, 1, kv_len), kv_cols)),
            ("q_cos", q_cos, pl.BlockSpec((None, q_len, qk_dim), q_rows)),
            ("q_sin", q_sin, pl.BlockSpec((None, q_len, qk_dim), q_rows)),
            ("kv_cos", kv_cos, pl.BlockSpec((None, kv_len, qk_dim), kv_rows)),
            ("kv_sin", kv_sin, pl.BlockSpec((None, kv_len, qk_dim), kv_rows))]


def _forward(cfg: _Config, q, k, v, layouts, tables, ranges, dtype=None):
    """(out [B, Hq, Tp, Dv'] in `dtype` (default q's), lse f32 [B, Hq, Tp, 1])."""
    batch, q_heads, t_pad, qk_dim = q.shape
    v_dim, bq = v.shape[-1], cfg.block_q
    grid, semantics, q_map, inputs = _q_major(cfg, q, k, v, layouts, tables)
    scratch = []
    if cfg.driver == "grid":
        scratch = [("q_rot", ((bq, qk_dim), q.dtype)), ("m", ((bq, LANES), jnp.float32)),
                   ("l", ((bq, LANES), jnp.float32)), ("acc", ((bq, v_dim), jnp.float32))]
    outputs = [("o", jax.ShapeDtypeStruct((batch, q_heads, t_pad, v_dim), dtype or q.dtype),
                pl.BlockSpec((None, None, bq, v_dim), q_map)),
               ("lse", jax.ShapeDtypeStruct((batch, q_heads, t_pad, cfg.stat_lanes),
                                            jnp.float32),
                pl.BlockSpec((None, None, bq, cfg.stat_lanes), q_map))]
    flops = 2 * _score_count(cfg, q.shape) * (qk_dim + v_dim)
    return _call(_fwd_kernel, cfg, grid, semantics, ranges[:2], inputs, outputs, scratch,
                 flops, "flash_rope_fwd")


def _backward_dq(cfg: _Config, q, k, v, layouts, tables, ranges, d_out, lse, delta,
                 dtype=None):
    """dq [B, Hq, Tp, D'] in `dtype` (default q's)."""
    qk_dim, v_dim, bq = q.shape[-1], v.shape[-1], cfg.block_q
    grid, semantics, q_map, inputs = _q_major(cfg, q, k, v, layouts, tables)
    inputs += [("d_out", d_out, pl.BlockSpec((None, None, bq, v_dim), q_map)),
               ("lse", lse, pl.BlockSpec((None, None, bq, cfg.stat_lanes), q_map)),
               ("delta", delta, pl.BlockSpec((None, None, bq, cfg.stat_lanes), q_map))]
    scratch = []
    if cfg.driver == "grid":
        scratch = [("q_rot", ((bq, qk_dim), q.dtype)), ("dq_acc", ((bq, qk_dim), jnp.float32))]
    outputs = [("dq", jax.ShapeDtypeStruct(q.shape, dtype or q.dtype),
                pl.BlockSpec((None, None, bq, qk_dim), q_map))]
    flops = 2 * _score_count(cfg, q.shape) * (2 * qk_dim + v_dim)
    return _call(_dq_kernel, cfg, grid, semantics, ranges[:2], inputs, outputs, scratch, flops,
                 "flash_rope_dq")[0]


def _backward_dkv(cfg: _Config, q, k, v, layouts, tables, ranges, d_out, lse, delta,
                  dtype=None):
    """dk, dv in `dtype` (default k's, v's): one kv block of one key/value head per program,
    reducing over the G query heads of its group and the q blocks in its range (grid: along the
    last two grid axes, fetching only q blocks in range; loop: a loop over both in the
    kernel)."""
    batch, kv_heads, _, qk_dim = k.shape
    v_dim, t_pad = v.shape[-1], q.shape[2]
    g, bq, bk = cfg.groups, cfg.block_q, cfg.block_k
    if cfg.driver == "grid":
        grid = (batch, kv_heads, cfg.kv_blocks, cfg.q_blocks, g)
        semantics = ("parallel", "parallel", "parallel", "arbitrary", "arbitrary")

        def q_block(b, j, i, lo, hi):
            return _clamp(i, lo[b, j], hi[b, j])

        q_map = lambda b, h, j, i, m, *s: (b, h * g + m, q_block(b, j, i, *s), 0)  # noqa: E731
        q_rows = lambda b, h, j, i, m, *s: (b, q_block(b, j, i, *s), 0)  # noqa: E731
        kv_map = lambda b, h, j, i, m, *_: (b, h, j, 0)  # noqa: E731
        kv_rows = lambda b, h, j, i, m, *_: (b, j, 0)  # noqa: E731
        kv_cols = lambda b, h, j, i, m, *_: (b, 0, j)  # noqa: E731
        q_len, heads = bq, None
        scratch = [("k_rot", ((bk, qk_dim), k.dtype)), ("dk_acc", ((bk, qk_dim), jnp.float32)),
                   ("dv_acc", ((bk, v_dim), jnp.float32))]
    else:  # the whole group of G query heads and all q rows, looped over in the kernel
        grid = (batch, kv_heads, cfg.kv_blocks)
        semantics = ("parallel", "parallel", "parallel")
        q_map = lambda b, h, j: (b, h, 0, 0)  # noqa: E731  (block index h of size G: heads hG..)
        q_rows = lambda b, h, j: (b, 0, 0)  # noqa: E731
        kv_map = lambda b, h, j: (b, h, j, 0)  # noqa: E731
        kv_rows = lambda b, h, j: (b, j, 0)  # noqa: E731
        kv_cols = lambda b, h, j: (b, 0, j)  # noqa: E731
        q_len, heads = t_pad, g
        scratch = []
    inputs = _inputs(q, k, v, layouts, tables, q_len, bk, heads,
                     (q_map, kv_map, q_rows, kv_rows, kv_cols))
    inputs += [("d_out", d_out, pl.BlockSpec((None, heads, q_len, v_dim), q_map)),
              ("lse", lse, pl.BlockSpec((None, heads, q_len, cfg.stat_lanes), q_map)),
              ("delta", delta, pl.BlockSpec((None, heads, q_len, cfg.stat_lanes), q_map))]
    outputs = [("dk", jax.ShapeDtypeStruct(k.shape, dtype or k.dtype),
                pl.BlockSpec((None, None, bk, qk_dim), kv_map)),
               ("dv", jax.ShapeDtypeStruct(v.shape, dtype or v.dtype),
                pl.BlockSpec((None, None, bk, v_dim), kv_map))]
    flops = 2 * _score_count(cfg, q.shape) * (2 * qk_dim + 2 * v_dim)
    return _call(_dkv_kernel, cfg, grid, semantics, ranges[2:], inputs, outputs, scratch,
                 flops, "flash_rope_dkv")


# ----------------------------------------------------------------------------- custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg: _Config, q, k, v, q_pos, kv_pos, q_seg, kv_seg, freqs, ranges):
    """q [B, Hq, Tp, D'], k [B, Hkv, Sp, D'], v [B, Hkv, Sp, Dv'] -> out [B, Hq, Tp, Dv'];
    positions and segment ids [B, Tp], [B, Sp]; ranges: `block_ranges`."""
    return _flash_fwd(cfg, q, k, v, q_pos, kv_pos, q_seg, kv_seg, freqs, ranges)[0]


def _flash_fwd(cfg, q, k, v, q_pos, kv_pos, q_seg, kv_seg, freqs, ranges):
    tables = _tables(cfg, q_pos, kv_pos, freqs, q.dtype)
    layouts = _layouts(cfg, q_pos, kv_pos, q_seg, kv_seg)
    out, lse = _forward(cfg, q, k, v, layouts, tables, ranges)
    # lse saved as [B, Hq, Tp]: its lanes are copies of one value (and a trailing axis of 1
    # would be padded to 128 lanes on TPU).
    return out, (q, k, v, q_pos, kv_pos, q_seg, kv_seg, freqs, ranges, out, lse[..., 0])


def _flash_bwd(cfg, residuals, d_out):
    """The tables and layouts are rebuilt from positions (cheap elementwise XLA), not saved."""
    q, k, v, q_pos, kv_pos, q_seg, kv_seg, freqs, ranges, out, lse = residuals
    lse = _stat_lanes(cfg, lse[..., None])
    delta = _stat_lanes(cfg, online_softmax.delta(d_out, out))
    args = (cfg, q, k, v, _layouts(cfg, q_pos, kv_pos, q_seg, kv_seg),
            _tables(cfg, q_pos, kv_pos, freqs, q.dtype), ranges, d_out, lse, delta)
    dq = _backward_dq(*args)
    dk, dv = _backward_dkv(*args)
    zero = lambda x: None if x is None else jax.tree.map(jnp.zeros_like, x)  # noqa: E731
    return (dq, dk, dv, _int_zero(q_pos), _int_zero(kv_pos), _int_zero(q_seg),
            _int_zero(kv_seg), zero(freqs), jax.tree.map(_int_zero, ranges))


def _stat_lanes(cfg: _Config, stat: jax.Array) -> jax.Array:
    """A row statistic [..., T, 1] in the kernels' layout [..., T, cfg.stat_lanes]."""
    return jnp.broadcast_to(stat, (*stat.shape[:-1], cfg.stat_lanes))


def _int_zero(x):
    """The cotangent of an integer input (float0 zeros), or None."""
    if x is None:
        return None
    return np.zeros(x.shape, dtype=jax.dtypes.float0)


_flash.defvjp(_flash_fwd, _flash_bwd)
