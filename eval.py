"""python eval.py --config configs/NAME.py [--config.FIELD=VALUE ...]

Compares context-extension methods: LongRoPE's evolutionary search (resumable), perplexity
across lengths, passkey retrieval; writes results.json, results.md and PNG plots to
config.out_dir. Fields: lctx_jax/comparison.py. Example, on the demo's models:

    python eval.py --config configs/eval_demo.py
"""

from lctx_jax import cli, comparison

if __name__ == "__main__":
    cli.main(comparison.run, "eval.py")
