"""Mistral-7B (8K) to 64K with YaRN, s = 8 (as YaRN's released Yarn-Mistral-7b-64k).

Mistral-7B-v0.1's config.json declares sliding_window 4096, which lctx_jax runs as transformers
does (each layer sees the last 4,096 tokens). YaRN's Mistral models attend fully, so this recipe
sets config.hf_overrides.sliding_window = None (the export's config.json says so too).
Hyperparameters are
YaRN's Llama-2 recipe: 400 steps, lr 2e-5, 20 warmup steps, global batch 64.

    python train.py --config configs/mistral_7b_yarn_64k.py --config.init_from=/ckpt/Mistral-7B-v0.1
Sizing (measured: `--compile_only=v5p:2x4x4`): v5p-64 (32 chips, fsdp=8 × sequence=4), 8
micro-batches, 16K tokens per chip: train step peak 36.3 GiB of 95 GiB per chip, eval 6.3 GiB.
"""

from lctx_jax.train_config import pod_config, stage


SLICE = "v5p:2x4x4"  # the slice the sizing above was measured on


def get_config():
    c = pod_config("checkpoints/Mistral-7B-v0.1", "runs/mistral_7b_yarn_64k")
    c.mesh.sequence = 4
    c.hf_overrides.sliding_window = None  # full attention, as YaRN's Mistral fine-tunes
    c.stages = [stage("yarn64k", seq_len=65536, batch_size=64, steps=400, lr=2e-5,
                      warmup_steps=20, attention="ring", grad_accum=8,
                      rope_scaling={"rope_type": "yarn", "factor": 8.0,
                                    "original_max_position_embeddings": 8192})]
    return c
