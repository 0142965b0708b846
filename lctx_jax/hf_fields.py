"""Typed reads of Hugging Face config.json fields (and of a rope scaling dict's): each reader
returns the value or raises ValueError naming the field, the value and what it must be, so a
config that transformers would refuse, or that would build a quietly wrong model (a string
where a size goes, eps <= 0, a factor of Infinity, a BOS id past the vocabulary), fails when
it is read.

    heads = integer(hf, "num_attention_heads")                # int >= 1, required
    eps = number(hf, "rms_norm_eps", 1e-6, above=0.0)         # finite float > 0
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

REQUIRED = object()  # the default of a field that has none


def _given(fields: Mapping[str, Any], key: str, default: Any, where: str) -> bool:
    """Whether fields[key] is set (not absent, not null); a required field must be."""
    if fields.get(key) is not None:
        return True
    if default is REQUIRED:
        raise ValueError(f"{where} lacks the field {key!r}")
    return False


def integer(fields: Mapping[str, Any], key: str, default: Any = REQUIRED, *, minimum: int = 1,
            where: str = "config.json") -> Any:
    """fields[key] as an int >= minimum (an integral float such as 8192.0 counts); `default`
    when absent or null."""
    if not _given(fields, key, default, where):
        return default
    value = fields[key]
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        value = int(value)  # 8192.0: what transformers accepts too
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{where}: {key}={value!r} must be an integer (a JSON number without "
                         "a fraction)")
    if value < minimum:
        raise ValueError(f"{where}: {key}={value} must be >= {minimum}")
    return int(value)


def number(fields: Mapping[str, Any], key: str, default: Any = REQUIRED, *,
           above: float | None = None, at_least: float | None = None,
           where: str = "config.json") -> Any:
    """fields[key] as a finite float, > above and >= at_least when given; `default` when
    absent or null."""
    if not _given(fields, key, default, where):
        return default
    return finite(fields[key], key, above=above, at_least=at_least, where=where)


def finite(value: Any, key: str, *, above: float | None = None,
           at_least: float | None = None, where: str = "config.json") -> float:
    """`value` as a finite float (bounds as in `number`); the message names `key`."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{where}: {key}={value!r} must be a number")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{where}: {key}={value} must be a finite number")
    if above is not None and not value > above:
        raise ValueError(f"{where}: {key}={value} must be > {above}")
    if at_least is not None and not value >= at_least:
        raise ValueError(f"{where}: {key}={value} must be >= {at_least}")
    return value


def flag(fields: Mapping[str, Any], key: str, default: bool = False,
         where: str = "config.json") -> bool:
    """fields[key] as a bool (JSON true / false); `default` when absent or null."""
    if not _given(fields, key, default, where):
        return default
    value = fields[key]
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{where}: {key}={value!r} must be true or false")
    return bool(value)


def token_id(fields: Mapping[str, Any], key: str, vocab_size: int, *, many: bool = False,
             where: str = "config.json") -> Any:
    """fields[key] as a token id in [0, vocab_size), None when absent; with many=True a list
    of them becomes a tuple (eos_token_id may name several)."""
    value = fields.get(key)
    if value is None:
        return None
    if many and isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{where}: {key}=[] names no token; use null or a list of ids")
        return tuple(token_id({key: v}, key, vocab_size, where=where) for v in value)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{where}: {key}={value!r} must be an integer token id"
                         + (" or a list of them" if many else ""))
    if not 0 <= value < vocab_size:
        raise ValueError(f"{where}: {key}={value} is outside the vocabulary [0, vocab_size="
                         f"{vocab_size}); fix the id or vocab_size")
    return int(value)


def check_positive_ints(owner: str, config: Any, names: tuple[str, ...]) -> None:
    """ValueError unless every `config.<name>` is an int >= 1 (the message names
    `owner.<name>`)."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{owner}.{name}={value!r} must be an int >= 1")


def check_special_tokens(owner: str, config: Any) -> None:
    """ValueError unless config.bos_token_id, pad_token_id and every eos_token_id (an int or a
    tuple of them) are None or in [0, config.vocab_size)."""
    eos = config.eos_token_id
    eos = eos if isinstance(eos, tuple) else (eos,)
    for name, token in (("bos_token_id", config.bos_token_id),
                        ("pad_token_id", config.pad_token_id),
                        *(("eos_token_id", t) for t in eos)):
        if token is not None and not 0 <= token < config.vocab_size:
            raise ValueError(f"{owner}.{name}={token} is outside the vocabulary [0, "
                             f"{config.vocab_size})")
