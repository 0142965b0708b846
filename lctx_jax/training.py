"""Training for context extension: the jitted step, the loop over progressive stages, and
checkpoints that survive `kill -9`.

    run(config)            # what `python train.py --config configs/X.py` does

Per stage (`lctx_jax.train_config.stage`): the model starts from the previous stage's weights
(the first from `init_from`, or a fresh init), takes the stage's RoPE scaling and attention,
and trains on packed sequences of `seq_len` tokens (`lctx_jax.data.PackedBatches`; each host
reads the rows its devices hold). How a stage trains is planned from parameter shapes alone
(`plan_stage`), which `--compile_only` (`lctx_jax.aot`) shares. The step is one jit:
next-token cross-entropy averaged over the global batch's scored tokens with the LM head in
chunks (`lctx_jax.losses`), gradient accumulation as a `lax.scan` over micro-batches,
gradients only for the trainable weights (LoRA+ adapters inside the layers, or everything),
AdamW with warmup and constant / linear / cosine decay, global-norm clipping; the state is
donated. The loop never waits on the device except every `log_every` steps and before each
checkpoint, when it reads the losses accumulated since the last read.

Non-finite values (config.nonfinite): with "stop" (the default), a NaN / inf loss or gradient
norm found at such a read raises `TrainingDiverged` naming the stage and the first non-finite
step, before the next checkpoint is saved; so is a train state that holds NaN / inf at a
checkpoint (checked before saving it). No checkpoint, models/<stage> or hf/ export of such a
state is written: the last finite checkpoint stays the latest (train.py: one line on stderr,
exit status 1). With "skip", the step itself selects the old state when its loss or gradient
norm is non-finite (in the jit, no host sync): the weights, optimizer moments and schedule
position stay as they were, the batch is consumed, and metrics.jsonl marks the step
"skipped": 1; the stage's summary line counts them.

Inputs are checked before the run directory is claimed: the config, the mesh, the tokenizer
and the data (the training split, and the eval split when eval_batches > 0, opened once and
used for the run), so a bad one fails without writing anything.

run_dir layout:
    config.json           the resolved config: a resumed run must match it, unless the earlier
                          run wrote no checkpoint and no models/<stage> (e.g. it failed at
                          once), when the new config replaces it
    checkpoints/<step>/   Orbax CheckpointManager (every `checkpoint_every` steps and at each
                          stage's end, the last `keep_checkpoints` kept): train state + the data
                          iterator position + stage and step + the state's checksums
                          (`lctx_jax.checksums`, verified on resume unless
                          config.verify_checkpoints is False), committed by Orbax (temporary
                          directory renamed locally, commit marker on GCS) with every process
                          writing its shards, so a kill at any moment, mid-save too, leaves the
                          previous checkpoint intact; a rerun of the same command resumes from it
                          and reproduces the uninterrupted run exactly.
    models/<stage>/       each finished stage's weights (LoRA merged) as an lctx_jax checkpoint
                          (`lctx_jax.load`), the next stage's starting point
    hf/<stage>/           the last stage exported for transformers (`export_hf`), with the
                          tokenizer
    metrics.jsonl         one line per step: loss, grad_norm, lr (and skipped, with
                          nonfinite="skip"); per stage end: eval loss
                          (process 0, rewritten whole at each log: object stores cannot append)
    tensorboard/          the same as tensorboard scalars
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from lctx_jax import (checkpoint, checksums, convert, data, evaluation, losses, lora as lora_lib,
                      models, paths, retrieval, sharding, train_config)
from lctx_jax.attention import infini
from lctx_jax.model import Model, ModelSpec
from lctx_jax.train_config import (ConfigError, InputNotFound, TrainingDiverged,
                                   base_hf_config, fingerprint, lora_config, plain,
                                   rope_scaling_dict, tokenizer_path, validate)

# Dense bf16 peak per chip, TFLOP/s (vendor figures), matched against jax's device_kind.
PEAK_TFLOPS = {"TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0,
               "TPU v5": 459.0, "TPU v6 lite": 918.0, "TPU v6e": 918.0, "H100": 989.0,
               "H200": 989.0, "A100": 312.0}


# ----------------------------------------------------------------------------- math


def learning_rate(peak: float, steps: int, warmup_steps: int, schedule: str,
                  min_ratio: float = 0.0) -> optax.Schedule:
    """Linear warmup from 0 to `peak` over warmup_steps, then constant, or linear / cosine
    decay to min_ratio·peak at `steps`."""
    decay_steps = max(steps - warmup_steps, 1)
    if schedule == "constant":
        after = optax.constant_schedule(peak)
    elif schedule == "linear":
        after = optax.linear_schedule(peak, peak * min_ratio, decay_steps)
    else:
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=min_ratio)
    if not warmup_steps:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup_steps), after],
                                [warmup_steps])


DECAYED_LEAVES = ("kernel", "embedding")  # weight decay applies to leaves of these names


def decay_mask(tree: Any) -> Any:
    """True for the leaves weight decay applies to: projection kernels and embeddings, by the
    leaf's name (norm scales, biases and LoRA adapters are not decayed, whatever their rank:
    under nn.scan a norm scale is [layers, hidden])."""
    def decayed(path: tuple, _: Any) -> bool:
        last = path[-1]
        return getattr(last, "key", getattr(last, "name", None)) in DECAYED_LEAVES
    return jax.tree_util.tree_map_with_path(decayed, tree)


def gate_labels(tree: Any) -> Any:
    """"gate" for Infini-attention's gate logits (by leaf name), "other" elsewhere."""
    def label(path: tuple, _: Any) -> str:
        last = path[-1]
        return "gate" if getattr(last, "key", None) == infini.GATE else "other"
    return jax.tree_util.tree_map_with_path(label, tree)


