"""The Flax decoder against transformers (PyTorch, CPU): tiny random models of each family are
saved with save_pretrained, converted, and must give the same f32 logits; exports round-trip.

Weights are drawn with initializer_range 0.2 so logits are O(1) and a wrong rotation, mask or
norm shows up far above the 1e-4 tolerance (f32 accumulation-order differences are ~1e-6).
"""

import contextlib
import dataclasses
import json
import logging
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf

import lctx_jax as lx
from lctx_jax import longrope_search, methods

logging.getLogger("transformers").setLevel(logging.ERROR)

VOCAB, HIDDEN, HEADS, KV_HEADS = 128, 64, 4, 2  # head_dim 16
LONGROPE = {"type": "longrope", "short_factor": np.linspace(1.0, 1.5, 8).tolist(),
            "long_factor": np.linspace(1.0, 6.0, 8).tolist()}
PHI3_IDS = {"pad_token_id": 0, "eos_token_id": 2}  # Phi3Config's defaults lie past VOCAB
FAMILIES = {
    "llama": (tf.LlamaForCausalLM, tf.LlamaConfig, {}),
    "llama-bias": (tf.LlamaForCausalLM, tf.LlamaConfig, {"attention_bias": True, "mlp_bias": True}),
    "llama-yarn": (tf.LlamaForCausalLM, tf.LlamaConfig, {
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                         "original_max_position_embeddings": 64}}),
    "llama3": (tf.LlamaForCausalLM, tf.LlamaConfig, {
        "rope_theta": 500000.0, "tie_word_embeddings": True,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    "llama-dynamic": (tf.LlamaForCausalLM, tf.LlamaConfig, {
        "max_position_embeddings": 64, "rope_scaling": {"rope_type": "dynamic", "factor": 4.0}}),
    "mistral": (tf.MistralForCausalLM, tf.MistralConfig, {"sliding_window": None}),
    "mistral-window": (tf.MistralForCausalLM, tf.MistralConfig, {"sliding_window": 24}),
    "qwen2": (tf.Qwen2ForCausalLM, tf.Qwen2Config, {"tie_word_embeddings": True}),
    "qwen2-window": (tf.Qwen2ForCausalLM, tf.Qwen2Config, {
        "use_sliding_window": True, "sliding_window": 24, "max_window_layers": 0}),
    "phi3": (tf.Phi3ForCausalLM, tf.Phi3Config, {
        "original_max_position_embeddings": 64, "rope_scaling": LONGROPE, **PHI3_IDS}),
    "phi3-window": (tf.Phi3ForCausalLM, tf.Phi3Config, {"sliding_window": 24, **PHI3_IDS}),
    "phi3-partial": (tf.Phi3ForCausalLM, tf.Phi3Config, {
        "partial_rotary_factor": 0.5, **PHI3_IDS, "original_max_position_embeddings": 64,
        "rope_scaling": {**LONGROPE, "short_factor": [1.0] * 4, "long_factor": [2.0] * 4}}),
}


def make_hf(family: str, directory: pathlib.Path, **overrides) -> torch.nn.Module:
    model_cls, config_cls, extra = FAMILIES[family]
    kwargs = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                  max_position_embeddings=256, initializer_range=0.2)
    kwargs.update(extra, **overrides)
    torch.manual_seed(0)
    model = model_cls(config_cls(**kwargs)).eval()
    model.save_pretrained(directory)
    return model


def hf_logits(model: torch.nn.Module, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits.float().numpy()


def random_ids(batch: int = 2, length: int = 200) -> np.ndarray:
    return np.random.default_rng(0).integers(0, VOCAB, (batch, length))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_equal_transformers(family, tmp_path):
    """200 tokens: past the original window (64) of the yarn / llama3 / longrope / dynamic runs."""
    hf = make_hf(family, tmp_path)
    ids = random_ids()
    ref = hf_logits(hf, ids)
    ours = np.asarray(lx.from_hf(tmp_path)(ids))
    assert np.abs(ref).max() > 0.5  # the comparison below is not vacuous
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_rope_scaling_override_matches_transformers_with_that_config(tmp_path):
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    make_hf("llama", tmp_path / "base")
    reference = make_hf("llama", tmp_path / "yarn", rope_scaling=scaling)  # same seed: same weights
    ids = random_ids()
    model = lx.from_hf(tmp_path / "base", rope_scaling=scaling)
    assert model.config.rope.rope_type == "yarn"
    np.testing.assert_allclose(np.asarray(model(ids)), hf_logits(reference, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["llama-bias", "qwen2", "qwen2-window", "phi3"])
def test_to_hf_round_trip(family, tmp_path):
    hf = make_hf(family, tmp_path / "src")
    model = lx.from_hf(tmp_path / "src")
    lx.to_hf(model, tmp_path / "out")
    back = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = random_ids(1, 100)
    np.testing.assert_array_equal(hf_logits(back, ids), hf_logits(hf, ids))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json",
                                                                    "model.safetensors"]


@pytest.mark.parametrize("family", ["llama-yarn", "llama3", "phi3-partial"])
@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 4.0},
                                     {"rope_type": "yarn", "factor": 8.0,
                                      "original_max_position_embeddings": 64}])
