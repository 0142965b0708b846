"""Bad input never passes silently: a run whose loss goes NaN stops before saving it (or, with
config.nonfinite="skip", skips and counts such steps); bad tokenizers, data and mesh sizes fail
before the run directory is claimed, and a run that wrote nothing does not block a corrected
rerun; the convert and train.py / eval.py command lines report errors as one line."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from test_training import (
    ROOT,
    TINY_MODEL,
    _train_cmd,
    config_file,
    read_metrics,
    tiny_config,
)

import lctx_jax as lx
from lctx_jax import convert, training
from lctx_jax.train_config import ConfigError, stage

ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}


@pytest.fixture(scope="module")
def workspace(small_corpus) -> dict:
    return small_corpus


def _one_line(stderr: str, program: str) -> str:
    """The single line of `stderr` (what a failing command printed), checked to be one line
    starting with `program` and no traceback. (`python -m lctx_jax.convert` also gets runpy's
    warning that the package imported the module first: not an error report.)"""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.strip().splitlines()
             if not line.startswith("<frozen runpy>")]
    assert len(lines) == 1 and lines[0].startswith(f"{program}: "), stderr
    return lines[0]


def _checkpoints(run_dir: pathlib.Path) -> list[int]:
    folder = run_dir / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() \
        else []


# ----------------------------------------------------------------------------- non-finite


def test_train_py_stops_a_nan_run_keeping_the_last_finite_checkpoint(workspace, tmp_path):
    """lr=1e30 after a warmup: step 2's update blows the weights up, step 3's loss is NaN. The
    run stops at the checkpoint boundary of step 4 (before the log boundary of step 5), before
    saving it: checkpoint 2 is the latest, no models/ or hf/ is written, exit status 1."""
    config = config_file(tmp_path / "nan.py", workspace, """
    c.eval_batches = 0
    c.export_hf = True
    c.log_every = 5
    c.checkpoint_every = 2
    c.stages = [stage("base", seq_len=32, batch_size=4, steps=8, lr=1e30, warmup_steps=4)]""")
    run_dir = tmp_path / "run"
    out = subprocess.run(_train_cmd(config, run_dir), cwd=ROOT, env=ENV, capture_output=True,
                         text=True, check=False)
    assert out.returncode == 1, out.stderr
    line = _one_line(out.stderr, "train.py")
    assert "training diverged: stage base:" in line and "step 3 of 8" in line, line
    assert "step 2" in line and "lower lr" in line and "nonfinite" in line, line
    assert _checkpoints(run_dir) == [2]
    assert not (run_dir / "models").exists() and not (run_dir / "hf").exists()
    metrics = read_metrics(run_dir)
    assert sorted(metrics) == [1, 2, 3] and np.isfinite(metrics[2]["loss"])
    assert not np.isfinite(metrics[3]["loss"])


def test_a_run_that_diverged_before_any_checkpoint_does_not_block_a_corrected_rerun(
        workspace, tmp_path):
    run_dir = tmp_path / "run"
    c = tiny_config(workspace, run_dir, eval_batches=0)  # log every 2, checkpoint every 4
    c.stages = [stage("base", seq_len=32, batch_size=4, steps=4, lr=1e30)]
    with pytest.raises(training.TrainingDiverged, match=r"stage base: the loss .* at step 2 of 4"
                       r".*no checkpoint was written"):
        training.run(c)
    assert (run_dir / "config.json").exists()  # claimed: it got as far as training
    assert _checkpoints(run_dir) == [] and not (run_dir / "models").exists()
    c.stages[0].lr = 3e-3  # another fingerprint: accepted, as nothing was saved
    training.run(c)
    assert json.loads((run_dir / "config.json").read_text())["fingerprint"]["stages"][0][
        "lr"] == 3e-3
    metrics = read_metrics(run_dir)
    assert sorted(metrics) == [1, 2, 3, 4]
    assert all(np.isfinite(m["loss"]) for m in metrics.values())
    assert (run_dir / "models" / "base" / "config.json").exists()
    c.stages[0].lr = 1e-3  # now it has checkpoints: a different config is refused
    with pytest.raises(ConfigError, match="different config"):
        training.run(c)


def test_a_non_finite_state_is_never_checkpointed(workspace, tmp_path):
    """optimizer.eps=0: Adam's first update divides 0 by 0 where a gradient is exactly zero,
    so the state after step 1 holds NaN while step 1's loss and gradient norm are finite."""
    run_dir = tmp_path / "run"
    c = tiny_config(workspace, run_dir, eval_batches=0, checkpoint_every=1, log_every=4)
    c.optimizer.eps = 0.0
    c.stages = [stage("base", seq_len=32, batch_size=4, steps=4, lr=1e-3)]
    with pytest.raises(training.TrainingDiverged,
                       match=r"train state after step 1 of 4 holds NaN / inf.*optimizer.eps"):
        training.run(c)
    assert _checkpoints(run_dir) == [] and not (run_dir / "models").exists()
    assert np.isfinite(read_metrics(run_dir)[1]["loss"])


