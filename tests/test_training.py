"""train.py / lctx_jax.training: loss goes down, stages carry weights, LoRA+ trains only what it
should, gradient accumulation is exact, bad configs fail early, and a run killed with SIGKILL
resumes to the same loss trajectory bit for bit."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lctx_jax as lx
from lctx_jax import architectures, lora as lora_lib, paths, training
from lctx_jax.train_config import ConfigError, default_config, stage, validate

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY_MODEL = dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=32, rope_theta=10000.0, rms_norm_eps=1e-5,
                  bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def workspace(small_corpus) -> dict:
    return small_corpus


def tiny_config(workspace: dict, run_dir: pathlib.Path, **overrides):
    c = default_config()
    c.run_dir = str(run_dir)
    c.tokenizer = workspace["tokenizer"]
    c.data.data_dir = workspace["data_dir"]
    c.model = dict(TINY_MODEL)
    c.mesh.num_devices = 1
    c.progress = False
    c.tensorboard = False
    c.log_every = 2
    c.checkpoint_every = 4
    c.eval_batches = 1
    c.summary_documents = 0  # (tests of the extension summary ask for it)
    c.export_hf = False
    c.stages = [stage("base", seq_len=32, batch_size=4, steps=12, lr=3e-3, warmup_steps=2)]
    for key, value in overrides.items():
        c[key] = value
    return c


def read_metrics(run_dir: pathlib.Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


# ----------------------------------------------------------------------------- validation


def _bad(c, **stage_fields):
    c.stages[0].update(stage_fields)
    return c


@pytest.mark.parametrize("change, field", [
    (lambda c: _bad(c, rope_scaling={"rope_type": "nope", "factor": 2.0}), "rope_scaling"),
    (lambda c: _bad(c, rope_scaling={"rope_type": "linear", "factor": 0.5}), "factor"),
    (lambda c: _bad(c, rope_scaling={"rope_type": "longrope", "factor": 2.0,
                                     "short_factor": [1.0] * 3, "long_factor": [1.0] * 8}),
     "short_factor"),
    (lambda c: _bad(c, attention="s2", seq_len=36), "seq_len"),
    (lambda c: _bad(c, attention="magic"), "attention"),
    (lambda c: _bad(c, grad_accum=3), "batch_size"),
    (lambda c: _bad(c, warmup_steps=50), "warmup_steps"),
    (lambda c: _bad(c, schedule="exp"), "schedule"),
    (lambda c: _bad(c, attention_block_size=0), "attention_block_size"),
    (lambda c: _bad(c, rope_scaling="missing.json"), "rope_scaling"),
    (lambda c: setattr(c, "stages", []), "stages"),
    (lambda c: setattr(c, "dtype", "float8"), "dtype"),
    (lambda c: setattr(c, "init_from", "/nonexistent/ckpt"), "init_from"),
    (lambda c: c.lora.update(rank=4, targets=("q", "wrong")), "lora"),
    (lambda c: setattr(c, "optimzer", {"lr": 1.0}), "unknown fields"),
])
def test_bad_configs_fail_early_naming_the_field(workspace, tmp_path, change, field):
    c = tiny_config(workspace, tmp_path / "run")
    change(c)
    with pytest.raises(ConfigError, match=field):
        validate(c)


def test_missing_tokenizer_fails_before_training(workspace, tmp_path):
    c = tiny_config(workspace, tmp_path / "run", tokenizer=str(tmp_path / "none.model"))
    with pytest.raises(FileNotFoundError, match="none.model"):
        training.run(c)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_train_py_reports_config_errors_without_traceback(workspace, tmp_path):
    out = subprocess.run(
        [sys.executable, "train.py", "--config", "configs/llama2_7b_pi_32k.py",
         "--config.init_from=/nonexistent"],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 2
    assert "config.init_from" in out.stderr and "Traceback" not in out.stderr


# ----------------------------------------------------------------------------- step math


def test_schedules():
    for schedule, end in (("constant", 1.0), ("linear", 0.1), ("cosine", 0.1)):
        lr = training.learning_rate(1.0, 110, 10, schedule, min_ratio=0.1)
        assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(0.5)
        assert float(lr(10)) == pytest.approx(1.0)
        assert float(lr(110)) == pytest.approx(end)


def _toy_step(accum: int, lora: lora_lib.LoraConfig | None):
    config = lx.ModelConfig.from_hf(TINY_MODEL)
    model = lx.Model.init(config, jax.random.key(0))
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 512, (4, 17)).astype(np.int32)
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:],
             "positions": np.tile(np.arange(16, dtype=np.int32), (4, 1)),
             "segment_ids": np.ones((4, 16), np.int32),
             "loss_mask": (rng.random((4, 16)) > 0.2).astype(np.float32)}
    batch = {k: jnp.asarray(v.reshape(accum, 4 // accum, 16)) for k, v in batch.items()}
    schedule = training.learning_rate(1e-2, 10, 0, "constant")
    # SGD for accumulation: Adam's first step is ~lr·sign(g), which magnifies rounding in tiny
    # gradients; the configured AdamW chain for the LoRA test.
    tx = (optax.sgd(schedule) if lora is None
          else training.optimizer(default_config().optimizer, schedule))
    trainable, frozen = lora_lib.split(model.params, lora_lib.trainable_mask(model.params, lora))
    lora_params = {} if lora is None else lora_lib.init(model.params, lora, jax.random.key(1))
    model = lx.Model(config, model.params, lora=lora)
    fns = training.make_step(model, model, tx, schedule)
    state = fns.init_state(trainable, lora_params)
    return fns.train(state, frozen, batch), frozen, model.params


def test_paths_keep_urls_whole_and_write_atomically(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert str(paths.as_path("gs://bucket/runs/x")) == "gs://bucket/runs/x"
    assert str(paths.as_path("runs/x")) == str(tmp_path / "runs" / "x")
    assert str(paths.as_path("~/x")) == os.path.expanduser("~/x")
    paths.write_atomically("runs/x/config.json", "{}")
    paths.write_atomically(tmp_path / "runs" / "x" / "blob", b"\x00\x01")
    assert sorted(p.name for p in (tmp_path / "runs" / "x").iterdir()) == ["blob", "config.json"]


def test_weight_decay_applies_to_kernels_and_embeddings_only():
    config = lx.ModelConfig.from_hf({**TINY_MODEL, "attention_bias": True})
    params = lx.Model.init(config, jax.random.key(0)).params
    adapters = lora_lib.init(params, lora_lib.LoraConfig(rank=2), jax.random.key(1))

    def by_path(tree):
        return {"/".join(str(k.key) for k in path): leaf
                for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}

    decayed = by_path(training.decay_mask(params))
    assert {p for p, d in decayed.items() if d} == {
        "embed/embedding", "lm_head/kernel",
        *(f"layers/{n}/kernel" for n in ("q", "k", "v", "o", "gate", "up", "down"))}
    assert params["layers"]["attn_norm"]["scale"].ndim == 2  # [L, H], yet not decayed
    assert not any(jax.tree.leaves(training.decay_mask(adapters)))
    # AdamW with a zero gradient moves exactly the decayed leaves
    opt = default_config().optimizer
    opt.weight_decay = 0.5
    tx = training.optimizer(opt, 0.1)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    assert {p: bool(jnp.any(u != 0)) for p, u in by_path(updates).items()} == decayed


def test_gradient_accumulation_matches_one_batch():
    (one, m1), _, _ = _toy_step(1, None)
    (two, m2), _, _ = _toy_step(2, None)
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
    np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                 one["trainable"], two["trainable"])


def test_lora_step_keeps_optimizer_state_for_trainable_only():
    lora = lora_lib.LoraConfig(rank=2)
    (state, _), frozen, start = _toy_step(1, lora)
    trainable_leaves = len(jax.tree.leaves((state["trainable"], state["lora"])))
    mu = state["opt_state"][1][0].mu  # chain(clip, adamw): adamw's ScaleByAdamState
    assert len(jax.tree.leaves(mu)) == trainable_leaves
    assert "lm_head" in frozen and "gate" in frozen["layers"]
    assert set(state["trainable"]) == {"embed", "layers", "norm"}


# ----------------------------------------------------------------------------- runs


def test_two_stage_run_learns_and_carries_weights(workspace, tmp_path):
    run_dir = tmp_path / "run"
    c = tiny_config(workspace, run_dir)
    c.stages = [stage("short", seq_len=32, batch_size=4, steps=16, lr=3e-3, warmup_steps=2),
                stage("long", seq_len=64, batch_size=2, steps=4, lr=1e-3,
                      rope_scaling={"rope_type": "linear", "factor": 2.0})]
    c.export_hf = True
    c.tensorboard = True
    results = training.run(c)
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    metrics = read_metrics(run_dir)
    assert sorted(metrics) == list(range(1, 21))
    first = np.mean([metrics[s]["loss"] for s in (1, 2)])
    last = np.mean([metrics[s]["loss"] for s in (15, 16)])
    assert last < first - 0.5, (first, last)
    assert [r.name for r in results] == ["short", "long"]
    short = lx.load(run_dir / "models" / "short")
    long = lx.load(run_dir / "models" / "long")
    assert short.config.rope.rope_type == "default"
    assert long.config.rope.rope_type == "linear" and long.config.rope.factor == 2.0
    hf = json.loads((run_dir / "hf" / "long" / "config.json").read_text())
    assert hf["rope_parameters"]["rope_type"] == "linear"
    # the extension states its length, 32·2, in both exports, and keeps the original 32
    stored = json.loads((run_dir / "models" / "long" / "config.json").read_text())
    for exported in (hf, stored):
        assert exported["max_position_embeddings"] == 64
        assert exported["original_max_position_embeddings"] == 32
    assert (run_dir / "hf" / "long" / "tokenizer.model").exists()
    # A rerun finds every stage done and trains nothing.
    assert training.run(c) == []


def test_lora_run_changes_only_lora_targets_embeddings_and_norms(workspace, tmp_path):
    start = lx.Model.init(lx.ModelConfig.from_hf(TINY_MODEL), jax.random.key(3))
    lx.save(start, tmp_path / "start")
    c = tiny_config(workspace, tmp_path / "run", init_from=str(tmp_path / "start"),
                    dtype="bfloat16", remat="full")  # bf16 compute on f32 master weights
    c.lora.rank = 4
    c.stages = [stage("lora", seq_len=32, batch_size=4, steps=4, lr=1e-2, attention="s2")]
    training.run(c)
    end = lx.load(tmp_path / "run" / "models" / "lora")
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), start.params, end.params)
    assert changed["layers"]["q"]["kernel"] and changed["layers"]["o"]["kernel"]
    assert changed["embed"]["embedding"] and changed["norm"]["scale"]
    assert changed["layers"]["attn_norm"]["scale"]
    assert not changed["layers"]["gate"]["kernel"] and not changed["layers"]["down"]["kernel"]
    assert not changed["lm_head"]["kernel"]


def test_sharded_run_matches_single_device(workspace, tmp_path):
    """train.py on a data × fsdp × sequence mesh of 8 (simulated) devices: per-host rows are
    assembled into global arrays, the state is split by the sharding rules, and the losses equal
    the single-device run's."""
    losses = {}
    for devices in (1, 8):
        c = tiny_config(workspace, tmp_path / f"run{devices}", eval_batches=0)
        if devices == 8:
            c.mesh.update(data=2, fsdp=2, tensor=1, sequence=2, num_devices=8)
        c.stages = [stage("base", seq_len=32, batch_size=4, steps=4, lr=3e-3, grad_accum=2)]
        training.run(c)
        metrics = read_metrics(pathlib.Path(c.run_dir))
        losses[devices] = [metrics[step]["loss"] for step in sorted(metrics)]
    np.testing.assert_allclose(losses[8], losses[1], rtol=2e-5)


