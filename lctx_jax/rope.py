"""Rotary position embeddings and the context-extension methods built on them.

Pure functions over arrays (no Flax), usable in any JAX code and under `jax.jit`.
Numbers equal Hugging Face transformers' rope init functions: every f32 operation is done in
the same order, so inverse frequencies agree bit for bit except where torch's own f32 `pow` is
an ulp off (within 4 ulp then; tests/test_rope.py states the bounds).

Notation (the papers cited per method below): d = rotary dim, b = rope_theta, θ_j = b^(−2j/d),
s = factor, L = original_max_position_embeddings, M = max_position_embeddings. A method put on
a checkpoint extends it to M = L·s (dynamic NTK: M = L; `RopeConfig.from_hf`).

Methods (`rope_type`):
  default   θ
  linear    Position Interpolation (Chen et al. 2023): θ / s
  ntk       static NTK-aware base: b' = b·s^(d/(d−2))
  dynamic   dynamic NTK: b' = b·(s·n/M − (s−1))^(d/(d−2)), n = max(seq_len, M)
  yarn      YaRN (Peng et al. 2023): ramp between θ/s and θ, attention factor 0.1·ln s + 1
  longrope  LongRoPE (Ding et al. 2024) / Phi-3 "su": θ / λ_j with short or long λ chosen by
            seq_len vs L, attention factor sqrt(1 + ln s / ln L); optional kept start tokens
  llama3    Llama 3.1: θ/s for long wavelengths, θ for short, smooth in between

`RopeArrays` holds a rotation as runtime arrays instead (jit traces it, so new frequencies do
not recompile); `longrope_arrays` builds one for LongRoPE factors (see lctx_jax.longrope_search).
`rotate_qk` rotates attention's queries and keys with one sequence length for both.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lctx_jax import hf_fields as fields

ROPE_TYPES = ("default", "linear", "ntk", "dynamic", "yarn", "longrope", "llama3")

# Keys each method reads from the scaling dict, beyond rope_type/type, rope_theta and
# partial_rotary_factor (which every method accepts).
_METHOD_KEYS = {
    "default": set(),
    "linear": {"factor"},
    "ntk": {"factor"},
    "dynamic": {"factor"},
    "yarn": {"factor", "original_max_position_embeddings", "attention_factor", "beta_fast",
             "beta_slow", "mscale", "mscale_all_dim", "truncate"},
    "longrope": {"factor", "original_max_position_embeddings", "attention_factor",
                 "short_factor", "long_factor"},
    "llama3": {"factor", "original_max_position_embeddings", "low_freq_factor",
               "high_freq_factor"},
}
# start_tokens is read for every type so that putting it on a non-longrope type is an error.
_COMMON_KEYS = {"rope_type", "type", "rope_theta", "partial_rotary_factor", "start_tokens"}
_FACTOR_REQUIRED = {"linear", "ntk", "dynamic", "llama3"}
# Every type but "default" reads the original length L. Only yarn, longrope and llama3 write it
# into the scaling dict, where transformers requires it; for linear and dynamic transformers
# logs it as an unrecognized key. config.json keeps L at the top level for every type.
_ORIGINAL = "original_max_position_embeddings"
_ORIGINAL_REQUIRED = {"yarn", "longrope", "llama3"}


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Everything that fixes a model's rotary embedding. Hashable: pass it as a static jit arg.

    Build it with `RopeConfig.from_hf(config_dict)`; `to_hf()` gives the scaling dict back.
    """

    rope_type: str = "default"
    theta: float = 10000.0
    head_dim: int = 128
    rotary_dim: int = 128
    max_position_embeddings: int = 2048  # M: the context the model is for (see `from_hf`)
    factor: float = 1.0
    original_max_position_embeddings: int | None = None  # L: the context a method extends
    attention_factor: float | None = None  # given explicitly (yarn, longrope); None: derived
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    start_tokens: int = 0  # LongRoPE's kept start tokens n̂: positions < n̂ use unscaled θ

    def __post_init__(self) -> None:
        _validate(self)

    @classmethod
    def from_hf(cls, config: Mapping[str, Any] | Any,
                rope_scaling: Mapping[str, Any] | None = None) -> "RopeConfig":
        """Reads a Hugging Face config (dict of config.json, or a transformers config object).

        Accepts the new layout (`rope_parameters` with `rope_type`, `rope_theta` inside) and the
        old one (`rope_scaling` with `type` or `rope_type`, top-level `rope_theta`).
        `rope_scaling`, when given, replaces the config's scaling dict (a context-extension
        method put on any checkpoint); rope_theta and partial_rotary_factor still fall back to
        the config's. The method then extends L (its original_max_position_embeddings, else
        the config's, else the config's max_position_embeddings) to M = round(L·s), as
        published YaRN, Llama 3.1 and Phi-3 checkpoints state it; "dynamic" keeps M = L
        (transformers reads dynamic NTK's M as its original length).
        """
        return _from_hf(_as_dict(config), rope_scaling)

    def to_hf(self) -> dict[str, Any]:
        """The `rope_parameters` dict transformers reads back to the same frequencies.

        "ntk" is not a transformers type; it is written as "default" with the scaled base, which
        is the same rotation. `start_tokens` is ours; transformers ignores it. L is in the dict
        for yarn, longrope and llama3 only (transformers requires it there and flags it
        elsewhere); config.json holds M and L at the top level (the model config's `to_hf`).
        """
        out: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.theta}
        if self.rotary_dim != self.head_dim:
            out["partial_rotary_factor"] = self.rotary_dim / self.head_dim
        if self.rope_type == "ntk":
            out["rope_type"] = "default"
            out["rope_theta"] = _ntk_base(self.theta, self.factor, self.rotary_dim)
            return out
        for key in sorted(_METHOD_KEYS[self.rope_type]):
            value = getattr(self, key)
            if value is not None:
                out[key] = list(value) if isinstance(value, tuple) else value
        if self.start_tokens:
            out["start_tokens"] = self.start_tokens
        return out


