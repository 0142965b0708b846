"""attend(impl="splash") (JAX's splash attention kernel, interpreted on CPU) and impl="cudnn"
(jax.nn.dot_product_attention's cuDNN path: its arguments run through jax's XLA formula,
implementation="xla", since there is no GPU here) against attend(impl="xla").

Both mask by token index, so every input here keeps positions consecutive within a segment
(arange, or packed documents restarting at 0), where index and position masks agree; chunk_size
with splash uses positions = arange.

Tolerances (f32, q, k, v ~ N(0, 1)) as tests/test_flash.py: values atol 1e-5 (observed <= 1e-6:
summation order and splash's online softmax), gradients atol 2e-5, rtol 1e-5. Splash folds the
scale into q before its kernel (one more f32 rounding of q). bf16: see test_splash_bf16.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from packing import packed_documents
from test_flash import random_qkv, rope_config
from test_training import TINY_MODEL

import lctx_jax as lx
from lctx_jax import aot, attention, training
from lctx_jax.attention import cudnn, flash, splash

VALUE_TOL = dict(atol=1e-5, rtol=1e-5)
GRAD_TOL = dict(atol=2e-5, rtol=1e-5)
D = 64


def cudnn_args_via_xla(q, k, v, **kwargs):
    """impl="cudnn"'s call with jax's XLA formula (what runs without a GPU)."""
    return cudnn.attend(q, k, v, implementation="xla", **kwargs)


def run(impl, q, k, v, cotangent, **kwargs):
    """out and d<out, cotangent>/d(q, k, v): "splash" and "xla" through attention.attend,
    "cudnn-xla" through cudnn.attend with implementation="xla" (positions resolved here as
    attend does)."""
    def fn(q, k, v):
        if impl == "cudnn-xla":
            batch, length = q.shape[:2]
            positions = kwargs.get("positions")
            positions = jnp.broadcast_to(jnp.arange(length) if positions is None else positions,
                                         (batch, length))
            return cudnn_args_via_xla(
                q, k, v, causal=kwargs.get("causal", True), positions=positions,
                kv_positions=positions, segment_ids=kwargs.get("segment_ids"),
                kv_segment_ids=kwargs.get("segment_ids"), scale=q.shape[-1] ** -0.5,
                rope=kwargs.get("rope"), window=kwargs.get("window"),
                chunk_size=kwargs.get("chunk_size"))
        return attention.attend(q, k, v, impl=impl, **kwargs)

    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(cotangent.astype(out.dtype))


def compare(impl, q, k, v, value_tol=VALUE_TOL, grad_tol=GRAD_TOL, **kwargs):
    """`impl` vs "xla" on the same inputs: values and gradients; returns impl's output."""
    cotangent = jnp.asarray(np.random.default_rng(99).standard_normal(q.shape), jnp.float32)

    def values(impl, **kwargs):
        return jax.jit(lambda *arrays: run(impl, *arrays, **kwargs))(q, k, v, cotangent)

    out, grads = values(impl, **kwargs)
    ref_out, ref_grads = values("xla", **{n: x for n, x in kwargs.items() if n != "block_size"})
    assert out.dtype == q.dtype and out.shape == q.shape
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref_out, np.float32),
                               **value_tol)
    for name, grad, ref_grad in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(np.asarray(grad, np.float32),
                                   np.asarray(ref_grad, np.float32), **grad_tol,
                                   err_msg=f"d{name}")
    return out


def packed(seed, rows, length, documents):
    return tuple(map(jnp.asarray, packed_documents(np.random.default_rng(seed), rows, length,
                                                   documents)))


# ----------------------------------------------------------------------------- splash


@pytest.mark.parametrize("q_heads, kv_heads, causal", [
    (4, 4, True), (4, 2, True), (4, 1, True), (4, 2, False)], ids=["mha", "gqa", "mqa", "full"])
