"""Next-token loss: the chunked LM head (lctx_jax.losses.nll_sum) against full-logits
cross-entropy (hidden @ head -> f32 [B, T, V] -> optax), value and gradient of both inputs.

  memory   compiled temporaries of grad(loss) (`memory_analysis()`, no run) for one sequence
           of a Llama-2-7B-sized head (hidden 4096, vocab 32000, bf16 hidden and head) at
           --memory-lengths tokens: what a device holds beyond its inputs
  time     median fwd+bwd time at --time-length tokens of the demo's size (hidden 256, vocab
           4096, f32), both jitted

Run:  python benchmarks/loss.py [--memory-lengths 8192,32768,131072] [--time-length 4096]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(__file__))
from common import save_run, timed  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from lctx_jax import losses  # noqa: E402

MIB = 2**20


def chunked(hidden: jax.Array, head: jax.Array, targets: jax.Array) -> jax.Array:
    total, count = losses.nll_sum(hidden, head, targets, jnp.ones(targets.shape), hidden.dtype)
    return total / count


def full_logits(hidden: jax.Array, head: jax.Array, targets: jax.Array) -> jax.Array:
    logits = jnp.einsum("bth,hv->btv", hidden, head, preferred_element_type=jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def grad_fn(loss: Any) -> Any:
    return jax.jit(jax.grad(loss, argnums=(0, 1)))


def memory_mib(loss: Any, length: int, width: int, vocab: int, dtype: Any) -> float:
    shapes = (jax.ShapeDtypeStruct((1, length, width), dtype),
              jax.ShapeDtypeStruct((width, vocab), dtype),
              jax.ShapeDtypeStruct((1, length), jnp.int32))
    return grad_fn(loss).lower(*shapes).compile().memory_analysis().temp_size_in_bytes / MIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory-lengths", default="8192,32768,131072")
    parser.add_argument("--time-length", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results: dict[str, Any] = {"memory": [], "time": {}}
    print(f"{jax.devices()[0].device_kind} | jax {jax.__version__}\n")
    print("Temporaries of grad(loss), one sequence, hidden 4096, vocab 32000, bf16:\n")
    print("| T | full logits MiB | chunked MiB | full / chunked |")
    print("|---:|---:|---:|---:|")
    for length in map(int, args.memory_lengths.split(",")):
        full, ours = (memory_mib(f, length, 4096, 32000, jnp.bfloat16)
                      for f in (full_logits, chunked))
        results["memory"].append({"length": length, "full_mib": full, "chunked_mib": ours})
        print(f"| {length:,} | {full:,.0f} | {ours:,.0f} | {full / ours:.1f}x |")
    key = jax.random.key(0)
    t = args.time_length
    inputs = (jax.random.normal(key, (1, t, 256)), jax.random.normal(key, (256, 4096)) * 0.05,
              jax.random.randint(key, (1, t), 0, 4096))
    print(f"\nfwd+bwd time, T = {t}, hidden 256, vocab 4096, f32 (median of {args.repeats}):\n")
    print("| loss | ms | vs full logits |")
    print("|---|---:|---:|")
    for name, loss in (("full logits (optax)", full_logits), ("chunked", chunked)):
        fn = grad_fn(loss)
        results["time"][name] = timed(lambda: jax.block_until_ready(fn(*inputs)),
                                      args.repeats)["median_s"]
    base = results["time"]["full logits (optax)"]
    for name, seconds in results["time"].items():
        print(f"| {name} | {1000 * seconds:.1f} | {base / seconds:.2f}x |")
    save_run(args, results)


if __name__ == "__main__":
    main()
