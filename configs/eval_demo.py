"""Every method side by side on the demo models (trained at L = 256 tokens), at 1× to 16× L.

    python train.py --config configs/demo.py             # runs/demo/models/{pretrain,extend}
    python eval.py --config configs/eval_demo.py:search  # LongRoPE's factors per length
    for m in none pi ntk dynamic yarn llama3 longrope longlora infini; do
      python train.py --config configs/demo_extend.py:$m     # -> runs/demo-$m
    done
    python train.py --config configs/demo_megalodon.py   # -> runs/demo-megalodon
    python eval.py --config configs/eval_demo.py

Settings (the rows of each table): "no fine-tune", the pre-trained LLaMA with each RoPE
method at factor length / L (no training: LongRoPE's factors searched per length here
first); "pre-trained", MEGALODON after the same pre-training; "fine-tuned", each method's
own extension fine-tune (configs/demo_extend.py, 8× to 2048 tokens on 1024-token rows; YaRN's
is configs/demo.py's stage again, its data drawn with the seed of a first stage),
Infini-attention's continued training and MEGALODON's training on the same rows. The
search is demo-sized (population 16, 6 iterations, 4 training-split documents; the paper's
64 and 40 are lctx_jax.comparison's defaults).

Protocols: perplexity on 8 validation documents of >= 4096 tokens, each cut to the length
(YaRN / LongRoPE's truncate protocol); passkey with the Python-flavoured prompt (repeated
filler lines), depths 0.1 / 0.5 / 0.9, 8 trials each; the 4-key needle-in-a-haystack (lines
of 8 validation files as the haystack) at depths 0 / 0.25 / 0.5 / 0.75 / 1, 4 trials each,
for the fine-tuned models. Results: runs/eval-demo/results.{md,json} and PNG plots.
"""

import ml_collections

from lctx_jax.comparison import default_config, setting

ROPE_METHODS = ("none", "pi", "ntk", "dynamic", "yarn", "llama3", "longrope")
FINE_TUNED = (*ROPE_METHODS, "longlora", "infini", "megalodon")


def get_config(which: str = "all") -> ml_collections.ConfigDict:
    """which: "all" (every setting), "base" (the pre-trained LLaMA only) or "search" (only
    LongRoPE's search, whose 8x factors configs/demo_extend.py:longrope fine-tunes with)."""
    c = default_config()
    c.out_dir = "runs/eval-demo"
    c.tokenizer = "~/.cache/lctx_jax/stdlib-3.11.7-4096.model"
    c.original_length = 256
    c.lengths = (256, 512, 1024, 2048, 4096)
    c.methods = ROPE_METHODS
    c.settings = [setting("no fine-tune", "runs/demo/models/pretrain", "per_length")]
    if which == "all":
        c.settings += [
            setting("pre-trained", "runs/demo-megalodon/models/pretrain", "checkpoint",
                    ("megalodon",)),
            setting("fine-tuned", "runs/demo-{method}/models/extend", "checkpoint", FINE_TUNED),
        ]
    elif which not in ("base", "search"):
        raise ValueError(f"configs/eval_demo.py:{which}: use :all, :base or :search")
    c.search.only = which == "search"
    c.perplexity.documents = 8
    c.perplexity.batch_size = 4
    c.passkey.trials = 8
    c.passkey.batch_size = 8
    c.passkey.style = "python"
    c.needle.enabled = which == "all"
    c.needle.settings = ("fine-tuned",)
    c.search.documents = 4
    c.search.population = 16
    c.search.parents = 8
    c.search.mutations = 4
    c.search.crossovers = 4
    c.search.iterations = 6
    return c
