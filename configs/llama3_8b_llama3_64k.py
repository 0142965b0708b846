"""Llama-3-8B (8K context) to 64K with Llama 3.1's RoPE scaling (rope_type "llama3").

Meta's scaling with factor 8, low_freq_factor 1, high_freq_factor 4 over the original 8192
tokens (rope_theta 500000 comes from the checkpoint). Meta's long-context training recipe is not
published in detail, so the hyperparameters are YaRN's: 400 steps, lr 2e-5, 20 warmup steps,
global batch 64, no weight decay.

    python train.py --config configs/llama3_8b_llama3_64k.py --config.init_from=/ckpt/Meta-Llama-3-8B
Sizing (measured: `--compile_only=v5p:2x4x4`): v5p-64 (32 chips, fsdp=8 × sequence=4), 8
micro-batches, 16K tokens per chip: train step peak 38.7 GiB of 95 GiB per chip, eval 6.7 GiB.
"""

from lctx_jax.train_config import pod_config, stage


SLICE = "v5p:2x4x4"  # the slice the sizing above was measured on


def get_config():
    c = pod_config("checkpoints/Meta-Llama-3-8B", "runs/llama3_8b_llama3_64k")
    c.mesh.sequence = 4
    c.stages = [stage("llama3_64k", seq_len=65536, batch_size=64, steps=400, lr=2e-5,
                      warmup_steps=20, attention="ring", grad_accum=8,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 8192})]
    return c
