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

`python eval.py --config X.py --compile_only=v5p-8` (`compile_eval`) does the same for eval.py's
perplexity forward: one batch of windows of each configured length, on the eval config's mesh
with its attention (e.g. ring over "sequence"), the architecture from the first setting's
checkpoint (or the published one its directory names).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
import re
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from lctx_jax import comparison, evaluation, lora as lora_lib, models, paths, sharding, training
from lctx_jax.checkpoint import abstract_params
from lctx_jax.model import Model
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
    "v5p-8" (4 chips: 2x2x1), "v5p-16" (8 chips: 2x2x2), "v5litepod-16" / "v6e-16" (16 chips:
    4x4)."""
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
    # Ascending, as GCP names them; a 3-D slice's unit dimension last (v5p-8 is 2x2x1: libtpu's
    # hosts hold 2x2x1 chips, and a layout they do not divide has no topology).
    dims = sorted(dims, key=lambda d: (d == 1 and not lite, d))
    return f"{_TOPOLOGY_KIND[generation]}:{'x'.join(map(str, dims))}"


def topology_devices(name: str) -> list[Any]:
    """The compile-only devices of a TPU topology (needs libtpu)."""
    from jax.experimental import topologies
    try:
        return list(topologies.get_topology_desc(topology_name(name), "tpu").devices)
    except (RuntimeError, ValueError) as err:
        fix = ("another process holds libtpu's lock (/tmp/libtpu_lockfile; any jax process "
               "takes it): run with ALLOW_MULTIPLE_LIBTPU_LOAD=1 in the environment"
               if "lockfile" in str(err) else "install libtpu with `pip install -e '.[tpu]'`")
        raise ConfigError(f"--compile_only={name!r}: no compile-only TPU topology ({err}); "
                          f"{fix}") from err


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
class Report:
    """One compiled unit (a training stage, an evaluated length): it fits when its `peak`, the
    largest of its programs' peaks per chip, is within `hbm`."""
    name: str
    mesh: dict[str, int]
    hbm: int
    largest: list[str]  # XLA's largest buffers of a program that does not fit

    @property
    def fits(self) -> bool:
        return self.peak <= self.hbm


@dataclasses.dataclass(frozen=True)
class StageReport(Report):
    train: Footprint
    eval: Footprint | None

    @property
    def peak(self) -> int:
        return max(self.train.peak, self.eval.peak if self.eval else 0)


@dataclasses.dataclass(frozen=True)
class WindowReport(Report):
    """eval.py's perplexity forward of one batch of windows of `name` tokens."""
    forward: Footprint
    seconds: float  # lowering and compiling

    @property
    def peak(self) -> int:
        return self.forward.peak


def compile_only(config: ml_collections.ConfigDict, topology: str) -> list[StageReport]:
    """Compiles every stage's train (and eval) step for `topology`; prints a report per stage
    and a last line that starts with "fit:" or "does not fit:"."""
    config = _without_missing_rope_files(config)
    devices, hbm = _target(topology)
    validate(config, published=True)
    base_hf = base_hf_config(config, published=True)
    mesh = training.config_mesh(config, devices)
    _print_target(topology, devices, hbm, mesh)
    reports = []
    for index, stage in enumerate(config.stages):
        report = _compile_stage(config, index, base_hf, mesh, hbm)
        reports.append(report)
        print(_describe(stage, report), flush=True)
    _conclude(reports, topology, len(devices), "stage")
    return reports


