"""RoPE benchmark on CPU: lctx_jax.rope against Hugging Face transformers, in the same run.

What it measures, per sequence length T: one attention layer's rotary embedding, i.e. building
cos/sin from positions [1, T] (int32) and rotating q [1, T, Hq, 128] and k [1, T, Hkv, 128] (f32).

  ours          `jax.jit` of `lx.rope.cos_sin` then `lx.rope.apply` on q and k, layout
                [B, T, heads, head_dim]. Compile time is reported separately.
  transformers  (baseline) `LlamaRotaryEmbedding` then `apply_rotary_pos_emb` under
                `torch.inference_mode()`, f32, default torch threads, on q and k in transformers'
                layout [B, heads, T, head_dim]: transposed views of the same arrays, as
                LlamaAttention passes them.

Both get the same random inputs and the same Llama-3-style config (head_dim 128, rope_theta 5e5,
scaling chosen by --rope-type). Heads default to Hq=4, Hkv=1 (Llama-3's 4:1 GQA ratio), not 8/2:
with 8/2 transformers needs ~18 GiB at T=1M (3.3 GiB above its inputs at 256K, measured).

Time: one warm-up call (after compiling, for ours), then the median of a few calls (5 for small
T, fewer for large), each waited on (`jax.block_until_ready`; torch is synchronous on CPU).
Memory: each (implementation, T) runs in a fresh child process that imports only its own framework;
its peak is ru_maxrss minus the RSS just before the warm-up (after imports, inputs and compiling),
in MiB. The high-water mark
is reset at that point (Linux /proc/self/clear_refs) so that setup transients do not count.
Correctness (untimed, one more child per T): max |ours - transformers| over the rotated q, with
one head (all heads share cos/sin; full heads would cost another ~12 GiB and a minute at 1M).

Run (Linux):  python benchmarks/rope.py [--lengths 4096,16384] [--rope-type yarn] [--heads 4,1]
                                        [--json results.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import cpu_model, run_child, timed  # noqa: E402

DEFAULT_LENGTHS = (4096, 16384, 65536, 262144, 1048576)
DEFAULT_HEADS = (4, 1)
HEAD_DIM = 128
IMPLS = ("ours", "transformers")

BASE_CONFIG = {"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
               "max_position_embeddings": 131072, "rope_theta": 500000.0}
SCALING = {
    "yarn": {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 8192},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "longrope": {"rope_type": "longrope", "factor": 16.0, "original_max_position_embeddings": 8192,
                 "short_factor": [1.0] * (HEAD_DIM // 2),
                 "long_factor": [16.0 ** (j / (HEAD_DIM // 2 - 1)) for j in range(HEAD_DIM // 2)]},
    "linear": {"rope_type": "linear", "factor": 16.0},
    "dynamic": {"rope_type": "dynamic", "factor": 16.0},
}


def hf_config(rope_type: str) -> dict[str, Any]:
    """A Llama-3-style config.json dict (head_dim 128) with the chosen rope scaling."""
    return {**BASE_CONFIG, "rope_scaling": SCALING[rope_type]}


def repeats_for(length: int) -> int:
    return 5 if length <= 65536 else 3 if length <= 262144 else 2


# ----------------------------------------------------------------------------- child side


@dataclasses.dataclass
class Prepared:
    call: Callable[[], tuple[Any, Any]]  # one forward; returns the finished rotated (q, k)
    compile_s: float | None
    backend: str


def make_inputs(length: int, heads: tuple[int, int]) -> tuple[np.ndarray, ...]:
    """q [1, T, Hq, 128] and k [1, T, Hkv, 128] standard normal f32, positions [1, T] int32."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, length, heads[0], HEAD_DIM), dtype=np.float32)
    k = rng.standard_normal((1, length, heads[1], HEAD_DIM), dtype=np.float32)
    return q, k, np.arange(length, dtype=np.int32)[None]


