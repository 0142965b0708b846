"""Train-step benchmark: the step train.py runs against transformers + PyTorch, same model, same run.

The model is configs/demo.py's (a 4-layer Llama, hidden 256, vocab 4096). Per implementation, in
a fresh process each (so peak memory is its own), one optimizer step on a [B, T] batch:
  ours          lctx_jax.training.make_step: next-token loss over packed documents (segment ids,
                loss mask), global-norm clipping + AdamW (weight decay on kernels and
                embeddings), state donated, one jit
  ours-lora     the same step for LongLoRA: S²-Attn, LoRA r=8 on q/k/v/o applied inside the
                layers (x W + s·(x A) B), embeddings and norms trainable, the rest frozen
  transformers  LlamaForCausalLM (SDPA attention): loss.backward(), clip_grad_norm_,
                torch.optim.AdamW.step()
Reported: tokens/s (B·T / median step time), the ratio to transformers, peak memory above the
process's RSS before the first step (MiB, host; on a GPU also device peak), our step's compiled
temporaries (`memory_analysis()`), our compile time, and on accelerators the MFU
(lctx_jax.training.flops_per_token over the bf16 dense peak). --hidden / --layers run the same
model shape at another size (64-dim heads, half as many key/value heads).

Run:  python benchmarks/train.py [--batch 16] [--length 256] [--dtype float32] [--hidden H]
                                 [--layers L] [--json out.json]
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
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import cpu_model, run_child, save_run, timed  # noqa: E402

IMPLS = ("ours", "ours-lora", "transformers")


def model_config(args: argparse.Namespace) -> dict[str, Any]:
    """configs/demo.py's model; with --hidden / --layers, the same shape at another size
    (64-dim heads, half as many key/value heads, MLP 8/3 of hidden)."""
    from configs import demo
    config = dict(demo.get_config().model)
    if args.hidden:
        config.update(hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3 // 64 * 64,
                      num_attention_heads=args.hidden // 64,
                      num_key_value_heads=args.hidden // 128)
    if args.layers:
        config["num_hidden_layers"] = args.layers
    return config


def host_batch(args: argparse.Namespace) -> dict[str, Any]:
    """Two packed documents per row, as train.py's data pipeline makes them."""
    import numpy as np
    rng = np.random.default_rng(0)
    ids = rng.integers(3, model_config(args)["vocab_size"], (args.batch, args.length + 1))
    cut = args.length // 3
    segments = np.where(np.arange(args.length) < cut, 1, 2)
    positions = np.where(segments == 1, np.arange(args.length), np.arange(args.length) - cut)
    mask = np.ones(args.length, np.float32)
    mask[cut - 1] = 0.0
    tile = lambda row: np.tile(row, (args.batch, 1))
    return {"input_ids": ids[:, :-1].astype(np.int32), "targets": ids[:, 1:].astype(np.int32),
            "positions": tile(positions).astype(np.int32),
            "segment_ids": tile(segments).astype(np.int32), "loss_mask": tile(mask)}


def prepare_ours(args: argparse.Namespace, lora: bool
                 ) -> tuple[Callable[[], Any], float, float]:
    import jax
    import jax.numpy as jnp

    import lctx_jax as lx
    from lctx_jax import lora as lora_lib, training
    from lctx_jax.train_config import default_config

    config = lx.ModelConfig.from_hf(model_config(args))
    start = lx.Model.init(config, jax.random.key(0))
    lora_config = lora_lib.LoraConfig(rank=8) if lora else None
    model = lx.Model(config, start.params, dtype=jnp.dtype(args.dtype),
                     attention="s2" if lora else "xla", lora=lora_config)
    schedule = training.learning_rate(1e-4, 1000, 10, "cosine")
    tx = training.optimizer(default_config().optimizer, schedule)
    fns = training.make_step(model, model, tx, schedule)
    trainable, frozen = lora_lib.split(start.params,
                                       lora_lib.trainable_mask(start.params, lora_config))
    lora_params = {} if lora_config is None else lora_lib.init(start.params, lora_config,
                                                               jax.random.key(1))
    state = fns.init_state(trainable, lora_params)
    batch = {k: jnp.asarray(v[None]) for k, v in host_batch(args).items()}
    begin = time.perf_counter()
    compiled = fns.train.lower(state, frozen, batch).compile()
    compile_s = time.perf_counter() - begin
    temp_mib = compiled.memory_analysis().temp_size_in_bytes / 2**20

    def call() -> None:
        nonlocal state
        state, metrics = compiled(state, frozen, batch)
        jax.block_until_ready(metrics["loss"])

    return call, compile_s, temp_mib