CONFIG_FILE = """
import sys
sys.path.insert(0, {tests!r})
from test_training import TINY_MODEL
from lctx_jax.train_config import default_config, stage

def get_config():
    c = default_config()
    c.run_dir = "unset"
    c.tokenizer = {tokenizer!r}
    c.data.data_dir = {data_dir!r}
    c.model = dict(TINY_MODEL)
    c.progress = False
    c.log_every = 1
    c.checkpoint_every = 3
    c.keep_checkpoints = 2
{body}
    return c
"""


def config_file(path: pathlib.Path, workspace: dict, body: str) -> pathlib.Path:
    """A train.py config file at `path`: the tiny model on the test corpus, every step logged,
    checkpoints every 3 steps, plus `body` (indented lines of get_config setting the rest)."""
    path.write_text(CONFIG_FILE.format(tests=str(ROOT / "tests"), body=body,
                                       tokenizer=workspace["tokenizer"],
                                       data_dir=workspace["data_dir"]))
    return path


TWO_STAGES = """
    c.eval_batches = 0
    c.export_hf = False
    c.stages = [stage("a", seq_len=32, batch_size=4, steps=9, lr=3e-3, warmup_steps=2,
                      schedule="cosine"),
                stage("b", seq_len=64, batch_size=2, steps=6, lr=1e-3, grad_accum=2,
                      rope_scaling={"rope_type": "yarn", "factor": 2.0})]"""


