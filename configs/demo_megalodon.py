"""MEGALODON on the demo's corpus and token budget: a model of the demo LLaMA's size trained
from scratch like it, then the same passkey fine-tune as configs/demo_passkey.py.

    python train.py --config configs/demo.py             # the LLaMA it is compared with
    python train.py --config configs/demo_megalodon.py   # -> runs/demo-megalodon
    python eval.py --config configs/eval_demo_megalodon.py

Model: 4 layers of model_dim 256, 2 heads (z_dim 128: d_z 64 like the LLaMA's head_dim;
value_dim 256), SwiGLU FFN 560, 32 norm groups, cema_ndim 16, chunk 64; 2.98M parameters
outside the embedding and head against the LLaMA's 2.95M (both 4096-token vocabulary, untied
head). Stage "pretrain" is the LLaMA's: 400 steps of 16 × 256 tokens (1.6M tokens; 4 chunks
per row, so the CEMA and norm states carry across chunks), lr 2e-3 cosine, warmup 40, wd 0.1.
Then "passkey-128" / "passkey-512" (2 and 8 chunks), as the LLaMA and Infini-attention demos.
"""

import ml_collections

from configs import demo, demo_infini

CHUNK = 64
MODEL = dict(model_type="megalodon", vocab_size=4096, model_dim=256, num_layers=4, num_heads=2,
             z_dim=128, value_dim=256, ffn_hidden_dim=560, cema_ndim=16, chunk_size=CHUNK,
             norm_num_groups=32, norm_eps=1e-5, rope_theta=10000.0, swiglu=True,
             share_emb=False, bos_token_id=1, eos_token_id=2)


def get_config() -> ml_collections.ConfigDict:
    c = demo.get_config()
    c.run_dir = "runs/demo-megalodon"
    c.model = ml_collections.ConfigDict(MODEL)
    pretrain = c.stages[0]
    c.stages = [pretrain, *demo_infini.passkey_stages(c, "xla")]
    return c
