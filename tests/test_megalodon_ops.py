"""lctx_jax.models.megalodon's two building blocks (MEGALODON, Ma et al. 2024, in the released
XuezheMax/megalodon code's parametrisation; /work/shared/API.md) against sequential
transcriptions of their recurrences written here, which never call into megalodon.py:

CEMA      p = σ(alpha), q = (1 − σ(alpha)σ(delta))·e^{i·n·σ(theta)·2π/N}, η = complex(gamma)/√N,
          h_t = p·x_t + q·h_{t−1},  y_t = Re Σ_n η_n h_{t,n} + omega·x_t.
TimestepNorm  per group of D/G features, μ_t and σ²_t are the mean and population variance of
          all the group's values at times ≤ t (and in the carried state's past), Welford-merged
          one token at a time; y = (x − μ_t)/√(σ²_t + eps)·(weight + 1) + bias; masked-out tokens
          are skipped and give 0.

`cema_reference` / `norm_reference` are numpy float64 loops over t; `cema_scan` / `norm_scan`
are the same recurrences as jax.lax.scan, run in float64 (`jax.enable_x64`) and differentiated
with jax.grad for the gradient references.

Tolerances are relative to the largest reference value of each compared array (`assert_rel`).
The implementation runs in f32 (an FFT convolution for CEMA): values agree to ~1e-6 of their
scale, so values are checked at 2e-5 (CEMA: plus the f32 rounding of its largest phase, ~2π·T
ulps, which |q| ≈ 1 keeps: `cema_tol`) and gradients at 1e-4 (observed ≤ 1e-5). TimestepNorm
on values 1000 + N(0, 1) is checked at 2e-3: f32 itself rounds x (and μ) at ulp(1000) = 6e-5,
while the naive E[x²] − E[x]² in f32 is off by several percent there (the test computes it and
checks so). Masked-out tokens hold values near 1e4 in the mask test: they must not reach the
statistics, not even through rounding.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lctx_jax.models import megalodon

VALUE_TOL = 2e-5
GRAD_TOL = 1e-4
OFFSET_TOL = 2e-3
CEMA_PARAMS = ("alpha", "delta", "theta", "gamma", "omega")


def cema_tol(length):
    """VALUE_TOL plus the f32 rounding of the largest phase t·n·σ(theta)·2π/N < 2π·T (half an
    ulp), which |q| ≈ 1 carries unattenuated into y and h: 1.2e-4 at T = 257."""
    return VALUE_TOL + length * 2 * math.pi * 2.0 ** -24


def assert_rel(got, want, tol, name=""):
    """max |got − want| ≤ tol · max |want| (and no NaN), with the figures in the message."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    assert np.all(np.isfinite(got)), f"{name}: non-finite values"
    scale = float(np.abs(want).max())
    err = float(np.abs(got - want).max())
    assert err <= tol * max(scale, 1e-30), f"{name}: max error {err:.3g} at scale {scale:.3g}"


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


# --------------------------------------------------------------------------------- CEMA


def random_cema_params(seed, dim, ndim, alpha=0.0, delta=0.0, scale=0.7):
    """Normal draws (std `scale`) for every parameter, alpha and delta shifted by the given
    offsets (+8: |q| near 0, −8: |q| near 1); float32 as the model holds them."""
    rng = np.random.default_rng(seed)
    draw = lambda *shape: scale * rng.standard_normal(shape)
    params = {"alpha": alpha + draw(dim, ndim, 1), "delta": delta + draw(dim, ndim, 1),
              "theta": draw(dim, 1, 1), "gamma": draw(dim, ndim, 2), "omega": draw(dim, 1)}
    return {k: v.astype(np.float32) for k, v in params.items()}


def random_h0(seed, batch, dim, ndim):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((batch, dim, ndim))
            + 1j * rng.standard_normal((batch, dim, ndim))).astype(np.complex64)


