"""MEGALODON's two sequence operators as pure functions (Ma et al. 2024, arXiv 2404.08801, in
the parametrisation of the released code XuezheMax/megalodon): the complex exponential moving
average (CEMA) and timestep normalisation. `lctx_jax.models.megalodon` builds the model from
them; they work in any JAX code.

Shapes: B batch, T tokens, D features, N EMA dimensions per feature (cema_ndim), G norm groups.

Both run in parallel over T (an FFT convolution; an associative scan of Welford merges) and
carry a state across calls, so a long sequence may be fed in pieces. With `axis_name` (inside
`shard_map` over a mesh axis that splits T into contiguous pieces, device r holding piece r)
the pieces of one sequence are computed on their devices at once: each device sends only its
piece's summary (the CEMA state of its last token from a zero start; the norm's (count, mean,
var)) to the others (`all_gather`), and combines those of the devices before it as a prefix.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

CEMA_PARAMS = ("alpha", "delta", "theta", "gamma", "omega")
VANDERMONDE_BLOCK = 1024  # positions per block of q powers (memory D·N·block complex)


# ----------------------------------------------------------------------------- CEMA


def cema_shapes(dim: int, ndim: int) -> dict[str, tuple[int, ...]]:
    """The shape of each CEMA parameter for `dim` features and `ndim` EMA dimensions."""
    return {"alpha": (dim, ndim, 1), "delta": (dim, ndim, 1), "theta": (dim, 1, 1),
            "gamma": (dim, ndim, 2), "omega": (dim, 1)}


def init_cema_params(rng: jax.Array, dim: int, ndim: int, dtype: Any = jnp.float32
                     ) -> dict[str, jax.Array]:
    """The released initialisation: alpha, delta ~ N(0, 0.2²); sigmoid(theta) = exp(−k·ln D/D)
    for k = 1..D in a random order; gamma real part ~ N(0, 1), imaginary 0; omega ~ N(0,
    0.25²) truncated to [−1, 1]."""
    keys = jax.random.split(rng, 5)
    k = jnp.arange(1, dim + 1, dtype=jnp.float32)
    freqs = jax.random.permutation(keys[2], jnp.exp(-k * math.log(dim) / dim))
    gamma_real = jax.random.normal(keys[3], (dim, ndim, 1))
    params = {
        "alpha": 0.2 * jax.random.normal(keys[0], (dim, ndim, 1)),
        "delta": 0.2 * jax.random.normal(keys[1], (dim, ndim, 1)),
        "theta": jnp.log(freqs / (1.0 - freqs)).reshape(dim, 1, 1),
        "gamma": jnp.concatenate([gamma_real, jnp.zeros_like(gamma_real)], axis=-1),
        "omega": 0.25 * jax.random.truncated_normal(keys[4], -4.0, 4.0, (dim, 1)),
    }
    return {name: value.astype(dtype) for name, value in params.items()}


def cema_coefficients(params: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(p [D, N] f32, log q [D, N] complex64, η [D, N] complex64) of the recurrence
    h_t = p·x_t + q·h_{t−1}: p = sigmoid(α), q = (1 − sigmoid(α)·sigmoid(δ))·e^{i·n·sigmoid(θ)·2π/N}
    (n = 1..N), η = (γ_re + i·γ_im)/√N.

    log|q| is formed as log(sigmoid(−α) + sigmoid(α)·sigmoid(−δ)) (= log(1 − σ(α)σ(δ))) from
    log-sigmoids, so it stays finite where σ(α)σ(δ) rounds to 1 in f32."""
    alpha, delta = (params[name][..., 0].astype(jnp.float32) for name in ("alpha", "delta"))
    theta = params["theta"][:, 0, 0].astype(jnp.float32)
    gamma = params["gamma"].astype(jnp.float32)
    ndim = alpha.shape[1]
    log_abs = jnp.logaddexp(jax.nn.log_sigmoid(-alpha),
                            jax.nn.log_sigmoid(alpha) + jax.nn.log_sigmoid(-delta))
    phase = (jnp.arange(1, ndim + 1, dtype=jnp.float32)[None, :]
             * (jax.nn.sigmoid(theta) * (2 * math.pi / ndim))[:, None])
    log_q = lax.complex(log_abs, phase)
    eta = lax.complex(gamma[..., 0], gamma[..., 1]) / math.sqrt(ndim)
    return jax.nn.sigmoid(alpha), log_q, eta