# ----------------------------------------------------------------------------- parsing


def _as_dict(config: Mapping[str, Any] | Any) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise TypeError(f"RopeConfig.from_hf expects a config dict or a transformers config, "
                    f"got {type(config).__name__}")


def _from_hf(config: dict[str, Any], override: Mapping[str, Any] | None) -> RopeConfig:
    own = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(own, Mapping):
        raise ValueError(f"rope_parameters / rope_scaling must be a dict, got {own!r}")
    params = dict(override) if override is not None else dict(own)

    def canonical(name: Any) -> Any:
        if name == "su":  # Phi-3's early name for LongRoPE
            return "longrope"
        if override is None and config.get("model_type") == "phi3" and name == "yarn":
            return "longrope"  # transformers reads Phi-3's legacy "yarn" as longrope too
        return name

    named = {key: canonical(params[key]) for key in ("rope_type", "type")
             if params.get(key) is not None}
    if len(set(named.values())) > 1:
        raise ValueError(f"the rope scaling dict names two methods, rope_type="
                         f"{params['rope_type']!r} and type={params['type']!r}; keep one "
                         "(rope_type; type is the older name of the same key)")
    rope_type = next(iter(named.values()), "default")
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_type {rope_type!r} is unknown; use one of {', '.join(ROPE_TYPES)}")

    unknown = set(params) - _COMMON_KEYS - _METHOD_KEYS[rope_type] - (
        set() if rope_type == "default" else {_ORIGINAL})
    if unknown:
        warnings.warn(f"rope {rope_type!r} ignores keys {sorted(unknown)}", stacklevel=3)

    def pick(key: str, default: Any = None) -> Any:
        for source in (params, own, config):
            if source.get(key) is not None:
                return source[key]
        return default

    theta = fields.finite(pick("rope_theta", 10000.0), "rope_theta", above=0.0)
    partial = fields.finite(pick("partial_rotary_factor", 1.0), "partial_rotary_factor",
                            above=0.0)
    head_dim = fields.integer(config, "head_dim", None)
    if head_dim is None:
        if not config.get("hidden_size") or not config.get("num_attention_heads"):
            raise ValueError("config needs head_dim, or hidden_size and num_attention_heads")
        head_dim = (fields.integer(config, "hidden_size")
                    // fields.integer(config, "num_attention_heads"))
    max_pos = fields.integer(config, "max_position_embeddings", None)
    scaling = "the rope scaling dict"

    kwargs: dict[str, Any] = {}
    extending = override is not None and rope_type != "default"
    if rope_type != "default":
        # Phi-3 keeps the pretraining length at the top level; transformers lets it win over
        # the scaling dict. An explicit override still wins over both.
        given = [fields.integer(source, _ORIGINAL, None, where=where) for source, where in
                 ((override or {}, scaling), (config, "config.json"), (own, scaling))]
        orig = next((value for value in given if value is not None),
                    max_pos if extending or rope_type in _ORIGINAL_REQUIRED else None)
        if orig is None and rope_type in _ORIGINAL_REQUIRED:
            raise ValueError(f"rope {rope_type!r} needs original_max_position_embeddings "
                             "(or max_position_embeddings) in the config")
        kwargs[_ORIGINAL] = orig
    if rope_type in ("dynamic",) or (rope_type in ("yarn", "longrope") and
                                     params.get("factor") is None):
        if max_pos is None:
            raise ValueError(f"rope {rope_type!r} needs max_position_embeddings in the config")

    factor = (fields.number(params, "factor", None, where=scaling)
              if "factor" in _METHOD_KEYS[rope_type] else None)
    if factor is None:
        if rope_type in _FACTOR_REQUIRED:
            raise ValueError(f"rope {rope_type!r} needs the key 'factor' (the context "
                             "extension ratio, e.g. 4.0)")
        if rope_type in ("yarn", "longrope"):
            factor = max_pos / kwargs[_ORIGINAL]
        else:
            factor = 1.0
    kwargs["factor"] = float(factor)
    if extending and kwargs[_ORIGINAL] is not None:
        max_pos = _extended_length(rope_type, kwargs[_ORIGINAL], kwargs["factor"])

    for key in ("attention_factor", "mscale", "mscale_all_dim", "low_freq_factor",
                "high_freq_factor"):
        if key in _METHOD_KEYS[rope_type] and params.get(key) is not None:
            kwargs[key] = fields.number(params, key, where=scaling)
    if rope_type == "yarn":
        # transformers: `get("beta_fast") or 32`, so 0/None fall back to the defaults
        kwargs["beta_fast"] = fields.finite(params.get("beta_fast") or 32, "beta_fast",
                                            where=scaling)
        kwargs["beta_slow"] = fields.finite(params.get("beta_slow") or 1, "beta_slow",
                                            where=scaling)
        kwargs["truncate"] = fields.flag(params, "truncate", True, where=scaling)
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor"):
            if key not in kwargs:
                raise ValueError(f"rope 'llama3' needs the key {key!r} (Meta uses low 1, high 4)")
    if rope_type == "longrope":
        for key in ("short_factor", "long_factor"):
            if params.get(key) is None:
                raise ValueError(f"rope 'longrope' needs the key {key!r}: a list of "
                                 f"rotary_dim/2 = {int(head_dim * partial) // 2} rescale factors")
            if not isinstance(params[key], (list, tuple)):
                raise ValueError(f"{scaling}: {key} must be a list of numbers, got "
                                 f"{params[key]!r}")
            kwargs[key] = tuple(fields.finite(v, f"{key}[{i}]", above=0.0, where=scaling)
                                for i, v in enumerate(params[key]))
    kwargs["start_tokens"] = fields.integer(params, "start_tokens", 0, minimum=0,
                                            where=scaling)

    return RopeConfig(rope_type=rope_type, theta=theta, head_dim=head_dim,
                      rotary_dim=int(head_dim * partial),
                      max_position_embeddings=max_pos or 2048, **kwargs)


def _extended_length(rope_type: str, original: int, factor: float) -> int:
    """M of a model that `rope_type` extends from `original` tokens by `factor`: round(L·s);
    L for "dynamic", whose base formula reads M as the original length."""
    return original if rope_type == "dynamic" else round(original * factor)


def _validate(rope: RopeConfig) -> None:
    if rope.rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_type {rope.rope_type!r} is unknown; "
                         f"use one of {', '.join(ROPE_TYPES)}")
    if not 0 < rope.theta < math.inf:
        raise ValueError(f"rope_theta must be positive and finite, got {rope.theta}")
    numbers = {key: getattr(rope, key) for key in (
        "factor", "attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
        "low_freq_factor", "high_freq_factor")}
    numbers.update({f"{key}[{i}]": v for key in ("short_factor", "long_factor")
                    for i, v in enumerate(getattr(rope, key) or ())})
    for key, value in numbers.items():
        if value is not None and not math.isfinite(value):
            raise ValueError(f"rope {rope.rope_type!r}: {key}={value} must be a finite number")
    if rope.rope_type == "yarn" and not rope.beta_fast > rope.beta_slow:
        raise ValueError(f"rope 'yarn': beta_fast={rope.beta_fast} must be > beta_slow="
                         f"{rope.beta_slow} (the ramp runs from beta_slow to beta_fast "
                         "rotations; the paper uses 32 and 1)")
    if rope.max_position_embeddings < 1:
        raise ValueError(f"max_position_embeddings must be >= 1, got "
                         f"{rope.max_position_embeddings}")
    if rope.head_dim <= 0:
        raise ValueError(f"head_dim must be positive, got {rope.head_dim}")
    if not 0 < rope.rotary_dim <= rope.head_dim or rope.rotary_dim % 2:
        raise ValueError(f"rotary dim = head_dim·partial_rotary_factor must be even and in "
                         f"(0, head_dim={rope.head_dim}], got {rope.rotary_dim}")
    if rope.rope_type != "default" and not rope.factor >= 1.0:
        raise ValueError(f"rope {rope.rope_type!r}: factor must be >= 1 (it is the ratio of "
                         f"new to original context), got {rope.factor}")
    if rope.rope_type == "ntk" and rope.rotary_dim <= 2:
        raise ValueError("rope 'ntk' needs rotary dim > 2 (the exponent is d/(d-2))")
    if rope.rope_type == "llama3":
        low, high = rope.low_freq_factor, rope.high_freq_factor
        if low is None or high is None or not 0 < low < high:
            raise ValueError(f"rope 'llama3': need 0 < low_freq_factor < high_freq_factor, "
                             f"got low_freq_factor={low}, high_freq_factor={high}")
    if rope.rope_type == "longrope":
        half = rope.rotary_dim // 2
        for key in ("short_factor", "long_factor"):
            value = getattr(rope, key)
            if value is None or len(value) != half:
                raise ValueError(f"rope 'longrope': {key} must have rotary_dim/2 = {half} "
                                 f"entries, got {None if value is None else len(value)}")
            if min(value) <= 0:
                raise ValueError(f"rope 'longrope': {key} entries must be positive")
        if rope.start_tokens < 0:
            raise ValueError(f"rope 'longrope': start_tokens must be >= 0, got "
                             f"{rope.start_tokens}")
    elif rope.start_tokens:
        raise ValueError("start_tokens (LongRoPE's kept start tokens) is only defined for "
                         "rope_type 'longrope'")
    if rope.attention_factor is not None and not rope.attention_factor > 0:
        raise ValueError(f"attention_factor must be positive, got {rope.attention_factor}")
    orig = rope.original_max_position_embeddings
    if (orig is None and rope.rope_type in _ORIGINAL_REQUIRED) or (orig is not None and orig < 1):
        raise ValueError(f"rope {rope.rope_type!r} needs a positive "
                         f"original_max_position_embeddings, got {orig}")


