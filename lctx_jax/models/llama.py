"""The LLaMA family: Llama 1/2/3.x, Mistral, Qwen2 and Phi-3 (transformers' *ForCausalLM).

Pre-norm decoder, RMSNorm, grouped-query attention with RoPE (every scaling method of
`lctx_jax.rope`), SwiGLU MLP. One parameter layout for all four (separate q/k/v and gate/up
kernels); Phi-3's fused qkv_proj / gate_up_proj tensors are split on reading and re-fused on
writing. Differences handled from config.json: biases (Qwen2's q/k/v, Llama's attention_bias
and mlp_bias), head_dim, partial rotary (Phi-3), tied embeddings, sliding-window attention
(Mistral, Phi-3, Qwen2 with use_sliding_window).

Layers are stacked by nn.scan (compile time does not grow with depth). On a mesh
(`lctx_jax.sharding`) hidden states are kept [B, T, H] and constrained to batch over
("data", "fsdp") and tokens over "sequence" at the embedding and at each layer's output;
positions and segment ids likewise, so "ring" attention and GSPMD see one token layout. Calls
with a decode state are not constrained: a "sequence" constraint there propagates into
`generate`'s token buffer, whose scatter XLA's SPMD partitioner (jax 0.10.2) miscompiles, and a
one-token decode step has nothing to split along "sequence" anyway.

With attention="ring" on a mesh splitting "sequence" (and no decode state) the tokens run in
ring order (`lctx_jax.attention.ring`): input_ids, positions and segment ids are reordered once
before the embedding, every layer's ring attention takes them as they are
(ctx.ring_order), and the final hidden states are restored once before the LM head. Norms and
the MLP act per token and the mask and RoPE go by position, so the result is unchanged; what
is saved is the reorder and restore that each layer's attention would do otherwise.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Callable, ClassVar, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from lctx_jax import hf_fields as fields, layers, sharding
from lctx_jax.attention import infini as infini_lib, ring
from lctx_jax.attention.infini import InfiniConfig
from lctx_jax.models import Family
from lctx_jax.rope import RopeConfig

INFINI_MODEL_TYPE = "lctx_infini"  # config.json model_type of a LLaMA model with Infini-attention
INFINI_NOTE = ("Infini-attention (Munkhdalai et al. 2024) on a {base} model, written by lctx_jax: "
               "transformers has no implementation of it (a {base} model would silently drop "
               "the memory and its gates). Load with lctx_jax.from_hf(path).")


@dataclasses.dataclass(frozen=True)
class LinearName:
    """One per-layer projection: our module name, transformers' name under model.layers.N,
    its [in, out] sizes and whether it has a bias."""
    ours: str
    theirs: str
    shape: tuple[int, int]
    bias: bool


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The architecture; reads and writes the Hugging Face config.json vocabulary."""

    ARCHITECTURES: ClassVar[dict[str, str]] = {  # model_type -> transformers architecture
        "llama": "LlamaForCausalLM",
        "mistral": "MistralForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
        "phi3": "Phi3ForCausalLM",
    }

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
    infini: InfiniConfig | None = None  # Infini-attention in every layer (attention="infini")

    def __post_init__(self) -> None:
        """The checks that hold however the config is built (`from_hf` checks config.json's
        fields first, under their transformers names)."""
        if self.model_type not in self.ARCHITECTURES:
            raise ValueError(f"model_type {self.model_type!r} is not one of this config "
                             f"class's: {', '.join(self.ARCHITECTURES)}")
        fields.check_positive_ints("ModelConfig", self, (
            "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
            "num_kv_heads", "head_dim"))
        if not 0 < self.rms_norm_eps < math.inf:
            raise ValueError(f"ModelConfig.rms_norm_eps={self.rms_norm_eps} must be finite and "
                             "> 0")
        fields.check_special_tokens("ModelConfig", self)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads ({self.num_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_kv_heads})")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be a positive int or null, got "
                             f"{self.sliding_window}")

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any],
                rope_scaling: Mapping[str, Any] | None = None) -> "ModelConfig":
        """From a config.json dict; `rope_scaling` puts a context-extension method on it. An
        Infini-attention export (model_type "lctx_infini") reads as its base model_type with
        `infini` set."""
        infini = None
        if hf.get("model_type") == INFINI_MODEL_TYPE:
            if not isinstance(hf.get("infini_attention"), Mapping):
                raise ValueError(f"config.json: model_type {INFINI_MODEL_TYPE!r} needs "
                                 "infini_attention, a dict like {\"segment_len\": 2048}")
            infini = InfiniConfig.from_dict(hf["infini_attention"])
            hf = {**hf, "model_type": hf.get("infini_base_model_type")}
        model_type = hf.get("model_type")
        if model_type not in cls.ARCHITECTURES:
            raise ValueError(f"config.json has model_type {model_type!r} (architectures "
                             f"{hf.get('architectures')}); {cls.__name__} reads "
                             f"{', '.join(cls.ARCHITECTURES)}")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act {act!r} is not supported (LLaMA-family models use silu)")
        vocab = fields.integer(hf, "vocab_size")
        hidden = fields.integer(hf, "hidden_size")
        heads = fields.integer(hf, "num_attention_heads")
        head_dim = fields.integer(hf, "head_dim", None)
        if head_dim is None:
            if hidden % heads:
                raise ValueError(f"config.json: hidden_size={hidden} is not a multiple of "
                                 f"num_attention_heads={heads} and there is no head_dim; "
                                 "transformers needs one or the other")
            head_dim = hidden // heads
        return cls(
            model_type=model_type,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=fields.integer(hf, "intermediate_size"),
            num_layers=fields.integer(hf, "num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=fields.integer(hf, "num_key_value_heads", heads),
            head_dim=head_dim,
            rope=RopeConfig.from_hf(hf, rope_scaling),
            rms_norm_eps=fields.number(hf, "rms_norm_eps", 1e-6, above=0.0),
            tie_word_embeddings=fields.flag(hf, "tie_word_embeddings"),
            qkv_bias=model_type == "qwen2" or fields.flag(hf, "attention_bias"),
            o_bias=model_type == "llama" and fields.flag(hf, "attention_bias"),
            mlp_bias=fields.flag(hf, "mlp_bias"),
            sliding_window=_sliding_window(hf),
            bos_token_id=fields.token_id(hf, "bos_token_id", vocab),
            eos_token_id=fields.token_id(hf, "eos_token_id", vocab, many=True),
            pad_token_id=_pad_token_id(hf, vocab),
            infini=infini,
        )

    def to_hf(self) -> dict[str, Any]:
        """A config.json dict that transformers builds the same model from."""
        rope = self.rope.to_hf()
        out: dict[str, Any] = {
            "architectures": [self.ARCHITECTURES[self.model_type]],
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
            "bos_token_id": self.bos_token_id,
            "eos_token_id": (list(self.eos_token_id) if isinstance(self.eos_token_id, tuple)
                             else self.eos_token_id),
            "pad_token_id": self.pad_token_id,
        }
        if self.model_type == "llama":
            out["attention_bias"] = self.qkv_bias
            out["mlp_bias"] = self.mlp_bias
        else:
            out["sliding_window"] = self.sliding_window
        if self.model_type == "qwen2":
            out["use_sliding_window"] = self.sliding_window is not None
            out["max_window_layers"] = 0 if self.sliding_window is not None else self.num_layers
            out["layer_types"] = [("sliding_attention" if self.sliding_window is not None
                                   else "full_attention")] * self.num_layers
        if "partial_rotary_factor" in rope:
            out["partial_rotary_factor"] = rope["partial_rotary_factor"]
        if self.rope.original_max_position_embeddings:
            out["original_max_position_embeddings"] = self.rope.original_max_position_embeddings
        if self.infini is not None:  # never a LLaMA config that transformers would run wrongly
            out.update(architectures=["LctxInfiniForCausalLM"], model_type=INFINI_MODEL_TYPE,
                       infini_base_model_type=self.model_type,
                       infini_attention=self.infini.to_dict(),
                       lctx_jax_note=INFINI_NOTE.format(base=self.model_type))
        return out

    def with_infini(self, infini: InfiniConfig | None) -> "ModelConfig":
        """This architecture with Infini-attention settings (None: plain attention); the
        parameters then gain (or lose) the per-layer, per-head gate logits."""
        return dataclasses.replace(self, infini=infini)

    def with_rope_scaling(self, rope_scaling: Mapping[str, Any] | None) -> "ModelConfig":
        """This architecture with `rope_scaling` (a transformers rope_scaling dict) in place of
        its own method; None: plain RoPE. Base theta and partial rotary stay, so the result
        equals reading the checkpoint's config.json with that rope_scaling (an "ntk" rope,
        which config.json stores as its scaled base, keeps the unscaled base here)."""
        hf = {**self.with_infini(None).to_hf(), "rope_theta": self.rope.theta}
        hf.pop("rope_parameters")
        return dataclasses.replace(self, rope=RopeConfig.from_hf(hf, rope_scaling))

    def linears(self) -> list[LinearName]:
        """The per-layer projections, in checkpoint order."""
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        h, f = self.hidden_size, self.intermediate_size
        return [LinearName("q", "self_attn.q_proj", (h, q), self.qkv_bias),
                LinearName("k", "self_attn.k_proj", (h, kv), self.qkv_bias),
                LinearName("v", "self_attn.v_proj", (h, kv), self.qkv_bias),
                LinearName("o", "self_attn.o_proj", (q, h), self.o_bias),
                LinearName("gate", "mlp.gate_proj", (h, f), self.mlp_bias),
                LinearName("up", "mlp.up_proj", (h, f), self.mlp_bias),
                LinearName("down", "mlp.down_proj", (f, h), self.mlp_bias)]

    def fused(self) -> dict[str, tuple[str, ...]]:
        """transformers tensors that hold several of our projections (rows concatenated)."""
        if self.model_type != "phi3":
            return {}
        return {"self_attn.qkv_proj": ("q", "k", "v"), "mlp.gate_up_proj": ("gate", "up")}


def _pad_token_id(hf: Mapping[str, Any], vocab: int) -> int | None:
    """pad_token_id, or None; -1 (how early LLaMA conversions wrote "no pad token") reads as
    None, with a warning."""
    if hf.get("pad_token_id") == -1:
        warnings.warn("config.json: pad_token_id=-1 read as null (no pad token)", stacklevel=4)
        return None
    return fields.token_id(hf, "pad_token_id", vocab)


def _sliding_window(hf: Mapping[str, Any]) -> int | None:
    """The sliding window every layer uses, or None (full attention), as transformers reads it:
    Mistral and Phi-3 use `sliding_window` on every layer; Qwen2 only with use_sliding_window,
    on the layers that `layer_types` (or max_window_layers) marks "sliding_attention"."""
    model_type = hf.get("model_type")
    window = None if model_type == "llama" else fields.integer(hf, "sliding_window", None)
    if window is None:
        return None
    if model_type != "qwen2":
        return window
    if not hf.get("use_sliding_window", False):
        return None
    types = hf.get("layer_types") or [
        "sliding_attention" if i >= fields.integer(hf, "max_window_layers", 28, minimum=0)
        else "full_attention" for i in range(fields.integer(hf, "num_hidden_layers"))]
    if set(types) == {"full_attention"}:
        return None
    if set(types) == {"sliding_attention"}:
        return window
    raise ValueError(
        f"this Qwen2 config slides its attention window on some layers only (layer_types / "
        f"max_window_layers={hf.get('max_window_layers')}), which lctx_jax does not implement: "
        "every layer shares one mask. Set use_sliding_window to false (full attention, as "
        "context-extension recipes use) or max_window_layers to 0 (every layer slides).")


# ----------------------------------------------------------------------------- modules


class Block(nn.Module):
    """Pre-norm decoder layer: h + attn(norm(h)), then h + mlp(norm(h)). With Infini-attention
    it holds the gate logits "infini_gate" [Hq] too."""

    config: ModelConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    attention: str
    mesh: Any = None
    lora_scale: float = 0.0

    def dense(self, features: int, name: str, bias: bool = False) -> layers.Linear:
        return layers.Linear(features, bias, self.dtype, self.param_dtype, self.lora_scale,
                             name=name)

    def mlp(self, x: jax.Array) -> jax.Array:
        return layers.swiglu(self.dense, x, self.config.intermediate_size, self.config.mlp_bias)

    @nn.compact
    def __call__(self, h: jax.Array, cache: dict | None, ctx: layers.Context
                 ) -> tuple[jax.Array, dict | None]:
        c = self.config  # h is [B·T, H] without a mesh, else [B, T, H]: see Decoder
        x = layers.RMSNorm(c.rms_norm_eps, self.param_dtype, name="attn_norm")(h)
        gate = None if c.infini is None else self.param(
            infini_lib.GATE, nn.initializers.constant(c.infini.gate_init), (c.num_heads,),
            self.param_dtype)
        out, cache = layers.self_attention(
            self.dense, x, ctx, cache, num_heads=c.num_heads, num_kv_heads=c.num_kv_heads,
            head_dim=c.head_dim, rope=c.rope, impl=self.attention, dtype=self.dtype,
            mesh=self.mesh, qkv_bias=c.qkv_bias, o_bias=c.o_bias, window=c.sliding_window,
            infini=c.infini, gate=gate)
        h = h + out
        h = h + self.mlp(layers.RMSNorm(c.rms_norm_eps, self.param_dtype, name="mlp_norm")(h))
        return sharding.constrain(h, self.mesh if cache is None else None, None), cache


class Decoder(nn.Module):
    """input_ids [B, T] -> logits f32 [B, T, vocab] (and the updated KV cache)."""

    config: ModelConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention: str = "xla"
    remat: str = "none"
    mesh: Any = None
    lora_scale: float = 0.0
    block: ClassVar[type[nn.Module]] = Block

    @nn.compact
    def __call__(self, input_ids: jax.Array, ctx: layers.Context, cache: dict | None = None,
                 logits: bool = True) -> tuple[jax.Array, dict | None]:
        """-> (logits f32 [B, T, vocab], cache), or with logits=False the final-normed hidden
        states [B, T, H] (for `lctx_jax.losses`, which applies the LM head in chunks)."""
        c = self.config
        embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype,
                         param_dtype=self.param_dtype,
                         embedding_init=nn.initializers.normal(0.02), name="embed")
        b, t = input_ids.shape
        ring_size = _ring_size(self.attention, self.mesh, cache)
        if ring_size > 1:  # ring order from here to the final norm: see the module doc
            input_ids, positions, segment_ids = (
                None if x is None else sharding.constrain(
                    ring.reorder(x, ring_size, ring.DEFAULT_SCHEME), self.mesh)
                for x in (input_ids, ctx.positions, ctx.segment_ids))
            ctx = dataclasses.replace(ctx, positions=positions, segment_ids=segment_ids,
                                      ring_order=True)
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
        stack = layers.scan_layers(self.block, c.num_layers, self.remat)
        h, cache = stack(c, self.dtype, self.param_dtype, self.attention, self.mesh,
                         self.lora_scale, name="layers")(h, cache, ctx)
        h = layers.RMSNorm(c.rms_norm_eps, self.param_dtype, name="norm")(h).reshape(b, t, -1)
        if ring_size > 1:
            h = sharding.constrain(ring.restore(h, ring_size, ring.DEFAULT_SCHEME), self.mesh,
                                   None)
        return layers.lm_output(h, embed, c.tie_word_embeddings, self.param_dtype, self.dtype,
                                self.mesh if cache is None else None, logits), cache


