"""Next-token negative log-likelihood with the LM head applied in chunks: never [B, T, vocab].

    nll = lx.next_token_nll(model, input_ids)                      # mean over scored tokens
    total, count = nll_sum(hidden, head, targets, weights)         # what training sums

For hidden states h [B, T, H] (after the final norm), the head W [H, V] and integer targets,

    nll_t = logsumexp_v(h_t W) − (h_t W)[target_t],     total = Σ_t weights_t · nll_t,

computed over chunks of tokens by a `lax.scan` that holds one chunk of f32 logits [B, c, V] at
a time, never [B, T, V]. Differentiated, a custom VJP forms the gradients in that same pass:
per chunk, dlogits = weight · (softmax − onehot), dh = dlogits Wᵀ, and dW accumulates in the
scan's carry; the backward only scales them by the loss's cotangent, so no chunk's logits are
recomputed (three matmuls per chunk, as autodiff of full logits does, not four as a
rematerialised scan would). Chunks are strided: chunk j holds tokens j, j + n, j + 2n, …
(n chunks), so every chunk spans the whole sequence and stays split like it when T is sharded
over the mesh's "sequence" axis (a [B, T] → [B, c, n] reshape keeps each device's contiguous
token range on that device).

Equal to the full-logits cross-entropy up to f32 rounding (the same logits, summed in another
order): tests/test_losses.py checks value and gradients against optax on the full logits.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lctx_jax import token_ids
from lctx_jax.layers import head_logits
from lctx_jax.model import Model, ModelSpec

CHUNK_TOKENS = 1024  # tokens per row per chunk: [B, 1024, V] f32 logits live at once


def num_chunks(length: int, chunk_tokens: int) -> int:
    """The number of chunks n for T = `length` tokens: the smallest n >= ceil(T / chunk_tokens)
    that divides T, searched up to twice that (chunks of at least about chunk_tokens/2 tokens);
    else ceil(T / chunk_tokens), T then padded to a multiple of n."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive int, got {chunk_tokens}")
    least = -(-length // chunk_tokens)
    for n in range(least, 2 * least + 1):
        if length % n == 0:
            return n
    return least


def nll_sum(hidden: jax.Array, head: jax.Array, targets: jax.Array, weights: jax.Array,
            dtype: Any = jnp.float32, chunk_tokens: int = CHUNK_TOKENS
            ) -> tuple[jax.Array, jax.Array]:
    """(Σ weights · nll, Σ weights), f32 scalars. hidden [B, T, H]; head [H, V]; targets int
    [B, T]; weights [B, T] (0 where a target does not count). `dtype`: the head matmul's
    input dtype (f32 accumulation), as `lctx_jax.layers.head_logits`. Differentiable in hidden
    and head (`_chunked_nll`)."""
    batch, length, _ = hidden.shape
    n = num_chunks(length, chunk_tokens)
    padded = -(-length // n) * n
    weights = weights.astype(jnp.float32)
    targets = targets.astype(jnp.int32)
    if padded != length:  # padded tokens have weight 0
        pad = [(0, 0), (0, padded - length)]
        hidden = jnp.pad(hidden, pad + [(0, 0)])
        targets, weights = jnp.pad(targets, pad), jnp.pad(weights, pad)
    return _chunked_nll(jnp.dtype(dtype), n, hidden, head, targets, weights), jnp.sum(weights)


def _chunks(x: jax.Array, n: int) -> jax.Array:
    """[B, T, ...] -> [n, B, T/n, ...]: chunk j holds tokens j, j + n, j + 2n, ..."""
    x = x.reshape(x.shape[0], x.shape[1] // n, n, *x.shape[2:])
    return jnp.moveaxis(x, 2, 0)


def _unchunk(x: jax.Array) -> jax.Array:
    """The inverse of `_chunks`."""
    x = jnp.moveaxis(x, 0, 2)
    return x.reshape(x.shape[0], -1, *x.shape[3:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _chunked_nll(dtype: Any, n: int, hidden: jax.Array, head: jax.Array, targets: jax.Array,
                 weights: jax.Array) -> jax.Array:
    """Σ weights · (logsumexp(h W) − (h W)[target]) over n chunks, one chunk's logits at a
    time (the value alone: evaluation never forms gradients)."""
    def step(total: jax.Array, chunk: tuple) -> tuple[jax.Array, None]:
        h, target, weight = chunk
        logits = head_logits(h, head, dtype)
        return total + jnp.sum(_token_nll(logits, target) * weight), None

    chunks = tuple(_chunks(x, n) for x in (hidden, targets, weights))
    return jax.lax.scan(step, jnp.zeros((), jnp.float32), chunks)[0]


def _token_nll(logits: jax.Array, target: jax.Array) -> jax.Array:
    picked = jnp.take_along_axis(logits, target[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - picked


def _chunked_nll_fwd(dtype: Any, n: int, hidden: jax.Array, head: jax.Array,
                     targets: jax.Array, weights: jax.Array) -> tuple[jax.Array, tuple]:
    """The value and, in the same pass over the chunks, its gradients: per chunk
    dlogits = weight · (softmax(logits) − onehot(target)), dh = dlogits Wᵀ, dW += hᵀ dlogits.
    The loss is a scalar, so the backward only scales them by its cotangent: no chunk's
    logits are recomputed and none is kept."""
    def step(carry: tuple, chunk: tuple) -> tuple[tuple, jax.Array]:
        total, d_head = carry
        h, target, weight = chunk
        logits = head_logits(h, head, dtype)
        total = total + jnp.sum(_token_nll(logits, target) * weight)
        d_logits = jax.nn.softmax(logits, axis=-1) - jax.nn.one_hot(target, logits.shape[-1])
        d_logits = (d_logits * weight[..., None]).astype(dtype)
        d_h = jnp.einsum("bcv,hv->bch", d_logits, head.astype(dtype),
                         preferred_element_type=jnp.float32)
        d_head = d_head + jnp.einsum("bch,bcv->hv", h.astype(dtype), d_logits,
                                     preferred_element_type=jnp.float32)
        return (total, d_head), d_h.astype(hidden.dtype)

    chunks = tuple(_chunks(x, n) for x in (hidden, targets, weights))
    init = (jnp.zeros((), jnp.float32), jnp.zeros(head.shape, jnp.float32))
    (total, d_head), d_hidden = jax.lax.scan(step, init, chunks)
    return total, (_unchunk(d_hidden), d_head.astype(head.dtype), targets, weights)


def _chunked_nll_bwd(dtype: Any, n: int, residuals: tuple, g: jax.Array) -> tuple:
    d_hidden, d_head, targets, weights = residuals
    return ((g * d_hidden).astype(d_hidden.dtype), (g * d_head).astype(d_head.dtype),
            np.zeros(targets.shape, jax.dtypes.float0), jnp.zeros_like(weights))


_chunked_nll.defvjp(_chunked_nll_fwd, _chunked_nll_bwd)


def shifted_targets(input_ids: jax.Array, loss_mask: jax.Array | None = None,
                    segment_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(targets, weights) [B, T] for next-token prediction within `input_ids`: position t
    predicts input_ids[t + 1]; the last position, a target in another document (segment id
    differs) and loss_mask[t] == 0 have weight 0."""
    targets = jnp.pad(input_ids[:, 1:], [(0, 0), (0, 1)])
    weights = jnp.ones(input_ids.shape, jnp.float32).at[:, -1].set(0.0)
    if segment_ids is not None:
        same = segment_ids[:, 1:] == segment_ids[:, :-1]
        weights = weights * jnp.pad(same, [(0, 0), (0, 1)]).astype(jnp.float32)
    if loss_mask is not None:
        weights = weights * jnp.asarray(loss_mask, jnp.float32)
    return targets, weights


def next_token_nll(model: Model | ModelSpec, input_ids: Any, params: Any = None,
                   loss_mask: Any = None, positions: Any = None, segment_ids: Any = None,
                   chunk_tokens: int = CHUNK_TOKENS) -> jax.Array:
    """Mean next-token NLL (f32 scalar) of `model` on input_ids [B, T]: position t predicts
    input_ids[t + 1]. Not counted: the last position, targets in another document (segment_ids
    [B, T] differ) and positions with loss_mask [B, T] == 0. The LM head runs in chunks
    (`nll_sum`), so [B, T, vocab] logits never exist. params: default model.params; pass them
    to differentiate (jax.grad(lambda p: next_token_nll(model, ids, p))). Returns 0 when no
    position counts."""
    if params is None:
        if not hasattr(model, "params"):
            raise ValueError("next_token_nll(spec, ...) with a ModelSpec needs params=: a spec "
                             "holds no weights (a Model does)")
        params = model.params
    input_ids = jnp.asarray(token_ids.check(input_ids, model.config.vocab_size))
    positions = token_ids.check_aligned(positions, input_ids.shape, "positions")
    segment_ids = token_ids.check_aligned(segment_ids, input_ids.shape, "segment_ids")
    targets, weights = shifted_targets(input_ids, loss_mask, segment_ids)
    hidden = model.hidden(params, input_ids, positions, segment_ids)
    total, count = nll_sum(hidden, model.head(params), targets, weights,
                           model.dtype, chunk_tokens)
    return total / jnp.maximum(count, 1.0)
