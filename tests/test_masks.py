"""Sliding-window and chunked masks (lctx_jax.attention.masks) in every implementation.

Each implementation is compared with a dense reference written here: the mask built directly
from the positions and segment ids with numpy, then `jnp.where` + softmax over all keys in f32
(autodiff for the gradients of a random linear functional <out, cotangent>). Rows that see no
key give NaN in that softmax; a second `jnp.where` zeroes them, and its VJP keeps the NaN away
from the gradients (it passes nothing to hidden scores). Both sides are f32 with q, k, v ~
N(0, 1), D = 32, at most 96 keys: they differ by summation order alone, observed ≤ 1e-6 on
values and ≤ 2e-6 on gradients; compared at atol 1e-5 and 2e-5, rtol 1e-5, as
test_attention.py does.

Blocks: xla's blockwise path and flash use blocks of 32 (3 per sequence), ring a ring of 4
devices (times 2 for the batch: 8 devices) with tiles of 6 (zigzag halves of 12) or 8, so
windows of 3 and 12 are smaller than a block, 40 larger, and chunk boundaries (24) fall inside
blocks: flash's and ring's block skipping (`masks.may_see`) is exercised in both directions.
Also: masks.visible and masks.may_see against brute force, and argument validation.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from packing import packed_documents

from lctx_jax import attention
from lctx_jax.attention import flash, masks, ring

VALUE_TOL = dict(atol=1e-5, rtol=1e-5)
GRAD_TOL = dict(atol=2e-5, rtol=1e-5)
BATCH, LENGTH, Q_HEADS, KV_HEADS, HEAD_DIM = 2, 96, 4, 2, 32


# ----------------------------------------------------------------------------- dense reference


def dense_mask(positions, kv_positions, segment_ids, kv_segment_ids, *, causal=True,
               window=None, chunk_size=None):
    """bool [B, T, S], written out directly from the definitions."""
    q_pos = np.asarray(positions)[:, :, None]
    kv_pos = np.asarray(kv_positions)[:, None, :]
    mask = np.ones(np.broadcast_shapes(q_pos.shape, kv_pos.shape), bool)
    if causal:
        mask &= kv_pos <= q_pos
    if window is not None:
        mask &= q_pos - kv_pos < window
    if chunk_size is not None:
        mask &= np.floor_divide(q_pos, chunk_size) == np.floor_divide(kv_pos, chunk_size)
    if segment_ids is not None:
        mask &= np.asarray(segment_ids)[:, :, None] == np.asarray(kv_segment_ids)[:, None, :]
    return mask


def dense_attention(q, k, v, mask):
    """softmax(q kᵀ / sqrt(D), where mask) v in f32 by repeating k, v per query head; mask
    [B, T, S] (or [B, Hq, T, S]); rows with no visible key give 0."""
    groups = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    mask = jnp.asarray(mask)
    mask = mask[:, None] if mask.ndim == 3 else mask
    scores = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.shape[-1])
    probs = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)
    probs = jnp.where(mask, probs, 0.0)
    return jnp.einsum("bhts,bshd->bthd", probs, v)


# ----------------------------------------------------------------------------- implementations


def ring_mesh():
    """All 8 (simulated) devices: the batch over "data", a ring of 4 over "sequence"."""
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "sequence"))


def run_impl(impl, q, k, v, arrays, mask_args):
    """One implementation's output; arrays: positions, kv_positions, segment ids [B, L]."""
    if impl.startswith("flash"):
        mask_args = {"causal": True, **mask_args}
        return flash.attend(q, k, v, scale=q.shape[-1] ** -0.5, block_size=32,
                            driver=impl.split("-")[1], **arrays, **mask_args)
    extra = {"xla-plain": dict(impl="xla"), "xla-blockwise": dict(impl="xla", block_size=32),
             "ring": dict(impl="ring", mesh=ring_mesh(), block_size=8)}[impl]
    return attention.attend(q, k, v, **arrays, **mask_args, **extra)


IMPLS = ["xla-plain", "xla-blockwise", "flash-grid", "flash-loop", "ring"]
SELF_ONLY = {"ring"}  # self-attention: T == S and kv_positions == positions

