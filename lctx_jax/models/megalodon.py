"""The MEGALODON family (Ma et al. 2024, arXiv 2404.08801), as the released code
XuezheMax/megalodon computes it; config.json in that code's vocabulary (model_type
"megalodon"; no transformers class exists, the weights were never released).

Block (X [B, T, D] -> Y), every norm's affine weight stored as an offset from 1 and zero-init:
    X̂ = TimestepNorm(X)                     (causal group norm, `timestep_norm`)
    X' = CEMA(X̂)                             (complex EMA, `cema`)
    mx = RMSNorm(X')
    Z = RMSNorm_per_head(mx W_z + b_z)       (no affine)
    Q = Z (κ_q + 1)/√d_z + μ_q,  K = Z (κ_k + 1)/√d_z + μ_k
    V = SiLU(X̂ W_v + b_v),  r = SiLU(mx W_r + b_r)
    O = softmax(Q Kᵀ) V inside chunks of c tokens (no 1/√d: it is in κ; RoPE, interleaved
        pairs, restarting at 0 in every chunk; a sequence longer than c is a multiple of c)
    Ŷ = mx W_h1 + b_h1 + (r ⊙ O) W_h2 + X
    Y = FFN(LayerNorm(Ŷ)) + X                (two-hop residual; FFN SiLU or SwiGLU)
and TimestepNorm as the final norm. Embeddings may be scaled by √D (scale_emb) and tied to the
head (share_emb).

Documents. Segment ids (packed training rows, generation's left padding) keep attention inside
a document; segment id 0 marks padding, which TimestepNorm leaves out of its statistics and
whose CEMA input is 0, so a left-padded row's CEMA and norm states are those of the row alone
(its chunks, cut by column, are not, unless the padding is whole chunks). Across a document
boundary inside a row, CEMA and the norm statistics carry on, as the released code trains on
one concatenated stream.

Chunk parallelism (the paper's 4-D parallelism, its "chunk" dimension). On a mesh whose
"sequence" axis has P > 1 devices, a [B, T] input is split into P contiguous pieces of T/P
tokens (a multiple of c, so chunks stay whole on their device). Attention, projections and the
FFN are per chunk or per token and run where their tokens are; the only values that cross
devices are the CEMA state of each piece (B·D·N complex) and each TimestepNorm's (count, mean,
var) per group, combined as a prefix over the devices (`lctx_jax.megalodon_ops`, axis_name),
and their gradients in the backward.

Decoding. The per-layer decode state is the CEMA state h, the TimestepNorm (count, mean, var)
and the current chunk's keys and values (c slots), plus the final norm's statistics: its size
does not depend on the sequence length. A call with a state feeds tokens that stay inside one
chunk (`generate` prefills chunk by chunk).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from lctx_jax import hf_fields as fields, layers, sharding
from lctx_jax.megalodon_ops import (CEMA_PARAMS, NormState, cema, cema_shapes,  # noqa: F401
                                    empty_norm_state, init_cema_params, timestep_norm)
from lctx_jax.models import Family

MODEL_TYPE = "megalodon"
NOTE = ("MEGALODON (Ma et al. 2024) in the released XuezheMax/megalodon code's tensor names, "
        "written by lctx_jax; transformers has no implementation. Load with "
        "lctx_jax.from_hf(path).")
_UNSUPPORTED = {  # released config fields lctx_jax does not implement, with their default
    "rescale_nffn": False, "norm_affine": True, "dropout": 0.0, "attention_dropout": 0.0,
    "hidden_dropout": 0.0}


@dataclasses.dataclass(frozen=True)
class MegalodonConfig:
    """The architecture, in the released code's ModelConf names (share_emb is
    tie_word_embeddings here). `rope` is None: the rotary positions restart in every chunk, so
    positions, context-extension methods and RopeArrays do not apply."""

    ARCHITECTURES: ClassVar[dict[str, str]] = {MODEL_TYPE: "Megalodon"}

    vocab_size: int
    model_dim: int
    num_layers: int
    num_heads: int
    z_dim: int
    value_dim: int
    ffn_hidden_dim: int
    cema_ndim: int = 16
    chunk_size: int = 2048
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    swiglu: bool = False
    scale_emb: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    model_type: ClassVar[str] = MODEL_TYPE
    rope: ClassVar[None] = None
    infini: ClassVar[None] = None

    def __post_init__(self) -> None:
        fields.check_positive_ints("MegalodonConfig", self, (
            "vocab_size", "model_dim", "num_layers", "num_heads", "z_dim", "value_dim",
            "ffn_hidden_dim", "cema_ndim", "chunk_size", "norm_num_groups"))
        for name in ("z_dim", "value_dim"):
            if getattr(self, name) % self.num_heads:
                raise ValueError(f"MegalodonConfig.{name}={getattr(self, name)} must be a "
                                 f"multiple of num_heads={self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"z_dim / num_heads = {self.head_dim} must be even (RoPE rotates "
                             "pairs of features)")
        if self.model_dim % self.norm_num_groups:
            raise ValueError(f"MegalodonConfig.norm_num_groups={self.norm_num_groups} must "
                             f"divide model_dim={self.model_dim}")
        for name in ("norm_eps", "rope_theta"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"MegalodonConfig.{name}={getattr(self, name)} must be "
                                 "finite and > 0")
        fields.check_special_tokens("MegalodonConfig", self)

    hidden_size = property(lambda self: self.model_dim)
    head_dim = property(lambda self: self.z_dim // self.num_heads)  # d_z: the heads' unit
    value_head_dim = property(lambda self: self.value_dim // self.num_heads)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any],
                rope_scaling: Mapping[str, Any] | None = None) -> "MegalodonConfig":
        """From a config.json dict in the released code's vocabulary (its rope_base is
        rope_theta; `to_hf` writes both). A rope_scaling is refused: see the class
        docstring."""
        if hf.get("model_type") != MODEL_TYPE:
            raise ValueError(f"config.json has model_type {hf.get('model_type')!r}; "
                             f"{cls.__name__} reads {MODEL_TYPE!r}")
        if rope_scaling is not None or hf.get("rope_scaling") is not None:
            raise ValueError(_NO_ROPE_SCALING)
        for name, default in _UNSUPPORTED.items():
            if hf.get(name, default) not in (default, None):
                raise ValueError(f"config.json: {name}={hf[name]!r} is not implemented by "
                                 f"lctx_jax (it needs {name}={default!r})")
        vocab = fields.integer(hf, "vocab_size")
        theta, base = hf.get("rope_theta"), hf.get("rope_base")
        if None not in (theta, base) and theta != base:
            raise ValueError(f"config.json: rope_theta={theta} and rope_base={base} (the "
                             "released code's name) disagree; keep one")
        theta = base if theta is None else theta
        return cls(
            vocab_size=vocab, model_dim=fields.integer(hf, "model_dim"),
            num_layers=fields.integer(hf, "num_layers"),
            num_heads=fields.integer(hf, "num_heads"), z_dim=fields.integer(hf, "z_dim"),
            value_dim=fields.integer(hf, "value_dim"),
            ffn_hidden_dim=fields.integer(hf, "ffn_hidden_dim"),
            cema_ndim=fields.integer(hf, "cema_ndim", 16),
            chunk_size=fields.integer(hf, "chunk_size", 2048),
            norm_num_groups=fields.integer(hf, "norm_num_groups", 32),
            norm_eps=fields.number(hf, "norm_eps", 1e-5, above=0.0),
            rope_theta=10000.0 if theta is None else fields.finite(theta, "rope_theta",
                                                                   above=0.0),
            swiglu=fields.flag(hf, "swiglu"), scale_emb=fields.flag(hf, "scale_emb"),
            tie_word_embeddings=fields.flag(hf, "share_emb"),
            bos_token_id=fields.token_id(hf, "bos_token_id", vocab),
            eos_token_id=fields.token_id(hf, "eos_token_id", vocab, many=True),
            pad_token_id=fields.token_id(hf, "pad_token_id", vocab),
        )

    def to_hf(self) -> dict[str, Any]:
        """The config.json dict (`from_hf` reads it back to an equal config)."""
        out: dict[str, Any] = {"architectures": [self.ARCHITECTURES[MODEL_TYPE]],
                               "model_type": MODEL_TYPE, "lctx_jax_note": NOTE}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out["share_emb" if f.name == "tie_word_embeddings" else f.name] = (
                list(value) if isinstance(value, tuple) else value)
        out["rope_base"] = self.rope_theta  # the released ModelConf's name for it
        return out

    def with_rope_scaling(self, rope_scaling: Mapping[str, Any] | None) -> "MegalodonConfig":
        """Itself for None; a rope_scaling is refused (see the class docstring)."""
        if rope_scaling is not None:
            raise ValueError(_NO_ROPE_SCALING)
        return self


_NO_ROPE_SCALING = ("MEGALODON restarts its rotary positions in every chunk of chunk_size "
                    "tokens and reaches past a chunk through its CEMA and norm states: "
                    "rope_scaling (context-extension methods) does not apply; leave it null")


# ----------------------------------------------------------------------------- math


def he_normal() -> Callable:
    """The released 'he' init (kaiming_normal_ with a = √5): N(0, 1/(3·fan_in)) for a kernel
    [..., in, out]."""
    def init(rng: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.normal(rng, shape, dtype) / math.sqrt(3.0 * shape[-2])
    return init


def gaussian(dim: int) -> Callable:
    """The released 'gaussian' init of embeddings and head: N(0, 1/dim) truncated at ±3σ."""
    def init(rng: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        return (jax.random.truncated_normal(rng, -3.0, 3.0, shape, dtype)
                / math.sqrt(dim)).astype(dtype)
    return init


def rms_norm(x: jax.Array, weight: jax.Array | None, eps: float) -> jax.Array:
    """x / √(mean(x²) + eps) · (weight + 1) over the last axis, in f32 (weight None: none)."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return y if weight is None else y * (weight.astype(jnp.float32) + 1.0)


