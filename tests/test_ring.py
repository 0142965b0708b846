"""Ring attention (lctx_jax.attention.ring) on 8 simulated CPU devices against attend(impl="xla").

The xla path is tested against a float64 reference (test_attention.py), so these tests feed both
implementations the same inputs and compare values and the gradients of a random linear
functional <out, cotangent> w.r.t. q, k, v. The ring computes the same f32 online softmax over a
different order of key blocks (and a different max shift per tile), so the two differ by f32
reassociation alone: observed ≤ 1.1e-6 on values and ≤ 4e-6 on gradients (D = 32, T = 128
keys, dk/dv summing over T·G terms); compared at atol 1e-5 and 2e-5, rtol 1e-5, as
test_attention.py does.

Tiles: block_size 8 gives several tiles per device chunk, so tile skipping (causal, and by
segment-id ranges) and the zigzag halves are exercised; attend's own default (one tile per
chunk half here) is tested too. A tiny LLaMA with attention="ring" (tokens in ring order
through its layers) is compared with "xla", and its compiled forward's collectives counted.
"""

import functools
import math
import re
from collections import Counter

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from packing import packed_documents

import lctx_jax as lx
from lctx_jax import attention
from lctx_jax.attention import ring

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices: "
                                "XLA_FLAGS=--xla_force_host_platform_device_count=8")

VALUE_TOL = dict(atol=1e-5, rtol=1e-5)
GRAD_TOL = dict(atol=2e-5, rtol=1e-5)
LENGTH = 128
BLOCK = 8


def make_mesh(**axes):
    """A Mesh over the first prod(sizes) devices with the given axis names and sizes."""
    devices = np.array(jax.devices()[:math.prod(axes.values())])
    return Mesh(devices.reshape(tuple(axes.values())), tuple(axes))


def random_qkv(seed, batch, q_heads, kv_heads, length=LENGTH, head_dim=32):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal((batch, length, heads, head_dim)), jnp.float32)
                 for heads in (q_heads, kv_heads, kv_heads))


def out_and_grads(fn, q, k, v):
    """fn(q, k, v) and the gradients of <fn(q, k, v), cotangent> w.r.t. q, k, v (jitted)."""
    cotangent = jnp.asarray(np.random.default_rng(99).standard_normal(q.shape), jnp.float32)

    def run(q, k, v):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(cotangent)

    out, grads = jax.jit(run)(q, k, v)
    return np.asarray(out), [np.asarray(g) for g in grads]


def check_against_xla(q, k, v, mesh, *, scheme=None, block_size=BLOCK, inner=None, **kwargs):
    """Ring vs xla on the same inputs. scheme None: through attention.attend(impl="ring"),
    else ring.attend with that scheme and inner block. kwargs: causal, rope, positions,
    segment ids."""
    if scheme is None:
        def ours(q, k, v):
            return attention.attend(q, k, v, impl="ring", mesh=mesh, block_size=block_size,
                                    **kwargs)
    else:
        if kwargs.get("positions") is None:
            kwargs["positions"] = jnp.arange(q.shape[1])

        def ours(q, k, v):
            return ring.attend(q, k, v, mesh=mesh, scheme=scheme, block_size=block_size,
                               inner=inner, **kwargs)
    out, grads = out_and_grads(ours, q, k, v)
    ref_out, ref_grads = out_and_grads(functools.partial(attention.attend, **kwargs), q, k, v)
    np.testing.assert_allclose(out, ref_out, **VALUE_TOL)
    for name, grad, ref_grad in zip("qkv", grads, ref_grads):
        assert np.isfinite(grad).all(), f"d{name} has NaN/inf"
        np.testing.assert_allclose(grad, ref_grad, **GRAD_TOL, err_msg=f"d{name}")
    return out


# ----------------------------------------------------------------------------- values, gradients


