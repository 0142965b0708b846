"""The softmax of attention and its backward, written once for every implementation.

Pure functions over f32 arrays whose last axis is the key axis, so the grouped einsum layouts of
./xla.py and ./ring.py and the 2-D blocks inside the Pallas kernels of ./flash.py all use them
(only jnp/lax ops that Mosaic and Triton lower). Per query row, with the scores s of one block
of keys (−inf where hidden):

    online softmax   m' = max(m, max_k s),   l' = l·e^(m − m') + Σ_k e^(s − m'),
                     acc' = acc·e^(m − m') + e^(s − m')·v
    finish           out = acc / l,   lse = m + log l        (a row that saw no key: out = 0,
                                                              lse = +inf)
    backward         p = e^(s − lse),   dS = scale · p ⊙ (dP − δ),
                     dP = dout·vᵀ,  δ = rowsum(dout ⊙ out)   (FlashAttention-2)

A row with no visible key so far has m = −inf; exponents are then shifted by 0 instead, so its
weights are 0, never NaN, and lse = +inf makes its recomputed p 0 as well. Row statistics
(m, l, lse, δ) keep a trailing axis: size 1 ([..., bq, 1]) where they broadcast against the
blocks, or W lanes holding the same value (the TPU kernels' [bq, 128], as JAX's flash kernel
keeps them), which `widen(x, n)` turns into n columns; acc and out are [..., bq, Dv].
`softmax` is the one-block case for a whole row at once (xla's plain path).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

# (running max m [..., bq, W], denominator l [..., bq, W], accumulator acc [..., bq, Dv]), f32.
Stats = tuple[jax.Array, jax.Array, jax.Array]
# widen(x [..., bq, W], n) -> [..., bq, n] (or anything broadcasting to it); None: x as it is.
Widen = Callable[[jax.Array, int], jax.Array] | None


def scores(products: jax.Array, visible: jax.Array, scale: float) -> jax.Array:
    """scale · q·k, −inf where not visible: f32 [..., bq, bk] from the f32 products q·k and a
    bool mask that broadcasts to them."""
    return jnp.where(visible, products * scale, -jnp.inf)


def softmax(scores: jax.Array) -> jax.Array:
    """p = e^(s − max s) / Σ e^(s − max s) over the last axis; 0 for a row with no visible key."""
    weights = jnp.exp(scores - _shift(scores.max(axis=-1, keepdims=True)))
    return weights / _nonzero(weights.sum(axis=-1, keepdims=True))


def init(rows: tuple[int, ...], value_dim: int, width: int = 1) -> Stats:
    """(m = −inf, l = 0, acc = 0) for query rows of shape `rows` [..., bq], statistics `width`
    wide: nothing seen yet."""
    return (jnp.full((*rows, width), -jnp.inf, jnp.float32),
            jnp.zeros((*rows, width), jnp.float32), jnp.zeros((*rows, value_dim), jnp.float32))


def fold(stats: Stats, scores: jax.Array, weighted_values: Callable[[jax.Array], jax.Array],
         widen: Widen = None) -> Stats:
    """Folds one block of scores f32 [..., bq, bk] into `stats`. weighted_values(p) is the f32
    product p·v [..., bq, Dv] of the block's weights p [..., bq, bk] with its values, in the
    caller's layout (an einsum, or a 2-D jnp.dot in a kernel)."""
    row_max, denominator, acc = stats
    # The max only keeps exp() in range; the result does not depend on it.
    new_max = lax.stop_gradient(jnp.maximum(row_max, jnp.max(scores, axis=-1, keepdims=True)))
    shift = _shift(new_max)
    rescale = jnp.exp(row_max - shift)
    weights = jnp.exp(scores - _widened(widen, shift, scores.shape[-1]))
    denominator = rescale * denominator + jnp.sum(weights, axis=-1, keepdims=True)
    return (new_max, denominator,
            _widened(widen, rescale, acc.shape[-1]) * acc + weighted_values(weights))


def finish(stats: Stats, widen: Widen = None) -> tuple[jax.Array, jax.Array]:
    """(out = acc / l f32 [..., bq, Dv], lse = m + log l [..., bq, W]); a row that saw no key
    gets out 0 and lse +inf."""
    row_max, denominator, acc = stats
    seen = denominator > 0
    safe = _nonzero(denominator)
    return (acc / _widened(widen, safe, acc.shape[-1]),
            jnp.where(seen, row_max + jnp.log(safe), jnp.inf))


def delta(d_out: jax.Array, out: jax.Array) -> jax.Array:
    """δ = rowsum(dout ⊙ out), f32 [..., bq, 1] from dout, out [..., bq, Dv]."""
    return jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)


def probabilities(scores: jax.Array, lse: jax.Array, widen: Widen = None) -> jax.Array:
    """p = e^(s − lse), f32 [..., bq, bk], recomputed from the scores and the saved lse."""
    return jnp.exp(scores - _widened(widen, lse, scores.shape[-1]))


def score_grads(probs: jax.Array, d_probs: jax.Array, delta: jax.Array,
                scale: float, widen: Widen = None) -> jax.Array:
    """dS = scale · p ⊙ (dP − δ), f32 [..., bq, bk]: the gradient w.r.t. q·k (so dq = dS·k,
    dk = dSᵀ·q) from p, dP = dout·vᵀ [..., bq, bk] and δ [..., bq, W]."""
    return probs * (d_probs - _widened(widen, delta, probs.shape[-1])) * scale


def _widened(widen: Widen, stat: jax.Array, width: int) -> jax.Array:
    return stat if widen is None else widen(stat, width)


def _shift(row_max: jax.Array) -> jax.Array:
    """The max to subtract before exp(): 0 for a row whose max is −inf (nothing visible)."""
    return jnp.where(row_max == -jnp.inf, 0.0, row_max)


def _nonzero(denominator: jax.Array) -> jax.Array:
    """l, or 1 where l = 0 (a row with no visible key), so dividing by it gives 0, not NaN."""
    return jnp.where(denominator > 0, denominator, 1.0)
