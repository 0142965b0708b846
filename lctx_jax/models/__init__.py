"""Model families: what each architecture brings, and the registry from config.json's
`model_type` to its family.

A family is one module (e.g. ./llama.py) exposing a `Family`; one registry line below makes
every entry point (from_hf / to_hf, save / load, generate, sharding, LoRA, training,
evaluation) handle it. The rest of the library reaches architecture-specific facts only
through the family of a config (`family_of(config)`), never through a family's own names.

Contract of the decoder module (`Family.decoder`): a linen Module built as
`decoder(config, dtype, param_dtype, attention, remat, mesh, lora_scale)` and called as
`decoder(input_ids [B, T], ctx: layers.Context, state=None, logits=True) -> (out, state)`:
out is f32 logits [B, T, vocab], or with logits=False the final-normed hidden states [B, T, H];
`state` is the decode state of `Family.decode_state` (None: no state, a training/eval call).
Parameter names follow `lctx_jax.layers`' contract (embed/embedding, lm_head/kernel,
*norm/scale, Linear kernels), which LoRA's trainable leaves and the LM head rely on.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Mapping, Protocol

from lctx_jax.rope import RopeConfig
from lctx_jax.sharding import Rules


class Config(Protocol):
    """What every family's config class offers (see models/llama.py's ModelConfig)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    head_dim: int  # the unit of the sharding rules' heads dimensions
    rope: RopeConfig | None  # None: no rotary positions (generation, LongRoPE and
    #                           RopeArrays then do not apply)
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_id: int | tuple[int, ...] | None
    pad_token_id: int | None
    infini: Any  # an InfiniConfig (lctx_jax.attention.infini) or None: plain attention

    def to_hf(self) -> dict[str, Any]: ...

    def with_rope_scaling(self, rope_scaling: Mapping[str, Any] | None) -> "Config": ...


@dataclasses.dataclass(frozen=True)
class Family:
    """One architecture.

    model_types: the config.json model_type values it reads.
    config: its config class; `config.from_hf(hf_dict, rope_scaling=None)` reads config.json.
    decoder: its Flax module (contract in the module docstring).
    hf_layout(config) -> {tensor name: shape} of its transformers checkpoint (shape None: a
        tensor that may be present and is ignored).
    read_hf(reader, config, dtype) -> iterator of (parameter path, numpy array of `dtype`), one
        leaf at a time (`lctx_jax.convert.SafetensorsReader` gives the tensors).
    write_hf(params, config, to_host) -> iterator of (tensor name, numpy array), each brought to
        the host by `to_host` when it is yielded.
    sharding_rules: (path pattern, PartitionSpec, heads dimension or None) rows
        (`lctx_jax.sharding.param_spec`).
    lora_targets: the Linear names LoRA may adapt (under params["layers"]).
    flops_per_token(config, seq_len) -> training FLOPs per token.
    decode_state(config, batch, size, dtype) -> the empty per-layer decode state (stacked
        over layers) for `size` tokens.
    hf_tied_head: (LM head tensor, embedding tensor) names of a tied head that a checkpoint
        may also store (read untied when the two differ, as transformers does), or None.
    prefill_chunk(config) -> the most tokens one decode-state call may feed (`generate`
        prefills a longer prompt in pieces of that size, at multiples of it), or None: any.
    refeeds: whether a decode-state call from slot 0 starts the state afresh, so `generate`
        may feed the whole sequence again (use_cache=False); False for a recurrent state that
        such a call would carry on from.
    """

    name: str
    model_types: tuple[str, ...]
    config: Any
    decoder: Any
    hf_layout: Callable[[Any], dict[str, "tuple[int, ...] | None"]]
    read_hf: Callable[[Any, Any, Any], Iterator[tuple[tuple[str, ...], Any]]]
    write_hf: Callable[[Any, Any, Callable], Iterator[tuple[str, Any]]]
    sharding_rules: Rules
    lora_targets: tuple[str, ...]
    flops_per_token: Callable[[Any, int], float]
    decode_state: Callable[[Any, int, int, Any], Any]
    hf_tied_head: tuple[str, str] | None = None
    prefill_chunk: Callable[[Any], "int | None"] = lambda config: None
    refeeds: bool = True


_REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Makes `family` the one for each of its model_types; returns it. ValueError when a
    model_type already belongs to another family."""
    taken = {t: _REGISTRY[t].name for t in family.model_types
             if t in _REGISTRY and _REGISTRY[t] is not family}
    if taken:
        raise ValueError(f"model_types already registered: {taken}")
    for model_type in family.model_types:
        _REGISTRY[model_type] = family
    return family


def family_for(model_type: Any) -> Family:
    """The family registered for `model_type`; ValueError naming the supported ones."""
    if model_type not in _REGISTRY:
        raise ValueError(f"model_type {model_type!r} is not supported; supported: "
                         f"{', '.join(_REGISTRY)}")
    return _REGISTRY[model_type]


def family_of(config: Config) -> Family:
    """The family of a config object."""
    return family_for(config.model_type)


def config_from_hf(hf: Mapping[str, Any], rope_scaling: Mapping[str, Any] | None = None
                   ) -> Any:
    """The family config of a config.json dict (its model_type picks the family);
    `rope_scaling` puts a context-extension method on it."""
    try:
        family = family_for(hf.get("model_type"))
    except ValueError as err:
        raise ValueError(f"config.json (architectures {hf.get('architectures')}): {err}") from None
    return family.config.from_hf(hf, rope_scaling)


from lctx_jax.models import llama, megalodon  # noqa: E402  (after Family, which they use)

register(llama.FAMILY)
register(megalodon.FAMILY)