def random_x(seed, *shape, offset=0.0):
    return (offset + np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def cema_coefficients(params, xp=np):
    """p [D, N], q [D, N] complex, η [D, N] complex, omega [D] (in xp's float64 / complex128
    when given float64 parameters)."""
    ndim = params["alpha"].shape[1]
    sig = (lambda v: 1 / (1 + xp.exp(-v)))
    p = sig(params["alpha"][..., 0])
    n = xp.arange(1, ndim + 1)
    phase = n * sig(params["theta"][:, 0]) * (2 * math.pi / ndim)  # [D, 1] · [N] → [D, N]
    q = (1 - p * sig(params["delta"][..., 0])) * xp.exp(1j * phase)
    eta = (params["gamma"][..., 0] + 1j * params["gamma"][..., 1]) / math.sqrt(ndim)
    return p, q, eta, params["omega"][:, 0]


def cema_reference(x, params, h0=None):
    """numpy float64 / complex128, one token at a time: (y [B, T, D], h [B, D, N])."""
    params = {k: np.asarray(v, np.float64) for k, v in params.items()}
    p, q, eta, omega = cema_coefficients(params)
    x = np.asarray(x, np.float64)
    batch, length, dim = x.shape
    h = (np.zeros((batch, dim, p.shape[1]), np.complex128) if h0 is None
         else np.asarray(h0, np.complex128))
    y = np.empty_like(x)
    for t in range(length):
        h = p * x[:, t, :, None] + q * h
        y[:, t] = np.real(np.sum(eta * h, -1)) + omega * x[:, t]
    return y, h


def cema_scan(x, params, h0):
    """The same recurrence in jnp as a lax.scan over t (differentiable; run it in float64)."""
    p, q, eta, omega = cema_coefficients(params, jnp)

    def step(h, x_t):  # x_t [B, D]
        h = p * x_t[..., None] + q * h
        return h, jnp.real(jnp.sum(eta * h, -1)) + omega * x_t

    h, y = jax.lax.scan(step, h0, jnp.swapaxes(x, 0, 1))
    return jnp.swapaxes(y, 0, 1), h


# (batch, length, dim, ndim, alpha offset, delta offset)
CEMA_CASES = {
    "T1": (2, 1, 3, 2, 0.0, 0.0),
    "T7": (2, 7, 5, 4, 0.0, 0.0),
    "T64": (2, 64, 4, 16, 0.0, 0.0),
    "T257": (1, 257, 3, 16, 0.0, 0.0),
    "q_near_0": (2, 64, 4, 4, 8.0, 8.0),
    "q_near_1": (1, 257, 3, 16, -8.0, -8.0),
    "long_memory": (1, 257, 3, 16, 8.0, -8.0),  # p ≈ 1, |q| ≈ 1 − 3e-4: h sums ~all of x
}


@pytest.mark.parametrize("with_h0", [False, True], ids=["zero_h0", "h0"])
@pytest.mark.parametrize("case", list(CEMA_CASES))
def test_cema_matches_recurrence(case, with_h0):
    batch, length, dim, ndim, alpha, delta = CEMA_CASES[case]
    params = random_cema_params(1, dim, ndim, alpha, delta)
    x = random_x(2, batch, length, dim)
    h0 = random_h0(3, batch, dim, ndim) if with_h0 else None
    y, h = jax.jit(megalodon.cema)(x, params, h0)
    assert y.dtype == jnp.float32 and y.shape == (batch, length, dim)
    assert h.dtype == jnp.complex64 and h.shape == (batch, dim, ndim)
    want_y, want_h = cema_reference(x, params, h0)
    assert_rel(y, want_y, cema_tol(length), "y")
    assert_rel(h, want_h, cema_tol(length), "h")


def test_cema_reference_is_the_recurrence_unrolled():
    """Guards the reference itself: two steps by hand."""
    params = random_cema_params(4, 2, 3)
    x = random_x(5, 1, 2, 2)
    h0 = random_h0(6, 1, 2, 3)
    p, q, eta, omega = cema_coefficients({k: v.astype(np.float64) for k, v in params.items()})
    h1 = p * x[0, 0, :, None] + q * h0[0]
    h2 = p * x[0, 1, :, None] + q * h1
    y1 = np.real((eta * h2).sum(-1)) + omega * x[0, 1]
    y, h = cema_reference(x, params, h0)
    np.testing.assert_allclose(h[0], h2, rtol=1e-6)
    np.testing.assert_allclose(y[0, 1], y1, rtol=1e-6)


@pytest.mark.parametrize("case", ["T64", "long_memory"])
@pytest.mark.parametrize("cut", [1, 17, -1])
def test_cema_state_carries_across_calls(case, cut):
    batch, length, dim, ndim, alpha, delta = CEMA_CASES[case]
    length = min(length, 100)
    cut %= length
    params = random_cema_params(7, dim, ndim, alpha, delta)
    x = random_x(8, batch, length, dim)
    h0 = random_h0(9, batch, dim, ndim)
    cema = jax.jit(megalodon.cema)
    y, h = cema(x, params, h0)
    y1, h1 = cema(x[:, :cut], params, h0)
    y2, h2 = cema(x[:, cut:], params, h1)
    assert_rel(np.concatenate([y1, y2], 1), y, cema_tol(length), "y")
    assert_rel(h2, h, cema_tol(length), "h")
    # None is the zero state
    y0, h0_out = cema(x, params, None)
    yz, hz = cema(x, params, np.zeros_like(h0))
    assert_rel(yz, y0, 1e-6, "y (h0 = 0)")
    assert_rel(hz, h0_out, 1e-6, "h (h0 = 0)")


def test_cema_gradients():
    batch, length, dim, ndim = 2, 40, 4, 4
    # features are independent: one each random, slow decay (|q| ≈ 0.98) and fast (|q| ≈ 0)
    alpha, delta = (np.array(v)[:, None, None] for v in ([0, 0, 2, 8], [0, 0, -4, 8]))
    params = random_cema_params(10, dim, ndim, alpha, delta)
    x = random_x(11, batch, length, dim)
    h0 = random_h0(12, batch, dim, ndim)
    rng = np.random.default_rng(13)
    wy = rng.standard_normal((batch, length, dim))
    wr, wi = rng.standard_normal((2, batch, dim, ndim))

    def make_loss(cema):  # h0 enters as (Re, Im) so that no complex-gradient convention matters
        def loss(x, params, h0_re, h0_im):
            y, h = cema(x, params, jax.lax.complex(h0_re, h0_im))
            return jnp.sum(y * wy) + jnp.sum(jnp.real(h) * wr) + jnp.sum(jnp.imag(h) * wi)
        return loss

    args = (x, params, h0.real, h0.imag)
    got = jax.jit(jax.grad(make_loss(megalodon.cema), argnums=(0, 1, 2, 3)))(*args)
    with jax.enable_x64(True):
        args64 = jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64)), args)
        value, want = jax.jit(jax.value_and_grad(make_loss(cema_scan), argnums=(0, 1, 2, 3)))(
            *args64)
        want = jax.tree.map(np.asarray, want)
    assert want[0].dtype == np.float64
    # the scan is the float64 recurrence too
    y_ref, h_ref = cema_reference(x, params, h0)
    np.testing.assert_allclose(
        value, np.sum(y_ref * wy) + np.sum(h_ref.real * wr) + np.sum(h_ref.imag * wi), rtol=1e-9)
    named = {"x": (got[0], want[0]), "h0.real": (got[2], want[2]), "h0.imag": (got[3], want[3])}
    named.update({k: (got[1][k], want[1][k]) for k in CEMA_PARAMS})
    for name, (g, w) in named.items():
        assert np.abs(w).max() > 1e-3, name  # every input matters
        assert_rel(g, w, GRAD_TOL, f"d/d{name}")