def prepare_ours(config: dict[str, Any], q: np.ndarray, k: np.ndarray,
                 positions: np.ndarray) -> Prepared:
    import jax
    import jax.numpy as jnp

    import lctx_jax as lx

    rope = lx.RopeConfig.from_hf(config)

    def rotate(q: jax.Array, k: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        cos, sin = lx.rope.cos_sin(rope, positions)
        return lx.rope.apply(q, cos, sin), lx.rope.apply(k, cos, sin)

    args = jax.block_until_ready(tuple(jnp.asarray(a) for a in (q, k, positions)))
    start = time.perf_counter()
    compiled = jax.jit(rotate).lower(*args).compile()
    compile_s = time.perf_counter() - start
    return Prepared(lambda: jax.block_until_ready(compiled(*args)), compile_s,
                    f"jax {jax.__version__} {jax.devices()}")


def prepare_transformers(config: dict[str, Any], q: np.ndarray, k: np.ndarray,
                         positions: np.ndarray) -> Prepared:
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import (LlamaRotaryEmbedding,
                                                          apply_rotary_pos_emb)

    embedding = LlamaRotaryEmbedding(LlamaConfig(**config))
    tq, tk = (torch.from_numpy(x).transpose(1, 2) for x in (q, k))  # [B, heads, T, head_dim]
    tpositions = torch.from_numpy(positions)

    def call() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            cos, sin = embedding(tq, tpositions)
            return apply_rotary_pos_emb(tq, tk, cos, sin)

    return Prepared(call, None, f"torch {torch.__version__}, {torch.get_num_threads()} threads")


PREPARE = {"ours": prepare_ours, "transformers": prepare_transformers}


def measure(impl: str, length: int, heads: tuple[int, int],
            config: dict[str, Any]) -> dict[str, Any]:
    """Times and memory of one implementation at one length (run in a fresh process)."""
    prepared = PREPARE[impl](config, *make_inputs(length, heads))
    result = timed(prepared.call, repeats_for(length))
    return {"median_ms": 1e3 * result["median_s"],
            "times_ms": [1e3 * t for t in result["times_s"]], "peak_mib": result["peak_mib"],
            "baseline_mib": result["baseline_mib"], "compile_s": prepared.compile_s,
            "backend": prepared.backend}


def max_abs_diff_q(length: int, config: dict[str, Any]) -> float:
    """max |ours - transformers| over a rotated one-head q, in our layout (not timed)."""
    inputs = make_inputs(length, (1, 1))
    ours = np.asarray(prepare_ours(config, *inputs).call()[0])
    theirs = prepare_transformers(config, *inputs).call()[0].transpose(1, 2).numpy()
    return float(np.abs(ours - theirs).max())


# ----------------------------------------------------------------------------- parent side


def run_child_for(args: argparse.Namespace, *child_args: str) -> Any:
    """Runs this script in a fresh process with the parent's options."""
    return run_child(__file__, "--rope-type", args.rope_type,
                     "--heads", ",".join(map(str, args.heads)), *child_args)


def benchmark_length(args: argparse.Namespace, length: int) -> dict[str, Any]:
    row: dict[str, Any] = {"T": length, "repeats": repeats_for(length)}
    for impl in IMPLS:
        print(f"T={length}: {impl}", file=sys.stderr, flush=True)
        row[impl] = run_child_for(args, "--one", impl, str(length))
    print(f"T={length}: correctness check", file=sys.stderr, flush=True)
    row["max_abs_diff_q"] = run_child_for(args, "--check", str(length))
    return row


def length_label(length: int) -> str:
    for shift, suffix in ((20, "M"), (10, "K")):
        if length % (1 << shift) == 0:
            return f"{length >> shift}{suffix}"
    return str(length)


def render(report: dict[str, Any]) -> str:
    hq, hkv = report["heads"]
    note = " (4/1, not 8/2: transformers would need ~18 GiB at T=1M)" \
        if (hq, hkv) == DEFAULT_HEADS else ""
    lines = [
        f"Device: {report['jax']} | CPU: {report['cpu']} | {report['torch']} "
        f"| load average at start: {report['load_average']:.1f}",
        f"RoPE {report['rope_type']}: q [1, T, {hq}, {HEAD_DIM}], k [1, T, {hkv}, {HEAD_DIM}] "
        f"f32{note}; median of repeats after one warm-up",
        "",
        "| T | ours ms | transformers ms | speedup (transformers/ours) | ours peak MiB "
        "| transformers peak MiB | ours compile s | max abs diff q (1 head) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["rows"]:
        ours, theirs = row["ours"], row["transformers"]
        lines.append(
            f"| {length_label(row['T'])} | {ours['median_ms']:.1f} | {theirs['median_ms']:.1f} "
            f"| {theirs['median_ms'] / ours['median_ms']:.2f}x | {ours['peak_mib']:.0f} "
            f"| {theirs['peak_mib']:.0f} | {ours['compile_s']:.2f} "
            f"| {row['max_abs_diff_q']:.1e} |")
    return "\n".join(lines)


def int_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(","))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int_tuple, default=DEFAULT_LENGTHS,
                        help="comma-separated sequence lengths (default: 4K,16K,64K,256K,1M)")
    parser.add_argument("--rope-type", choices=tuple(SCALING), default="yarn")
    parser.add_argument("--heads", type=int_tuple, default=DEFAULT_HEADS,
                        help="Hq,Hkv (default: 4,1)")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--one", nargs=2, metavar=("IMPL", "T"), help=argparse.SUPPRESS)
    parser.add_argument("--check", type=int, metavar="T", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if len(args.heads) != 2:
        parser.error("--heads takes two numbers: Hq,Hkv")
    return args


def main() -> None:
    args = parse_args()
    config = hf_config(args.rope_type)
    if args.one:  # child: one measurement
        impl, length = args.one
        print(json.dumps(measure(impl, int(length), args.heads, config)))
        return
    if args.check is not None:  # child: correctness
        print(json.dumps(max_abs_diff_q(args.check, config)))
        return

    load_average, start = os.getloadavg()[0], time.perf_counter()
    rows = [benchmark_length(args, length) for length in args.lengths]
    report = {"rope_type": args.rope_type, "config": config, "heads": list(args.heads),
              "cpu": cpu_model(), "jax": rows[0]["ours"]["backend"],
              "torch": rows[0]["transformers"]["backend"], "load_average": load_average,
              "rows": rows,
              "total_s": time.perf_counter() - start}
    print(render(report))
    print(f"\nTotal {report['total_s']:.0f} s", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
