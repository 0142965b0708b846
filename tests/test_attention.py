"""lctx_jax.attention.attend (impl "xla", both paths) against a naive float64 reference.

The reference (numpy float64) repeats k/v per query group, builds the full [T, S] score matrix
and an explicit mask, takes an unshifted softmax and differentiates by hand, so differences are
our f32 rounding alone. With q, k, v ~ N(0, 1) and D = 32, outputs are O(1) and f32 sums of up
to 300 terms are good to ~1e-6: values are compared at atol 1e-5. Gradients (of a random linear
functional of the output) reach ~10 and dk, dv sum over T·G (up to 2400) terms; their f32 error
is ~5e-6: atol 2e-5.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from packing import packed_documents

import lctx_jax as lx
from lctx_jax import attention
from lctx_jax.attention import masks, xla

VALUE_TOL = dict(atol=1e-5, rtol=1e-5)
GRAD_TOL = dict(atol=2e-5, rtol=1e-5)
PATHS = {"plain": None, "blockwise": 128}  # block_size; 128 forces the blockwise path


def random_qkv(seed, batch, q_len, kv_len, q_heads, kv_heads, head_dim=32):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal((batch, length, heads, head_dim)), jnp.float32)
                 for length, heads in ((q_len, q_heads), (kv_len, kv_heads), (kv_len, kv_heads)))


def reference_mask(causal, positions, kv_positions, segment_ids=None, kv_segment_ids=None):
    positions, kv_positions = np.asarray(positions), np.asarray(kv_positions)
    mask = np.ones((positions.shape[0], positions.shape[1], kv_positions.shape[1]), bool)
    for b in range(mask.shape[0]):
        if causal:
            mask[b] &= kv_positions[b][None, :] <= positions[b][:, None]
        if segment_ids is not None:
            mask[b] &= np.asarray(kv_segment_ids)[b][None, :] == np.asarray(segment_ids)[b][:, None]
    return mask


def reference_attention(q, k, v, mask, cotangent=None):
    """float64 numpy output [B, T, Hq, D] for `mask` [B, T, S]; rows with no True give zeros.

    With `cotangent`, also the hand-derived gradients of <output, cotangent> w.r.t. q, k, v.
    """
    batch, kv_len, kv_heads, head_dim = k.shape
    groups = q.shape[2] // kv_heads

    def heads_first(x):  # [B, L, H, D] -> [B, H, L, D], float64
        return np.asarray(x, np.float64).transpose(0, 2, 1, 3)

    q, k, v = heads_first(q), heads_first(k), heads_first(v)
    k_rep, v_rep = np.repeat(k, groups, axis=1), np.repeat(v, groups, axis=1)
    scale = 1 / math.sqrt(head_dim)
    scores = q @ k_rep.transpose(0, 1, 3, 2) * scale  # [B, Hq, T, S]
    weights = np.where(mask[:, None], np.exp(scores), 0.0)  # |scores| << 700: exp is safe
    total = weights.sum(axis=-1, keepdims=True)
    probs = weights / np.where(total > 0, total, 1.0)
    out = (probs @ v_rep).transpose(0, 2, 1, 3)
    if cotangent is None:
        return out
    d_out = heads_first(cotangent)
    d_probs = d_out @ v_rep.transpose(0, 1, 3, 2)
    d_scores = probs * (d_probs - (d_probs * probs).sum(axis=-1, keepdims=True)) * scale
    d_q = d_scores @ k_rep
    d_k = d_scores.transpose(0, 1, 3, 2) @ q
    d_v = probs.transpose(0, 1, 3, 2) @ d_out

    def sum_over_groups(x):  # [B, Hq, S, D] -> [B, S, Hkv, D]: the adjoint of np.repeat
        return x.reshape(batch, kv_heads, groups, kv_len, head_dim).sum(axis=2).transpose(
            0, 2, 1, 3)

    return out, (d_q.transpose(0, 2, 1, 3), sum_over_groups(d_k), sum_over_groups(d_v))


attend_jit = jax.jit(attention.attend, static_argnames=("impl", "causal", "rope", "mesh",
                                                        "scale", "block_size"))


@functools.partial(jax.jit, static_argnames=("causal", "block_size"))
def ours_with_grads(q, k, v, cotangent, *, causal, block_size, **arrays):
    """attend's output and d<output, cotangent>/d(q, k, v); `arrays`: positions, segment ids."""
    out, vjp = jax.vjp(lambda q, k, v: attention.attend(q, k, v, causal=causal,
                                                        block_size=block_size, **arrays), q, k, v)
    return out, vjp(cotangent)