def layer_norm(x: jax.Array, weight: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """(x − mean)/√(var + eps)·(weight + 1) + bias over the last axis, in f32."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps) * (weight.astype(jnp.float32) + 1.0)
            + bias.astype(jnp.float32))


def rotate_interleaved(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """RoPE on interleaved pairs (x[2i], x[2i+1]) with angle position·theta^(−2i/d), as the
    released code (torch.view_as_complex): x [B, ..., T, H, d], positions [T] -> f32."""
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    angle = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq, jnp.float32)
    cos, sin = jnp.cos(angle)[:, None, :], jnp.sin(angle)[:, None, :]  # [T, 1, d/2]
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], d // 2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    return jnp.stack([even * cos - odd * sin, even * sin + odd * cos], -1).reshape(x.shape)


def chunk_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_slots: jax.Array,
                    k_slots: jax.Array, q_segments: jax.Array | None,
                    k_segments: jax.Array | None) -> jax.Array:
    """softmax(q kᵀ) v (no scale) within each chunk: q [B, C, Tq, H, dz], k [B, C, Tk, H, dz],
    v [B, C, Tk, H, dv] -> [B, C, Tq, H, dv] in f32. Key j is visible to query i iff
    k_slots[j] <= q_slots[i] (slots [Tq], [Tk]: indices inside the chunk) and, with segments
    [B, C, Tq] / [B, C, Tk], their segment ids are equal and non-zero. A query that sees no
    key gets zeros."""
    scores = jnp.einsum("bcqhd,bckhd->bchqk", q, k, preferred_element_type=jnp.float32)
    visible = (k_slots[None, :] <= q_slots[:, None])[None, None, None]
    if q_segments is not None:
        same = ((q_segments[..., :, None] == k_segments[..., None, :])
                & (k_segments[..., None, :] > 0))
        visible = visible & same[:, :, None]
    scores = jnp.where(visible, scores, -jnp.inf)
    top = jnp.max(scores, axis=-1, keepdims=True)
    weights = jnp.exp(scores - jnp.where(jnp.isfinite(top), top, 0.0))
    weights = weights / jnp.maximum(weights.sum(-1, keepdims=True), 1e-30)
    return jnp.einsum("bchqk,bckhd->bcqhd", weights, v.astype(jnp.float32))


# ----------------------------------------------------------------------------- modules


class NormParams(nn.Module):
    """A norm's affine parameters, zero-init: weight [D] (an offset from 1) and bias [D]."""

    features: int
    param_dtype: Any
    bias: bool = True

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array | None]:
        weight = self.param("weight", nn.initializers.zeros, (self.features,), self.param_dtype)
        bias = (self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
                if self.bias else None)
        return weight, bias


