"""Position Interpolation (Chen et al. 2023): Llama-2-7B from 4K to 32K, linear factor 8.

Paper recipe: AdamW (0.9, 0.95), lr 2e-5, 20 warmup steps then constant, no weight decay,
1000 steps, global batch 64, next-token loss on the Pile (here PG19 from TFDS, as most later
work). Reported (PG19, 7B): PI-8K reaches 7.12 after 200 steps; the 32K model scores with the
sliding-window protocol of eval.py.

    python train.py --config configs/llama2_7b_pi_32k.py --config.init_from=/ckpt/Llama-2-7b-hf
Sizing (measured: `--compile_only=v5p:2x2x4`): v5p-32 (16 chips, fsdp=16), 4 micro-batches of one
32K sequence per chip: train step peak 33.3 GiB of 95 GiB per chip, eval step 6.1 GiB.
"""

from lctx_jax.train_config import pod_config, stage


SLICE = "v5p:2x2x4"  # the slice the sizing above was measured on


def get_config():
    c = pod_config("checkpoints/Llama-2-7b-hf", "runs/llama2_7b_pi_32k")
    c.stages = [stage("pi32k", seq_len=32768, batch_size=64, steps=1000, lr=2e-5,
                      warmup_steps=20, attention="flash", grad_accum=4,
                      rope_scaling={"rope_type": "linear", "factor": 8.0})]
    return c
