"""A model = what it is (`ModelSpec`: config, compute dtype, attention, remat, mesh, LoRA) plus
what it holds (params, a nested dict of arrays). Family-agnostic: the architecture comes from
the config's family (`lctx_jax.models`).

    model = lx.from_hf(path)                  # or lx.load(dir), Model.init(config, rng)
    logits = model(input_ids)                 # jitted; on a mesh, placed and split
    logits = model.apply(params, input_ids)   # pure, for training code (also ModelSpec.apply)

Training and evaluation code that holds its weights elsewhere (a train state, a checkpoint
being restored) uses a `ModelSpec`; `Model.of(spec, params)` joins the two.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lctx_jax import layers, models, sharding, token_ids
from lctx_jax.lora import LoraConfig
from lctx_jax.models.llama import ModelConfig  # noqa: F401  (lx.ModelConfig)
from lctx_jax.rope import RopeArrays

INFINI = "infini"  # the attention of Infini-attention models (lctx_jax.attention.infini)

@dataclasses.dataclass(frozen=True, eq=False)
class ModelSpec:
    """How to run a family's decoder, without its weights.

    dtype: compute dtype; parameters keep theirs (bf16 checkpoints stay bf16 in memory).
    attention: "xla" | "flash" | "ring" | "s2" | "splash" | "cudnn" (see
    lctx_jax.attention.attend; the self-attention-only ones decode with "xla"), or "infini" for
    a config with Infini-attention settings (`config.infini`, lctx_jax.attention.infini), which
    the other values refuse.
    remat: "none" | "full" | "dots" — activation checkpointing policy per layer.
    mesh: a Mesh from `lctx_jax.make_mesh`, or None: parameters are placed by the family's
    sharding rules (`param_shardings`), activations split over batch and sequence.
    lora: a LoraConfig when `apply(..., adapters=)` is given LoRA adapters (training).
    attention_block_size: the attention's block (flash: q and kv blocks; splash: its blocks;
    ring: its largest tile; xla: forces the blockwise path with this block), or None for each
    kernel's default per backend (flash: 512 on TPU, 64 on GPU).
    """

    config: Any
    dtype: Any = jnp.float32
    attention: str | None = None  # None: `default_attention(config)`
    remat: str = "none"
    mesh: Any = None
    lora: LoraConfig | None = None
    attention_block_size: int | None = None

    def __post_init__(self) -> None:
        if self.attention is None:
            object.__setattr__(self, "attention", default_attention(self.config))
        if self.remat not in layers.REMAT_POLICIES:
            raise ValueError(f"remat must be one of {list(layers.REMAT_POLICIES)}, got "
                             f"{self.remat!r}")
        block = self.attention_block_size
        if block is not None and (not isinstance(block, (int, np.integer))
                                  or isinstance(block, bool) or block < 1):
            raise ValueError(f"attention_block_size must be a positive int or None (each "
                             f"kernel's default), got {block!r}")
        if block is not None and self.attention == "cudnn":
            raise ValueError("attention='cudnn' picks its own tiles: leave "
                             "attention_block_size None")
        infini = getattr(self.config, "infini", None)
        if (self.attention == INFINI) != (infini is not None):
            raise ValueError(
                f"attention={self.attention!r} with a config whose infini is {infini}: an "
                "Infini-attention model (config.infini set, e.g. an lctx_infini checkpoint) "
                "runs with attention='infini' only, and attention='infini' needs the settings: "
                "from_hf(path, attention='infini', infini={'segment_len': 2048})")
        if infini is not None and self.mesh is not None and self.mesh.shape.get(
                sharding.SEQUENCE_AXIS, 1) > 1:
            raise ValueError("Infini-attention runs its segments in order: it cannot split a "
                             "sequence over the mesh axis 'sequence'; use sequence=1 (split "
                             "batch, fsdp and tensor instead)")
        if self.lora is not None and not set(self.lora.targets) <= set(
                self.family.lora_targets):
            raise ValueError(f"LoRA targets {self.lora.targets} are not all projections of "
                             f"the {self.family.name} family; choose from "
                             f"{', '.join(self.family.lora_targets)}")

    @property
    def family(self) -> models.Family:
        return models.family_of(self.config)

    def module(self, param_dtype: Any) -> Any:
        """The family's decoder module for parameters of `param_dtype`."""
        return self.family.decoder(self.config, self.dtype, param_dtype, self.attention,
                                   self.remat, self.mesh,
                                   self.lora.scale if self.lora is not None else 0.0)

    def init_params(self, rng: jax.Array, param_dtype: Any = jnp.float32) -> Any:
        """Randomly initialised parameters (on a mesh created already split by the rules)."""
        module = self._init_module(param_dtype)
        ids = jnp.zeros((1, 1), jnp.int32)

        def init(rng: jax.Array) -> Any:
            return module.init(rng, ids, _context(ids))["params"]

        out_shardings = None
        if self.mesh is not None:
            out_shardings = self.shardings_of(jax.eval_shape(init, rng))
        return jax.jit(init, out_shardings=out_shardings)(rng)

    def abstract_params(self, param_dtype: Any) -> Any:
        """ShapeDtypeStructs of the parameter tree, each carrying the sharding to place it in:
        the rules' on a mesh, else the first device."""
        ids = jnp.zeros((1, 1), jnp.int32)
        shapes = jax.eval_shape(self._init_module(param_dtype).init, jax.random.key(0), ids,
                                _context(ids))["params"]
        if self.mesh is None:
            device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            shardings = jax.tree.map(lambda _: device, shapes)
        else:
            shardings = self.shardings_of(shapes)
        return jax.tree.map(lambda s, target: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                                   sharding=target),
                            shapes, shardings)

    def _init_module(self, param_dtype: Any) -> Any:
        """The decoder that creates the parameters: the config's default attention on one
        token, no mesh (the parameters do not depend on how attention runs)."""
        plain = dataclasses.replace(self, attention=default_attention(self.config),
                                    remat="none", mesh=None, lora=None)
        return plain.module(param_dtype)

    def complete_params(self, params: Any, rng: jax.Array) -> Any:
        """`params` with the leaves this spec's parameter tree has and they lack (e.g. the
        gates Infini-attention adds to a LLaMA checkpoint) freshly initialised, each in the
        dtype of the others; every leaf both have must agree in shape."""
        flat = traverse_util.flatten_dict(params)
        dtype = jax.tree.leaves(params)[0].dtype
        wanted = traverse_util.flatten_dict(self.abstract_params(dtype))
        if set(flat) - set(wanted):
            raise ValueError(f"parameters {sorted('/'.join(p) for p in set(flat) - set(wanted))}"
                             " are not part of this model")
        for path in flat:
            if flat[path].shape != wanted[path].shape:
                raise ValueError(f"parameter {'/'.join(path)} has shape {flat[path].shape}; "
                                 f"this model needs {wanted[path].shape}")
        missing = [path for path in wanted if path not in flat]
        if not missing:
            return params
        module, ids = self._init_module(dtype), jnp.zeros((1, 1), jnp.int32)

        def init(rng: jax.Array) -> list:  # XLA drops the initialisers of the other leaves
            tree = traverse_util.flatten_dict(module.init(rng, ids, _context(ids))["params"])
            return [tree[path] for path in missing]

        shardings = [wanted[path].sharding for path in missing]
        fresh = jax.jit(init, out_shardings=shardings)(rng)
        return traverse_util.unflatten_dict({**flat, **dict(zip(missing, fresh))})

    def shardings_of(self, params_or_shapes: Any) -> Any:
        """NamedSharding tree of a parameter tree (or of an optimizer state mirroring it) by the
        family's sharding rules; None without a mesh."""
        if self.mesh is None:
            return None
        return sharding.param_shardings(params_or_shapes, self.mesh,
                                        self.family.sharding_rules, self.config.head_dim)

    def head(self, params: Any) -> jax.Array:
        """The LM head [H, vocab] of `params` (the embedding's transpose when tied)."""
        return layers.head_kernel(params, self.config.tie_word_embeddings)

    def apply(self, params: Any, input_ids: jax.Array, positions: jax.Array | None = None,
              segment_ids: jax.Array | None = None, rope: RopeArrays | None = None,
              adapters: Any = None, check_ids: bool = False) -> jax.Array:
        """Pure forward: logits f32 [B, T, vocab].

        positions: RoPE positions [B, T] (default arange); an Infini-attention model rotates its
        local path at the index inside each segment instead and does not use them.

        input_ids are not checked (an id outside [0, vocab_size) reads NaN or another row;
        `Model.__call__` checks them on the host): check_ids=True adds a `checkify` check
        (`lctx_jax.token_ids.assert_in_vocab`; run under `jax.experimental.checkify`).

        `rope`, a RopeArrays (`lctx_jax.rope.longrope_arrays`), replaces config.rope in every
        layer; as a traced argument it lets one compiled forward try many rotations (the
        LongRoPE search). It needs attention "xla" or "s2".

        `adapters`: LoRA adapters (`lctx_jax.lora.init`) applied inside the layers as
        x W + scale · (x A) B, with scale from `self.lora`; the kernels stay as they are.

        On a mesh, `params` are constrained to the rule shardings, so inside a jitted training
        step their gradients come out split the same way (FSDP / tensor) even without
        out_shardings, instead of being gathered whole on every device.
        """
        return self._run(params, input_ids, positions, segment_ids, rope, adapters, True,
                         check_ids)

    def hidden(self, params: Any, input_ids: jax.Array, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None, rope: RopeArrays | None = None,
               adapters: Any = None, check_ids: bool = False) -> jax.Array:
        """As `apply`, but the final-normed hidden states [B, T, H] before the LM head
        (`head(params)`): what `lctx_jax.losses` consumes."""
        return self._run(params, input_ids, positions, segment_ids, rope, adapters, False,
                         check_ids)

    def _run(self, params: Any, input_ids: jax.Array, positions: jax.Array | None,
             segment_ids: jax.Array | None, rope: RopeArrays | None, adapters: Any,
             logits: bool, check_ids: bool) -> jax.Array:
        if check_ids:
            token_ids.assert_in_vocab(input_ids, self.config.vocab_size)
        if rope is not None:
            if self.config.rope is None:
                raise ValueError(f"rope arrays were passed, but a {self.config.model_type} "
                                 "model has no rotary positions")
            half = self.config.rope.rotary_dim // 2
            if rope.inv_freq.shape != (half,):
                raise ValueError(f"rope arrays have inv_freq of shape {rope.inv_freq.shape}; "
                                 f"this model rotates rotary_dim/2 = {half} frequencies")
        if adapters is not None and self.lora is None:
            raise ValueError("LoRA adapters were passed to a model without a LoraConfig; build "
                             "it with lora=LoraConfig(...)")
        if self.mesh is not None:
            params = jax.lax.with_sharding_constraint(params, self.shardings_of(params))
        if positions is None:
            positions = layers.default_positions(input_ids)
        ctx = layers.Context(positions, segment_ids, None, None, None, rope,
                             block_size=self.attention_block_size)
        variables = {"params": params} if adapters is None else {"params": params,
                                                                 "lora": adapters}
        param_dtype = jax.tree.leaves(params)[0].dtype
        return self.module(param_dtype).apply(variables, input_ids, ctx, logits=logits)[0]


