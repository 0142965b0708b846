"""The training configuration: defaults, stages, and validation with errors that name the field.

Config files (configs/*.py) follow the Flax-examples convention: `get_config()` returns an
`ml_collections.ConfigDict`, and `train.py --config configs/X.py --config.FIELD=VALUE` overrides
any field. Start from `default_config()` and add one `stage(...)` per training stage:

    config = default_config()
    config.init_from = "/ckpt/Llama-2-7b-hf"           # HF dir or an lctx_jax checkpoint dir
    config.stages = [stage("pi32k", seq_len=32768, batch_size=64, steps=1000, lr=2e-5,
                           warmup_steps=20, rope_scaling={"rope_type": "linear", "factor": 8.0})]

Fields (see `default_config` for defaults):
  run_dir            where checkpoints, exported models, metrics and tensorboard logs go
  seed               parameter init (from scratch), LoRA init, data order
  init_from          HF checkpoint dir (config.json + *.safetensors), lctx_jax checkpoint dir
                     (`lctx_jax.save`), or "" to train from scratch with `model`
  model              from scratch only: an HF config.json dict (model_type "llama", ...)
  hf_overrides       config.json fields put over init_from's (or model's) that keep the
                     parameter shapes, e.g. {"sliding_window": None} for full attention
  tokenizer          a sentencepiece tokenizer.model or HF tokenizer.json (or a directory with
                     one); "" means init_from's directory
  tokenizer_vocab_size  > 0: if `tokenizer` does not exist, train one of this size on the
                     training split and cache it there (the demo does)
  data               dataset ("stdlib": the embedded corpus, or any TFDS text dataset name such
                     as "pg19"), split, eval_split, data_dir, text_key
  dtype, param_dtype compute dtype (bf16 on accelerators) and master-weight dtype (f32)
  remat              "none" | "full" | "dots" activation checkpointing per layer
  mesh               data / fsdp / tensor / sequence axis sizes (-1: the rest), num_devices
                     (0: all; N: the first N); sizes the devices cannot hold are an error;
                     a 1-device mesh runs without one
  optimizer          AdamW b1, b2, eps, weight_decay (kernels and embeddings only), grad_clip
                     (global norm; 0 = off), min_lr_ratio (floor of linear / cosine decay);
                     gate_lr, gate_weight_decay: the peak learning rate and weight decay of
                     Infini-attention's gate logits (same schedule shape as the stage's)
  lora               rank (0 = full fine-tuning), alpha, targets, trainable (LongLoRA's LoRA+)
  nonfinite          "stop" (default): a NaN / inf loss or gradient norm stops the run with an
                     error, before any checkpoint of it is written; "skip": such a step leaves
                     the train state unchanged and is counted (`lctx_jax.training`)
  stages             list of `stage(...)`: run in order, each starting from the previous
                     stage's weights (LoRA merged), with its own length, RoPE scaling,
                     attention, batch, steps and learning-rate schedule
  summary_documents  after a stage with rope_scaling: perplexity of the base model, the base
                     with the stage's RoPE and the fine-tuned model on this many held-out
                     documents at L and the stage's length (`training.extension_summary`;
                     0 = off, as the pod recipes set it: eval.py measures those on a mesh)
  checkpoint_every, keep_checkpoints, log_every, eval_batches, export_hf, peak_tflops,
  distributed, progress, tensorboard
"""

from __future__ import annotations

import re
from typing import Any

import ml_collections

from etils import epath

from lctx_jax import architectures, convert, paths
from lctx_jax.attention import IMPLEMENTATIONS
from lctx_jax.attention.infini import InfiniConfig
from lctx_jax.lora import LoraConfig
from lctx_jax.model import INFINI
from lctx_jax import models
from lctx_jax.layers import REMAT_POLICIES

SCHEDULES = ("constant", "linear", "cosine")
DTYPES = ("float32", "bfloat16", "float16")
NONFINITE = ("stop", "skip")
STAGE_FIELDS = ("name", "seq_len", "batch_size", "steps", "lr", "warmup_steps", "schedule",
                "rope_scaling", "attention", "grad_accum", "min_doc_tokens", "infini", "task",
                "attention_block_size", "retrieval")
