"""Infini-attention benchmark: memory and speed against full attention, same model, same run.

Model: the demo's architecture (4 layers, hidden 256, 4 query / 2 key-value heads of 64, vocab
4096), f32, batch 1, Infini-attention at a 64-token segment (linear update) against full causal
attention ("xla": the plain path up to 2048², then blockwise, whose memory is also linear in T).

  memory      XLA's compiled memory (`memory_analysis()`: temporaries + arguments + outputs)
              of the forward (mean next-token NLL) and of forward + backward (its gradient
              w.r.t. every parameter, remat per layer), at T = 1K ... 1M; compiled only, so
              lengths that would take minutes to run are still measured. Also the decode
              state generation holds after a prompt of T tokens: the KV cache for full
              attention, (M, z) + one segment for Infini-attention.
  speed       tokens/s of the same forward and forward + backward at T = 1K, 4K, 16K (median of
              `--repeats` runs after a warm-up), and the ratio Infini / full attention.

Run:  python benchmarks/infini.py [--segment 64] [--max-log2 20] [--time-lengths 1024 4096 16384]
      [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(__file__))
from common import cpu_model, save_run, timed  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import lctx_jax as lx  # noqa: E402
from lctx_jax import models  # noqa: E402
from lctx_jax.attention.infini import InfiniConfig  # noqa: E402

DEMO = {"model_type": "llama", "vocab_size": 4096, "hidden_size": 256, "intermediate_size": 704,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 256, "rope_theta": 10000.0, "rms_norm_eps": 1e-5}


def specs(segment: int) -> dict[str, lx.ModelSpec]:
    plain = lx.ModelConfig.from_hf(DEMO)
    return {"full": lx.ModelSpec(plain, remat="full"),
            "infini": lx.ModelSpec(plain.with_infini(InfiniConfig(segment)), remat="full")}


def functions(spec: lx.ModelSpec) -> dict[str, Any]:
    def loss(params: Any, ids: jax.Array) -> jax.Array:
        return lx.next_token_nll(lx.Model.of(spec, params), ids, params=params)

    return {"forward": jax.jit(loss), "forward+backward": jax.jit(jax.grad(loss))}


def without_gates(params: Any) -> Any:
    """The full-attention model's parameters: the Infini model's without its gates."""
    return {**params, "layers": {k: v for k, v in params["layers"].items()
                                 if k != "infini_gate"}}


def compiled_mib(fn: Any, params: Any, length: int) -> float:
    ids = jax.ShapeDtypeStruct((1, length), jnp.int32)
    memory = fn.lower(params, ids).compile().memory_analysis()
    total = (memory.temp_size_in_bytes + memory.argument_size_in_bytes
             + memory.output_size_in_bytes)
    return total / 2**20


def decode_state_mib(spec: lx.ModelSpec, length: int) -> float:
    state = jax.eval_shape(lambda: models.family_of(spec.config).decode_state(
        spec.config, 1, length, jnp.float32))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--segment", type=int, default=64)
    parser.add_argument("--min-log2", type=int, default=10)
    parser.add_argument("--max-log2", type=int, default=20)
    parser.add_argument("--time-lengths", type=int, nargs="*", default=[1024, 4096, 16384])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    print(f"# {cpu_model()}, jax {jax.__version__}, segment {args.segment}", flush=True)
    by_impl = specs(args.segment)
    params = jax.eval_shape(lambda: by_impl["infini"].init_params(jax.random.key(0)))
    plain_params = without_gates(params)
    results: dict[str, Any] = {"memory": [], "speed": []}
    print("| T | forward MiB full | forward MiB infini | fwd+bwd MiB full | fwd+bwd MiB infini "
          "| decode state MiB full | decode state MiB infini |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    fns = {impl: functions(spec) for impl, spec in by_impl.items()}
    for log2 in range(args.min_log2, args.max_log2 + 1, 2):
        length = 2**log2
        row = {"T": length}
        for impl, spec in by_impl.items():
            p = params if impl == "infini" else plain_params
            for mode, fn in fns[impl].items():
                row[f"{mode} {impl}"] = compiled_mib(fn, p, length)
            row[f"decode state {impl}"] = decode_state_mib(spec, length)
        results["memory"].append(row)
        print(f"| {length:,} | {row['forward full']:.1f} | {row['forward infini']:.1f} | "
              f"{row['forward+backward full']:.1f} | {row['forward+backward infini']:.1f} | "
              f"{row['decode state full']:.2f} | {row['decode state infini']:.2f} |", flush=True)
    print()
    print("| T | mode | full tokens/s | infini tokens/s | infini / full |")
    print("| ---: | --- | ---: | ---: | ---: |")
    real = by_impl["infini"].init_params(jax.random.key(0))
    real_plain = without_gates(real)
    for length in args.time_lengths:
        ids = jnp.asarray(np.random.default_rng(0).integers(0, 4096, (1, length)), jnp.int32)
        for mode in ("forward", "forward+backward"):
            rate = {}
            for impl in by_impl:
                fn, p = fns[impl][mode], real if impl == "infini" else real_plain
                run = timed(lambda: jax.block_until_ready(fn(p, ids)), args.repeats)
                rate[impl] = length / run["median_s"]
            results["speed"].append({"T": length, "mode": mode, **rate})
            print(f"| {length:,} | {mode} | {rate['full']:,.0f} | {rate['infini']:,.0f} | "
                  f"{rate['infini'] / rate['full']:.2f}x |", flush=True)
    save_run(args, results)


if __name__ == "__main__":
    main()