# name: (mask arguments, inputs). Inputs: "arange" (positions 0..T−1), "packed" (documents with
# positions restarting at 0), "permuted" (row 0 a random permutation: block bounds are all a
# skipping test may use), "lonely" (some queries' segment id matches no key), "decode" (5
# queries at positions 70.., 80, 90, 110, 75 against 64 cached keys: with window 20 the queries
# at 90 and 110 see nothing).
CASES = {
    "window-3": (dict(window=3), "arange"),
    "window-40": (dict(window=40), "arange"),
    "chunk-24": (dict(chunk_size=24), "arange"),
    "chunk-32-bidirectional": (dict(chunk_size=32, causal=False), "arange"),
    "window-16-bidirectional": (dict(window=16, causal=False), "arange"),
    "window-10-chunk-24": (dict(window=10, chunk_size=24), "arange"),
    "window-7-packed": (dict(window=7), "packed"),
    "window-20-permuted": (dict(window=20), "permuted"),
    "window-12-lonely": (dict(window=12), "lonely"),
    "window-20-decode": (dict(window=20), "decode"),
}
NOTHING_VISIBLE = {"lonely": [(0, 30), (1, 5), (1, 70)], "decode": [(0, 2), (0, 3), (1, 2),
                                                                     (1, 3)]}


def inputs(kind, seed):
    """q, k, v and the position / segment arrays of one input kind."""
    rng = np.random.default_rng(seed)
    q_len, kv_len = (5, 64) if kind == "decode" else (LENGTH, LENGTH)
    q, k, v = (jnp.asarray(rng.standard_normal((BATCH, length, heads, HEAD_DIM)), jnp.float32)
               for length, heads in ((q_len, Q_HEADS), (kv_len, KV_HEADS), (kv_len, KV_HEADS)))
    positions = np.broadcast_to(np.arange(q_len), (BATCH, q_len))
    kv_positions, segment_ids, kv_segment_ids = positions, None, None
    if kind == "packed":
        segment_ids, positions = packed_documents(rng, rows=BATCH, length=LENGTH, documents=5)
        kv_positions, kv_segment_ids = positions, segment_ids
    elif kind == "permuted":
        positions = np.stack([rng.permutation(LENGTH), np.arange(LENGTH)])
        kv_positions = positions
    elif kind == "lonely":
        kv_segment_ids = np.zeros((BATCH, LENGTH), np.int32)
        segment_ids = kv_segment_ids.copy()
        for row, index in NOTHING_VISIBLE["lonely"]:
            segment_ids[row, index] = 7
    elif kind == "decode":
        positions = np.broadcast_to(np.array([70, 80, 90, 110, 75]), (BATCH, q_len))
        kv_positions = np.broadcast_to(np.arange(kv_len), (BATCH, kv_len))
    arrays = dict(positions=positions, kv_positions=kv_positions, segment_ids=segment_ids,
                  kv_segment_ids=kv_segment_ids)
    return (q, k, v), {name: None if x is None else jnp.asarray(x, jnp.int32)
                       for name, x in arrays.items()}


def out_and_grads(fn, q, k, v):
    cotangent = jnp.asarray(np.random.default_rng(99).standard_normal(q.shape), jnp.float32)

    @jax.jit
    def run(q, k, v):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(cotangent)

    out, grads = run(q, k, v)
    return np.asarray(out), [np.asarray(g) for g in grads]


@pytest.mark.parametrize("case, impl", [
    (case, impl) for case, (_, kind) in CASES.items() for impl in IMPLS
    if not (impl in SELF_ONLY and kind == "decode")])
def test_matches_dense_reference(case, impl):
    mask_args, kind = CASES[case]
    (q, k, v), arrays = inputs(kind, seed=len(case))
    mask = dense_mask(**arrays, **mask_args)
    ours = out_and_grads(lambda q, k, v: run_impl(impl, q, k, v, arrays, mask_args), q, k, v)
    ref = out_and_grads(lambda q, k, v: dense_attention(q, k, v, mask), q, k, v)
    np.testing.assert_allclose(ours[0], ref[0], **VALUE_TOL)
    for name, grad, ref_grad in zip("qkv", ours[1], ref[1]):
        assert np.isfinite(grad).all() and np.isfinite(ref_grad).all(), f"d{name}"
        np.testing.assert_allclose(grad, ref_grad, **GRAD_TOL, err_msg=f"d{name}")
    for row, index in NOTHING_VISIBLE.get(kind, []):
        assert not mask[row, index].any()
        assert (ours[0][row, index] == 0).all() and (ours[1][0][row, index] == 0).all()


# ----------------------------------------------------------------------------- the pieces


MASKS = [masks.Mask(), masks.Mask(causal=False), masks.Mask(window=5),
         masks.Mask(causal=False, window=5), masks.Mask(chunk_size=7),
         masks.Mask(causal=False, chunk_size=7), masks.Mask(window=6, chunk_size=16),
         masks.Mask(causal=False, window=1, chunk_size=3)]