def _ring_size(attention: str, mesh: Any, cache: dict | None) -> int:
    """The devices P of the ring when a decoder call runs its tokens in ring order (attention
    "ring", a mesh splitting "sequence", no decode state), else 1."""
    if attention != "ring" or mesh is None or cache is not None:
        return 1
    return mesh.shape.get(sharding.SEQUENCE_AXIS, 1)


# ----------------------------------------------------------------------------- HF names


_NORMS = [("attn_norm", "input_layernorm"), ("mlp_norm", "post_attention_layernorm")]
INFINI_GATE = "self_attn.infini_gate"  # the gate logits [Hq] of a layer, in an lctx_infini export


def hf_layout(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name of the transformers checkpoint, with its shape (torch Linear weights
    are [out, in]); None for a tensor that may be present and is not read (the copy of a
    tied LM head some checkpoints store)."""
    c = config
    per_layer: dict[str, tuple[int, ...]] = {
        f"{theirs}.weight": (c.hidden_size,) for _, theirs in _NORMS}
    fused = c.fused()
    in_fused = {name for names in fused.values() for name in names}
    for lin in c.linears():
        if lin.ours not in in_fused:
            per_layer[f"{lin.theirs}.weight"] = lin.shape[::-1]
        if lin.bias:
            per_layer[f"{lin.theirs}.bias"] = (lin.shape[1],)
    shapes = {lin.ours: lin.shape for lin in c.linears()}
    for theirs, names in fused.items():
        per_layer[f"{theirs}.weight"] = (sum(shapes[n][1] for n in names), c.hidden_size)
    if c.infini is not None:
        per_layer[INFINI_GATE] = (c.num_heads,)
    layout = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size),
              "model.norm.weight": (c.hidden_size,)}
    layout["lm_head.weight"] = None if c.tie_word_embeddings else (c.vocab_size, c.hidden_size)
    for i in range(c.num_layers):
        layout.update({f"model.layers.{i}.{name}": shape for name, shape in per_layer.items()})
    return layout


def _layer_leaves(config: ModelConfig) -> list[tuple[str, str, tuple[int, ...]]]:
    """(our module, leaf, per-layer shape) of every stacked leaf under "layers"."""
    leaves = [(ours, "scale", (config.hidden_size,)) for ours, _ in _NORMS]
    for lin in config.linears():
        leaves.append((lin.ours, "kernel", lin.shape))
        if lin.bias:
            leaves.append((lin.ours, "bias", (lin.shape[1],)))
    return leaves


def _read_layer_leaf(reader: Any, config: ModelConfig, i: int, ours: str, leaf: str
                     ) -> np.ndarray:
    """One layer's value of one of our leaves (kernels [in, out]); fused tensors (Phi-3's
    qkv / gate_up) are read as a row range, never whole."""
    prefix = f"model.layers.{i}."
    if leaf == "scale":
        return reader.get(prefix + dict(_NORMS)[ours] + ".weight")
    lins = {lin.ours: lin for lin in config.linears()}
    if leaf == "bias":
        return reader.get(prefix + lins[ours].theirs + ".bias")
    for fused, names in config.fused().items():
        if ours in names:
            start = sum(lins[n].shape[1] for n in names[:names.index(ours)])
            return reader.get_rows(prefix + fused + ".weight", start,
                                   start + lins[ours].shape[1]).T
    return reader.get(prefix + lins[ours].theirs + ".weight").T


def read_hf(reader: Any, config: ModelConfig, dtype: Any
            ) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    """(path, numpy array) of every leaf of the Decoder's parameter tree, one leaf at a time: a
    stacked layer leaf [L, ...] is built from the L per-layer tensors and dropped here once
    the caller moves on, so the host holds one leaf at a time."""
    dtype = np.dtype(dtype)
    embedding = reader.get("model.embed_tokens.weight")
    yield ("embed", "embedding"), embedding.astype(dtype, copy=False)
    del embedding
    for ours, leaf, shape in _layer_leaves(config):
        stacked = np.empty((config.num_layers, *shape), dtype)
        for i in range(config.num_layers):
            stacked[i] = _read_layer_leaf(reader, config, i, ours, leaf)
        yield ("layers", ours, leaf), stacked
        del stacked
    if config.infini is not None:
        yield ("layers", infini_lib.GATE), np.stack([
            reader.get(f"model.layers.{i}.{INFINI_GATE}") for i in range(config.num_layers)]
        ).astype(dtype)
    yield ("norm", "scale"), reader.get("model.norm.weight").astype(dtype, copy=False)
    if not config.tie_word_embeddings:
        yield ("lm_head", "kernel"), reader.get("lm_head.weight").T.astype(dtype)


def write_hf(params: Mapping[str, Any], config: ModelConfig,
             to_host: Callable[[Any], np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) pairs of the transformers checkpoint, layer by layer."""
    yield "model.embed_tokens.weight", to_host(params["embed"]["embedding"])
    stacked, lins, fused = params["layers"], config.linears(), config.fused()
    for i in range(config.num_layers):
        prefix = f"model.layers.{i}."
        for ours, theirs in _NORMS:
            yield prefix + f"{theirs}.weight", to_host(stacked[ours]["scale"][i])
        kernels = {lin.ours: to_host(stacked[lin.ours]["kernel"][i]).T for lin in lins}
        for theirs, names in fused.items():
            yield prefix + f"{theirs}.weight", np.concatenate([kernels.pop(n) for n in names])
        for lin in lins:
            if lin.ours in kernels:
                yield prefix + f"{lin.theirs}.weight", kernels[lin.ours]
            if lin.bias:
                yield prefix + f"{lin.theirs}.bias", to_host(stacked[lin.ours]["bias"][i])
        if config.infini is not None:
            yield prefix + INFINI_GATE, to_host(stacked[infini_lib.GATE][i])
    yield "model.norm.weight", to_host(params["norm"]["scale"])
    if not config.tie_word_embeddings:
        yield "lm_head.weight", to_host(params["lm_head"]["kernel"]).T