def optimizer(opt: ml_collections.ConfigDict, schedule: optax.Schedule,
              gate_schedule: optax.Schedule | None = None) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW; weight decay on kernels and embeddings only
    (`decay_mask`). gate_schedule: Infini-attention's gates get their own AdamW at this
    learning rate with weight decay opt.gate_weight_decay (`gate_labels`): at the model's lr
    a gate started at 0 barely moves (the pitfall REFERENCES.md records)."""
    adamw = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                        weight_decay=opt.weight_decay, mask=decay_mask)
    if gate_schedule is not None:
        gates = optax.adamw(gate_schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                            weight_decay=opt.gate_weight_decay)
        adamw = optax.multi_transform({"gate": gates, "other": adamw}, gate_labels)
    if not opt.grad_clip:
        return adamw
    return optax.chain(optax.clip_by_global_norm(opt.grad_clip), adamw)


def flops_per_token(config: Any, seq_len: int) -> float:
    """Training FLOPs per token of the config's family (`Family.flops_per_token`)."""
    return models.family_of(config).flops_per_token(config, seq_len)


def peak_flops(override_tflops: float) -> float | None:
    """Peak FLOP/s of all devices (bf16 dense), or None when the device kind is unknown."""
    if override_tflops:
        return override_tflops * 1e12 * jax.device_count()
    kind = jax.devices()[0].device_kind
    for name, tflops in PEAK_TFLOPS.items():
        if name in kind:
            return tflops * 1e12 * jax.device_count()
    return None


# ----------------------------------------------------------------------------- step


@dataclasses.dataclass(frozen=True)
class Step:
    """The compiled functions of one stage. state = {"step", "trainable", "lora", "opt_state"};
    frozen: the weights not trained (not donated, never updated)."""

    train: Callable[[Any, Any, Any], tuple[Any, dict]]
    eval: Callable[[Any, Any, Any], tuple[jax.Array, jax.Array]]
    init_state: Callable[[Any, Any], Any]


def make_step(model: ModelSpec, eval_model: ModelSpec, tx: optax.GradientTransformation,
              schedule: optax.Schedule, state_shardings: Any = None,
              nonfinite: str = "stop") -> Step:
    """batch: dict of [A, B/A, T] arrays (A micro-batches): input_ids, targets, positions,
    segment_ids, loss_mask. The loss is the mean over every scored token of all A micro-batches
    (sums accumulated, divided once), so A only trades memory for time. With `model.lora`, the
    state's "lora" adapters are applied inside the layers (`ModelSpec.apply(..., adapters=)`).
    nonfinite="skip": a step whose loss or gradient norm is NaN / inf returns the state it was
    given (step counter included) and metrics["skipped"] = 1 (else 0); "stop": the update is
    applied whatever it is (the loop checks the metrics)."""

    def batch_nll(model: ModelSpec, weights: tuple, frozen: Any, batch: dict
                  ) -> tuple[jax.Array, jax.Array]:
        """(summed nll, scored tokens): LoRA adapters applied inside the layers, the LM head
        in chunks (`lctx_jax.losses`)."""
        trainable, lora_params = weights
        params = lora_lib.combine(trainable, frozen)
        hidden = model.hidden(params, batch["input_ids"], batch["positions"],
                              batch["segment_ids"],
                              adapters=lora_params if model.lora is not None else None)
        return losses.nll_sum(hidden, model.head(params), batch["targets"],
                              batch["loss_mask"], model.dtype)

    grad_fn = jax.value_and_grad(functools.partial(batch_nll, model), argnums=0, has_aux=True)

    def train(state: dict, frozen: Any, batch: dict) -> tuple[dict, dict]:
        weights = (state["trainable"], state["lora"])

        def accumulate(carry: tuple, micro: dict) -> tuple[tuple, None]:
            grads, nll, count = carry
            (micro_sum, micro_count), micro_grads = grad_fn(weights, frozen, micro)
            return (jax.tree.map(jnp.add, grads, micro_grads), nll + micro_sum,
                    count + micro_count), None

        zeros = jax.tree.map(jnp.zeros_like, weights)
        (grads, nll, count), _ = jax.lax.scan(accumulate, (zeros, 0.0, 0.0), batch)
        count = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        updates, opt_state = tx.update(grads, state["opt_state"], weights)
        trainable, lora_params = optax.apply_updates(weights, updates)
        metrics = {"loss": nll / count, "grad_norm": optax.tree.norm(grads),
                   "lr": schedule(state["step"])}
        new = {"step": state["step"] + 1, "trainable": trainable, "lora": lora_params,
               "opt_state": opt_state}
        if nonfinite == "skip":  # a select in the jit: no host sync, the state stays donated
            ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
            new = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, state)
            metrics["skipped"] = jnp.logical_not(ok).astype(jnp.int32)
        return new, metrics

    def evaluate(state: dict, frozen: Any, batch: dict) -> tuple[jax.Array, jax.Array]:
        return batch_nll(eval_model, (state["trainable"], state["lora"]), frozen, batch)

    def init_state(trainable: Any, lora_params: Any) -> dict:
        return {"step": jnp.zeros((), jnp.int32), "trainable": trainable, "lora": lora_params,
                "opt_state": tx.init((trainable, lora_params))}

    out = (state_shardings, None) if state_shardings is not None else None
    return Step(train=jax.jit(train, donate_argnums=(0,), out_shardings=out),
                eval=jax.jit(evaluate),
                init_state=jax.jit(init_state, donate_argnums=(0, 1),
                                   out_shardings=state_shardings))


# ----------------------------------------------------------------------------- run


@dataclasses.dataclass
class StageResult:
    name: str
    steps: int
    final_loss: float | None
    eval_loss: float | None
    tokens_per_s: float | None
    mfu: float | None
    seconds: float
    model_dir: str
    skipped: int | None = None  # steps skipped for a non-finite loss (nonfinite="skip")