def check_against_reference(q, k, v, *, causal=True, positions=None, kv_positions=None,
                            segment_ids=None, kv_segment_ids=None, block_size=None,
                            with_grads=True):
    """Values (and gradients) of attend vs the reference; returns our output."""
    batch, q_len, kv_len = q.shape[0], q.shape[1], k.shape[1]
    ref_positions = np.broadcast_to(np.arange(q_len) if positions is None else positions,
                                    (batch, q_len))
    ref_kv_positions = kv_positions if kv_positions is not None else (
        ref_positions if kv_len == q_len else np.broadcast_to(np.arange(kv_len), (batch, kv_len)))
    mask = reference_mask(causal, ref_positions, ref_kv_positions, segment_ids,
                          segment_ids if kv_segment_ids is None else kv_segment_ids)
    arrays = dict(positions=positions, kv_positions=kv_positions, segment_ids=segment_ids,
                  kv_segment_ids=kv_segment_ids)
    if not with_grads:
        out = np.asarray(attend_jit(q, k, v, causal=causal, block_size=block_size, **arrays))
        np.testing.assert_allclose(out, reference_attention(q, k, v, mask), **VALUE_TOL)
        return out
    cotangent = jnp.asarray(np.random.default_rng(99).standard_normal(q.shape), jnp.float32)
    ref_out, ref_grads = reference_attention(q, k, v, mask, cotangent)
    out, grads = ours_with_grads(q, k, v, cotangent, causal=causal, block_size=block_size,
                                 **arrays)
    out, grads = np.asarray(out), [np.asarray(g) for g in grads]
    assert out.dtype == np.float32 and out.shape == q.shape
    np.testing.assert_allclose(out, ref_out, **VALUE_TOL)
    for name, grad, ref_grad in zip("qkv", grads, ref_grads):
        assert np.isfinite(grad).all(), f"d{name} has NaN/inf"
        np.testing.assert_allclose(grad, ref_grad, **GRAD_TOL, err_msg=f"d{name}")
    return out


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("groups, causal", [(1, True), (2, True), (4, True), (8, True),
                                            (4, False)])
def test_matches_reference(path, groups, causal):
    # T = 300 is no multiple of the blockwise path's block (128): the last block is padded.
    q, k, v = random_qkv(groups, 2, 300, 300, 8, 8 // groups)
    check_against_reference(q, k, v, causal=causal, block_size=PATHS[path])


@pytest.mark.parametrize("path", PATHS)
def test_packed_documents(path):
    """Rows of 8 documents of random lengths; each document's positions restart at 0."""
    rng = np.random.default_rng(1)
    q, k, v = random_qkv(1, 2, 260, 260, 4, 2)
    segment_ids, positions = packed_documents(rng, rows=2, length=260, documents=8)
    check_against_reference(q, k, v, segment_ids=jnp.asarray(segment_ids),
                            positions=jnp.asarray(positions), block_size=PATHS[path])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("q_len", [1, 7])
def test_decode_against_a_cache(path, q_len):
    """T new tokens at positions 150.. against a cache of 200 slots; slots past the last
    position (not yet written) are masked by causality."""
    q, k, v = random_qkv(2, 2, q_len, 200, 8, 2)
    positions = jnp.broadcast_to(150 + jnp.arange(q_len), (2, q_len))
    kv_positions = jnp.broadcast_to(jnp.arange(200), (2, 200))
    check_against_reference(q, k, v, positions=positions, kv_positions=kv_positions,
                            block_size=PATHS[path] and 64, with_grads=False)


@pytest.mark.parametrize("path", PATHS)
def test_left_padded_batch(path):
    """Row 1 has 9 pad tokens (segment 0) in front; its real tokens equal the unpadded run."""
    q, k, v = random_qkv(3, 2, 40, 40, 4, 2)
    pad = 9
    segment_ids = jnp.asarray([[1] * 40, [0] * pad + [1] * (40 - pad)])
    positions = jnp.asarray([list(range(40)), [0] * pad + list(range(40 - pad))])
    block_size = PATHS[path] and 16
    out = check_against_reference(q, k, v, segment_ids=segment_ids, positions=positions,
                                  block_size=block_size)
    alone = attend_jit(q[1:, pad:], k[1:, pad:], v[1:, pad:], block_size=block_size)
    np.testing.assert_allclose(out[1:, pad:], alone, atol=1e-6)


@pytest.mark.parametrize("path", PATHS)
def test_query_with_no_visible_key_gives_zeros(path):
    q, k, v = random_qkv(4, 2, 50, 50, 4, 4)
    segment_ids = np.ones((2, 50), np.int32)
    segment_ids[:, 5] = 7  # no key has id 7
    out = check_against_reference(q, k, v, segment_ids=jnp.asarray(segment_ids),
                                   kv_segment_ids=jnp.ones((2, 50), jnp.int32),
                                   block_size=PATHS[path] and 16)
    assert (out[:, 5] == 0).all()


ROPE_CONFIGS = {
    "default": {},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    "longrope": {"rope_type": "longrope", "original_max_position_embeddings": 64,
                 "short_factor": list(np.linspace(1.0, 2.0, 16)),
                 "long_factor": list(np.linspace(1.0, 8.0, 16))},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
}


def rope_config(rope_type):
    return lx.RopeConfig.from_hf({"head_dim": 32, "rope_theta": 10000.0,
                                  "max_position_embeddings": 64,
                                  "rope_scaling": ROPE_CONFIGS[rope_type] or None})


@functools.partial(jax.jit, static_argnames=("rope", "seq_len"))
def rotate(x, positions, *, rope, seq_len):
    return lx.rope.apply(x, *lx.rope.cos_sin(rope, positions, seq_len=seq_len))


@pytest.mark.parametrize("rope_type", ROPE_CONFIGS)
def test_rope_inside_equals_rotating_outside(rope_type):
    """Decode step at position 99 against a cache of 100 (> 64, so longrope takes its long
    factors and dynamic NTK rescales): both sides use seq_len 100 for q and for k."""
    rope = rope_config(rope_type)
    q, k, v = random_qkv(5, 2, 1, 100, 4, 2)
    positions = jnp.full((2, 1), 99)
    kv_positions = jnp.broadcast_to(jnp.arange(100), (2, 100))
    inside = attend_jit(q, k, v, rope=rope, positions=positions, kv_positions=kv_positions)
    outside = attend_jit(rotate(q, positions, rope=rope, seq_len=100),
                         rotate(k, kv_positions, rope=rope, seq_len=100), v,
                         positions=positions, kv_positions=kv_positions)
    np.testing.assert_allclose(inside, outside, atol=1e-6)


def test_rope_uses_one_seq_len_for_q_and_k():
    """Query at 10, keys at 0..99: q is rotated with seq_len 100 (LongRoPE's long factors),
    not the 11 its own positions would give."""
    rope = rope_config("longrope")
    q, k, _ = random_qkv(6, 1, 1, 100, 2, 2)
    positions, kv_positions = jnp.full((1, 1), 10), jnp.arange(100)[None]
    rotated_q, rotated_k = jax.jit(attention.rotate_qk, static_argnames="rope")(
        q, k, rope=rope, positions=positions, kv_positions=kv_positions)
    np.testing.assert_array_equal(rotated_q, rotate(q, positions, rope=rope, seq_len=100))
    np.testing.assert_array_equal(rotated_k, rotate(k, kv_positions, rope=rope, seq_len=100))
    assert np.abs(rotated_q - rotate(q, positions, rope=rope, seq_len=11)).max() > 1e-3


@pytest.mark.parametrize("path", PATHS)
def test_bf16_inputs(path):
    """bf16 q, k, v vs the float64 reference on the same (bf16-representable) values.

    Products of bf16 numbers are exact in f32, and scores, softmax and accumulation are f32, so
    the one coarse error is rounding the output to bf16: 8 significant bits, unit roundoff
    2^-8 relative. rtol 2^-8 bounds that; atol 1e-5 covers the f32 error near 0.
    """
    q, k, v = (x.astype(jnp.bfloat16) for x in random_qkv(6, 2, 300, 300, 8, 2))
    out = attend_jit(q, k, v, block_size=PATHS[path])
    assert out.dtype == jnp.bfloat16
    positions = np.broadcast_to(np.arange(300), (2, 300))
    ref = reference_attention(*(np.asarray(x.astype(jnp.float32)) for x in (q, k, v)),
                              reference_mask(True, positions, positions))
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), ref, rtol=2.0 ** -8,
                               atol=1e-5)


