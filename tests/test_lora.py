"""lctx_jax.lora: merge math, trainable partition, a few AdamW steps, export to transformers."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers as tf
from flax import traverse_util

import lctx_jax as lx
from lctx_jax import lora

logging.getLogger("transformers").setLevel(logging.ERROR)

VOCAB = 64
CFG = lora.LoraConfig()


def tiny_config(**overrides):
    return lx.ModelConfig.from_hf(dict(
        model_type="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, attention_bias=True, **overrides))


@pytest.fixture(scope="module")
def model():
    return lx.Model.init(tiny_config(), jax.random.key(0))


def randomized(adapters, seed=1, std=0.1):
    """Adapters with B drawn too, so that merging changes the kernels."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.asarray(rng.standard_normal(x.shape) * std, x.dtype)
        if path[-1].key == "b" else x, adapters)


def paths(tree):
    return set(traverse_util.flatten_dict(tree))


def test_init_merges_to_the_base(model):
    adapters = lora.init(model.params, CFG, jax.random.key(1))
    shapes = {name: (x["a"].shape, x["b"].shape, x["a"].dtype)
              for name, x in adapters["layers"].items()}
    assert shapes == {"q": ((2, 32, 8), (2, 8, 32), jnp.float32),
                      "k": ((2, 32, 8), (2, 8, 16), jnp.float32),
                      "v": ((2, 32, 8), (2, 8, 16), jnp.float32),
                      "o": ((2, 32, 8), (2, 8, 32), jnp.float32)}
    a = np.asarray(adapters["layers"]["q"]["a"])
    assert np.abs(a).max() <= 1 / np.sqrt(32) and a.std() > 0.05
    merged = lora.merge(model.params, adapters, CFG)
    flat, flat_merged = (traverse_util.flatten_dict(t) for t in (model.params, merged))
    assert flat.keys() == flat_merged.keys()
    for path, leaf in flat.items():
        np.testing.assert_array_equal(flat_merged[path], leaf, err_msg=str(path))
        if path[1:2] not in [(name,) for name in CFG.targets]:
            assert flat_merged[path] is leaf, path  # untouched leaves are the same objects


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_merge_math(model, dtype):
    """Merged kernel = W + (alpha/r) · A B per layer, f32 then cast; x W' = x W + s (x A) B."""
    params = jax.tree_util.tree_map(lambda x: x.astype(dtype), model.params)
    cfg = lora.LoraConfig(rank=4, alpha=12.0, targets=("v", "down"))
    adapters = randomized(lora.init(params, cfg, jax.random.key(2)))
    merged = jax.jit(lora.merge, static_argnums=2)(params, adapters, cfg)
    assert cfg.scale == 3.0
    for name in cfg.targets:
        w = np.asarray(params["layers"][name]["kernel"], np.float32)
        a, b = (np.asarray(adapters["layers"][name][x], np.float64) for x in "ab")
        ours = merged["layers"][name]["kernel"]
        assert ours.dtype == dtype
        for layer in range(2):
            expected = w[layer] + 3.0 * a[layer] @ b[layer]
            np.testing.assert_allclose(np.asarray(ours[layer], np.float32),
                                       expected.astype(dtype), rtol=1e-6, atol=1e-6)
    w, a, b = (np.asarray(x[0], np.float64) for x in (
        params["layers"]["v"]["kernel"], adapters["layers"]["v"]["a"],
        adapters["layers"]["v"]["b"]))
    x = np.random.default_rng(3).standard_normal((5, w.shape[0]))
    if dtype == jnp.float32:
        np.testing.assert_allclose(x @ np.asarray(merged["layers"]["v"]["kernel"][0]),
                                   x @ w + 3.0 * (x @ a) @ b, atol=1e-5)


@pytest.mark.parametrize("targets", [("q", "k", "v", "o"), ("gate", "up", "down")])
def test_adapters_inside_the_layers_equal_the_merged_model(model, targets):
    """Model.apply(..., adapters=) computes x W + s (x A) B in every layer, without a merged
    kernel: its logits and its gradients with respect to A and B equal the merged model's."""
    cfg = lora.LoraConfig(rank=4, alpha=12.0, targets=targets)
    adapters = randomized(lora.init(model.params, cfg, jax.random.key(4)))
    ids = jax.random.randint(jax.random.key(5), (2, 24), 0, VOCAB)
    with_lora = lx.Model(model.config, model.params, lora=cfg)

    def inside(adapters):
        return with_lora.apply(model.params, ids, adapters=adapters)

    def merged(adapters):
        return model.apply(lora.merge(model.params, adapters, cfg), ids)

    np.testing.assert_allclose(inside(adapters), merged(adapters), rtol=1e-5, atol=1e-5)
    loss = lambda f: lambda a: jnp.sum(jnp.sin(f(a)))  # noqa: E731
    for got, want in zip(jax.tree.leaves(jax.grad(loss(inside))(adapters)),
                         jax.tree.leaves(jax.grad(loss(merged))(adapters))):
        np.testing.assert_allclose(got, want, atol=2e-5 * float(jnp.max(jnp.abs(want))))
    with pytest.raises(ValueError, match="without a LoraConfig"):
        model.apply(model.params, ids, adapters=adapters)


