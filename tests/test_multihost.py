"""train.py on two processes, as on a two-host TPU slice: `jax.distributed` with a local
coordinator, 4 CPU devices per process, gloo collectives between them. Each run is trained,
killed with SIGKILL on both hosts after a checkpoint, rerun (it resumes) and exported; its
losses and its export must equal a one-process run's on the same 8-device mesh.

Meshes: "sequence" over all 8 devices (ring attention passes keys across the hosts, and each
host's devices take their tokens of every row), and "fsdp" over all 8 (every parameter and
optimizer state is split across the hosts: Orbax saves and restores both halves into one
checkpoint, the HF export gathers them): the hosts hold the same rows (`training.host_part`),
so the global batch is the one-process run's. And data=2 × sequence=4: each host holds its own
rows and reads its own data shard, whose position every checkpoint keeps for both hosts.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import lctx_jax as lx
import test_training

ROOT = pathlib.Path(__file__).resolve().parents[1]
BODY = """
    c.model = dict(TINY_MODEL, max_position_embeddings=64)
    c.tensorboard = False
    c.eval_batches = 1
    c.mesh.update(data={data}, fsdp={fsdp}, tensor=1, sequence={sequence})
    c.stages = [stage("a", seq_len=64, batch_size=4, steps=8, lr=3e-3, warmup_steps=2,
                      attention={attention!r}, grad_accum=2)]"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(config_file, run_dir, distributed):
    return [sys.executable, "train.py", "--config", str(config_file),
            f"--config.run_dir={run_dir}", f"--config.distributed={distributed}"]


def launch(config_file, run_dir, logs, port):
    """Both processes of a two-host run, each with 4 CPU devices."""
    procs = []
    for process in range(2):
        env = {**os.environ, "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
               "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
               "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
               "JAX_PROCESS_ID": str(process)}
        log = open(logs / f"process{process}.log", "a")
        procs.append(subprocess.Popen(command(config_file, run_dir, True), cwd=ROOT, env=env,
                                      stdout=log, stderr=subprocess.STDOUT))
    return procs


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in rows if "loss" in r}


def run_two(config_file, run_dir, logs):
    """A two-process run to the end; returns process 0's log."""
    procs = launch(config_file, run_dir, logs, free_port())
    codes = [p.wait(timeout=300) for p in procs]
    log = (logs / "process0.log").read_text()
    assert codes == [0, 0], log[-3000:]
    return log


@pytest.mark.parametrize("data, fsdp, sequence, attention, reference", [
    (1, 1, 8, "ring", "one process"), (1, 8, 1, "xla", "one process"),
    (2, 1, 4, "ring", "two processes")])
def test_two_processes_train_resume_and_export(small_corpus, tmp_path, data, fsdp, sequence,
                                               attention, reference):
    """Meshes whose hosts hold the same rows give the one-process run's batches, so its losses
    and export; with data=2 each host holds its own rows (and reads its own data shard), and
    the killed run must equal an uninterrupted two-process run."""
    config_file = test_training.config_file(tmp_path / "mh.py", small_corpus, BODY.format(
        data=data, fsdp=fsdp, sequence=sequence, attention=attention))
    expected_dir = tmp_path / "reference"
    if reference == "one process":
        env = {**os.environ, "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
        subprocess.run(command(config_file, expected_dir, False), cwd=ROOT, env=env,
                       check=True, capture_output=True)
    else:
        (tmp_path / "reference-logs").mkdir()
        run_two(config_file, expected_dir, tmp_path / "reference-logs")

    two, logs = tmp_path / "two", tmp_path / "logs"
    logs.mkdir()
    procs = launch(config_file, two, logs, free_port())
    deadline = time.time() + 300
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if (two / "checkpoints" / "6").is_dir():
            break
        time.sleep(0.05)
    for p in procs:
        os.kill(p.pid, signal.SIGKILL)
    assert [p.wait() for p in procs] == [-signal.SIGKILL] * 2, (logs / "process0.log").read_text()
    log = run_two(config_file, two, logs)
    assert "jax.distributed: 2 processes, 8 devices (4 per process)" in log
    assert "resumed at step 6/8" in log
    shards = json.loads((two / "checkpoints" / "8" / "meta" / "metadata").read_text())["data"]
    assert sorted(shards) == (["0", "1"] if data == 2 else ["0"])  # every host's position

    expected, got = losses(expected_dir), losses(two)
    assert sorted(got) == sorted(expected) == list(range(1, 9))
    for step in expected:
        np.testing.assert_allclose(got[step], expected[step], rtol=2e-5, err_msg=str(step))
    ids = np.random.default_rng(0).integers(3, 512, (2, 48))
    np.testing.assert_allclose(lx.from_hf(two / "hf" / "a")(ids),
                               lx.from_hf(expected_dir / "hf" / "a")(ids), atol=1e-5)
    assert (two / "hf" / "a" / "tokenizer.model").is_file()
