"""attend(impl="flash") (Pallas, interpreted on CPU) against attend(impl="xla").

The xla path is itself tested against a float64 reference (test_attention.py), so these tests
compare values and gradients of q, k, v with the two implementations fed the same inputs.
Rope enters the flash kernels un-rotated and is applied in-kernel; the xla path rotates q and
k first, with `lx.rope.rotate_qk`. Both use `lx.rope.rotation` with the same f32 angles, so in
f32 the rotated q, k agree to an ulp and the differences are summation order alone.

Tolerances (f32, q, k, v ~ N(0, 1), D = 32): outputs are convex combinations of v rows, O(1);
the online softmax reassociates sums of up to S ≈ 260 terms, ~1e-7 relative each, and the
softmax max shift differs per block: observed differences are ≤ 1e-6, compared at atol 1e-5.
Gradients of the random linear functional <out, cotangent> reach ~10 and dk, dv sum over
T·G ≈ 1600 terms, accumulated in a different order (per q block in the kernel, all at once in
XLA): observed ≤ 5e-6, compared at atol 2e-5, rtol 1e-5 (as test_attention.py does against
float64). bf16: see test_bf16_inputs.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from packing import packed_documents

import lctx_jax as lx
from lctx_jax import attention
from lctx_jax.attention import flash, masks

VALUE_TOL = dict(atol=1e-5, rtol=1e-5)
GRAD_TOL = dict(atol=2e-5, rtol=1e-5)
HEAD_DIM = 32


def random_qkv(seed, batch, q_len, kv_len, q_heads, kv_heads, head_dim=HEAD_DIM,
               dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal((batch, length, heads, head_dim)), dtype)
                 for length, heads in ((q_len, q_heads), (kv_len, kv_heads), (kv_len, kv_heads)))


ROPES = {
    "default": {},
    "linear": {"rope_type": "linear", "factor": 4.0},
    "ntk": {"rope_type": "ntk", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    "longrope": {"rope_type": "longrope", "original_max_position_embeddings": 64,
                 "start_tokens": 4},  # + short/long factors sized by rope_config
    "llama3": {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 32,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0},
}
# Partial rotary on some types (rotary_dim 16 or 24 of 32: the pass-through dims and the
# permuted layout are exercised).
PARTIAL = {"default": 1.0, "linear": 1.0, "ntk": 0.75, "dynamic": 1.0, "yarn": 0.5,
           "longrope": 0.5, "llama3": 0.75}


def rope_config(rope_type, head_dim=HEAD_DIM, partial=None):
    partial = PARTIAL[rope_type] if partial is None else partial
    scaling = dict(ROPES[rope_type])
    if rope_type == "longrope":
        half = int(head_dim * partial) // 2
        scaling.update(short_factor=list(np.linspace(1.0, 2.0, half)),
                       long_factor=list(np.linspace(1.0, 8.0, half)))
    return lx.RopeConfig.from_hf({
        "head_dim": head_dim, "rope_theta": 10000.0, "max_position_embeddings": 64,
        "partial_rotary_factor": partial, "rope_scaling": scaling or None})


@functools.partial(jax.jit, static_argnames=("impl", "causal", "rope", "block_size", "driver",
                                             "window", "chunk_size"))
def values_and_grads(q, k, v, cotangent, positions, kv_positions, segment_ids, kv_segment_ids,
                     *, impl, causal, rope, block_size, driver, window=None, chunk_size=None):
    """out and d<out, cotangent>/d(q, k, v) for one implementation ("flash" calls the module
    directly, to choose the driver)."""
    def run(q, k, v):
        if impl == "xla":
            return attention.attend(q, k, v, impl="xla", causal=causal, rope=rope,
                                    positions=positions, kv_positions=kv_positions,
                                    segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                                    window=window, chunk_size=chunk_size)
        return flash.attend(q, k, v, causal=causal, positions=positions,
                            kv_positions=kv_positions, segment_ids=segment_ids,
                            kv_segment_ids=kv_segment_ids, scale=q.shape[-1] ** -0.5,
                            rope=rope, block_size=block_size, driver=driver, window=window,
                            chunk_size=chunk_size)

    out, vjp = jax.vjp(run, q, k, v)
    return out, vjp(cotangent.astype(out.dtype))


def compare(q, k, v, *, causal=True, rope=None, positions=None, kv_positions=None,
            segment_ids=None, kv_segment_ids=None, block_size=64, driver="grid",
            value_tol=VALUE_TOL, grad_tol=GRAD_TOL):
    """flash vs xla on the same inputs: values and gradients; returns flash's (out, grads)."""
    batch, q_len, kv_len = q.shape[0], q.shape[1], k.shape[1]
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(q_len), (batch, q_len))
    if kv_positions is None:
        kv_positions = positions if kv_len == q_len else jnp.broadcast_to(jnp.arange(kv_len),
                                                                          (batch, kv_len))
    if segment_ids is not None and kv_segment_ids is None:
        kv_segment_ids = segment_ids
    cotangent = jnp.asarray(np.random.default_rng(99).standard_normal(q.shape), jnp.float32)
    args = (q, k, v, cotangent, positions, kv_positions, segment_ids, kv_segment_ids)
    kwargs = dict(causal=causal, rope=rope)
    out, grads = values_and_grads(*args, impl="flash", block_size=block_size, driver=driver,
                                  **kwargs)
    ref_out, ref_grads = values_and_grads(*args, impl="xla", block_size=None, driver=None,
                                          **kwargs)
    assert out.dtype == q.dtype and out.shape == q.shape
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref_out, np.float32),
                               **value_tol)
    for name, grad, ref_grad in zip("qkv", grads, ref_grads):
        grad = np.asarray(grad, np.float32)
        assert np.isfinite(grad).all(), f"d{name} has NaN/inf"
        np.testing.assert_allclose(grad, np.asarray(ref_grad, np.float32), **grad_tol,
                                   err_msg=f"d{name}")
    return out, grads


