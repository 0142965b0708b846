"""LoRA+ (LongLoRA, Chen et al. 2023 §3.3): low-rank adapters plus trainable embeddings and norms.

LoRA (Hu et al. 2021) freezes a kernel W [in, out] and learns W' = W + (alpha / rank) · A B
with A [in, r], B [r, out]. LongLoRA adds that, for long-context fine-tuning, the embedding and
every norm must be trained too ("LoRA+"); lm_head stays frozen.

Targets are the family's projection names (`lctx_jax.models.Family.lora_targets`; LLaMA's q, k,
v, o, gate, up, down). The adapters are a tree of their own,
    {"layers": {name: {"a": [L, in, r], "b": [L, r, out]}}}
(L layers, stacked like the model's `params["layers"]`). In training they are applied inside
the layers: `Model(config, params, lora=cfg).apply(params, ids, adapters=adapters)` computes
x W + scale · (x A) B per target (`lctx_jax.layers.Linear`), so no merged copy of a frozen
kernel is formed and no gradient of W is computed. `merge` folds them into the kernels for
export and between training stages (`lctx_jax.to_hf(Model(config, merge(...)), dir)`).

`trainable_mask` / `split` / `combine` partition the parameters into the trained leaves and the
frozen rest, so an optimizer is built over (trainable, lora) only and frozen weights get neither
gradients nor optimizer state:

    trainable, frozen = split(params, trainable_mask(params, cfg))
    loss(trainable, lora) = lm_loss(model.apply(combine(trainable, frozen), …, adapters=lora))
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from lctx_jax.attention import infini

TRAINABLE = ("embed", "norm", "lm_head")

Tree = Any


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank r and alpha (update scale alpha / r) of the adapters on `targets`; `trainable`: which
    base weights train besides them ("embed", "norm": every norm's scale, weight and bias,
    "lm_head").
    Defaults: LongLoRA's r = 8, alpha = 16 on q, k, v, o with embeddings and norms trained."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q", "k", "v", "o")
    trainable: tuple[str, ...] = ("embed", "norm")

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoraConfig.rank must be an int >= 1, got {self.rank!r}")
        if (isinstance(self.targets, str) or not self.targets
                or not all(isinstance(t, str) for t in self.targets)):
            raise ValueError(f"LoraConfig.targets must be a non-empty tuple of projection "
                             f"names (the model family's lora_targets, e.g. q, k, v, o); got "
                             f"{self.targets!r}")
        if isinstance(self.trainable, str) or not set(self.trainable) <= set(TRAINABLE):
            raise ValueError(f"LoraConfig.trainable must be a tuple of names from "
                             f"{', '.join(TRAINABLE)}; got {self.trainable!r}")

    @property
    def scale(self) -> float:
        """alpha / rank, the factor on A B."""
        return self.alpha / self.rank


def init(params: Tree, config: LoraConfig, rng: jax.Array) -> Tree:
    """Adapters for `params` (a model's parameter tree): per target, A [L, in, r] ~
    uniform(±1/sqrt(in)) (PEFT's kaiming_uniform(a=√5) bound) and B [L, r, out] = 0, f32, so
    the merged model equals the base at init."""
    layers = params["layers"]
    missing = [name for name in config.targets if "kernel" not in layers.get(name, {})]
    if missing:
        raise ValueError(f"LoRA targets {missing} are not projections of this model; it has "
                         f"{', '.join(n for n in layers if 'kernel' in layers[n])}")
    lora = {}
    for name, key in zip(config.targets, jax.random.split(rng, len(config.targets))):
        num_layers, fan_in, fan_out = layers[name]["kernel"].shape
        bound = 1.0 / math.sqrt(fan_in)
        lora[name] = {
            "a": jax.random.uniform(key, (num_layers, fan_in, config.rank), jnp.float32,
                                    -bound, bound),
            "b": jnp.zeros((num_layers, config.rank, fan_out), jnp.float32),
        }
    return {"layers": lora}


def merge(params: Tree, lora: Tree, config: LoraConfig) -> Tree:
    """params with each target kernel W [L, in, out] replaced by W + scale · A B, summed in f32
    and cast to W's dtype; every other leaf is the same object. Pure: jit- and grad-friendly."""
    layers = dict(params["layers"])
    for name, adapter in lora["layers"].items():
        kernel = layers[name]["kernel"]
        update = jnp.einsum("lir,lro->lio", adapter["a"], adapter["b"],
                            preferred_element_type=jnp.float32)
        merged = kernel.astype(jnp.float32) + config.scale * update
        layers[name] = {**layers[name], "kernel": merged.astype(kernel.dtype)}
    return {**params, "layers": layers}


ALWAYS_TRAINED = (infini.GATE,)  # leaves a checkpoint never has: Infini-attention's gates


def trainable_mask(params: Tree, config: LoraConfig | None) -> Tree:
    """bool tree shaped like params: True for the base weights that train. With LoRA, those
    `config.trainable` names ("embed" → embed/embedding, "norm" → every norm's scale, weight
    and bias, "lm_head" → lm_head/kernel, absent with tied embeddings) and the ALWAYS_TRAINED
    leaves; with None (full fine-tuning), all."""
    flat = traverse_util.flatten_dict(params)
    if config is None:
        return traverse_util.unflatten_dict({path: True for path in flat})
    return traverse_util.unflatten_dict({
        path: _kind(path) in config.trainable or path[-1] in ALWAYS_TRAINED for path in flat})


def _kind(path: tuple[str, ...]) -> str | None:
    """Which `LoraConfig.trainable` name selects the leaf at `path`, if any."""
    if path == ("embed", "embedding"):
        return "embed"
    if len(path) > 1 and path[-1] in ("scale", "weight", "bias") and path[-2].endswith("norm"):
        return "norm"
    if path == ("lm_head", "kernel"):
        return "lm_head"
    return None


def split(params: Tree, mask: Tree) -> tuple[Tree, Tree]:
    """(trainable, frozen): the leaves of nested-dict `params` where `mask` is True, and the
    rest, each a nested dict with only its own leaves."""
    flat, flat_mask = traverse_util.flatten_dict(params), traverse_util.flatten_dict(mask)
    if flat.keys() != flat_mask.keys():
        raise ValueError("mask must have the same leaves as params; build it with "
                         "trainable_mask(params, config)")
    return tuple(traverse_util.unflatten_dict(
        {path: leaf for path, leaf in flat.items() if flat_mask[path] == wanted})
        for wanted in (True, False))


def combine(trainable: Tree, frozen: Tree) -> Tree:
    """The inverse of `split`: one nested dict with the leaves of both."""
    return traverse_util.unflatten_dict({**traverse_util.flatten_dict(frozen),
                                         **traverse_util.flatten_dict(trainable)})


def num_params(tree: Tree) -> int:
    """Number of scalars in all leaves of `tree`."""
    return sum(leaf.size for leaf in jax.tree_util.tree_leaves(tree))
