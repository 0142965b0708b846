"""Per-array checksums of a pytree, computed on device, for checkpoint integrity.

    sums = checksums(params)                  # {"layers/q/kernel": "3f0c...", ...}
    verify(checksums(restored), sums, "/ckpt/step_100")  # ValueError naming arrays that differ
    summarize(state).nonfinite                # the same pass also finds NaN / inf leaves

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

import dataclasses
import functools
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


@functools.partial(jax.jit, static_argnums=1)
def _digests(leaves: list[Any], with_sums: bool) -> jax.Array:
    """[leaves, 3] uint32: (sum, weighted sum) of each leaf's words (0, 0 without with_sums),
    and 1 when every value of the leaf is finite (always for integer leaves), else 0."""
    rows = []
    for leaf in leaves:
        leaf = jnp.asarray(leaf)
        finite = (jnp.isfinite(leaf).all() if jnp.issubdtype(leaf.dtype, jnp.inexact)
                  else jnp.asarray(True))
        sums = [jnp.uint32(0), jnp.uint32(0)]
        if with_sums:
            words = _words(leaf)
            sums = [jnp.sum(words, dtype=jnp.uint32),
                    jnp.sum(words * _index_weights(words.shape), dtype=jnp.uint32)]
        rows.append(jnp.stack([*sums, finite.astype(jnp.uint32)]))
    return jnp.stack(rows)


@dataclasses.dataclass(frozen=True)
class Summary:
    """What one pass over a tree finds: checksums {leaf path: 16 hex digits} and the paths of
    the leaves holding NaN or inf (in tree order)."""
    checksums: dict[str, str]
    nonfinite: list[str]


def summarize(tree: Any, with_checksums: bool = True) -> Summary:
    """Checksums (none without with_checksums: the finite check alone is cheaper) and
    non-finite leaves of every array leaf of `tree` (paths: keys joined by "/", e.g.
    "layers/q/kernel"), in one jit over the tree. Every process of a multi-host run must call
    it (the reduction is collective); each gets the whole answer."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    if not flat:
        return Summary({}, [])
    out = _digests([leaf for _, leaf in flat], with_checksums)
    if not out.is_fully_replicated and not out.is_fully_addressable:
        out = multihost_utils.process_allgather(out, tiled=True)
    values = np.asarray(out).tolist()
    names = [jax.tree_util.keystr(path, simple=True, separator="/") for path, _ in flat]
    sums = ({name: f"{s:08x}{w:08x}" for name, (s, w, _) in zip(names, values)}
            if with_checksums else {})
    return Summary(sums, [name for name, (_, _, finite) in zip(names, values) if not finite])


def checksums(tree: Any) -> dict[str, str]:
    """{leaf path: 16 hex digits} for every array leaf of `tree` (`summarize`)."""
    return summarize(tree).checksums


def verify(actual: dict[str, str], expected: dict[str, str], where: str, advice: str = ""
           ) -> None:
    """Raises ValueError when the checksums `actual` (of the arrays read back) differ from
    `expected` (the manifest) for an array, or an array is in only one of them, naming the
    arrays and `where` (the checkpoint they were read from), then `advice` (what to do)."""
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