# ----------------------------------------------------------------------------- frequencies


def _ntk_base(theta: float, factor: float, dim: int) -> float:
    return theta * factor ** (dim / (dim - 2))


# The frequency math runs in numpy f32 on concrete values: numpy's f32 + − × ÷ are IEEE
# correctly rounded like torch's, while XLA's CPU f32 division is not (it is off by an ulp on
# about a third of `arange(0, 96, 2) / 96`). Only seq_len may be traced; those paths use jnp.


def _exponents(dim: int) -> np.ndarray:
    """2j/d for j = 0..d/2-1, f32 (transformers: arange(0, d, 2).float() / d)."""
    return np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)


def _power(base: float, exponents: np.ndarray) -> np.ndarray:
    """f32(base) ** exponents, correctly rounded to f32."""
    return (np.float64(np.float32(base)) ** exponents.astype(np.float64)).astype(np.float32)


def _default_frequencies(rope: RopeConfig) -> np.ndarray:
    return np.float32(1.0) / _power(rope.theta, _exponents(rope.rotary_dim))


def default_frequencies(rope: RopeConfig) -> jax.Array:
    """θ_j = 1 / b^(2j/d), f32 [rotary_dim // 2]: the unscaled rotary frequencies."""
    return jnp.asarray(_default_frequencies(rope))


