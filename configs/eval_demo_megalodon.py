"""MEGALODON beside the LLaMA context-extension methods on the demo corpus, at 1× to 64× its
64-token chunk (the LLaMA's window is 256 tokens).

    python train.py --config configs/demo.py             # LLaMA base and its YaRN extension
    python train.py --config configs/demo_passkey.py     # the YaRN model's passkey fine-tune
    python train.py --config configs/demo_megalodon.py   # MEGALODON, same tokens, then passkey
    python eval.py --config configs/eval_demo_megalodon.py

Settings: MEGALODON after pre-training and after its passkey fine-tune; the LLaMA fine-tuned
with YaRN 4× (1024 tokens) before and after the same passkey fine-tune; the LLaMA base as it
is and with training-free YaRN per length. Perplexity: truncate protocol on 8 validation
documents of >= 4096 tokens (the same documents for every setting). Passkey: Python-style
prompts, depths 0.1 / 0.5 / 0.9, 10 trials.
"""

import ml_collections

from configs import eval_demo_infini
from lctx_jax.comparison import setting


def get_config() -> ml_collections.ConfigDict:
    c = eval_demo_infini.get_config()  # its lengths, methods and protocols; other settings
    c.out_dir = "runs/eval-demo-megalodon"
    c.settings = [
        setting("megalodon, pre-trained", "runs/demo-megalodon/models/pretrain", "checkpoint",
                ("megalodon",)),
        setting("megalodon, passkey fine-tuned", "runs/demo-megalodon/models/passkey-512",
                "checkpoint", ("megalodon",)),
        setting("llama yarn 4x fine-tuned", "runs/demo/models/extend", "checkpoint", ("yarn",)),
        setting("llama yarn 4x, passkey fine-tuned", "runs/demo-passkey/models/passkey-512",
                "checkpoint", ("yarn",)),
        setting("llama, no fine-tune, per length", "runs/demo/models/pretrain", "per_length"),
    ]
    return c
