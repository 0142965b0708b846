"""Ahead-of-time sizing for TPU slices: `python train.py --config X.py --compile_only=v5p:2x2x2`.

XLA's real TPU compiler (libtpu, `pip install lctx_jax[tpu]`) runs on any machine against a
compile-only topology (`jax.experimental.topologies`). For every stage of a recipe this builds
the mesh the run would build on that slice's chips, the stage's real train step (the one
train.py runs: `training.plan_stage`, with the recipe's batch, grad_accum, remat, dtypes,
LoRA, attention and RoPE scaling) and the end-of-stage eval step, compiles both from shapes
alone, and reads each compiled program's per-chip memory (`compiled.memory_analysis()`):

    arguments     what the step is called with: train state (params, optimizer), frozen
                  weights, one batch
    temporaries   XLA's scratch while the step runs (activations, remat, gradients, collectives)
    peak          arguments + outputs − donated (aliased) bytes + temporaries + code

A stage fits when the peak of both programs is within the chip's HBM. No weights, tokenizer or
data are read: the architecture comes from init_from's config.json when it exists, else from the
published checkpoint the recipe names (`lctx_jax.architectures`), so it runs on a laptop before
anything is downloaded. MaxText's train_compile.py does this for one config; here every stage of
a progressive recipe is compiled in one call, and a stage that does not fit names its largest
buffers.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from lctx_jax import lora as lora_lib, sharding, training
from lctx_jax.checkpoint import abstract_params
from lctx_jax.train_config import ConfigError, base_hf_config, plain, validate

GIB = 2**30
# HBM per chip (GiB) by jax device_kind of a compile-only TPU device.
HBM_GIB = {"TPU v5": 95.0, "TPU v5p": 95.0, "TPU v5 lite": 16.0, "TPU v5e": 16.0,
           "TPU v6 lite": 32.0, "TPU v6e": 32.0, "TPU v4": 32.0}
# Slice names "<generation>-<N>": N counts TensorCores (2 per chip) on v4 / v5p, chips on
# v5e / v6e; the chips form these standard topologies (2-D on the lite chips).
_CORES_PER_NAME = {"v4": 2, "v5p": 2, "v5litepod": 1, "v5e": 1, "v6e": 1}
_TOPOLOGY_KIND = {"v4": "v4", "v5p": "v5p", "v5litepod": "v5e", "v5e": "v5e", "v6e": "v6e"}


def topology_name(name: str) -> str:
    """A topology as `get_topology_desc` takes it: "v5p:2x2x2" as is, or a slice name such as
    "v5p-16" (8 chips: 2x2x2), "v5litepod-16" / "v6e-16" (16 chips: 4x4)."""
    if ":" in name:
        return name
    match = re.fullmatch(r"(v4|v5p|v5litepod|v5e|v6e)-(\d+)", name)
    if not match:
        raise ConfigError(f"--compile_only={name!r}: give a topology like 'v5p:2x2x2' or a "
                          "slice name like 'v5p-16' (v4, v5p: TensorCores; v5e, v6e: chips)")
    generation, count = match.group(1), int(match.group(2))
    chips = count // _CORES_PER_NAME[generation]
    lite = _CORES_PER_NAME[generation] == 1
    dims = [1, 1] if lite else [2, 2, 1]
    while dims[0] * dims[1] * (1 if lite else dims[2]) < chips:
        smallest = min(range(len(dims)), key=lambda i: (dims[i], -i))
        dims[smallest] *= 2
    if (dims[0] * dims[1] * (1 if lite else dims[2]) != chips
            or chips * _CORES_PER_NAME[generation] != count):
        raise ConfigError(f"--compile_only={name!r}: {count} is not a {generation} slice size "
                          "(a power of two)")
    return f"{_TOPOLOGY_KIND[generation]}:{'x'.join(map(str, sorted(dims)))}"


def topology_devices(name: str) -> list[Any]:
    """The compile-only devices of a TPU topology (needs libtpu)."""
    from jax.experimental import topologies
    try:
        return list(topologies.get_topology_desc(topology_name(name), "tpu").devices)
    except (RuntimeError, ValueError) as err:
        raise ConfigError(f"--compile_only={name!r}: no compile-only TPU topology ({err}); "
                          "install libtpu with `pip install -e '.[tpu]'`") from err


@dataclasses.dataclass(frozen=True)
class Footprint:
    """Per-chip bytes of one compiled program."""
    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    code: int

    @property
    def peak(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.code

    @classmethod
    def of(cls, compiled: Any) -> "Footprint":
        m = compiled.memory_analysis()
        return cls(m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes,
                   m.temp_size_in_bytes, m.generated_code_size_in_bytes)


@dataclasses.dataclass(frozen=True)
class StageReport:
    name: str
    train: Footprint
    eval: Footprint | None
    hbm: int
    largest: list[str]  # the program's largest arrays, when it does not fit

    @property
    def peak(self) -> int:
        return max(self.train.peak, self.eval.peak if self.eval else 0)

    @property
    def fits(self) -> bool:
        return self.peak <= self.hbm


def compile_only(config: ml_collections.ConfigDict, topology: str) -> list[StageReport]:
    """Compiles every stage's train (and eval) step for `topology`; prints a report per stage
    and a last line that starts with "fit:" or "does not fit:"."""
    jax.config.update("jax_platforms", "cpu")  # no local accelerator is needed or wanted
    devices = topology_devices(topology)
    hosts = len({d.process_index for d in devices})
    validate(config, hosts, published=True)
    hbm = int(HBM_GIB.get(devices[0].device_kind, 0) * GIB)
    if not hbm:
        raise ConfigError(f"--compile_only={topology!r}: unknown HBM for {devices[0].device_kind}")
    base_hf = base_hf_config(config, published=True)
    mesh = _mesh(config, devices)
    print(f"{topology}: {len(devices)} chips ({devices[0].device_kind}, "
          f"{hbm / GIB:.1f} GiB HBM each), {hosts} hosts; mesh "
          + ", ".join(f"{a}={n}" for a, n in mesh.shape.items()), flush=True)
    reports = []
    for index, stage in enumerate(config.stages):
        report = _compile_stage(config, index, base_hf, mesh, hbm)
        reports.append(report)
        print(_describe(stage, report), flush=True)
    worst = max(reports, key=lambda r: r.peak / r.hbm)
    summary = (f"{len(reports)} stage(s) on {topology} ({len(devices)} chips): largest peak "
               f"{worst.peak / GIB:.1f} GiB of {hbm / GIB:.1f} GiB per chip "
               f"(stage {worst.name})")
    if all(r.fits for r in reports):
        print(f"fit: all {summary}", flush=True)
    else:
        failed = [r.name for r in reports if not r.fits]
        print(f"does not fit: stages {failed} exceed HBM; {summary}", flush=True)
    return reports


def _mesh(config: ml_collections.ConfigDict, devices: list[Any]) -> Any:
    m = config.mesh
    if m.num_devices:
        devices = devices[:m.num_devices]
    try:
        return sharding.make_mesh(m.data, m.fsdp, m.tensor, m.sequence, devices=devices)
    except ValueError as err:
        raise ConfigError(f"config.mesh: {err}") from err


def _compile_stage(config: ml_collections.ConfigDict, index: int, base_hf: dict, mesh: Any,
                   hbm: int) -> StageReport:
    stage = config.stages[index]
    model_config = training.stage_model_config(config, index, base_hf)
    params = abstract_params(model_config, jnp.dtype(config.param_dtype), mesh)
    plan = training.plan_stage(config, index, model_config, params, mesh)
    trainable, frozen = lora_lib.split(params, plan.mask)
    lora = {} if plan.lora is None else jax.eval_shape(
        lambda: lora_lib.init(params, plan.lora, jax.random.key(0)))
    state = jax.eval_shape(plan.step.init_state, trainable, lora)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         state, plan.state_shardings)
    batch = _abstract_batch(stage, stage.grad_accum, plan.batch_sharding)
    train = plan.step.train.lower(state, frozen, batch).compile()
    evaluated = None
    if config.eval_batches:
        eval_batch = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=_drop_first(
                x.sharding)), _abstract_batch(stage, 1, plan.batch_sharding))
        evaluated = plan.step.eval.lower(state, frozen, eval_batch).compile()
    train_fp = Footprint.of(train)
    eval_fp = Footprint.of(evaluated) if evaluated is not None else None
    report = StageReport(stage.name, train_fp, eval_fp, hbm, [])
    if not report.fits:
        worst = train if eval_fp is None or train_fp.peak >= eval_fp.peak else evaluated
        report = dataclasses.replace(report, largest=largest_buffers(worst.as_text()))
    return report


def _abstract_batch(stage: ml_collections.ConfigDict, accum: int, batch_sharding: Any
                    ) -> dict[str, jax.ShapeDtypeStruct]:
    shape = (accum, stage.batch_size // stage.grad_accum, stage.seq_len)
    dtypes = {"input_ids": jnp.int32, "targets": jnp.int32, "positions": jnp.int32,
              "segment_ids": jnp.int32, "loss_mask": jnp.float32}
    return {key: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
            for key, dtype in dtypes.items()}


def _drop_first(named: jax.sharding.NamedSharding) -> jax.sharding.NamedSharding:
    """[A, B, T] batch sharding -> its [B, T] sharding (the micro-batch axis is never split)."""
    return jax.sharding.NamedSharding(named.mesh, jax.sharding.PartitionSpec(*named.spec[1:]))


_HLO_ARRAY = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\w+)\[([\d,]*)\]")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
          "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}


def largest_buffers(hlo_text: str, count: int = 5) -> list[str]:
    """The `count` largest arrays an optimized (per-chip) HLO program produces, as
    "12.0 GiB bf16[...] <op name>" lines: where to look when a step does not fit. (Arrays, not
    XLA's final buffer assignment: two of them may share memory.)"""
    found = []
    for line in hlo_text.splitlines():
        match = _HLO_ARRAY.match(line)
        if not match or match.group(2) not in _BYTES:
            continue
        dims = [int(d) for d in match.group(3).split(",") if d]
        size = _BYTES[match.group(2)]
        for d in dims:
            size *= d
        op = _OP_NAME.search(line)
        found.append((size, f"{match.group(2)}[{match.group(3)}]",
                      op.group(1) if op else match.group(1)))
    found.sort(key=lambda item: -item[0])
    out, seen = [], set()
    for size, shape, name in found:
        if (shape, name) not in seen:
            seen.add((shape, name))
            out.append(f"{size / GIB:.2f} GiB {shape} {name}")
        if len(out) == count:
            break
    return out


def _describe(stage: ml_collections.ConfigDict, report: StageReport) -> str:
    def line(what: str, fp: Footprint) -> str:
        return (f"  {what}: arguments {fp.arguments / GIB:.2f} GiB, temporaries "
                f"{fp.temporaries / GIB:.2f} GiB, peak {fp.peak / GIB:.2f} GiB per chip "
                f"({100 * fp.peak / report.hbm:.0f}% of HBM)")

    s = plain(stage)
    lines = [f"stage {s['name']}: seq_len {s['seq_len']}, batch {s['batch_size']} "
             f"(grad_accum {s['grad_accum']}), attention {s['attention']}: "
             + ("fits" if report.fits else "DOES NOT FIT"), line("train step", report.train)]
    if report.eval is not None:
        lines.append(line("eval step", report.eval))
    if report.largest:
        lines.append("  largest arrays of the program:")
        lines += [f"    {item}" for item in report.largest]
    return "\n".join(lines)
