"""Llama-2-7B (4K) without fine-tuning at 4K-32K: PI, NTK, dynamic NTK, YaRN and LongRoPE's
searched factors side by side, LongRoPE's protocol: PG19 test, 5 documents of >= 32K tokens,
each cut to the length (truncate), plus passkey retrieval (prose prompt, 10 trials per depth).

    python eval.py --config configs/eval_llama2_7b.py:/ckpt/Llama-2-7b-hf

The search uses the paper's settings (population 64, 40 iterations, 5 documents from PG19's
validation split) for each length beyond 4K. Published (LongRoPE, Table: no fine-tuning, PG19,
5 samples) at 8K / 16K: PI 10.65 / 20.49, dynamic NTK 10.21 / 23.29, YaRN 32.64 / 87.89,
LongRoPE 9.37 / 11.34. The model runs on one device in bf16 (13.5 GB of weights).
"""

import ml_collections

from lctx_jax.comparison import default_config, setting


def get_config(checkpoint: str = "checkpoints/Llama-2-7b-hf") -> ml_collections.ConfigDict:
    c = default_config()
    c.out_dir = "runs/eval-llama2-7b"
    c.data.dataset = "pg19"
    c.data.split = "test"
    c.data.search_split = "validation"
    c.data.text_key = "book_text"
    c.original_length = 4096
    c.lengths = (4096, 8192, 16384, 32768)
    c.methods = ("none", "pi", "ntk", "dynamic", "yarn", "longrope")
    c.settings = [setting("no fine-tune", checkpoint, "per_length")]
    c.dtype = "bfloat16"
    return c
