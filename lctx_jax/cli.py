"""The command line shared by train.py and eval.py: `--config FILE [--config.FIELD=VALUE ...]`
(ml_collections config files, the Flax-examples convention); config errors are one line on
stderr and exit status 2, not a traceback."""

from __future__ import annotations

import sys
from typing import Any, Callable

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from lctx_jax.train_config import ConfigError


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
            print(f"{program}: config error: {err}", file=sys.stderr)
            return 2
        return 0

    app.run(entry)
