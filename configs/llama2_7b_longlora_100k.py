"""LongLoRA (Chen et al. 2023): Llama-2-7B to 100K with S²-Attn and LoRA+.

Paper recipe: linear PI with factor ceil(100000 / 4096) = 25; shifted sparse attention in
training (4 groups, half the heads shifted by half a group) and full attention at evaluation;
LoRA rank 8, alpha 16 on q, k, v, o plus trainable embeddings and norms, everything else frozen
(lm_head too); AdamW lr 2e-5, 20 warmup steps then constant, no weight decay, global batch 64,
1000 steps, bf16, gradient checkpointing, on RedPajama (here PG19).
Reported (7B → 32K, PG19): LoRA+ (embed & norm) 8.12 vs full fine-tune 8.08.

    python train.py --config configs/llama2_7b_longlora_100k.py --config.init_from=/ckpt/Llama-2-7b-hf
Sizing (measured: `train.py --config configs/llama2_7b_longlora_100k.py --compile_only=v5p:2x2x2`):
v5p-16 (8 chips, fsdp=8), 8 micro-batches of one 100K sequence per chip: train step peak
60.7 GiB of 95 GiB per chip, eval step 16.1 GiB.
"""

from lctx_jax.train_config import pod_config, stage


SLICE = "v5p:2x2x2"  # the slice the sizing above was measured on


def get_config():
    c = pod_config("checkpoints/Llama-2-7b-hf", "runs/llama2_7b_longlora_100k")
    c.lora.rank = 8
    c.lora.alpha = 16.0
    c.lora.targets = ("q", "k", "v", "o")
    c.lora.trainable = ("embed", "norm")
    c.stages = [stage("longlora100k", seq_len=100000, batch_size=64, steps=1000, lr=2e-5,
                      warmup_steps=20, attention="s2", grad_accum=8,
                      rope_scaling={"rope_type": "linear", "factor": 25.0})]
    return c