def test_init_cema_params():
    dim, ndim = 256, 16
    params = megalodon.init_cema_params(jax.random.PRNGKey(0), dim, ndim)
    shapes = {"alpha": (dim, ndim, 1), "delta": (dim, ndim, 1), "theta": (dim, 1, 1),
              "gamma": (dim, ndim, 2), "omega": (dim, 1)}
    assert {k: tuple(np.shape(v)) for k, v in params.items()} == shapes
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    for name in ("alpha", "delta"):
        assert abs(p[name].mean()) < 0.03 and 0.17 < p[name].std() < 0.23, name
    assert np.all(p["gamma"][..., 1] == 0)
    assert abs(p["gamma"][..., 0].mean()) < 0.1 and 0.9 < p["gamma"][..., 0].std() < 1.1
    assert np.all(np.abs(p["omega"]) <= 1) and 0.2 < p["omega"].std() < 0.3
    decays = np.exp(-np.arange(1, dim + 1) * math.log(dim) / dim)
    got = sigmoid(p["theta"].ravel())
    np.testing.assert_allclose(np.sort(got), np.sort(decays), rtol=1e-5)
    assert not np.all(np.diff(got) < 0), "theta is not permuted"
    again = megalodon.init_cema_params(jax.random.PRNGKey(0), dim, ndim)
    other = megalodon.init_cema_params(jax.random.PRNGKey(1), dim, ndim)
    assert all(np.array_equal(params[k], again[k]) for k in shapes)
    assert not np.array_equal(params["alpha"], other["alpha"])
    # the initial parameters run
    y, h = jax.jit(megalodon.cema)(random_x(0, 1, 5, dim), params)
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(h))


