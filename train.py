"""python train.py --config configs/NAME.py [--config.FIELD=VALUE ...]

Trains the stages of a config (see lctx_jax/train_config.py for every field and configs/ for
the recipes); rerunning the same command after an interruption resumes from the last
checkpoint in config.run_dir. Example, the embedded default (no download):

    python train.py --config configs/demo.py
    python train.py --config configs/demo.py --config.run_dir=/tmp/demo --config.pretrain_steps=50

Sizing a recipe for a TPU slice before paying for one (needs `pip install -e '.[tpu]'`; no
weights, data or TPU are needed; lctx_jax/aot.py):

    python train.py --config configs/llama2_7b_pi_32k.py --compile_only=v5p:2x2x4
"""

from lctx_jax import aot, cli, training

if __name__ == "__main__":
    cli.main(training.run, "train.py", aot.compile_only)
