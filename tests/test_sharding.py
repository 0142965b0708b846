"""Meshes, the sharding rules, sharded placement (from_hf / Orbax load) and sharded execution
on 8 simulated CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8, set by
conftest.py): every sharded result must equal the unsharded model's (f32).

Tolerances: split reductions (tensor / fsdp contractions, sequence-split attention) reorder f32
sums, so logits of size ~9 (initializer_range 0.2) differ by up to ~4e-5: logits are compared
at 1e-4 (as tests/test_model.py compares with transformers); loss and gradients at 1e-5 (they
differ by ~2e-6). A sharding bug (a wrong slice, a missed all-reduce) shows up at O(1).
"""

import logging
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers as tf
from jax.sharding import PartitionSpec as P

import lctx_jax as lx
from lctx_jax import sharding
from lctx_jax.models.llama import SHARDING_RULES as RULES

logging.getLogger("transformers").setLevel(logging.ERROR)

# 8 query heads of 16 and 2 kv heads: q splits over tensor=4 or 8, k / v only over tensor=2
VOCAB, HIDDEN, HEADS, KV_HEADS, FFN = 128, 128, 8, 2, 96

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices: "
                                "XLA_FLAGS=--xla_force_host_platform_device_count=8")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN,
                            num_hidden_layers=2, num_attention_heads=HEADS,
                            num_key_value_heads=KV_HEADS, max_position_embeddings=256,
                            initializer_range=0.2, attention_bias=True)
    torch.manual_seed(0)
    tf.LlamaForCausalLM(config).eval().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def reference(hf_dir):
    return lx.from_hf(hf_dir)


def random_ids(batch: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, length)).astype(np.int32)


