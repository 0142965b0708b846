"""S²-Attn (impl "s2") against a plain masked reference, its sparsity pattern, and in a model.

The reference builds the full [Hq, T, T] mask (causal & same segment & same group, where the
group of token i is i // G for the first half of the query heads and (i + G/2) // G for the
second; and, when given, the sliding window q_pos − kv_pos < w and chunks q_pos // c ==
kv_pos // c), repeats k/v per query head and takes a softmax over all T keys in plain jnp; its
gradients come from autodiff. Both sides are f32 with q, k, v ~ N(0, 1), D = 16: values and
gradients agree to f32 rounding (atol 1e-5).
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

TOL = dict(atol=1e-5, rtol=1e-5)
HEAD_DIM = 16
ROPE = lx.RopeConfig.from_hf({"rope_theta": 10000.0, "max_position_embeddings": 64,
                              "head_dim": HEAD_DIM})


def random_qkv(seed, batch, length, q_heads, kv_heads):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal((batch, length, heads, HEAD_DIM)), jnp.float32)
                 for heads in (q_heads, kv_heads, kv_heads))


def reference_mask(length, group, q_heads, positions, segment_ids, causal, window=None,
                   chunk_size=None):
    """bool [B, Hq, T, T]: the S²-Attn pattern, built densely."""
    index = np.arange(length)
    plain, shifted = index // group, (index + group // 2) // group
    same_group = np.stack([plain[:, None] == plain[None, :],
                           shifted[:, None] == shifted[None, :]])
    same_group = same_group[np.arange(q_heads) // (q_heads // 2)]  # [Hq, T, T] by head half
    mask = segment_ids[:, :, None] == segment_ids[:, None, :]
    q_pos, kv_pos = positions[:, :, None], positions[:, None, :]
    if causal:
        mask &= kv_pos <= q_pos
    if window is not None:
        mask &= q_pos - kv_pos < window
    if chunk_size is not None:
        mask &= q_pos // chunk_size == kv_pos // chunk_size
    return same_group[None] & mask[:, None]


def reference_attention(q, k, v, mask):
    repeats = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, repeats, axis=2), jnp.repeat(v, repeats, axis=2)
    scores = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.shape[-1])
    probs = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)
    return jnp.einsum("bhts,bshd->bthd", probs, v)


def rotate(x, positions):
    return lx.rope.apply(x, *lx.rope.cos_sin(ROPE, positions))


def value_and_grads(fn, q, k, v, cotangent):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(cotangent)


CASES = {  # batch, T, Hq, Hkv, group_size, packed, rope, causal, mask (window, chunk_size)
    "T16": (1, 16, 4, 2, None, False, False, True, {}),
    "T64-packed": (2, 64, 4, 2, None, True, False, True, {}),
    "T64-mqa-packed-rope": (2, 64, 4, 1, None, True, True, True, {}),
    "T24-G6-odd-kv-rope": (2, 24, 6, 3, 6, False, True, True, {}),
    "T16-one-group": (1, 16, 2, 2, 16, False, False, True, {}),
    "T32-G4-bidirectional": (1, 32, 4, 2, 4, True, False, False, {}),
    "T64-packed-window5-rope": (2, 64, 4, 2, None, True, True, True, dict(window=5)),
    "T64-chunk12": (1, 64, 4, 2, None, False, False, True, dict(chunk_size=12)),
    "T32-G8-bidirectional-window3-chunk6": (1, 32, 4, 2, 8, False, False, False,
                                            dict(window=3, chunk_size=6)),
}


@pytest.mark.parametrize("case", CASES)
def test_matches_reference(case):
    batch, length, q_heads, kv_heads, group_size, packed, rope, causal, mask_args = CASES[case]
    q, k, v = random_qkv(length + q_heads, batch, length, q_heads, kv_heads)
    rng = np.random.default_rng(length)
    if packed:
        segment_ids, positions = packed_documents(rng, rows=batch, length=length, documents=4)
    else:
        segment_ids = np.zeros((batch, length), np.int32)
        positions = np.broadcast_to(np.arange(length), (batch, length))
    mask = reference_mask(length, group_size or length // 4, q_heads, positions, segment_ids,
                          causal, **mask_args)
    positions, segment_ids = jnp.asarray(positions), jnp.asarray(segment_ids)

    def ours(q, k, v):
        return attention.attend(q, k, v, impl="s2", causal=causal, rope=ROPE if rope else None,
                                positions=positions, group_size=group_size,
                                segment_ids=segment_ids if packed else None, **mask_args)

    def reference(q, k, v):
        if rope:
            q, k = rotate(q, positions), rotate(k, positions)
        return reference_attention(q, k, v, mask)

    cotangent = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    out, grads = jax.jit(functools.partial(value_and_grads, ours))(q, k, v, cotangent)
    ref_out, ref_grads = jax.jit(functools.partial(value_and_grads, reference))(q, k, v,
                                                                                 cotangent)
    np.testing.assert_allclose(out, ref_out, **TOL)
    for name, grad, ref_grad in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(grad, ref_grad, **TOL, err_msg=f"d{name}")


def changed_tokens(perturbed, length=32, group=8):
    """Which tokens' outputs change, per head half [2, T], when k and v of `perturbed` tokens
    change (Hq = 4, Hkv = 2: heads 0, 1 unshifted, 2, 3 shifted)."""
    q, k, v = random_qkv(0, 1, length, 4, 2)
    noise = np.zeros(k.shape, np.float32)
    noise[:, perturbed] = 1.0
    attend = jax.jit(functools.partial(attention.attend, impl="s2", group_size=group))
    delta = jnp.abs(attend(q, k + noise, v + noise) - attend(q, k, v))  # [1, T, Hq, D]
    return np.asarray(delta.reshape(length, 2, -1).max(axis=-1).T > 1e-6)


def test_no_wraparound():
    """The first half-group [0, G/2) is a group of its own for the shifted heads: the last
    half-group [T − G/2, T) never sees it (the roll-based fallback would wrap onto it)."""
    plain, shifted = changed_tokens(slice(0, 4))
    np.testing.assert_array_equal(plain, np.arange(32) < 8)
    np.testing.assert_array_equal(shifted, np.arange(32) < 4)


def test_groups_do_not_see_each_other():
    """Keys of [G, 2G) reach queries of that group (unshifted heads), and of the shifted groups
    [G/2, 3G/2) and [3G/2, 5G/2) at or after G (causal); nothing else."""
    plain, shifted = changed_tokens(slice(8, 16))
    index = np.arange(32)
    np.testing.assert_array_equal(plain, (index >= 8) & (index < 16))
    np.testing.assert_array_equal(shifted, (index >= 8) & (index < 20))


def test_rejects_bad_input():
    q, k, v = random_qkv(1, 1, 12, 4, 2)
    with pytest.raises(ValueError, match=r"T = 12 must be a multiple of 8 .* G = T/4"):
        attention.attend(q, k, v, impl="s2")
    with pytest.raises(ValueError, match="group_size G = 3 must be even"):
        attention.attend(q, k, v, impl="s2", group_size=3)
    with pytest.raises(ValueError, match="group_size G = 8 .* divide the sequence length"):
        attention.attend(q, k, v, impl="s2", group_size=8)
    assert attention.attend(q, k, v, impl="s2", group_size=6).shape == q.shape
    q_odd, k_odd, v_odd = random_qkv(1, 1, 16, 3, 1)
    with pytest.raises(ValueError, match="Hq = 3"):
        attention.attend(q_odd, k_odd, v_odd, impl="s2")
    with pytest.raises(ValueError, match="self-attention for training.*KV cache"):
        attention.attend(q[:, :1], k, v, impl="s2")


@pytest.fixture(scope="module")
def tiny_models():
    config = lx.ModelConfig.from_hf(dict(
        model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64))
    full = lx.Model.init(config, jax.random.key(0))
    # Weights ×5 (std 0.1) so attention is far from uniform and the patterns' difference shows.
    params = jax.tree_util.tree_map(lambda x: 5 * x, full.params)
    return lx.Model(config, params), lx.Model(config, params, attention="s2")


def test_model_forward(tiny_models):
    """T = 32, G = 8: the first G/2 tokens see all their predecessors under both patterns, so
    their logits equal full attention's; later tokens differ."""
    full, s2 = tiny_models
    ids = np.random.default_rng(0).integers(0, 64, (2, 32))
    ours, reference = np.asarray(s2(ids)), np.asarray(full(ids))
    np.testing.assert_allclose(ours[:, :4], reference[:, :4], atol=1e-4, rtol=0)  # logits ~10
    assert np.abs(ours[:, 4:] - reference[:, 4:]).max(axis=(0, 2)).min() > 0.1


