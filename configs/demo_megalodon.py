"""MEGALODON on the demo's corpus and token budget: a model of the demo LLaMA's size trained
from scratch exactly like it (stage "pretrain": the same 500 steps of 16 × 256 tokens with the
same share of retrieval rows), then trained on the LLaMA's extension rows (stage "extend":
`configs/demo.py`'s, 1024 tokens = 16 chunks, the same steps and schedule; no RoPE change:
MEGALODON's RoPE works inside 64-token chunks).

    python train.py --config configs/demo_megalodon.py   # -> runs/demo-megalodon/models/*

Model: 4 layers of model_dim 256, 2 heads (z_dim 128: d_z 64 like the LLaMA's head_dim;
value_dim 256), SwiGLU FFN 560, 32 norm groups, cema_ndim 16, chunk 64; 2.98M parameters
outside the embedding and head against the LLaMA's 2.95M (both 4096-token vocabulary, untied
head). 4 chunks per pre-training row, so the CEMA and norm states carry across chunks.
"""

import ml_collections

from configs import demo

CHUNK = 64
MODEL = dict(model_type="megalodon", vocab_size=4096, model_dim=256, num_layers=4, num_heads=2,
             z_dim=128, value_dim=256, ffn_hidden_dim=560, cema_ndim=16, chunk_size=CHUNK,
             norm_num_groups=32, norm_eps=1e-5, rope_theta=10000.0, swiglu=True,
             share_emb=False, bos_token_id=1, eos_token_id=2)


def get_config() -> ml_collections.ConfigDict:
    c = demo.get_config()
    c.run_dir = "runs/demo-megalodon"
    c.model = ml_collections.ConfigDict(MODEL)
    c.stages = [c.stages[0], demo.extend_stage(c, None)]
    return c