def test_skip_mode_leaves_the_state_unchanged_on_non_finite_steps_and_counts_them(
        workspace, tmp_path, monkeypatch, capsys):
    """Batches 2 and 3 carry a NaN loss mask (a NaN loss and gradient): both steps are skipped
    in the jit, the learning-rate schedule does not advance over them, and the run finishes."""
    feed_next, calls = training._Feed.next, []

    def poisoned(self):
        batch = feed_next(self)
        calls.append(1)
        if len(calls) in (2, 3):
            batch["loss_mask"] = batch["loss_mask"] * jnp.nan
        return batch

    monkeypatch.setattr(training._Feed, "next", poisoned)
    run_dir = tmp_path / "run"
    c = tiny_config(workspace, run_dir, eval_batches=0, nonfinite="skip")
    c.stages = [stage("base", seq_len=32, batch_size=4, steps=6, lr=3e-3, warmup_steps=4)]
    results = training.run(c)
    assert results[0].skipped == 2
    assert "2 steps skipped" in capsys.readouterr().out
    metrics = read_metrics(run_dir)
    assert {s: m["skipped"] for s, m in metrics.items()} == {1: 0, 2: 1, 3: 1, 4: 0, 5: 0, 6: 0}
    assert not np.isfinite(metrics[2]["loss"]) and np.isfinite(metrics[4]["loss"])
    lrs = [metrics[s]["lr"] for s in range(1, 7)]
    assert lrs[1] == lrs[2] == lrs[3] < lrs[4]  # steps 2, 3 left the schedule where it was
    model = lx.load(run_dir / "models" / "base")
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(model.params))


# ----------------------------------------------------------------------------- inputs


def _corrupt_tokenizer(c, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\x00garbage, not a sentencepiece model" * 9)
    c.tokenizer = str(tmp_path / "tokenizer.model")


def _tokenizer_without_bos(c, tmp_path):
    import sentencepiece as spm
    path = tmp_path / "nobos.model"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([f"line {i} of words and more words" for i in range(300)]),
        model_prefix=str(path.with_suffix("")), vocab_size=40, bos_id=-1, minloglevel=2)
    c.tokenizer = str(path)


@pytest.mark.parametrize("change, message", [
    (_corrupt_tokenizer, "config.tokenizer: .*not a sentencepiece model"),
    (_tokenizer_without_bos, "config.tokenizer: the tokenizer's bos_id is -1"),
    (lambda c, tmp: c.data.update(dataset="pg19", text_key="book_text",
                                  data_dir=str(tmp / "missing")),
     r"config.data \(dataset='pg19'.* is not prepared"),
    (lambda c, tmp: c.data.update(eval_split="nosuch"), "split='nosuch'.*Unknown split"),
    (lambda c, tmp: c.mesh.update(fsdp=3, num_devices=0), r"config.mesh: fsdp=3 .* 8 devices"),
])
def test_bad_inputs_fail_before_the_run_dir_is_claimed(workspace, tmp_path, change, message):
    c = tiny_config(workspace, tmp_path / "run")
    change(c, tmp_path)
    with pytest.raises(ConfigError, match=message):
        training.run(c)
    assert not (tmp_path / "run").exists()


def test_mesh_sizes_the_devices_cannot_hold_are_config_errors(workspace, tmp_path):
    c = tiny_config(workspace, tmp_path / "run")
    one, eight = jax.devices()[:1], jax.devices()[:8]

    def mesh(devices, **sizes):
        c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1, "sequence": 1,
                                            "num_devices": 0, **sizes})
        return training.config_mesh(c, devices)

    assert mesh(one) is None  # the defaults on one device: no mesh
    assert mesh(eight, num_devices=1) is None  # one device asked for: no mesh
    with pytest.raises(ConfigError, match=r"fsdp=3 does not divide the 1 device.*the first 1 "):
        mesh(eight, fsdp=3, num_devices=1)
    with pytest.raises(ConfigError, match=r"config.mesh: fsdp=3 does not divide the 1 device"):
        mesh(one, fsdp=3)
    with pytest.raises(ConfigError, match=r"fsdp=3 does not divide the 8 devices.*"
                                          r"num_devices=0: all 8 devices"):
        mesh(eight, fsdp=3)
    with pytest.raises(ConfigError, match=r"config.mesh: mesh axis fsdp='2': sizes are "
                                          "positive ints"):
        mesh(eight, fsdp="2")  # as a config file may say
    with pytest.raises(ConfigError, match="num_devices=16, but there are only 8 devices"):
        mesh(eight, num_devices=16)
    with pytest.raises(ConfigError, match=r"tensor=2, but there are 4 devices.*the first 4 of "
                                          "the 8"):
        mesh(eight, data=1, tensor=2, num_devices=4)
    assert dict(mesh(eight, data=1, tensor=2, num_devices=2).shape) == {
        "data": 1, "fsdp": 1, "tensor": 2, "sequence": 1}


