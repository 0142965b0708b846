"""Infini-attention on the demo model: continued pre-training with compressive memory at a
64-token segment, then a passkey fine-tune, as the paper continues pre-trained LLMs at 2K
segments and fine-tunes on 5K-token passkey inputs (400 steps there).

    python train.py --config configs/demo.py           # runs/demo/models/pretrain (L = 256)
    python train.py --config configs/demo_infini.py    # -> runs/demo-infini
    python eval.py --config configs/eval_demo_infini.py

stage "infini": every layer becomes Infini-attention (linear update; gates start at 0 and
train at their own lr 1e-2 without weight decay), trained on 1024-token rows of documents at
least that long = 16 segments of BPTT through the memory. The passkey fine-tune (Python-style
prompts, the loss on the answer only) comes in two stages: "passkey-128" (2 segments: the
needle is in the question's segment or one back, in memory) teaches the small model to copy
the key at all, which the pre-trained demo model does not do even inside its window; then
"passkey-512" (8 segments, prompts of random length). Evaluation goes to 64× the segment.
"""

import ml_collections

from configs import demo
from lctx_jax.train_config import stage

SEGMENT = 64
INFINI = {"segment_len": SEGMENT, "update": "linear", "gate_init": 0.0}


def get_config(update: str = "linear") -> ml_collections.ConfigDict:
    c = demo.get_config()
    c.init_from = "runs/demo/models/pretrain"
    c.run_dir = f"runs/demo-infini-{update}" if update != "linear" else "runs/demo-infini"
    c.infini_steps = 200
    c.stages = [
        stage("infini", seq_len=16 * SEGMENT, batch_size=4, steps=c.get_ref("infini_steps"),
              lr=5e-4, warmup_steps=20, schedule="cosine", min_doc_tokens=16 * SEGMENT,
              attention="infini", infini={**INFINI, "update": update}),
        *passkey_stages(c, "infini"),
    ]
    return c


def passkey_stages(c: ml_collections.ConfigDict, attention: str
                   ) -> list[ml_collections.ConfigDict]:
    """The passkey fine-tune: 800 steps of 16 × 128-token prompts, then 400 of 8 × 512-token
    rows holding prompts of 102 to 506 tokens (so the answer lands anywhere relative to the
    segments, also at the start of one, as it does at every evaluated length k·64)."""
    c.passkey_short_steps = 800
    c.passkey_steps = 400
    return [stage("passkey-128", seq_len=2 * SEGMENT, batch_size=16,
                  steps=c.get_ref("passkey_short_steps"), lr=1e-3, warmup_steps=50,
                  schedule="cosine", attention=attention, task="passkey-python"),
            stage("passkey-512", seq_len=8 * SEGMENT, batch_size=8,
                  steps=c.get_ref("passkey_steps"), lr=5e-4, warmup_steps=20,
                  schedule="cosine", attention=attention, task="passkey-python",
                  min_doc_tokens=102)]