def _is_traced(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def frequencies(rope: RopeConfig, seq_len: int | jax.Array | None = None
                ) -> tuple[jax.Array, float]:
    """(inv_freq f32 [rotary_dim // 2], attention_factor) for a sequence of `seq_len` tokens.

    `seq_len` only matters for "dynamic" (n = max(seq_len, M)) and "longrope" (long factors
    when seq_len > L). It may be a traced scalar, so growing inputs do not recompile.
    None means: dynamic at M, longrope short factors (transformers' init-time values).
    """
    kind = rope.rope_type
    if kind == "dynamic":
        return _dynamic_frequencies(rope, seq_len), 1.0
    if kind == "longrope":
        return _longrope_frequencies(rope, seq_len), longrope_attention_factor(rope)
    if kind == "default":
        inv_freq, factor = _default_frequencies(rope), 1.0
    elif kind == "linear":
        inv_freq, factor = _default_frequencies(rope) / np.float32(rope.factor), 1.0
    elif kind == "ntk":
        base = _ntk_base(rope.theta, rope.factor, rope.rotary_dim)
        inv_freq, factor = np.float32(1.0) / _power(base, _exponents(rope.rotary_dim)), 1.0
    elif kind == "yarn":
        inv_freq, factor = _yarn_frequencies(rope), yarn_attention_factor(rope)
    else:
        inv_freq, factor = _llama3_frequencies(rope), 1.0
    return jnp.asarray(inv_freq), factor


def _dynamic_frequencies(rope: RopeConfig, seq_len: int | jax.Array | None) -> jax.Array:
    """Up to M the frequencies are the default ones. Past M, a python int seq_len is folded into
    the base in double precision (transformers' init path), an array, traced or not, in f32
    (transformers' forward path, which recomputes only once seq_len exceeds M)."""
    dim, m, s = rope.rotary_dim, rope.max_position_embeddings, rope.factor
    if seq_len is None or isinstance(seq_len, int):
        n = m if seq_len is None else max(seq_len, m)
        base = rope.theta * ((s * n / m) - (s - 1)) ** (dim / (dim - 2))
        return jnp.asarray(np.float32(1.0) / _power(base, _exponents(dim)))
    n = jnp.asarray(seq_len).astype(jnp.float32)
    base = rope.theta * ((s * n / m) - (s - 1)) ** (dim / (dim - 2))
    grown = base ** -jnp.asarray(_exponents(dim))  # one rounding, no inexact XLA division
    return jnp.where(n > m, grown, _dynamic_frequencies(rope, None))


def yarn_attention_factor(rope: RopeConfig) -> float:
    """YaRN's attention temperature: given, or g(s, mscale) / g(s, mscale_all_dim), or g(s)."""
    if rope.attention_factor is not None:
        return rope.attention_factor

    def g(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if rope.mscale and rope.mscale_all_dim:
        return float(g(rope.factor, rope.mscale) / g(rope.factor, rope.mscale_all_dim))
    return g(rope.factor)


def _yarn_frequencies(rope: RopeConfig) -> np.ndarray:
    dim, base, orig = rope.rotary_dim, rope.theta, rope.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = (np.arange(dim // 2, dtype=np.float32) - low) / np.float32(high - low)
    extrapolation = 1 - np.clip(ramp, 0, 1)
    pos_freqs = _power(base, _exponents(dim))
    return ((1.0 / (np.float32(rope.factor) * pos_freqs)) * (1 - extrapolation)
            + (1.0 / pos_freqs) * extrapolation)


def longrope_attention_factor(rope: RopeConfig) -> float:
    """Given, or sqrt(1 + ln s / ln L) for s > 1, else 1 (LongRoPE / Phi-3)."""
    if rope.attention_factor is not None:
        return rope.attention_factor
    if rope.factor <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(rope.factor) / math.log(rope.original_max_position_embeddings))


def _longrope_inv_freq(rope: RopeConfig, factors: Any) -> np.ndarray:
    """1 / (λ_j · b^(2j/d)), f32 [rotary_dim // 2], for factors λ (transformers' op order)."""
    shape = _power(rope.theta, _exponents(rope.rotary_dim))
    return 1.0 / (np.asarray(factors, np.float32) * shape)


def _longrope_frequencies(rope: RopeConfig, seq_len: int | jax.Array | None) -> jax.Array:
    short = jnp.asarray(_longrope_inv_freq(rope, rope.short_factor))
    long = jnp.asarray(_longrope_inv_freq(rope, rope.long_factor))
    orig = rope.original_max_position_embeddings
    if seq_len is None:
        return short
    if not _is_traced(seq_len):
        return long if int(seq_len) > orig else short
    return jnp.where(seq_len > orig, long, short)


def _llama3_frequencies(rope: RopeConfig) -> np.ndarray:
    inv_freq = _default_frequencies(rope)
    factor, low, high = rope.factor, rope.low_freq_factor, rope.high_freq_factor
    orig = rope.original_max_position_embeddings
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > orig / low, inv_freq / np.float32(factor), inv_freq)
    smooth = (np.float32(orig) / wavelen - np.float32(low)) / np.float32(high - low)
    smoothed = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled
    is_medium = ~(wavelen < np.float32(orig / high)) & ~(wavelen > np.float32(orig / low))
    return np.where(is_medium, smoothed, scaled)


# ----------------------------------------------------------------------------- runtime arrays


@dataclasses.dataclass(frozen=True)
class RopeArrays:
    """A rotation given as arrays instead of a static RopeConfig: a pytree, so jit traces it.

    One compiled function then runs any frequencies (the LongRoPE search tries thousands)
    without recompiling; a RopeConfig is a static argument and recompiles per value. The
    arrays are used as they are at every sequence length (no short/long switch by seq_len).
    Build one with `longrope_arrays`; pass it wherever a RopeConfig goes in `cos_sin`,
    `lctx_jax.attention.attend` (impl "xla", "s2") and `Model.apply(..., rope=)`.
    """

    inv_freq: jax.Array  # f32 [rotary_dim // 2]
    attention_factor: jax.Array  # f32 scalar, folded into cos and sin
    start_tokens: jax.Array  # int32 scalar n̂: positions < n̂ rotate by start_inv_freq, factor 1
    start_inv_freq: jax.Array  # f32 [rotary_dim // 2]


jax.tree_util.register_dataclass(
    RopeArrays, data_fields=["inv_freq", "attention_factor", "start_tokens", "start_inv_freq"],
    meta_fields=[])


def longrope_arrays(rope: RopeConfig, factors: Any, start_tokens: int | jax.Array = 0,
                    attention_factor: float | None = None) -> RopeArrays:
    """LongRoPE (Ding et al. 2024) for rescale factors λ [rotary_dim // 2] as a RopeArrays.

    inv_freq_j = 1 / (λ_j · b^(2j/d)) in the same f32 op order as `frequencies`, so
    `longrope_arrays(rope, rope.long_factor, rope.start_tokens)` rotates exactly as `rope`
    does past its original length. attention_factor defaults to `longrope_attention_factor(rope)`
    (rope must then be a "longrope" config: its factor s and original length L set it).
    Positions below `start_tokens` keep the unscaled θ and factor 1. `factors` must be
    concrete (host values); trace the returned arrays, not the factors.
    """
    half = rope.rotary_dim // 2
    factors = np.asarray(factors, np.float32)
    if factors.shape != (half,):
        raise ValueError(f"longrope factors must have rotary_dim/2 = {half} entries, got shape "
                         f"{factors.shape}")
    if not np.all(factors > 0):
        raise ValueError("longrope factors must be positive")
    if attention_factor is None:
        if rope.rope_type != "longrope":
            raise ValueError(f"longrope_arrays: pass attention_factor, or a 'longrope' RopeConfig "
                             f"(whose factor and original length give it), not "
                             f"{rope.rope_type!r}")
        attention_factor = longrope_attention_factor(rope)
    return RopeArrays(inv_freq=jnp.asarray(_longrope_inv_freq(rope, factors)),
                      attention_factor=jnp.asarray(attention_factor, jnp.float32),
                      start_tokens=jnp.asarray(start_tokens, jnp.int32),
                      start_inv_freq=default_frequencies(rope))


# ----------------------------------------------------------------------------- rotation


def rotation(positions: jax.Array, inv_freq: jax.Array, attention_factor: float | jax.Array,
             *, start_tokens: int | jax.Array = 0, start_inv_freq: jax.Array | None = None,
             dtype: jnp.dtype = jnp.float32) -> tuple[jax.Array, jax.Array]:
    """cos, sin [..., T, 2·len(inv_freq)] for integer positions [..., T].

    angle = position · inv_freq (f32), scaled by the attention factor and repeated over both
    halves (rotate-half layout; the trig runs on one half only). Positions below
    `start_tokens` use `start_inv_freq` and factor 1 (LongRoPE's kept start tokens). This is
    the math every attention implementation shares. start_tokens may be an array (traced);
    a python int 0 skips the kept-token rotation altogether.
    """
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    cos, sin = jnp.cos(angles) * attention_factor, jnp.sin(angles) * attention_factor
    if not (isinstance(start_tokens, int) and start_tokens == 0):
        plain = positions.astype(jnp.float32)[..., None] * start_inv_freq
        kept = (positions < start_tokens)[..., None]
        cos, sin = jnp.where(kept, jnp.cos(plain), cos), jnp.where(kept, jnp.sin(plain), sin)
    cos, sin = cos.astype(dtype), sin.astype(dtype)
    return jnp.concatenate([cos, cos], axis=-1), jnp.concatenate([sin, sin], axis=-1)


def cos_sin(rope: RopeConfig | RopeArrays, positions: jax.Array,
            seq_len: int | jax.Array | None = None, dtype: jnp.dtype = jnp.float32
            ) -> tuple[jax.Array, jax.Array]:
    """cos, sin [..., T, rotary_dim] for integer positions [..., T], attention factor folded in.

    `seq_len` (dynamic, longrope) defaults to max(positions) + 1, as transformers does.
    A RopeArrays is used as it is (seq_len does not apply).
    """
    positions = jnp.asarray(positions)
    if isinstance(rope, RopeArrays):
        return rotation(positions, rope.inv_freq, rope.attention_factor,
                        start_tokens=rope.start_tokens, start_inv_freq=rope.start_inv_freq,
                        dtype=dtype)
    if seq_len is None and rope.rope_type in ("dynamic", "longrope"):
        seq_len = jnp.max(positions) + 1
    inv_freq, factor = frequencies(rope, seq_len)
    start_inv_freq = default_frequencies(rope) if rope.start_tokens else None
    return rotation(positions, inv_freq, factor, start_tokens=rope.start_tokens,
                    start_inv_freq=start_inv_freq, dtype=dtype)


def rotate_half(x: jax.Array) -> jax.Array:
    """concat(−x[d/2:], x[:d/2]) over the last axis."""
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates x [..., T, heads, head_dim] by cos, sin [..., T, rotary_dim] (rotate-half layout).

    With rotary_dim < head_dim (partial rotary) the trailing dims pass through unchanged.
    Computed in x's dtype, as transformers does.
    """
    rotary_dim = cos.shape[-1]
    if rotary_dim > x.shape[-1]:
        raise ValueError(f"cos/sin have rotary dim {rotary_dim} > head_dim {x.shape[-1]}")
    cos = cos[..., None, :].astype(x.dtype)
    sin = sin[..., None, :].astype(x.dtype)
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    rot = rot * cos + rotate_half(rot) * sin
    return jnp.concatenate([rot, rest], axis=-1) if rest.shape[-1] else rot


def rotate_qk(q: jax.Array, k: jax.Array, rope: RopeConfig | RopeArrays, positions: jax.Array,
              kv_positions: jax.Array, *, seq_len: int | jax.Array | None = None
              ) -> tuple[jax.Array, jax.Array]:
    """q [B, T, Hq, D] rotated at positions [B, T], k [B, S, Hkv, D] at kv_positions [B, S].

    Both use one seq_len L, default max(all positions) + 1, so length-dependent frequencies
    (dynamic NTK, LongRoPE's short/long factors) are the same for queries and keys. A RopeArrays
    is used as it is.
    """
    if seq_len is None:
        seq_len = jnp.maximum(jnp.max(positions), jnp.max(kv_positions)) + 1
    q_cos, q_sin = cos_sin(rope, positions, seq_len=seq_len)
    k_cos, k_sin = cos_sin(rope, kv_positions, seq_len=seq_len)
    return apply(q, q_cos, q_sin), apply(k, k_cos, k_sin)