def test_model_generates_with_full_attention(tiny_models):
    """With a KV cache the "s2" model runs full attention (as LongLoRA does at inference)."""
    full, s2 = tiny_models
    prompt = np.random.default_rng(1).integers(0, 64, (1, 7))  # 7: no valid S²-Attn length
    np.testing.assert_array_equal(np.asarray(lx.generate(s2, prompt, 3)),
                                  np.asarray(lx.generate(full, prompt, 3)))


def test_cost_is_t_times_g():
    """Compiled at T = 2048 (not run), forward and backward: with G = T/4 the largest
    temporaries are the groups' score matrices, ~T·G + (T + G)·G per head pair instead of 2·T²,
    so S²-Attn needs well under half of full attention's temporary memory."""
    shape = (1, 2048, 2, 64)
    specs = [jax.ShapeDtypeStruct(shape, jnp.float32)] * 3

    def temp_bytes(impl):
        def loss(q, k, v):
            return attention.attend(q, k, v, impl=impl).sum()

        stats = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*specs).compile()
        stats = stats.memory_analysis()
        if stats is None:
            pytest.skip("compiled.memory_analysis() is unavailable on this backend")
        return stats.temp_size_in_bytes

    full, s2 = temp_bytes("xla"), temp_bytes("s2")
    assert full >= 2 * 2048 * 2048 * 4  # one f32 [Hq, T, T] score matrix at least
    assert s2 < full / 2, (s2, full)