def test_splash_matches_xla(q_heads, kv_heads, causal):
    """T = 256 in splash blocks of 128 (causal: the block above the diagonal is skipped);
    GQA and MQA through splash's MHA kernel with fewer key/value heads."""
    q, k, v = random_qkv(q_heads + kv_heads, 2, 256, 256, q_heads, kv_heads, D)
    compare("splash", q, k, v, causal=causal, rope=rope_config("default", D), block_size=128)


def test_splash_packed_documents():
    """Documents of random lengths with positions restarting at 0 (yarn rotates by position,
    the mask by index within each segment); T = 200 is padded to 256."""
    q, k, v = random_qkv(1, 2, 200, 200, 4, 2, D)
    segment_ids, positions = packed(1, 2, 200, 6)
    compare("splash", q, k, v, rope=rope_config("yarn", D), segment_ids=segment_ids,
            positions=positions)


@pytest.mark.parametrize("mask", [
    dict(window=50), dict(chunk_size=64), dict(window=100, chunk_size=96),
    dict(causal=False, window=40), dict(causal=False, chunk_size=64)],
    ids=["window", "chunks", "window-chunks", "window-noncausal", "chunks-noncausal"])
def test_splash_masks(mask):
    """Sliding window and chunks (positions = arange) with and without causal: one splash
    mask class from masks.may_see on one-token blocks."""
    q, k, v = random_qkv(2, 1, 256, 256, 4, 2, D)
    compare("splash", q, k, v, rope=rope_config("llama3", D), block_size=128, **mask)


@pytest.mark.parametrize("rope_type", ["yarn", "llama3", "longrope"])
def test_splash_rope_types(rope_type):
    """Positions 0..127 (past max_position_embeddings 64: llama3 and yarn rescale, longrope
    takes its long factors and keeps 4 start tokens, dynamic NTK changes its base); partial
    rotary on yarn, llama3 and longrope."""
    q, k, v = random_qkv(3, 1, 128, 128, 4, 2, D)
    compare("splash", q, k, v, rope=rope_config(rope_type, D))


def test_splash_short_sequence_padded_without_causal():
    """T = 40, D = 16 (the tiny models' head dim) padded to 128: without causal the 88 padded
    keys would be seen, unless their segment id of their own hides them."""
    q, k, v = random_qkv(4, 2, 40, 40, 4, 2, 16)
    compare("splash", q, k, v, causal=False, rope=rope_config("default", 16))


def test_splash_block_size_and_its_check():
    q, k, v = random_qkv(5, 1, 384, 384, 2, 1, D)
    compare("splash", q, k, v, block_size=128, window=200)  # 3 blocks
    assert splash._blocks(None, 384) == (384, 384)
    assert splash._blocks(None, 640) == (128, 640)
    assert splash._blocks(256, 300) == (256, 512)
    with pytest.raises(ValueError, match="multiple of 128"):
        attention.attend(q, k, v, impl="splash", block_size=96)


def test_splash_one_token_documents_see_themselves():
    """A query that sees no key gets zeros in the other impls; with splash's index mask every
    query sees itself (the only way to hide every key, kv_segment_ids, is refused), so a
    one-token document returns its own value row, as the xla path does."""
    q, k, v = random_qkv(6, 1, 128, 128, 2, 2, D)
    segment_ids = jnp.asarray(np.r_[np.zeros(60), 1, np.full(67, 2)].astype(np.int32))[None]
    positions = jnp.asarray(np.r_[np.arange(60), 0, np.arange(67)])[None]
    out = compare("splash", q, k, v, causal=False, segment_ids=segment_ids,
                  positions=positions, rope=rope_config("default", D))
    np.testing.assert_allclose(out[0, 60], v[0, 60], atol=1e-6)


