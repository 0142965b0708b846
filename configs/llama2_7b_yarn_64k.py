"""YaRN (Peng et al. 2023): Llama-2-7B from 4K to 64K, s = 16.

Paper recipe: 400 steps at 64K, lr 2e-5, no weight decay, 20 warmup steps, global batch 64,
AdamW (0.9, 0.95), on PG19 chunked into 64K segments; YaRN's attention temperature
0.1·ln(s) + 1 comes with the rope type. (Their s = 32 model continues 200 more steps at 128K.)
Reported (Proof-pile, s = 16): 7B perplexity ≈ 2.5 at 64K.

    python train.py --config configs/llama2_7b_yarn_64k.py --config.init_from=/ckpt/Llama-2-7b-hf
At 64K the sequence is split over a "sequence" mesh axis of 4 with ring attention.
Sizing (measured: `--compile_only=v5p:2x4x4`): v5p-64 (32 chips, fsdp=8 × sequence=4), 8
micro-batches, 16K tokens per chip: train step peak 37.8 GiB of 95 GiB per chip, eval 6.5 GiB.
"""

from lctx_jax.train_config import pod_config, stage


SLICE = "v5p:2x4x4"  # the slice the sizing above was measured on


def get_config():
    c = pod_config("checkpoints/Llama-2-7b-hf", "runs/llama2_7b_yarn_64k")
    c.mesh.sequence = 4
    c.stages = [stage("yarn64k", seq_len=65536, batch_size=64, steps=400, lr=2e-5,
                      warmup_steps=20, attention="ring", grad_accum=8,
                      rope_scaling={"rope_type": "yarn", "factor": 16.0,
                                    "original_max_position_embeddings": 4096})]
    return c
