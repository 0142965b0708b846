"""Layers that model families compose (Flax linen; parameters as plain nested dicts).

Shapes: B batch, T tokens, S tokens held by a layer's decode state, H hidden, F MLP width,
Hq/Hkv query/key-value heads, D head_dim. Norm statistics and softmax run in f32, matmuls in the
compute dtype, parameters keep their own dtype.

Naming contract the rest of the library relies on (lora.py, sharding rules, losses.py):
  embed/embedding [V, H]; lm_head/kernel [H, V] unless tie_word_embeddings; every norm's
  parameter is "<something>norm/scale"; every `Linear` holds "kernel" [in, out] (+ "bias") and
  takes LoRA adapters from the "lora" collection under its own name.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from lctx_jax import sharding
from lctx_jax.attention import attend, infini as infini_lib
from lctx_jax.rope import RopeArrays, RopeConfig

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class Context:
    """Per-call inputs every layer sees: positions and segments of the queries and of the keys
    a layer's decode state holds, where this call's keys are written, optionally a rotation
    replacing the config's rope (runtime arrays: no recompile per value), whether the tokens
    are in ring order and the attention's block size (static)."""

    positions: jax.Array  # [B, T]
    segment_ids: jax.Array | None  # [B, T]
    kv_positions: jax.Array | None  # [B, S] with a decode state, else None
    kv_segment_ids: jax.Array | None  # [B, S]
    cache_index: jax.Array | None  # scalar: the state slot of this call's first token
    rope: RopeArrays | None = None  # None: the config's rope
    ring_order: bool = False  # tokens in `ring.reorder` order: impl "ring" skips its own
    block_size: int | None = None  # the attention's block (None: the kernel's default)


jax.tree_util.register_dataclass(
    Context, data_fields=["positions", "segment_ids", "kv_positions", "kv_segment_ids",
                          "cache_index", "rope"], meta_fields=["ring_order", "block_size"])


