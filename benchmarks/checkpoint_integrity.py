"""Checkpoint integrity: what the checksum manifest costs on a ~1 GiB checkpoint.

A Llama-shaped model whose f32 parameters take ~1.1 GiB (Model.init) is saved with
`lctx_jax.save` (which checksums every array on device while Orbax writes) and loaded with
`lctx_jax.load` with each combination of its checks (verify: the manifest; check_finite: no
NaN / inf), alternately, in the same run, from a warm page cache; the baseline is the load
with neither (a plain Orbax restore). Reported: save time, checksum time of the whole tree
(`lctx_jax.checksums.checksums`, warm, and its first call with the compile), load times and
their ratios to the baseline, and the manifest's size.
The checkpoint is written to a temporary directory, deleted at the end.

Run:  python benchmarks/checkpoint_integrity.py [--layers 3] [--repeats 3] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(__file__))
import jax
from common import cpu_model, save_run

import lctx_jax as lx
from lctx_jax import checksums

MIB = 2**20
# load(...) flags per row: (verify, check_finite); "neither" is the baseline (a plain restore)
CHECKS = {"neither": (False, False), "checksums (verify)": (True, False),
          "finite (check_finite)": (False, True), "both (the default)": (True, True)}


def hf_config(layers: int) -> dict[str, Any]:
    """Llama-2-like widths (hidden 2048, MLP 5504, vocab 32000): 283M parameters at 3 layers."""
    return {"model_type": "llama", "vocab_size": 32000, "hidden_size": 2048,
            "intermediate_size": 5504, "num_hidden_layers": layers, "num_attention_heads": 16,
            "num_key_value_heads": 16, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "tie_word_embeddings": False}


def seconds(call: Callable[[], Any]) -> float:
    start = time.perf_counter()
    jax.block_until_ready(call())
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where the temporary checkpoint goes")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    model = lx.Model.init(lx.ModelConfig.from_hf(hf_config(args.layers)), jax.random.key(0))
    jax.block_until_ready(model.params)
    leaves = jax.tree.leaves(model.params)
    size = sum(x.size * x.dtype.itemsize for x in leaves)
    work = Path(tempfile.mkdtemp(prefix="lctx_integrity_", dir=args.dir))
    try:
        first_checksum = seconds(lambda: checksums.checksums(model.params))
        checksum = statistics.median(seconds(lambda: checksums.checksums(model.params))
                                     for _ in range(args.repeats))
        save = seconds(lambda: lx.save(model, work / "ckpt"))
        manifest = (work / "ckpt" / "checksums.json").stat().st_size
        loads: dict[str, list[float]] = {name: [] for name in CHECKS}
        for _ in range(args.repeats + 1):  # the first round warms the page cache and compiles
            for name, (verify, finite) in CHECKS.items():
                loads[name].append(seconds(lambda verify=verify, finite=finite: lx.load(
                    work / "ckpt", verify=verify, check_finite=finite).params))
        load = {name: statistics.median(times[1:]) for name, times in loads.items()}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    baseline = load["neither"]
    results = {"param_bytes": size, "arrays": len(leaves), "save_s": save,
               "checksum_s": checksum, "checksum_first_call_s": first_checksum,
               "load_s": load, "ratio_to_unchecked": {k: v / baseline for k, v in load.items()},
               "manifest_bytes": manifest, "load_times_s": loads}
    print(f"CPU: {cpu_model()} | jax {jax.__version__} | {jax.devices()[0].platform} "
          f"x {jax.device_count()}")
    print(f"{args.layers}-layer Llama, {len(leaves)} arrays, {size / MIB:,.0f} MiB f32; "
          f"median of {args.repeats} (loads after one warm-up round); save {save:.2f} s, "
          f"checksum of the tree {checksum:.2f} s ({first_checksum:.2f} s first call), "
          f"manifest {manifest} bytes\n")
    print("| load checks | seconds | vs unchecked load |")
    print("|---|---:|---:|")
    for name, value in load.items():
        print(f"| {name} | {value:.2f} | {value / baseline:.2f}x |")
    save_run(args, results)


if __name__ == "__main__":
    main()