def test_splash_bf16():
    """bf16 q, k, v: splash and xla, both in bf16, against xla in f32 on the same values. Both
    round the rotated q, k, the output and the gradients to bf16 (2^-8 relative); splash also
    rounds scale·q, and in its backward p (for dv) and dS (for dq, dk) to bf16 for the matrix
    unit. Observed: the same max errors as xla's (the last rounding dominates), mean relative
    errors 0.004-0.006 (xla 0.004-0.005); compared: max within 2 x xla's, mean within 2^-7 of
    the mean magnitude."""
    q, k, v = random_qkv(7, 2, 256, 256, 4, 2, D, dtype=jnp.bfloat16)
    cotangent = jnp.asarray(np.random.default_rng(99).standard_normal(q.shape), jnp.float32)
    common = dict(rope=rope_config("yarn", D))

    def outputs(impl, dtype):
        out, grads = jax.jit(lambda *a: run(impl, *a, **common))(
            *(x.astype(dtype) for x in (q, k, v)), cotangent)
        return [np.asarray(x, np.float32) for x in (out, *grads)]

    exact = outputs("xla", jnp.float32)
    for name, ref, ours, theirs in zip(["out", "dq", "dk", "dv"], exact,
                                       outputs("splash", jnp.bfloat16),
                                       outputs("xla", jnp.bfloat16)):
        ours_err, theirs_err = np.abs(ours - ref), np.abs(theirs - ref)
        assert ours_err.max() <= 2 * theirs_err.max(), (name, ours_err.max(), theirs_err.max())
        assert ours_err.mean() <= 2.0 ** -7 * np.abs(ref).mean(), name


def test_splash_refuses_a_gpu():
    q, k, v = random_qkv(0, 1, 128, 128, 2, 1, D)
    positions = jnp.zeros((1, 128), jnp.int32)
    with pytest.raises(ValueError, match="TPU kernel.*impl='flash' or 'cudnn'"):
        splash.attend(q, k, v, causal=True, positions=positions, kv_positions=positions,
                      segment_ids=None, kv_segment_ids=None, scale=0.1, backend="gpu")


# ----------------------------------------------------------------------------- cudnn


@pytest.mark.parametrize("q_heads, kv_heads, mask", [
    (4, 2, {}), (4, 1, {}), (4, 4, dict(causal=False)), (4, 2, dict(window=30)),
    (4, 2, dict(causal=False, window=30)), (4, 2, dict(chunk_size=48)),
    (4, 2, dict(window=20, chunk_size=48))],
    ids=["gqa", "mqa", "full", "window", "window-noncausal", "chunks", "window-chunks"])
def test_cudnn_arguments_match_xla(q_heads, kv_heads, mask):
    """is_causal and local_window_size (by index), chunks and a non-causal window as a boolean
    mask (by position): jax's XLA formula on these arguments equals our xla path."""
    q, k, v = random_qkv(10 + q_heads + kv_heads, 2, 150, 150, q_heads, kv_heads, D)
    compare("cudnn-xla", q, k, v, rope=rope_config("llama3", D), **mask)


def test_cudnn_arguments_packed_documents():
    """Segment ids (a boolean mask [B, 1, T, T]) with positions restarting per document, yarn;
    chunks by position restart with the documents too."""
    q, k, v = random_qkv(11, 2, 160, 160, 4, 2, D)
    segment_ids, positions = packed(2, 2, 160, 5)
    compare("cudnn-xla", q, k, v, rope=rope_config("yarn", D), segment_ids=segment_ids,
            positions=positions, chunk_size=32)


def test_cudnn_refuses_without_a_gpu_and_in_f32():
    q, k, v = random_qkv(0, 1, 64, 64, 2, 1, D)
    with pytest.raises(ValueError, match="needs an NVIDIA GPU.*'xla' or 'flash'"):
        attention.attend(q, k, v, impl="cudnn")
    positions = jnp.zeros((1, 64), jnp.int32)
    args = dict(causal=True, positions=positions, kv_positions=positions, segment_ids=None,
                kv_segment_ids=None, scale=0.1, backend="gpu")
    with pytest.raises(ValueError, match="bfloat16 or float16.*got float32"):
        cudnn.attend(q, k, v, **args)
    with pytest.raises(ValueError, match="block_size=64: cuDNN picks"):
        attention.attend(q, k, v, impl="cudnn", block_size=64)