def flat(tree) -> dict:
    return {sharding._path_string(path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ----------------------------------------------------------------------------- meshes


def test_make_mesh_shapes():
    mesh = lx.make_mesh()
    assert mesh.axis_names == ("data", "fsdp", "tensor", "sequence")
    assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1, "sequence": 1}
    assert dict(lx.make_mesh(data=2, sequence=4).shape) == {
        "data": 2, "fsdp": 1, "tensor": 1, "sequence": 4}
    assert dict(lx.make_mesh(data=1, fsdp=-1, tensor=2).shape) == {
        "data": 1, "fsdp": 4, "tensor": 2, "sequence": 1}
    assert dict(lx.make_mesh(2, 2, 2, 1).shape) == {"data": 2, "fsdp": 2, "tensor": 2,
                                                    "sequence": 1}
    small = lx.make_mesh(data=-1, sequence=2, devices=jax.devices()[:4])
    assert dict(small.shape)["data"] == 2 and small.devices.size == 4
    assert sorted(d.id for d in lx.make_mesh(fsdp=2, tensor=2).devices.flat) == list(range(8))


@pytest.mark.parametrize("kwargs, message", [
    (dict(sequence=3), "does not divide the 8 devices"),
    (dict(data=2, tensor=2), "= 4, but there are 8 devices; .*-1"),
    (dict(data=-1, fsdp=-1), "only one mesh axis may be -1"),
    (dict(tensor=0), "tensor=0"),
])
def test_make_mesh_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lx.make_mesh(**kwargs)


class OnTPU:
    """A CPU device that reports platform "tpu" (what make_mesh reads to decide on warning)."""
    platform = "tpu"

    def __init__(self, device):
        self.device = device

    def __getattr__(self, name):
        return getattr(self.device, name)


@pytest.mark.parametrize("on_tpu", [True, False])
def test_make_mesh_warns_when_the_topology_cannot_be_laid_out(on_tpu, monkeypatch):
    """create_device_mesh failing (sizes that no product of the slice's dimensions gives, or
    a partial slice): the devices keep the order given, with a warning naming the axes and
    the fixes on TPU / GPU; none for CPU devices, which have no topology."""
    from jax.experimental import mesh_utils

    def cannot(shape, devices):
        raise NotImplementedError("Failed to find assignment for logical_axis_index 3")

    monkeypatch.setattr(mesh_utils, "create_device_mesh", cannot)
    devices = [OnTPU(d) if on_tpu else d for d in jax.devices()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mesh = lx.make_mesh(data=2, sequence=4, devices=devices)
    assert list(mesh.devices.flat) == devices
    if not on_tpu:
        assert not caught
        return
    [warning] = caught
    message = str(warning.message)
    for part in ("make_mesh(data=2, sequence=4)", "8 tpu devices", "Failed to find assignment",
                 "'sequence'", "not be physical neighbours", "devices=", "product"):
        assert part in message, part
    assert warning.filename == __file__


# ----------------------------------------------------------------------------- rules


def test_rules_for_a_tiny_config(reference):
    shapes = jax.eval_shape(lambda p: p, reference.params)
    mesh = lx.make_mesh(data=1, fsdp=2, tensor=4)
    specs = flat(sharding.param_specs(shapes, mesh, RULES, head_dim=HIDDEN // HEADS))
    assert specs == {
        "embed/embedding": P("tensor", "fsdp"),
        "lm_head/kernel": P("fsdp", "tensor"),
        "norm/scale": P(),
        "layers/attn_norm/scale": P(),
        "layers/mlp_norm/scale": P(),
        "layers/q/kernel": P(None, "fsdp", "tensor"),
        "layers/q/bias": P(None, "tensor"),
        # 2 kv heads cannot split over tensor=4: kept whole (a head is never cut in two)
        "layers/k/kernel": P(None, "fsdp"),
        "layers/v/kernel": P(None, "fsdp"),
        "layers/k/bias": P(),
        "layers/v/bias": P(),
        "layers/o/kernel": P(None, "tensor", "fsdp"),
        "layers/o/bias": P(),  # added after the row-parallel sum
        "layers/gate/kernel": P(None, "fsdp", "tensor"),
        "layers/up/kernel": P(None, "fsdp", "tensor"),
        "layers/down/kernel": P(None, "tensor", "fsdp"),
    }
    # without head_dim only the flat size counts: 2 heads · 16 = 32 splits 4 ways
    assert flat(sharding.param_specs(shapes, mesh, RULES))["layers/k/kernel"] == P(None, "fsdp",
                                                                            "tensor")
    # tensor=2: kv heads split; a mesh lacking axes drops them; optimizer states follow
    mesh2 = lx.make_mesh(data=4, tensor=2)
    assert flat(sharding.param_specs(shapes, mesh2, RULES, 16))["layers/k/kernel"] == P(
        None, "fsdp", "tensor")
    data_only = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    assert set(flat(sharding.param_specs(shapes, data_only, RULES)).values()) == {P()}
    adam = jax.eval_shape(optax.adam(1e-3).init, shapes)
    adam_specs = flat(sharding.param_specs(adam, mesh, RULES, 16))
    assert adam_specs["0/mu/layers/down/kernel"] == P(None, "tensor", "fsdp")
    assert adam_specs["0/count"] == P()


def test_non_divisible_axes_are_dropped():
    mesh = lx.make_mesh(data=1, fsdp=2, tensor=4)
    # a vocabulary of 129 splits over neither; hidden 128 still splits over fsdp
    assert sharding.param_spec("embed/embedding", (129, 128), mesh, RULES) == P(None, "fsdp")
    assert sharding.param_spec("layers/gate/kernel", (2, 127, 96), mesh, RULES) == P(None, None,
                                                                              "tensor")
    # batch over ("data", "fsdp") keeps the axes that divide it, sequence only if T divides
    mesh = lx.make_mesh(data=2, fsdp=2, sequence=2)
    assert sharding.fit_spec(sharding.activation_spec(), (4, 8), mesh) == P(("data", "fsdp"),
                                                                            "sequence")
    assert sharding.fit_spec(sharding.activation_spec(), (2, 7), mesh) == P("data")
    assert sharding.fit_spec(sharding.activation_spec(), (1, 8), mesh) == P(None, "sequence")
    assert sharding.activation_spec() == P(("data", "fsdp"), "sequence")


# ----------------------------------------------------------------------------- placement


@pytest.mark.parametrize("sizes", [dict(data=1, fsdp=2, tensor=4), dict(data=2, sequence=4)])
def test_from_hf_places_every_param_by_its_rule(hf_dir, reference, sizes):
    mesh = lx.make_mesh(**sizes)
    model = lx.from_hf(hf_dir, mesh=mesh)
    expected = flat(sharding.param_shardings(model.params, mesh, RULES,
                                            model.config.head_dim))
    host = flat(reference.params)
    for path, leaf in flat(model.params).items():
        assert leaf.sharding == expected[path], path
        assert len(leaf.addressable_shards) == 8
        for shard in leaf.addressable_shards:  # each device holds exactly its slice
            np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(host[path])[shard.index])
    assert flat(model.params)["layers/q/kernel"].addressable_shards[0].data.shape == (
        (2, HIDDEN // 2, HIDDEN // 4) if sizes.get("tensor") else (2, HIDDEN, HIDDEN))

    ids = random_ids(4, 32)
    logits = model(ids)
    assert logits.sharding.is_equivalent_to(
        sharding.activation_sharding(mesh, logits.shape, "tensor"), logits.ndim)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(reference(ids)), atol=1e-4, rtol=0)


def test_orbax_load_into_the_rule_shardings(hf_dir, reference, tmp_path):
    lx.save(lx.from_hf(hf_dir, mesh=lx.make_mesh(data=2, sequence=4)), tmp_path / "ckpt")
    mesh = lx.make_mesh(data=2, fsdp=2, tensor=2)  # a different mesh from the one saved
    model = lx.load(tmp_path / "ckpt", mesh=mesh)
    expected = flat(sharding.param_shardings(model.params, mesh, RULES,
                                            model.config.head_dim))
    for path, leaf in flat(model.params).items():
        assert leaf.sharding == expected[path], path
    ids = random_ids(4, 32)
    np.testing.assert_allclose(np.asarray(model(ids)), np.asarray(reference(ids)), atol=1e-4,
                               rtol=0)


def test_init_on_a_mesh():
    config = lx.ModelConfig.from_hf(dict(
        model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    mesh = lx.make_mesh(data=2, fsdp=2, tensor=2)
    model = lx.Model.init(config, jax.random.key(0), mesh=mesh)
    plain = lx.Model.init(config, jax.random.key(0))
    kernel = model.params["layers"]["gate"]["kernel"]
    assert kernel.sharding.spec == P(None, "fsdp", "tensor")
    np.testing.assert_array_equal(np.asarray(kernel), np.asarray(plain.params["layers"]["gate"]["kernel"]))


def test_generate_on_a_mesh(hf_dir, reference):
    """Greedy decoding on a sequence-split mesh: the same tokens, prompt kept intact."""
    ids = random_ids(4, 16, seed=3)
    model = lx.from_hf(hf_dir, mesh=lx.make_mesh(data=2, sequence=4))
    np.testing.assert_array_equal(np.asarray(lx.generate(model, ids, 4)),
                                  np.asarray(lx.generate(reference, ids, 4)))


# ----------------------------------------------------------------------------- training


def loss_fn(model, params, ids, segment_ids=None):
    logp = jax.nn.log_softmax(model.apply(params, ids, segment_ids=segment_ids))[:, :-1]
    return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))


def train_step(model, optimizer):
    """One jitted value_and_grad + optax step; params and optimizer states keep their rule
    shardings (out_shardings); gradients are left to GSPMD (Model.apply constrains them)."""

    def step(params, opt_state, ids, segment_ids):
        loss, grads = jax.value_and_grad(lambda p: loss_fn(model, p, ids, segment_ids))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, grads

    if model.mesh is None:
        return jax.jit(step)
    params = model.param_shardings
    states = model.spec.shardings_of(jax.eval_shape(optimizer.init, model.params))
    return jax.jit(step, out_shardings=(params, states, None, None))


@pytest.mark.parametrize("sizes", [dict(data=2, sequence=4), dict(data=1, fsdp=2, sequence=4)])
def test_sequence_parallel_train_step_equals_unsharded(hf_dir, reference, sizes):
    mesh = lx.make_mesh(**sizes)
    model = lx.from_hf(hf_dir, mesh=mesh)
    # SGD with momentum: the update is linear in the gradients, so parameters after the step
    # are compared at the gradients' tolerance (Adam's first step is lr·sign(g), which flips
    # for gradients within rounding of zero); its momentum mirrors the params like Adam's mu.
    optimizer = optax.sgd(0.1, momentum=0.9)
    ids = random_ids(4, 64, seed=1)
    segments = np.repeat(np.arange(4, dtype=np.int32), 16)[None].repeat(4, 0)  # packed docs

    ref_params, ref_state, ref_loss, ref_grads = train_step(reference, optimizer)(
        reference.params, optimizer.init(reference.params), jnp.asarray(ids), jnp.asarray(segments))

    tokens = sharding.activation_sharding(mesh, ids.shape)
    step = train_step(model, optimizer)
    opt_state = jax.jit(optimizer.init, out_shardings=model.spec.shardings_of(
        jax.eval_shape(optimizer.init, model.params)))(model.params)
    params, opt_state, loss, grads = step(model.params, opt_state, jax.device_put(ids, tokens),
                                          jax.device_put(segments, tokens))
    np.testing.assert_allclose(float(loss), float(ref_loss), atol=1e-5, rtol=0)
    for path, g in flat(grads).items():
        expected = flat(model.param_shardings)[path]
        assert g.sharding.is_equivalent_to(expected, g.ndim), (path, g.sharding, expected)
        np.testing.assert_allclose(np.asarray(g), np.asarray(flat(ref_grads)[path]), atol=1e-5,
                                   rtol=0, err_msg=path)
    for path, p in flat(params).items():
        assert p.sharding == flat(model.param_shardings)[path], path
        np.testing.assert_allclose(np.asarray(p), np.asarray(flat(ref_params)[path]), atol=1e-5,
                                   rtol=0, err_msg=path)
    trace = flat(opt_state)["0/trace/layers/down/kernel"]
    assert trace.sharding == flat(model.param_shardings)["layers/down/kernel"]


def test_ring_model_equals_xla_on_a_mesh(hf_dir):
    mesh = lx.make_mesh(data=2, sequence=4)
    xla = lx.from_hf(hf_dir, mesh=mesh)
    ring = lx.from_hf(hf_dir, mesh=mesh, attention="ring")
    ids = random_ids(2, 64, seed=2)
    np.testing.assert_allclose(np.asarray(ring(ids)), np.asarray(xla(ids)), atol=1e-4, rtol=0)
    tokens = sharding.activation_sharding(mesh, ids.shape)
    ids = jax.device_put(ids, tokens)
    g_xla = jax.jit(jax.grad(lambda p: loss_fn(xla, p, ids)))(xla.params)
    g_ring = jax.jit(jax.grad(lambda p: loss_fn(ring, p, ids)))(ring.params)
    for path, g in flat(g_ring).items():
        np.testing.assert_allclose(np.asarray(g), np.asarray(flat(g_xla)[path]), atol=1e-5,
                                   rtol=0, err_msg=path)


def test_generate_with_a_ring_model_decodes_with_xla(hf_dir):
    """Ring attention is self-attention over the sequence axis; KV-cache calls fall back to
    the xla path, so generation works and equals the xla model's."""
    mesh = lx.make_mesh(data=1, sequence=4, devices=jax.devices()[:4])
    ring_model = lx.from_hf(hf_dir, attention="ring", mesh=mesh)
    plain = lx.from_hf(hf_dir)
    prompt = [[1, 5, 9, 3], [2, 7]]
    np.testing.assert_array_equal(np.asarray(lx.generate(ring_model, prompt, max_new_tokens=6)),
                                  np.asarray(lx.generate(plain, prompt, max_new_tokens=6)))


def test_a_rule_naming_an_unknown_axis_fails():
    mesh = lx.make_mesh(data=2, fsdp=2, tensor=2)
    with pytest.raises(ValueError, match="'model'"):
        sharding.param_spec("embed/embedding", (128, 64), mesh,
                            [("embed/embedding", P("model"), None)])