TASKS = ("text", "passkey-prose", "passkey-python")
ATTENTION = (*IMPLEMENTATIONS, INFINI)


class ConfigError(ValueError):
    """A config field with a bad value; the message names the field and the fix."""


class TrainingDiverged(RuntimeError):
    """A NaN / inf loss, gradient norm or train state stopped the run (config.nonfinite="stop");
    the message names the stage, the step and what to try. Nothing of it was saved."""


class InputNotFound(ConfigError, FileNotFoundError):
    """A config field naming a file, directory or dataset that does not exist: a ConfigError
    (one line from train.py), and a FileNotFoundError for callers that catch that."""


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.run_dir = "runs/default"
    c.seed = 0
    c.init_from = ""
    c.model = ml_collections.ConfigDict()
    c.hf_overrides = ml_collections.ConfigDict()
    c.tokenizer = ""
    c.tokenizer_vocab_size = 0
    c.data = ml_collections.ConfigDict(dict(dataset="stdlib", split="train",
                                            eval_split="validation", data_dir="",
                                            text_key="text"))
    c.dtype = "float32"
    c.param_dtype = "float32"
    c.remat = "none"
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, sequence=1,
                                            num_devices=0))
    c.optimizer = ml_collections.ConfigDict(dict(b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0,
                                                 grad_clip=1.0, min_lr_ratio=0.0,
                                                 gate_lr=1e-2, gate_weight_decay=0.0))
    c.nonfinite = "stop"
    c.lora = ml_collections.ConfigDict(dict(rank=0, alpha=16.0, targets=("q", "k", "v", "o"),
                                            trainable=("embed", "norm")))
    c.stages = []
    c.checkpoint_every = 100
    c.keep_checkpoints = 3
    c.verify_checkpoints = True  # checksum the train state in each checkpoint, check on resume
    c.log_every = 10
    c.eval_batches = 4
    c.summary_documents = 8
    c.export_hf = True
    c.peak_tflops = 0.0
    c.distributed = False
    c.progress = True
    c.tensorboard = True
    return c


def stage(name: str, *, seq_len: Any, batch_size: Any, steps: Any, lr: Any,
          warmup_steps: Any = 0, schedule: str = "constant", rope_scaling: Any = None,
          attention: str = "xla", grad_accum: Any = 1, min_doc_tokens: Any = 0,
          infini: Any = None, task: str = "text", attention_block_size: Any = None,
          retrieval: Any = None) -> ml_collections.ConfigDict:
    """One training stage. Values may be `config.get_ref(...)` references, so a top-level
    field (e.g. `--config.pretrain_steps=50`) can drive a stage from the command line.

    rope_scaling: None (the base model's RoPE), an HF rope_scaling dict, or the path of a JSON
    file holding one (e.g. LongRoPE factors written by the search).
    batch_size: sequences per optimizer step over all hosts; grad_accum splits it into that
    many micro-batches. min_doc_tokens: train only on documents at least this long.
    attention: an impl of `lctx_jax.attention.attend`, or "infini" with `infini` = {"segment_len":
    N, "update": "linear" | "delta", "gate_init": β0} (over the settings of a model that has
    them already; its gates train at config.optimizer.gate_lr).
    task: "text" (packed documents) or "passkey-prose" / "passkey-python" (passkey-retrieval
    prompts in that style with the loss on the answer only, `lctx_jax.evaluation.
    PasskeyBatches`: the Infini-attention paper's fine-tune); there min_doc_tokens > 0 draws
    prompt lengths from [min_doc_tokens, seq_len] instead of filling every row.
    attention_block_size: the attention's block (`ModelSpec.attention_block_size`), None for
    each kernel's default per backend.
    retrieval: None, or {"share": f, "max_needles": n, "answer_weight": w} to make a fraction f
    of a "text" stage's rows synthetic key-value retrieval documents of up to n needles, their
    answers weighing w in the loss (`lctx_jax.retrieval.NeedleRows`, `MixedBatches`); the
    stage's evaluation stays on the eval split's own documents.
    """
    out = ml_collections.ConfigDict()
    out.name = name
    out.seq_len = seq_len
    out.batch_size = batch_size
    out.steps = steps
    out.lr = lr
    out.warmup_steps = warmup_steps
    out.schedule = schedule
    out.rope_scaling = rope_scaling
    out.attention = attention
    out.grad_accum = grad_accum
    out.min_doc_tokens = min_doc_tokens
    out.infini = infini
    out.task = task
    out.attention_block_size = attention_block_size
    out.retrieval = retrieval
    return out