def test_with_rope_scaling_equals_reading_config_json_with_it(family, scaling, tmp_path):
    """The method put on a loaded model equals from_hf(path, rope_scaling=...); None is plain
    RoPE, equal to reading the checkpoint with its scaling removed."""
    make_hf(family, tmp_path)
    config = lx.from_hf(tmp_path).config
    if scaling is None:
        hf = json.loads((tmp_path / "config.json").read_text())
        for key in ("rope_scaling", "rope_parameters"):
            hf.pop(key, None)
        hf["rope_theta"] = config.rope.theta
        expected = lx.ModelConfig.from_hf(hf)
    else:
        expected = lx.from_hf(tmp_path, rope_scaling=scaling).config
    assert config.with_rope_scaling(scaling) == expected
    assert config.with_rope_scaling(scaling).rope.rope_type == (scaling or {}).get(
        "rope_type", "default")


@contextlib.contextmanager
def transformers_warnings():
    """The messages transformers logs at WARNING or above inside the block."""
    said: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: said.append(record.getMessage())
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    try:
        yield said
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


ORIGINAL = 64  # the base checkpoints' max_position_embeddings L
LONGROPE_200 = longrope_search.rope_scaling(  # searched-style factors to a 200-token target
    lx.RopeConfig(head_dim=16, rotary_dim=16, max_position_embeddings=ORIGINAL), 200,
    np.linspace(1.0, 4.0, 8))
EXTENSIONS = {  # name: (base family, rope_scaling, the max_position_embeddings it must state)
    **{m: ("llama", methods.scaling(m, 4.0, ORIGINAL), 4 * ORIGINAL)
       for m in ("pi", "ntk", "yarn", "llama3")},
    "dynamic": ("llama", methods.scaling("dynamic", 4.0, ORIGINAL), ORIGINAL),
    "longrope": ("llama", LONGROPE_200, 200),
    "longrope-phi3": ("phi3", LONGROPE_200, 200),
}


@pytest.mark.parametrize("name", list(EXTENSIONS))
def test_an_extended_export_states_its_length_and_transformers_agrees(name, tmp_path):
    """config.json of a method put on a 64-token checkpoint states the extended length (L·s,
    longrope's target; dynamic NTK keeps L, its formula's original length) and keeps L; it
    reads back to the same config, transformers loads it without a RoPE warning and gives our
    logits past L."""
    family, scaling, length = EXTENSIONS[name]
    make_hf(family, tmp_path / "base", rope_scaling=None, max_position_embeddings=ORIGINAL)
    model = lx.from_hf(tmp_path / "base", rope_scaling=scaling)
    lx.to_hf(model, tmp_path / "out")
    hf = json.loads((tmp_path / "out" / "config.json").read_text())
    assert model.config.rope.max_position_embeddings == hf["max_position_embeddings"] == length
    assert hf["original_max_position_embeddings"] == ORIGINAL
    if scaling["rope_type"] in ("yarn", "longrope", "llama3"):  # where transformers reads L
        assert hf["rope_parameters"]["original_max_position_embeddings"] == ORIGINAL
    back = lx.from_hf(tmp_path / "out").config
    if name == "ntk":  # written as "default" with the scaled base: the same rotation
        assert back.rope.rope_type == "default"
        assert back.rope.max_position_embeddings == length
        back = dataclasses.replace(back, rope=model.config.rope)
    assert back == model.config
    with transformers_warnings() as said:
        reference = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert not [line for line in said if "rope" in line.lower()], said
    assert reference.config.max_position_embeddings == length
    ids = random_ids(1, 100)
    np.testing.assert_allclose(np.asarray(model(ids)), hf_logits(reference, ids), atol=1e-4,
                               rtol=0)


