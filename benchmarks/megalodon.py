"""MEGALODON benchmark: train-step speed and memory against the LLaMA of the same parameter count.

Models (f32, vocab 4096, untied head): the LLaMA of configs/demo.py (4 layers, hidden 256, 4 query
/ 2 key-value heads of 64, MLP 704) and the MEGALODON of configs/demo_megalodon.py (4 layers,
model_dim 256, 2 heads, z_dim 128, value_dim 256, SwiGLU FFN 560, 32 norm groups, cema_ndim 16,
chunk c = 64, or --chunk), whose non-embedding parameter counts agree within ~1% (both printed).
The step is the one train.py runs (`lctx_jax.training.plan_stage` / `make_step`): next-token
NLL with the LM head in chunks (`lctx_jax.losses`), gradient, global-norm clipping + AdamW,
state donated, one jit.

  speed      per model and T = c and 16c (--multiples), in a fresh process each: tokens/s
             (B·T / median of --repeats steps after a warm-up; B·T = --tokens at every T), the
             compiled memory of the step (`memory_analysis()`: temporaries + arguments +
             outputs) and the host peak RSS above the process's RSS before the first step; each
             as the ratio MEGALODON / LLaMA at the same T (the baseline). The paper (7B, chunk
             4096; 2048 in the released code): ~6% slower than Llama2-7B at 4K, ~32% faster at
             32K. Timings here are XLA:CPU on this machine's cores, not TPU / GPU timings.
  chunks     chunk parallelism: per-device memory of the same MEGALODON train step compiled
             (not run) on a mesh with "sequence" = P = 1, 2, 4, 8 (`lctx_jax.make_mesh(data=1,
             sequence=P)`, each P in a child process with XLA_FLAGS=
             --xla_force_host_platform_device_count=P) at a fixed global [--memory-batch,
             --memory-length] batch: arguments, temporaries, outputs and their total per
             device, each against P = 1 (the baseline). The parameters and optimizer state are
             replicated over "sequence"; the activations are split T/P per device.
  tpu        the same per-chip figures for a compile-only TPU topology (--tpu, default
             v5p:2x2x2; XLA's TPU compiler from libtpu, `lctx_jax.aot`); skipped when libtpu
             is absent or with --tpu "".

Run:  python benchmarks/megalodon.py [--quick] [--parts speed chunks tpu] [--tokens 4096]
      [--chunk C] [--repeats 3] [--memory-length 8192] [--sizes 1 2 4 8] [--tpu v5p:2x2x2]
      [--json out.json]
--quick: a smoke run (T = c only, 1024 tokens a step, one timed repeat, P = 1, 2 at 2 chunks,
no TPU, LLVM at -O0 to compile faster): about a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import cpu_model, run_child, save_run, timed  # noqa: E402

MODELS = ("llama", "megalodon")
PARTS = ("speed", "chunks", "tpu")
BASELINE = "llama"
MIB = 2**20


def llama_hf() -> dict[str, Any]:
    """configs/demo.py's model (config.json vocabulary), its context widened to any T here."""
    from configs import demo
    return dict(demo.get_config().model) | {"max_position_embeddings": 1 << 20}


def megalodon_hf(chunk: int) -> dict[str, Any]:
    """configs/demo_megalodon.py's model (the demo LLaMA's size), at chunk_size `chunk`."""
    from configs import demo_megalodon
    return dict(demo_megalodon.MODEL) | ({"chunk_size": chunk} if chunk else {})


def non_embedding_params(config: Any) -> int:
    """Parameters outside the embedding table and the LM head."""
    import jax.numpy as jnp
    from flax import traverse_util

    from lctx_jax.checkpoint import abstract_params
    flat = traverse_util.flatten_dict(abstract_params(config, jnp.float32, None))
    return sum(x.size for path, x in flat.items() if path[0] not in ("embed", "lm_head"))


def model_config(name: str, chunk: int) -> Any:
    from lctx_jax import models
    return models.config_from_hf(llama_hf() if name == "llama" else megalodon_hf(chunk))


def train_plan(config: Any, batch: int, length: int, mesh: Any) -> Any:
    """train.py's plan (`training.plan_stage`) of one stage at [batch, length]: the step, the
    state and batch shardings."""
    import jax.numpy as jnp

    from lctx_jax import training
    from lctx_jax.checkpoint import abstract_params
    from lctx_jax.train_config import default_config, stage
    c = default_config()
    c.optimizer.weight_decay = 0.1  # as configs/demo.py
    c.eval_batches = 0
    c.stages = [stage("bench", seq_len=length, batch_size=batch, steps=1000, lr=1e-3)]
    return training.plan_stage(c, 0, config, abstract_params(config, jnp.float32, mesh), mesh)