def plain(value: Any) -> Any:
    """ConfigDicts, FieldReferences and tuples as plain JSON-able Python values."""
    if isinstance(value, ml_collections.FieldReference):
        value = value.get()
    if isinstance(value, ml_collections.ConfigDict):
        return {key: plain(value[key]) for key in value.keys()}
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    return value


def rope_scaling_dict(value: Any, field: str) -> dict[str, Any] | None:
    """A stage's rope_scaling as a dict: None, a dict, or a JSON file path."""
    value = plain(value)
    if value is None or isinstance(value, dict):
        return value
    if isinstance(value, str):
        path = paths.as_path(value)
        if not path.is_file():
            raise ConfigError(f"{field}: {value!r} is not a JSON file; give a rope_scaling dict "
                              "or the path of a JSON file holding one")
        try:
            return paths.read_json(path)
        except ValueError as err:
            raise ConfigError(f"{field}: {err}") from None
    raise ConfigError(f"{field}: expected None, a dict or a JSON file path, got {value!r}")


def base_hf_config(config: ml_collections.ConfigDict, published: bool = False
                   ) -> dict[str, Any]:
    """The config.json dict training starts from: init_from's, or `model` from scratch, with
    `hf_overrides` put over it. published: when init_from holds no config.json yet, take the
    architecture of the published checkpoint it names (`lctx_jax.architectures`), as
    `--compile_only` does."""
    return {**_source_hf_config(config, published), **plain(config.hf_overrides)}


def _source_hf_config(config: ml_collections.ConfigDict, published: bool) -> dict[str, Any]:
    if config.init_from:
        path = paths.as_path(config.init_from) / "config.json"
        if not path.is_file():
            shipped = architectures.published(config.init_from) if published else None
            if shipped is not None:
                return shipped
            known = (f"; --compile_only also knows {sorted(architectures.PUBLISHED)} by "
                     "directory name" if published else "")
            raise ConfigError(f"config.init_from: {path} does not exist; init_from must be an HF "
                              "checkpoint dir (config.json + *.safetensors) or an lctx_jax "
                              "checkpoint dir, or \"\" to train from scratch with config.model"
                              + known)
        try:  # an lctx_jax checkpoint's config.json, or an HF one as transformers reads it
            hf = (paths.read_json(path) if (path.parent / "params").is_dir()
                  else convert.read_hf_config(path.parent))
        except ValueError as err:
            raise ConfigError(f"config.init_from: {err}") from None
        hf.pop("lctx_jax", None)
        return hf
    if not config.model:
        raise ConfigError("config.model: training from scratch (config.init_from is empty) needs "
                          "config.model, an HF config.json dict; or set config.init_from")
    return plain(config.model)


