"""The command line shared by train.py and eval.py: `--config FILE [--config.FIELD=VALUE ...]`
(ml_collections config files, the Flax-examples convention). Config errors, a bad or unknown
--config.FIELD=VALUE on the command line included, are one line on stderr and exit status 2,
not a traceback; so is a run that diverged (`lctx_jax.train_config.TrainingDiverged`), with exit
status 1."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import re
import os
import sys
from typing import Any, Callable, NoReturn

import jax
from absl import app, flags, logging
from ml_collections import config_flags
from ml_collections.config_flags import config_path

from lctx_jax.train_config import ConfigError, TrainingDiverged

_FLAG = "config"  # --config FILE, and its fields --config.FIELD=VALUE


def main(run: Callable[[Any], Any], program: str,
         compile_only: Callable[[Any, str], list] | None = None) -> None:
    """Parses the flags and calls run(config). With `compile_only`, the flag
    --compile_only=TOPOLOGY calls compile_only(config, TOPOLOGY) instead, whose reports say
    whether each stage fits: exit status 0 only if all do."""
    config = config_flags.DEFINE_config_file(_FLAG, None, "a config file, configs/NAME.py",
                                             lock_config=True)
    flags.mark_flags_as_required([_FLAG])
    topology = None
    if compile_only is not None:
        topology = flags.DEFINE_string(
            "compile_only", None, "compile the job's steps (train.py: every stage; eval.py: "
            "one window of each length) for a TPU topology (e.g. v5p:2x2x2 or v5p-16) without "
            "running them, and report whether they fit in HBM per chip")

    def entry(argv: list[str]) -> int:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {argv[1:]}; fields are set with "
                                 "--config.FIELD=VALUE")
        logging.set_verbosity(logging.WARNING)  # Orbax and TFDS log every step at INFO
        path = config_flags.get_config_filename(flags.FLAGS[_FLAG]).split(":")[0]
        if not os.path.isfile(path):
            _fail(program, "config error", f"--config {path}: no such file (give a config "
                  "file, e.g. configs/demo.py)", 2)
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
    """absl's flag parsing, its errors one line on stderr with exit status 2: a --config.FIELD
    the config lacks or a malformed path (--config.nonexistent=3, --config.stages[0].sq_len=5,
    --config.stages.0.x=1), a ConfigError raised by the config file itself, and absl's own
    errors (a value that does not parse, --config.log_every=abc; an unknown flag). What parsing
    failed on is found by loading the config file alone and resolving each override in it; any
    other error (a bug in the config file, say) keeps its traceback."""
    try:
        return flags.FLAGS(argv)
    except Exception as err:  # noqa: BLE001 - diagnosed below, out of this block (no chaining)
        error = err
    problem = _config_problem(argv)  # raises what a bug in the config file raises
    if problem is not None:
        _fail(program, "config error", problem, 2)
    if isinstance(error, flags.Error):
        _fail(program, "config error" if "--config" in str(error) else "error", error, 2)
    raise error


def _config_problem(argv: list[str]) -> str | None:
    """Why `argv`'s config does not load or take its overrides, as one message naming the field:
    the config file's own ConfigError, else the first --config.FIELD that does not resolve in
    the config the file returns. None without a --config, or when all is well."""
    argument = _config_argument(argv)
    if argument is None:
        return None
    try:
        config = _load_config_file(argument)
    except ConfigError as err:  # e.g. a stage(...) with a bad argument in the config file
        return str(err)
    for path in _override_paths(argv):
        problem = _path_problem(path, config)
        if problem is not None:
            return f"--{_FLAG}.{path}: {problem}"
    return None


def _config_argument(argv: list[str]) -> str | None:
    """The value of --config in `argv` (`path` or `path:arg`), parsed by absl alone; None when
    there is none or it does not parse."""
    values = flags.FlagValues()
    flags.DEFINE_string(_FLAG, None, "the config file", flag_values=values)
    try:
        values(argv, known_only=True)
    except flags.Error:
        return None
    return values[_FLAG].value


def _load_config_file(argument: str) -> Any:
    """`get_config(arg)` of the Python file at `path`, for --config=path[:arg], loaded as
    ml_collections' config_flags loads it (its ConfigFileFlagParser would turn a ConfigError
    into one holding a traceback, and a missing file into a config that fails later); what the
    file raises propagates."""
    path, *arg = argument.split(":", 1)
    name = f"{_FLAG}_config"  # the module name config_flags gives it
    loader = importlib.machinery.SourceFileLoader(name, path)
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader))
    sys.modules[name] = module
    loader.exec_module(module)
    return module.get_config(*arg)


def _override_paths(argv: list[str]) -> list[str]:
    """The FIELD of each --config.FIELD[=VALUE] in `argv` (flag files expanded), in order: the
    overrides ml_collections applies."""
    args = flags.FLAGS.read_flags_from_files(argv[1:], force_gnu=False)
    matches = (re.match(rf"-{{1,2}}(?:no)?{_FLAG}\.([^=]*)", arg) for arg in args)
    return list(dict.fromkeys(match.group(1) for match in matches if match))


def _path_problem(path: str, config: Any) -> str | None:
    """What is wrong with the field path `path` in `config`, in ml_collections' words (its
    config_path resolves overrides); None when it names a field."""
    try:
        config_path.split(path)
    except (SyntaxError, TypeError, ValueError):
        return ("cannot parse the field path; a list's items are written FIELD[i], "
                "e.g. --config.stages[0].seq_len=64")
    try:
        config_path.get_type(path, config)
    except (AttributeError, KeyError) as err:
        return f"the config has no field {_message(err)}"
    except IndexError as err:
        return f"{_message(err)} (list items are numbered from 0)"
    except (TypeError, ValueError) as err:
        return _message(err)
    return None


def _message(err: BaseException) -> str:
    """The message of `err`, unwrapped (ConfigDict raises AttributeError(KeyError(message)))
    and on one line."""
    while err.args and isinstance(err.args[0], BaseException):
        err = err.args[0]
    text = str(err.args[0]) if err.args else type(err).__name__
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def _fail(program: str, kind: str, err: Any, status: int) -> NoReturn:
    """`program: kind: message` as one line on stderr, and exit with `status`."""
    message = " ".join(line.strip() for line in str(err).splitlines())
    print(f"{program}: {kind}: {message}", file=sys.stderr)
    sys.exit(status)