def host_batch(batch: int, length: int, vocab: int) -> dict[str, Any]:
    """One micro-batch [1, B, T] of one document per row (every position scored but the last)."""
    import numpy as np
    ids = np.random.default_rng(0).integers(3, vocab, (1, batch, length + 1)).astype(np.int32)
    ones = np.ones((1, batch, length), np.int32)
    return {"input_ids": ids[..., :-1], "targets": ids[..., 1:],
            "positions": np.broadcast_to(np.arange(length, dtype=np.int32), ones.shape).copy(),
            "segment_ids": ones, "loss_mask": ones.astype(np.float32)}


def footprint(compiled: Any) -> dict[str, float]:
    m = compiled.memory_analysis()
    out = {"arguments_mib": m.argument_size_in_bytes / MIB, "outputs_mib":
           m.output_size_in_bytes / MIB, "temporaries_mib": m.temp_size_in_bytes / MIB,
           "aliased_mib": m.alias_size_in_bytes / MIB}
    out["total_mib"] = out["arguments_mib"] + out["outputs_mib"] + out["temporaries_mib"]
    return out


# ----------------------------------------------------------------------------- children


def measure_speed(args: argparse.Namespace, name: str, length: int) -> dict[str, Any]:
    """One model at one T, run: tokens/s, compiled and host memory, compile time."""
    import jax
    import jax.numpy as jnp

    from lctx_jax import lora as lora_lib, training
    from lctx_jax.model import ModelSpec
    config = model_config(name, args.chunk)
    batch = args.tokens // length
    plan = train_plan(config, batch, length, None)
    params = ModelSpec(config).init_params(jax.random.key(0))
    trainable, frozen = lora_lib.split(params, plan.mask)
    state = plan.step.init_state(trainable, {})
    del params, trainable
    data = {k: jnp.asarray(v) for k, v in host_batch(batch, length, config.vocab_size).items()}
    start = time.perf_counter()
    compiled = plan.step.train.lower(state, frozen, data).compile()
    compile_s = time.perf_counter() - start
    losses = []

    def call() -> None:
        nonlocal state
        state, metrics = compiled(state, frozen, data)
        losses.append(float(metrics["loss"]))  # blocks until the step is done

    result = timed(call, args.repeats)
    result.update(footprint(compiled), compile_s=compile_s, batch=batch, T=length,
                  tokens_per_s=batch * length / result["median_s"], losses=losses,
                  flops_per_token=training.flops_per_token(config, length))
    return result


def step_memory(config: Any, batch: int, length: int, mesh: Any) -> dict[str, Any]:
    """Per-device memory of the train step on `mesh`, compiled from shapes alone."""
    import jax
    import jax.numpy as jnp

    from lctx_jax import lora as lora_lib
    from lctx_jax.checkpoint import abstract_params
    plan = train_plan(config, batch, length, mesh)
    params = abstract_params(config, jnp.float32, mesh)
    trainable, frozen = lora_lib.split(params, plan.mask)
    state = jax.eval_shape(plan.step.init_state, trainable, {})
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         state, plan.state_shardings)
    data = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=plan.batch_sharding)
            for k, v in host_batch(batch, length, config.vocab_size).items()}
    start = time.perf_counter()
    compiled = plan.step.train.lower(state, frozen, data).compile()
    return {**footprint(compiled), "compile_s": time.perf_counter() - start,
            "P": mesh.shape["sequence"], "T": length, "B": batch,
            "device_kind": mesh.devices.flat[0].device_kind}


def measure_chunks(args: argparse.Namespace, size: int) -> dict[str, Any]:
    """The MEGALODON step on `size` simulated CPU devices (this process's XLA_FLAGS)."""
    import lctx_jax as lx
    config = model_config("megalodon", args.chunk)
    return step_memory(config, args.memory_batch, args.memory_length,
                       lx.make_mesh(data=1, sequence=size))


