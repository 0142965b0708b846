"""Flash attention in Pallas with RoPE fused into the kernel: forward and backward, grouped-query,
with the mask of ./masks.py (causal by position, sliding window, chunks, segment ids). `attend`
takes un-rotated q and k.

    out[b, i, h] = Σ_j p_ij · v[b, j, h // G],   p_ij = softmax_j(scale · q'_i · k'_j), visible j
    q'_i = R(θ(positions[b, i])) q_i,             k'_j = R(θ(kv_positions[b, j])) k_j

Same semantics as ./xla.py (the reference): f32 scores, softmax and accumulation, zeros for a
query that sees no key. Inside the kernels, the mask of a block is `masks.visible` on the
block's 1-D positions and segment ids (plus padded keys), and the online softmax and its
backward are ./online_softmax.py's functions on 2-D [bq, bk] blocks.

How RoPE enters. `lx.rope.frequencies(rope, seq_len)` runs once outside the kernel (seq_len =
max over positions and kv_positions + 1, as in `lx.rope.rotate_qk`); inv_freq (and the unscaled
`default_frequencies` of LongRoPE's kept start tokens) are small f32 kernel inputs, the
attention factor a compile-time constant. Inside, each q or k block gets cos, sin from its own
positions by calling `lx.rope.rotation` on the block's arrays, and is rotated in the
rotate-half layout: x' = x·cos + rotate_half(x)·sin (f32, then back to the input dtype for the
matrix unit). Rotated q and k never exist in HBM. Partial rotary (rotary_dim r < head_dim D):
outside the kernel the dims of q and k (never v) are permuted, the same way for both, so that
scores q·k do not change, into [rot₁ | pass₁ | rot₂ | pass₂] with the halves of the rotary part
D'/2 apart; the kernel then rotates whole rows with inv_freq padded by zeros, and pins cos = 1,
sin = 0 on the pass-through lanes (which also keeps the attention factor off them). The
gradients of that permutation, the transposes and the padding are left to autodiff.

Backward (FlashAttention-2 with recomputation, `jax.custom_vjp`): the forward saves out and the
logsumexp lse (f32 [B, H, T, 1]); delta = rowsum(dout · out) is an XLA reduction; one kernel
accumulates dq, another dk and dv. In the rotated frame, as usual (./online_softmax.py),
    p = exp(s − lse), dp = dout·vᵀ, dS = scale·p⊙(dp − delta), dq' = dS·k', dk' = dSᵀ·q',
    dv = Σ pᵀ·dout,
and the rotation is undone at the end with its transpose. With C = diag(cos), S = diag(sin)
and H the rotate-half matrix (Hx = [−x₂, x₁], so Hᵀ = −H), R = C + S·H and
    Rᵀ = C + Hᵀ·S = C − H·S = C − S·H  (cos, sin are duplicated over the halves, so H·S = S·H),
i.e. the same rotation with sin negated: dq = R(−θ)·dq', attention factor included.

Kernel structure. Layout [B, heads, L, D'] (transposed outside); q block [bq, D'], k/v block
[bk, D']; positions and segment ids are [B, 1, L] int32 read in 1-D blocks. Block skipping:
the position bounds of every block that `masks.may_see` needs (`Mask.bounds`: causal, the q
block's max and the kv block's min; a window, the q min and kv max; chunks, all four) are
precomputed, since positions may be arbitrary, and a block pair that `masks.may_see` rules out
is not computed. Lengths the blocks do not divide are padded: padded keys are masked by index,
padded queries dropped. Two drivers run the same block math (`_fwd_step`, `_dq_step`,
`_dkv_step` and the mask/rotation/online-softmax helpers they share):
  "grid" (TPU; default in interpret mode): grid (B, Hq, T/bq, S/bk) with the kv axis
         innermost and sequential; running max m, denominator l, accumulator and the rotated q
         block live in VMEM scratch; dk, dv on grid (B, Hkv, S/bk, G, T/bq), reducing over the G
         query heads of the group and the q blocks; block bounds in SMEM.
  "loop" (GPU, Triton): grid (B, Hq, T/bq) (dk, dv: (B, Hkv, S/bk)), a `fori_loop` over the
         other sequence's blocks with m, l, accumulator as loop carries; refs to whole rows.
Grouped-query attention: the k/v index maps send query head h to kv head h // G (in the dk/dv
kernel, kv head g and group member gi to query head g·G + gi), so k and v are never repeated.

On a mesh (`attend_on_mesh`, what `attend(impl="flash", mesh=...)` and the model call): the
kernel runs under a `shard_map` over the batch axes and the heads ("tensor", whole GQA groups
per device), since GSPMD cannot partition a Mosaic or Triton custom call; a mesh that splits
"sequence" is refused (that is attention="ring"'s job).

Backends. CPU: `interpret=True` (what the tests run). TPU: Mosaic, `pltpu.CompilerParams`
dimension semantics, `pltpu.roll` for rotate-half. GPU: Triton (`plgpu.CompilerParams`): head
dims padded to a power of two >= 16, blocks powers of two >= 16, rotate-half as an exact matmul
with a ±1 permutation (Triton lowers no lane slicing/concatenation), cos/sin by calling
`lx.rope.rotation` with one frequency per row so its duplication is a join over a unit axis.

Verified only in interpret mode on CPU: every numeric result (tests/test_flash.py, against the
xla path, both drivers; the GPU and TPU variants of rotate-half and the GPU variant of the
block cos/sin are checked bitwise against lx.rope as plain functions). Checked without hardware: the
Pallas→Triton (GPU) and Pallas→Mosaic (TPU) lowering of forward and backward, by
`jit(...).trace(...).lower(lowering_platforms=("cuda",) / ("tpu",))` (also in the tests).
Not checked: Triton's compilation to PTX, Mosaic's layout passes and compilation in libtpu,
VMEM/SMEM/register budgets, speed. Known risks there: 1-D position/segment blocks broadcast to
rows and columns in-kernel (Mosaic may reject the lane→sublane relayout; TPU's own kernels
pass segment ids pre-broadcast as [L, 128] and [8, L]); lane concatenation inside
`rope.rotation` and `pltpu.roll` on head dims below 128 lanes; whole-row k/v refs of the GPU
driver (fine for Triton, which loads by pointer); SMEM size of the block bounds at very long
sequences; skipped TPU blocks are still copied in (their index maps are not redirected).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.sharding import PartitionSpec

from lctx_jax import rope as rope_lib, sharding
from lctx_jax.attention import masks, online_softmax

# Default (block_q, block_k) per backend. In interpret mode every grid step is one iteration of
# an XLA loop, so fewer, larger blocks are faster.
DEFAULT_BLOCKS = {"tpu": (128, 128), "gpu": (64, 64), "cpu": (128, 128)}
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
    segments: bool
    rope: _Rope | None
    backend: str           # "cpu" (interpret) | "gpu" | "tpu"
    driver: str            # "grid" | "loop"

    @property
    def kv_padded(self) -> bool:
        return self.kv_blocks * self.block_k != self.kv_len

    @property
    def interpret(self) -> bool:
        return self.backend == "cpu"


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
    mask = masks.Mask(causal, window, chunk_size)
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

    def heads_major(x, dim, length, pieces=None):  # [B, L, H, D] -> [B, H, Lp, dim]
        x = jnp.pad(x, [(0, 0), (0, length - x.shape[1]), (0, 0), (0, dim - x.shape[3])])
        if pieces is not None:
            x = jnp.concatenate([x[..., start:stop] for start, stop in pieces], axis=-1)
        return x.transpose(0, 2, 1, 3)

    def rows(x, length):  # [B, L] -> [B, 1, Lp] int32, edge-padded (neutral for min and max)
        x = jnp.asarray(x, jnp.int32)
        return jnp.pad(x, [(0, 0), (0, length - x.shape[1])], mode="edge")[:, None, :]

    t_pad, s_pad = q_blocks * block_q, kv_blocks * block_k
    qh = heads_major(q, qk_dim, t_pad, pieces)
    kh = heads_major(k, qk_dim, s_pad, pieces)
    vh = heads_major(v, v_dim, s_pad)
    q_pos, kv_pos = rows(positions, t_pad), rows(kv_positions, s_pad)
    q_seg = kv_seg = None
    if segment_ids is not None:
        q_seg, kv_seg = rows(segment_ids, t_pad), rows(kv_segment_ids, s_pad)
    blocks = {"q": q_pos.reshape(batch, q_blocks, block_q),
              "kv": kv_pos.reshape(batch, kv_blocks, block_k)}
    # The position bounds block skipping reads, e.g. "q_max": the max of each q block, [B, T/bq].
    bounds = tuple(getattr(blocks[side], stat)(axis=-1)
                   for side, stat in (name.split("_") for name in mask.bounds))

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
                  groups=q_heads // kv_heads, segments=segment_ids is not None,
                  rope=rope_static, backend=backend, driver=driver)
    out = _flash(cfg, qh, kh, vh, q_pos, kv_pos, q_seg, kv_seg, freqs, bounds)
    return out.transpose(0, 2, 1, 3)[:, :q_len, :, :head_dim]


def attend_on_mesh(q: jax.Array, k: jax.Array, v: jax.Array, *, mesh: Any,
                   positions: jax.Array, kv_positions: jax.Array,
                   segment_ids: jax.Array | None, kv_segment_ids: jax.Array | None,
                   rope: rope_lib.RopeConfig | None, **kwargs: Any) -> jax.Array:
    """`attend` on every device of `mesh` for its own rows and heads: a `shard_map` over the
    batch axes ("data", "fsdp") and the heads ("tensor", when it divides both the query and
    the key/value heads, so each device keeps whole GQA groups: query heads h·G .. h·G + G − 1
    with their key/value head h). GSPMD cannot partition a Mosaic or Triton kernel, so the
    call must not reach it bare. The kernel runs for the mesh's platform (a compile-only TPU
    topology included), and the rotation's sequence length is the maximum over all rows.

    A mesh that splits "sequence" is refused: flash attends whole sequences per device, and
    gathering the keys of every device is what attention="ring" avoids.
    """
    if mesh.shape.get(sharding.SEQUENCE_AXIS, 1) > 1:
        raise ValueError(
            f"attention='flash' needs every sequence whole on a device, but the mesh splits "
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
        return attend(q, k, v, positions=positions, kv_positions=kv_positions,
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
    return max(16, pl.next_power_of_2(dim)) if backend == "gpu" else dim


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


# ----------------------------------------------------------------------------- shared block math


def block_rotation(cfg: _Config, positions: jax.Array, freqs: tuple[jax.Array, ...]
                   ) -> tuple[jax.Array, jax.Array]:
    """cos, sin f32 [blk, D'] for a block's positions [blk], by `lx.rope.rotation`."""
    rope = cfg.rope
    inv_freq = freqs[0]
    start_inv_freq = freqs[1] if rope.start_tokens else None
    kwargs = dict(start_tokens=rope.start_tokens)
    if cfg.backend == "gpu":
        # One frequency per row: rotation's duplication of the angles becomes a join of two
        # [..., 1] arrays, which Triton lowers (it has no general concatenate); then
        # [blk, n, 2] -> [blk, 2, n] -> [blk, 2n] is the rotate-half layout.
        blk, n = positions.shape[0], inv_freq.shape[0]
        cos, sin = rope_lib.rotation(
            jnp.broadcast_to(positions[:, None], (blk, n)), inv_freq[:, None], rope.factor,
            start_inv_freq=None if start_inv_freq is None else start_inv_freq[:, None], **kwargs)
        cos, sin = (x.transpose(0, 2, 1).reshape(blk, 2 * n) for x in (cos, sin))
    else:
        cos, sin = rope_lib.rotation(positions, inv_freq, rope.factor,
                                     start_inv_freq=start_inv_freq, **kwargs)
    if rope.freqs < rope.lanes:  # pass-through lanes of a partial rotary head: identity
        lane = lax.broadcasted_iota(jnp.int32, cos.shape, 1)
        rotary = (lane < rope.freqs) | ((lane >= rope.lanes) & (lane < rope.lanes + rope.freqs))
        cos, sin = jnp.where(rotary, cos, 1.0), jnp.where(rotary, sin, 0.0)
    return cos, sin


def rotate_half(x: jax.Array, backend: str) -> jax.Array:
    """[−x₂, x₁] for x = [x₁, x₂] along the last axis of a 2-D f32 block."""
    half = x.shape[-1] // 2
    if backend == "gpu":  # exact: one ±1 per column, and f32 at HIGHEST is IEEE on Triton
        row = lax.broadcasted_iota(jnp.int32, (2 * half, 2 * half), 0)
        col = lax.broadcasted_iota(jnp.int32, (2 * half, 2 * half), 1)
        signed_perm = (jnp.where(row == col + half, -1.0, 0.0)
                       + jnp.where(row + half == col, 1.0, 0.0)).astype(x.dtype)
        return jnp.dot(x, signed_perm, precision=lax.Precision.HIGHEST,
                       preferred_element_type=jnp.float32)
    if backend == "tpu":
        from jax.experimental.pallas import tpu as pltpu
        rolled = pltpu.roll(x, half, x.ndim - 1)  # a shift of half the axis: either direction
    else:
        rolled = jnp.roll(x, half, axis=-1)
    lane = lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return jnp.where(lane < half, -rolled, rolled)


def rotate(x: jax.Array, cos: jax.Array, sin: jax.Array, backend: str) -> jax.Array:
    """x·cos + rotate_half(x)·sin in f32: R(θ)x; with −sin, R(θ)ᵀx = R(−θ)x."""
    x = x.astype(jnp.float32)
    return x * cos + rotate_half(x, backend) * sin


def _rotated(cfg: _Config, x: jax.Array, positions: jax.Array, freqs) -> jax.Array:
    """A q or k block rotated in-kernel (identity without rope), in its own dtype."""
    if cfg.rope is None:
        return x
    cos, sin = block_rotation(cfg, positions, freqs)
    return rotate(x, cos, sin, cfg.backend).astype(x.dtype)


def _visible(cfg: _Config, q_pos, kv_pos, q_seg, kv_seg, kv_start) -> jax.Array:
    """bool [bq, bk]: `masks.visible` on the block's positions [bq], [bk] (and segment ids),
    and keys past the true length (padding) hidden."""
    mask = masks.visible(cfg.mask, q_pos, kv_pos, q_seg, kv_seg)
    if cfg.kv_padded:
        index = kv_start + lax.broadcasted_iota(jnp.int32, mask.shape, 1)
        mask &= index < cfg.kv_len
    return mask


def _scores(cfg: _Config, q_rot, k_rot, mask) -> jax.Array:
    """scale · q'k'ᵀ, f32 [bq, bk], −inf where not visible (`online_softmax.scores`)."""
    products = lax.dot_general(q_rot, k_rot, _TRANS_B, preferred_element_type=jnp.float32)
    return online_softmax.scores(products, mask, cfg.scale)


def _probs_and_dscores(cfg: _Config, q_rot, k_rot, v, mask, d_out, lse, delta):
    """Recomputed p = exp(s − lse) and dS = scale · p ⊙ (dout·vᵀ − delta), f32 [bq, bk]."""
    p = online_softmax.probabilities(_scores(cfg, q_rot, k_rot, mask), lse)
    dp = lax.dot_general(d_out, v, _TRANS_B, preferred_element_type=jnp.float32)
    return p, online_softmax.score_grads(p, dp, delta, cfg.scale)


def _fwd_step(cfg, q_rot, q_pos, q_seg, k, v, kv_pos, kv_seg, kv_start, freqs, carry):
    """`online_softmax.fold` of one kv block into carry (m, l, acc)."""
    k_rot = _rotated(cfg, k, kv_pos, freqs)
    mask = _visible(cfg, q_pos, kv_pos, q_seg, kv_seg, kv_start)

    def weighted_values(p):
        return jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)

    return online_softmax.fold(carry, _scores(cfg, q_rot, k_rot, mask), weighted_values)


def _dq_step(cfg, q_rot, q_pos, q_seg, d_out, lse, delta, k, v, kv_pos, kv_seg, kv_start, freqs,
             dq):
    k_rot = _rotated(cfg, k, kv_pos, freqs)
    mask = _visible(cfg, q_pos, kv_pos, q_seg, kv_seg, kv_start)
    _, ds = _probs_and_dscores(cfg, q_rot, k_rot, v, mask, d_out, lse, delta)
    return dq + jnp.dot(ds.astype(k.dtype), k_rot, preferred_element_type=jnp.float32)


def _dkv_step(cfg, k_rot, v, kv_pos, kv_seg, kv_start, q, q_pos, q_seg, d_out, lse, delta, freqs,
              carry):
    dk, dv = carry
    q_rot = _rotated(cfg, q, q_pos, freqs)
    mask = _visible(cfg, q_pos, kv_pos, q_seg, kv_seg, kv_start)
    p, ds = _probs_and_dscores(cfg, q_rot, k_rot, v, mask, d_out, lse, delta)
    dv = dv + jnp.dot(p.astype(d_out.dtype).T, d_out, preferred_element_type=jnp.float32)
    dk = dk + jnp.dot(ds.astype(q.dtype).T, q_rot, preferred_element_type=jnp.float32)
    return dk, dv


def _unrotate(cfg: _Config, grad, positions, freqs) -> jax.Array:
    """R(θ)ᵀ grad = R(−θ) grad, f32: a gradient w.r.t. rotated q/k back to un-rotated q/k."""
    if cfg.rope is None:
        return grad
    cos, sin = block_rotation(cfg, positions, freqs)
    return rotate(grad, cos, -sin, cfg.backend)


def _may_see(cfg: _Config, refs, b, q_block, kv_block):
    """Block skipping: `masks.may_see` on the precomputed bounds of q block `q_block` and kv
    block `kv_block` of row b (traced bool), or None (always run) when the mask skips nothing."""
    bounds = {name: getattr(refs, name)[b, q_block if name.startswith("q_") else kv_block]
              for name in cfg.mask.bounds}
    return masks.may_see(cfg.mask, **bounds)


# ----------------------------------------------------------------------------- kernels


class _Refs:
    """Kernel refs by name (inputs, outputs and scratch vary with segments/rope/mask)."""

    def __init__(self, names, refs):
        assert len(names) == len(refs), (names, len(refs))
        self.__dict__.update(zip(names, refs))
        self.names = names

    def get(self, name, index=...):
        return getattr(self, name)[index] if name in self.names else None

    def freqs(self):
        return tuple(getattr(self, n)[...] for n in ("inv_freq", "start_inv_freq")
                     if n in self.names)



def _fwd_kernel(*refs, cfg: _Config, names):
    r = _Refs(names, refs)
    b, i = pl.program_id(0), pl.program_id(2)
    freqs = r.freqs()
    if cfg.driver == "grid":
        j = pl.program_id(3)

        @pl.when(j == 0)
        def _init():
            r.m[...], r.l[...], r.acc[...] = online_softmax.init(r.m.shape[:1], r.acc.shape[1])
            r.q_rot[...] = _rotated(cfg, r.q[...], r.q_pos[...], freqs)

        def step():
            carry = _fwd_step(cfg, r.q_rot[...], r.q_pos[...], r.get("q_seg"), r.k[...],
                              r.v[...], r.kv_pos[...], r.get("kv_seg"), j * cfg.block_k, freqs,
                              (r.m[...], r.l[...], r.acc[...]))
            r.m[...], r.l[...], r.acc[...] = carry

        _when(_may_see(cfg, r, b, i, j), step)

        @pl.when(j == cfg.kv_blocks - 1)
        def _store():
            out, lse = online_softmax.finish((r.m[...], r.l[...], r.acc[...]))
            r.o[...], r.lse[...] = out.astype(r.o.dtype), lse
        return

    q_pos, q_seg = r.q_pos[...], r.get("q_seg")
    q_rot = _rotated(cfg, r.q[...], q_pos, freqs)

    def body(j, carry):
        kv = pl.ds(pl.multiple_of(j * cfg.block_k, cfg.block_k), cfg.block_k)
        step = functools.partial(
            _fwd_step, cfg, q_rot, q_pos, q_seg, r.k[kv, :], r.v[kv, :], r.kv_pos[kv],
            r.get("kv_seg", kv), j * cfg.block_k, freqs)
        return _cond(_may_see(cfg, r, b, i, j), step, carry)

    init = online_softmax.init(r.q.shape[:1], r.v.shape[-1])
    out, lse = online_softmax.finish(lax.fori_loop(0, cfg.kv_blocks, body, init))
    r.o[...], r.lse[...] = out.astype(r.o.dtype), lse


def _dq_kernel(*refs, cfg: _Config, names):
    r = _Refs(names, refs)
    b, i = pl.program_id(0), pl.program_id(2)
    freqs = r.freqs()
    if cfg.driver == "grid":
        j = pl.program_id(3)

        @pl.when(j == 0)
        def _init():
            r.dq_acc[...] = jnp.zeros(r.dq_acc.shape, jnp.float32)
            r.q_rot[...] = _rotated(cfg, r.q[...], r.q_pos[...], freqs)

        def step():
            r.dq_acc[...] = _dq_step(
                cfg, r.q_rot[...], r.q_pos[...], r.get("q_seg"), r.d_out[...], r.lse[...],
                r.delta[...], r.k[...], r.v[...], r.kv_pos[...], r.get("kv_seg"),
                j * cfg.block_k, freqs, r.dq_acc[...])

        _when(_may_see(cfg, r, b, i, j), step)

        @pl.when(j == cfg.kv_blocks - 1)
        def _store():
            dq = _unrotate(cfg, r.dq_acc[...], r.q_pos[...], freqs)
            r.dq[...] = dq.astype(r.dq.dtype)
        return

    q_pos, q_seg = r.q_pos[...], r.get("q_seg")
    q_rot = _rotated(cfg, r.q[...], q_pos, freqs)
    d_out, lse, delta = r.d_out[...], r.lse[...], r.delta[...]

    def body(j, dq):
        kv = pl.ds(pl.multiple_of(j * cfg.block_k, cfg.block_k), cfg.block_k)
        step = functools.partial(
            _dq_step, cfg, q_rot, q_pos, q_seg, d_out, lse, delta, r.k[kv, :], r.v[kv, :],
            r.kv_pos[kv], r.get("kv_seg", kv), j * cfg.block_k, freqs)
        return _cond(_may_see(cfg, r, b, i, j), step, dq)

    dq = lax.fori_loop(0, cfg.kv_blocks, body, jnp.zeros(r.q.shape, jnp.float32))
    r.dq[...] = _unrotate(cfg, dq, q_pos, freqs).astype(r.dq.dtype)


def _dkv_kernel(*refs, cfg: _Config, names):
    r = _Refs(names, refs)
    b, j = pl.program_id(0), pl.program_id(2)
    freqs = r.freqs()
    kv_start = j * cfg.block_k
    if cfg.driver == "grid":
        member, i = pl.program_id(3), pl.program_id(4)
        first = (member == 0) & (i == 0)
        last = (member == cfg.groups - 1) & (i == cfg.q_blocks - 1)

        @pl.when(first)
        def _init():
            r.dk_acc[...] = jnp.zeros(r.dk_acc.shape, jnp.float32)
            r.dv_acc[...] = jnp.zeros(r.dv_acc.shape, jnp.float32)
            r.k_rot[...] = _rotated(cfg, r.k[...], r.kv_pos[...], freqs)

        def step():
            r.dk_acc[...], r.dv_acc[...] = _dkv_step(
                cfg, r.k_rot[...], r.v[...], r.kv_pos[...], r.get("kv_seg"), kv_start,
                r.q[...], r.q_pos[...], r.get("q_seg"), r.d_out[...], r.lse[...],
                r.delta[...], freqs, (r.dk_acc[...], r.dv_acc[...]))

        _when(_may_see(cfg, r, b, i, j), step)

        @pl.when(last)
        def _store():
            r.dk[...] = _unrotate(cfg, r.dk_acc[...], r.kv_pos[...], freqs).astype(r.dk.dtype)
            r.dv[...] = r.dv_acc[...].astype(r.dv.dtype)
        return

    kv_pos, kv_seg = r.kv_pos[...], r.get("kv_seg")
    k_rot = _rotated(cfg, r.k[...], kv_pos, freqs)
    v = r.v[...]

    def body(t, carry):  # t runs over (group member, q block)
        member, i = lax.div(t, cfg.q_blocks), lax.rem(t, cfg.q_blocks)  # t >= 0
        qs = pl.ds(pl.multiple_of(i * cfg.block_q, cfg.block_q), cfg.block_q)
        step = functools.partial(
            _dkv_step, cfg, k_rot, v, kv_pos, kv_seg, kv_start, r.q[member, qs, :],
            r.q_pos[qs], r.get("q_seg", qs), r.d_out[member, qs, :], r.lse[member, qs, :],
            r.delta[member, qs, :], freqs)
        return _cond(_may_see(cfg, r, b, i, j), step, carry)

    zeros = (jnp.zeros(r.k.shape, jnp.float32), jnp.zeros(r.v.shape, jnp.float32))
    dk, dv = lax.fori_loop(0, cfg.groups * cfg.q_blocks, body, zeros)
    r.dk[...] = _unrotate(cfg, dk, kv_pos, freqs).astype(r.dk.dtype)
    r.dv[...] = dv.astype(r.dv.dtype)


def _when(predicate, fn) -> None:
    """fn() under pl.when(predicate); predicate None: unconditionally."""
    if predicate is None:
        fn()
    else:
        pl.when(predicate)(fn)


def _cond(predicate, fn, carry):
    """fn(carry) if predicate else carry; predicate None: fn(carry)."""
    if predicate is None:
        return fn(carry)
    return lax.cond(predicate, fn, lambda c: c, carry)


# ----------------------------------------------------------------------------- pallas_call


def _compiler_params(cfg: _Config, semantics: tuple[str, ...]):
    if cfg.backend == "tpu":
        from jax.experimental.pallas import tpu as pltpu
        return pltpu.CompilerParams(dimension_semantics=semantics)
    if cfg.backend == "gpu":
        from jax.experimental.pallas import triton as plgpu
        return plgpu.CompilerParams(num_warps=4, num_stages=2)
    return None


def _scratch(cfg: _Config, shapes):
    if not shapes:
        return ()
    if cfg.backend == "tpu" or cfg.interpret:
        from jax.experimental.pallas import tpu as pltpu
        return tuple(pltpu.VMEM(shape, dtype) for shape, dtype in shapes)
    raise ValueError("scratch memory is only used by the 'grid' driver (TPU, interpret)")


def _scalars(cfg: _Config) -> pl.BlockSpec:
    """Block bounds [B, blocks] int32, passed whole and read as scalars (SMEM on TPU)."""
    if cfg.backend == "tpu":
        from jax.experimental.pallas import tpu as pltpu
        return pl.BlockSpec(memory_space=pltpu.SMEM)
    return pl.BlockSpec()


def _freq_inputs(freqs) -> list:
    """(name, array, spec) of inv_freq [and start_inv_freq], each [D'/2] f32, passed whole."""
    if freqs is None:
        return []
    spec = pl.BlockSpec((freqs[0].shape[0],), lambda *_: (0,))
    return [(name, x, spec) for name, x in zip(("inv_freq", "start_inv_freq"), freqs)]


def _call(kernel, cfg: _Config, grid, semantics, inputs, outputs, scratch, name):
    """inputs / outputs: lists of (name, array or ShapeDtypeStruct, BlockSpec); None arrays
    are left out. Returns the outputs."""
    inputs = [x for x in inputs if x[1] is not None]
    names = [n for n, _, _ in inputs] + [n for n, _, _ in outputs] + [n for n, _ in scratch]
    return pl.pallas_call(
        functools.partial(kernel, cfg=cfg, names=tuple(names)),
        grid=grid,
        in_specs=[spec for _, _, spec in inputs],
        out_specs=[spec for _, _, spec in outputs],
        out_shape=[shape for _, shape, _ in outputs],
        scratch_shapes=_scratch(cfg, [shape for _, shape in scratch]),
        compiler_params=_compiler_params(cfg, semantics),
        interpret=cfg.interpret,
        name=name,
    )(*[x for _, x, _ in inputs])


def _row_specs(q_map, kv_map, q_block_rows, kv_block_rows):
    """BlockSpecs for positions / segment ids [B, 1, L] (1-D blocks)."""
    return (pl.BlockSpec((None, None, q_block_rows), q_map),
            pl.BlockSpec((None, None, kv_block_rows), kv_map))


def _forward(cfg: _Config, q, k, v, q_pos, kv_pos, q_seg, kv_seg, freqs, bounds):
    batch, q_heads, t_pad, qk_dim = q.shape
    v_dim, s_pad = v.shape[-1], k.shape[2]
    g, bq, bk = cfg.groups, cfg.block_q, cfg.block_k
    out_shape = jax.ShapeDtypeStruct((batch, q_heads, t_pad, v_dim), q.dtype)
    lse_shape = jax.ShapeDtypeStruct((batch, q_heads, t_pad, 1), jnp.float32)
    if cfg.driver == "grid":
        grid = (batch, q_heads, cfg.q_blocks, cfg.kv_blocks)
        q_map = lambda b, h, i, j: (b, h, i, 0)  # noqa: E731
        kv_map = lambda b, h, i, j: (b, h // g, j, 0)  # noqa: E731
        q_row = lambda b, h, i, j: (b, 0, i)  # noqa: E731
        kv_row = lambda b, h, i, j: (b, 0, j)  # noqa: E731
        kv_rows = bk
        kv_spec = lambda dim: pl.BlockSpec((None, None, bk, dim), kv_map)  # noqa: E731
        semantics = ("parallel", "parallel", "parallel", "arbitrary")
        scratch = [("q_rot", ((bq, qk_dim), q.dtype)), ("m", ((bq, 1), jnp.float32)),
                   ("l", ((bq, 1), jnp.float32)), ("acc", ((bq, v_dim), jnp.float32))]
    else:
        grid = (batch, q_heads, cfg.q_blocks)
        q_map = lambda b, h, i: (b, h, i, 0)  # noqa: E731
        kv_map = lambda b, h, i: (b, h // g, 0, 0)  # noqa: E731
        q_row = lambda b, h, i: (b, 0, i)  # noqa: E731
        kv_row = lambda b, h, i: (b, 0, 0)  # noqa: E731
        kv_rows = s_pad
        kv_spec = lambda dim: pl.BlockSpec((None, None, s_pad, dim), kv_map)  # noqa: E731
        semantics = ("parallel", "parallel", "parallel")
        scratch = []
    q_row_spec, kv_row_spec = _row_specs(q_row, kv_row, bq, kv_rows)
    inputs = [("q", q, pl.BlockSpec((None, None, bq, qk_dim), q_map)),
              ("k", k, kv_spec(qk_dim)), ("v", v, kv_spec(v_dim)),
              ("q_pos", q_pos, q_row_spec), ("kv_pos", kv_pos, kv_row_spec),
              ("q_seg", q_seg, q_row_spec), ("kv_seg", kv_seg, kv_row_spec),
              *_freq_inputs(freqs)]
    inputs += [(name, x, _scalars(cfg)) for name, x in zip(cfg.mask.bounds, bounds)]
    outputs = [("o", out_shape, pl.BlockSpec((None, None, bq, v_dim), q_map)),
               ("lse", lse_shape, pl.BlockSpec((None, None, bq, 1), q_map))]
    return _call(_fwd_kernel, cfg, grid, semantics, inputs, outputs, scratch, "flash_rope_fwd")


def _backward_dq(cfg: _Config, q, k, v, q_pos, kv_pos, q_seg, kv_seg, freqs, bounds, d_out,
                 lse, delta):
    batch, q_heads, t_pad, qk_dim = q.shape
    v_dim, s_pad = v.shape[-1], k.shape[2]
    g, bq, bk = cfg.groups, cfg.block_q, cfg.block_k
    if cfg.driver == "grid":
        grid = (batch, q_heads, cfg.q_blocks, cfg.kv_blocks)
        q_map = lambda b, h, i, j: (b, h, i, 0)  # noqa: E731
        kv_map = lambda b, h, i, j: (b, h // g, j, 0)  # noqa: E731
        q_row = lambda b, h, i, j: (b, 0, i)  # noqa: E731
        kv_row = lambda b, h, i, j: (b, 0, j)  # noqa: E731
        kv_rows = bk
        semantics = ("parallel", "parallel", "parallel", "arbitrary")
        scratch = [("q_rot", ((bq, qk_dim), q.dtype)), ("dq_acc", ((bq, qk_dim), jnp.float32))]
    else:
        grid = (batch, q_heads, cfg.q_blocks)
        q_map = lambda b, h, i: (b, h, i, 0)  # noqa: E731
        kv_map = lambda b, h, i: (b, h // g, 0, 0)  # noqa: E731
        q_row = lambda b, h, i: (b, 0, i)  # noqa: E731
        kv_row = lambda b, h, i: (b, 0, 0)  # noqa: E731
        kv_rows = s_pad
        semantics = ("parallel", "parallel", "parallel")
        scratch = []
    q_row_spec, kv_row_spec = _row_specs(q_row, kv_row, bq, kv_rows)
    inputs = [("q", q, pl.BlockSpec((None, None, bq, qk_dim), q_map)),
              ("k", k, pl.BlockSpec((None, None, kv_rows, qk_dim), kv_map)),
              ("v", v, pl.BlockSpec((None, None, kv_rows, v_dim), kv_map)),
              ("q_pos", q_pos, q_row_spec), ("kv_pos", kv_pos, kv_row_spec),
              ("q_seg", q_seg, q_row_spec), ("kv_seg", kv_seg, kv_row_spec),
              *_freq_inputs(freqs),
              ("d_out", d_out, pl.BlockSpec((None, None, bq, v_dim), q_map)),
              ("lse", lse, pl.BlockSpec((None, None, bq, 1), q_map)),
              ("delta", delta, pl.BlockSpec((None, None, bq, 1), q_map))]
    inputs += [(name, x, _scalars(cfg)) for name, x in zip(cfg.mask.bounds, bounds)]
    outputs = [("dq", jax.ShapeDtypeStruct(q.shape, q.dtype),
                pl.BlockSpec((None, None, bq, qk_dim), q_map))]
    return _call(_dq_kernel, cfg, grid, semantics, inputs, outputs, scratch, "flash_rope_dq")[0]


def _backward_dkv(cfg: _Config, q, k, v, q_pos, kv_pos, q_seg, kv_seg, freqs, bounds, d_out,
                  lse, delta):
    batch, kv_heads, s_pad, qk_dim = k.shape
    v_dim, t_pad = v.shape[-1], q.shape[2]
    g, bq, bk = cfg.groups, cfg.block_q, cfg.block_k
    if cfg.driver == "grid":
        grid = (batch, kv_heads, cfg.kv_blocks, g, cfg.q_blocks)
        q_map = lambda b, h, j, m, i: (b, h * g + m, i, 0)  # noqa: E731
        kv_map = lambda b, h, j, m, i: (b, h, j, 0)  # noqa: E731
        q_row = lambda b, h, j, m, i: (b, 0, i)  # noqa: E731
        kv_row = lambda b, h, j, m, i: (b, 0, j)  # noqa: E731
        q_block = lambda dim: (None, None, bq, dim)  # noqa: E731
        q_rows = bq
        semantics = ("parallel", "parallel", "parallel", "arbitrary", "arbitrary")
        scratch = [("k_rot", ((bk, qk_dim), k.dtype)), ("dk_acc", ((bk, qk_dim), jnp.float32)),
                   ("dv_acc", ((bk, v_dim), jnp.float32))]
    else:  # the whole group of G query heads and all q blocks, looped over in the kernel
        grid = (batch, kv_heads, cfg.kv_blocks)
        q_map = lambda b, h, j: (b, h, 0, 0)  # noqa: E731  (block index h of size G: heads hG..)
        kv_map = lambda b, h, j: (b, h, j, 0)  # noqa: E731
        q_row = lambda b, h, j: (b, 0, 0)  # noqa: E731
        kv_row = lambda b, h, j: (b, 0, j)  # noqa: E731
        q_block = lambda dim: (None, g, t_pad, dim)  # noqa: E731
        q_rows = t_pad
        semantics = ("parallel", "parallel", "parallel")
        scratch = []
    q_row_spec, kv_row_spec = _row_specs(q_row, kv_row, q_rows, bk)
    inputs = [("q", q, pl.BlockSpec(q_block(qk_dim), q_map)),
              ("k", k, pl.BlockSpec((None, None, bk, qk_dim), kv_map)),
              ("v", v, pl.BlockSpec((None, None, bk, v_dim), kv_map)),
              ("q_pos", q_pos, q_row_spec), ("kv_pos", kv_pos, kv_row_spec),
              ("q_seg", q_seg, q_row_spec), ("kv_seg", kv_seg, kv_row_spec),
              *_freq_inputs(freqs),
              ("d_out", d_out, pl.BlockSpec(q_block(v_dim), q_map)),
              ("lse", lse, pl.BlockSpec(q_block(1), q_map)),
              ("delta", delta, pl.BlockSpec(q_block(1), q_map))]
    inputs += [(name, x, _scalars(cfg)) for name, x in zip(cfg.mask.bounds, bounds)]
    outputs = [("dk", jax.ShapeDtypeStruct(k.shape, k.dtype),
                pl.BlockSpec((None, None, bk, qk_dim), kv_map)),
               ("dv", jax.ShapeDtypeStruct(v.shape, v.dtype),
                pl.BlockSpec((None, None, bk, v_dim), kv_map))]
    return _call(_dkv_kernel, cfg, grid, semantics, inputs, outputs, scratch, "flash_rope_dkv")


# ----------------------------------------------------------------------------- custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg: _Config, q, k, v, q_pos, kv_pos, q_seg, kv_seg, freqs, bounds):
    """q [B, Hq, Tp, D'], k [B, Hkv, Sp, D'], v [B, Hkv, Sp, Dv'] -> out [B, Hq, Tp, Dv']."""
    return _forward(cfg, q, k, v, q_pos, kv_pos, q_seg, kv_seg, freqs, bounds)[0]


def _flash_fwd(cfg, q, k, v, q_pos, kv_pos, q_seg, kv_seg, freqs, bounds):
    out, lse = _forward(cfg, q, k, v, q_pos, kv_pos, q_seg, kv_seg, freqs, bounds)
    return out, (q, k, v, q_pos, kv_pos, q_seg, kv_seg, freqs, bounds, out, lse)


def _flash_bwd(cfg, residuals, d_out):
    q, k, v, q_pos, kv_pos, q_seg, kv_seg, freqs, bounds, out, lse = residuals
    delta = online_softmax.delta(d_out, out)
    args = (cfg, q, k, v, q_pos, kv_pos, q_seg, kv_seg, freqs, bounds, d_out, lse, delta)
    dq = _backward_dq(*args)
    dk, dv = _backward_dkv(*args)
    zero = lambda x: None if x is None else jax.tree.map(jnp.zeros_like, x)  # noqa: E731
    return (dq, dk, dv, _int_zero(q_pos), _int_zero(kv_pos), _int_zero(q_seg),
            _int_zero(kv_seg), zero(freqs), jax.tree.map(_int_zero, bounds))


def _int_zero(x):
    """The cotangent of an integer input (float0 zeros), or None."""
    if x is None:
        return None
    return np.zeros(x.shape, dtype=jax.dtypes.float0)


_flash.defvjp(_flash_fwd, _flash_bwd)