def test_trainable_mask_split_combine():
    params = lx.Model.init(tiny_config(), jax.random.key(0)).params
    norms = {("layers", "attn_norm", "scale"), ("layers", "mlp_norm", "scale"), ("norm", "scale")}

    def selected(cfg):
        flat = traverse_util.flatten_dict(lora.trainable_mask(params, cfg))
        assert flat.keys() == paths(params)
        return {path for path, on in flat.items() if on}

    assert selected(CFG) == norms | {("embed", "embedding")}
    assert selected(lora.LoraConfig(trainable=("lm_head",))) == {("lm_head", "kernel")}
    assert selected(lora.LoraConfig(trainable=())) == set()
    assert selected(None) == paths(params)
    tied = lx.Model.init(tiny_config(tie_word_embeddings=True), jax.random.key(0)).params
    assert "lm_head" not in tied and not any(jax.tree_util.tree_leaves(
        lora.trainable_mask(tied, lora.LoraConfig(trainable=("lm_head",)))))

    trainable, frozen = lora.split(params, lora.trainable_mask(params, CFG))
    assert paths(trainable) == norms | {("embed", "embedding")}
    assert paths(frozen) == paths(params) - paths(trainable)
    assert lora.num_params(trainable) + lora.num_params(frozen) == lora.num_params(params)
    back = traverse_util.flatten_dict(lora.combine(trainable, frozen))
    assert all(back[path] is leaf for path, leaf in traverse_util.flatten_dict(params).items())
    with pytest.raises(ValueError, match="trainable_mask"):
        lora.split(params, {"embed": {"embedding": True}})


def test_adamw_trains_only_trainable_and_adapters(model):
    params = model.params
    trainable, frozen = lora.split(params, lora.trainable_mask(params, CFG))
    adapters = lora.init(params, CFG, jax.random.key(1))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (2, 16)), jnp.int32)

    def loss_fn(trainable, adapters, frozen):
        merged = lora.merge(lora.combine(trainable, frozen), adapters, CFG)
        logits = model.apply(merged, ids)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    optimizer = optax.adamw(1e-2, weight_decay=0.0)
    state = optimizer.init((trainable, adapters))
    mu = state[0].mu
    assert (jax.tree_util.tree_structure(mu)
            == jax.tree_util.tree_structure((trainable, adapters)))
    assert (len(jax.tree_util.tree_leaves(state))
            == 2 * len(jax.tree_util.tree_leaves((trainable, adapters))) + 1)  # mu, nu, count

    @jax.jit
    def step(trainable, adapters, state, frozen):
        loss, grads = jax.value_and_grad(loss_fn, argnums=(0, 1))(trainable, adapters, frozen)
        updates, state = optimizer.update(grads, state, (trainable, adapters))
        trainable, adapters = optax.apply_updates((trainable, adapters), updates)
        return trainable, adapters, state, loss

    new_trainable, new_adapters, losses = trainable, adapters, []
    for _ in range(8):
        new_trainable, new_adapters, state, loss = step(new_trainable, new_adapters, state, frozen)
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.1, losses

    for tree, new_tree in ((trainable, new_trainable), (adapters, new_adapters)):
        for path, leaf in traverse_util.flatten_dict(tree).items():
            assert not np.array_equal(traverse_util.flatten_dict(new_tree)[path], leaf), path
    after = lora.combine(new_trainable, frozen)
    for path, leaf in traverse_util.flatten_dict(frozen).items():
        np.testing.assert_array_equal(traverse_util.flatten_dict(after)[path], leaf)
    assert ("lm_head", "kernel") in paths(frozen)


@pytest.mark.parametrize("kwargs, field", [
    (dict(rank=0), "rank"), (dict(targets=()), "targets"), (dict(targets="q"), "targets"),
    (dict(trainable=("embeddings",)), "trainable")])
def test_rejects_bad_config(kwargs, field):
    with pytest.raises(ValueError, match=f"LoraConfig.{field}"):
        lora.LoraConfig(**kwargs)


def test_targets_must_be_projections_of_the_family(model):
    with pytest.raises(ValueError, match="qkv"):
        model.replace(lora=lora.LoraConfig(targets=("qkv",)))
    with pytest.raises(ValueError, match="qkv"):
        lora.init(model.params, lora.LoraConfig(targets=("qkv",)), jax.random.key(0))


def test_merged_export_matches_transformers(model, tmp_path):
    """to_hf of the merged parameters: transformers computes the same logits."""
    # Weights other than norm scales ×10 (std 0.2, as tests/test_model.py's initializer_range)
    # so logits are O(1) and a wrong merge shows far above 1e-4.
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x if path[-1].key == "scale" else 10 * x, model.params)
    cfg = lora.LoraConfig(targets=("q", "k", "v", "o", "gate", "up", "down"))
    merged = lora.merge(params, randomized(lora.init(params, cfg, jax.random.key(3))), cfg)
    ours = lx.Model(model.config, merged)
    lx.to_hf(ours, tmp_path)
    hf = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = np.random.default_rng(4).integers(0, VOCAB, (2, 24))
    with torch.no_grad():
        reference = hf(torch.as_tensor(ids)).logits.float().numpy()
    logits = np.asarray(ours(ids))
    assert np.abs(logits).max() > 0.5
    assert np.abs(logits - np.asarray(lx.Model(model.config, params)(ids))).max() > 0.1
    np.testing.assert_allclose(logits, reference, atol=1e-4, rtol=0)
