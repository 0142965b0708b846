"""The demo's extension stage alone, from the demo's pre-trained model, for one method.

    python train.py --config configs/demo_extend.py:pi          # -> runs/demo-pi
    python train.py --config configs/demo_extend.py:longrope    # -> runs/demo-longrope

The method (after the colon) is one of lctx_jax.methods.METHODS or "longrope": the 4x factors
that `eval.py --config configs/eval_demo.py:base` searched (--config.longrope_factors=FILE for
others); everything else is configs/demo.py's "extend" stage: 60 steps of
4 × 1024 tokens on documents of at least 1024 tokens. eval.py compares the results.
"""

import ml_collections

from configs import demo
from lctx_jax import methods


def get_config(method: str = "yarn") -> ml_collections.ConfigDict:
    c = demo.get_config()
    c.init_from = "runs/demo/models/pretrain"
    c.run_dir = f"runs/demo-{method}"
    if method == "longrope":
        c.longrope_factors = "runs/eval-demo/search/longrope_4x.json"
        rope_scaling = c.get_ref("longrope_factors")
    else:
        rope_scaling = methods.scaling(method, demo.FACTOR, demo.CONTEXT)
    c.stages = [demo.extend_stage(c, rope_scaling)]
    return c