def run(config: ml_collections.ConfigDict) -> list[StageResult]:
    """Trains every stage of `config` (resuming from run_dir if it holds checkpoints). Raises
    ConfigError for a bad config or input (before run_dir is claimed), TrainingDiverged when
    the loss goes non-finite under nonfinite="stop"."""
    validate(config)
    if config.distributed:
        try:
            jax.distributed.initialize(**_cluster_from_environment())
        except ValueError as err:  # no cluster detected or described
            raise ConfigError(f"config.distributed: {err}; on one machine set "
                              "--config.distributed=false") from err
        _say(f"jax.distributed: {jax.process_count()} processes, {jax.device_count()} devices "
             f"({jax.local_device_count()} per process)")
    run_dir = paths.as_path(config.run_dir)
    config_mesh(config)  # sizes the devices cannot hold fail here, before the claim
    remaining = [s for s in config.stages
                 if not checkpoint.is_complete(run_dir / "models" / s.name)]
    sources = _open_data(config) if remaining else {}
    tokenizer = _tokenizer(config, sources)
    base_hf = base_hf_config(config)
    if tokenizer.vocab_size > base_hf["vocab_size"]:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                          f"vocab_size is {base_hf['vocab_size']}; use a matching tokenizer")
    _check_stage_rows(config, tokenizer, sources.get(config.data.split))
    _claim_run_dir(run_dir, config)
    logger = _Logger(run_dir, config)
    manager = ocp.CheckpointManager(
        run_dir / "checkpoints",
        options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True,
                                             cleanup_tmp_directories=True),
        item_names=("state", "meta"))
    results = []
    try:
        offset = 0
        previous = None
        for index, stage in enumerate(config.stages):
            model_dir = run_dir / "models" / stage.name
            if checkpoint.is_complete(model_dir):
                _say(f"stage {stage.name}: done earlier, weights at {model_dir}")
            else:
                results.append(_train_stage(config, index, offset, previous, base_hf, tokenizer,
                                            sources, manager, logger, run_dir))
            previous = model_dir
            offset += stage.steps
        manager.wait_until_finished()
        if config.export_hf:
            _export_hf(config, previous, run_dir / "hf" / config.stages[-1].name)
    finally:
        manager.close()
        logger.close()
    _summary(results, run_dir, config)
    return results


def _cluster_from_environment() -> dict[str, int]:
    """num_processes / process_id for `jax.distributed.initialize` from JAX_NUM_PROCESSES and
    JAX_PROCESS_ID when set (with JAX's own JAX_COORDINATOR_ADDRESS: a cluster that JAX does
    not detect by itself, e.g. CPU processes); on TPU pods JAX detects everything."""
    out = {}
    for key, variable in (("num_processes", "JAX_NUM_PROCESSES"),
                          ("process_id", "JAX_PROCESS_ID")):
        if os.environ.get(variable):
            out[key] = int(os.environ[variable])
    return out


def _claim_run_dir(run_dir: epath.Path, config: ml_collections.ConfigDict) -> None:
    """Writes run_dir/config.json, or checks that a resumed run's config matches it. A run that
    wrote no checkpoint and no stage weights has nothing to resume: a new config replaces it."""
    saved = run_dir / "config.json"
    current = fingerprint(config)
    if saved.exists():
        try:
            before = paths.read_json(saved)["fingerprint"]
        except (ValueError, KeyError) as err:
            raise ConfigError(f"{saved} is damaged ({err}); it records the config of the run in "
                              f"{run_dir}: restore it, or choose a new config.run_dir") from None
        changed = sorted(key for key in current if before.get(key) != json.loads(
            json.dumps(current[key])) and (key in before or key != "corpus"))
        # (a run from before corpus fingerprints resumes: its documents were not recorded)
        if not changed:
            return
        if _wrote_something(run_dir):
            corpus = (f" (its corpus was {before['corpus']}, this one is {current['corpus']})"
                      if "corpus" in changed else "")
            raise ConfigError(
                f"{run_dir} holds a run with a different config (fields {changed} differ"
                f"{corpus}); resume with the same config, or choose a new config.run_dir")
        _say(f"{run_dir}: the run there wrote no checkpoint; this config (fields {changed} "
             "differ) replaces its config.json")
    if jax.process_index() == 0:
        paths.write_atomically(saved, json.dumps({"fingerprint": current,
                                                  "config": plain(config)}, indent=2))


def _wrote_something(run_dir: epath.Path) -> bool:
    """Whether run_dir holds a committed checkpoint step or a finished stage's weights."""
    steps = run_dir / "checkpoints"
    if steps.is_dir() and ocp.utils.checkpoint_steps(steps):
        return True
    models_dir = run_dir / "models"
    return models_dir.is_dir() and any(checkpoint.is_complete(p) for p in models_dir.iterdir())


def _tokenizer(config: ml_collections.ConfigDict, sources: dict[str, Sequence[str]]
               ) -> data.Tokenizer:
    """The tokenizer (trained on the training split and cached when config.tokenizer does not
    exist and tokenizer_vocab_size > 0); a missing or unreadable one, or one without BOS / EOS
    (`data.check_framing`), is a ConfigError naming the field."""
    path = tokenizer_path(config)
    field = "config.tokenizer" if config.tokenizer else "config.init_from (its tokenizer)"
    try:
        if path.exists() or not config.tokenizer_vocab_size:
            tokenizer = data.load_tokenizer(path)
        else:
            _say(f"training a {config.tokenizer_vocab_size}-token sentencepiece tokenizer on "
                 f"{config.data.dataset}/{config.data.split} -> {path}")
            tokenizer = data.cached_tokenizer(
                path, lambda: (sources or _open_data(config))[config.data.split],
                config.tokenizer_vocab_size)
        data.check_framing(tokenizer)
        return tokenizer
    except ConfigError:
        raise
    except FileNotFoundError as err:
        raise InputNotFound(f"{field}: {err}") from err
    except ValueError as err:
        raise ConfigError(f"{field}: {err}") from err


def _check_stage_rows(config: ml_collections.ConfigDict, tokenizer: data.Tokenizer,
                      documents: Sequence[str] | None) -> None:
    """ConfigError for a passkey stage whose rows cannot hold its prompt, or a stage with
    retrieval rows that cannot hold their needles, with this tokenizer, before any stage
    trains (documents: the training split, None when every stage is done)."""
    for i, s in enumerate(config.stages):
        mix = plain(s.get("retrieval"))
        if mix and documents is not None:
            try:
                retrieval.NeedleRows(documents, tokenizer, s.seq_len, 0,
                                     max_needles=mix.get("max_needles", 4))
            except ValueError as err:
                raise ConfigError(f"config.stages[{i}].retrieval (seq_len {s.seq_len}): "
                                  f"{err}") from err
        if s.task != "text":
            try:
                evaluation.PasskeyBatches(tokenizer, s.seq_len, 1, 0,
                                          style=s.task.split("-", 1)[1],
                                          shortest=s.min_doc_tokens)
            except ValueError as err:
                raise ConfigError(f"config.stages[{i}] (task {s.task!r}, seq_len {s.seq_len}, "
                                  f"min_doc_tokens {s.min_doc_tokens}): {err}") from err