# ----------------------------------------------------------------------------- shapes and masks


@pytest.mark.parametrize("groups, causal, driver", [
    (1, True, "grid"), (2, True, "grid"), (4, True, "grid"), (8, True, "grid"),
    (4, False, "grid"), (8, True, "loop"), (1, False, "loop")])
def test_matches_xla(groups, causal, driver):
    """T = 200 with blocks of 64: the last q and kv blocks are padded. Default rope."""
    q, k, v = random_qkv(groups, 2, 200, 200, 8, 8 // groups)
    compare(q, k, v, causal=causal, rope=rope_config("default"), driver=driver)


def test_without_rope_through_attend():
    """impl="flash" via attention.attend, default positions, no rope, block_size 48."""
    q, k, v = random_qkv(10, 1, 100, 100, 4, 2)
    out = jax.jit(functools.partial(attention.attend, impl="flash", block_size=48))(q, k, v)
    ref = jax.jit(functools.partial(attention.attend, impl="xla"))(q, k, v)
    np.testing.assert_allclose(out, ref, **VALUE_TOL)


@pytest.mark.parametrize("driver, block", [("grid", 64), ("loop", 64), ("grid", 256)])
def test_packed_documents(driver, block):
    """Rows of 8 documents of random lengths; positions restart at 0 in each document, so
    causal block skipping by position must not skip blocks of later documents. Blocks of 256
    widen the grid driver's 128-lane query positions and segment ids by whole registers."""
    rng = np.random.default_rng(1)
    q, k, v = random_qkv(1, 2, 260, 260, 4, 2)
    segment_ids, positions = packed_documents(rng, rows=2, length=260, documents=8)
    compare(q, k, v, rope=rope_config("yarn"), segment_ids=jnp.asarray(segment_ids),
            positions=jnp.asarray(positions), driver=driver, block_size=block)


@pytest.mark.parametrize("q_len, driver", [(1, "grid"), (7, "grid"), (7, "loop")])
def test_decode_against_a_cache(q_len, driver):
    """T new tokens at positions 150.. against a cache of 200 slots (T != S, kv_positions
    given); slots past the last position are masked by causality, and dynamic NTK and the
    frequencies use seq_len 200 for both q and k."""
    q, k, v = random_qkv(2, 2, q_len, 200, 8, 2)
    positions = jnp.broadcast_to(150 + jnp.arange(q_len), (2, q_len))
    kv_positions = jnp.broadcast_to(jnp.arange(200), (2, 200))
    compare(q, k, v, rope=rope_config("dynamic"), positions=positions,
            kv_positions=kv_positions, driver=driver)


def test_permuted_positions():
    """Arbitrary positions (a random permutation, as ring attention's load balancing makes):
    causal skipping may only use each block's min and max position."""
    rng = np.random.default_rng(3)
    q, k, v = random_qkv(3, 2, 192, 192, 4, 1)
    positions = jnp.asarray(np.stack([rng.permutation(192), np.arange(192)[::-1]]))
    compare(q, k, v, rope=rope_config("llama3"), positions=positions)


def test_query_with_no_visible_key_gives_zeros_and_finite_grads():
    q, k, v = random_qkv(4, 2, 90, 90, 4, 4)
    segment_ids = np.ones((2, 90), np.int32)
    segment_ids[:, 5] = 7  # no key has id 7
    out, grads = compare(q, k, v, rope=rope_config("default"),
                         segment_ids=jnp.asarray(segment_ids),
                         kv_segment_ids=jnp.ones((2, 90), jnp.int32))
    assert (np.asarray(out)[:, 5] == 0).all()
    assert (np.asarray(grads[0])[:, 5] == 0).all()


@pytest.mark.parametrize("driver", ["grid", "loop"])
@pytest.mark.parametrize("mask, first_seen", [
    (dict(window=40), 161), (dict(chunk_size=64), 192), (dict(window=100, chunk_size=64), 192)],
    ids=["window-40", "chunk-64", "window-100-chunk-64"])
def test_skipped_blocks_are_not_computed(driver, mask, first_seen):
    """32 queries at positions 200..231 against 256 keys at 0..255 in kv blocks of 32: with a
    window of 40 the queries see keys 161.. (kv blocks 5-7), with chunks of 64 keys 192..
    (blocks 6, 7). The keys and values of the blocks before the first visible key are NaN. A
    computed block would give its hidden keys weight p = 0 and 0·NaN = NaN in out (p·v) and in
    dq, dk (dS = scale·p ⊙ (dout·vᵀ − δ)), as the xla path shows; finite results equal to xla's
    with zeros there mean masks.may_see skipped them, forward and backward."""
    q, k, v = random_qkv(30, 1, 32, 256, 4, 2)
    skipped = first_seen // 32 * 32  # whole blocks
    poisoned = [x.at[:, :skipped].set(jnp.nan) for x in (k, v)]
    clean = [x.at[:, :skipped].set(0.0) for x in (k, v)]
    cotangent = jnp.asarray(np.random.default_rng(99).standard_normal(q.shape), jnp.float32)
    arrays = (cotangent, 200 + jnp.arange(32)[None], jnp.arange(256)[None], None, None)
    kwargs = dict(causal=True, rope=rope_config("default"), block_size=32, **mask)
    out, grads = values_and_grads(q, *poisoned, *arrays, impl="flash", driver=driver, **kwargs)
    ref_out, ref_grads = values_and_grads(q, *clean, *arrays, impl="xla", driver=None, **kwargs)
    unskipped, _ = values_and_grads(q, *poisoned, *arrays, impl="xla", driver=None, **kwargs)
    assert np.isnan(unskipped).all()
    np.testing.assert_allclose(out, ref_out, **VALUE_TOL)
    for name, grad, ref_grad in zip("qkv", grads, ref_grads):
        assert np.isfinite(grad).all(), f"d{name}"
        np.testing.assert_allclose(grad, ref_grad, **GRAD_TOL, err_msg=f"d{name}")
    assert (np.asarray(grads[1])[:, :skipped] == 0).all()


# ----------------------------------------------------------------------------- rope


@pytest.mark.parametrize("rope_type", list(ROPES))
def test_every_rope_type(rope_type):
    """Positions 0..99 (> max_position_embeddings 64: dynamic NTK rescales, longrope takes its
    long factors and keeps 4 start tokens unscaled), GQA 2, partial rotary on some types."""
    q, k, v = random_qkv(20, 1, 100, 100, 4, 2)
    compare(q, k, v, rope=rope_config(rope_type), block_size=32)


@pytest.mark.parametrize("head_dim", [36, 33])
def test_partial_rotary_odd_sizes(head_dim):
    """rotary_dim 12 of head_dim 36 (24 pass-through dims) and of 33 (21: the permuted layout
    pads one zero dim to pair them up). Linear scaling, non-causal."""
    rope = lx.RopeConfig(rope_type="linear", factor=2.0, head_dim=head_dim, rotary_dim=12)
    q, k, v = random_qkv(21, 1, 40, 40, 2, 1, head_dim=head_dim)
    compare(q, k, v, causal=False, rope=rope, block_size=16)


# ----------------------------------------------------------------------------- bf16


def flash_only_rounding(q, k, v, cotangent, positions, rope):
    """Σ|a||b| of the four sums of products in which flash rounds one factor to bf16 and xla
    does not, from the f32 reference on the same values (float64 here): out = p·v and
    dv = pᵀ·dout round p, dq' = dS·k' and dk' = dSᵀ·q' round dS = scale·p ⊙ (dP − δ).
    dq, dk then pass R(−θ) = cos·x − sin·rotate_half(x), which mixes the two lanes of a pair
    with weights of norm a (the attention factor): at most √2·a times the larger error.
    Returns [out, dq, dk, dv] of the shapes of q, q, k, v."""
    kv_heads, groups = k.shape[2], q.shape[2] // k.shape[2]
    q_rot, k_rot = (np.asarray(x, np.float64) for x in attention.rotate_qk(
        q.astype(jnp.float32), k.astype(jnp.float32), rope, positions, positions))
    k_rot, v = np.repeat(k_rot, groups, 2), np.repeat(np.asarray(v, np.float64), groups, 2)
    scale = q.shape[-1] ** -0.5
    scores = np.einsum("bthd,bshd->bhts", q_rot, k_rot) * scale
    scores = np.where(np.tril(np.ones(scores.shape[-2:], bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    d_out = np.asarray(cotangent, np.float64)
    out = np.einsum("bhts,bshd->bthd", probs, v)
    delta = np.einsum("bthd,bthd->bht", d_out, out)[..., None]
    d_scores = np.abs(scale * probs * (np.einsum("bthd,bshd->bhts", d_out, v) - delta))
    unrotate = np.sqrt(2) * float(lx.rope.frequencies(rope)[1])

    def per_kv_head(x):  # [B, S, Hq, D] -> [B, S, Hkv, D]: a key/value head's query heads
        return x.reshape(*x.shape[:2], kv_heads, groups, x.shape[-1]).sum(axis=3)

    return [np.einsum("bhts,bshd->bthd", probs, np.abs(v)),
            unrotate * np.einsum("bhts,bshd->bthd", d_scores, np.abs(k_rot)),
            unrotate * per_kv_head(np.einsum("bhts,bthd->bshd", d_scores, np.abs(q_rot))),
            per_kv_head(np.einsum("bhts,bthd->bshd", probs, np.abs(d_out)))]


def test_bf16_inputs():
    """bf16 q, k, v: flash and xla both against xla in f32 on the same (bf16) values.

    Both bf16 paths round the rotated q and k, the cotangent, the output and the gradients to
    bf16 (unit roundoff u = 2^-8), xla at least as often as flash (it rotates, and takes the
    rotation's VJP, in bf16 arithmetic; flash rotates in f32 and rounds once), so xla's error
    bounds flash's share of those. Flash also rounds to bf16 one factor of four sums of products
    that xla keeps f32 (p before p·v and pᵀ·dout, dS before dS·k' and dSᵀ·q', the matrix unit's
    input type), which adds at most u·Σ|a||b| per sum (`flash_only_rounding`). So per output
        max|flash − exact| <= max|xla − exact| + u · max Σ|a||b|,
    and the mean error <= 2^-7 of the mean magnitude (bf16 keeps 8 significant bits).
    Observed: flash 0.009-0.033, xla 0.015-0.046, u·max Σ|a||b| 0.012-0.091; mean relative
    errors ~0.003 (xla ~0.005).
    """
    rope = rope_config("yarn")
    q, k, v = random_qkv(6, 2, 150, 150, 8, 2, dtype=jnp.bfloat16)
    positions = jnp.broadcast_to(jnp.arange(150), (2, 150))
    cotangent = jnp.asarray(np.random.default_rng(99).standard_normal(q.shape), jnp.float32)
    common = dict(causal=True, rope=rope)

    def run(impl, dtype, **kw):
        out, grads = values_and_grads(*(x.astype(dtype) for x in (q, k, v)), cotangent,
                                      positions, positions, None, None, impl=impl, **common,
                                      **kw)
        return [np.asarray(x, np.float32) for x in (out, *grads)]

    exact = run("xla", jnp.float32, block_size=None, driver=None)
    xla_bf16 = run("xla", jnp.bfloat16, block_size=None, driver=None)
    flash_bf16 = run("flash", jnp.bfloat16, block_size=64, driver="grid")
    extra = flash_only_rounding(q, k, v, cotangent, positions, rope)
    for name, ref, ours, theirs, sums in zip(["out", "dq", "dk", "dv"], exact, flash_bf16,
                                             xla_bf16, extra):
        ours_err, theirs_err = np.abs(ours - ref).max(), np.abs(theirs - ref).max()
        assert np.isfinite(ours).all()
        assert ours_err <= theirs_err + 2.0 ** -8 * sums.max(), (name, ours_err, theirs_err)
        assert np.abs(ours - ref).mean() <= 2.0 ** -7 * np.abs(ref).mean(), name


# ----------------------------------------------------------------------------- on a mesh


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
@pytest.mark.parametrize("axes", [dict(data=2, fsdp=2, tensor=2), dict(fsdp=8),
                                  dict(data=2, tensor=4)])
def test_on_a_mesh_matches_xla(axes):
    """Under a mesh the kernel runs per device on its rows and heads (shard_map): values and
    gradients equal the unsharded xla path, with GQA groups kept whole, packed documents and a
    length-dependent rotation (dynamic NTK: its base must come from the global max position).
    tensor=4 does not divide the 2 key/value heads: heads stay whole, rows are still split."""
    mesh = lx.make_mesh(**{"data": 1, **axes})
    q, k, v = random_qkv(3, 4, 96, 96, 4, 2)
    rope = rope_config("dynamic")
    segment_ids, positions = map(jnp.asarray, packed_documents(np.random.default_rng(4), 4,
                                                               96, 3))
    positions = positions * jnp.arange(1, 5)[:, None]  # rows reach different lengths
    cotangent = jnp.asarray(np.random.default_rng(5).standard_normal(q.shape), jnp.float32)

    def out_and_grads(impl, **extra):
        def run(q, k, v):
            return attention.attend(q, k, v, impl=impl, rope=rope, positions=positions,
                                    segment_ids=segment_ids, **extra)
        out, vjp = jax.vjp(run, q, k, v)
        return out, vjp(cotangent)

    out, grads = jax.jit(lambda: out_and_grads("flash", mesh=mesh, block_size=32))()
    ref_out, ref_grads = jax.jit(lambda: out_and_grads("xla"))()
    np.testing.assert_allclose(out, ref_out, **VALUE_TOL)
    for name, grad, ref_grad in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(grad, ref_grad, **GRAD_TOL, err_msg=f"d{name}")


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
def test_a_mesh_splitting_the_sequence_is_refused():
    q, k, v = random_qkv(0, 2, 64, 64, 4, 2)
    with pytest.raises(ValueError, match="attention='ring'"):
        attention.attend(q, k, v, impl="flash", mesh=lx.make_mesh(data=2, sequence=4))


# ----------------------------------------------------------------------------- pieces


@pytest.mark.parametrize("backend", ["cpu", "tpu"])
def test_swap_halves_variants(backend):
    """jnp.roll (interpret) and pltpu.roll (TPU) by half the axis swap the halves, bitwise."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((16, 64)), jnp.float32)
    out = jax.jit(functools.partial(flash.swap_halves, backend=backend))(x)
    np.testing.assert_array_equal(out, jnp.concatenate([x[:, 32:], x[:, :32]], axis=1))


@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_rope_tables_rotate_as_lx_rope(partial):
    """The streamed tables rotate a block exactly as lx.rope.apply does, bitwise, whole (TPU,
    interpret) or as halves (GPU): LongRoPE with kept start tokens, and a partial rotary head
    in the kernels' permuted layout (pass-through lanes untouched). The transposed rotation
    (sin negated) undoes the rotation."""
    rope = rope_config("longrope", partial=partial)
    positions = jnp.arange(0, 200, 3)[None]
    inv_freq, factor = lx.rope.frequencies(rope, 200)
    dim, pieces = flash._qk_layout(HEAD_DIM, rope.rotary_dim, "cpu")
    lanes = dim // 2
    static = flash._Rope(factor=float(factor), start_tokens=4, lanes=lanes,
                         freqs=rope.rotary_dim // 2)
    freqs = (flash._pad_freqs(inv_freq, lanes),
             flash._pad_freqs(lx.rope.default_frequencies(rope), lanes))
    cos, sin = flash.rope_tables(static, positions, freqs, jnp.float32)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((1, positions.shape[1], 1, dim)),
                    jnp.float32)
    ref_cos, ref_sin = lx.rope.cos_sin(rope, positions, seq_len=200)
    expected = lx.rope.apply(x, ref_cos, ref_sin)  # rotary dims first, pass-through after
    if pieces is not None:  # the kernels' layout of x and of the rotated x
        x, expected = (jnp.concatenate([y[..., a:b] for a, b in pieces], axis=-1)
                       for y in (x, expected))
    rows, c, s = x[0, :, 0], cos[0], sin[0]
    half = dim // 2
    whole = flash.rotate((rows,), (c,), (s,), "cpu")[0]
    halves = flash.rotate(*((y[:, :half], y[:, half:]) for y in (rows, c, s)), "gpu")
    halves = jnp.concatenate(halves, axis=-1)
    np.testing.assert_array_equal(whole, expected[0, :, 0])
    np.testing.assert_array_equal(halves, expected[0, :, 0])
    back = flash.rotate((whole,), (c,), (-s,), "cpu")[0]
    scale = jnp.where(jnp.arange(dim) % half < rope.rotary_dim // 2, factor ** 2, 1.0)
    np.testing.assert_allclose(back / scale, rows, atol=1e-5)


def test_block_ranges():
    """Causal, 4 q and 4 kv blocks of 64 at positions 0..255: q block i computes kv blocks
    0..i, kv block j is seen by q blocks j..3. A window of 64 keeps the diagonal and the block
    before it; queries that see no block get the empty range [0, 0)."""
    positions = jnp.arange(256)[None]
    kv_lo, kv_hi, q_lo, q_hi = flash.block_ranges(masks.Mask(), positions, positions, 4, 4)
    np.testing.assert_array_equal(kv_lo, [[0, 0, 0, 0]])
    np.testing.assert_array_equal(kv_hi, [[1, 2, 3, 4]])
    np.testing.assert_array_equal(q_lo, [[0, 1, 2, 3]])
    np.testing.assert_array_equal(q_hi, [[4, 4, 4, 4]])
    kv_lo, kv_hi, _, _ = flash.block_ranges(masks.Mask(window=64), positions, positions, 4, 4)
    np.testing.assert_array_equal(kv_lo, [[0, 0, 1, 2]])
    np.testing.assert_array_equal(kv_hi, [[1, 2, 3, 4]])
    late_keys = positions + 1000  # every key after every query
    kv_lo, kv_hi, q_lo, q_hi = flash.block_ranges(masks.Mask(), positions, late_keys, 4, 4)
    assert not np.asarray(kv_hi - kv_lo).any() and not np.asarray(q_hi - q_lo).any()
    assert int(flash._clamp(0, 2, 4)) == 2 and int(flash._clamp(3, 0, 2)) == 1
    assert int(flash._clamp(3, 0, 0)) == 0


def test_partial_rotary_layout_is_a_permutation():
    """[rot₁ | pass₁ | rot₂ | pass₂], rotate-half partners D'/2 apart."""
    dim, pieces = flash._qk_layout(33, 12, "cpu")
    perm = np.concatenate([np.arange(start, stop) for start, stop in pieces])
    assert dim == 34 and sorted(perm) == list(range(34))
    assert list(perm[:6]) == list(range(6)) and list(perm[17:23]) == list(range(6, 12))
    assert flash._qk_layout(32, 32, "cpu") == (32, None)
    assert flash._qk_layout(80, 80, "gpu")[0] == 128  # Triton: power-of-two tensors


# ----------------------------------------------------------------------------- real backends


def _lower(backend, platform, dtype, causal, segments, rope_type, head_dim, block, **mask):
    """Traces forward + backward for `backend` and lowers them for `platform`, no device.
    mask: window, chunk_size."""
    rope = None if rope_type is None else rope_config(rope_type, head_dim=head_dim, partial=0.5)
    shapes = [(2, 256, 4, head_dim), (2, 256, 2, head_dim), (2, 256, 2, head_dim),
              (2, 256, 4, head_dim)]
    specs = [jax.ShapeDtypeStruct(s, dtype) for s in shapes]
    specs += [jax.ShapeDtypeStruct((2, 256), jnp.int32)] * 2

    def fwd_bwd(q, k, v, cotangent, positions, segment_ids):
        def run(q, k, v):
            return flash.attend(q, k, v, causal=causal, positions=positions,
                                kv_positions=positions,
                                segment_ids=segment_ids if segments else None,
                                kv_segment_ids=segment_ids if segments else None, scale=0.1,
                                rope=rope, block_size=block, backend=backend, **mask)
        out, vjp = jax.vjp(run, q, k, v)
        return out, vjp(cotangent)

    text = jax.jit(fwd_bwd).trace(*specs).lower(lowering_platforms=(platform,)).as_text()
    target = {"cuda": "triton", "tpu": "tpu_custom_call"}[platform]
    kernels = [line for line in text.splitlines() if "custom_call" in line and target in line]
    assert len(kernels) == 3, text[:2000]  # forward, dq, dk/dv


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_kernels_lower_for_gpu_and_tpu(backend, monkeypatch):
    """Pallas -> Triton IR (GPU) and Pallas -> Mosaic (TPU) lowering of forward and backward,
    without hardware: catches unsupported primitives, non-power-of-two Triton tensors and
    illegal TPU block shapes; a sliding window with chunks exercises floor division of block
    positions and scalar block bounds. (Triton's PTX compilation and Mosaic's layout passes
    and compilation run only on the device: untested.) The TPU case describes a v5e through a
    private JAX module; if that module changes, this test fails rather than skips."""
    if backend == "tpu":
        try:  # TPU lowering asks the default device for its TPU generation: say v5e.
            from jax._src.pallas.mosaic import tpu_info
            monkeypatch.setitem(tpu_info.registry, jax.devices()[0].device_kind, lambda:
                                tpu_info._get_tpu_info_impl(tpu_info.ChipVersion.TPU_V5E, 1))
        except (ImportError, AttributeError) as error:
            pytest.fail(f"cannot describe a TPU to the Mosaic lowering ({error}): update this "
                        "test to the private module of this JAX version")
    platform = {"gpu": "cuda", "tpu": "tpu"}[backend]
    block = 128 if backend == "tpu" else 64
    _lower(backend, platform, jnp.bfloat16, True, True, "longrope", 128, block)
    _lower(backend, platform, jnp.float32, False, False, None, 80, block)
    _lower(backend, platform, jnp.bfloat16, True, True, "default", 64, block, window=100,
           chunk_size=96)


# ----------------------------------------------------------------------------- ring's chunks


def test_chunks_merge_to_full_attention():
    """chunk_forward over two halves of the keys, merged by their logsumexps, equals attention
    over all keys; chunk_backward with the global lse and delta, summed over the chunks (dq) and
    per chunk (dk, dv), equals its gradients: how ring attention uses the kernels per hop. The
    first q block sees no key of the second chunk (lse +inf there, weight 0)."""
    q, k, v = random_qkv(40, 2, 128, 128, 4, 2)
    positions = jnp.broadcast_to(jnp.arange(128), (2, 128))
    segment_ids = jnp.broadcast_to((jnp.arange(128) >= 50).astype(jnp.int32), (2, 128))
    cotangent = jnp.asarray(np.random.default_rng(99).standard_normal(q.shape), jnp.float32)
    mask, scale = masks.Mask(causal=True), HEAD_DIM ** -0.5
    halves = [slice(0, 64), slice(64, 128)]

    def chunk(part):
        return dict(kv_positions=positions[:, part], kv_segment_ids=segment_ids[:, part])

    common = dict(positions=positions, segment_ids=segment_ids, mask=mask, scale=scale,
                  block_size=32)
    parts = [flash.chunk_forward(q, k[:, part], v[:, part], **common, **chunk(part))
             for part in halves]
    assert np.isinf(np.asarray(parts[1][1][:, :32])).all()
    finite = [jnp.where(jnp.isinf(lse), -jnp.inf, lse) for _, lse in parts]
    lse = jnp.logaddexp(*finite)
    out = sum(o * jnp.exp(l - lse)[..., None] for (o, _), l in zip(parts, finite))
    ref_out, ref_grads = values_and_grads(q, k, v, cotangent, positions, positions, segment_ids,
                                          segment_ids, impl="xla", causal=True, rope=None,
                                          block_size=None, driver=None)
    np.testing.assert_allclose(out, ref_out, **VALUE_TOL)
    delta = jnp.sum(cotangent * out, axis=-1)
    grads = [flash.chunk_backward(q, k[:, part], v[:, part], cotangent, lse, delta, **common,
                                  **chunk(part)) for part in halves]
    np.testing.assert_allclose(grads[0][0] + grads[1][0], ref_grads[0], **GRAD_TOL)
    for index, name in ((1, "k"), (2, "v")):
        np.testing.assert_allclose(jnp.concatenate([g[index] for g in grads], axis=1),
                                   ref_grads[index], **GRAD_TOL, err_msg=f"d{name}")
