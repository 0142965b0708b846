"""Per-array checksums of a pytree, computed on device, for checkpoint integrity.

    sums = checksums(params)                  # {"layers/q/kernel": "3f0c...", ...}
    verify(restored, sums, "/ckpt/step_100")  # ValueError naming every array that differs

Each leaf's bits are read as uint32 words (bf16 / f16 / int16 widened from uint16, 1-byte
types from uint8, 8-byte types as two words each) and reduced with wrap-around uint32
arithmetic to two words: the plain sum, and the sum weighted by an odd hash of each word's
flat index. Any single changed word changes the plain sum (its change is non-zero mod 2^32);
the weighted sum catches moved or swapped words (all but about 2^-32 of them). Integer sums are
exact and associative, so the result depends only on the array's values, not on the mesh it is
sharded over or the number of hosts: one jit over the whole tree, each device reducing its own
shard. This detects corruption (flipped bits, damaged files), not tampering: it is no
cryptographic hash.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import multihost_utils

ALGORITHM = "lctx_jax.checksums/1"  # uint32 sum + hashed-index weighted sum, 16 hex digits


def _words(x: jax.Array) -> jax.Array:
    """x's bits as uint32 words: the same shape, plus a trailing axis of 2 for 8-byte types."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if jnp.iscomplexobj(x):
        x = jnp.stack([x.real, x.imag], axis=-1)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    if x.dtype != unsigned:
        x = lax.bitcast_convert_type(x, unsigned)  # 8 bytes -> [..., 2] uint32
    return x.astype(jnp.uint32)


def _index_weights(shape: tuple[int, ...]) -> jax.Array:
    """An odd uint32 weight per element: a hash (Wellons' lowbias32) of its flat row-major
    index, built from per-axis iotas so that a sharded array needs no reshape."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(
            stride % 2**32)
        stride *= shape[axis]
    index ^= index >> 16
    index *= jnp.uint32(0x7FEB352D)
    index ^= index >> 15
    index *= jnp.uint32(0x846CA68B)
    index ^= index >> 16
    return index | jnp.uint32(1)


@jax.jit
def _digests(leaves: list[Any]) -> jax.Array:
    """[leaves, 2] uint32: (sum, weighted sum) of each leaf's words."""
    rows = []
    for leaf in leaves:
        words = _words(jnp.asarray(leaf))
        rows.append(jnp.stack([jnp.sum(words, dtype=jnp.uint32),
                               jnp.sum(words * _index_weights(words.shape), dtype=jnp.uint32)]))
    return jnp.stack(rows)


def checksums(tree: Any) -> dict[str, str]:
    """{leaf path ("layers/q/kernel", keys joined by "/"): 16 hex digits} for every array leaf
    of `tree`. Every process of a multi-host run must call it (the reduction is collective);
    each gets the whole dict."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    if not flat:
        return {}
    out = _digests([leaf for _, leaf in flat])
    if not out.is_fully_replicated and not out.is_fully_addressable:
        out = multihost_utils.process_allgather(out, tiled=True)
    values = np.asarray(out)
    return {jax.tree_util.keystr(path, simple=True, separator="/"): f"{s:08x}{w:08x}"
            for (path, _), (s, w) in zip(flat, values.tolist())}


def verify(tree: Any, expected: dict[str, str], where: str, advice: str = "") -> None:
    """Raises ValueError when an array of `tree` does not have its checksum in `expected` (or
    is in only one of them), naming the arrays and `where` (the checkpoint they were read
    from), then `advice` (what to do)."""
    actual = checksums(tree)
    bad = [path for path in expected if actual.get(path, "missing") != expected[path]]
    bad += [path for path in actual if path not in expected]
    if not bad:
        return
    shown = ", ".join(bad[:5]) + (f" (and {len(bad) - 5} more)" if len(bad) > 5 else "")
    first = bad[0]
    detail = f"saved {expected.get(first, 'none')}, read {actual.get(first, 'none')}"
    what = ("array {} does not match its saved checksum" if len(bad) == 1 else
            "arrays {} do not match their saved checksums").format(shown)
    raise ValueError(f"{where} is corrupt: {what} ({first}: {detail})"
                     + (f"; {advice}" if advice else ""))