def validate(config: ml_collections.ConfigDict, published: bool = False) -> None:
    """Raises ConfigError for the first bad field, before anything is loaded or compiled.
    published: as for `base_hf_config` (`--compile_only` needs no checkpoint or tokenizer)."""
    # Extra scalar fields are a recipe's own knobs, referenced by its stages (get_ref).
    unknown = {key for key in set(config.keys()) - set(default_config().keys())
               if not isinstance(config[key], (bool, int, float, str))}
    if unknown:
        raise ConfigError(f"config has unknown fields {sorted(unknown)}; known: "
                          f"{sorted(default_config().keys())} (plus scalar knobs)")
    for field in ("dtype", "param_dtype"):
        if config[field] not in DTYPES:
            raise ConfigError(f"config.{field}={config[field]!r}; use one of {DTYPES}")
    if config.remat not in REMAT_POLICIES:
        raise ConfigError(f"config.remat={config.remat!r}; use one of {list(REMAT_POLICIES)}")
    for field in ("checkpoint_every", "keep_checkpoints", "log_every"):
        if config[field] < 1:
            raise ConfigError(f"config.{field}={config[field]} must be >= 1")
    if config.nonfinite not in NONFINITE:
        raise ConfigError(f"config.nonfinite={config.nonfinite!r}; use one of {NONFINITE}")
    for field in ("eval_batches", "summary_documents"):
        if config[field] < 0:
            raise ConfigError(f"config.{field}={config[field]} must be >= 0")
    if config.lora.rank < 0:
        raise ConfigError(f"config.lora.rank={config.lora.rank}: 0 (full fine-tuning) or a rank "
                          ">= 1")
    if config.lora.rank:
        try:
            lora_config(config)
        except ValueError as err:
            raise ConfigError(f"config.lora: {err}") from err
    if config.optimizer.grad_clip < 0 or not 0 <= config.optimizer.min_lr_ratio <= 1:
        raise ConfigError("config.optimizer: grad_clip must be >= 0 (0 = off) and min_lr_ratio "
                          "in [0, 1]")
    if not config.tokenizer and not config.init_from and not published:
        raise ConfigError("config.tokenizer: give a sentencepiece model path (with "
                          "config.tokenizer_vocab_size > 0 one is trained there if missing)")
    base = base_hf_config(config, published)
    try:
        model = models.config_from_hf(base)
    except (KeyError, ValueError) as err:
        source = "config.init_from's config.json" if config.init_from else "config.model"
        raise ConfigError(f"{source} (with config.hf_overrides): {err}") from err
    _check_overrides_keep_shapes(config, published, base, model)
    targets = models.family_of(model).lora_targets
    if config.lora.rank and not set(config.lora.targets) <= set(targets):
        raise ConfigError(f"config.lora.targets={tuple(config.lora.targets)}: a "
                          f"{model.model_type} model's projections are {', '.join(targets)}")
    stages = list(config.stages)
    if not stages:
        raise ConfigError("config.stages is empty; add at least one stage(...) "
                          "(see lctx_jax.train_config)")
    names = [plain(s.name) for s in stages]
    for i, s in enumerate(stages):
        _validate_stage(s, f"config.stages[{i}]", base)
        try:
            with_infini(config, i, model)
        except ValueError as err:
            raise ConfigError(f"config.stages[{i}]: {err}") from err
        if s.attention == INFINI and config.mesh.sequence != 1:
            raise ConfigError(f"config.stages[{i}].attention='infini' runs its segments in order "
                              f"and cannot split a sequence: config.mesh.sequence="
                              f"{config.mesh.sequence} must be 1 (split data, fsdp or tensor)")
        window = getattr(model, "sliding_window", None)
        if window is not None and s.seq_len > window and "sliding_window" not in (
                config.hf_overrides):
            raise ConfigError(
                f"config.stages[{i}].seq_len={s.seq_len} exceeds the model's sliding_window="
                f"{window}: every layer would see only the last {window} tokens. Set "
                "config.hf_overrides.sliding_window = None for full attention (what "
                f"context-extension recipes use), or = {window} to keep the window")
    if len(set(names)) != len(names):
        raise ConfigError(f"config.stages: names must be unique, got {names}")