def temp_bytes(fn, *shapes):
    specs = [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in shapes]
    stats = jax.jit(fn).lower(*specs).compile().memory_analysis()
    if stats is None:
        pytest.skip("compiled.memory_analysis() is unavailable on this backend")
    return stats.temp_size_in_bytes


def test_blockwise_memory_is_far_below_the_score_matrix():
    """At T = S = 32768 (compiled, not run) the automatic path is blockwise: forward and
    backward temporaries stay under 1/20 of one f32 [T, S] score matrix (4 GiB)."""
    length = 32768
    shape = (1, length, 1, 64)
    score_bytes = length * length * 4

    def loss(q, k, v):
        return attention.attend(q, k, v).sum()

    assert temp_bytes(attention.attend, shape, shape, shape) < score_bytes / 20
    assert temp_bytes(jax.grad(loss, argnums=(0, 1, 2)), shape, shape, shape) < score_bytes / 20
    # The measure does see score matrices: the plain path at 4096² needs at least one.
    small = (1, 4096, 1, 64)
    positions = jnp.broadcast_to(jnp.arange(4096), (1, 4096))

    def plain(q, k, v):
        return xla.plain(q, k, v, mask=masks.Mask(causal=True), positions=positions,
                         kv_positions=positions, segment_ids=None, kv_segment_ids=None,
                         scale=0.125)

    assert temp_bytes(plain, small, small, small) >= 4096 * 4096 * 4


def test_impl_choices():
    q, k, v = random_qkv(7, 1, 8, 8, 2, 1)
    assert attention.attend(q, k, v, impl="s2").shape == q.shape  # checked in test_s2.py
    with pytest.raises(ValueError, match="'xla', 'flash', 'ring', 's2'"):
        attention.attend(q, k, v, impl="pallas")


def test_rejects_bad_shapes():
    q, k, v = random_qkv(8, 1, 8, 8, 3, 2)
    with pytest.raises(ValueError, match="multiple"):
        attention.attend(q, k, v)
    q, k, v = random_qkv(8, 1, 1, 8, 2, 1)
    with pytest.raises(ValueError, match="kv_segment_ids"):
        attention.attend(q, k, v, segment_ids=jnp.zeros((1, 1), jnp.int32))
