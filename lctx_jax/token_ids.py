"""Token ids checked where they enter from the host.

An embedding lookup does not check its ids: on XLA an id >= vocab_size reads NaN (turning the
logits of its whole row into NaN through attention), a negative id wraps around to the end of
the table, and a float id is truncated. So every host entry point (`Model.__call__`,
`next_token_nll`, `generate`, the evaluation functions) passes its ids through `check` first;
the pure `ModelSpec.apply` does not (it runs inside jit), and with `check_ids=True` adds
`assert_in_vocab`, a `jax.experimental.checkify` check, for research code that wants the
check under jit.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify


def _first_outside(ids: Any, vocab_size: Any, xp: Any = jnp) -> tuple[Any, Any, Any]:
    """(whether any id is outside [0, vocab_size), the flat index of the first, its value),
    computed with `xp` (jax.numpy, or numpy for host arrays)."""
    flat = ids.reshape(-1)
    bad = (flat < 0) | (flat >= vocab_size)
    first = xp.argmax(bad)
    return bad.any(), first, flat[first]


_first_outside_jit = jax.jit(_first_outside, static_argnums=2)


def check(ids: Any, vocab_size: int, name: str = "input_ids", ndim: int = 2,
          allow_empty: bool = False) -> Any:
    """`ids` as int32 (a jax.Array stays on its devices, anything else becomes numpy) after
    checking that it is an integer array of `ndim` dimensions, non-empty (unless allow_empty),
    every id in [0, vocab_size). ValueError naming the first bad id and its position. Tracers
    (a call under jit) pass unchecked: see `assert_in_vocab`."""
    if isinstance(ids, jax.core.Tracer):
        return ids.astype(jnp.int32)
    array = ids if isinstance(ids, jax.Array) else np.asarray(ids)
    if allow_empty and not array.size:
        array = array.astype(np.int32)
    if not (np.issubdtype(array.dtype, np.integer) and array.dtype != np.bool_):
        raise ValueError(f"{name} must hold integer token ids, got dtype {array.dtype}")
    if array.ndim != ndim:
        layout = "[B, T]" if ndim == 2 else f"{ndim}-D"
        raise ValueError(f"{name} must be {layout}, got shape {array.shape}")
    if not array.size:
        if allow_empty:
            return array
        raise ValueError(f"{name} is empty (shape {array.shape}): give at least one token")
    if isinstance(array, np.ndarray):
        any_bad, first, value = _first_outside(array, vocab_size, np)
    else:
        found = _first_outside_jit(array, jnp.int32(vocab_size), jnp)
        if isinstance(found[0], jax.core.Tracer):  # called while an outer function is traced
            return array.astype(jnp.int32)
        any_bad, first, value = jax.device_get(found)
    if any_bad:
        where = np.unravel_index(int(first), array.shape)
        raise ValueError(f"{name}[{', '.join(map(str, where))}] = {int(value)} is outside the "
                         f"vocabulary [0, {vocab_size}): the tokenizer and the model do not "
                         "match, or the ids are not token ids")
    return array.astype(np.int32) if isinstance(array, np.ndarray) else array.astype(jnp.int32)


def check_aligned(values: Any, shape: tuple[int, ...], name: str) -> Any:
    """`values` (positions or segment ids for ids of `shape`; None passes) as int32 after
    checking that it is an integer array of that shape: float positions would be truncated,
    a wrong length misplaced."""
    if values is None or isinstance(values, jax.core.Tracer):
        return values
    array = values if isinstance(values, jax.Array) else np.asarray(values)
    if not (np.issubdtype(array.dtype, np.integer) and array.dtype != np.bool_):
        raise ValueError(f"{name} must be integers, got dtype {array.dtype}")
    if array.shape != tuple(shape):
        raise ValueError(f"{name} has shape {array.shape}; it needs input_ids' {tuple(shape)}")
    return array.astype(np.int32) if isinstance(array, np.ndarray) else array.astype(jnp.int32)


def assert_in_vocab(ids: jax.Array, vocab_size: int) -> None:
    """A checkify check that every id is in [0, vocab_size): run the function that calls it
    under `jax.experimental.checkify.checkify` (then `err.throw()`)."""
    any_bad, first, value = _first_outside(ids, vocab_size)
    checkify.check(~any_bad, "input_ids holds {value} at flat index {index}, outside the "
                   f"vocabulary [0, {vocab_size})", value=value, index=first)
