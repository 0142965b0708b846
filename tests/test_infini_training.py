"""Infini-attention in train.py: stages that switch a LLaMA model to it, the gates' own
learning rate and weight decay, the passkey fine-tune task, and configs that are refused."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_training import TINY_MODEL, read_metrics, tiny_config

import lctx_jax as lx
from lctx_jax import data, evaluation, lora as lora_lib, training
from lctx_jax.train_config import ConfigError, default_config, fingerprint, stage, validate

INFINI = {"segment_len": 8, "update": "delta"}


@pytest.fixture(scope="module")
def workspace(small_corpus) -> dict:
    return small_corpus


def test_gates_train_at_their_own_rate_without_weight_decay():
    opt = default_config().optimizer
    opt.weight_decay, opt.gate_lr, opt.gate_weight_decay = 0.5, 1e-2, 0.0
    tx = training.optimizer(opt, optax.constant_schedule(1e-4), optax.constant_schedule(1e-2))
    params = {"layers": {"infini_gate": jnp.ones((2, 4)), "q": {"kernel": jnp.ones((2, 3, 3))}}}
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    # Adam's first step moves every leaf by lr · g/|g|, plus lr · wd · w where decayed.
    np.testing.assert_allclose(updates["layers"]["infini_gate"], -1e-2, rtol=1e-4)
    np.testing.assert_allclose(updates["layers"]["q"]["kernel"], -1e-4 * (1 + 0.5), rtol=1e-4)


def test_lora_always_trains_the_gates():
    params = {"layers": {"infini_gate": jnp.zeros((2, 4)), "q": {"kernel": jnp.ones((2, 3, 3))}}}
    mask = lora_lib.trainable_mask(params, lora_lib.LoraConfig(rank=2, targets=("q",)))
    assert mask["layers"]["infini_gate"] and not mask["layers"]["q"]["kernel"]


def test_passkey_batches_score_the_answer_only(workspace):
    tokenizer = data.load_tokenizer(workspace["tokenizer"])
    stream = evaluation.PasskeyBatches(tokenizer, 128, 3, seed=5, style="python")
    batch = next(stream)
    assert {k: v.shape for k, v in batch.items()} == {k: (3, 128) for k in batch}
    for row in range(3):
        scored = batch["targets"][row][batch["loss_mask"][row] > 0]
        key = tokenizer.decode(scored.tolist()).strip()
        assert len(key) == 5 and key.isdigit()
        prompt = tokenizer.decode(batch["input_ids"][row].tolist())
        assert prompt.count(key) == 2 and prompt.endswith("\nPASS_KEY = " + key[:-1]), prompt
        assert batch["loss_mask"][row, -1] == 1 and batch["loss_mask"][row].sum() == len(scored)
    np.testing.assert_array_equal(batch["positions"][0], np.arange(128))
    state, second = stream.get_state(), next(stream)
    again = evaluation.PasskeyBatches(tokenizer, 128, 3, seed=5, style="python")
    again.set_state(state)
    resumed = next(again)
    for key in second:
        np.testing.assert_array_equal(resumed[key], second[key])
    with pytest.raises(ValueError, match="seed"):
        evaluation.PasskeyBatches(tokenizer, 128, 3, seed=6, style="python").set_state(state)
    with pytest.raises(ValueError, match="length must be"):
        evaluation.PasskeyBatches(tokenizer, 20, 1, seed=0, style="python")
    with pytest.raises(ValueError, match="length must be"):  # rows fit, short prompts do not
        evaluation.PasskeyBatches(tokenizer, 256, 1, seed=0, style="python", shortest=20)


def test_a_plain_model_continues_with_infini_attention_then_a_passkey_task(workspace, tmp_path):
    run_dir = tmp_path / "run"
    c = tiny_config(workspace, run_dir)
    c.export_hf = True
    c.optimizer.gate_lr = 5e-2
    c.stages = [stage("base", seq_len=32, batch_size=4, steps=4, lr=3e-3),
                stage("infini", seq_len=32, batch_size=4, steps=6, lr=1e-3, attention="infini",
                      infini=INFINI),
                stage("passkey", seq_len=128, batch_size=2, steps=2, lr=1e-3, attention="infini",
                      task="passkey-python")]
    training.run(c)
    base = lx.load(run_dir / "models" / "base")
    infini = lx.load(run_dir / "models" / "infini")
    passkey = lx.load(run_dir / "models" / "passkey")
    assert base.attention == "xla" and "infini_gate" not in base.params["layers"]
    assert infini.attention == passkey.attention == "infini"
    assert passkey.config.infini == infini.config.infini == lx.attention.infini.InfiniConfig(
        8, "delta")
    gates = np.asarray(infini.params["layers"]["infini_gate"])
    assert gates.shape == (2, 4) and np.abs(gates).max() > 0.05  # started at 0, lr 5e-2
    hf = json.loads((run_dir / "hf" / "passkey" / "config.json").read_text())
    assert hf["model_type"] == "lctx_infini" and hf["infini_attention"]["segment_len"] == 8
    exported = lx.from_hf(run_dir / "hf" / "passkey")
    ids = np.arange(40, dtype=np.int32)[None] % 500
    np.testing.assert_array_equal(np.asarray(exported(ids)), np.asarray(passkey(ids)))
    assert sorted(read_metrics(run_dir)) == list(range(1, 13))


@pytest.mark.parametrize("stages, match", [
    ([dict(attention="infini")], "segment_len is missing"),
    ([dict(attention="xla", infini=INFINI)], "attention='infini'"),
    ([dict(attention="infini", infini={"segment_len": 0})], "segment_len"),
    ([dict(attention="infini", infini={"segment_len": 8, "rule": "x"})], "unknown fields"),
    ([dict(attention="infini", infini=INFINI), dict(attention="xla")], "Infini-attention"),
    ([dict(task="passkey")], "task"),
])
def test_bad_infini_stages_fail_naming_the_field(workspace, tmp_path, stages, match):
    c = tiny_config(workspace, tmp_path / "run")
    c.stages = [stage(f"s{i}", seq_len=32, batch_size=4, steps=2, lr=1e-3, **fields)
                for i, fields in enumerate(stages)]
    with pytest.raises(ConfigError, match=match):
        validate(c)


def test_stage_settings_go_over_the_models_own(workspace, tmp_path):
    c = tiny_config(workspace, tmp_path / "run")
    c.stages = [stage("a", seq_len=32, batch_size=4, steps=2, lr=1e-3, attention="infini",
                      infini=INFINI),
                stage("b", seq_len=64, batch_size=4, steps=2, lr=1e-3, attention="infini",
                      infini={"segment_len": 16})]
    validate(c)
    base = training.base_hf_config(c)
    first, second = (training.stage_model_config(c, i, base).infini for i in (0, 1))
    assert (first.segment_len, first.update) == (8, "delta")
    assert (second.segment_len, second.update) == (16, "delta")
    assert lx.ModelConfig.from_hf(TINY_MODEL).infini is None


def test_runs_without_infini_keep_their_fingerprint(workspace, tmp_path):
    """The stage fields infini / task and the gate optimizer fields at their defaults are not
    in the fingerprint, so run directories written before they existed still resume."""
    c = tiny_config(workspace, tmp_path / "run")
    printed = fingerprint(c)
    assert not {"infini", "task"} & set(printed["stages"][0])
    assert not {"gate_lr", "gate_weight_decay"} & set(printed["optimizer"])
    c.stages[0].task = "passkey-python"
    c.optimizer.gate_lr = 1e-3
    changed = fingerprint(c)
    assert changed["stages"][0]["task"] == "passkey-python"
    assert changed["optimizer"]["gate_lr"] == 1e-3


def test_stages_that_cannot_run_fail_before_any_training(workspace, tmp_path):
    c = tiny_config(workspace, tmp_path / "seq")
    c.mesh.data, c.mesh.sequence, c.mesh.num_devices = 1, 2, 2
    c.stages = [stage("a", seq_len=32, batch_size=4, steps=2, lr=1e-3, attention="infini",
                      infini=INFINI)]
    with pytest.raises(ConfigError, match="mesh.sequence"):
        validate(c)
    c = tiny_config(workspace, tmp_path / "short")
    c.stages = [stage("a", seq_len=32, batch_size=4, steps=2, lr=1e-3),
                stage("b", seq_len=40, batch_size=2, steps=2, lr=1e-3, task="passkey-python")]
    with pytest.raises(ConfigError, match=r"stages\[1\].*length must be"):
        training.run(c)
    assert not (tmp_path / "short" / "models").exists()  # stage a never trained
