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
(m, l, lse, δ) keep a trailing size-1 axis: [..., bq, 1]; acc and out are [..., bq, Dv].
`softmax` is the one-block case for a whole row at once (xla's plain path).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

# (running max m [..., bq, 1], denominator l [..., bq, 1], accumulator acc [..., bq, Dv]), f32.
Stats = tuple[jax.Array, jax.Array, jax.Array]


def scores(products: jax.Array, visible: jax.Array, scale: float) -> jax.Array:
    """scale · q·k, −inf where not visible: f32 [..., bq, bk] from the f32 products q·k and a
    bool mask that broadcasts to them."""
    return jnp.where(visible, products * scale, -jnp.inf)


def softmax(scores: jax.Array) -> jax.Array:
    """p = e^(s − max s) / Σ e^(s − max s) over the last axis; 0 for a row with no visible key."""
    weights = jnp.exp(scores - _shift(scores.max(axis=-1, keepdims=True)))
    return weights / _nonzero(weights.sum(axis=-1, keepdims=True))


def init(rows: tuple[int, ...], value_dim: int) -> Stats:
    """(m = −inf, l = 0, acc = 0) for query rows of shape `rows` [..., bq]: nothing seen yet."""
    return (jnp.full((*rows, 1), -jnp.inf, jnp.float32), jnp.zeros((*rows, 1), jnp.float32),
            jnp.zeros((*rows, value_dim), jnp.float32))


def fold(stats: Stats, scores: jax.Array, weighted_values: Callable[[jax.Array], jax.Array]
         ) -> Stats:
    """Folds one block of scores f32 [..., bq, bk] into `stats`. weighted_values(p) is the f32
    product p·v [..., bq, Dv] of the block's weights p [..., bq, bk] with its values, in the
    caller's layout (an einsum, or a 2-D jnp.dot in a kernel)."""
    row_max, denominator, acc = stats
    # The max only keeps exp() in range; the result does not depend on it.
    new_max = lax.stop_gradient(jnp.maximum(row_max, jnp.max(scores, axis=-1, keepdims=True)))
    shift = _shift(new_max)
    rescale = jnp.exp(row_max - shift)
    weights = jnp.exp(scores - shift)
    denominator = rescale * denominator + jnp.sum(weights, axis=-1, keepdims=True)
    return new_max, denominator, rescale * acc + weighted_values(weights)


def finish(stats: Stats) -> tuple[jax.Array, jax.Array]:
    """(out = acc / l f32 [..., bq, Dv], lse = m + log l [..., bq, 1]); a row that saw no key
    gets out 0 and lse +inf."""
    row_max, denominator, acc = stats
    seen = denominator > 0
    safe = _nonzero(denominator)
    return acc / safe, jnp.where(seen, row_max + jnp.log(safe), jnp.inf)


def delta(d_out: jax.Array, out: jax.Array) -> jax.Array:
    """δ = rowsum(dout ⊙ out), f32 [..., bq, 1] from dout, out [..., bq, Dv]."""
    return jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)


def probabilities(scores: jax.Array, lse: jax.Array) -> jax.Array:
    """p = e^(s − lse), f32 [..., bq, bk], recomputed from the scores and the saved lse."""
    return jnp.exp(scores - lse)


def score_grads(probs: jax.Array, d_probs: jax.Array, delta: jax.Array,
                scale: float) -> jax.Array:
    """dS = scale · p ⊙ (dP − δ), f32 [..., bq, bk]: the gradient w.r.t. q·k (so dq = dS·k,
    dk = dSᵀ·q) from p, dP = dout·vᵀ [..., bq, bk] and δ [..., bq, 1]."""
    return probs * (d_probs - delta) * scale


def _shift(row_max: jax.Array) -> jax.Array:
    """The max to subtract before exp(): 0 for a row whose max is −inf (nothing visible)."""
    return jnp.where(row_max == -jnp.inf, 0.0, row_max)


def _nonzero(denominator: jax.Array) -> jax.Array:
    """l, or 1 where l = 0 (a row with no visible key), so dividing by it gives 0, not NaN."""
    return jnp.where(denominator > 0, denominator, 1.0)
