"""Ring attention benchmark on simulated CPU devices (XLA_FLAGS host platform device count 8).

Three measurements, each printed as a table:
  memory     per-device memory of one causal ring attention forward+backward (B=1, Hq=8,
             Hkv=2, D=64, yarn RoPE, zigzag) for T and ring sizes P = 1, 2, 4, 8, read from the
             compiled SPMD program (`memory_analysis()`: arguments + outputs + temporaries of
             one device's program), next to T/P, to show memory ∝ T/P; and the step time.
             P = 1 is attend(impl="xla") (blockwise) on one device: the baseline.
  balance    tile pairs each device computes in a causal ring (`ring.work_per_device`), for
             contiguous chunks ("none") against "zigzag" and "striped": max / mean is the
             straggler factor, 1.0 is perfect balance.
  model      a forward pass of a small Llama (2 layers, hidden 128) at --model-length tokens
             (default 128K) with attention="ring" on 8 devices: time and per-device memory.

All 8 "devices" share this machine's cores, so step times do not fall with P here: on real
hardware each device brings its own compute. Memory per device is the figure that transfers.

Run:  python benchmarks/ring.py [--lengths 4096,16384] [--model-length 131072] [--json out]
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import lctx_jax as lx  # noqa: E402
from lctx_jax.attention import ring  # noqa: E402

HEADS, HEAD_DIM = (8, 2), 64
RING_SIZES = (1, 2, 4, 8)
ROPE = lx.RopeConfig.from_hf({"hidden_size": 512, "num_attention_heads": 8,
                              "max_position_embeddings": 1 << 20, "rope_theta": 500000.0,
                              "rope_scaling": {"rope_type": "yarn", "factor": 8.0,
                                               "original_max_position_embeddings": 1 << 17}})


def sequence_mesh(size: int) -> jax.sharding.Mesh:
    return jax.sharding.Mesh(np.array(jax.devices()[:size]), ("sequence",))


def program_mib(compiled: Any) -> float:
    """Memory of one device's compiled program: arguments, outputs and temporaries, MiB."""
    m = compiled.memory_analysis()
    return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes) / 2**20


def ring_step(length: int, size: int) -> dict[str, float]:
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (1, length, HEADS[0], HEAD_DIM))
    k, v = (jax.random.normal(key, (1, length, HEADS[1], HEAD_DIM)) for key in keys[1:])
    positions = jnp.arange(length)[None]
    if size == 1:
        def attention(q, k, v):
            return lx.attention.attend(q, k, v, rope=ROPE, positions=positions, block_size=512)
    else:
        mesh = sequence_mesh(size)
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "sequence"))
        q, k, v = (jax.device_put(x, sharding) for x in (q, k, v))

        def attention(q, k, v):
            return lx.attention.attend(q, k, v, impl="ring", mesh=mesh, rope=ROPE,
                                       positions=positions)

    grads = jax.grad(lambda q, k, v: attention(q, k, v).sum(), argnums=(0, 1, 2))
    # gradients stay split like their inputs (left to itself, XLA returns them replicated)
    step = jax.jit(grads, out_shardings=(q.sharding, k.sharding, v.sharding))
    start = time.perf_counter()
    compiled = step.lower(q, k, v).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(q, k, v))
    start = time.perf_counter()
    jax.block_until_ready(compiled(q, k, v))
    return {"mib": program_mib(compiled), "step_s": time.perf_counter() - start,
            "compile_s": compile_s}


def memory_table(lengths: list[int]) -> list[dict[str, Any]]:
    rows = []
    print("\n| T | P | T/P | per-device MiB | MiB per 1K tokens of T/P | fwd+bwd s | compile s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for length in lengths:
        for size in RING_SIZES:
            result = ring_step(length, size)
            rows.append({"T": length, "P": size, **result})
            print(f"| {length} | {size} | {length // size} | {result['mib']:.1f} "
                  f"| {result['mib'] / (length / size / 1024):.2f} | {result['step_s']:.2f} "
                  f"| {result['compile_s']:.1f} |", flush=True)
    return rows


def balance_table(length: int) -> dict[str, Any]:
    """Score entries computed per device: tile pairs × tile², as a share of a full chunk×T."""
    positions = np.arange(length)
    print(f"\nCausal work per device, T={length}: score entries computed, relative to the "
          "dense chunk × T of one device\n")
    print("| P | scheme | tile | work per device (fraction of chunk × T) | max / mean |")
    print("|---:|---|---:|---|---:|")
    out = {}
    for size in RING_SIZES[1:]:
        for scheme in ("none", "zigzag", "striped"):
            tile = ring.tile_size(length // size, scheme)
            work = ring.work_per_device(positions, size, scheme) * tile * tile
            share = work / (length // size * length)
            out[f"{size}/{scheme}"] = share.tolist()
            print(f"| {size} | {scheme} | {tile} | {' '.join(f'{x:.2f}' for x in share)} "
                  f"| {work.max() / work.mean():.2f} |")
    return out


def model_forward(length: int) -> dict[str, float]:
    config = lx.ModelConfig.from_hf({
        "model_type": "llama", "vocab_size": 1024, "hidden_size": 128, "intermediate_size": 256,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": length, "rope_theta": 10000.0})
    mesh = sequence_mesh(8)
    model = lx.Model.init(config, jax.random.key(0), attention="ring", mesh=mesh)
    ids = jax.device_put(jnp.zeros((1, length), jnp.int32),
                         jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "sequence")))
    forward = jax.jit(lambda params, ids: model.apply(params, ids)[:, -1])
    start = time.perf_counter()
    compiled = forward.lower(model.params, ids).compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    logits = jax.block_until_ready(compiled(model.params, ids))
    result = {"T": length, "forward_s": time.perf_counter() - start, "compile_s": compile_s,
              "mib": program_mib(compiled), "finite": bool(jnp.isfinite(logits).all())}
    print(f"\nModel forward, T={length} on 8 devices (ring): {result['forward_s']:.1f} s, "
          f"per-device program {result['mib']:.0f} MiB, compile {compile_s:.1f} s, "
          f"logits finite: {result['finite']}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="4096,16384")
    parser.add_argument("--model-length", type=int, default=131072)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    print(f"{len(jax.devices())} simulated {jax.devices()[0].platform} devices, jax {jax.__version__}; "
          f"B=1, Hq={HEADS[0]}, Hkv={HEADS[1]}, D={HEAD_DIM}, causal, yarn RoPE, f32")
    lengths = [int(x) for x in args.lengths.split(",")]
    report = {"memory": memory_table(lengths), "balance": balance_table(max(lengths))}
    if args.model_length:
        report["model"] = model_forward(args.model_length)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