@pytest.fixture
def cudnn_version(monkeypatch):
    """jax asks the CUDA plugin for cuDNN's version when it traces the cuDNN call; without
    the plugin it raises "cuDNN is not detected.". Say 9.10 (a private JAX module: if it
    changes, the test fails rather than skips)."""
    try:
        from jax._src.cudnn import fused_attention_stablehlo as fused
        monkeypatch.setattr(fused, "check_cudnn_version", lambda: 91000)
    except (ImportError, AttributeError) as error:
        pytest.fail(f"cannot stand in for the cuDNN version ({error}): update this test")


def test_cudnn_lowers_for_cuda(cudnn_version):
    """Forward and backward lower to cuDNN's fused attention custom calls for CUDA, no GPU:
    causal with a window (cuDNN's own masks) and segment ids (a bias), bf16, GQA, longrope.
    (cuDNN's compilation and its run-time support checks happen only on a GPU: untested.)"""
    rope = rope_config("longrope", 128)
    specs = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in
             [(2, 256, 4, 128), (2, 256, 2, 128), (2, 256, 2, 128), (2, 256, 4, 128)]]
    specs += [jax.ShapeDtypeStruct((2, 256), jnp.int32)] * 2

    def fwd_bwd(q, k, v, cotangent, positions, segment_ids):
        def fn(q, k, v):
            return cudnn.attend(q, k, v, causal=True, positions=positions,
                                kv_positions=positions, segment_ids=segment_ids,
                                kv_segment_ids=segment_ids, scale=0.1, rope=rope,
                                backend="gpu", window=100)
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(cotangent)

    text = jax.jit(fwd_bwd).trace(*specs).lower(lowering_platforms=("cuda",)).as_text()
    calls = [line for line in text.splitlines() if "custom_call @__cudnn$fmha" in line]
    assert len(calls) == 2, text[:2000]  # forward, backward
    assert "fmhaScaleBiasSoftmaxBackward" in calls[1]


# ----------------------------------------------------------------------------- both: checks


@pytest.mark.parametrize("impl", ["splash", "cudnn"])
def test_self_attention_only(impl):
    q, k, v = random_qkv(0, 1, 8, 128, 2, 1, D)
    with pytest.raises(ValueError, match=f"impl='{impl}' masks by token index.*KV cache"):
        attention.attend(q, k, v, impl=impl)
    q, k, v = random_qkv(0, 1, 128, 128, 2, 1, D)
    ids = jnp.zeros((1, 128), jnp.int32)
    with pytest.raises(ValueError, match="drop kv_segment_ids"):
        attention.attend(q, k, v, impl=impl, segment_ids=ids, kv_segment_ids=ids)
    rope = lx.rope.longrope_arrays(rope_config("longrope", D), np.ones(16))
    with pytest.raises(NotImplementedError, match="RopeConfig"):
        attention.attend(q, k, v, impl=impl, rope=rope)


# ----------------------------------------------------------------------------- on a mesh


KERNELS = {"splash": splash.attend, "cudnn": cudnn_args_via_xla}


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
@pytest.mark.parametrize("impl, axes", [
    ("splash", dict(data=2, fsdp=2, tensor=2)), ("splash", dict(data=2, tensor=4)),
    ("cudnn", dict(fsdp=4, tensor=2))])