# ----------------------------------------------------------------------------- command lines


def test_convert_cli_errors_are_one_line_with_exit_status_2(tmp_path, capsys):
    model = lx.Model.init(lx.ModelConfig.from_hf(TINY_MODEL), jax.random.key(0))
    convert.to_hf(model, tmp_path / "hf")
    lx.save(model, tmp_path / "ckpt")
    for argv, expected in [
        (["hf-to-orbax", str(tmp_path / "missing"), str(tmp_path / "out")], "config.json"),
        (["orbax-to-hf", str(tmp_path / "missing"), str(tmp_path / "out")], "no checkpoint"),
        (["hf-to-orbax", str(tmp_path / "hf"), str(tmp_path / "ckpt")], "holds a checkpoint"),
        (["orbax-to-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf")], "holds a Hugging Face"),
    ]:
        assert convert.main(argv) == 2, argv
        captured = capsys.readouterr()
        assert expected in _one_line(captured.err, "python -m lctx_jax.convert"), argv
    out = subprocess.run([sys.executable, "-m", "lctx_jax.convert", "hf-to-orbax",
                          str(tmp_path / "missing"), str(tmp_path / "out")], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, check=False)
    assert out.returncode == 2
    assert "not found" in _one_line(out.stderr, "python -m lctx_jax.convert")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("program, flag, named", [
    ("train.py", "--config.nonexistent=3", "--config.nonexistent: the config has no field"),
    ("train.py", "--config.stages.0.sq_len=5", "--config.stages.0.sq_len: cannot parse"),
    ("train.py", "--config.stages[0].sq_len=5", 'no field \'sq_len\'; Did you mean "seq_len"'),
    ("train.py", "--config.log_every=abc", "--config.log_every=abc: invalid literal"),
    ("eval.py", "--config.nonexistent=3", "--config.nonexistent: the config has no field"),
])
def test_unknown_or_bad_config_fields_are_one_line_with_exit_status_2(program, flag, named):
    config = "configs/demo.py" if program == "train.py" else "configs/eval_demo.py"
    out = subprocess.run([sys.executable, program, "--config", config, flag], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, check=False)
    assert out.returncode == 2, out.stderr
    assert named in _one_line(out.stderr, program)


def test_a_skipped_step_returns_exactly_the_state_it_was_given():
    """nonfinite="skip" inside the jit: a NaN loss leaves every leaf of the state (weights,
    both Adam moments, the step counter) bit-identical; a finite step still trains."""
    config = lx.ModelConfig.from_hf(TINY_MODEL)
    model = lx.Model.init(config, jax.random.key(0))
    ids = np.random.default_rng(0).integers(3, 512, (2, 17)).astype(np.int32)
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:],
             "positions": np.tile(np.arange(16, dtype=np.int32), (2, 1)),
             "segment_ids": np.ones((2, 16), np.int32), "loss_mask": np.ones((2, 16), np.float32)}
    batch = {k: jnp.asarray(v[None]) for k, v in batch.items()}
    schedule = training.learning_rate(1e-2, 10, 0, "constant")
    tx = training.optimizer(ml_collections.ConfigDict(dict(
        b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=1.0)), schedule)
    fns = training.make_step(model.spec, model.spec, tx, schedule, nonfinite="skip")
    state = fns.init_state(model.params, {})
    state, metrics = fns.train(state, {}, batch)  # one finite step: moments are non-zero now
    assert int(metrics["skipped"]) == 0 and int(state["step"]) == 1
    before = jax.device_get(state)
    poisoned = dict(batch, loss_mask=batch["loss_mask"] * jnp.nan)
    after, metrics = fns.train(state, {}, poisoned)
    assert int(metrics["skipped"]) == 1 and not np.isfinite(float(metrics["loss"]))
    for a, b in zip(jax.tree.leaves(jax.device_get(after)), jax.tree.leaves(before)):
        np.testing.assert_array_equal(a, b)