@pytest.mark.parametrize("ring_size, scheme, groups", [
    (2, "zigzag", 1), (4, "zigzag", 4), (8, "zigzag", 1),
    (2, "striped", 4), (4, "striped", 1), (8, "striped", 4),
    (2, "none", 1), (4, "none", 4), (8, "none", 1),
])
def test_causal_matches_xla(ring_size, scheme, groups):
    q, k, v = random_qkv(ring_size, 1, 4, 4 // groups)
    check_against_xla(q, k, v, make_mesh(sequence=ring_size), scheme=scheme)


@pytest.mark.parametrize("ring_size, groups", [(2, 4), (8, 1)])
def test_non_causal_matches_xla(ring_size, groups):
    q, k, v = random_qkv(10 + ring_size, 1, 4, 4 // groups)
    check_against_xla(q, k, v, make_mesh(sequence=ring_size), causal=False)


def test_default_tiles_through_attend():
    """attention.attend(impl="ring") with its default block size: one tile per chunk half."""
    q, k, v = random_qkv(20, 1, 4, 2)
    check_against_xla(q, k, v, make_mesh(sequence=4), block_size=None)


ROPE_CONFIGS = {  # max_position_embeddings 64 < T = 128: longrope takes its long factors
    "default": {},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    "longrope": {"rope_type": "longrope", "original_max_position_embeddings": 64,
                 "short_factor": list(np.linspace(1.0, 2.0, 16)),
                 "long_factor": list(np.linspace(1.0, 8.0, 16)), "start_tokens": 4},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
}


@pytest.mark.parametrize("rope_type", ROPE_CONFIGS)
def test_rope_matches_xla(rope_type):
    """RoPE from true positions through the zigzag reordering; seq_len (dynamic, longrope) is
    the global max position + 1 although each device holds only some positions. Batch 2 on
    data × sequence, rows with different positions, so seq_len is a max over the batch too."""
    rope = lx.RopeConfig.from_hf({"head_dim": 32, "rope_theta": 10000.0,
                                  "max_position_embeddings": 64,
                                  "rope_scaling": ROPE_CONFIGS[rope_type] or None})
    q, k, v = random_qkv(30, 2, 4, 2)
    positions = jnp.stack([jnp.arange(LENGTH), jnp.arange(LENGTH) + 40])
    check_against_xla(q, k, v, make_mesh(data=2, sequence=4), rope=rope, positions=positions)


@pytest.mark.parametrize("causal", [True, False])
def test_packed_segments_cross_devices(causal):
    """8 documents of random lengths per row, positions restarting at 0 in each: documents
    span device chunks; one query's segment id matches no key, so it gets zeros. Tile pairs
    with disjoint segment-id ranges are skipped (without causality the only skipping)."""
    rng = np.random.default_rng(1)
    segment_ids, positions = packed_documents(rng, rows=2, length=LENGTH, documents=8)
    kv_segment_ids = segment_ids.copy()
    segment_ids[1, 70] = 99
    q, k, v = random_qkv(40, 2, 4, 2)
    out = check_against_xla(q, k, v, make_mesh(fsdp=2, sequence=4),
                            segment_ids=jnp.asarray(segment_ids),
                            kv_segment_ids=jnp.asarray(kv_segment_ids),
                            positions=jnp.asarray(positions), causal=causal)
    assert (out[1, 70] == 0).all()


@pytest.mark.parametrize("scheme", ["zigzag", "none"])
def test_flash_inner_block(scheme):
    """inner="flash" (the Pallas kernels per hop, interpreted here) against the xla path,
    values and gradients: GQA, yarn RoPE, packed documents with a query whose segment id
    matches no key (zeros), causal over 4 devices with a batch split."""
    rng = np.random.default_rng(2)
    segment_ids, positions = packed_documents(rng, rows=2, length=LENGTH, documents=5)
    kv_segment_ids = segment_ids.copy()
    segment_ids[0, 33] = 99
    q, k, v = random_qkv(41, 2, 4, 2)
    rope = lx.RopeConfig.from_hf({"head_dim": q.shape[-1], "rope_theta": 10000.0,
                                  "max_position_embeddings": 64,
                                  "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                   "original_max_position_embeddings": 32}})
    out = check_against_xla(q, k, v, make_mesh(data=2, sequence=4), scheme=scheme,
                            block_size=16, inner="flash", rope=rope,
                            segment_ids=jnp.asarray(segment_ids),
                            kv_segment_ids=jnp.asarray(kv_segment_ids),
                            positions=jnp.asarray(positions))
    assert (out[0, 33] == 0).all()


def test_unknown_inner_block_is_refused():
    q, k, v = random_qkv(42, 2, 4, 2)
    with pytest.raises(ValueError, match="inner block 'pallas'"):
        ring.attend(q, k, v, mesh=make_mesh(data=2, sequence=4), positions=jnp.arange(LENGTH),
                    inner="pallas")


@pytest.mark.parametrize("axes", [dict(data=2, sequence=4), dict(fsdp=2, sequence=4),
                                  dict(data=1, fsdp=2, tensor=2, sequence=2),
                                  dict(data=2, sequence=1)])
def test_combined_meshes(axes):
    """Batch split over data and/or fsdp, heads over tensor; a ring of one device."""
    q, k, v = random_qkv(50, 2, 4, 2)
    check_against_xla(q, k, v, make_mesh(**axes), scheme="striped")


def test_sharded_and_plain_inputs_agree():
    """Inputs already carrying the in_specs' NamedSharding give the same result as ordinary
    arrays (which shard_map reshards), eagerly and under jit."""
    mesh = make_mesh(data=2, sequence=4)
    q, k, v = random_qkv(60, 2, 4, 2)
    spec = NamedSharding(mesh, PartitionSpec("data", "sequence", None, None))
    placed = [jax.device_put(x, spec) for x in (q, k, v)]
    attend = functools.partial(attention.attend, impl="ring", mesh=mesh, block_size=16)
    expected = np.asarray(jax.jit(attend)(q, k, v))
    np.testing.assert_array_equal(np.asarray(jax.jit(attend)(*placed)), expected)
    np.testing.assert_array_equal(np.asarray(attend(*placed)), expected)


def test_inputs_reordered():
    """A caller holding tokens in ring order passes inputs_reordered=True and gets the output
    in ring order: equal to reordering attend's output."""
    mesh, size = make_mesh(sequence=4), 4
    q, k, v = random_qkv(70, 1, 4, 2)
    positions = jnp.arange(LENGTH)[None]
    attend = functools.partial(ring.attend, mesh=mesh, block_size=BLOCK)
    expected = jax.jit(attend)(q, k, v, positions=positions)
    reordered = [ring.reorder(x, size, "zigzag") for x in (q, k, v, positions)]
    out = jax.jit(functools.partial(attend, inputs_reordered=True))(*reordered[:3],
                                                                   positions=reordered[3])
    np.testing.assert_allclose(out, ring.reorder(expected, size, "zigzag"), atol=1e-6)


def test_bf16_inputs():
    """bf16 q, k, v: output and gradients in bf16. Values agree to f32 rounding before the
    final bf16 rounding. The ring, like flash kernels, feeds dS to its matmuls in the input dtype
    (the xla reference keeps it f32), so gradients differ by bf16 rounding: observed ≤ 2^-8 of
    their largest magnitude, compared at 2^-6 of it."""
    q, k, v = (x.astype(jnp.bfloat16) for x in random_qkv(80, 1, 4, 2))
    mesh = make_mesh(sequence=4)
    cotangent = jnp.asarray(np.random.default_rng(99).standard_normal(q.shape), jnp.bfloat16)

    def run(fn):
        @jax.jit
        def out_and_grads(q, k, v):
            out, vjp = jax.vjp(fn, q, k, v)
            return out, *vjp(cotangent)

        outputs = out_and_grads(q, k, v)
        assert all(x.dtype == jnp.bfloat16 for x in outputs)
        return [np.asarray(x.astype(jnp.float32)) for x in outputs]

    ours = run(functools.partial(attention.attend, impl="ring", mesh=mesh, block_size=BLOCK))
    ref = run(attention.attend)
    np.testing.assert_allclose(ours[0], ref[0], rtol=2.0 ** -8, atol=1e-5)
    for name, grad, ref_grad in zip("qkv", ours[1:], ref[1:]):
        np.testing.assert_allclose(grad, ref_grad, atol=2.0 ** -6 * np.abs(ref_grad).max(),
                                   err_msg=f"d{name}")


# ----------------------------------------------------------------------------- structure


def trip_count(eqn):
    """The iterations of a scan, or of a while loop `i < n` with a literal n (ring's loops)."""
    if eqn.primitive.name == "scan":
        return eqn.params["length"]
    if eqn.primitive.name == "while":
        [test] = [e for e in eqn.params["cond_jaxpr"].jaxpr.eqns if e.primitive.name == "lt"]
        return int(test.invars[1].val)
    return 1


def count_ppermutes(jaxpr, repeat=1):
    """Arrays sent by ppermute in a jaxpr, times the trip counts of the loops around them."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "ppermute":
            total += repeat * len(eqn.invars)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            if eqn.primitive.name == "while" and sub is eqn.params["cond_jaxpr"].jaxpr:
                continue
            total += count_ppermutes(sub, repeat * trip_count(eqn))
    return total


@pytest.mark.parametrize("ring_size", [2, 4, 8])
def test_communication_is_minimal(ring_size):
    """Forward: P − 1 hops of the kv chunk (k, v, positions: 3 arrays). Backward: P − 1 kv hops
    again and P hops of the dK, dV accumulator (2 arrays; the last hop takes it home)."""
    mesh = make_mesh(sequence=ring_size)
    q, k, v = random_qkv(0, 1, 4, 2)

    def loss(q, k, v):
        return attention.attend(q, k, v, impl="ring", mesh=mesh).sum()

    forward = jax.make_jaxpr(functools.partial(attention.attend, impl="ring", mesh=mesh))
    assert count_ppermutes(forward(q, k, v).jaxpr) == 3 * (ring_size - 1)
    backward = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    assert count_ppermutes(backward.jaxpr) == 2 * 3 * (ring_size - 1) + 2 * ring_size


@pytest.mark.parametrize("scheme", ring.SCHEMES)
@pytest.mark.parametrize("ring_size", [2, 4])
def test_reorder_layout(scheme, ring_size):
    tokens = np.arange(32)
    chunks = np.asarray(ring.reorder(tokens[None], ring_size, scheme)).reshape(ring_size, -1)
    half = 32 // (2 * ring_size)
    for i, chunk in enumerate(chunks):
        if scheme == "zigzag":
            j = 2 * ring_size - 1 - i
            expected = np.r_[tokens[i * half:(i + 1) * half], tokens[j * half:(j + 1) * half]]
        elif scheme == "striped":
            expected = tokens[i::ring_size]
        else:
            expected = tokens[i * 32 // ring_size:(i + 1) * 32 // ring_size]
        np.testing.assert_array_equal(chunk, expected)
    x = np.random.default_rng(0).standard_normal((2, 32, 3)).astype(np.float32)
    np.testing.assert_array_equal(ring.restore(ring.reorder(x, ring_size, scheme), ring_size,
                                               scheme), x)


@pytest.mark.parametrize("scheme, mask", [
    *((scheme, {}) for scheme in ring.SCHEMES), ("zigzag", dict(window=20)),
    ("striped", dict(window=20)), ("none", dict(chunk_size=24)),
    ("zigzag", dict(window=12, chunk_size=32)), ("none", dict(causal=False, window=16))],
    ids=str)
def test_skipped_tiles_match_work_per_device(scheme, mask, monkeypatch, request):
    """The tiles the forward ring folds in, counted per device as it runs, are those that
    work_per_device predicts on the host, for causal, windowed and chunked masks."""
    positions = jnp.arange(LENGTH)
    np.testing.assert_array_equal(
        computed_tiles(monkeypatch, request, 1, positions=positions, scheme=scheme, **mask),
        ring.work_per_device(positions, 4, scheme, block_size=BLOCK, **mask))


@pytest.mark.parametrize("scheme, mask", [*((scheme, {}) for scheme in ring.SCHEMES),
                                          ("none", dict(causal=False))], ids=str)
def test_tiles_of_different_documents_are_skipped(scheme, mask, monkeypatch, request):
    """Packed documents (positions restarting, non-decreasing segment ids), 2 rows: a tile
    pair whose segment-id ranges are disjoint in both rows is skipped too. The computed tiles
    are work_per_device's given the segment ids: here 94 of 256 pairs with zigzag or
    contiguous chunks (240 by positions alone), 160 striped (256), 126 without causality."""
    segment_ids, positions = packed_documents(np.random.default_rng(5), rows=2, length=LENGTH,
                                              documents=6)
    counts = computed_tiles(monkeypatch, request, 2, positions=jnp.asarray(positions),
                            segment_ids=jnp.asarray(segment_ids), scheme=scheme, **mask)
    expected = ring.work_per_device(positions, 4, scheme, block_size=BLOCK,
                                    segment_ids=segment_ids, **mask)
    np.testing.assert_array_equal(counts, expected)
    by_positions = ring.work_per_device(positions, 4, scheme, block_size=BLOCK, **mask)
    assert expected.sum() < by_positions.sum()


def computed_tiles(monkeypatch, request, batch, **kwargs):
    """The tile pairs ring.attend's forward folds in on each of 4 devices (block BLOCK), counted
    as it runs. kwargs: positions, segment ids, scheme, the mask."""
    counts = np.zeros(4, int)

    def count(device):
        counts[int(device)] += 1

    step = ring.xla.fold_block

    def counted_step(*args):
        jax.debug.callback(count, jax.lax.axis_index("sequence"))
        return step(*args)

    monkeypatch.setattr(ring.xla, "fold_block", counted_step)
    ring._compiled.cache_clear()  # retrace: an equal configuration may be cached already...
    request.addfinalizer(ring._compiled.cache_clear)  # ...and keep no counting trace cached
    q, k, v = random_qkv(0, batch, 4, 2)
    jax.block_until_ready(jax.jit(functools.partial(
        ring.attend, mesh=make_mesh(sequence=4), block_size=BLOCK, **kwargs))(q, k, v))
    return counts


@pytest.mark.parametrize("scheme", ["zigzag", "striped"])
def test_reorder_moves_chunks_not_sequences(scheme):
    """On a sequence-sharded array, reorder and restore compile to chunk-sized collectives,
    never an all-gather of the whole sequence onto every device."""
    sharding = NamedSharding(make_mesh(sequence=4), PartitionSpec(None, "sequence"))
    x = jax.device_put(jnp.zeros((2, LENGTH, 4, 8)), sharding)
    for move in (ring.reorder, ring.restore):
        hlo = jax.jit(lambda x: jax.lax.with_sharding_constraint(move(x, 4, scheme), sharding)
                      ).lower(x).compile().as_text()
        assert "all-gather" not in hlo
        assert "collective-permute" in hlo or "all-to-all" in hlo


def test_work_per_device():
    """Causal work: zigzag and striped are balanced, contiguous chunks are not; all three
    skip invisible tile pairs, zigzag exactly the upper triangle. A window or chunks skip the
    tile pairs they hide too."""
    positions, size = np.arange(LENGTH), 4
    tiles = LENGTH // BLOCK
    zigzag = ring.work_per_device(positions, size, "zigzag", block_size=BLOCK)
    striped = ring.work_per_device(positions, size, "striped", block_size=BLOCK)
    contiguous = ring.work_per_device(positions, size, "none", block_size=BLOCK)
    assert zigzag.sum() == tiles * (tiles + 1) // 2 and zigzag.min() == zigzag.max()
    assert striped.min() == striped.max() and striped.sum() < tiles ** 2
    assert contiguous.sum() == zigzag.sum() and contiguous.max() > 2 * contiguous.min()
    # One tile per chunk, contiguous: device i sees the chunks 0..i.
    np.testing.assert_array_equal(
        ring.work_per_device(positions, size, "none", block_size=LENGTH), [1, 2, 3, 4])
    assert (ring.work_per_device(positions, size, causal=False, block_size=BLOCK)
            == size * (LENGTH // size // BLOCK) ** 2).all()
    # A window of one tile: q tile i sees kv tiles i − 1 and i only (device 0's first: i).
    np.testing.assert_array_equal(
        ring.work_per_device(positions, size, "none", block_size=BLOCK, window=BLOCK),
        [7, 8, 8, 8])
    # Chunks of one device's 32 tokens: each device's 4 q tiles see 1, 2, 3, 4 kv tiles; all
    # 16 without causality.
    np.testing.assert_array_equal(
        ring.work_per_device(positions, size, "none", block_size=BLOCK, chunk_size=32), 10)
    np.testing.assert_array_equal(ring.work_per_device(
        positions, size, block_size=BLOCK, causal=False, chunk_size=32), 16)


# ----------------------------------------------------------------------------- errors


def test_errors():
    q, k, v = random_qkv(0, 2, 4, 2, length=24)
    sequence4 = make_mesh(sequence=4)
    with pytest.raises(ValueError, match="needs mesh="):
        attention.attend(q, k, v, impl="ring")
    with pytest.raises(ValueError, match="'sequence'"):
        attention.attend(q, k, v, impl="ring", mesh=make_mesh(data=4))
    short = random_qkv(0, 1, 4, 2, length=12)
    with pytest.raises(ValueError, match="'zigzag' needs a sequence length divisible by 8"):
        attention.attend(*short, impl="ring", mesh=sequence4)  # 2P chunks of 12 / 8 tokens
    with pytest.raises(ValueError, match="'none' needs a sequence length divisible by 8"):
        attention.attend(*short, impl="ring", mesh=make_mesh(sequence=8), causal=False)
    with pytest.raises(ValueError, match="self-attention"):
        attention.attend(q[:, :8], k, v, impl="ring", mesh=sequence4)
    with pytest.raises(ValueError, match="batch 2"):
        attention.attend(q, k, v, impl="ring", mesh=make_mesh(data=4, sequence=2))
    with pytest.raises(ValueError, match="'tensor'"):
        attention.attend(q, k, v, impl="ring", mesh=make_mesh(tensor=4, sequence=2))
    with pytest.raises(ValueError, match="scheme 'diagonal'"):
        ring.attend(q, k, v, mesh=sequence4, positions=jnp.arange(24), scheme="diagonal")


# ----------------------------------------------------------------------------- the model


def tiny_llama():
    """A 2-layer LLaMA with weights 3x its init (std 0.06): logits of size ~4."""
    config = lx.ModelConfig.from_hf({
        "model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": LENGTH})
    params = lx.Model.init(config, jax.random.key(0)).params
    return lx.Model(config, jax.tree.map(lambda p: 3 * p, params))


def test_ring_model_matches_xla():
    """A 2-layer LLaMA with attention="ring" on data=2 × sequence=4 (tokens reordered once
    into zigzag order before the layers, restored once after) against "xla", packed documents:
    logits, and the next-token NLL (hidden states through the chunked head) with its gradients
    w.r.t. every parameter. Logits differ by ≤ 5e-6 (f32 reassociation, as much as "xla" on
    the mesh differs from no mesh; an error in the token order is O(1)), compared at 1e-4 as in
    test_sharding.py."""
    mesh = lx.make_mesh(data=2, sequence=4)
    reference = tiny_llama()
    model = lx.Model(reference.config, reference.params, attention="ring", mesh=mesh)
    rng = np.random.default_rng(7)
    segment_ids, positions = packed_documents(rng, rows=2, length=LENGTH, documents=5)
    ids = rng.integers(0, 64, (2, LENGTH)).astype(np.int32)
    inputs = dict(positions=positions, segment_ids=segment_ids)
    np.testing.assert_allclose(np.asarray(model(ids, **inputs)),
                               np.asarray(reference(ids, **inputs)), atol=1e-4, rtol=0)

    def loss_and_grads(model):
        return jax.jit(jax.value_and_grad(lambda p: lx.next_token_nll(model, ids, p, **inputs))
                       )(model.params)

    (loss, grads), (ref_loss, ref_grads) = loss_and_grads(model), loss_and_grads(reference)
    np.testing.assert_allclose(float(loss), float(ref_loss), atol=1e-5, rtol=0)
    for path, grad in jax.tree_util.tree_leaves_with_path(grads):
        ref_grad = functools.reduce(lambda tree, key: tree[key.key], path, ref_grads)
        np.testing.assert_allclose(np.asarray(grad), np.asarray(ref_grad), atol=1e-5,
                                   rtol=1e-5, err_msg=jax.tree_util.keystr(path))


COLLECTIVES = "all-to-all|collective-permute|all-gather|all-reduce|reduce-scatter"


def token_moves(hlo):
    """Counter of (op, where) over the compiled HLO's collectives outside ring attention's
    shard_map (the ring's own hops are ppermutes inside it), where = "layers" for those in the
    decoder's layer loop (by their op_name), else "once"."""
    found = re.findall(rf" ({COLLECTIVES})(?:-start)?\(.*?op_name=\"([^\"]*)\"", hlo)
    assert any("shard_map" in name for _, name in found)  # the ring's hops are recognised
    return Counter((op, "layers" if "/layers/" in name else "once")
                   for op, name in found if "shard_map" not in name)


def test_ring_model_moves_tokens_once():
    """The compiled forward of a 2-layer ring LLaMA on data=2 × sequence=4 with positions and
    segment ids: no collective outside the ring's hops is left in the layer loop (before, each
    layer's attend reordered q, k, v, positions, segment ids and restored its output: 3
    all-to-all + 29 collective-permute + 2 all-reduce, run once per layer), and the one
    reorder (input_ids, positions, segment ids) + restore (hidden states) of the forward
    (observed: 3 all-to-all + 13 collective-permute + 1 all-reduce) is cheaper than what a
    single attend call does on its own."""
    mesh = lx.make_mesh(data=2, sequence=4)
    tiny = tiny_llama()
    model = lx.Model(tiny.config, tiny.params, attention="ring", mesh=mesh)
    tokens = lx.sharding.activation_sharding(mesh, (2, LENGTH))
    ids, positions, segment_ids = (jax.ShapeDtypeStruct((2, LENGTH), jnp.int32, sharding=tokens)
                                   for _ in range(3))
    moves = token_moves(jax.jit(model.apply).lower(model.params, ids, positions, segment_ids)
                        .compile().as_text())
    assert {where for _, where in moves} == {"once"}, moves
    spec = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), "sequence"))
    q, k = (jax.ShapeDtypeStruct((2, LENGTH, heads, 8), jnp.float32, sharding=spec)
            for heads in (4, 2))

    def attend(q, k, v, positions, segment_ids):
        return attention.attend(q, k, v, impl="ring", mesh=mesh, positions=positions,
                                segment_ids=segment_ids)

    per_call = token_moves(jax.jit(attend).lower(q, k, k, positions, segment_ids).compile()
                           .as_text())
    assert moves.total() < per_call.total(), (moves, per_call)


# ----------------------------------------------------------------------------- memory


def scanned_step_temp_bytes(length, ring_size=4):
    """Compiled per-device temporaries of a training step of a 2-layer model (layers under
    nn.scan) with ring attention over `ring_size` devices: grad of the chunked loss."""
    mesh = lx.make_mesh(data=1, sequence=ring_size, devices=jax.devices()[:ring_size])
    config = lx.ModelConfig.from_hf({
        "model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": length})
    params = jax.eval_shape(lambda: lx.Model.init(config, jax.random.key(0)).params)
    model = lx.Model(config, params, attention="ring", mesh=mesh)
    shardings = model.param_shardings
    params = jax.tree.map(lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s),
                          params, shardings)
    ids = jax.ShapeDtypeStruct((1, length), jnp.int32,
                               sharding=lx.sharding.activation_sharding(mesh, (1, length)))
    grad = jax.jit(jax.grad(lambda p, ids: lx.next_token_nll(model, ids, p)))
    return grad.lower(params, ids).compile().memory_analysis().temp_size_in_bytes


def test_scanned_ring_step_memory_grows_linearly():
    """Layers run under a scan: its differentiation must not stack per-hop / per-tile masks and
    probabilities (O(T²/P)); 4x the tokens costs at most ~4x the temporaries."""
    small, large = scanned_step_temp_bytes(2048), scanned_step_temp_bytes(8192)
    assert large / small < 4.5, (small, large)