def cema(x: jax.Array, params: dict[str, jax.Array], h0: jax.Array | None = None, *,
         axis_name: str | None = None) -> tuple[jax.Array, jax.Array]:
    """Complex EMA: x [B, T, D] -> (y f32 [B, T, D], h complex64 [B, D, N]).

        h_t = p·x_t + q·h_{t−1},   y_t = Re(Σ_n η_n h_{t,n}) + ω·x_t     (`cema_coefficients`)

    starting from h0 (None: zeros); h is the state after the last token. Computed in parallel:
    y = x ∗ K (causal FFT convolution, length 2T) with K_j = Re Σ_n p_n η_n q_n^j, plus
    Re Σ_n η_n q_n^{t+1} h0_n, and h = q^T h0 + p Σ_j q^{T−1−j} x_j in closed form. Every power
    is exp(j·log q) (no running product), in blocks of VANDERMONDE_BLOCK positions.

    axis_name: inside shard_map over that axis, x is this device's piece of one sequence (the
    pieces in device order); h0 is the state before the first device's piece (the same value
    on every device), and h is the state after this device's piece.
    """
    _check_cema(x, params, h0)
    t = x.shape[1]
    p, log_q, eta = cema_coefficients(params)
    x32 = x.astype(jnp.float32)
    kernel, s = _kernel_and_state(x32, p, log_q, eta)
    y = _causal_conv(x32, kernel)
    if axis_name is not None:
        h0 = _device_prefix_state(s, log_q, t, h0, axis_name)
    if h0 is None:
        h = s
    else:
        h0 = h0.astype(jnp.complex64)
        y = y + _state_response(h0, log_q, eta, t)
        h = jnp.exp(t * log_q)[None] * h0 + s
    y = y + params["omega"][:, 0].astype(jnp.float32) * x32
    return y, h


def _check_cema(x: jax.Array, params: dict[str, jax.Array], h0: jax.Array | None) -> None:
    if x.ndim != 3:
        raise ValueError(f"cema: x must be [B, T, D], got shape {x.shape}")
    missing = set(CEMA_PARAMS) - set(params)
    if missing:
        raise ValueError(f"cema: params lacks {sorted(missing)}; it needs {CEMA_PARAMS}")
    d, ndim = x.shape[2], params["alpha"].shape[1] if params["alpha"].ndim == 3 else -1
    for name, shape in cema_shapes(d, ndim).items():
        if params[name].shape != shape:
            raise ValueError(f"cema: params[{name!r}] has shape {params[name].shape}; for x "
                             f"with D={d} features and N={ndim} it must be {shape}")
    if h0 is not None and h0.shape != (x.shape[0], d, ndim):
        raise ValueError(f"cema: h0 must be [B, D, N] = {(x.shape[0], d, ndim)}, got "
                         f"{h0.shape}")


def _powers(log_q: jax.Array, exponents: jax.Array) -> jax.Array:
    """q^j = exp(j·log q): log_q [D, N], exponents [L] -> complex64 [D, N, L]."""
    return jnp.exp(log_q[..., None] * exponents.astype(jnp.float32))