def _check_overrides_keep_shapes(config: ml_collections.ConfigDict, published: bool,
                                 base: dict[str, Any], model: Any) -> None:
    """ConfigError when an hf_overrides field changes the parameter shapes: with that one field
    back at the source's value the layout must be the same. A field whose source value does
    not even parse (a pad id past the vocabulary, say) is a fix, always allowed."""
    source = _source_hf_config(config, published)
    layout = models.family_of(model).hf_layout(model)
    for key in plain(config.hf_overrides):
        reverted = {k: v for k, v in base.items() if k != key}
        if key in source:
            reverted[key] = source[key]
        try:
            before = models.config_from_hf(reverted)
        except (KeyError, ValueError):
            continue
        if models.family_of(before).hf_layout(before) != layout:
            raise ConfigError(f"config.hf_overrides.{key}={base[key]!r} changes the parameter "
                              "shapes; only fields that keep them (sliding_window, "
                              "rms_norm_eps, token ids, ...) can be overridden")


def _validate_stage(s: ml_collections.ConfigDict, field: str, base: dict) -> None:
    unknown = set(s.keys()) - set(STAGE_FIELDS)
    if unknown:
        raise ConfigError(f"{field} has unknown fields {sorted(unknown)}; known: {STAGE_FIELDS}")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(s.name)):
        raise ConfigError(f"{field}.name={s.name!r}: use letters, digits, '_', '-', '.' (it "
                          "names a directory)")
    for key in ("seq_len", "batch_size", "steps", "grad_accum"):
        if not isinstance(s[key], int) or s[key] < 1:
            raise ConfigError(f"{field}.{key}={s[key]!r} must be an int >= 1")
    if not s.lr > 0:
        raise ConfigError(f"{field}.lr={s.lr!r} must be > 0")
    if not 0 <= s.warmup_steps <= s.steps:
        raise ConfigError(f"{field}.warmup_steps={s.warmup_steps} must be in [0, steps={s.steps}]")
    if s.schedule not in SCHEDULES:
        raise ConfigError(f"{field}.schedule={s.schedule!r}; use one of {SCHEDULES}")
    if s.attention not in ATTENTION:
        raise ConfigError(f"{field}.attention={s.attention!r}; use one of {ATTENTION}")
    mix = plain(s.get("retrieval"))
    if mix is not None:
        if (not isinstance(mix, dict) or set(mix) - {"share", "max_needles", "answer_weight"}
                or not 0 < mix.get("share", 0) < 1
                or type(mix.get("max_needles", 4)) is not int
                or not 1 <= mix.get("max_needles", 4) <= 120
                or not mix.get("answer_weight", 1.0) > 0):
            raise ConfigError(f"{field}.retrieval={mix!r}: give None or {{'share': f in (0, 1), "
                              "'max_needles': int in [1, 120], 'answer_weight': w > 0}")
        if s.task != "text":
            raise ConfigError(f"{field}.retrieval mixes documents into text; task {s.task!r} "
                              "has none: set retrieval=None")
        rows = mix["share"] * s.batch_size
        if abs(rows - round(rows)) > 1e-9:
            raise ConfigError(f"{field}.retrieval share {mix['share']} of batch_size "
                              f"{s.batch_size} is not a whole number of rows; use a multiple "
                              f"of 1/{s.batch_size}")
    if s.task not in TASKS:
        raise ConfigError(f"{field}.task={s.task!r}; use one of {TASKS}")
    block = s.get("attention_block_size")
    if block is not None and (not isinstance(block, int) or isinstance(block, bool)
                              or block < 1):
        raise ConfigError(f"{field}.attention_block_size={block!r} must be an int >= 1, or "
                          "None for each kernel's default per backend")
    if s.infini is not None and s.attention != INFINI:
        raise ConfigError(f"{field}.infini is set but {field}.attention={s.attention!r}; use "
                          "attention='infini' with it")
    if s.attention == "s2" and s.seq_len % 8:
        raise ConfigError(f"{field}.seq_len={s.seq_len}: S²-Attn (attention='s2') splits a "
                          "sequence into 4 groups of even size, so seq_len must be a multiple "
                          "of 8")
    if s.batch_size % s.grad_accum:
        raise ConfigError(f"{field}.batch_size={s.batch_size} must be divisible by grad_accum="
                          f"{s.grad_accum}")
    if s.min_doc_tokens < 0:
        raise ConfigError(f"{field}.min_doc_tokens={s.min_doc_tokens} must be >= 0")
    scaling = rope_scaling_dict(s.rope_scaling, f"{field}.rope_scaling")
    try:
        models.config_from_hf(base, scaling)
    except (KeyError, ValueError) as err:
        raise ConfigError(f"{field}.rope_scaling: {err}") from err


