"""The train.py / eval.py command line (lctx_jax/cli.py): a bad --config.FIELD=VALUE, and a
ConfigError raised by the config file itself, are one line on stderr naming the field, exit
status 2; a bug in the config file keeps its traceback. Most cases call cli.main in-process (absl's
app.run replaced by the few lines of it that matter here); two run train.py for real."""

import os
import pathlib
import subprocess
import sys

import pytest
from absl import flags
from absl import logging as absl_logging

from lctx_jax import cli

ROOT = pathlib.Path(__file__).resolve().parent.parent
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}

CONFIG_FILE = """
from lctx_jax.train_config import ConfigError, default_config, stage

def get_config():
    c = default_config()
    c.stages = [stage("a", seq_len=32, batch_size=4, steps=1, lr=1e-3)]
{body}
    return c
"""


def write_config(path: pathlib.Path, body: str = "") -> str:
    """A config file at `path`: the default config with one stage, plus `body` (indented lines
    of get_config)."""
    path.write_text(CONFIG_FILE.format(body=body))
    return str(path)


@pytest.fixture
def cli_main(monkeypatch, capsys):
    """Calls cli.main(run, "train.py") with `args` as the command line; returns (exit status,
    stderr, the configs run was called with). The flags it defines are removed afterwards."""
    was_parsed, verbosity = flags.FLAGS.is_parsed(), absl_logging.get_verbosity()
    monkeypatch.setattr(cli.app, "run", lambda main, flags_parser: sys.exit(
        main(flags_parser(sys.argv))))
    runs = []

    def call(*args: str):
        monkeypatch.setattr(sys, "argv", ["train.py", *args])
        try:
            with pytest.raises(SystemExit) as exit_:
                cli.main(runs.append, "train.py")
        finally:
            for name in [n for n in flags.FLAGS if n == "config" or n.startswith("config.")]:
                delattr(flags.FLAGS, name)
        return exit_.value.code, capsys.readouterr().err, runs

    yield call
    sys.modules.pop("config_config", None)
    if not was_parsed:
        flags.FLAGS.unparse_flags()
    absl_logging.set_verbosity(verbosity)


def one_line(stderr: str) -> str:
    """The one line `stderr` holds, checked to be a config error and no traceback."""
    assert "Traceback" not in stderr and stderr.count("\n") == 1, stderr
    assert stderr.startswith("train.py: config error: "), stderr
    return stderr


@pytest.mark.parametrize("overrides, named", [
    (["--config.nonexistent=3"], "--config.nonexistent: the config has no field 'nonexistent'"),
    (["--config.stages[0].sq_len=5"],
     "--config.stages[0].sq_len: the config has no field 'sq_len'; Did you mean \"seq_len\""),
    (["--config.stages[9].lr=1"], "--config.stages[9].lr: list index out of range"),
    (["--config.stages.0.seq_len=5"], "--config.stages.0.seq_len: cannot parse the field path"),
    (["--config.log_every=abc"], "--config.log_every=abc: invalid literal for int()"),
    (["--config.log_every=5", "--config.optimizer.b3=1", "--config.nonexistent=3"],
     "--config.optimizer.b3: the config has no field 'b3'"),  # the first bad one
])
def test_bad_overrides_are_one_line_naming_the_field(cli_main, tmp_path, overrides, named):
    status, stderr, runs = cli_main("--config", write_config(tmp_path / "c.py"), *overrides)
    assert status == 2 and not runs
    assert named in one_line(stderr)


def test_a_missing_config_file_is_one_line(cli_main, tmp_path):
    status, stderr, runs = cli_main("--config", str(tmp_path / "nothere.py"))
    assert status == 2 and not runs
    assert "nothere.py: no such file" in one_line(stderr)


def test_good_overrides_reach_run(cli_main, tmp_path):
    status, stderr, runs = cli_main("--config", write_config(tmp_path / "c.py"),
                                    "--config.log_every=5", "--config.stages[0].seq_len=64")
    assert status == 0 and stderr == ""
    assert runs[0].log_every == 5 and runs[0].stages[0].seq_len == 64


@pytest.mark.parametrize("overrides", [[], ["--config.log_every=5"], ["--config.nonexistent=3"]])
def test_a_config_error_in_the_config_file_is_one_line(cli_main, tmp_path, overrides):
    config = write_config(tmp_path / "c.py", "    raise ConfigError(\"config.stages[0].schedule="
                                             "'bogus': use one of constant, linear, cosine\")")
    status, stderr, runs = cli_main("--config", config, *overrides)
    assert status == 2 and not runs
    assert one_line(stderr) == ("train.py: config error: config.stages[0].schedule='bogus': "
                                "use one of constant, linear, cosine\n")


@pytest.mark.parametrize("body, error", [("    c.log_every = undefined_name", NameError),
                                         ("    c.stages = [stage('b', seq_len=1)]", TypeError)])
@pytest.mark.parametrize("overrides", [[], ["--config.log_every=5"]])
def test_a_bug_in_the_config_file_propagates(cli_main, tmp_path, body, error, overrides):
    with pytest.raises(error):
        cli_main("--config", write_config(tmp_path / "c.py", body), *overrides)


def test_train_py_one_line_and_traceback(tmp_path):
    """The real command: a ConfigError from the config file is one line with exit status 2; a
    NameError in it is a traceback ending in the NameError."""
    bad_value = write_config(tmp_path / "bad.py", "    raise ConfigError('config.seed: no')")
    out = subprocess.run([sys.executable, "train.py", "--config", bad_value, "--config.seed=1"],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, check=False)
    assert out.returncode == 2
    assert one_line(out.stderr) == "train.py: config error: config.seed: no\n"

    bug = write_config(tmp_path / "bug.py", "    c.seed = undefined_name")
    out = subprocess.run([sys.executable, "train.py", "--config", bug, "--config.seed=1"],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, check=False)
    assert out.returncode == 1
    assert out.stderr.startswith("Traceback (most recent call last):"), out.stderr
    assert out.stderr.rstrip().endswith("NameError: name 'undefined_name' is not defined")
    assert "During handling" not in out.stderr