class Block(nn.Module):
    """One MEGALODON layer (module docstring). h [B, T, D] -> (h, decode state)."""

    config: MegalodonConfig
    dtype: Any
    param_dtype: Any
    attention: str
    mesh: Any = None
    lora_scale: float = 0.0

    def dense(self, features: int, name: str, bias: bool = True) -> layers.Linear:
        return layers.Linear(features, bias, self.dtype, self.param_dtype, self.lora_scale,
                             kernel_init=he_normal(), name=name)

    @nn.compact
    def __call__(self, x: jax.Array, state: dict | None, ctx: layers.Context
                 ) -> tuple[jax.Array, dict | None]:
        c = self.config
        b, t, _ = x.shape
        mask = None if ctx.segment_ids is None else ctx.segment_ids > 0
        norm = NormParams(c.model_dim, self.param_dtype, name="timenorm")()
        norm_state = None if state is None else NormState(*(state[n] for n in NormState._fields))
        xn, norm_state = _sequence_op(self.mesh, c, _timestep_norm, x, norm, norm_state, mask)
        cema_params = self.param("cema", lambda rng: init_cema_params(
            rng, c.model_dim, c.cema_ndim, self.param_dtype))
        # padding is 0 in xn already (timestep_norm's output): no mask for the CEMA
        mixed, h = _sequence_op(self.mesh, c, _cema, xn, cema_params,
                                None if state is None else state["h"])
        mx = rms_norm(mixed, NormParams(c.model_dim, self.param_dtype, bias=False,
                                        name="rmsnorm")()[0], c.norm_eps).astype(self.dtype)
        z = self.dense(c.z_dim, "wz")(mx).reshape(b, t, c.num_heads, c.head_dim)
        z = rms_norm(z, None, c.norm_eps).reshape(b, t, c.z_dim)
        scale = self.param("qk_scale", nn.initializers.zeros, (2, c.z_dim), self.param_dtype)
        shift = self.param("qk_bias", nn.initializers.zeros, (2, c.z_dim), self.param_dtype)
        qk = (z[:, :, None] * (scale.astype(jnp.float32) + 1.0) / math.sqrt(c.head_dim)
              + shift.astype(jnp.float32))
        q, k = (qk[:, :, i].reshape(b, t, c.num_heads, c.head_dim) for i in (0, 1))
        v = nn.silu(self.dense(c.value_dim, "wv")(xn.astype(self.dtype)))
        r = nn.silu(self.dense(c.value_dim, "wr")(mx))
        v = v.reshape(b, t, c.num_heads, c.value_head_dim)
        if state is None:
            out = _full_attention(q, k, v, ctx.segment_ids, c)
            new_state = None
        else:
            out, kv = _cached_attention(q, k, v, ctx, state, c)
            new_state = {"h": h, **norm_state._asdict(), **kv}
        out = out.reshape(b, t, c.value_dim).astype(self.dtype)
        hidden = self.dense(c.model_dim, "wh1")(mx) + self.dense(c.model_dim, "wh2", False)(
            out * r)
        y_hat = hidden + x
        weight, bias = NormParams(c.model_dim, self.param_dtype, name="ffn_norm")()
        normed = layer_norm(y_hat, weight, bias, c.norm_eps).astype(self.dtype)
        up = nn.silu(self.dense(c.ffn_hidden_dim, "fc1", False)(normed))
        if c.swiglu:
            up = up * self.dense(c.ffn_hidden_dim, "fc3", False)(normed)
        y = self.dense(c.model_dim, "fc2", False)(up) + x
        return sharding.constrain(y, self.mesh if state is None else None, None), new_state