def _open_data(config: ml_collections.ConfigDict) -> dict[str, Sequence[str]]:
    """{split: its documents} of the training split and, when eval_batches or summary_documents
    > 0, the eval split:
    opened here (nothing is read yet) so that a missing dataset, split or text_key is a
    ConfigError naming config.data before the run directory is claimed; the run then reads
    these same sources."""
    d = config.data
    held_out = config.eval_batches or config.summary_documents
    splits = dict.fromkeys([d.split] + ([d.eval_split] if held_out else []))
    out = {}
    for split in splits:
        where = (f"config.data (dataset={d.dataset!r}, split={split!r}, "
                 f"data_dir={d.data_dir!r})")
        try:
            documents = data.text_source(d.dataset, split, d.data_dir or None, d.text_key)
        except FileNotFoundError as err:
            raise InputNotFound(f"{where}: {err}") from err
        except (KeyError, ValueError) as err:  # text_key, split, unknown TFDS name
            message = str(err.args[0] if err.args else err).splitlines()[0]
            raise ConfigError(f"{where}: {message}") from err
        if not len(documents):
            raise ConfigError(f"{where}: the split holds no documents")
        out[split] = documents
    return out


def config_mesh(config: ml_collections.ConfigDict, devices: list[Any] | None = None) -> Any:
    """The mesh config.mesh describes over `devices` (default: every device; the first
    num_devices when set), or None when it holds a single device. Sizes the devices cannot
    hold (e.g. fsdp=3 on one device, or on 8) are a ConfigError naming the device count, never
    a silently smaller mesh."""
    m = config.mesh
    devices = list(jax.devices() if devices is None else devices)
    available, count = len(devices), m.num_devices
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise ConfigError(f"config.mesh.num_devices={count!r} must be an int >= 0 (0: all "
                          f"{available} devices)")
    if count > available:
        raise ConfigError(f"config.mesh.num_devices={count}, but there are only {available} "
                          "devices")
    if count:
        devices = devices[:count]
    try:
        mesh = sharding.make_mesh(m.data, m.fsdp, m.tensor, m.sequence, devices=devices)
    except ValueError as err:
        chosen = (f"the first {count} of the {available} devices" if count
                  else f"all {available} devices")
        raise ConfigError(f"config.mesh: {err} (config.mesh.num_devices={count}: {chosen}; "
                          "num_devices=N takes the first N)") from err
    return None if mesh.devices.size == 1 else mesh


def _start_model(config: ml_collections.ConfigDict, previous: epath.Path | None,
                 model_config: Any, mesh: Any) -> Model:
    """The stage's starting weights as a Model with the stage's config (RoPE scaling)."""
    param_dtype = jnp.dtype(config.param_dtype)
    if previous is not None:
        model = checkpoint.load(previous, mesh=mesh)
    elif not config.init_from:
        return Model.init(model_config, jax.random.key(config.seed), param_dtype=param_dtype,
                          mesh=mesh)
    elif (paths.as_path(config.init_from) / "params").is_dir():
        model = checkpoint.load(config.init_from, mesh=mesh)
    else:
        model = convert.from_hf(paths.as_path(config.init_from), mesh=mesh,  # hf_overrides
                                param_dtype=param_dtype, progress=True, config=model_config)
    params = jax.tree.map(lambda x: x.astype(param_dtype), model.params)
    spec = ModelSpec(model_config, mesh=mesh)  # new leaves (Infini gates) get their init
    return Model.of(spec, spec.complete_params(params, jax.random.key(config.seed)))


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """How one stage trains, built from parameter shapes alone (train.py's run and
    `--compile_only` share it): the model with the stage's RoPE scaling, attention, remat, mesh
    and LoRA (a ModelSpec: the weights live in the train state), the trainable mask,
    the optimizer, the compiled step functions and the shardings of their inputs."""

    model: ModelSpec
    eval_model: ModelSpec
    mask: Any
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    step: Step
    state_shardings: Any
    batch_sharding: Any

    @property
    def lora(self) -> lora_lib.LoraConfig | None:
        return self.model.lora


def stage_model_config(config: ml_collections.ConfigDict, index: int, base_hf: dict
                       ) -> Any:
    """The architecture with stage `index`'s RoPE scaling (and Infini-attention settings)."""
    scaling = rope_scaling_dict(config.stages[index].rope_scaling,
                                f"config.stages[{index}].rope_scaling")
    model_config = models.config_from_hf(base_hf, scaling)
    return train_config.with_infini(config, index, model_config)


def plan_stage(config: ml_collections.ConfigDict, index: int, model_config: Any,
               param_shapes: Any, mesh: Any) -> StagePlan:
    """The StagePlan of stage `index` for parameters of `param_shapes` (arrays or
    ShapeDtypeStructs) on `mesh` (None: one device)."""
    stage = config.stages[index]
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), param_shapes)
    lora = lora_config(config)
    model = ModelSpec(model_config, dtype=jnp.dtype(config.dtype), attention=stage.attention,
                      remat=config.remat, mesh=mesh, lora=lora,
                      attention_block_size=stage.get("attention_block_size"))
    eval_model = dataclasses.replace(model, attention="xla" if stage.attention == "s2"
                                     else stage.attention, remat="none")
    mask = lora_lib.trainable_mask(shapes, lora)
    schedule = learning_rate(stage.lr, stage.steps, stage.warmup_steps, stage.schedule,
                             config.optimizer.min_lr_ratio)
    gate_schedule = None
    if getattr(model_config, "infini", None) is not None:
        gate_schedule = learning_rate(config.optimizer.gate_lr, stage.steps, stage.warmup_steps,
                                      stage.schedule, config.optimizer.min_lr_ratio)
    tx = optimizer(config.optimizer, schedule, gate_schedule)
    state_shardings = None
    if mesh is not None:
        trainable, _ = lora_lib.split(shapes, mask)
        abstract = jax.eval_shape(lambda t, l: {"step": jnp.zeros((), jnp.int32),
                                                "trainable": t, "lora": l,
                                                "opt_state": tx.init((t, l))},
                                  trainable, _lora_shapes(shapes, lora))
        state_shardings = model.shardings_of(abstract)
    return StagePlan(model, eval_model, mask, tx, schedule,
                     make_step(model, eval_model, tx, schedule, state_shardings,
                               config.nonfinite),
                     state_shardings, _batch_sharding(mesh, stage))


