"""Llama-2-7B (4K) without fine-tuning at 4K-32K: PI, NTK, dynamic NTK, YaRN and LongRoPE's
searched factors side by side, LongRoPE's protocol: PG19 test, 5 documents of >= 32K tokens,
each cut to the length (truncate), plus passkey retrieval (prose prompt, 10 trials per depth).

    python eval.py --config configs/eval_llama2_7b.py:/ckpt/Llama-2-7b-hf

The search uses the paper's settings (population 64, 40 iterations, 5 documents from PG19's
validation split) for each length beyond 4K. Published (LongRoPE, Table: no fine-tuning, PG19,
5 samples) at 8K / 16K: PI 10.65 / 20.49, dynamic NTK 10.21 / 23.29, YaRN 32.64 / 87.89,
LongRoPE 9.37 / 11.34. bf16 (13.5 GB of weights); every device of the machine or slice splits
each window over "sequence" with ring attention (on one device: --config.attention=xla).

One window of 1M tokens (1048576) or of LongRoPE's 2048K (2097152): `:CHECKPOINT,1m` or
`:CHECKPOINT,2048k` (or `:1m` alone, for the default checkpoint path) evaluates that length
only, perplexity only (the passkey's KV cache and the search do not scale there; LongRoPE is
left out, as its factors come from the search), on documents of at least that many tokens.
Sizing it for a slice first (no weights needed):

    python eval.py --config configs/eval_llama2_7b.py:1m --compile_only=v5p-8

Both fit the smallest v5p slice, v5p-8 (4 chips, ring over sequence = 4; XLA's TPU compiler,
libtpu 0.0.42.1): 1M tokens 35.0 GiB per chip (12.6 GiB of bf16 weights on every chip, 22.4
GiB of temporaries), 2048K 56.9 GiB (44.4 GiB of temporaries), of 95 GiB.
"""

import ml_collections

from lctx_jax.comparison import default_config, setting
from lctx_jax.train_config import ConfigError

LONG = {"1m": 1 << 20, "2048k": 1 << 21}  # one window of this many tokens


def get_config(arg: str = "checkpoints/Llama-2-7b-hf") -> ml_collections.ConfigDict:
    """arg: CHECKPOINT, CHECKPOINT,LENGTH or LENGTH, LENGTH one of LONG's names."""
    parts = arg.split(",")
    long = [p for p in parts if p in LONG]
    paths = [p for p in parts if p not in LONG]
    if len(long) > 1 or len(paths) > 1:
        raise ConfigError(f"configs/eval_llama2_7b.py:{arg}: give CHECKPOINT, CHECKPOINT,LENGTH "
                          f"or LENGTH, with LENGTH one of {sorted(LONG)}")
    c = default_config()
    c.out_dir = "runs/eval-llama2-7b"
    c.data.dataset = "pg19"
    c.data.split = "test"
    c.data.search_split = "validation"
    c.data.text_key = "book_text"
    c.original_length = 4096
    c.lengths = (4096, 8192, 16384, 32768)
    c.methods = ("none", "pi", "ntk", "dynamic", "yarn", "longrope")
    c.settings = [setting("no fine-tune", paths[0] if paths else "checkpoints/Llama-2-7b-hf",
                          "per_length")]
    c.dtype = "bfloat16"
    c.mesh.update(sequence=-1, num_devices=0)  # every device on "sequence"
    c.attention = "ring"
    if long:
        c.out_dir += f"-{long[0]}"
        c.lengths = (LONG[long[0]],)
        c.methods = ("none", "pi", "ntk", "dynamic", "yarn")
        c.passkey.enabled = False
        c.search.enabled = False
    return c