def _timestep_norm(x: jax.Array, norm: tuple[jax.Array, jax.Array], state: NormState | None,
                   mask: jax.Array | None, config: MegalodonConfig, axis_name: str | None
                   ) -> tuple[jax.Array, NormState]:
    groups = config.norm_num_groups * x.shape[-1] // config.model_dim  # fewer on a D shard
    return timestep_norm(x, *norm, groups, config.norm_eps, state, mask, axis_name=axis_name)


def _cema(x: jax.Array, params: dict, state: jax.Array | None, mask: None,
          config: MegalodonConfig, axis_name: str | None) -> tuple[jax.Array, jax.Array]:
    return cema(x, params, state, axis_name=axis_name)


def _sequence_op(mesh: Any, config: MegalodonConfig, op: Callable, x: jax.Array, params: Any,
                 state: Any, mask: jax.Array | None = None) -> tuple[jax.Array, Any]:
    """op(x [B, T, D], params (leaves [D, ...]), state, mask [B, T], config, axis_name) ->
    (y, state). With a decode state or without a "sequence" axis of P > 1, called as it is.
    Otherwise (a training / evaluation call, state None) under shard_map: x split over batch,
    "sequence" and, when it divides the norm groups, "tensor" on D (both ops are per feature
    or per group), `params` like D, mask like x's rows; the state is then not returned."""
    if state is not None or mesh is None or mesh.shape.get(sharding.SEQUENCE_AXIS, 1) == 1:
        return op(x, params, state, mask, config, None)
    spec = sharding.fit_spec(sharding.activation_spec(sharding.TENSOR_AXIS), x.shape, mesh)
    batch, _, feature = (*spec, None, None, None)[:3]
    if feature is not None and config.norm_num_groups % mesh.shape[sharding.TENSOR_AXIS]:
        feature = None
    x_spec = P(batch, sharding.SEQUENCE_AXIS, feature)

    def local(x: jax.Array, params: Any, mask: jax.Array | None) -> jax.Array:
        return op(x, params, None, mask, config, sharding.SEQUENCE_AXIS)[0]

    in_specs = (x_spec, jax.tree.map(lambda _: P(feature), params),
                None if mask is None else P(batch, sharding.SEQUENCE_AXIS))
    y = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=x_spec,
                      check_vma=False)(x, params, mask)
    return y, None