def with_infini(config: ml_collections.ConfigDict, index: int, model: Any) -> Any:
    """`model` (the base architecture, a family config) as stage `index` trains it: with
    Infini-attention if that stage's attention is "infini", its settings the base model's
    with each earlier infini stage's `infini` put over them in turn. ValueError for a stage
    that would drop Infini-attention from a model that has it."""
    stored = getattr(model, "infini", None)
    settings = None
    for i in range(index + 1):
        s = config.stages[i]
        if s.attention != INFINI:
            if stored is not None or settings is not None:
                raise ValueError(f"attention={s.attention!r}, but the model has Infini-"
                                 "attention from the checkpoint or an earlier stage: its "
                                 "stages use attention='infini'")
            continue
        if not hasattr(model, "with_infini"):
            raise ValueError(f"a {model.model_type} model has no Infini-attention option")
        settings = InfiniConfig.over(settings or stored, plain(s.infini))
    return model if settings is None else model.with_infini(settings)


def lora_config(config: ml_collections.ConfigDict) -> LoraConfig | None:
    """The LoraConfig of `config.lora`, or None for full fine-tuning (rank 0)."""
    if not config.lora.rank:
        return None
    return LoraConfig(rank=config.lora.rank, alpha=float(config.lora.alpha),
                      targets=tuple(config.lora.targets), trainable=tuple(config.lora.trainable))


def tokenizer_path(config: ml_collections.ConfigDict) -> epath.Path:
    """config.tokenizer, or the init_from checkpoint directory (`lctx_jax.data.load_tokenizer`
    finds tokenizer.model or tokenizer.json there)."""
    return paths.as_path(config.tokenizer or config.init_from)


def fingerprint(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The fields a resumed run must share with the run that wrote its checkpoints."""
    keep = ("seed", "init_from", "model", "tokenizer", "data", "dtype", "param_dtype", "lora",
            "optimizer", "stages")
    # Not config.nonfinite: a "stop" run's checkpoints hold finite steps only, which "skip"
    # computes alike, so a diverged run can resume with --config.nonfinite=skip.
    out = {key: plain(config[key]) for key in keep}
    for s in out["stages"]:  # fields at their defaults are left out, as before they existed
        for key, default in (("infini", None), ("task", "text"), ("retrieval", None)):
            if s.get(key, default) == default:
                s.pop(key, None)
    for key, default in (("gate_lr", 1e-2), ("gate_weight_decay", 0.0)):
        if out["optimizer"].get(key) == default:
            out["optimizer"].pop(key)
    if config.hf_overrides:  # only when set: runs without it keep their fingerprint
        out["hf_overrides"] = plain(config.hf_overrides)
    from lctx_jax import data  # (TFDS) only here: configs load without it
    corpus = data.fingerprint_of(config.data.dataset)  # the documents, not only their name
    if corpus is not None:
        out["corpus"] = corpus
    return out


def pod_config(init_from: str, run_dir: str) -> ml_collections.ConfigDict:
    """What the 7B/8B recipes in configs/ share: PG19 from TFDS, bf16 compute on f32 master
    weights, full remat, AdamW (0.9, 0.95) without weight decay (PI, YaRN and LongLoRA)."""
    c = default_config()
    c.init_from = init_from
    c.run_dir = run_dir
    c.data.dataset = "pg19"
    c.data.text_key = "book_text"
    c.dtype = "bfloat16"
    c.remat = "full"
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.checkpoint_every = 50
    c.eval_batches = 2
    c.summary_documents = 0  # one device's forward at the stage's length: eval.py on a mesh
    c.distributed = True  # a pod slice: one process per host (jax.distributed detects them)
    return c
