"""Attention benchmark: the fused-RoPE flash kernel against its baselines, in the same run.

Paths, all causal with RoPE (yarn ×4) on q [B, T, Hq, D], k, v [B, T, Hkv, D] (GQA 4:1):
  fused      attend(impl="flash", rope=rope): the Pallas kernel rotates q and k blocks inside
  outside    lx.rope.cos_sin + apply in XLA, then attend(impl="flash", rope=None)
  splash     attend(impl="splash", rope=rope): JAX's splash kernel, RoPE outside (TPU only)
  cudnn      attend(impl="cudnn", rope=rope): cuDNN's fused attention, RoPE outside, GQA
             without repeating k and v (GPU only)
  reference  lx.rope outside, then jax.nn.dot_product_attention (implementation="cudnn" on GPU,
             "xla" elsewhere), k and v repeated to Hq heads
  blockwise  attend(impl="xla") with RoPE inside: lctx_jax's plain-JAX online-softmax path
Per (path, T, D): forward and forward+backward time (median after a warm-up), TFLOP/s counted
as 2·B·Hq·T²·D for the causal forward (half of 4·B·Hq·T²·D) and 3.5× that for forward+backward,
and peak memory: device peak bytes on GPU/TPU, peak RSS above the pre-run RSS on CPU; each
measurement runs in a fresh process. Ratios are against `reference`.

On CPU the Pallas paths would run in interpret mode, which is a correctness tool and not a
performance path, so only `reference` and `blockwise` run there; splash runs on TPU, cudnn on
GPU (benchmarks/device.sh runs this on one GPU or TPU VM).

Run:  python benchmarks/attention.py [--lengths 1024,4096] [--head-dims 64,128] [--json out]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(__file__))
from common import cpu_model, run_child, timed  # noqa: E402

PATHS = ("fused", "outside", "splash", "cudnn", "reference", "blockwise")
ONLY_ON = {"fused": ("gpu", "tpu"), "outside": ("gpu", "tpu"), "splash": ("tpu",),
           "cudnn": ("gpu",)}  # the rest run everywhere
HEADS = (8, 2)
BATCH = 1
ROPE_CONFIG = {"hidden_size": 1024, "num_attention_heads": 8, "max_position_embeddings": 131072,
               "rope_theta": 500000.0,
               "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                "original_max_position_embeddings": 32768}}


def build(path: str, length: int, head_dim: int) -> tuple[Callable, tuple]:
    """(loss function of (q, k, v) whose forward is the attention output's sum, inputs)."""
    import jax
    import jax.numpy as jnp

    import lctx_jax as lx

    rope = lx.RopeConfig.from_hf({**ROPE_CONFIG, "head_dim": head_dim})
    keys = jax.random.split(jax.random.key(0), 3)
    dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    q = jax.random.normal(keys[0], (BATCH, length, HEADS[0], head_dim), dtype)
    k, v = (jax.random.normal(key, (BATCH, length, HEADS[1], head_dim), dtype) for key in keys[1:])
    positions = jnp.arange(length)[None]

    def rotated(q: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
        cos, sin = lx.rope.cos_sin(rope, positions)
        return lx.rope.apply(q, cos, sin), lx.rope.apply(k, cos, sin)

    def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        if path in ("fused", "splash", "cudnn"):
            impl = "flash" if path == "fused" else path
            return lx.attention.attend(q, k, v, impl=impl, rope=rope, positions=positions)
        if path == "blockwise":
            return lx.attention.attend(q, k, v, impl="xla", rope=rope, positions=positions,
                                       block_size=512)
        q, k = rotated(q, k)
        if path == "outside":
            return lx.attention.attend(q, k, v, impl="flash")
        repeats = HEADS[0] // HEADS[1]
        implementation = "cudnn" if jax.default_backend() == "gpu" else "xla"
        return jax.nn.dot_product_attention(q, jnp.repeat(k, repeats, 2),
                                            jnp.repeat(v, repeats, 2), is_causal=True,
                                            implementation=implementation)

    return attention, (q, k, v)


def measure(path: str, length: int, head_dim: int, repeats: int) -> dict[str, Any]:
    import jax

    attention, inputs = build(path, length, head_dim)
    forward = jax.jit(attention)
    backward = jax.jit(jax.grad(lambda q, k, v: attention(q, k, v).astype("float32").sum(),
                                argnums=(0, 1, 2)))
    result: dict[str, Any] = {}
    for mode, fn in (("fwd", forward), ("fwd+bwd", backward)):
        start = time.perf_counter()
        compiled = fn.lower(*inputs).compile()
        compile_s = time.perf_counter() - start
        stats = timed(lambda: jax.block_until_ready(compiled(*inputs)), repeats)
        device = jax.devices()[0]
        if device.platform != "cpu" and device.memory_stats():
            stats["peak_mib"] = device.memory_stats()["peak_bytes_in_use"] / 2**20
        result[mode] = {**stats, "compile_s": compile_s}
    result["backend"] = f"jax {jax.__version__} {jax.devices()[0].device_kind}"
    return result


def tflops(length: int, head_dim: int, mode: str, seconds: float) -> float:
    forward = 2 * BATCH * HEADS[0] * length * length * head_dim
    return forward * (1 if mode == "fwd" else 3.5) / seconds / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768")
    parser.add_argument("--head-dims", default="64,128")
    parser.add_argument("--paths", default=None, help="comma-separated subset of " + ",".join(PATHS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="rows as JSON lines, each written (and "
                        "flushed) as soon as its measurements end")
    parser.add_argument("--child-timeout", type=float, default=None,
                        help="seconds for one (path, T, D) measurement; past it the row says "
                        "'timeout' and the run goes on")
    parser.add_argument("--one", nargs=3, metavar=("PATH", "T", "D"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        path, length, head_dim = args.one
        print(json.dumps(measure(path, int(length), int(head_dim), args.repeats)))
        return

    import jax
    on_cpu = jax.default_backend() == "cpu"
    paths = args.paths.split(",") if args.paths else [
        p for p in PATHS if jax.default_backend() in ONLY_ON.get(p, (jax.default_backend(),))]
    rows = []
    if args.json:
        args.json.write_text("")
    for head_dim in map(int, args.head_dims.split(",")):
        for length in map(int, args.lengths.split(",")):
            row = {"T": length, "D": head_dim}
            for path in paths:
                print(f"D={head_dim} T={length} {path}", file=sys.stderr, flush=True)
                try:
                    row[path] = run_child(__file__, "--repeats", str(args.repeats),
                                          "--one", path, str(length), str(head_dim),
                                          timeout=args.child_timeout)
                except subprocess.TimeoutExpired:
                    row[path] = {"error": f"timeout ({args.child_timeout:.0f} s)"}
                except Exception as err:  # out of memory at long T, reported as such
                    row[path] = {"error": str(err).splitlines()[-1][:80]}
            rows.append(row)
            if args.json:
                with args.json.open("a") as f:
                    f.write(json.dumps(row) + "\n")
    device = next((r[p]["backend"] for r in rows for p in paths if "backend" in r[p]),
                  "no measurement finished")
    print(f"Device: {device} | CPU: {cpu_model()} | B={BATCH}, Hq={HEADS[0]}, Hkv={HEADS[1]}, "
          f"causal, yarn RoPE, {'f32' if on_cpu else 'bf16'}")
    print("\n| D | T | mode | " + " | ".join(f"{p} ms | {p} TFLOP/s | {p} MiB" for p in paths)
          + " | " + " | ".join(f"{p} / reference" for p in paths if p != "reference") + " |")
    print("|" + "---|" * (3 + 3 * len(paths) + len(paths) - 1))
    for row in rows:
        for mode in ("fwd", "fwd+bwd"):
            cells, ratios = [], []
            ref = row.get("reference", {}).get(mode, {}).get("median_s")
            for path in paths:
                stats = row[path].get(mode)
                if stats is None:
                    cells.append(f"{row[path].get('error', 'n/a')} | | ")
                    ratios.append("")
                    continue
                t = stats["median_s"]
                cells.append(f"{1e3 * t:.1f} | {tflops(row['T'], row['D'], mode, t):.3f} "
                             f"| {stats['peak_mib']:.0f}")
                if path != "reference":
                    ratios.append(f"{ref / t:.2f}x" if ref else "")
            print(f"| {row['D']} | {row['T']} | {mode} | " + " | ".join(cells) + " | "
                  + " | ".join(ratios) + " |")


if __name__ == "__main__":
    main()