def test_sharded_checkpoints_read_and_write(tmp_path):
    hf = make_hf("llama", tmp_path / "src")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    model = lx.from_hf(tmp_path / "sharded")
    ids = random_ids(1, 50)
    np.testing.assert_allclose(np.asarray(model(ids)), hf_logits(hf, ids), atol=1e-4, rtol=0)
    lx.to_hf(model, tmp_path / "out", max_shard_bytes=100_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    back = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    np.testing.assert_array_equal(hf_logits(back, ids), hf_logits(hf, ids))


def test_orbax_round_trip_and_cli(tmp_path):
    hf = make_hf("phi3", tmp_path / "hf")
    model = lx.from_hf(tmp_path / "hf")
    lx.save(model, tmp_path / "ckpt")
    restored = lx.load(tmp_path / "ckpt")
    assert restored.config == model.config
    ids = random_ids(1, 120)
    np.testing.assert_array_equal(np.asarray(restored(ids)), np.asarray(model(ids)))

    run = [sys.executable, "-m", "lctx_jax.convert"]
    subprocess.run(run + ["hf-to-orbax", str(tmp_path / "hf"), str(tmp_path / "cli")], check=True)
    subprocess.run(run + ["orbax-to-hf", str(tmp_path / "cli"), str(tmp_path / "back")], check=True)
    back = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    np.testing.assert_array_equal(hf_logits(back, ids), hf_logits(hf, ids))


def test_load_into_a_mesh(tmp_path):
    make_hf("llama", tmp_path / "hf")
    model = lx.from_hf(tmp_path / "hf")
    lx.save(model, tmp_path / "ckpt")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    restored = lx.load(tmp_path / "ckpt", mesh=mesh)
    leaf = jax.tree_util.tree_leaves(restored.params)[0]
    assert leaf.sharding == jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    ids = random_ids(1, 30)
    np.testing.assert_array_equal(np.asarray(restored(ids)), np.asarray(model(ids)))


def test_bf16_params_stay_bf16_and_track_transformers(tmp_path):
    hf = make_hf("llama", tmp_path / "f32")
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    model = lx.from_hf(tmp_path / "bf16", dtype=jnp.bfloat16)
    dtypes = {leaf.dtype for leaf in jax.tree_util.tree_leaves(model.params)}
    assert dtypes == {jnp.dtype("bfloat16")}
    ids = random_ids(1, 64)
    ours, ref = np.asarray(model(ids)), hf_logits(hf, ids)
    # bf16 (8-bit mantissa) through 2 layers: a few percent of the logit scale.
    assert np.abs(ours - ref).max() < 0.05 * np.abs(ref).max()


def test_remat_and_gradients(tmp_path):
    make_hf("llama", tmp_path)
    model = lx.from_hf(tmp_path)
    remat = lx.from_hf(tmp_path, remat="full")
    ids = jnp.asarray(random_ids(1, 32))

    def loss(params, m):  # next-token cross-entropy
        logp = jax.nn.log_softmax(m.apply(params, ids))[:, :-1]
        return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))

    g1 = jax.grad(loss)(model.params, model)
    g2 = jax.grad(loss)(remat.params, remat)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        # recomputation may reorder f32 sums: agreement to ~1e-7 of gradients of size ~1e-2
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- bad input