def check_length(config: MegalodonConfig, length: int, mesh: Any = None) -> None:
    """ValueError unless a call without decode state of `length` tokens cuts into whole chunks
    (length ≤ chunk_size, or a multiple of it) and, on a mesh whose "sequence" axis has P > 1
    devices, into whole chunks per device (a multiple of P·chunk_size)."""
    c = config.chunk_size
    if length > c and length % c:
        raise ValueError(f"MEGALODON attends within chunks of chunk_size={c} tokens: a sequence "
                         f"longer than a chunk must be a multiple of it, got {length} tokens; "
                         f"pad or cut the input to a multiple of {c}")
    pieces = 1 if mesh is None else mesh.shape.get(sharding.SEQUENCE_AXIS, 1)
    if pieces > 1 and length % (pieces * c):
        raise ValueError(f"chunk parallelism splits {length} tokens over {pieces} devices of "
                         f"the mesh axis 'sequence' in whole chunks of chunk_size={c}: the "
                         f"length must be a multiple of {pieces * c}")


def _full_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None,
                    c: MegalodonConfig) -> jax.Array:
    """Chunked attention of a call without decode state (`check_length` holds) -> [B, T, H,
    dv]."""
    b, t = q.shape[:2]
    size = min(t, c.chunk_size)
    slots = jnp.arange(size)

    def chunks(x: jax.Array) -> jax.Array:
        return x.reshape(b, t // size, size, *x.shape[2:])

    q, k = (rotate_interleaved(chunks(x), slots, c.rope_theta) for x in (q, k))
    segments = None if segment_ids is None else chunks(segment_ids)
    return chunk_attention(q, k, chunks(v), slots, slots, segments, segments).reshape(
        b, t, *v.shape[2:])


def _cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, ctx: layers.Context,
                      state: dict, c: MegalodonConfig) -> tuple[jax.Array, dict]:
    """This call's tokens (inside one chunk, the first at index ctx.cache_index) written into
    the chunk's key/value slots, then attended -> (out [B, T, H, dv], {"k", "v", "seg"})."""
    b, t = q.shape[:2]
    if t > c.chunk_size:
        raise ValueError(f"a MEGALODON call with a decode state feeds at most one chunk "
                         f"(chunk_size={c.chunk_size}) of tokens, got {t}; feed longer inputs "
                         "chunk by chunk, each starting at a multiple of chunk_size")
    first = ctx.cache_index % c.chunk_size
    slots = first + jnp.arange(t)
    q, k = (rotate_interleaved(x, slots, c.rope_theta) for x in (q, k))
    segments = (jnp.ones((b, t), jnp.int32) if ctx.segment_ids is None
                else ctx.segment_ids.astype(jnp.int32))
    kv = {name: jax.lax.dynamic_update_slice_in_dim(state[name], new.astype(state[name].dtype),
                                                    first, axis=1)
          for name, new in (("k", k), ("v", v), ("seg", segments))}
    out = chunk_attention(q[:, None], kv["k"][:, None].astype(q.dtype), kv["v"][:, None],
                          slots, jnp.arange(c.chunk_size), segments[:, None], kv["seg"][:, None])
    return out[:, 0], kv