def _train_cmd(config_file: pathlib.Path, run_dir: pathlib.Path) -> list[str]:
    return [sys.executable, "train.py", "--config", str(config_file),
            f"--config.run_dir={run_dir}"]


def test_kill_9_and_rerun_reproduces_the_loss_trajectory_bit_for_bit(workspace, tmp_path):
    config = config_file(tmp_path / "tiny.py", workspace, TWO_STAGES)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    straight = tmp_path / "straight"
    subprocess.run(_train_cmd(config, straight), cwd=ROOT, env=env, check=True,
                   capture_output=True)
    expected = read_metrics(straight)
    assert sorted(expected) == list(range(1, 16))

    killed = tmp_path / "killed"
    logs = []
    for checkpoint in (6, 12):  # killed in stage "a", then in stage "b"
        logs.append(tmp_path / f"killed-{checkpoint}.log")
        proc = subprocess.Popen(_train_cmd(config, killed), cwd=ROOT, env=env,
                                stdout=logs[-1].open("w"), stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if (killed / "checkpoints" / str(checkpoint)).is_dir():  # renamed when complete
                break
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert "resumed at step 6/9" in logs[1].read_text()
    # What a save killed half-way leaves behind: an unfinished temporary step directory.
    (killed / "checkpoints" / "12.orbax-checkpoint-tmp-0").mkdir(parents=True, exist_ok=True)
    out = subprocess.run(_train_cmd(config, killed), cwd=ROOT, env=env, check=True,
                         capture_output=True, text=True)
    assert "resumed at step 3/6" in out.stdout
    got = read_metrics(killed)
    assert sorted(got) == sorted(expected)
    for step in expected:
        assert got[step]["loss"] == expected[step]["loss"], step
        assert got[step]["grad_norm"] == expected[step]["grad_norm"], step


# ----------------------------------------------------------------------------- recipes

def _recipe(name: str, tmp_path: pathlib.Path):
    import importlib.util
    if str(ROOT) not in sys.path:  # recipes import each other as `configs.X`, as train.py runs
        sys.path.insert(0, str(ROOT))
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    if "init_from" not in c:  # an eval.py config; its checkpoints, as on a fresh machine: absent
        for s in c.settings:
            s.checkpoint = str(tmp_path / "absent" / s.checkpoint)
        return c
    if c.init_from.startswith("runs/"):  # demo_extend: the demo's pre-trained model
        c.init_from = str(tmp_path / "pretrain")
        (tmp_path / "pretrain").mkdir()
        (tmp_path / "pretrain" / "config.json").write_text(json.dumps(dict(c.model)))
    elif c.init_from:  # stand-ins for the checkpoints: config.json is all validation reads
        hf = architectures.published(c.init_from)
        (tmp_path / "ckpt").mkdir(exist_ok=True)
        (tmp_path / "ckpt" / "config.json").write_text(json.dumps(hf))
        c.init_from = str(tmp_path / "ckpt")
    for key in ("factors_128k", "factors_256k", "longrope_factors"):  # searched, as JSON
        if key in c:
            path = tmp_path / f"{key}.json"
            path.write_text(json.dumps({"rope_type": "longrope", "factor": 32.0,
                                        "original_max_position_embeddings": 4096,
                                        "short_factor": [1.0] * 64,
                                        "long_factor": list(np.linspace(1, 40, 64))}))
            c[key] = str(path)
    return c


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "configs").glob("*.py")))
def test_every_shipped_config_validates(name, tmp_path):
    c = _recipe(name, tmp_path)
    if "stages" in c:
        validate(c)
    else:  # an eval.py config: valid but for the demo checkpoints CI has not trained
        from lctx_jax import comparison
        with pytest.raises(ConfigError, match="checkpoints not found"):
            comparison.validate(c)