def compile_eval(config: ml_collections.ConfigDict, topology: str) -> list[WindowReport]:
    """`eval.py --compile_only`: compiles the perplexity forward eval.py runs per batch
    (`evaluation.window_nll`: config.perplexity.batch_size windows, the LM head in chunks) for
    each of config.lengths on `topology`, with config.mesh and config.attention
    (`comparison.eval_mesh`, `comparison.with_attention`); prints a report per length and a last
    line that starts with "fit:" or "does not fit:". No weights, tokenizer or data are read:
    the architecture is the first setting's checkpoint's config.json, or the published one its
    directory names (`lctx_jax.architectures`), with the checkpoint's RoPE (every method costs
    the same memory) and parameters in their stored dtype."""
    devices, hbm = _target(topology)
    comparison.validate(config, published=True)
    # One chip has no mesh (config_mesh): a mesh of it, so the program is compiled for it.
    mesh = comparison.eval_mesh(config, devices) or sharding.make_mesh(devices=devices[:1])
    directory = comparison.first_checkpoint(config)
    hf = base_hf_config(ml_collections.ConfigDict(dict(  # read as train.py's init_from
        init_from=str(directory), model={}, hf_overrides={})), published=True)
    stored = hf.get("dtype") or hf.get("torch_dtype")
    if (directory / "params").is_dir():  # an lctx_jax checkpoint records its own
        stored = paths.read_json(directory / "config.json")["lctx_jax"]["param_dtype"]
    model_config = models.config_from_hf(hf)
    params = abstract_params(model_config, jnp.dtype(
        config.dtype if stored in (None, "auto") else stored), mesh)
    model = comparison.with_attention(config, Model(model_config, params,
                                                    dtype=jnp.dtype(config.dtype), mesh=mesh))
    forward = jax.jit(functools.partial(evaluation.window_nll, model.spec))
    _print_target(topology, devices, hbm, mesh)
    print(f"{directory.name}: {model_config.num_layers} layers, parameters "
          f"{_per_chip_bytes(params) / GIB:.2f} GiB per chip; attention {model.attention}, "
          f"the checkpoint's RoPE (memory does not depend on the RoPE method)", flush=True)
    reports = []
    for length in config.lengths:
        windows = _abstract_windows(config.perplexity.batch_size, length)
        start = time.perf_counter()
        with jax.default_device(mesh.devices.flat[0]):  # as _compile_stage lowers
            lowered = forward.lower(params, *windows)
        footprint, largest = _measure(lowered, _per_chip_bytes((params, windows)), hbm)
        reports.append(WindowReport(str(length), dict(mesh.shape), hbm, largest, footprint,
                                    time.perf_counter() - start))
        print("\n".join([f"length {length} (batch {config.perplexity.batch_size}): "
                         + ("fits" if reports[-1].fits else "DOES NOT FIT")
                         + f", compiled in {reports[-1].seconds:.0f} s",
                         _footprint_line("perplexity forward", footprint, hbm),
                         *_largest_lines(largest)]), flush=True)
    _conclude(reports, topology, len(devices), "length")
    return reports


def _target(topology: str) -> tuple[list[Any], int]:
    """The compile-only devices of `topology` and the HBM of each (bytes)."""
    devices = topology_devices(topology)
    hbm = int(HBM_GIB.get(devices[0].device_kind, 0) * GIB)
    if not hbm:
        raise ConfigError(f"--compile_only={topology!r}: unknown HBM for {devices[0].device_kind}")
    return devices, hbm


def _print_target(topology: str, devices: list[Any], hbm: int, mesh: Any) -> None:
    hosts = len({d.process_index for d in devices})
    print(f"{topology}: {len(devices)} chips ({devices[0].device_kind}, "
          f"{hbm / GIB:.1f} GiB HBM each), {hosts} hosts; mesh "
          + ", ".join(f"{a}={n}" for a, n in mesh.shape.items()), flush=True)


def _conclude(reports: list[Report], topology: str, chips: int, unit: str) -> None:
    """The last line: "fit: all ..." or "does not fit: {unit}s [...] exceed HBM; ..."."""
    worst = max(reports, key=lambda r: r.peak / r.hbm)
    summary = (f"{len(reports)} {unit}(s) on {topology} ({chips} chips): largest peak "
               f"{worst.peak / GIB:.1f} GiB of {worst.hbm / GIB:.1f} GiB per chip "
               f"({unit} {worst.name})")
    if all(r.fits for r in reports):
        print(f"fit: all {summary}", flush=True)
    else:
        failed = [r.name for r in reports if not r.fits]
        print(f"does not fit: {unit}s {failed} exceed HBM; {summary}", flush=True)


