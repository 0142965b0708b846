"""python train.py --config configs/NAME.py [--config.FIELD=VALUE ...]

Fine-tuning for context extension (PI, YaRN, LongLoRA, LongRoPE progressive extension).
Not built yet: the training loop, data pipeline and configs land with the train.py issue.
Until then this entry point says so and exits non-zero, rather than pretend to train.
"""

import sys


def main() -> int:
    print("train.py: training is not built yet (see the open issue 'train.py --config'). "
          "Available now: lctx_jax.rope (every RoPE context-extension method).", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
