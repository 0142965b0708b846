"""Methods side by side on the demo model (trained at L = 256 tokens), at 1x to 16x L.

Needs the demo's pre-trained model and, for the "fine-tuned" setting, each method's own
extension fine-tune (configs/demo_extend.py); LongRoPE's factors come from the search this
config runs first (its 4x factors are what demo_extend.py:longrope fine-tunes with):

    python train.py --config configs/demo.py                       # runs/demo/models/pretrain
    python eval.py --config configs/eval_demo.py:base    # the search + no fine-tune
    for m in none pi ntk dynamic yarn llama3 longrope; do
      python train.py --config configs/demo_extend.py:$m        # -> runs/demo-$m
    done
    python eval.py --config configs/eval_demo.py

The search here is demo-sized (population 16, 8 iterations; the paper's 64 and 40 are
lctx_jax.comparison's defaults) and scores candidates on 4 training-split documents; the
perplexity is measured on 8 validation documents of >= 4096 tokens, each cut to the length
(YaRN / LongRoPE's truncate protocol); passkey uses the Python-flavoured prompt, which suits a
model trained on Python source.
"""

import ml_collections

from lctx_jax.comparison import default_config, setting

METHODS = ("none", "pi", "ntk", "dynamic", "yarn", "llama3", "longrope")


def get_config(which: str = "all") -> ml_collections.ConfigDict:
    """which: "all" (both settings) or "base" (the pre-trained model only)."""
    c = default_config()
    c.out_dir = "runs/eval-demo"
    c.tokenizer = "~/.cache/lctx_jax/stdlib-4096.model"
    c.original_length = 256
    c.lengths = (256, 512, 1024, 2048, 4096)
    c.methods = METHODS
    c.settings = [setting("no fine-tune", "runs/demo/models/pretrain", "per_length")]
    if which == "all":
        c.settings.append(setting("fine-tuned", "runs/demo-{method}/models/extend",
                                  "checkpoint"))
    elif which != "base":
        raise ValueError(f"configs/eval_demo.py:{which}: use :all or :base")
    c.perplexity.documents = 8
    c.perplexity.batch_size = 4
    c.passkey.trials = 4
    c.passkey.batch_size = 4
    c.passkey.style = "python"
    c.search.documents = 4
    c.search.population = 16
    c.search.parents = 8
    c.search.mutations = 4
    c.search.crossovers = 4
    c.search.iterations = 8
    return c
