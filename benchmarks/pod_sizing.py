"""Pod sizing: every recipe in configs/ compiled for its TPU slice, per-chip HBM measured.

For each recipe with a `SLICE` (its target slice, e.g. "v5p:2x2x2"), runs what
`python train.py --config configs/X.py --compile_only=SLICE` runs (lctx_jax.aot: XLA's TPU
compiler against a compile-only topology, the real train and eval steps of every stage) and
prints one markdown row per stage: the mesh, arguments, temporaries and peak per chip against
the chip's HBM (the baseline: 95 GiB on v5p), and whether it fits. `--extra-1m` adds a 1M-token
stage with the LongRoPE recipe's other settings on 128 chips (v5p:4x4x8; 1M tokens of a 7B model).

Needs libtpu (`pip install -e '.[tpu]'`); no weights, data or TPU.

Run:  python benchmarks/pod_sizing.py [--only NAME] [--extra-1m] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lctx_jax import aot  # noqa: E402
from lctx_jax.train_config import plain  # noqa: E402

GIB = 2**30


def recipe(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def size(name: str, config: Any, topology: str) -> list[dict[str, Any]]:
    with contextlib.redirect_stdout(io.StringIO()):
        reports = aot.compile_only(config, topology)
    rows = []
    for stage, report in zip(config.stages, reports):
        s = plain(stage)
        rows.append({"recipe": name, "slice": topology, "mesh": report.mesh,
                     "stage": s["name"], "seq_len": s["seq_len"], "batch": s["batch_size"],
                     "grad_accum": s["grad_accum"], "attention": s["attention"],
                     "arguments_gib": report.train.arguments / GIB,
                     "temporaries_gib": report.train.temporaries / GIB,
                     "train_peak_gib": report.train.peak / GIB,
                     "eval_peak_gib": report.eval.peak / GIB if report.eval else None,
                     "hbm_gib": report.hbm / GIB, "fits": report.fits})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="one recipe (configs/NAME.py)")
    parser.add_argument("--extra-1m", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    names = sorted(p.stem for p in (ROOT / "configs").glob("*.py"))
    rows = []
    for name in names:
        module = recipe(name)
        if getattr(module, "SLICE", None) and args.only in (None, name):
            rows += size(name, module.get_config(), module.SLICE)
    if args.extra_1m:
        module = recipe("llama2_7b_longrope_progressive")
        config = module.get_config()
        config.stages = [config.stages[1]]
        config.stages[0].name, config.stages[0].seq_len = "1m", 1 << 20
        config.stages[0].grad_accum = 8  # 4 sequences of 1M tokens per micro-step
        config.mesh.fsdp, config.mesh.sequence = 4, 32  # each over 32 chips: 32K tokens/chip
        rows += size("LongRoPE recipe at 1M tokens", config, "v5p:4x4x8")
    print("| recipe | slice | mesh | stage | tokens | batch (accum) | attention | arguments "
          "GiB | temporaries GiB | train peak GiB | eval peak GiB | of HBM | fits |")
    print("|---|---|---|---|---:|---|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items() if v != 1)
        evaluated = f"{r['eval_peak_gib']:.1f}" if r["eval_peak_gib"] is not None else "-"
        print(f"| {r['recipe']} | {r['slice']} | {mesh} | {r['stage']} | {r['seq_len']:,} | "
              f"{r['batch']} ({r['grad_accum']}) | {r['attention']} | "
              f"{r['arguments_gib']:.1f} | {r['temporaries_gib']:.1f} | "
              f"{r['train_peak_gib']:.1f} | {evaluated} | "
              f"{100 * max(r['train_peak_gib'], r['eval_peak_gib'] or 0) / r['hbm_gib']:.0f}% "
              f"| {'yes' if r['fits'] else 'no'} |")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                         "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
