"""Infini-attention (Munkhdalai et al. 2024) on Llama-2-7B: continual pre-training with 2K
segments on 32K inputs (16 unrolls of the memory), as the paper continues its LLMs.

Paper recipe for LLMs: segment 2048, lr 1e-4 (Adafactor there; AdamW (0.9, 0.95) here, no
weight decay), the gates at their own lr (1e-2, no weight decay: config.optimizer.gate_lr),
then 400 steps of passkey inputs. Here: global batch 64 × 32K of PG19, 4 micro-batches.

    python train.py --config configs/llama2_7b_infini_32k.py --config.init_from=/ckpt/Llama-2-7b-hf
Sizing (measured: `--compile_only=v5p:2x2x4`): v5p-32 (16 chips, fsdp=16), 4 micro-batches of one
32K sequence per chip: train step peak 33.05 GiB of 95 GiB per chip, eval step 6.08 GiB.
"""

from lctx_jax.train_config import pod_config, stage


SLICE = "v5p:2x2x4"  # the slice the sizing was measured on


def get_config():
    c = pod_config("checkpoints/Llama-2-7b-hf", "runs/llama2_7b_infini_32k")
    c.stages = [stage("infini32k", seq_len=32768, batch_size=64, steps=1000, lr=1e-4,
                      warmup_steps=100, schedule="cosine", attention="infini", grad_accum=4,
                      infini={"segment_len": 2048, "update": "linear"})]
    return c