def test_unsupported_architecture(tmp_path):
    make_hf("llama", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        lx.from_hf(tmp_path)


def test_missing_shard(tmp_path):
    make_hf("llama", tmp_path / "src").save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    shard = sorted((tmp_path / "sharded").glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"shard {shard.name}"):
        lx.from_hf(tmp_path / "sharded")


def test_truncated_safetensors(tmp_path):
    make_hf("llama", tmp_path)
    file = tmp_path / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated"):
        lx.from_hf(tmp_path)


def test_tensor_of_wrong_shape(tmp_path):
    make_hf("llama", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 80
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"mlp.gate_proj.weight has shape \(96, 64\)"):
        lx.from_hf(tmp_path)


def test_pickle_checkpoints_are_refused(tmp_path):
    make_hf("llama", tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pickle files are never loaded"):
        lx.from_hf(tmp_path)


def test_half_written_orbax_checkpoint(tmp_path):
    make_hf("llama", tmp_path / "hf")
    model = lx.from_hf(tmp_path / "hf")
    lx.save(model, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").unlink()  # a save killed before its last write
    with pytest.raises(FileNotFoundError, match="interrupted"):
        lx.load(tmp_path / "ckpt")
    lx.save(model, tmp_path / "ckpt")  # replaces the incomplete directory
    np.testing.assert_array_equal(model(random_ids(1, 8)), lx.load(tmp_path / "ckpt")(
        random_ids(1, 8)))
    with pytest.raises(FileExistsError):
        lx.save(model, tmp_path / "ckpt")
    for item in (tmp_path / "ckpt" / "params").rglob("*"):
        if item.is_file() and item.stat().st_size > 1000:
            item.write_bytes(item.read_bytes()[:100])  # damage the array data
    with pytest.raises(ValueError, match="damaged"):
        lx.load(tmp_path / "ckpt")


def test_sliding_window_changes_what_is_seen_past_the_window(tmp_path):
    """The windowed families above match transformers at 200 tokens (test_logits_equal_
    transformers); here: the window is what makes them differ from full attention, and only
    from the first query whose window excludes a key (position 24 for a window of 24)."""
    make_hf("mistral-window", tmp_path)
    windowed = lx.from_hf(tmp_path)
    full = windowed.replace(config=dataclasses.replace(windowed.config, sliding_window=None))
    ids = random_ids(1, 40)
    diff = np.abs(np.asarray(windowed(ids)) - np.asarray(full(ids))).max(axis=-1)[0]
    assert diff[:24].max() < 1e-6 and diff[24:].min() > 1e-3


def test_qwen2_with_some_sliding_layers_is_refused(tmp_path):
    make_hf("qwen2", tmp_path, use_sliding_window=True, sliding_window=24, max_window_layers=1)
    with pytest.raises(ValueError, match="max_window_layers"):
        lx.from_hf(tmp_path)


@pytest.mark.parametrize("family", ["llama-yarn", "phi3-partial", "mistral-window"])
def test_flash_attention_model_equals_xla(family, tmp_path):
    """attention="flash" (Pallas, interpret mode here, RoPE inside the kernel): same logits and
    gradients as "xla" past the original window (f32: online-softmax reassociation and the
    in-kernel rotation; measured up to 1.3e-5 on these logits of O(1))."""
    make_hf(family, tmp_path)
    xla, flash = lx.from_hf(tmp_path), lx.from_hf(tmp_path, attention="flash")
    ids = jnp.asarray(random_ids(1, 150))

    def loss(params, m):
        logp = jax.nn.log_softmax(m.apply(params, ids))[:, :-1]
        return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))

    np.testing.assert_allclose(np.asarray(flash(ids)), np.asarray(xla(ids)), atol=3e-5, rtol=0)
    g_xla, g_flash = jax.grad(loss)(xla.params, xla), jax.grad(loss)(flash.params, flash)
    for a, b in zip(jax.tree_util.tree_leaves(g_flash), jax.tree_util.tree_leaves(g_xla)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)


def test_attention_block_size_reaches_the_kernel(tmp_path):
    """ModelSpec.attention_block_size is the flash kernel's block: 150 tokens in blocks of 32
    make a grid of 5 q blocks (the default, 128 on CPU, makes 2), with the same logits; a bad
    value is refused by name."""
    make_hf("llama-yarn", tmp_path)
    xla = lx.from_hf(tmp_path)
    ids = jnp.asarray(random_ids(1, 150))
    for block, q_blocks in ((32, 5), (None, 2)):
        model = xla.replace(attention="flash", attention_block_size=block)
        grids = re.findall(r"grid=\((\d+), (\d+), (\d+), (\d+)\)",
                           str(jax.make_jaxpr(model.apply)(model.params, ids)))
        assert grids and {int(g[2]) for g in grids} == {q_blocks}, grids
        np.testing.assert_allclose(np.asarray(model(ids)), np.asarray(xla(ids)), atol=3e-5,
                                   rtol=0)
    with pytest.raises(ValueError, match="attention_block_size must be a positive int"):
        xla.replace(attention_block_size=0)
    with pytest.raises(ValueError, match="cudnn' picks its own tiles"):
        xla.replace(attention="cudnn", attention_block_size=64)
