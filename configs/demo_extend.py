"""The demo's extension fine-tune for one method, from the demo's pre-trained model.

    python train.py --config configs/demo_extend.py:pi          # -> runs/demo-pi
    python train.py --config configs/demo_extend.py:longrope    # -> runs/demo-longrope

Every method gets configs/demo.py's "extend" stage (the same rows, retrieval share, steps and
learning-rate schedule), to a 2048-token window (s = 8 over L = 256) on 1024-token rows:
  none, pi, ntk, dynamic, yarn, llama3   `lctx_jax.methods.scaling(method, 8, 256)`
  longrope    the 8x factors `eval.py --config configs/eval_demo.py:search` found
              (runs/eval-demo/search/longrope_8x.json; --config.longrope_factors=FILE)
  longlora    LongLoRA: PI x8 with shifted sparse attention (S2-Attn, 4 groups of 256) while
              training, LoRA rank 8 on q, k, v, o plus trainable embeddings and norms
              (LoRA+), at 10x the learning rate of full fine-tuning; full attention after
  infini      Infini-attention in every layer: plain RoPE inside 64-token segments, a
              compressive memory across them (16 per row; linear update, gates from 0 at their
              own lr 1e-2); infini-delta: the same with the delta rule
(MEGALODON's own run, configs/demo_megalodon.py, ends with the same stage.)
`eval.py --config configs/eval_demo.py` compares the results.
"""

import ml_collections

from configs import demo
from lctx_jax import methods

EXTENDED = ("longrope", "longlora", "infini", "infini-delta")
SEGMENT = 64  # Infini-attention's segment
INFINI = {"segment_len": SEGMENT, "update": "linear", "gate_init": 0.0}


def get_config(method: str = "yarn") -> ml_collections.ConfigDict:
    if method not in (*methods.METHODS, *EXTENDED):
        raise ValueError(f"configs/demo_extend.py:{method}: use one of "
                         f"{(*methods.METHODS, *EXTENDED)}")
    c = demo.get_config()
    c.init_from = "runs/demo/models/pretrain"
    c.run_dir = f"runs/demo-{method}"
    fields = {}
    if method.startswith("infini"):
        rope_scaling = None
        update = "delta" if method == "infini-delta" else "linear"
        fields = dict(attention="infini", infini={**INFINI, "update": update})
    elif method == "longrope":
        c.longrope_factors = f"runs/eval-demo/search/longrope_{demo.FACTOR}x.json"
        rope_scaling = c.get_ref("longrope_factors")
    elif method == "longlora":
        rope_scaling = methods.scaling("pi", demo.FACTOR, demo.CONTEXT)
        c.lora.update(rank=8, alpha=16.0, targets=("q", "k", "v", "o"),
                      trainable=("embed", "norm"))
        fields = dict(attention="s2", lr=10 * demo.EXTEND_LR)
    else:
        rope_scaling = methods.scaling(method, demo.FACTOR, demo.CONTEXT)
    c.stages = [demo.extend_stage(c, rope_scaling, **fields)]
    return c