def test_a_window_shorter_than_a_stage_is_never_silent(tmp_path):
    """Mistral-7B-v0.1 slides a 4096-token window; the 64K recipe asks for full attention by
    config.hf_overrides. Without it validation stops and names both ways out."""
    c = _recipe("mistral_7b_yarn_64k", tmp_path)
    validate(c)
    del c.hf_overrides["sliding_window"]
    with pytest.raises(ConfigError, match="hf_overrides.sliding_window = None"):
        validate(c)
    c.hf_overrides.sliding_window = 4096  # keeping the window deliberately
    validate(c)
    c.hf_overrides.hidden_size = 2048
    with pytest.raises(ConfigError, match="changes the parameter shapes"):
        validate(c)


def test_the_demo_extension_recipe_lowers_held_out_perplexity_at_the_extended_length(
        workspace, tmp_path):
    """configs/demo.py's extension stage (its learning rate, warmup and schedule), on a tiny
    model pre-trained at 32 tokens and extended 4× with YaRN: the stage's summary must show
    the fine-tuned model below the same YaRN without fine-tuning on the same held-out
    documents at the fine-tune's length, and both below plain RoPE there."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from configs import demo
    run_dir = tmp_path / "run"
    c = tiny_config(workspace, run_dir, eval_batches=0, summary_documents=4)
    c.extend_steps = 24
    c.stages = [stage("base", seq_len=32, batch_size=8, steps=60, lr=10 * demo.EXTEND_LR,
                      warmup_steps=6, schedule="cosine"),
                demo.extend_stage(c, {"rope_type": "yarn", "factor": 4.0,
                                      "original_max_position_embeddings": 32},
                                  seq_len=128, min_doc_tokens=64, retrieval=None)]
    training.run(c)
    summary = json.loads((run_dir / "summary" / "extend.json").read_text())
    ppl = summary["perplexity"]
    assert summary["documents"] == 4 and sorted(map(int, ppl["fine-tuned"])) == [32, 128]
    assert summary["corpus"].startswith("stdlib-")
    tuned, untuned = ppl["fine-tuned"]["128"], ppl["base + method, no fine-tune"]["128"]
    assert tuned < untuned < ppl["base, RoPE as pre-trained"]["128"], ppl
