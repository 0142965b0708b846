"""python eval.py --config configs/NAME.py [--config.FIELD=VALUE ...]

Compares context-extension methods: LongRoPE's evolutionary search (resumable), perplexity
across lengths, passkey retrieval; writes results.json, results.md and PNG plots to
config.out_dir. Fields: lctx_jax/comparison.py. Example, on the demo's models:

    python eval.py --config configs/eval_demo.py

Sizing the perplexity forward for a TPU slice before paying for one (needs `pip install -e
'.[tpu]'`; no weights, data or TPU are needed; `lctx_jax.aot.compile_eval`): one window of each
configured length on config.mesh with config.attention, per-chip HBM, "fit" or not:

    python eval.py --config configs/eval_llama2_7b.py:1m --compile_only=v5p-8
"""

from lctx_jax import aot, cli, comparison

if __name__ == "__main__":
    cli.main(comparison.run, "eval.py", aot.compile_eval)
