"""The RoPE baseline of configs/demo_infini.py: the demo's YaRN-extended model (4x, 1024
tokens, runs/demo/models/extend) given the same passkey fine-tune as the Infini-attention
model, so eval.py compares retrieval of two models that were both taught the task.

    python train.py --config configs/demo.py             # runs/demo/models/{pretrain,extend}
    python train.py --config configs/demo_passkey.py     # -> runs/demo-passkey
"""

import ml_collections

from configs import demo, demo_infini


def get_config() -> ml_collections.ConfigDict:
    c = demo.get_config()
    c.init_from = "runs/demo/models/extend"
    c.run_dir = "runs/demo-passkey"
    c.stages = demo_infini.passkey_stages(c, "xla")
    return c