class Decoder(nn.Module):
    """input_ids [B, T] -> logits f32 [B, T, vocab] (and the decode state); the contract of
    `lctx_jax.models`. ctx.positions are not used (positions restart in every chunk)."""

    config: MegalodonConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention: str = "xla"
    remat: str = "none"
    mesh: Any = None
    lora_scale: float = 0.0

    @nn.compact
    def __call__(self, input_ids: jax.Array, ctx: layers.Context, state: dict | None = None,
                 logits: bool = True) -> tuple[jax.Array, dict | None]:
        c = self.config
        if self.attention != "xla":
            raise ValueError(f"MEGALODON computes its chunk attention itself: attention must be "
                             f"'xla', got {self.attention!r}")
        embed = nn.Embed(c.vocab_size, c.model_dim, dtype=self.dtype,
                         param_dtype=self.param_dtype, embedding_init=gaussian(c.model_dim),
                         name="embed")
        if state is None:
            check_length(c, input_ids.shape[1], self.mesh)
        h = embed(input_ids)
        if c.scale_emb:
            h = h * math.sqrt(c.model_dim)
        if state is None:
            h = sharding.constrain(h, self.mesh, None)
            ctx = dataclasses.replace(ctx, segment_ids=sharding.constrain(ctx.segment_ids,
                                                                          self.mesh))
        stack = layers.scan_layers(Block, c.num_layers, self.remat)
        h, layer_state = stack(c, self.dtype, self.param_dtype, self.attention, self.mesh,
                               self.lora_scale, name="layers")(
            h, None if state is None else state["layers"], ctx)
        norm = NormParams(c.model_dim, self.param_dtype, name="final_norm")()
        mask = None if ctx.segment_ids is None else ctx.segment_ids > 0
        final = None if state is None else NormState(*(state["final"][n]
                                                       for n in NormState._fields))
        h, final = _sequence_op(self.mesh, c, _timestep_norm, h, norm, final, mask)
        if state is not None:
            state = {"layers": layer_state, "final": final._asdict()}
        return layers.lm_output(h, embed, c.tie_word_embeddings, self.param_dtype, self.dtype,
                                self.mesh if state is None else None, logits,
                                gaussian(c.model_dim)), state


# ----------------------------------------------------------------------------- checkpoint


def _layer_tensors(c: MegalodonConfig) -> list[tuple[tuple[str, ...], str, tuple, bool]]:
    """(our path under layers, released tensor name under layers.N, per-layer shape in our
    layout, stored transposed) of every per-layer parameter."""
    d, z, v, f = c.model_dim, c.z_dim, c.value_dim, c.ffn_hidden_dim
    out = [(("timenorm", "weight"), "mega.timenorm.weight", (d,), False),
           (("timenorm", "bias"), "mega.timenorm.bias", (d,), False)]
    out += [(("cema", name), f"mega.cema.{name}", shape, False)
            for name, shape in cema_shapes(d, c.cema_ndim).items()]
    out.append((("rmsnorm", "weight"), "mega.rmsnorm.weight", (d,), False))
    for ours, shape, bias in (("wz", (d, z), True), ("wv", (d, v), True),
                              ("wr", (d, v), True), ("wh1", (d, d), True),
                              ("wh2", (v, d), False)):
        out.append(((ours, "kernel"), f"mega.{ours}.weight", shape, True))
        if bias:
            out.append(((ours, "bias"), f"mega.{ours}.bias", (shape[1],), False))
    out += [(("qk_scale",), "mega.gamma", (2, z), False),
            (("qk_bias",), "mega.beta", (2, z), False),
            (("ffn_norm", "weight"), "nffn.norm.weight", (d,), False),
            (("ffn_norm", "bias"), "nffn.norm.bias", (d,), False),
            (("fc1", "kernel"), "nffn.fc1.weight", (d, f), True),
            (("fc2", "kernel"), "nffn.fc2.weight", (f, d), True)]
    if c.swiglu:
        out.append((("fc3", "kernel"), "nffn.fc3.weight", (d, f), True))
    return out


