"""MEGALODON-7B (Ma et al. 2024) pre-trained from scratch at 32K context with chunk parallelism:
each 32K row is split over the mesh axis "sequence" in whole 2048-token chunks, and only the
CEMA states and TimestepNorm statistics cross devices (lctx_jax.models.megalodon).

Model: the released code's mega7.3B preset (32 layers, model_dim 4096, 4 heads, z_dim 1024,
value_dim 8192, SwiGLU FFN 8192, chunk 2048, 64 norm groups, cema_ndim 16; the paper reports
chunk 4096 and RoPE base 100,000, the released preset 2048 and 10,000), the Llama-2 tokenizer
(32K vocabulary). Paper recipe: AdamW (0.9, 0.95), lr 3.5e-4 cosine, 2500 warmup steps,
weight decay 0.1, clip 1.0, 32K context, 2T tokens (global batch 4M tokens = 128 × 32K); PG19
here (the paper's data are not public). One difference: lctx_jax decays kernels and embeddings
only, where the released optimizer decays every parameter (CEMA, norms, biases too).

    python train.py --config configs/megalodon_7b_32k.py --config.tokenizer=/ckpt/tokenizer.model
Sizing (measured: `--compile_only=v5p:2x2x4`): see the README's pod table.
"""

from lctx_jax.train_config import pod_config, stage

SLICE = "v5p:2x2x4"  # the slice the sizing was measured on

MODEL = dict(model_type="megalodon", vocab_size=32000, model_dim=4096, num_layers=32,
             num_heads=4, z_dim=1024, value_dim=8192, ffn_hidden_dim=8192, cema_ndim=16,
             chunk_size=2048, norm_num_groups=64, norm_eps=1e-5, rope_theta=10000.0,
             swiglu=True, share_emb=False, bos_token_id=1, eos_token_id=2)


def get_config():
    c = pod_config("", "runs/megalodon_7b_32k")
    c.tokenizer = "checkpoints/Llama-2-7b-hf/tokenizer.model"
    c.model = dict(MODEL)
    c.mesh.sequence = 4
    c.optimizer.weight_decay = 0.1
    c.optimizer.min_lr_ratio = 0.1
    c.stages = [stage("pretrain32k", seq_len=32768, batch_size=128, steps=500_000, lr=3.5e-4,
                      warmup_steps=2500, schedule="cosine", grad_accum=8)]
    return c
