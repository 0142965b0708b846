"""python train.py --config configs/NAME.py [--config.FIELD=VALUE ...]

Trains the stages of a config (see lctx_jax/train_config.py for every field and configs/ for
the recipes); rerunning the same command after an interruption resumes from the last
checkpoint in config.run_dir. Example, the embedded default (no download):

    python train.py --config configs/demo.py
    python train.py --config configs/demo.py --config.run_dir=/tmp/demo --config.pretrain_steps=50
"""

from lctx_jax import cli, training

if __name__ == "__main__":
    cli.main(training.run, "train.py")
