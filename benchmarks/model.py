"""Model benchmark: lctx_jax's decoder against transformers (PyTorch) on the same config, same run.

Per implementation, in a fresh process each (so peak memory is its own):
  forward     logits for a [B, T] batch of token ids (ours: jitted; transformers: inference_mode)
  train step  forward + backward of the next-token cross-entropy + AdamW update (ours: one
              jitted optax step with donated params and optimizer state; transformers:
              loss.backward() + torch.optim.AdamW.step()), f32 both.
Reported: tokens/s (B·T / median step time), the ratio ours / transformers, peak memory above
the process's RSS before the first call (MiB), and our compile time separately.

Run:  python benchmarks/model.py [--batch 8] [--length 256] [--layers 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(__file__))
from common import cpu_model, run_child, save_run, timed  # noqa: E402

MODES = ("forward", "train")
IMPLS = ("ours", "transformers")


def hf_config(args: argparse.Namespace) -> dict[str, Any]:
    """A small Llama (GQA 2:1, head_dim 32) in config.json vocabulary."""
    return {"model_type": "llama", "vocab_size": 8192, "hidden_size": 256,
            "intermediate_size": 688, "num_hidden_layers": args.layers,
            "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False}


def token_ids(args: argparse.Namespace):
    import numpy as np
    return np.random.default_rng(0).integers(0, 8192, (args.batch, args.length), dtype=np.int32)


def prepare_ours(args: argparse.Namespace, mode: str) -> tuple[Callable[[], Any], float]:
    import jax
    import jax.numpy as jnp
    import optax

    import lctx_jax as lx

    model = lx.Model.init(lx.ModelConfig.from_hf(hf_config(args)), jax.random.key(0))
    ids = jnp.asarray(token_ids(args))
    if mode == "forward":
        step = jax.jit(model.apply)
        state: Any = (model.params,)
    else:
        optimizer = optax.adamw(1e-4)

        def loss_fn(params: Any) -> jax.Array:
            logits = model.apply(params, ids[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

        def train_step(params: Any, opt_state: Any) -> tuple[Any, Any, jax.Array]:
            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        step = jax.jit(train_step, donate_argnums=(0, 1))
        state = (model.params, optimizer.init(model.params))
    start = time.perf_counter()
    compiled = (step.lower(model.params, ids).compile() if mode == "forward"
                else step.lower(*state).compile())
    compile_s = time.perf_counter() - start

    def call() -> None:
        nonlocal state
        if mode == "forward":
            jax.block_until_ready(compiled(model.params, ids))
        else:
            params, opt_state, loss = compiled(*state)
            state = (params, opt_state)
            jax.block_until_ready(loss)

    return call, compile_s


def prepare_transformers(args: argparse.Namespace, mode: str) -> tuple[Callable[[], Any], None]:
    import torch
    import transformers as tf

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**hf_config(args)))
    ids = torch.as_tensor(token_ids(args), dtype=torch.long)
    if mode == "forward":
        model.eval()

        def call() -> None:
            with torch.inference_mode():
                model(ids).logits
    else:
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def call() -> None:
            loss = model(ids[:, :-1], labels=ids[:, :-1]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return call, None


def measure(args: argparse.Namespace, impl: str, mode: str) -> dict[str, Any]:
    call, compile_s = {"ours": prepare_ours, "transformers": prepare_transformers}[impl](args, mode)
    result = timed(call, args.repeats)
    result["compile_s"] = compile_s
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--one", nargs=2, metavar=("IMPL", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args, *args.one)))
        return

    shape = ["--batch", str(args.batch), "--length", str(args.length), "--layers",
             str(args.layers), "--repeats", str(args.repeats)]
    results = {mode: {impl: run_child(__file__, *shape, "--one", impl, mode) for impl in IMPLS}
               for mode in MODES}
    tokens = args.batch * args.length
    import jax
    import torch
    print(f"CPU: {cpu_model()} | jax {jax.__version__} | torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"Llama config {hf_config(args)}; batch {args.batch} x {args.length} tokens, f32, "
          f"median of {args.repeats} after one warm-up\n")
    print("| step | ours tokens/s | transformers tokens/s | ours / transformers "
          "| ours peak MiB | transformers peak MiB | ours compile s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for mode in MODES:
        ours, theirs = results[mode]["ours"], results[mode]["transformers"]
        print(f"| {mode} | {tokens / ours['median_s']:.0f} | {tokens / theirs['median_s']:.0f} "
              f"| {theirs['median_s'] / ours['median_s']:.2f}x | {ours['peak_mib']:.0f} "
              f"| {theirs['peak_mib']:.0f} | {ours['compile_s']:.1f} |")
    save_run(args, results)


if __name__ == "__main__":
    main()