@pytest.mark.parametrize("mask", MASKS, ids=str)
def test_visible_on_any_leading_dims(mask):
    """masks.visible on [T] / [S] (a kernel block), [B, T] / [B, S], and leading dims that
    broadcast ([3, 1, T] with [1, 2, S]), against the dense definition; positions may be
    negative (floor division)."""
    rng = np.random.default_rng(0)
    q_pos, kv_pos = rng.integers(-20, 40, (3, 1, 11)), rng.integers(-20, 40, (1, 2, 13))
    seg, kv_seg = rng.integers(0, 2, (3, 1, 11)), rng.integers(0, 2, (1, 2, 13))
    args = dict(causal=mask.causal, window=mask.window, chunk_size=mask.chunk_size)
    expected = dense_mask(np.broadcast_to(q_pos, (3, 2, 11)).reshape(6, 11),
                          np.broadcast_to(kv_pos, (3, 2, 13)).reshape(6, 13),
                          np.broadcast_to(seg, (3, 2, 11)).reshape(6, 11),
                          np.broadcast_to(kv_seg, (3, 2, 13)).reshape(6, 13), **args)
    got = masks.visible(mask, jnp.asarray(q_pos), jnp.asarray(kv_pos), jnp.asarray(seg),
                        jnp.asarray(kv_seg))
    np.testing.assert_array_equal(np.asarray(got).reshape(6, 11, 13), expected)
    one_block = masks.visible(mask, jnp.asarray(q_pos[0, 0]), jnp.asarray(kv_pos[0, 0]))
    np.testing.assert_array_equal(one_block, dense_mask(q_pos[0], kv_pos[0], None, None,
                                                        **args)[0])


@pytest.mark.parametrize("mask", MASKS, ids=str)
def test_may_see_never_skips_a_visible_pair(mask):
    """For random blocks of random positions, a pair of blocks with a visible (query, key) is
    never ruled out; for contiguous blocks (arange positions) and no chunks, only pairs with
    one are (the bounds test is exact there). Bounds also come as numpy arrays (ring's
    work_per_device)."""
    rng = np.random.default_rng(1)
    for contiguous in (False, True):
        if contiguous:
            starts = rng.integers(-30, 30, (200, 2))
            q_pos = starts[:, :1] + np.arange(6)
            kv_pos = starts[:, 1:] + np.arange(9)
        else:
            q_pos, kv_pos = rng.integers(-30, 30, (200, 6)), rng.integers(-30, 30, (200, 9))
        seen = dense_mask(q_pos, kv_pos, None, None, causal=mask.causal, window=mask.window,
                          chunk_size=mask.chunk_size).any(axis=(1, 2))
        bounds = dict(q_min=q_pos.min(1), q_max=q_pos.max(1), kv_min=kv_pos.min(1),
                      kv_max=kv_pos.max(1))
        may = masks.may_see(mask, **{name: bounds[name] for name in mask.bounds})
        if may is None:
            assert mask.bounds == () and seen.all()
            continue
        assert may[seen].all()
        if contiguous and mask.chunk_size is None:
            np.testing.assert_array_equal(may, seen)
        traced = masks.may_see(mask, **{name: jnp.asarray(bounds[name]) for name in mask.bounds})
        np.testing.assert_array_equal(traced, may)


def test_bounds_named_by_the_mask():
    assert masks.Mask().bounds == ("q_max", "kv_min")
    assert masks.Mask(causal=False).bounds == ()
    assert masks.Mask(causal=False, window=4).bounds == ("q_min", "kv_max")
    assert masks.Mask(window=4).bounds == masks.BOUNDS
    assert masks.Mask(causal=False, chunk_size=4).bounds == masks.BOUNDS


@pytest.mark.parametrize("name", ["window", "chunk_size"])
@pytest.mark.parametrize("value", [0, -3, 2.5, True, "8", jnp.int32(4)])
def test_rejects_bad_mask_arguments(name, value):
    """window and chunk_size are positive Python / numpy ints; errors name the argument."""
    q = jnp.zeros((1, 8, 2, 8))
    with pytest.raises(ValueError, match=f"{name} must be a positive int"):
        attention.attend(q, q, q, **{name: value})
    with pytest.raises(ValueError, match=f"{name} must be a positive int"):
        ring.work_per_device(np.arange(8), 2, **{name: value})


def test_numpy_ints_are_accepted():
    mask = masks.Mask(window=np.int64(4), chunk_size=np.int32(8))
    assert mask == masks.Mask(window=4, chunk_size=8) and type(mask.window) is int


def test_window_longer_than_the_sequence_is_plain_causal():
    (q, k, v), arrays = inputs("packed", seed=3)
    attend = functools.partial(attention.attend, q, k, v, **arrays, block_size=32)
    np.testing.assert_array_equal(attend(window=LENGTH), attend())
    np.testing.assert_array_equal(attend(chunk_size=LENGTH), attend())
