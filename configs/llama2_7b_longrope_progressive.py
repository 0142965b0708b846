"""LongRoPE (Ding et al. 2024) progressive extension: Llama-2-7B to 128K, then 256K.

Paper recipe: search non-uniform RoPE factors for 128K and for 256K first (eval.py's LongRoPE
search writes them as HF rope_scaling JSON files); fine-tune 400 steps at 128K, then 600 steps
at 256K starting from the 128K weights; lr 2e-5 with linear decay, global batch 32. (A second
search without fine-tuning then reaches 2048K; a re-search at 4K/8K restores short context.)
Reported without fine-tuning (PG19, 5 samples), 8K / 16K: PI 10.65 / 20.49, LongRoPE 9.37 / 11.34.

    python train.py --config configs/llama2_7b_longrope_progressive.py \\
        --config.init_from=/ckpt/Llama-2-7b-hf \\
        --config.factors_128k=search/longrope_128k.json --config.factors_256k=search/longrope_256k.json
Both stages split the sequence over a "sequence" mesh axis of 8 with ring attention.
Sizing (measured: `--compile_only=v5p:4x4x4`): v5p-128 (64 chips, fsdp=8 × sequence=8), 4
micro-batches: train step peak 38.1 GiB (128K) and 53.3 GiB (256K) of 95 GiB per chip.
"""

from lctx_jax.train_config import pod_config, stage


SLICE = "v5p:4x4x4"  # the slice the sizing above was measured on


def get_config():
    c = pod_config("checkpoints/Llama-2-7b-hf", "runs/llama2_7b_longrope_progressive")
    c.mesh.sequence = 8
    c.optimizer.min_lr_ratio = 0.0
    c.factors_128k = "search/longrope_128k.json"
    c.factors_256k = "search/longrope_256k.json"
    c.stages = [
        stage("longrope128k", seq_len=131072, batch_size=32, steps=400, lr=2e-5,
              schedule="linear", attention="ring", grad_accum=4,
              rope_scaling=c.get_ref("factors_128k")),
        stage("longrope256k", seq_len=262144, batch_size=32, steps=600, lr=2e-5,
              schedule="linear", attention="ring", grad_accum=4,
              rope_scaling=c.get_ref("factors_256k")),
    ]
    return c