_NORM_BUFFERS = ("prior_count", "prior_mean", "prior_logv")  # released TimestepNorm buffers


def hf_layout(config: MegalodonConfig) -> dict[str, tuple[int, ...] | None]:
    """Every tensor of the released code's state dict, with its shape (torch Linear weights
    [out, in]); None for the buffers (TimestepNorm's priors and the rotary frequencies: written
    as the released code computes them, not read: lctx_jax has no learned prior and computes
    the frequencies from rope_theta) and the copy of a tied head."""
    c = config
    layout: dict[str, tuple[int, ...] | None] = {"embed.weight": (c.vocab_size, c.model_dim)}
    for i in range(c.num_layers):
        for _, name, shape, transposed in _layer_tensors(c):
            layout[f"layers.{i}.{name}"] = shape[::-1] if transposed else shape
        layout.update({f"layers.{i}.mega.timenorm.{b}": None for b in _NORM_BUFFERS})
    layout["output.final_norm.weight"] = layout["output.final_norm.bias"] = (c.model_dim,)
    layout.update({f"output.final_norm.{b}": None for b in _NORM_BUFFERS})
    layout["output.output.weight"] = (None if c.tie_word_embeddings
                                      else (c.vocab_size, c.model_dim))
    layout["rope.freqs"] = None
    return layout


def read_hf(reader: Any, config: MegalodonConfig, dtype: Any
            ) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    """(path, numpy array) of every leaf, one at a time (layer leaves stacked [L, ...])."""
    dtype = np.dtype(dtype)
    yield ("embed", "embedding"), reader.get("embed.weight").astype(dtype, copy=False)
    for path, name, shape, transposed in _layer_tensors(config):
        stacked = np.empty((config.num_layers, *shape), dtype)
        for i in range(config.num_layers):
            value = reader.get(f"layers.{i}.{name}")
            stacked[i] = value.T if transposed else value
        yield ("layers", *path), stacked
        del stacked
    for leaf in ("weight", "bias"):
        yield ("final_norm", leaf), reader.get(f"output.final_norm.{leaf}").astype(dtype)
    if not config.tie_word_embeddings:
        yield ("lm_head", "kernel"), reader.get("output.output.weight").T.astype(dtype)


