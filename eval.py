"""python eval.py --config configs/NAME.py [--config.FIELD=VALUE ...]

Perplexity across lengths, passkey retrieval and LongRoPE search, method by method.
Not built yet: evaluation lands with the eval.py issue. Until then this entry point says so
and exits non-zero, rather than print made-up numbers.
"""

import sys


def main() -> int:
    print("eval.py: evaluation is not built yet (see the open issue 'eval.py and LongRoPE "
          "search'). Available now: lctx_jax.rope.", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
