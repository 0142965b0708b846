"""The command line shared by train.py and eval.py: `--config FILE [--config.FIELD=VALUE ...]`
(ml_collections config files, the Flax-examples convention); config errors are one line on
stderr and exit status 2, not a traceback."""

from __future__ import annotations

import sys
from typing import Any, Callable

from absl import app, flags, logging
from ml_collections import config_flags

from lctx_jax.train_config import ConfigError


def main(run: Callable[[Any], Any], program: str) -> None:
    """Parses the flags and calls run(config)."""
    config = config_flags.DEFINE_config_file("config", None, "a config file, configs/NAME.py",
                                             lock_config=True)
    flags.mark_flags_as_required(["config"])

    def entry(argv: list[str]) -> int:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {argv[1:]}; fields are set with "
                                 "--config.FIELD=VALUE")
        logging.set_verbosity(logging.WARNING)  # Orbax and TFDS log every step at INFO
        try:
            run(config.value)
        except ConfigError as err:
            print(f"{program}: config error: {err}", file=sys.stderr)
            return 2
        return 0

    app.run(entry)