def measure_tpu(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The MEGALODON step on the first P chips of a compile-only TPU topology, every P."""
    import lctx_jax as lx
    from lctx_jax import aot
    devices = aot.topology_devices(args.tpu)
    config = model_config("megalodon", args.chunk)
    return [step_memory(config, args.memory_batch, args.memory_length,
                        lx.make_mesh(data=1, sequence=size, devices=devices[:size]))
            for size in args.sizes if size <= len(devices)]


# ----------------------------------------------------------------------------- report


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def chunk_table(title: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n{title}\n")
    print("| P | T/P | arguments MiB | temporaries MiB | outputs MiB | total MiB / device "
          "| temporaries vs P=1 | total vs P=1 | compile s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = rows[0]
    for r in rows:
        print(f"| {r['P']} | {r['T'] // r['P']} | {r['arguments_mib']:.1f} "
              f"| {r['temporaries_mib']:.1f} | {r['outputs_mib']:.1f} | {r['total_mib']:.1f} "
              f"| {ratio(r['temporaries_mib'], base['temporaries_mib'])} "
              f"| {ratio(r['total_mib'], base['total_mib'])} | {r['compile_s']:.1f} |",
              flush=True)
    if len(rows) > 1:  # the part that shrinks with T/P, and the part that does not
        import numpy as np
        sizes = np.array([r["P"] for r in rows], float)
        (fixed, split), *_ = np.linalg.lstsq(np.stack([np.ones_like(sizes), 1 / sizes], 1),
                                             np.array([r["temporaries_mib"] for r in rows]),
                                             rcond=None)
        print(f"\ntemporaries ≈ {fixed:.0f} MiB + {split:.0f} MiB / P (least squares over P); "
              "arguments (parameters, AdamW moments, batch) stay replicated over 'sequence'")


def child_args(args: argparse.Namespace) -> list[str]:
    return ["--tokens", str(args.tokens), "--repeats", str(args.repeats), "--chunk",
            str(args.chunk), "--memory-length", str(args.memory_length),
            "--memory-batch", str(args.memory_batch), "--tpu", args.tpu,
            "--sizes", *map(str, args.sizes)]


def speed_part(args: argparse.Namespace) -> dict[str, Any]:
    """The speed table: each model at each T, each in a fresh process."""
    lengths = [m * args.chunk for m in args.multiples]
    speed = {str(t): {name: run_child(__file__, *child_args(args), "--one-speed", name, str(t))
                      for name in MODELS} for t in lengths}
    print(f"\nTrain step (train.py's: chunked-head NLL, grad, clip, AdamW, donated state), "
          f"{args.tokens} tokens per step at every T; ratios MEGALODON / LLaMA at the same T.")
    print("CAVEAT: XLA:CPU on this machine's cores. CPU timings are not TPU (or GPU) timings: "
          "the FFT-based CEMA, the scans and the small per-chunk matmuls map onto a TPU's MXU "
          "and vector units very differently from dense attention; compare the ratios' trend "
          "over T, not their values, with the paper's (0.94x at 4K, 1.32x at 32K, 7B).\n")
    print("| T | T / chunk | B | model | tokens/s | MEGALODON / LLaMA tokens/s | FLOPs/token "
          "| step MiB (temp+arg+out) | temporaries MiB | MEGALODON / LLaMA step MiB "
          "| host peak MiB | compile s | loss first→last |")
    print("|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for t in lengths:
        base = speed[str(t)][BASELINE]
        for name in MODELS:
            r = speed[str(t)][name]
            other = name != BASELINE
            print(f"| {t} | {t // args.chunk} | {r['batch']} | {name} | {r['tokens_per_s']:,.0f} "
                  f"| {ratio(r['tokens_per_s'], base['tokens_per_s']) if other else '(base)'} "
                  f"| {r['flops_per_token'] / 1e6:.1f}M | {r['total_mib']:.1f} "
                  f"| {r['temporaries_mib']:.1f} "
                  f"| {ratio(r['total_mib'], base['total_mib']) if other else '(base)'} "
                  f"| {r['peak_mib']:.0f} | {r['compile_s']:.1f} "
                  f"| {r['losses'][0]:.3f}→{r['losses'][-1]:.3f} |", flush=True)
    return speed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a fast smoke run")
    parser.add_argument("--tokens", type=int, default=4096, help="B·T of every timed step")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=0,
                        help="MEGALODON's chunk_size c (0: configs/demo_megalodon.py's)")
    parser.add_argument("--multiples", type=int, nargs="*", default=[1, 16],
                        help="the timed T, in chunks")
    parser.add_argument("--memory-length", type=int, default=8192)
    parser.add_argument("--memory-batch", type=int, default=1)
    parser.add_argument("--sizes", type=int, nargs="*", default=[1, 2, 4, 8],
                        help="devices on the mesh axis 'sequence'")
    parser.add_argument("--tpu", default="v5p:2x2x2", help='compile-only topology ("": skip)')
    parser.add_argument("--parts", nargs="*", choices=PARTS, default=list(PARTS))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--one-speed", nargs=2, metavar=("MODEL", "T"), help=argparse.SUPPRESS)
    parser.add_argument("--one-chunks", type=int, metavar="P", help=argparse.SUPPRESS)
    parser.add_argument("--one-tpu", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_chunks:  # before jax is imported: this process's simulated device count
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_"
                                   f"platform_device_count={args.one_chunks}")
        print(json.dumps(measure_chunks(args, args.one_chunks)))
        return
    if args.one_speed:
        print(json.dumps(measure_speed(args, args.one_speed[0], int(args.one_speed[1]))))
        return
    if args.one_tpu:  # libtpu's lock file per machine: load it beside others (tests/conftest.py)
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        print(json.dumps(measure_tpu(args)))
        return
    if args.quick:  # LLVM at -O0 (the children inherit it): MEGALODON's step compiles ~3x faster
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_backend_optimization_level=0")
        args.tokens, args.repeats, args.multiples, args.sizes, args.tpu = 1024, 1, [1], [1, 2], ""
    from configs import demo_megalodon
    args.chunk = args.chunk or demo_megalodon.MODEL["chunk_size"]
    if args.quick:
        args.memory_length = 2 * args.chunk
    if args.tokens % (max(args.multiples) * args.chunk):
        parser.error(f"--tokens {args.tokens} must be a multiple of the longest T, "
                     f"{max(args.multiples)} x {args.chunk}")

    began = time.perf_counter()
    import jax
    llama, mega = model_config("llama", 0), model_config("megalodon", args.chunk)
    counts = {"llama": non_embedding_params(llama), "megalodon": non_embedding_params(mega)}
    print(f"{cpu_model()} | jax {jax.__version__} | {jax.devices()[0].platform} | load "
          f"average {os.getloadavg()[0]:.1f} at the start | f32, median of {args.repeats} after "
          "one warm-up")
    if args.quick:
        print("--quick: a smoke run (one T, one repeat, XLA_FLAGS=--xla_backend_optimization_"
              "level=0): its figures are not measurements")
    print(f"LLaMA (configs/demo.py): {llama.num_layers} layers, hidden {llama.hidden_size}, "
          f"{llama.num_heads}/{llama.num_kv_heads} heads of {llama.head_dim}, "
          f"MLP {llama.intermediate_size}: {counts['llama']:,} non-embedding parameters")
    print(f"MEGALODON (configs/demo_megalodon.py): {mega.num_layers} layers, model_dim "
          f"{mega.model_dim}, {mega.num_heads} heads, z_dim {mega.z_dim}, value_dim "
          f"{mega.value_dim}, FFN {mega.ffn_hidden_dim} ({'SwiGLU' if mega.swiglu else 'SiLU'}), "
          f"chunk {mega.chunk_size}, {mega.norm_num_groups} norm groups, cema_ndim "
          f"{mega.cema_ndim}: {counts['megalodon']:,} non-embedding parameters "
          f"({100 * (counts['megalodon'] / counts['llama'] - 1):+.1f}%)")
    print(f"Both: vocab {llama.vocab_size} x {llama.hidden_size}, head "
          f"{'tied' if llama.tie_word_embeddings else 'untied'} / "
          f"{'tied' if mega.tie_word_embeddings else 'untied'}")

    results: dict[str, Any] = {"params": counts, "load_average_start": os.getloadavg()[0]}
    if "speed" in args.parts:
        results["speed"] = speed_part(args)
    if "chunks" in args.parts and args.sizes:
        results["chunks"] = [run_child(__file__, *child_args(args), "--one-chunks", str(p))
                             for p in args.sizes]
        chunk_table(f"Chunk parallelism: MEGALODON train step, global batch {args.memory_batch} "
                    f"x {args.memory_length} ({args.memory_length // args.chunk} chunks), per "
                    "device of P simulated CPU devices on mesh axis 'sequence' (compiled, not "
                    "run; XLA:CPU's buffer assignment)", results["chunks"])
    if "tpu" in args.parts and args.tpu and args.sizes:
        try:
            tpu = run_child(__file__, *child_args(args), "--one-tpu")
        except Exception as err:  # noqa: BLE001  (no libtpu, unknown topology)
            print(f"\nTPU compile-only topology {args.tpu}: skipped ({err})")
        else:
            results["tpu"] = tpu
            chunk_table(f"Chunk parallelism on a compile-only TPU topology {args.tpu} "
                        f"({tpu[0]['device_kind']}, XLA's TPU compiler from libtpu): the same "
                        "step, per chip of the first P chips", tpu)
    results["load_average_end"] = os.getloadavg()[0]
    print(f"\nload average {results['load_average_end']:.1f} at the end ({os.cpu_count()} "
          "cores; other processes' load slows the timed steps)")
    print(f"total {time.perf_counter() - began:.0f} s")
    save_run(args, results)


if __name__ == "__main__":
    main()