def prepare_transformers(args: argparse.Namespace) -> tuple[Callable[[], Any], None, None]:
    import torch
    import transformers as tf

    torch.manual_seed(0)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**model_config(args))).to(device=device, dtype=dtype)
    model.train()
    batch = {k: torch.as_tensor(v, device=device) for k, v in host_batch(args).items()}
    labels = torch.where(batch["loss_mask"] > 0, batch["targets"], -100).long()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8,
                                  weight_decay=0.0)  # as default_config().optimizer
    ids, positions = batch["input_ids"].long(), batch["positions"].long()

    def call() -> None:
        logits = model(ids, position_ids=positions).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(),
                                                 ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    return call, None, None


def measure(args: argparse.Namespace, impl: str) -> dict[str, Any]:
    if impl == "transformers":
        call, compile_s, temp_mib = prepare_transformers(args)
    else:
        call, compile_s, temp_mib = prepare_ours(args, lora=impl == "ours-lora")
    result = timed(call, args.repeats)
    result["compile_s"], result["temp_mib"] = compile_s, temp_mib
    result["device"] = _device_peak_mib(impl)
    return result


def _device_peak_mib(impl: str) -> float | None:
    """Accelerator memory high-water mark, MiB (None on CPU)."""
    if impl == "transformers":
        import torch
        return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    import jax
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return peak / 2**20 if peak else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--hidden", type=int, default=0, help="another hidden size (64-dim heads)")
    parser.add_argument("--layers", type=int, default=0, help="another number of layers")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--one", metavar="IMPL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args, args.one)))
        return

    shape = ["--batch", str(args.batch), "--length", str(args.length), "--dtype", args.dtype,
             "--repeats", str(args.repeats), "--hidden", str(args.hidden), "--layers",
             str(args.layers)]
    results = {impl: run_child(__file__, *shape, "--one", impl) for impl in IMPLS}
    import jax
    import torch

    import lctx_jax as lx
    from lctx_jax import training
    tokens = args.batch * args.length
    flops = training.flops_per_token(lx.models.config_from_hf(model_config(args)), args.length)
    peak = training.peak_flops(0.0)
    print(f"{jax.devices()[0].device_kind} ({cpu_model()}) | jax {jax.__version__} | torch "
          f"{torch.__version__} | model {model_config(args)['num_hidden_layers']} layers x "
          f"hidden {model_config(args)['hidden_size']}, batch {args.batch} x {args.length}, "
          f"{args.dtype}, median of {args.repeats} after one warm-up\n")
    print("| step | tokens/s | vs transformers | MFU | host peak MiB | device peak MiB "
          "| step temporaries MiB | compile s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    base = results["transformers"]["median_s"]
    for impl in IMPLS:
        r = results[impl]
        rate = tokens / r["median_s"]
        mfu = f"{100 * rate * flops / peak:.1f}%" if peak else "n/a"
        device = f"{r['device']:.0f}" if r["device"] else "n/a"
        compile_s = f"{r['compile_s']:.1f}" if r["compile_s"] else "-"
        temp = f"{r['temp_mib']:.1f}" if r["temp_mib"] else "-"
        print(f"| {impl} | {rate:.0f} | {base / r['median_s']:.2f}x | {mfu} "
              f"| {r['peak_mib']:.0f} | {device} | {temp} | {compile_s} |")
    save_run(args, results)


if __name__ == "__main__":
    main()