def _kernel_and_state(x: jax.Array, p: jax.Array, log_q: jax.Array, eta: jax.Array
                      ) -> tuple[jax.Array, jax.Array]:
    """(K [D, T] with K_j = Re Σ_n p η q^j, s [B, D, N] = p Σ_j q^{T−1−j} x_j), one block of
    positions at a time (a scan: its memory is one block's powers, recomputed in the
    backward)."""
    b, t, d = x.shape
    block = min(t, VANDERMONDE_BLOCK)
    blocks = -(-t // block)
    padded = jnp.pad(x, ((0, 0), (0, blocks * block - t), (0, 0)))
    padded = padded.reshape(b, blocks, block, d).swapaxes(0, 1)  # [blocks, B, block, D]
    weight = p * eta

    @jax.checkpoint
    def step(s: jax.Array, inputs: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        start, xb = inputs
        j = start + jnp.arange(block)
        kernel = jnp.real(jnp.einsum("dn,dnl->dl", weight, _powers(log_q, j)))
        back = jnp.where(j < t, t - 1 - j, 0)  # exponents of q for the final state
        decay = _powers(log_q, back) * (j < t)
        s = s + jnp.einsum("bld,dnl->bdn", xb.astype(jnp.complex64), decay)
        return s, kernel

    starts = jnp.arange(blocks, dtype=jnp.int32) * block
    s, kernels = lax.scan(step, jnp.zeros((b, d, p.shape[1]), jnp.complex64), (starts, padded))
    kernel = kernels.transpose(1, 0, 2).reshape(d, blocks * block)[:, :t]
    return kernel, p[None] * s


def _causal_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """y_t = Σ_{j ≤ t} K_j x_{t−j}: x [B, T, D], K [D, T] -> [B, T, D], by FFT of length 2T."""
    t = x.shape[1]
    n = 2 * t
    spectrum = jnp.fft.rfft(x, n=n, axis=1) * jnp.fft.rfft(kernel.T, n=n, axis=0)[None]
    return jnp.fft.irfft(spectrum, n=n, axis=1)[:, :t].astype(jnp.float32)


def _state_response(h0: jax.Array, log_q: jax.Array, eta: jax.Array, t: int) -> jax.Array:
    """Re Σ_n η_n q_n^{j+1} h0_n for j < t -> [B, t, D], one block of positions at a time."""
    block = min(t, VANDERMONDE_BLOCK)
    blocks = -(-t // block)
    weighted = eta[None] * h0  # [B, D, N]

    @jax.checkpoint
    def one(start: jax.Array) -> jax.Array:
        powers = _powers(log_q, start + 1 + jnp.arange(block))
        return jnp.real(jnp.einsum("bdn,dnl->bld", weighted, powers))

    out = lax.map(one, jnp.arange(blocks, dtype=jnp.int32) * block)  # [blocks, B, block, D]
    return out.swapaxes(0, 1).reshape(h0.shape[0], blocks * block, -1)[:, :t]


def _device_prefix_state(s: jax.Array, log_q: jax.Array, t: int, h0: jax.Array | None,
                         axis_name: str) -> jax.Array:
    """The state entering this device's piece: q^{rT} h0 + Σ_{k<r} q^{(r−1−k)T} s_k, from the
    zero-start states s_k of every device's piece (each T tokens long)."""
    # as f32 (re, im): TPU lowers the backward's reduce-scatter of real sums only
    parts = lax.all_gather(jnp.stack([jnp.real(s), jnp.imag(s)]), axis_name)  # [P, 2, B, D, N]
    states = lax.complex(parts[:, 0], parts[:, 1])
    devices, rank = states.shape[0], lax.axis_index(axis_name)
    k = jnp.arange(devices)
    hops = jnp.where(k < rank, rank - 1 - k, 0)  # pieces between device k's end and our start
    decay = jnp.exp(log_q[None] * (hops * t).astype(jnp.float32)[:, None, None])  # [P, D, N]
    h = jnp.einsum("pbdn,pdn->bdn", states * (k < rank)[:, None, None, None], decay)
    if h0 is not None:
        h = h + jnp.exp(log_q * (rank * t).astype(jnp.float32))[None] * h0.astype(jnp.complex64)
    return h


# ----------------------------------------------------------------------------- TimestepNorm


class NormState(NamedTuple):
    """TimestepNorm statistics of everything seen so far, per row and group: count [B] int32
    (time steps), mean and population variance [B, G] f32."""
    count: jax.Array
    mean: jax.Array
    var: jax.Array


def empty_norm_state(batch: int, num_groups: int) -> NormState:
    """The state before the first token (count 0)."""
    zeros = jnp.zeros((batch, num_groups), jnp.float32)
    return NormState(jnp.zeros((batch,), jnp.int32), zeros, zeros)


def _merge(a: tuple, b: tuple) -> tuple:
    """Chan et al.'s pairwise merge of (count, mean, var) summaries: the summary of both sets
    (a first). Counts may be 0 (then the other summary is returned)."""
    na, ma, va = a
    nb, mb, vb = b
    n = na + nb
    total = jnp.maximum(n, 1).astype(jnp.float32)
    wa, wb = na.astype(jnp.float32) / total, nb.astype(jnp.float32) / total  # each exactly 0
    delta = mb - ma  # for an empty side, whatever its mean (XLA may round nb/n below 1)
    return n, wa * ma + wb * mb, wa * va + wb * vb + wa * wb * delta * delta


def timestep_norm(x: jax.Array, weight: jax.Array, bias: jax.Array, num_groups: int,
                  eps: float = 1e-5, state: NormState | None = None,
                  mask: jax.Array | None = None, *, axis_name: str | None = None
                  ) -> tuple[jax.Array, NormState]:
    """Causal group normalisation over time: x [B, T, D] -> (y [B, T, D] in x's dtype, state).

    Features split into num_groups groups of D/G consecutive features. μ_t, σ²_t: the mean and
    population variance of all values of the group at times ≤ t (and those `state` summarises);
    y_t = (x_t − μ_t)/√(σ²_t + eps)·(weight + 1) + bias. Each time step's group mean and
    variance are merged by Chan's pairwise formula in an associative scan (no E[x²] − E[x]²
    cancellation). mask [B, T] (True: a real token): other tokens are left out of the statistics
    and get y = 0. The returned state summarises everything up to the last token.

    axis_name: inside shard_map over that axis, x is this device's piece of one sequence (pieces
    in device order); `state` is the state before the first device's piece, and the returned
    state is the one after this device's piece.
    """
    b, t, d = x.shape
    if num_groups < 1 or d % num_groups:
        raise ValueError(f"timestep_norm: num_groups={num_groups} must divide the {d} "
                         "features of x")
    if weight.shape != (d,) or bias.shape != (d,):
        raise ValueError(f"timestep_norm: weight and bias must be [{d}], got {weight.shape} "
                         f"and {bias.shape}")
    groups = x.astype(jnp.float32).reshape(b, t, num_groups, d // num_groups)
    step_mean = groups.mean(-1)
    step_var = jnp.square(groups - step_mean[..., None]).mean(-1)
    real = (jnp.ones((b, t), bool) if mask is None else mask.astype(bool))
    step_mean, step_var = (jnp.where(real[..., None], v, 0.0) for v in (step_mean, step_var))
    count = jnp.broadcast_to(real[..., None].astype(jnp.int32), step_mean.shape)
    running = lax.associative_scan(_merge, (count, step_mean, step_var), axis=1)
    if state is None:
        state = empty_norm_state(b, num_groups)
    prior = (state.count[:, None, None], state.mean[:, None], state.var[:, None])
    if axis_name is not None:
        prior = _device_prefix_stats(tuple(r[:, -1:] for r in running), prior, axis_name)
    n, mean, var = _merge(prior, running)
    normed = (groups - mean[..., None]) * lax.rsqrt(var[..., None] + eps)
    y = normed.reshape(b, t, d) * (weight.astype(jnp.float32) + 1.0) + bias.astype(jnp.float32)
    y = jnp.where(real[..., None], y, 0.0).astype(x.dtype)
    return y, NormState(n[:, -1, 0], mean[:, -1], var[:, -1])


def _device_prefix_stats(last: tuple, prior: tuple, axis_name: str) -> tuple:
    """The summary before this device's piece: `prior` merged with the totals of every earlier
    device's piece (`last`: this device's totals, each [B, 1, G])."""
    everyone = [lax.all_gather(v, axis_name) for v in last]  # [P, B, 1, G]
    rank = lax.axis_index(axis_name)
    total = prior
    for k in range(everyone[0].shape[0]):  # P merges of [B, G] summaries, in device order
        earlier = k < rank
        piece = (jnp.where(earlier, everyone[0][k], 0), everyone[1][k], everyone[2][k])
        total = _merge(total, piece)
    return total
