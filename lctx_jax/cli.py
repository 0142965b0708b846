"""The command line shared by train.py and eval.py: `--config FILE [--config.FIELD=VALUE ...]`
(ml_collections config files, the Flax-examples convention). Config errors, a bad or unknown
--config.FIELD=VALUE on the command line included, are one line on stderr and exit status 2,
not a traceback; so is a run that diverged (`lctx_jax.training.TrainingDiverged`), with exit
status 1."""

from __future__ import annotations

import os
import re
import sys
import traceback
from typing import Any, Callable, NoReturn

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from lctx_jax.train_config import ConfigError
from lctx_jax.training import TrainingDiverged


def main(run: Callable[[Any], Any], program: str,
         compile_only: Callable[[Any, str], list] | None = None) -> None:
    """Parses the flags and calls run(config). With `compile_only`, the flag
    --compile_only=TOPOLOGY calls compile_only(config, TOPOLOGY) instead, whose reports say
    whether each stage fits: exit status 0 only if all do."""
    config = config_flags.DEFINE_config_file("config", None, "a config file, configs/NAME.py",
                                             lock_config=True)
    flags.mark_flags_as_required(["config"])
    topology = None
    if compile_only is not None:
        topology = flags.DEFINE_string(
            "compile_only", None, "compile every stage for a TPU topology (e.g. v5p:2x2x2 or "
            "v5p-16) without running it, and report whether it fits in HBM per chip")

    def entry(argv: list[str]) -> int:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {argv[1:]}; fields are set with "
                                 "--config.FIELD=VALUE")
        logging.set_verbosity(logging.WARNING)  # Orbax and TFDS log every step at INFO
        try:
            if topology is not None and topology.value:
                jax.config.update("jax_platforms", "cpu")  # no local accelerator is needed
                reports = compile_only(config.value, topology.value)
                return 0 if all(report.fits for report in reports) else 1
            run(config.value)
        except ConfigError as err:
            _fail(program, "config error", err, 2)
        except TrainingDiverged as err:
            _fail(program, "training diverged", err, 1)
        return 0

    app.run(entry, flags_parser=lambda argv: _parse_flags(argv, program))


def _parse_flags(argv: list[str], program: str) -> list[str]:
    """absl's flag parsing with its errors as one line and exit status 2: a value that does not
    parse (--config.log_every=abc), and a --config.FIELD the config lacks (--config.nonexistent=3,
    --config.stages[0].sq_len=5: ml_collections raises these while applying the overrides)."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        _fail(program, "config error" if "--config" in str(err) else "error", err, 2)
    except (AttributeError, KeyError, IndexError, ValueError, TypeError) as err:
        message = _override_error(err, argv)
        if message is None:  # not from the overrides (e.g. a bug in the config file): traceback
            raise
        _fail(program, "config error", message, 2)


def _override_error(err: BaseException, argv: list[str]) -> str | None:
    """What went wrong applying the --config.FIELD=VALUE overrides, naming the field; None when
    `err` was not raised resolving them (in ml_collections' config_path)."""
    if not any(frame.filename.endswith(os.path.join("config_flags", "config_path.py"))
               for frame in traceback.extract_tb(err.__traceback__)):
        return None
    cause: BaseException = err  # ml_collections raises AttributeError(KeyError(message))
    while cause.args and isinstance(cause.args[0], BaseException):
        cause = cause.args[0]
    text = str(cause.args[0]) if cause.args else type(cause).__name__
    text = "; ".join(line.strip() for line in text.splitlines() if line.strip())
    overrides = [arg.split("=", 1)[0] for arg in argv[1:] if arg.startswith("--config.")]
    quoted = re.search(r"'([^']*)'", text)
    named = [arg for arg in overrides if quoted and (
        quoted.group(1) == arg[len("--config."):]
        or quoted.group(1) in re.split(r"[.\[\]]", arg[len("--config."):]))]
    if isinstance(cause, IndexError):
        named = [arg for arg in overrides if "[" in arg]
    fields = ", ".join(named or overrides)
    if isinstance(cause, (KeyError, AttributeError)):
        return f"{fields}: the config has no field {text}"
    if isinstance(cause, IndexError):
        return f"{fields}: {text} (list items are numbered from 0)"
    if text.startswith("Could not parse"):
        return (f"{fields}: cannot parse the field path; a list's items are written FIELD[i], "
                "e.g. --config.stages[0].seq_len=64")
    return f"{fields}: {text}"


def _fail(program: str, kind: str, err: Any, status: int) -> NoReturn:
    """`program: kind: message` as one line on stderr, and exit with `status`."""
    message = " ".join(line.strip() for line in str(err).splitlines())
    print(f"{program}: {kind}: {message}", file=sys.stderr)
    sys.exit(status)