# ----------------------------------------------------------------------------- the rest


# Megatron layout: attention and MLP inputs column parallel, outputs row parallel; "fsdp"
# splits the hidden dimension. The stacked layer axis L (nn.scan) is never split. Heads
# dimensions (2 for q/k/v kernels [L, H, heads·D], 1 for o [L, heads·D, H]) count whole heads.
_F, _T = sharding.FSDP_AXIS, sharding.TENSOR_AXIS
SHARDING_RULES = (
    (r"embed/embedding", P(_T, _F), None),
    (r"lm_head/kernel", P(_F, _T), None),
    (r"layers/(q|k|v)/kernel", P(None, _F, _T), 2),
    (r"layers/(gate|up)/kernel", P(None, _F, _T), None),
    (r"layers/o/kernel", P(None, _T, _F), 1),
    (r"layers/down/kernel", P(None, _T, _F), None),
    (r"layers/(q|k|v)/bias", P(None, _T), 1),
    (r"layers/(gate|up)/bias", P(None, _T), None),
    (r"layers/(o|down)/bias", P(), None),
    (r"\w*norm/scale", P(), None),
    (rf"layers/{infini_lib.GATE}", P(), None),
)

LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (PaLM appendix B): 6·N for the matmul weights outside the
    embedding table, plus 12·layers·heads·head_dim·T for attention (no causal discount).
    Infini-attention attends within segments (T ≤ N) and reads and writes its memory: 6 FLOPs
    per multiply-add of σ(q)M (Hq·D²) and σ(k)ᵀv (Hkv·D², twice with the delta rule)."""
    c = config
    weights = c.num_layers * sum(np.prod(lin.shape) for lin in c.linears())
    weights += c.hidden_size * c.vocab_size
    span, memory = seq_len, 0.0
    if c.infini is not None:
        span = min(seq_len, c.infini.segment_len)
        writes = 2 if c.infini.update == "delta" else 1
        memory = 6.0 * c.num_layers * c.head_dim ** 2 * (c.num_heads + writes * c.num_kv_heads)
    return float(6.0 * weights + 12.0 * c.num_layers * c.num_heads * c.head_dim * span + memory)


def decode_state(config: ModelConfig, batch: int, size: int, dtype: Any) -> dict:
    """The KV cache {"k", "v"} [L, B, size, Hkv, D] (un-rotated keys); with Infini-attention
    the memory and one segment of cache (`lctx_jax.attention.infini.decode_state`), whatever
    `size`."""
    if config.infini is not None:
        return infini_lib.decode_state(config.num_layers, batch, config.num_kv_heads,
                                       config.head_dim, config.infini, dtype)
    return layers.kv_cache(config.num_layers, batch, size, config.num_kv_heads,
                           config.head_dim, dtype)


FAMILY = Family(
    name="llama", model_types=(*ModelConfig.ARCHITECTURES, INFINI_MODEL_TYPE), config=ModelConfig,
    decoder=Decoder, hf_layout=hf_layout, read_hf=read_hf, write_hf=write_hf,
    sharding_rules=SHARDING_RULES, lora_targets=LORA_TARGETS,
    flops_per_token=flops_per_token, decode_state=decode_state,
    hf_tied_head=("lm_head.weight", "model.embed_tokens.weight"),
    prefill_chunk=lambda config: None if config.infini is None else config.infini.segment_len)
