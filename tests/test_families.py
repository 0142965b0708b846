"""Adding a model family touches nothing outside its module: a throwaway LLaMA variant with a
GELU MLP (up/down, no gate, stored as mlp.fc_in / mlp.fc_out) and a tied LM head is defined
here in a few lines, registered, and must convert, train, save, load, shard, take LoRA and
generate through the public API."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors import safe_open

import lctx_jax as lx
from lctx_jax import lora, models, training
from lctx_jax.models import llama


class ToyConfig(llama.ModelConfig):
    ARCHITECTURES = {"toy_llama": "ToyLlamaForCausalLM"}

    def linears(self) -> list[llama.LinearName]:
        names = {"up": "mlp.fc_in", "down": "mlp.fc_out"}
        return [dataclasses.replace(lin, theirs=names.get(lin.ours, lin.theirs))
                for lin in super().linears() if lin.ours != "gate"]


class ToyBlock(llama.Block):
    def mlp(self, x: jax.Array) -> jax.Array:
        up = self.dense(self.config.intermediate_size, "up")(x)
        return self.dense(self.config.hidden_size, "down")(nn.gelu(up))


class ToyDecoder(llama.Decoder):
    block = ToyBlock


TOY = models.register(dataclasses.replace(
    llama.FAMILY, name="toy_llama", model_types=("toy_llama",), config=ToyConfig,
    decoder=ToyDecoder, lora_targets=("q", "k", "v", "o", "up", "down")))

HF_CONFIG = {"model_type": "toy_llama", "vocab_size": 64, "hidden_size": 32,
             "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 128, "eos_token_id": None,
             "tie_word_embeddings": True}


@pytest.fixture(scope="module")
def toy():
    config = models.config_from_hf(HF_CONFIG)
    assert isinstance(config, ToyConfig) and models.family_of(config) is TOY
    return lx.Model.init(config, jax.random.key(0))


def ids(batch: int = 2, length: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 64, (batch, length))


def test_parameters_are_the_variants(toy):
    layers = toy.params["layers"]
    assert "gate" not in layers and layers["up"]["kernel"].shape == (2, 32, 48)
    assert "lm_head" not in toy.params  # tied
    assert training.flops_per_token(toy.config, 24) < training.flops_per_token(
        llama.ModelConfig.from_hf({**HF_CONFIG, "model_type": "llama"}), 24)


def test_hf_export_and_import_round_trip(toy, tmp_path):
    lx.to_hf(toy, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "numpy") as f:
        names = set(f.keys())
    assert "model.layers.1.mlp.fc_in.weight" in names and "lm_head.weight" not in names
    assert not any("gate" in name or "up_proj" in name for name in names)
    back = lx.from_hf(tmp_path)
    assert back.config == toy.config
    np.testing.assert_array_equal(np.asarray(back(ids())), np.asarray(toy(ids())))


def test_orbax_save_and_load(toy, tmp_path):
    lx.save(toy, tmp_path / "ckpt")
    back = lx.load(tmp_path / "ckpt")
    np.testing.assert_array_equal(np.asarray(back(ids())), np.asarray(toy(ids())))


def test_a_train_step_lowers_the_loss(toy):
    tx = optax.adam(1e-2)
    batch = jnp.asarray(ids(4, 32, seed=1))

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(lambda p: lx.next_token_nll(toy, batch, p))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params, opt_state = toy.params, tx.init(toy.params)
    losses = []
    for _ in range(5):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.1


def test_lora_uses_the_familys_targets(toy):
    with pytest.raises(ValueError, match="gate"):
        toy.replace(lora=lora.LoraConfig(targets=("gate",)))
    adapted = lora.LoraConfig(rank=4, targets=("up", "down"))
    adapters = lora.init(toy.params, adapted, jax.random.key(1))
    adapters = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(2), x.shape),
                            adapters)  # B != 0, so the adapters change the output
    out = toy.replace(lora=adapted).apply(toy.params, jnp.asarray(ids()), adapters=adapters)
    merged = lx.Model(toy.config, lora.merge(toy.params, adapters, adapted))(ids())
    assert np.abs(np.asarray(merged) - np.asarray(toy(ids()))).max() > 1e-2
    np.testing.assert_allclose(np.asarray(out), np.asarray(merged), atol=1e-5)


def test_generate_equals_the_full_forward_argmax(toy):
    prompt = ids(1, 6, seed=2)
    out = np.asarray(lx.generate(toy, prompt, 8))
    for t in range(6, 14):
        assert out[0, t] == np.asarray(toy(out[:, :t]))[0, -1].argmax()


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
def test_on_a_mesh_params_follow_the_familys_rules(toy):
    mesh = lx.make_mesh(data=2, fsdp=2, tensor=2)
    sharded = lx.Model.init(toy.config, jax.random.key(0), mesh=mesh)
    assert sharded.params["layers"]["up"]["kernel"].sharding.spec == jax.sharding.PartitionSpec(
        None, "fsdp", "tensor")
    np.testing.assert_allclose(np.asarray(sharded(ids(2, 16))), np.asarray(toy(ids(2, 16))),
                               atol=1e-5)
