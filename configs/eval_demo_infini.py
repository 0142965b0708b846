"""Infini-attention against RoPE scaling on the demo model, at 1x to 64x the 64-token segment.

    python train.py --config configs/demo.py            # the base model and its YaRN extension
    python train.py --config configs/demo_infini.py     # Infini-attention, then passkey
    python train.py --config configs/demo_infini.py:delta   # the same with the delta rule
    python train.py --config configs/demo_passkey.py    # YaRN model, the same passkey fine-tune
    python eval.py --config configs/eval_demo_infini.py

Settings: the Infini-attention model after continued pre-training (16 segments of 64 at 1024
tokens) and after its passkey fine-tune (linear update; and the delta rule's, passkey
fine-tuned); the YaRN-extended model (trained at 1024) before and after the same passkey
fine-tune; the base model (L = 256) as it is and with training-free YaRN per length.
Perplexity: truncate protocol on 8 validation documents of >= 4096 tokens (the same documents
for every setting). Passkey: Python-style prompts, depths 0.1 / 0.5 / 0.9, 10 trials.
"""

import ml_collections

from lctx_jax.comparison import default_config, setting


def get_config() -> ml_collections.ConfigDict:
    c = default_config()
    c.out_dir = "runs/eval-demo-infini"
    c.tokenizer = "~/.cache/lctx_jax/stdlib-4096.model"
    c.original_length = 256
    c.lengths = (64, 128, 256, 512, 1024, 2048, 4096)
    c.methods = ("none", "yarn")
    c.settings = [
        setting("infini, continued pre-training", "runs/demo-infini/models/infini",
                "checkpoint", ("infini",)),
        setting("infini, passkey fine-tuned", "runs/demo-infini/models/passkey-512",
                "checkpoint", ("infini",)),
        setting("infini delta, passkey fine-tuned", "runs/demo-infini-delta/models/passkey-512",
                "checkpoint", ("infini-delta",)),
        setting("yarn 4x fine-tuned", "runs/demo/models/extend", "checkpoint", ("yarn",)),
        setting("yarn 4x, passkey fine-tuned", "runs/demo-passkey/models/passkey-512",
                "checkpoint", ("yarn",)),
        setting("no fine-tune, per length", "runs/demo/models/pretrain", "per_length"),
    ]
    c.perplexity.documents = 8
    c.perplexity.batch_size = 4
    c.passkey.trials = 10
    c.passkey.batch_size = 10
    c.passkey.style = "python"
    c.search.enabled = False
    return c