def _without_missing_rope_files(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config` in which a stage whose rope_scaling names a JSON file that does not
    exist yet (LongRoPE factors a search will write) keeps the base model's RoPE: every RoPE
    method costs the same memory (one rotation per position), so the sizing is unchanged."""
    config = ml_collections.ConfigDict(plain(config))
    config.stages = [ml_collections.ConfigDict(stage) for stage in config.stages]
    for index, stage in enumerate(config.stages):
        if isinstance(stage.rope_scaling, str) and not paths.as_path(
                stage.rope_scaling).is_file():
            print(f"note: config.stages[{index}].rope_scaling {stage.rope_scaling!r} does not "
                  "exist yet; sized with the base model's RoPE (memory does not depend on the "
                  "RoPE method)", flush=True)
            stage.rope_scaling = None
    return config


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
    training.host_part(plan.batch_sharding, batch["input_ids"].shape, 0)  # hosts can feed it
    # Lowered with the target chip as default device: Pallas' Mosaic lowering reads the TPU
    # generation from it (e.g. for integer division in a chunked mask).
    with jax.default_device(mesh.devices.flat[0]):
        lowered = plan.step.train.lower(state, frozen, batch)
    train, largest = _measure(lowered, _per_chip_bytes((state, frozen, batch)), hbm)
    evaluated = None
    if config.eval_batches:
        eval_batch = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=_drop_first(
                x.sharding)), _abstract_batch(stage, 1, plan.batch_sharding))
        with jax.default_device(mesh.devices.flat[0]):
            lowered = plan.step.eval.lower(state, frozen, eval_batch)
        evaluated, eval_largest = _measure(lowered, _per_chip_bytes((state, frozen, eval_batch)),
                                           hbm)
        if not largest:
            largest = eval_largest
    return StageReport(stage.name, dict(mesh.shape), hbm, largest, train, evaluated)


def _measure(lowered: Any, argument_bytes: int, hbm: int) -> tuple[Footprint, list[str]]:
    """(footprint, largest buffers) of a lowered step. A program that does not fit is compiled
    once more with an XLA dump, whose memory-usage report (XLA's buffer assignment) names its
    largest buffers. When XLA itself stops because the temporaries exceed HBM, the footprint
    takes the temporaries from that report and the arguments from the inputs' shardings."""
    footprint = None
    try:
        footprint = Footprint.of(lowered.compile())
        if footprint.peak <= hbm:
            return footprint, []
    except jax.errors.JaxRuntimeError as err:
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise
    with tempfile.TemporaryDirectory() as dump:
        try:
            lowered.compile({"xla_dump_to": dump})
        except jax.errors.JaxRuntimeError:
            pass  # the dump is written before XLA gives up
        reports = sorted(pathlib.Path(dump).glob("*memory-usage-report.txt"))
        text = reports[-1].read_text() if reports else ""
    total = re.search(r"Total bytes: (\d+)", text)
    if footprint is None:
        footprint = Footprint(argument_bytes, 0, 0, int(total.group(1)) if total else 0, 0)
    rows = re.findall(r"^\s*[\d.]+\w+\(\s*\d+%\);\s*([\d.]+\w+);\s*\d+;\s*\d+;\s*(.*)$",
                      text, flags=re.MULTILINE)
    return footprint, [f"{size}: {shapes[:160]}" for size, shapes in rows[:5]]


def _per_chip_bytes(tree: Any) -> int:
    """Bytes one chip holds of a tree of ShapeDtypeStructs with shardings."""
    def leaf(x: jax.ShapeDtypeStruct) -> int:
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        return math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return sum(leaf(x) for x in jax.tree.leaves(tree))


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


def _abstract_windows(rows: int, length: int) -> tuple[jax.ShapeDtypeStruct, ...]:
    """One batch of `evaluation.window_nll`: ids [rows, length + 1], positions and segments
    [rows, length] int32, score [rows, length] f32. Unplaced, as eval.py passes host arrays:
    the compiler places them."""
    return (jax.ShapeDtypeStruct((rows, length + 1), jnp.int32),
            *(jax.ShapeDtypeStruct((rows, length), dtype)
              for dtype in (jnp.int32, jnp.int32, jnp.float32)))


def _footprint_line(what: str, fp: Footprint, hbm: int) -> str:
    return (f"  {what}: arguments {fp.arguments / GIB:.2f} GiB, temporaries "
            f"{fp.temporaries / GIB:.2f} GiB, peak {fp.peak / GIB:.2f} GiB per chip "
            f"({100 * fp.peak / hbm:.0f}% of HBM)")


def _largest_lines(largest: list[str]) -> list[str]:
    if not largest:
        return []
    return ["  largest buffers (XLA's buffer assignment, per chip):",
            *(f"    {item}" for item in largest)]


def _describe(stage: ml_collections.ConfigDict, report: StageReport) -> str:
    s = plain(stage)
    lines = [f"stage {s['name']}: seq_len {s['seq_len']}, batch {s['batch_size']} "
             f"(grad_accum {s['grad_accum']}), attention {s['attention']}: "
             + ("fits" if report.fits else "DOES NOT FIT"),
             _footprint_line("train step", report.train, report.hbm)]
    if report.eval is not None:
        lines.append(_footprint_line("eval step", report.eval, report.hbm))
    return "\n".join(lines + _largest_lines(report.largest))