def write_hf(params: Mapping[str, Any], config: MegalodonConfig,
             to_host: Callable[[Any], np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) pairs of the released state dict, layer by layer."""
    c = config
    groups = c.norm_num_groups
    buffers = {"prior_count": np.zeros((), np.int64), "prior_mean": np.zeros(groups, np.float32),
               "prior_logv": np.zeros(groups, np.float32)}
    yield "embed.weight", to_host(params["embed"]["embedding"])
    for i in range(c.num_layers):
        for path, name, _, transposed in _layer_tensors(c):
            leaf = params["layers"]
            for key in path:
                leaf = leaf[key]
            value = to_host(leaf[i])
            yield f"layers.{i}.{name}", value.T if transposed else value
        for buffer, value in buffers.items():
            yield f"layers.{i}.mega.timenorm.{buffer}", value
    for leaf in ("weight", "bias"):
        yield f"output.final_norm.{leaf}", to_host(params["final_norm"][leaf])
    for buffer, value in buffers.items():
        yield f"output.final_norm.{buffer}", value
    exponents = np.arange(0, c.head_dim, 2) / c.head_dim
    yield "rope.freqs", (1.0 / c.rope_theta ** exponents).astype(np.float32)
    if c.tie_word_embeddings:  # the released code's head is the embedding itself
        yield "output.output.weight", to_host(params["embed"]["embedding"])
    else:
        yield "output.output.weight", to_host(params["lm_head"]["kernel"]).T


# ----------------------------------------------------------------------------- the rest


_F, _T = sharding.FSDP_AXIS, sharding.TENSOR_AXIS
SHARDING_RULES = (  # column-parallel inputs, row-parallel outputs; per-feature parameters of
    # CEMA and the norms replicated (small; sequence ops split them like D under shard_map)
    (r"embed/embedding", P(_T, _F), None),
    (r"lm_head/kernel", P(_F, _T), None),
    (r"layers/wz/kernel", P(None, _F, _T), 2),
    (r"layers/(wv|wr|wh1|fc1|fc3)/kernel", P(None, _F, _T), None),
    (r"layers/(wh2|fc2)/kernel", P(None, _T, _F), None),
    (r"layers/wz/bias", P(None, _T), 1),
    (r"layers/(wv|wr)/bias", P(None, _T), None),
    (r"layers/qk_(scale|bias)", P(None, None, _T), 2),
    (r"layers/wh1/bias", P(), None),
    (r"layers/cema/\w+", P(), None),
    (r"\w*norm/(weight|bias)", P(), None),
)

LORA_TARGETS = ("wz", "wv", "wr", "wh1", "wh2", "fc1", "fc2", "fc3")


def flops_per_token(config: MegalodonConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6·N for the matmul weights outside the embedding table, plus
    attention inside chunks (12·layers·span·(d_z + d_v)/2·heads, no causal discount, span =
    min(T, chunk)) and the CEMA FFT convolution (≈ 6·5·2·log2(2T) per feature and layer, three
    passes of two real FFTs of length 2T)."""
    c = config
    f = 3 if c.swiglu else 2
    per_layer = (c.model_dim * (c.z_dim + 2 * c.value_dim + c.model_dim) + c.value_dim
                 * c.model_dim + f * c.model_dim * c.ffn_hidden_dim)
    weights = c.num_layers * per_layer + c.model_dim * c.vocab_size
    span = min(seq_len, c.chunk_size)
    attention = 6.0 * c.num_layers * span * (c.z_dim + c.value_dim)
    fft = 6.0 * 5.0 * 2.0 * math.log2(2 * max(seq_len, 1)) * c.model_dim * c.num_layers
    return float(6.0 * weights + attention + fft)


def decode_state(config: MegalodonConfig, batch: int, size: int, dtype: Any) -> dict:
    """{"layers": per layer (stacked [L, ...]) the CEMA state h [B, D, N] complex64, the
    TimestepNorm count [B], mean, var [B, G] and the chunk's k [B, c, H, d_z], v [B, c, H, d_v]
    (`dtype`), seg [B, c]; "final": the final norm's count, mean, var}. `size` is not used:
    the state has the same size for any sequence."""
    del size
    c, lead = config, (config.num_layers, batch)
    norm = empty_norm_state(batch, c.norm_num_groups)._asdict()
    return {"layers": {"h": jnp.zeros((*lead, c.model_dim, c.cema_ndim), jnp.complex64),
                       **{name: jnp.broadcast_to(v, (c.num_layers, *v.shape))
                          for name, v in norm.items()},
                       "k": jnp.zeros((*lead, c.chunk_size, c.num_heads, c.head_dim), dtype),
                       "v": jnp.zeros((*lead, c.chunk_size, c.num_heads, c.value_head_dim),
                                      dtype),
                       "seg": jnp.zeros((*lead, c.chunk_size), jnp.int32)},
            "final": norm}


FAMILY = Family(
    name="megalodon", model_types=(MODEL_TYPE,), config=MegalodonConfig, decoder=Decoder,
    hf_layout=hf_layout, read_hf=read_hf, write_hf=write_hf, sharding_rules=SHARDING_RULES,
    lora_targets=LORA_TARGETS, flops_per_token=flops_per_token, decode_state=decode_state,
    hf_tied_head=("output.output.weight", "embed.weight"),
    prefill_chunk=lambda config: config.chunk_size, refeeds=False)