def test_on_a_mesh_matches_xla(impl, axes):
    """flash.attend_on_mesh with each kernel (cudnn: its arguments via jax's XLA formula):
    rows and whole GQA groups per device; tensor=4 does not divide the 2 key/value heads, so
    heads stay whole. Packed documents whose rows reach different lengths (positions offset
    per row) under dynamic NTK: the rotation's base comes from the global max position."""
    mesh = lx.make_mesh(**{"data": 1, **axes})
    q, k, v = random_qkv(3, 4, 128, 128, 4, 2, D)
    segment_ids, positions = packed(4, 4, 128, 3)
    positions = positions + 60 * jnp.arange(4)[:, None]
    cotangent = jnp.asarray(np.random.default_rng(5).standard_normal(q.shape), jnp.float32)
    rope = rope_config("dynamic", D)

    def out_and_grads(on_mesh):
        def fn(q, k, v):
            if not on_mesh:
                return attention.attend(q, k, v, rope=rope, positions=positions,
                                        segment_ids=segment_ids)
            return flash.attend_on_mesh(q, k, v, mesh=mesh, positions=positions,
                                        kv_positions=positions, segment_ids=segment_ids,
                                        kv_segment_ids=segment_ids, rope=rope,
                                        kernel=KERNELS[impl], impl=impl, causal=True,
                                        scale=D ** -0.5)
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(cotangent)

    out, grads = jax.jit(lambda: out_and_grads(True))()
    ref_out, ref_grads = jax.jit(lambda: out_and_grads(False))()
    np.testing.assert_allclose(out, ref_out, **VALUE_TOL)
    for name, grad, ref_grad in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(grad, ref_grad, **GRAD_TOL, err_msg=f"d{name}")


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
def test_splash_through_attend_on_a_mesh_and_sequence_refused():
    q, k, v = random_qkv(0, 2, 128, 128, 4, 2, D)
    out = jax.jit(lambda q, k, v: attention.attend(q, k, v, impl="splash",
                                                   mesh=lx.make_mesh(data=4, tensor=2)))(q, k, v)
    np.testing.assert_allclose(out, attention.attend(q, k, v), **VALUE_TOL)
    with pytest.raises(ValueError, match="attention='splash' needs every sequence whole"):
        attention.attend(q, k, v, impl="splash", mesh=lx.make_mesh(data=2, sequence=4))


# ----------------------------------------------------------------------------- TPU


@pytest.fixture
def v5e(monkeypatch):
    """TPU lowering asks the default device for its TPU generation: say v5e (a private JAX
    module, as in test_flash.py: if it changes, the test fails rather than skips)."""
    try:
        from jax._src.pallas.mosaic import tpu_info
        monkeypatch.setitem(tpu_info.registry, jax.devices()[0].device_kind, lambda:
                            tpu_info._get_tpu_info_impl(tpu_info.ChipVersion.TPU_V5E, 1))
    except (ImportError, AttributeError) as error:
        pytest.fail(f"cannot describe a TPU to the Mosaic lowering ({error}): update this test")


@pytest.mark.parametrize("dtype, head_dim, length, causal, segments, mask", [
    (jnp.bfloat16, 128, 1024, True, True, {}),
    (jnp.float32, 64, 300, False, False, {}),
    (jnp.bfloat16, 128, 512, True, True, dict(window=100, chunk_size=256))],
    ids=["bf16-segments", "f32-full-padded", "bf16-window-chunks"])
def test_splash_lowers_for_tpu(v5e, dtype, head_dim, length, causal, segments, mask):
    """Forward and backward (dq, dk/dv kernels) lower to Mosaic for TPU, no device."""
    rope = rope_config("longrope", head_dim)
    specs = [jax.ShapeDtypeStruct((2, length, heads, head_dim), dtype) for heads in (4, 2, 2, 4)]
    specs += [jax.ShapeDtypeStruct((2, length), jnp.int32)] * 2

    def fwd_bwd(q, k, v, cotangent, positions, segment_ids):
        def fn(q, k, v):
            ids = segment_ids if segments else None
            return splash.attend(q, k, v, causal=causal, positions=positions,
                                 kv_positions=positions, segment_ids=ids, kv_segment_ids=ids,
                                 scale=0.1, rope=rope, backend="tpu", **mask)
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(cotangent)

    text = jax.jit(fwd_bwd).trace(*specs).lower(lowering_platforms=("tpu",)).as_text()
    kernels = [line for line in text.splitlines() if "custom_call" in line
               and "tpu_custom_call" in line]
    assert len(kernels) == 3, text[:2000]  # forward, dq, dk/dv


