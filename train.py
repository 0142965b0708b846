"""python train.py --config configs/NAME.py [--config.FIELD=VALUE ...]

Trains the stages of a config (see lctx_jax/train_config.py for every field and configs/ for
the recipes); rerunning the same command after an interruption resumes from the last
checkpoint in config.run_dir. Example, the embedded default (no download):

    python train.py --config configs/demo.py
    python train.py --config configs/demo.py --config.run_dir=/tmp/demo --config.pretrain_steps=50
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from lctx_jax import training
from lctx_jax.train_config import ConfigError

_CONFIG = config_flags.DEFINE_config_file("config", None, "a config file, configs/NAME.py",
                                          lock_config=True)
flags.mark_flags_as_required(["config"])


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; fields are set with "
                             "--config.FIELD=VALUE")
    logging.set_verbosity(logging.WARNING)  # Orbax and TFDS log every step at INFO
    try:
        training.run(_CONFIG.value)
    except ConfigError as err:
        print(f"train.py: config error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    app.run(main)