def default_positions(input_ids: jax.Array) -> jax.Array:
    """arange(T) for every row of input_ids [B, T]."""
    b, t = input_ids.shape
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) · scale, statistics in f32 (Zhang & Sennrich 2019)."""

    eps: float
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(x.dtype) * normed.astype(x.dtype)


class Linear(nn.Module):
    """y = x W (+ b), with nn.Dense's parameters ("kernel" [in, out], "bias") and arithmetic, plus
    a LoRA update (Hu et al. 2021) when the "lora" collection holds this layer's adapters:

        y = x W + lora_scale · (x A) B,    A [in, r], B [r, out]   (`lctx_jax.lora`)

    The frozen W is used as it is: no merged copy W + s·A B is ever formed, and its gradient is
    never computed when only A and B (and other leaves) are differentiated."""

    features: int
    use_bias: bool
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    lora_scale: float = 0.0
    kernel_init: Callable = nn.initializers.normal(0.02)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features),
                            self.param_dtype)
        bias = (self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
                if self.use_bias else None)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
        if self.has_variable("lora", "a"):
            a, b = (self.get_variable("lora", name).astype(self.dtype) for name in ("a", "b"))
            y = y + (self.lora_scale * ((x @ a) @ b)).astype(y.dtype)
        if bias is not None:
            y = y + bias
        return y


Dense = Callable[[int, str, bool], Linear]  # (features, name, bias) -> a Linear in the caller


def swiglu(dense: Dense, x: jax.Array, intermediate_size: int, bias: bool = False) -> jax.Array:
    """down(silu(gate(x)) ⊙ up(x)) (Shazeer 2020): [..., H] -> [..., H] with width F.

    `dense` makes the projections inside the calling module (so their parameters are the
    caller's children "gate", "up", "down"), which is how a family's block composes layers
    without a level of nesting in its checkpoint names."""
    gate = dense(intermediate_size, "gate", bias)(x)
    up = dense(intermediate_size, "up", bias)(x)
    return dense(x.shape[-1], "down", bias)(nn.silu(gate) * up)


def self_attention(dense: Dense, x: jax.Array, ctx: Context, cache: dict | None, *,
                   num_heads: int, num_kv_heads: int, head_dim: int, rope: RopeConfig | None,
                   impl: str, dtype: Any, mesh: Any = None, qkv_bias: bool = False,
                   o_bias: bool = False, window: int | None = None,
                   infini: infini_lib.InfiniConfig | None = None, gate: jax.Array | None = None
                   ) -> tuple[jax.Array, dict | None]:
    """Grouped-query self-attention with its decode-state write: x [B·T or B, T, H] ->
    (o(attend(q, k, v)) shaped like x, cache).

    Projections "q", "k", "v", "o" are made by `dense` in the caller. q and k are passed to
    `attend` un-rotated with the rope (ctx.rope overrides it); causal by position, segments and
    an optional sliding `window`. cache {"k", "v"} [B, S, Hkv, D] (one layer's KV cache, keys
    un-rotated) gets this call's k, v at slot ctx.cache_index, and attention runs over all S
    cached keys with ctx.kv_positions / kv_segment_ids. Cached calls use "xla" when `impl` is
    self-attention only ("ring", "s2": LongLoRA evaluates and generates with full attention;
    "splash", "cudnn": masks by token index).
    ctx.ring_order (tokens in ring order: the decoder's, see attention/ring.py) is passed on
    as `inputs_reordered`.

    infini (with `gate` [Hq], the layer's gate logits): Infini-attention instead
    (`lctx_jax.attention.infini`): segments of infini.segment_len tokens by index, the local
    path rotated at the index inside its segment (ctx.positions are not used), segment ids
    separating packed documents, `window` on the local path; `cache` is then the infini
    decode state (`infini.stream`).
    """
    b, t = ctx.positions.shape
    q = dense(num_heads * head_dim, "q", qkv_bias)(x).reshape(b, t, num_heads, head_dim)
    k = dense(num_kv_heads * head_dim, "k", qkv_bias)(x).reshape(b, t, num_kv_heads, head_dim)
    v = dense(num_kv_heads * head_dim, "v", qkv_bias)(x).reshape(b, t, num_kv_heads, head_dim)
    rope = rope if ctx.rope is None else ctx.rope
    if infini is not None:
        if cache is None:
            out = infini_lib.attend(q, k, v, gate, infini.segment_len, infini.update, rope,
                                    segment_ids=ctx.segment_ids, window=window)
        else:
            out, cache = infini_lib.stream(q, k, v, gate, infini, rope, cache, ctx.cache_index,
                                           ctx.segment_ids, window)
        return dense(x.shape[-1], "o", o_bias)(out.reshape(*x.shape[:-1], -1)), cache
    if cache is not None:
        start = (0, ctx.cache_index, 0, 0)
        k, v = (jax.lax.dynamic_update_slice(cache[name], new.astype(cache[name].dtype), start)
                for name, new in (("k", k), ("v", v)))
        cache = {"k": k, "v": v}
        if impl in ("ring", "s2", "splash", "cudnn"):
            impl = "xla"
    out = attend(q, k.astype(dtype), v.astype(dtype), impl=impl, causal=True,
                 segment_ids=ctx.segment_ids, rope=rope,
                 positions=ctx.positions, mesh=mesh, kv_positions=ctx.kv_positions,
                 kv_segment_ids=ctx.kv_segment_ids, window=window,
                 inputs_reordered=ctx.ring_order, block_size=ctx.block_size)
    return dense(x.shape[-1], "o", o_bias)(out.reshape(*x.shape[:-1], -1)), cache


def kv_cache(num_layers: int, batch: int, size: int, num_kv_heads: int, head_dim: int,
             dtype: Any) -> dict:
    """An empty decode state for `self_attention` stacked over layers: {"k", "v"} zeros
    [L, B, S, Hkv, D]."""
    return {name: jnp.zeros((num_layers, batch, size, num_kv_heads, head_dim), dtype)
            for name in ("k", "v")}


class HeadKernel(nn.Module):
    """Holds the untied LM head lm_head/kernel [H, vocab]; `head_logits` applies it."""

    features: int
    param_dtype: jnp.dtype
    kernel_init: Callable = nn.initializers.normal(0.02)

    @nn.compact
    def __call__(self, hidden_size: int) -> jax.Array:
        return self.param("kernel", self.kernel_init, (hidden_size, self.features),
                          self.param_dtype)


def lm_output(hidden: jax.Array, embed: nn.Embed, tie_word_embeddings: bool, param_dtype: Any,
              dtype: Any, mesh: Any, logits: bool,
              kernel_init: Callable = nn.initializers.normal(0.02)) -> jax.Array:
    """A decoder's last step, inside its compact call: the final hidden states [B, T, H] as
    they are (logits=False), or f32 logits [B, T, vocab] by the LM head, the embedding's
    transpose when tied, else "lm_head" (a HeadKernel made in the calling module); on a mesh
    constrained to batch, sequence and vocabulary over "tensor"."""
    if tie_word_embeddings:
        head = embed.embedding.T
    else:
        head = HeadKernel(embed.num_embeddings, param_dtype, kernel_init=kernel_init,
                          name="lm_head")(embed.features)
    if not logits:
        return hidden
    out = head_logits(hidden, head, dtype)
    return sharding.constrain(out, mesh, sharding.TENSOR_AXIS)


def head_logits(hidden: jax.Array, head: jax.Array, dtype: Any) -> jax.Array:
    """The LM head: hidden [..., H] @ head [H, vocab] in the compute dtype, f32 logits (the
    matmul accumulates in f32)."""
    return jnp.einsum("...h,hv->...v", hidden.astype(dtype), head.astype(dtype),
                      preferred_element_type=jnp.float32)


def head_kernel(params: Any, tie_word_embeddings: bool) -> jax.Array:
    """The LM head [H, vocab] of a parameter tree: lm_head/kernel, or the embedding's
    transpose with tied embeddings."""
    if tie_word_embeddings:
        return params["embed"]["embedding"].T
    return params["lm_head"]["kernel"]


def scan_layers(block: type[nn.Module], num_layers: int, remat: str) -> Any:
    """`block` stacked over `num_layers` by nn.scan (parameters and LoRA adapters get a leading
    [L] axis, the decode state is scanned too, the Context is broadcast), with activation
    checkpointing per layer by REMAT_POLICIES[remat]. Call the result as
    `scanned(*block_fields, name=...)(h, state, ctx)`."""
    if remat != "none":
        block = nn.remat(block, policy=REMAT_POLICIES[remat], prevent_cse=False)
    return nn.scan(block, variable_axes={"params": 0, "lora": 0}, split_rngs={"params": True},
                   in_axes=(0, nn.broadcast), length=num_layers)