def default_attention(config: Any) -> str:
    """The attention a config runs with unless told otherwise: "infini" for an
    Infini-attention config, else "xla"."""
    return INFINI if getattr(config, "infini", None) is not None else "xla"


def _context(ids: jax.Array) -> layers.Context:
    return layers.Context(layers.default_positions(ids), None, None, None, None)


class Model:
    """A ModelSpec plus its parameters. `model(input_ids)` -> logits f32 [B, T, vocab].

    Model(config, params, dtype=, attention=, remat=, mesh=, lora=) takes the ModelSpec's
    fields; `model.spec` and `model.params` are the two halves. With a mesh, `model(ids)` runs
    as one jit whose inputs are placed by the rules and the activation spec and whose logits
    come back split over batch and sequence (and vocabulary over "tensor").
    """

    def __init__(self, config: Any, params: Any, dtype: Any = jnp.float32,
                 attention: str | None = None, remat: str = "none", mesh: Any = None,
                 lora: LoraConfig | None = None, attention_block_size: int | None = None
                 ) -> None:
        self.spec = ModelSpec(config, dtype, attention, remat, mesh, lora, attention_block_size)
        self.params = params

    @classmethod
    def of(cls, spec: ModelSpec, params: Any) -> "Model":
        return cls(**{f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)},
                   params=params)

    @classmethod
    def init(cls, config: Any, rng: jax.Array, dtype: Any = jnp.float32,
             param_dtype: Any = jnp.float32, **kwargs: Any) -> "Model":
        """A randomly initialised model (the family's initialisation: LLaMA's normal(0.02)
        weights and unit norms, MEGALODON's released one); with mesh= in kwargs the
        parameters are created already split by the sharding rules."""
        spec = ModelSpec(config, dtype, **kwargs)
        return cls.of(spec, spec.init_params(rng, param_dtype))

    def replace(self, **changes: Any) -> "Model":
        """The same parameters under a spec with `changes` (e.g. attention="xla")."""
        return Model.of(dataclasses.replace(self.spec, **changes), self.params)

    config = property(lambda self: self.spec.config)
    dtype = property(lambda self: self.spec.dtype)
    attention = property(lambda self: self.spec.attention)
    remat = property(lambda self: self.spec.remat)
    mesh = property(lambda self: self.spec.mesh)
    lora = property(lambda self: self.spec.lora)
    attention_block_size = property(lambda self: self.spec.attention_block_size)
    family = property(lambda self: self.spec.family)

    @property
    def param_dtype(self) -> Any:
        return jax.tree.leaves(self.params)[0].dtype

    @property
    def module(self) -> Any:
        return self.spec.module(self.param_dtype)

    @property
    def param_shardings(self) -> Any:
        """NamedSharding tree of the parameters by the sharding rules (None without a mesh)."""
        return self.spec.shardings_of(self.params)

    def apply(self, params: Any, *args: Any, **kwargs: Any) -> jax.Array:
        return self.spec.apply(params, *args, **kwargs)

    apply.__doc__ = ModelSpec.apply.__doc__

    def hidden(self, params: Any, *args: Any, **kwargs: Any) -> jax.Array:
        return self.spec.hidden(params, *args, **kwargs)

    hidden.__doc__ = ModelSpec.hidden.__doc__

    def head(self, params: Any) -> jax.Array:
        return self.spec.head(params)

    @functools.cached_property
    def _forward(self) -> Any:
        return jax.jit(self.spec.apply)

    @functools.cached_property
    def _sharded_forwards(self) -> dict:
        return {}

    def __call__(self, input_ids: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        input_ids = token_ids.check(input_ids, self.config.vocab_size)
        positions = token_ids.check_aligned(positions, input_ids.shape, "positions")
        segment_ids = token_ids.check_aligned(segment_ids, input_ids.shape, "segment_ids")
        if self.mesh is None:
            return self._forward(self.params, jnp.asarray(input_ids), positions, segment_ids)
        # On a mesh: one jit per input shape with explicit in_shardings (params by the rules,
        # [B, T] inputs by the activation spec) and out_shardings (logits split over batch and
        # sequence). Inputs are placed first: host arrays go shard by shard, device arrays are
        # resharded, and parameters already placed by the rules are not copied.
        args = [None if x is None else x.astype(jnp.int32) if isinstance(x, jax.Array)
                else np.asarray(x, np.int32) for x in (input_ids, positions, segment_ids)]
        shape = args[0].shape
        specs = [None if x is None else sharding.activation_sharding(self.mesh, x.shape)
                 for x in args]
        key = tuple(None if x is None else x.shape for x in args)
        if key not in self._sharded_forwards:
            logits = sharding.activation_sharding(self.mesh, (*shape, self.config.vocab_size),
                                                  sharding.TENSOR_AXIS)
            self._sharded_forwards[key] = jax.jit(
                self.spec.apply, in_shardings=(self.param_shardings, *specs),
                out_shardings=logits)
        params = jax.device_put(self.params, self.param_shardings)
        args = [None if x is None else jax.device_put(x, s) for x, s in zip(args, specs)]
        return self._sharded_forwards[key](params, *args)
