"""LLaMA-family decoder (Llama 1/2/3.x, Mistral, Qwen2, Phi-3) in Flax linen.

Why linen: parameters are a plain nested dict, which maps one-to-one onto safetensors names,
Orbax trees and sharding rules, and `nn.scan` stacks the layers so compile time does not grow
with depth. All families share one parameter layout (separate q/k/v and gate/up kernels);
Phi-3's fused qkv / gate_up tensors are split and re-fused in `lctx_jax.convert`.

Shapes: B batch, T tokens, S cached tokens, H hidden, Hq/Hkv query/key-value heads, D head_dim.
RMSNorm and softmax run in f32; matmuls in the compute dtype; parameters keep their own dtype.
The KV cache holds un-rotated keys: attention rotates q and k from positions on every call, so
cached keys and new queries always share one rotation (see `lctx_jax.generate`).

On a mesh (`lctx_jax.sharding`): parameters are placed by the sharding rules, hidden states are
kept [B, T, H] (not flattened) and constrained to batch over ("data", "fsdp") and tokens over
"sequence" at the embedding and at each layer's output; positions and segment ids are
constrained the same way, so "ring" attention and GSPMD see one consistent token layout.
Calls with a KV cache (generation) are not constrained: GSPMD lays them out from the
parameters. (A "sequence" constraint there propagates into `generate`'s token buffer, and
XLA's SPMD partitioner, as of jax 0.10.2, miscompiles its scatter: prompt tokens get
overwritten. Decoding one token per step has nothing to split along "sequence" anyway.)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lctx_jax import sharding
from lctx_jax.attention import attend
from lctx_jax.lora import LoraConfig
from lctx_jax.rope import RopeArrays, RopeConfig

FAMILIES = {  # model_type -> transformers architecture
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "phi3": "Phi3ForCausalLM",
}
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The architecture; reads and writes the Hugging Face config.json vocabulary."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope: RopeConfig
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.model_type not in FAMILIES:
            raise ValueError(f"model_type {self.model_type!r} is not supported; supported: "
                             f"{', '.join(FAMILIES)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads ({self.num_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_kv_heads})")

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any],
                rope_scaling: Mapping[str, Any] | None = None) -> "ModelConfig":
        """From a config.json dict; `rope_scaling` puts a context-extension method on it."""
        model_type = hf.get("model_type")
        if model_type not in FAMILIES:
            archs = hf.get("architectures")
            raise ValueError(f"config.json has model_type {model_type!r} (architectures "
                             f"{archs}); lctx_jax supports {', '.join(FAMILIES)}")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act {act!r} is not supported (LLaMA-family models use silu)")
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        qkv_bias = model_type == "qwen2" or bool(hf.get("attention_bias", False))
        sliding = hf.get("sliding_window")
        if model_type == "qwen2" and not hf.get("use_sliding_window", False):
            sliding = None
        eos = hf.get("eos_token_id")
        return cls(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rope=RopeConfig.from_hf(hf, rope_scaling),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=model_type == "llama" and bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            sliding_window=sliding,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=hf.get("pad_token_id"),
        )

    def to_hf(self) -> dict[str, Any]:
        """A config.json dict that transformers builds the same model from."""
        rope = self.rope.to_hf()
        out: dict[str, Any] = {
            "architectures": [FAMILIES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.rope.max_position_embeddings,
            "rope_theta": rope["rope_theta"],
            "rope_parameters": rope,
            "sliding_window": self.sliding_window,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": (list(self.eos_token_id) if isinstance(self.eos_token_id, tuple)
                             else self.eos_token_id),
            "pad_token_id": self.pad_token_id,
        }
        if self.model_type == "llama":
            out["attention_bias"] = self.qkv_bias
            out["mlp_bias"] = self.mlp_bias
        if "partial_rotary_factor" in rope:
            out["partial_rotary_factor"] = rope["partial_rotary_factor"]
        if self.rope.original_max_position_embeddings:
            out["original_max_position_embeddings"] = self.rope.original_max_position_embeddings
        if self.model_type == "qwen2":
            out["use_sliding_window"] = self.sliding_window is not None
        return out


# ----------------------------------------------------------------------------- modules


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

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.normal(0.02), (x.shape[-1], self.features),
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


class HeadKernel(nn.Module):
    """Holds the untied LM head lm_head/kernel [H, vocab]; `head_logits` applies it."""

    features: int
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, hidden_size: int) -> jax.Array:
        return self.param("kernel", nn.initializers.normal(0.02), (hidden_size, self.features),
                          self.param_dtype)


@dataclasses.dataclass(frozen=True)
class Context:
    """Per-call inputs every layer sees: positions and segments of queries and of keys, and
    optionally a rotation that replaces config.rope (runtime arrays: no recompile per value)."""

    positions: jax.Array  # [B, T]
    segment_ids: jax.Array | None  # [B, T]
    kv_positions: jax.Array | None  # [B, S] with a cache, else None
    kv_segment_ids: jax.Array | None  # [B, S]
    cache_index: jax.Array | None  # scalar: where this call's keys are written
    rope: RopeArrays | None = None  # None: config.rope


jax.tree_util.register_dataclass(
    Context, data_fields=["positions", "segment_ids", "kv_positions", "kv_segment_ids",
                          "cache_index", "rope"], meta_fields=[])


def _cache_safe(attention: str, layer_cache: dict | None) -> str:
    """A KV-cache call attends T new queries to S cached keys, so it runs the xla path instead
    of a self-attention-only one: "ring" (self-attention over the sequence axis) and "s2"
    (S²-Attn is a training-time approximation; with a cache the model runs full attention, as
    LongLoRA does at inference)."""
    return "xla" if attention in ("ring", "s2") and layer_cache is not None else attention


class Block(nn.Module):
    """Pre-norm decoder layer: h + attn(norm(h)), then h + SwiGLU(norm(h))."""

    config: ModelConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    attention: str
    mesh: Any = None
    lora_scale: float = 0.0

    def dense(self, features: int, name: str, bias: bool = False) -> Linear:
        return Linear(features, bias, self.dtype, self.param_dtype, self.lora_scale, name=name)

    @nn.compact
    def __call__(self, h: jax.Array, layer_cache: dict | None, ctx: Context
                 ) -> tuple[jax.Array, dict | None]:
        c = self.config
        b, t = ctx.positions.shape  # h is [B·T, H] without a mesh, else [B, T, H]: see Decoder
        mesh = self.mesh if layer_cache is None else None  # activation constraints: see top
        x = RMSNorm(c.rms_norm_eps, self.param_dtype, name="attn_norm")(h)
        q = self.dense(c.num_heads * c.head_dim, "q", c.qkv_bias)(x)
        k = self.dense(c.num_kv_heads * c.head_dim, "k", c.qkv_bias)(x)
        v = self.dense(c.num_kv_heads * c.head_dim, "v", c.qkv_bias)(x)
        q = q.reshape(b, t, c.num_heads, c.head_dim)
        k = k.reshape(b, t, c.num_kv_heads, c.head_dim)
        v = v.reshape(b, t, c.num_kv_heads, c.head_dim)
        if layer_cache is not None:
            start = (0, ctx.cache_index, 0, 0)
            k, v = (jax.lax.dynamic_update_slice(layer_cache[name], x.astype(
                layer_cache[name].dtype), start) for name, x in (("k", k), ("v", v)))
            layer_cache = {"k": k, "v": v}
        impl = _cache_safe(self.attention, layer_cache)
        out = attend(q, k.astype(self.dtype), v.astype(self.dtype), impl=impl, causal=True,
                     segment_ids=ctx.segment_ids, rope=c.rope if ctx.rope is None else ctx.rope,
                     positions=ctx.positions,
                     mesh=self.mesh, kv_positions=ctx.kv_positions,
                     kv_segment_ids=ctx.kv_segment_ids)
        h = h + self.dense(c.hidden_size, "o", c.o_bias)(out.reshape(*h.shape[:-1], -1))

        x = RMSNorm(c.rms_norm_eps, self.param_dtype, name="mlp_norm")(h)
        gate = self.dense(c.intermediate_size, "gate", c.mlp_bias)(x)
        up = self.dense(c.intermediate_size, "up", c.mlp_bias)(x)
        h = h + self.dense(c.hidden_size, "down", c.mlp_bias)(nn.silu(gate) * up)
        return sharding.constrain(h, mesh, None), layer_cache


class Decoder(nn.Module):
    """input_ids [B, T] -> logits f32 [B, T, vocab] (and the updated cache)."""

    config: ModelConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention: str = "xla"
    remat: str = "none"
    mesh: Any = None
    lora_scale: float = 0.0

    @nn.compact
    def __call__(self, input_ids: jax.Array, ctx: Context, cache: dict | None = None,
                 logits: bool = True) -> tuple[jax.Array, dict | None]:
        """-> (logits f32 [B, T, vocab], cache), or with logits=False the final-normed hidden
        states [B, T, H] (for `lctx_jax.losses`, which applies the LM head in chunks)."""
        c = self.config
        embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype,
                         param_dtype=self.param_dtype,
                         embedding_init=nn.initializers.normal(0.02), name="embed")
        b, t = input_ids.shape
        h = embed(input_ids)
        if self.mesh is None:
            # Tokens are flattened to [B·T, H] between attention calls: XLA's CPU backend runs
            # the backward of a [B, T, H] x [H, F] projection several times slower than of a
            # 2-D one. On a mesh they stay [B, T, H]: a [B, T] layout split over both batch and
            # sequence has no equivalent split of B·T, so flattening would cost a reshuffle.
            h = h.reshape(b * t, c.hidden_size)
        elif cache is None:  # activation constraints (not with a cache: see the module doc)
            h = sharding.constrain(h, self.mesh, None)
            ctx = dataclasses.replace(
                ctx, positions=sharding.constrain(ctx.positions, self.mesh),
                segment_ids=sharding.constrain(ctx.segment_ids, self.mesh))
        block = Block
        if self.remat != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
        layers = nn.scan(block, variable_axes={"params": 0, "lora": 0},
                         split_rngs={"params": True}, in_axes=(0, nn.broadcast),
                         length=c.num_layers)
        h, cache = layers(c, self.dtype, self.param_dtype, self.attention, self.mesh,
                          self.lora_scale, name="layers")(h, cache, ctx)
        h = RMSNorm(c.rms_norm_eps, self.param_dtype, name="norm")(h).reshape(b, t, -1)
        if c.tie_word_embeddings:
            head = embed.embedding.T
        else:
            head = HeadKernel(c.vocab_size, self.param_dtype, name="lm_head")(c.hidden_size)
        if not logits:
            return h, cache
        out = head_logits(h, head, self.dtype)
        return sharding.constrain(out, self.mesh if cache is None else None, "tensor"), cache


def head_logits(hidden: jax.Array, head: jax.Array, dtype: Any) -> jax.Array:
    """The LM head: hidden [..., H] @ head [H, vocab] in the compute dtype, f32 logits (the
    matmul accumulates in f32)."""
    return jnp.einsum("...h,hv->...v", hidden.astype(dtype), head.astype(dtype),
                      preferred_element_type=jnp.float32)


def head_kernel(params: Any, config: "ModelConfig") -> jax.Array:
    """The LM head [H, vocab] of a parameter tree: lm_head/kernel, or the embedding's
    transpose with tied embeddings."""
    if config.tie_word_embeddings:
        return params["embed"]["embedding"].T
    return params["lm_head"]["kernel"]


# ----------------------------------------------------------------------------- model


def default_positions(input_ids: jax.Array) -> jax.Array:
    b, t = input_ids.shape
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


@dataclasses.dataclass(eq=False)
class Model:
    """Parameters plus how to run them. `model(input_ids)` -> logits f32 [B, T, vocab].

    dtype: compute dtype; parameters keep theirs (bf16 checkpoints stay bf16 in memory).
    attention: "xla" | "flash" | "ring" | "s2" (see lctx_jax.attention.attend).
    remat: "none" | "full" | "dots" — activation checkpointing policy per layer.
    lora: a LoraConfig when `apply(..., adapters=)` is given LoRA adapters (training).
    mesh: a Mesh from `lctx_jax.make_mesh`, or None. With a mesh, `from_hf`, `load` and `init`
    place the parameters by `lctx_jax.sharding.RULES` (`param_shardings`), and `model(ids)`
    runs as one jit whose inputs are placed by the rules and the activation spec and whose
    logits come back split over batch and sequence (and vocabulary over "tensor").
    """

    config: ModelConfig
    params: Any
    dtype: Any = jnp.float32
    attention: str = "xla"
    remat: str = "none"
    mesh: Any = None
    lora: LoraConfig | None = None

    def __post_init__(self) -> None:
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {list(REMAT_POLICIES)}, got {self.remat!r}")

    @property
    def param_dtype(self) -> Any:
        return jax.tree_util.tree_leaves(self.params)[0].dtype

    @property
    def module(self) -> Decoder:
        return Decoder(self.config, self.dtype, self.param_dtype, self.attention, self.remat,
                       self.mesh, self.lora.scale if self.lora is not None else 0.0)

    @classmethod
    def init(cls, config: ModelConfig, rng: jax.Array, dtype: Any = jnp.float32,
             param_dtype: Any = jnp.float32, **kwargs: Any) -> "Model":
        """A randomly initialised model (normal(0.02) weights, unit norms); with mesh= in
        kwargs the parameters are created already split by the sharding rules."""
        module = Decoder(config, dtype, param_dtype)
        ids = jnp.zeros((1, 1), jnp.int32)
        ctx = Context(default_positions(ids), None, None, None, None)

        def init(rng: jax.Array) -> Any:
            return module.init(rng, ids, ctx)["params"]

        mesh = kwargs.get("mesh")
        out_shardings = None
        if mesh is not None:
            out_shardings = sharding.param_shardings(jax.eval_shape(init, rng), mesh,
                                                     config.head_dim)
        params = jax.jit(init, out_shardings=out_shardings)(rng)
        return cls(config, params, dtype=dtype, **kwargs)

    @property
    def param_shardings(self) -> Any:
        """NamedSharding tree of the parameters by the sharding rules (None without a mesh)."""
        if self.mesh is None:
            return None
        return sharding.param_shardings(self.params, self.mesh, self.config.head_dim)

    def apply(self, params: Any, input_ids: jax.Array, positions: jax.Array | None = None,
              segment_ids: jax.Array | None = None, rope: RopeArrays | None = None,
              adapters: Any = None) -> jax.Array:
        """Pure forward for training code: logits f32 [B, T, vocab].

        `rope`, a RopeArrays (`lctx_jax.rope.longrope_arrays`), replaces config.rope in every
        layer; as a traced argument it lets one compiled forward try many rotations (the
        LongRoPE search). It needs attention "xla" or "s2".

        `adapters`: LoRA adapters (`lctx_jax.lora.init`) applied inside the layers as
        x W + scale · (x A) B, with scale from `self.lora`; the kernels stay as they are.

        On a mesh, `params` are constrained to the rule shardings, so inside a jitted training
        step their gradients come out split the same way (FSDP / tensor) even without
        out_shardings, instead of being gathered whole on every device.
        """
        return self._run(params, input_ids, positions, segment_ids, rope, adapters, True)

    def hidden(self, params: Any, input_ids: jax.Array, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None, rope: RopeArrays | None = None,
               adapters: Any = None) -> jax.Array:
        """As `apply`, but the final-normed hidden states [B, T, H] before the LM head
        (`head_kernel(params, config)`): what `lctx_jax.losses` consumes."""
        return self._run(params, input_ids, positions, segment_ids, rope, adapters, False)

    def _run(self, params: Any, input_ids: jax.Array, positions: jax.Array | None,
             segment_ids: jax.Array | None, rope: RopeArrays | None, adapters: Any,
             logits: bool) -> jax.Array:
        self.check_length(input_ids.shape[1])
        half = self.config.rope.rotary_dim // 2
        if rope is not None and rope.inv_freq.shape != (half,):
            raise ValueError(f"rope arrays have inv_freq of shape {rope.inv_freq.shape}; this "
                             f"model rotates rotary_dim/2 = {half} frequencies")
        if adapters is not None and self.lora is None:
            raise ValueError("LoRA adapters were passed to a Model without a LoraConfig; build "
                             "it with Model(..., lora=LoraConfig(...))")
        if self.mesh is not None:
            params = jax.lax.with_sharding_constraint(
                params, sharding.param_shardings(params, self.mesh, self.config.head_dim))
        if positions is None:
            positions = default_positions(input_ids)
        ctx = Context(positions, segment_ids, None, None, None, rope)
        variables = {"params": params} if adapters is None else {"params": params,
                                                                 "lora": adapters}
        return self.module.apply(variables, input_ids, ctx, logits=logits)[0]

    def check_length(self, length: int) -> None:
        window = self.config.sliding_window
        if window is not None and length > window:
            raise ValueError(
                f"this checkpoint uses sliding-window attention (sliding_window={window}), which "
                f"lctx_jax does not implement; a {length}-token sequence would be computed with "
                "full attention and differ from the reference. To use full attention deliberately "
                "(as context-extension recipes do), set sliding_window to null in config.json.")

    @functools.cached_property
    def _forward(self) -> Any:
        return jax.jit(self.apply)

    @functools.cached_property
    def _sharded_forwards(self) -> dict:
        return {}

    def __call__(self, input_ids: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        if self.mesh is None:
            return self._forward(self.params, jnp.asarray(input_ids, jnp.int32), positions,
                                 segment_ids)
        # On a mesh: one jit per input shape with explicit in_shardings (params by the rules,
        # [B, T] inputs by the activation spec) and out_shardings (logits split over batch and
        # sequence). Inputs are placed first: host arrays go shard by shard, device arrays are
        # resharded, and parameters already placed by the rules are not copied.
        args = [None if x is None else x.astype(jnp.int32) if isinstance(x, jax.Array)
                else np.asarray(x, np.int32) for x in (input_ids, positions, segment_ids)]
        shape = args[0].shape
        if len(shape) != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {shape}")
        specs = [None if x is None else sharding.activation_sharding(self.mesh, x.shape)
                 for x in args]
        key = tuple(None if x is None else x.shape for x in args)
        if key not in self._sharded_forwards:
            logits = sharding.activation_sharding(self.mesh, (*shape, self.config.vocab_size),
                                                  "tensor")
            self._sharded_forwards[key] = jax.jit(
                self.apply, in_shardings=(self.param_shardings, *specs), out_shardings=logits)
        params = jax.device_put(self.params, self.param_shardings)
        args = [None if x is None else jax.device_put(x, s) for x, s in zip(args, specs)]
        return self._sharded_forwards[key](params, *args)