# -------------------------------------------------------------------------- TimestepNorm


# jitted (num_groups static) as a model calls it; NormState passes through jit as a pytree
timestep_norm = jax.jit(megalodon.timestep_norm, static_argnums=3)


def make_state(count, mean, var):
    return megalodon.NormState(count=jnp.asarray(count, jnp.int32),
                               mean=jnp.asarray(mean, jnp.float32),
                               var=jnp.asarray(var, jnp.float32))


def state_arrays(state):
    """(count, mean, var) of a NormState, or of a plain tuple (the references' states)."""
    if isinstance(state, megalodon.NormState):
        return state.count, state.mean, state.var
    return tuple(state)


def state_row(state, rows):
    return megalodon.NormState(count=state.count[rows], mean=state.mean[rows],
                               var=state.var[rows])


def norm_reference(x, weight, bias, groups, eps=1e-5, state=None, mask=None):
    """numpy float64, one token at a time (Chan/Welford merge of the token's group values into
    the running (count, mean, M2)): (y [B, T, D], (count [B], mean [B, G], var [B, G]))."""
    x = np.asarray(x, np.float64)
    batch, length, dim = x.shape
    size = dim // groups
    xg = x.reshape(batch, length, groups, size)
    if state is None:
        count, mean, var = np.zeros(batch, np.int64), np.zeros((batch, groups)), np.zeros(
            (batch, groups))
    else:
        count, mean, var = (np.array(s, np.float64) for s in state_arrays(state))
        count = count.astype(np.int64)
    m2 = var * (count * size)[:, None]
    y = np.zeros_like(x)
    scale = np.asarray(weight, np.float64) + 1
    for b in range(batch):
        for t in range(length):
            if mask is not None and not mask[b, t]:
                continue
            v = xg[b, t]  # [G, size]
            n_a, token_mean = count[b] * size, v.mean(-1)
            n = n_a + size
            d = token_mean - mean[b]
            mean[b] = mean[b] + d * size / n
            m2[b] = m2[b] + ((v - token_mean[:, None]) ** 2).sum(-1) + d ** 2 * n_a * size / n
            count[b] += 1
            normed = (v - mean[b][:, None]) / np.sqrt(m2[b] / n + eps)[:, None]
            y[b, t] = normed.reshape(dim) * scale + np.asarray(bias, np.float64)
    var = m2 / np.maximum(count * size, 1)[:, None]
    return y, (count, mean, var)


def norm_scan(x, weight, bias, groups, eps=1e-5, state=None, mask=None):
    """norm_reference as a lax.scan in jnp (differentiable; run it in float64)."""
    batch, length, dim = x.shape
    size = dim // groups
    if state is None:
        state = (jnp.zeros(batch), jnp.zeros((batch, groups)), jnp.zeros((batch, groups)))
    count, mean, var = (jnp.asarray(s, x.dtype) for s in state_arrays(state))
    mask = jnp.ones((batch, length), bool) if mask is None else jnp.asarray(mask)

    def step(carry, inputs):
        count, mean, m2 = carry
        v, keep = inputs  # [B, G, size], [B]
        n_a = count[:, None] * size
        n = n_a + size  # ≥ size > 0: no 0/0 even where the token is masked out
        token_mean = v.mean(-1)
        d = token_mean - mean
        new_mean = mean + d * size / n
        new_m2 = m2 + ((v - token_mean[..., None]) ** 2).sum(-1) + d ** 2 * n_a * size / n
        y = (v - new_mean[..., None]) / jnp.sqrt(new_m2 / n + eps)[..., None]
        y = jnp.where(keep[:, None, None], y, 0)
        k = keep[:, None]
        return (count + keep, jnp.where(k, new_mean, mean), jnp.where(k, new_m2, m2)), y

    carry = (count, mean, var * (count * size)[:, None])
    xs = (jnp.swapaxes(x.reshape(batch, length, groups, size), 0, 1), mask.T)
    (count, mean, m2), y = jax.lax.scan(step, carry, xs)
    y = jnp.swapaxes(y, 0, 1).reshape(batch, length, dim) * (weight + 1) + bias
    y = jnp.where(mask[..., None], y, 0)
    return y, (count, mean, m2 / jnp.maximum(count * size, 1)[:, None])