def test_splash_compiles_for_v5p_on_a_mesh():
    """XLA's TPU compiler (libtpu, a compile-only v5p:2x2x2 topology) compiles splash's Mosaic
    kernels, forward and backward, under attend_on_mesh's shard_map."""
    mesh = lx.make_mesh(data=2, fsdp=2, tensor=2, devices=aot.topology_devices("v5p:2x2x2"))
    rope = rope_config("yarn", 128)
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    x = jax.ShapeDtypeStruct((8, 1024, 4, 128), jnp.bfloat16, sharding=rows)
    ids = jax.ShapeDtypeStruct((8, 1024), jnp.int32, sharding=rows)

    def loss(q, k, v, segment_ids):
        out = attention.attend(q, k, v, impl="splash", rope=rope, mesh=mesh,
                               segment_ids=segment_ids, window=300)
        return jnp.sum(out.astype(jnp.float32))

    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x, ids).compile().as_text()
    assert text.count("tpu_custom_call") >= 3  # forward, dq, dk/dv: Mosaic, not interpreted


# ----------------------------------------------------------------------------- models


def tiny_model(**overrides):
    config = lx.ModelConfig.from_hf({**TINY_MODEL, "max_position_embeddings": 64, **overrides})
    return lx.Model.init(config, jax.random.key(0))


def test_splash_model_equals_xla():
    """A tiny random LLaMA (head dim 16, 4 query / 2 key-value heads, YaRN past 32 positions)
    with attention="splash": the same logits and gradients as "xla" on packed documents
    (T = 96, padded to 128 in the kernel)."""
    xla_model = tiny_model(rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                         "original_max_position_embeddings": 32})
    splash_model = xla_model.replace(attention="splash")
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 512, (2, 96)))
    segment_ids, positions = packed(6, 2, 96, 3)

    def loss(params, model):
        logits = model.apply(params, ids, positions, segment_ids)
        logp = jax.nn.log_softmax(logits)[:, :-1]
        return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))

    np.testing.assert_allclose(splash_model(ids, positions, segment_ids),
                               xla_model(ids, positions, segment_ids), atol=1e-5, rtol=0)
    grads = [jax.jit(jax.grad(lambda p, m=m: loss(p, m)))(m.params)
             for m in (splash_model, xla_model)]
    for a, b in zip(*map(jax.tree_util.tree_leaves, grads)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)


def test_splash_train_step_and_generation():
    """training.make_step compiles and runs with attention="splash" (interpreted) and gives the
    loss of "xla"; generation (prefill and decode against a KV cache) runs "xla" inside, so the
    tokens are the same."""
    model = tiny_model()
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 512, (2, 65)).astype(np.int32)
    batch = {"input_ids": tokens[:, :-1], "targets": tokens[:, 1:],
             "positions": np.tile(np.arange(64, dtype=np.int32), (2, 1)),
             "segment_ids": np.ones((2, 64), np.int32), "loss_mask": np.ones((2, 64), np.float32)}
    batch = {name: jnp.asarray(x[None]) for name, x in batch.items()}  # one micro-batch
    schedule = training.learning_rate(1e-2, 10, 0, "constant")
    losses = []
    for attention_impl in ("splash", "xla"):
        spec = model.replace(attention=attention_impl).spec
        step = training.make_step(spec, spec, optax.sgd(schedule), schedule)
        params = jax.tree.map(jnp.copy, model.params)
        _, metrics = step.train(step.init_state(params, {}), {}, batch)
        losses.append(float(metrics["loss"]))
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    prompt = tokens[:, :12]
    np.testing.assert_array_equal(lx.generate(model.replace(attention="splash"), prompt, 6),
                                  lx.generate(model, prompt, 6))