def _lora_shapes(param_shapes: Any, lora: lora_lib.LoraConfig | None) -> Any:
    if lora is None:
        return {}
    return jax.eval_shape(lambda: lora_lib.init(param_shapes, lora, jax.random.key(0)))


def _train_stage(config: ml_collections.ConfigDict, index: int, offset: int,
                 previous: epath.Path | None, base_hf: dict, tokenizer: data.Tokenizer,
                 sources: dict[str, Sequence[str]], manager: ocp.CheckpointManager,
                 logger: "_Logger", run_dir: epath.Path) -> StageResult:
    stage = config.stages[index]
    started = time.perf_counter()
    mesh = config_mesh(config)
    model_config = stage_model_config(config, index, base_hf)
    shapes = checkpoint.abstract_params(model_config, jnp.dtype(config.param_dtype), mesh)
    plan = plan_stage(config, index, model_config, shapes, mesh)
    step_fns, lora = plan.step, plan.lora
    feed = _Feed(stage, stage.grad_accum, plan.batch_sharding, tokenizer,
                 sources[config.data.split], config.seed + index)  # before the weights
    batches = feed.batches
    start = _start_model(config, previous, model_config, mesh)
    trainable, frozen = lora_lib.split(start.params, plan.mask)
    del start
    lora_params = ({} if lora is None else
                   lora_lib.init(lora_lib.combine(trainable, frozen), lora,
                                 jax.random.key(config.seed + 1000 + index)))
    state = step_fns.init_state(trainable, lora_params)
    del trainable, lora_params

    done = 0
    latest = manager.latest_step()
    if latest is not None and latest > offset:
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                               sharding=x.sharding), state)
        step_dir = manager.directory / str(latest)
        fix = (f"delete {step_dir} to resume from the checkpoint before it (or from the "
               "stage's start if there is none)")
        try:
            restored = manager.restore(latest, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        except Exception as err:  # orbax raises many types for damaged files
            raise ConfigError(f"cannot restore the checkpoint {step_dir} ({err}); if it is "
                              f"damaged, {fix}") from err
        meta = restored["meta"]
        if meta["stage"] != stage.name:
            raise ConfigError(f"the latest checkpoint (step {latest}) belongs to stage "
                              f"{meta['stage']!r}, not {stage.name!r}; the stages changed")
        if config.verify_checkpoints and "checksums" in meta:  # absent: written before them
            try:
                checksums.verify(checksums.checksums(restored["state"]), meta["checksums"],
                                 f"the checkpoint "
                                 f"{step_dir}", advice=f"{fix}; config.verify_checkpoints="
                                 "False skips this check")
            except ValueError as err:
                raise ConfigError(str(err)) from err
        state, done = restored["state"], meta["step"]
        batches.set_state(feed.restored_state(meta["data"]))
        _say(f"stage {stage.name}: resumed at step {done}/{stage.steps} from checkpoint "
              f"{latest}")

    logger.truncate(offset + done)
    tokens_per_step = stage.batch_size * stage.seq_len
    peak = peak_flops(config.peak_tflops)
    flops = flops_per_token(model_config, stage.seq_len)
    progress = logger.progress(stage.name, stage.steps, done)
    pending: list[tuple[int, dict]] = []
    window_start, window_steps, last_loss, rate, mfu = time.perf_counter(), 0, None, None, None
    for step in range(done, stage.steps):
        batch = feed.next()
        state, metrics = step_fns.train(state, frozen, batch)
        pending.append((offset + step + 1, metrics))
        window_steps += 1
        progress.update(1)
        last = step + 1 == stage.steps
        saving = (step + 1) % config.checkpoint_every == 0 or last
        if (step + 1) % config.log_every == 0 or saving:  # a checkpoint's steps are checked
            fetched = jax.device_get([m for _, m in pending])
            rows = [(s, m) for (s, _), m in zip(pending, fetched)]
            elapsed = time.perf_counter() - window_start
            rate = window_steps * tokens_per_step / elapsed
            mfu = rate * flops / peak if peak else None
            bad = next((i for i, (_, m) in enumerate(rows) if not _finite_metrics(m)), None)
            if bad is not None and config.nonfinite == "stop":
                logger.steps(rows[:bad + 1], rate, mfu)  # up to the first non-finite step
                progress.close()
                raise _diverged(stage, offset, rows[bad], manager)
            kept = [float(m["loss"]) for _, m in rows if not m.get("skipped")]
            last_loss = sum(kept) / len(kept) if kept else None
            logger.steps(rows, rate, mfu)
            skipped = sum(int(m.get("skipped", 0)) for _, m in rows)
            if skipped:
                _say(f"stage {stage.name}: skipped {skipped} of steps {rows[0][0] - offset}-"
                     f"{rows[-1][0] - offset} (non-finite loss or gradient norm; "
                     "config.nonfinite='skip')")
            progress.set_postfix(_postfix(last_loss, rate, mfu))
            pending, window_start, window_steps = [], time.perf_counter(), 0
        if saving:  # one pass over the state: never a checkpoint of NaN / inf; its checksums
            summary = checksums.summarize(  # (every process computes, process 0 writes)
                state, with_checksums=config.verify_checkpoints)
            if summary.nonfinite:
                progress.close()
                raise _diverged(stage, offset, (offset + step + 1, None), manager)
            meta = {"stage": stage.name, "step": step + 1, "data": feed.state()}
            if config.verify_checkpoints:
                meta["checksums"] = summary.checksums
            manager.save(offset + step + 1, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
    progress.close()

    eval_loss = _evaluate(config, stage, tokenizer, step_fns, state, frozen, plan,
                          sources.get(config.data.eval_split))
    if eval_loss is not None:
        logger.scalars(offset + stage.steps, {"eval/loss": eval_loss,
                                              "eval/perplexity": math.exp(eval_loss)},
                       {"stage": stage.name, "eval_loss": eval_loss})
    params = lora_lib.combine(state["trainable"], frozen)
    if lora is not None:
        params = jax.jit(lora_lib.merge, static_argnums=2)(params, state["lora"], lora)
    model_dir = run_dir / "models" / stage.name
    manager.wait_until_finished()
    checkpoint.save(Model(model_config, params), model_dir)
    del params, state, frozen  # the summary loads the models it compares
    extension_summary(config, index, previous, model_dir, tokenizer,
                      sources.get(config.data.eval_split), run_dir)
    skipped = (logger.total("skipped", offset, offset + stage.steps)
               if config.nonfinite == "skip" else None)
    return StageResult(stage.name, stage.steps, last_loss, eval_loss, rate, mfu,
                       time.perf_counter() - started, str(model_dir), skipped)


SUMMARY_ROWS = ("base, RoPE as pre-trained", "base + method, no fine-tune", "fine-tuned")


def extension_summary(config: ml_collections.ConfigDict, index: int,
                      previous: epath.Path | None, model_dir: epath.Path,
                      tokenizer: data.Tokenizer, documents: Sequence[str] | None,
                      run_dir: epath.Path) -> dict[str, Any] | None:
    """For a stage with rope_scaling (an extension stage): perplexity on the same held-out
    documents (the first config.summary_documents of the eval split with enough tokens, each
    cut to the length: the truncate protocol) at the base length L, the stage's seq_len and
    the extended window L·s (when that many documents reach it), of the stage's starting
    weights with their own RoPE (plain RoPE, for a model pre-trained without scaling), of those
    weights with the stage's RoPE scaling (no fine-tune), and of the fine-tuned weights, each
    on one device (pod recipes set summary_documents = 0). Printed as a table and
    written to run_dir/summary/<stage>.json; None (nothing done) for other stages, without
    starting weights (from scratch) or with summary_documents = 0."""
    stage = config.stages[index]
    start = previous if previous is not None else (
        paths.as_path(config.init_from) if config.init_from else None)
    if (not config.summary_documents or stage.rope_scaling is None or stage.task != "text"
            or start is None or documents is None):
        return None
    tuned = checkpoint.load(model_dir)
    base = (checkpoint.load(start) if (start / "params").is_dir() else convert.from_hf(
        start, config=models.config_from_hf(base_hf_config(config))))
    scaling = rope_scaling_dict(stage.rope_scaling, f"config.stages[{index}].rope_scaling")
    untuned = base.replace(config=base.config.with_rope_scaling(scaling))
    base_length = base.config.rope.max_position_embeddings
    extended = round(scaling.get("original_max_position_embeddings", base_length)  # L·s
                     * scaling.get("factor", 1.0))
    lengths = sorted({base_length, stage.seq_len, extended})
    while True:
        held_out = evaluation.tokenize_documents(documents, tokenizer, min_tokens=max(lengths),
                                                 limit=config.summary_documents)
        if len(held_out) == config.summary_documents or max(lengths) == stage.seq_len:
            break
        lengths.pop()  # too few documents reach L·s: the summary stops at seq_len
    if not held_out:
        _say(f"stage {stage.name}: no eval-split document has {max(lengths)} tokens; no "
             "extension summary")
        return None
    models_ = dict(zip(SUMMARY_ROWS, (base, untuned, tuned)))
    table = {row: {str(n): evaluation.truncate_nll(m, held_out, n).perplexity for n in lengths}
             for row, m in models_.items()}
    out = {"stage": stage.name, "rope": tuned.config.rope.to_hf(), "documents": len(held_out),
           "split": config.data.eval_split, "protocol": "truncate", "perplexity": table}
    corpus = data.fingerprint_of(config.data.dataset)
    if corpus is not None:
        out["corpus"] = corpus
    if jax.process_index() == 0:
        paths.write_atomically(run_dir / "summary" / f"{stage.name}.json",
                               json.dumps(out, indent=1))
    width = max(map(len, SUMMARY_ROWS))
    lines = [f"stage {stage.name}: held-out perplexity, {len(held_out)} {config.data.dataset}/"
             f"{config.data.eval_split} documents cut to each length" + (
                 f" (corpus {out['corpus']})" if "corpus" in out else ""),
             " " * width + "".join(f"{n:>10}" for n in lengths)]
    lines += [row.ljust(width) + "".join(f"{table[row][str(n)]:>10.2f}" for n in lengths)
              for row in SUMMARY_ROWS]
    _say("\n".join(lines))
    return out


def _finite_metrics(metrics: dict) -> bool:
    return bool(np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"]))


def _diverged(stage: ml_collections.ConfigDict, offset: int, row: tuple[int, dict | None],
              manager: ocp.CheckpointManager) -> TrainingDiverged:
    """The error for the first non-finite step `row` (global step, its metrics; None: the state
    after it is non-finite although its metrics are not), once the saves already under way are
    committed, naming the checkpoint a rerun resumes from."""
    step, metrics = row
    where = f"step {step - offset} of {stage.steps}" + (f" (run step {step})" if offset else "")
    if metrics is not None:
        what = (f"the loss ({float(metrics['loss'])}) or gradient norm "
                f"({float(metrics['grad_norm'])}) became non-finite at {where}")
    else:
        what = (f"the train state after {where} holds NaN / inf values although the losses and "
                "gradient norms were finite (an optimizer overflow: check config.optimizer.eps "
                "> 0)")
    manager.wait_until_finished()
    latest = manager.latest_step()
    if latest is None:
        kept, where_next = "no checkpoint was written", " (config.run_dir can be reused)"
        skip = "set config.nonfinite='skip' to skip such steps"
    else:
        kept = f"the last checkpoint, step {latest} in {manager.directory}, is finite and kept"
        where_next = " (in a new config.run_dir: a changed config cannot resume there)"
        skip = ("rerun with --config.nonfinite='skip', which resumes from that checkpoint and "
                "skips such steps")
    return TrainingDiverged(
        f"stage {stage.name}: {what}; stopped without saving it: {kept}. To fix it"
        f"{where_next}: try a lower lr or a longer warmup_steps, check the data and the config "
        "(e.g. rms_norm_eps, optimizer.eps, optimizer.grad_clip), with bfloat16 / float16 "
        f"compute try dtype='float32' (overflow); or {skip}")


def host_part(batch_sharding: Any, shape: tuple[int, int, int], process: int | None = None
              ) -> tuple[tuple[int, ...], int, int]:
    """(rows, data shard index, shard count) of process `process` (default: this one) for
    [A, B, T] batches: the rows of each micro-batch its devices hold (`sharding.held_rows`),
    and which data shard feeds them. Processes holding the same rows read the same shard (e.g.
    when "sequence" spans hosts: each then keeps its devices' tokens), one shard per distinct
    set of rows; ConfigError when the hosts' row sets overlap without being equal."""
    rows = shape[1]
    if batch_sharding is None:
        return tuple(range(rows)), 0, 1
    held = sharding.held_rows(batch_sharding, shape, axis=1)
    process = jax.process_index() if process is None else process
    if process not in held:
        raise ConfigError(f"config.mesh: process {process} has no device in the mesh; "
                          "config.mesh.num_devices must include every host's devices")
    sets = sorted(set(held.values()))
    if sum(len(s) for s in sets) != rows or len({len(s) for s in sets}) != 1:
        raise ConfigError(
            f"config.mesh: the hosts hold overlapping or unequal sets of the {rows} rows of each "
            f"micro-batch ({sets[:4]}...); choose mesh sizes whose batch split covers the hosts "
            "evenly")
    mine = held[process]
    return mine, sets.index(mine), len(sets)


class _Feed:
    """This process's part of every [A, B, T] batch (A = `accum` micro-batches of B rows): the
    rows its devices hold (`host_part`), read from its data shard, whole along T (each device
    gets its tokens from them); so the global batch does not depend on how the mesh maps onto
    hosts beyond which rows travel together."""

    def __init__(self, stage: ml_collections.ConfigDict, accum: int, batch_sharding: Any,
                 tokenizer: data.Tokenizer, documents: Sequence[str], seed: int,
                 for_eval: bool = False):
        self.shape = (accum, stage.batch_size // stage.grad_accum, stage.seq_len)
        self.sharding = batch_sharding
        self.rows, self.shard, shards = host_part(batch_sharding, self.shape)
        if stage.task != "text":  # "passkey-<style>"; prompts of at least min_doc_tokens
            self.batches = evaluation.PasskeyBatches(
                tokenizer, stage.seq_len, accum * len(self.rows), seed, shard_index=self.shard,
                style=stage.task.split("-", 1)[1], shortest=stage.min_doc_tokens,
                evaluation=for_eval)
            return
        rows = accum * len(self.rows)
        mix = plain(stage.get("retrieval"))
        needle_rows = mix["share"] * rows if mix and not for_eval else 0
        if needle_rows and (abs(needle_rows - round(needle_rows)) > 1e-9 or needle_rows >= rows):
            raise ConfigError(f"stage {stage.name}: retrieval share {mix['share']} of "
                              f"{rows} rows per host is not a whole number of rows below "
                              f"{rows}; choose a share that is a multiple of 1/{rows}")
        self.batches = data.PackedBatches(
            documents, tokenizer, stage.seq_len, rows - round(needle_rows), seed,
            shard_index=self.shard, shard_count=shards, min_tokens=stage.min_doc_tokens)
        if needle_rows:
            needles = retrieval.NeedleRows(documents, tokenizer, stage.seq_len,
                                           seed * 1000 + self.shard,
                                           max_needles=mix.get("max_needles", 4),
                                           answer_weight=mix.get("answer_weight", 1.0))
            self.batches = retrieval.MixedBatches(self.batches, needles, round(needle_rows))

    def state(self) -> dict[str, dict]:
        """{shard index: its stream position} of every host's data shard, for a checkpoint
        (Orbax writes JSON from process 0 only, so every host's position is gathered to it)."""
        mine = self.batches.get_state()
        if jax.process_count() == 1:
            return {str(self.shard): mine}
        keys = sorted(mine)
        every = multihost_utils.process_allgather(np.asarray([mine[k] for k in keys]))
        return {str(row[keys.index("shard_index")]): dict(zip(keys, map(int, row)))
                for row in np.asarray(every)}

    def restored_state(self, saved: dict) -> dict[str, int]:
        """This host's position from `state()`'s dict (or a one-shard state of before)."""
        return saved if "epoch" in saved else saved[str(self.shard)]

    def next(self) -> dict[str, jax.Array]:
        out = {}
        for key, value in next(self.batches).items():
            local = value.reshape(self.shape[0], len(self.rows), self.shape[2])
            if self.sharding is None:
                out[key] = jax.device_put(local)
            else:
                out[key] = sharding.place_rows(local, self.sharding, self.shape, self.rows,
                                               axis=1)
        return out


def _batch_sharding(mesh: Any, stage: ml_collections.ConfigDict) -> Any:
    """Micro-batched [A, B/A, T] arrays: micro-batches unsplit, rows and tokens as activations."""
    if mesh is None:
        return None
    rows = stage.batch_size // stage.grad_accum
    spec = sharding.fit_spec(sharding.activation_spec(), (rows, stage.seq_len), mesh)
    return NamedSharding(mesh, P(None, *spec))


def _evaluate(config: ml_collections.ConfigDict, stage: ml_collections.ConfigDict,
              tokenizer: data.Tokenizer, step_fns: Step, state: dict, frozen: Any,
              plan: StagePlan, documents: Sequence[str] | None) -> float | None:
    """Mean validation loss over `eval_batches` batches of `documents` (the eval split; for a
    passkey task, prompts of the evaluation stream) at the stage's length with the stage's
    eval model (full attention for "s2"), each of the training micro-batch's rows (batch_size /
    grad_accum), so that evaluating needs no more memory than a training micro-step."""
    if not config.eval_batches:
        return None
    eval_stage = ml_collections.ConfigDict(plain(stage))
    if stage.task == "text":
        eval_stage.min_doc_tokens = 0
    feed = _Feed(eval_stage, 1, plan.batch_sharding, tokenizer, documents, 0, for_eval=True)
    nll = count = 0.0
    for _ in range(config.eval_batches):
        batch = jax.tree.map(lambda x: x[0], feed.next())
        batch_nll, batch_count = step_fns.eval(state, frozen, batch)
        nll, count = nll + batch_nll, count + batch_count
    return float(nll / count)


def _export_hf(config: ml_collections.ConfigDict, model_dir: epath.Path,
               out_dir: epath.Path) -> None:
    """The last stage's weights as a transformers checkpoint, with the tokenizer's files. Every
    process takes part (the restore and the gathering of sharded leaves are collective);
    process 0 writes."""
    if (out_dir / "config.json").exists():
        return
    tokenizer = data.load_tokenizer(tokenizer_path(config))
    if jax.process_index() == 0:  # first: the model's config.json, written last, marks done
        main, *extra = tokenizer.files  # the file it was read from, under its canonical name
        paths.write_atomically(out_dir / main, tokenizer.source.read_bytes())
        for name in extra:
            if (tokenizer.source.parent / name).is_file():
                paths.write_atomically(out_dir / name, (tokenizer.source.parent / name)
                                       .read_bytes())
    model = checkpoint.load(model_dir, mesh=config_mesh(config))
    convert.to_hf(model, out_dir)


def _postfix(loss: float | None, rate: float, mfu: float | None) -> dict[str, str]:
    out = {"loss": "-" if loss is None else f"{loss:.4f}", "tok/s": f"{rate:,.0f}"}
    if mfu is not None:
        out["MFU"] = f"{100 * mfu:.1f}%"
    return out


def _summary(results: list[StageResult], run_dir: epath.Path,
             config: ml_collections.ConfigDict) -> None:
    if jax.process_index():
        return
    for r in results:
        parts = [f"stage {r.name}: {r.steps} steps in {r.seconds:.0f} s"]
        if r.final_loss is not None:
            parts.append(f"train loss {r.final_loss:.4f} (mean of the last log window)")
        if r.skipped is not None:
            parts.append(f"{r.skipped} steps skipped (non-finite loss or gradient norm)")
        if r.eval_loss is not None:
            parts.append(f"eval loss {r.eval_loss:.4f} (ppl {math.exp(r.eval_loss):.2f})")
        if r.tokens_per_s:
            parts.append(f"{r.tokens_per_s:,.0f} tokens/s")
        if r.mfu is not None:
            parts.append(f"MFU {100 * r.mfu:.1f}%")
        _say(", ".join(parts))
    final = run_dir / "models" / config.stages[-1].name
    hf = run_dir / "hf" / config.stages[-1].name
    where = f"done: weights at {final}"
    if config.export_hf:
        where += f", transformers export at {hf}"
    _say(where)


def _say(message: str) -> None:
    """A line on stdout from process 0, flushed at once (a killed run keeps what it said)."""
    if jax.process_index() == 0:
        print(message, flush=True)


class _Logger:
    """metrics.jsonl, tensorboard scalars and the progress bar (process 0 only). metrics.jsonl
    is rewritten whole at each log (`paths.write_atomically`): object stores cannot append."""

    def __init__(self, run_dir: epath.Path, config: ml_collections.ConfigDict) -> None:
        self.active = jax.process_index() == 0
        self.show_progress = config.progress and self.active
        self.path = run_dir / "metrics.jsonl"
        self.lines: list[str] = []
        if self.active and self.path.exists():
            self.lines = self.path.read_text().splitlines()
        self.writer = None
        if self.active and config.tensorboard:
            from tensorboardX import SummaryWriter
            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def truncate(self, step: int) -> None:
        """Drops lines logged after `step` (by a run killed before its next checkpoint)."""
        if not self.active:
            return
        self.lines = [line for line in self.lines if json.loads(line).get("step", 0) <= step]
        self._write()

    def _write(self) -> None:
        paths.write_atomically(self.path, "".join(line + "\n" for line in self.lines))

    def steps(self, rows: list[tuple[int, dict]], rate: float, mfu: float | None) -> None:
        if not self.active:
            return
        self.lines += [json.dumps({"step": step, "loss": float(m["loss"]),
                                   "grad_norm": float(m["grad_norm"]), "lr": float(m["lr"]),
                                   **({"skipped": int(m["skipped"])} if "skipped" in m else {})})
                       for step, m in rows]
        self._write()
        if self.writer is not None:
            step, m = rows[-1]
            for key in ("loss", "grad_norm", "lr"):
                if math.isfinite(m[key]):  # NaN / inf: in metrics.jsonl only
                    self.writer.add_scalar(f"train/{key}", float(m[key]), step)
            if "skipped" in m:
                self.writer.add_scalar("train/skipped", sum(int(r["skipped"]) for _, r in rows),
                                       step)
            self.writer.add_scalar("train/tokens_per_s", rate, step)
            if mfu is not None:
                self.writer.add_scalar("train/mfu", mfu, step)

    def total(self, key: str, start: int, stop: int) -> int:
        """The sum of `key` over the lines of steps start+1 .. stop (process 0; else 0)."""
        rows = (json.loads(line) for line in self.lines)
        return sum(int(r.get(key, 0)) for r in rows if start < r.get("step", 0) <= stop
                   and "loss" in r)

    def scalars(self, step: int, values: dict[str, float], line: dict) -> None:
        if not self.active:
            return
        self.lines.append(json.dumps({"step": step, **line}))
        self._write()
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def progress(self, name: str, total: int, initial: int) -> Any:
        from tqdm.auto import tqdm
        return tqdm(total=total, initial=initial, desc=f"stage {name}", unit="step",
                    disable=not self.show_progress, dynamic_ncols=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
