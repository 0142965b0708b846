"""The README's Python examples and its Quickstart command run as written."""

import pathlib
import re
import subprocess
import sys

README = (pathlib.Path(__file__).parent.parent / "README.md").read_text()


def test_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


def test_quickstart_main_job_runs(tmp_path):
    """The Quickstart's train.py command, as written, shortened by overrides to a few steps."""
    commands = re.findall(r"^python (train\.py --config \S+)$", README, re.M)
    assert commands
    short = [f"--config.run_dir={tmp_path / 'run'}", f"--config.data.data_dir={tmp_path / 'tfds'}",
             f"--config.tokenizer={tmp_path / 'tok.model'}", "--config.pretrain_steps=4",
             "--config.extend_steps=2", "--config.eval_batches=1", "--config.progress=False"]
    root = pathlib.Path(__file__).parent.parent
    for command in commands:
        out = subprocess.run([sys.executable, *command.split(), *short], cwd=root, check=True,
                             capture_output=True, text=True, timeout=600)
        assert "done: weights at" in out.stdout
        assert (tmp_path / "run" / "hf" / "extend" / "model.safetensors").exists()


def test_ci_runs_the_quickstart_test_command():
    """.ci/run must do exactly what the README's test command does."""
    ci = (pathlib.Path(__file__).parent.parent / ".ci" / "run").read_text().splitlines()[-1]
    assert ci in README.splitlines()