def naive_f32_norm(x, weight, bias, groups, eps=1e-5):
    """The unstable textbook version: running Σx and Σx² in float32, σ² = E[x²] − E[x]²."""
    batch, length, dim = x.shape
    xg = x.astype(np.float32).reshape(batch, length, groups, dim // groups)
    n = (np.arange(1, length + 1, dtype=np.float32) * (dim // groups))[None, :, None]
    mean = np.cumsum(xg.sum(-1), 1, dtype=np.float32) / n
    var = np.cumsum((xg * xg).sum(-1), 1, dtype=np.float32) / n - mean * mean
    with np.errstate(invalid="ignore"):
        y = (xg - mean[..., None]) / np.sqrt(var + np.float32(eps))[..., None]
    return y.reshape(batch, length, dim) * (weight + 1) + bias


def random_affine(seed, dim):
    rng = np.random.default_rng(seed)
    return (0.5 * rng.standard_normal((2, dim))).astype(np.float32)


def prefix_state(seed, batch, dim, groups, offset=0.0, length=5):
    """The float64 statistics of a random 5-token past (rounded to the state's dtypes)."""
    past = random_x(seed, batch, length, dim, offset=offset)
    _, (count, mean, var) = norm_reference(past, np.zeros(dim), np.zeros(dim), groups)
    return past, make_state(count, mean, var)


def assert_state(state, want, tol, name="state"):
    count, mean, var = want
    assert isinstance(state, megalodon.NormState)
    assert state.count.dtype == jnp.int32 and state.mean.dtype == jnp.float32
    assert state.var.dtype == jnp.float32
    np.testing.assert_array_equal(state.count, count, err_msg=f"{name}.count")
    assert_rel(state.mean, mean, tol, f"{name}.mean")
    assert_rel(state.var, var, tol, f"{name}.var")


@pytest.mark.parametrize("with_state", [False, True], ids=["fresh", "state"])
@pytest.mark.parametrize("groups", [1, 2, 6])  # 6 = D: one feature per group
def test_timestep_norm_matches_reference(groups, with_state):
    batch, length, dim = 2, 33, 6
    x = random_x(20, batch, length, dim)
    weight, bias = random_affine(21, dim)
    past, state = prefix_state(22, batch, dim, groups) if with_state else (None, None)
    y, new_state = timestep_norm(x, weight, bias, groups, state=state)
    assert y.dtype == jnp.float32 and y.shape == x.shape
    want_y, want_state = norm_reference(x, weight, bias, groups, state=state)
    assert_rel(y, want_y, VALUE_TOL, "y")
    assert_state(new_state, want_state, VALUE_TOL)
    if with_state:  # the carried state is that past: same as running over past + x
        full_y, full_state = norm_reference(np.concatenate([past, x], 1), weight, bias, groups)
        assert_rel(y, full_y[:, past.shape[1]:], VALUE_TOL, "y vs past + x")
        assert_state(new_state, full_state, VALUE_TOL, "state vs past + x")


def test_timestep_norm_reference_by_hand():
    """Guards the reference: statistics at t are those of all group values up to t."""
    x = random_x(23, 1, 4, 4)
    weight, bias = random_affine(24, 4)
    y, (count, mean, var) = norm_reference(x, weight, bias, 2)
    x64, weight, bias = (np.asarray(a, np.float64) for a in (x, weight, bias))
    group = x64[0, :3, 2:]  # second group, t ≤ 2
    normed = (x64[0, 2, 2:] - group.mean()) / np.sqrt(group.var() + 1e-5)
    np.testing.assert_allclose(y[0, 2, 2:], normed * (weight[2:] + 1) + bias[2:], rtol=1e-9)
    per_group = x64[0].reshape(4, 2, 2).transpose(1, 0, 2).reshape(2, 8)  # [G, all values]
    np.testing.assert_allclose(mean[0], per_group.mean(-1), rtol=1e-9)
    np.testing.assert_allclose(var[0], per_group.var(-1), rtol=1e-9)
    assert count[0] == 4


@pytest.mark.parametrize("with_state", [False, True], ids=["fresh", "state"])
@pytest.mark.parametrize("groups", [1, 4])
def test_timestep_norm_large_offset(groups, with_state):
    batch, length, dim = 2, 64, 8
    x = random_x(25, batch, length, dim, offset=1000.0)
    weight, bias = random_affine(26, dim)
    state = prefix_state(27, batch, dim, groups, offset=1000.0)[1] if with_state else None
    y, new_state = timestep_norm(x, weight, bias, groups, state=state)
    want_y, (count, mean, var) = norm_reference(x, weight, bias, groups, state=state)
    assert_rel(y, want_y, OFFSET_TOL, "y")
    np.testing.assert_array_equal(new_state.count, count)
    assert_rel(new_state.mean, mean, 1e-6, "mean")
    assert_rel(new_state.var, var, OFFSET_TOL, "var")
    if not with_state:  # the tolerance is one a naive f32 implementation fails
        naive = naive_f32_norm(x, weight, bias, groups)
        naive_err = np.nan_to_num(np.abs(naive - want_y), nan=np.inf).max()
        assert naive_err > 5 * OFFSET_TOL * np.abs(want_y).max(), naive_err


@pytest.mark.parametrize("groups,cut", [(2, 1), (2, -1), (1, 13)])
def test_timestep_norm_state_carries_across_calls(groups, cut):
    batch, length, dim = 2, 30, 4
    cut %= length
    x = random_x(30, batch, length, dim, offset=0.5)
    weight, bias = random_affine(31, dim)
    state = prefix_state(32, batch, dim, groups)[1]
    for start in (None, state):
        y, s = timestep_norm(x, weight, bias, groups, state=start)
        y1, s1 = timestep_norm(x[:, :cut], weight, bias, groups, state=start)
        y2, s2 = timestep_norm(x[:, cut:], weight, bias, groups, state=s1)
        assert_rel(np.concatenate([y1, y2], 1), y, VALUE_TOL, "y")
        assert_state(s2, state_arrays(s), VALUE_TOL)


def random_mask(seed, batch, length):
    """Row 0 starts with masked tokens (count 0 there), row 1 is random, row 2 all masked."""
    mask = np.random.default_rng(seed).random((batch, length)) < 0.6
    mask[0, :3] = False
    mask[0, 5] = True
    mask[2] = False
    return mask


@pytest.mark.parametrize("groups,with_state", [(1, False), (2, True)])
def test_timestep_norm_mask(groups, with_state):
    batch, length, dim = 3, 25, 4
    x = random_x(40, batch, length, dim)
    weight, bias = random_affine(41, dim)
    mask = random_mask(42, batch, length)
    x[~mask] = random_x(44, int((~mask).sum()), dim, offset=1e4)  # padding may hold anything
    state = prefix_state(43, batch, dim, groups)[1] if with_state else None
    y, new_state = timestep_norm(x, weight, bias, groups, state=state, mask=mask)
    y = np.asarray(y)
    assert np.all(y[~mask] == 0), "masked-out outputs are not 0"
    want_y, want_state = norm_reference(x, weight, bias, groups, state=state, mask=mask)
    assert_rel(y, want_y, VALUE_TOL, "y")
    np.testing.assert_array_equal(new_state.count, want_state[0])
    for b in range(2):  # == the same row with its masked-out tokens removed
        row_state = None if state is None else state_row(state, slice(b, b + 1))
        kept_y, kept_state = timestep_norm(x[b:b + 1, mask[b]], weight, bias, groups,
                                                     state=row_state)
        assert_rel(y[b, mask[b]], kept_y[0], VALUE_TOL, f"row {b}")
        assert_state(state_row(new_state, b), state_arrays(state_row(kept_state, 0)), VALUE_TOL,
                     f"row {b} state")
    # the all-masked row leaves its state as it was
    assert int(new_state.count[2]) == (0 if state is None else int(state.count[2]))
    if state is not None:
        assert_rel(new_state.mean[2], state.mean[2], 1e-7, "untouched mean")
        assert_rel(new_state.var[2], state.var[2], 1e-7, "untouched var")
    # all-True is no mask
    y_all, s_all = timestep_norm(x, weight, bias, groups, state=state,
                                           mask=np.ones((batch, length), bool))
    y_none, s_none = timestep_norm(x, weight, bias, groups, state=state)
    assert_rel(y_all, y_none, 1e-6, "all-True mask")
    assert_state(s_all, state_arrays(s_none), 1e-6)


@pytest.mark.parametrize("groups,with_state,with_mask", [(1, False, False), (4, True, True),
                                                         (2, False, True)])
def test_timestep_norm_gradients(groups, with_state, with_mask):
    batch, length, dim = 3, 20, 8
    x = random_x(50, batch, length, dim, offset=0.3)
    weight, bias = random_affine(51, dim)
    state = prefix_state(52, batch, dim, groups)[1] if with_state else None
    mask = random_mask(53, batch, length) if with_mask else None
    cotangent = np.random.default_rng(54).standard_normal(x.shape)

    def make_loss(norm, state):
        def loss(x, weight, bias):
            y, _ = norm(x, weight, bias, groups, state=state, mask=mask)
            return jnp.sum(y * cotangent), y
        return loss

    got, _ = jax.jit(jax.grad(make_loss(megalodon.timestep_norm, state), (0, 1, 2),
                              has_aux=True))(x, weight, bias)
    with jax.enable_x64(True):
        args64 = [jnp.asarray(a, jnp.float64) for a in (x, weight, bias)]
        state64 = None if state is None else [np.asarray(s, np.float64)
                                              for s in state_arrays(state)]
        y64, want = jax.jit(jax.value_and_grad(make_loss(norm_scan, state64), (0, 1, 2),
                                               has_aux=True))(*args64)
        y64, want = np.asarray(y64[1]), [np.asarray(w) for w in want]
    np.testing.assert_allclose(y64,
                               norm_reference(x, weight, bias, groups, state=state, mask=mask)[0],
                               atol=1e-10)  # the scan is the float64 reference too
    for name, g, w in zip(("x", "weight", "bias"), got, want):
        assert np.abs(w).max() > 1e-2, name
        assert_rel(g, w, GRAD_TOL, f"d/d{name}")
    if with_mask:
        assert np.all(np.asarray(got[0])[~mask] == 0), "masked-out tokens get gradient"


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("groups", [3, 5, 0])
def test_groups_must_divide_features(groups):
    x = random_x(60, 1, 4, 8)
    weight, bias = np.zeros((2, 8), np.float32)
    with pytest.raises(ValueError, match="num_groups"):
        megalodon.timestep_norm(x, weight, bias, groups)


@pytest.mark.parametrize("name,shape", [
    ("alpha", (4, 3)), ("alpha", (5, 3, 1)), ("delta", (4, 2, 1)), ("delta", (4, 3, 2)),
    ("theta", (4, 3, 1)), ("theta", (4,)), ("gamma", (4, 3)), ("gamma", (4, 3, 1)),
    ("omega", (4,)), ("omega", (3, 1)),
])
def test_cema_rejects_bad_param_shapes(name, shape):
    params = random_cema_params(61, 4, 3)
    params[name] = np.zeros(shape, np.float32)
    with pytest.raises(ValueError, match=name):
        megalodon.cema(random_x(62, 2, 5, 4), params)


def test_cema_rejects_bad_h0_and_missing_params():
    params = random_cema_params(65, 4, 3)
    x = random_x(66, 2, 5, 4)
    with pytest.raises(ValueError, match="h0"):
        megalodon.cema(x, params, random_h0(67, 2, 4, 2))
    with pytest.raises(ValueError, match="omega"):
        megalodon.cema(x, {k: v for k, v in params.items() if k != "omega"})


def test_timestep_norm_rejects_bad_affine_shapes():
    x = random_x(68, 1, 4, 8)
    with pytest.raises(ValueError, match="weight"):
        megalodon.timestep_norm(x, np.zeros(4, np.float32), np.zeros(8, np.float32), 2)


def test_cema_rejects_params_for_another_width():
    """Parameters consistent among themselves but for D = 5, on inputs of D = 4."""
    with pytest.raises(ValueError):
        megalodon.cema(random_x(63, 2, 5, 4), random_cema_params(64, 5, 3))
