"""Methods side by side: what `python eval.py --config configs/X.py` runs.

For each setting (a checkpoint, e.g. the demo model before and after fine-tuning), each
context-extension method and each length: perplexity (truncate or sliding-window protocol,
`lctx_jax.evaluation`) and passkey retrieval accuracy; first, LongRoPE's evolutionary search
for every length that needs factors (`lctx_jax.longrope_search`, resumable). Results go to
out_dir as results.json, results.md and PNG plots (`lctx_jax.report`).

Config fields (`default_config`):
  out_dir            where the report, the searched factors and the search states go
  tokenizer          tokenizer.model / tokenizer.json or a directory with one ("" = the first
                     checkpoint's directory)
  data               dataset ("stdlib" or a TFDS name such as "pg19"), split, search_split,
                     data_dir, text_key
  original_length    L, the window the checkpoints were trained at
  lengths            evaluated lengths (tokens)
  methods            names from lctx_jax.methods.METHODS, plus "longrope" (searched factors),
                     or rope dicts {"name": label, "rope_type": ..., other HF rope_scaling
                     fields}: "factor" (default length / L) and
                     "original_max_position_embeddings" (default L) are filled in per length
  settings           list of {name, checkpoint, rope, methods}: checkpoint is a directory (HF
                     or lctx_jax), "{method}" in it is replaced by the method name; rope
                     "per_length" puts each method on the checkpoint with factor = length / L
                     (no fine-tuning), "checkpoint" keeps the RoPE (or Infini-attention) the
                     checkpoint was trained with (each method's own fine-tuned model);
                     methods: this setting's rows instead of config.methods (with rope
                     "checkpoint" any names: they only label rows and fill "{method}")
  perplexity         mode ("truncate" | "sliding"), documents (how many, each >= max length
                     tokens), stride (sliding), batch_size
  passkey            enabled, depths, trials, style ("prose" | "python"), seed, batch_size
  needle             multi-key needle-in-a-haystack (`evaluation.needle_accuracy`): enabled,
                     needles (keys per prompt), depths, trials, seed, batch_size, documents
                     (haystack: that many documents of data.split), settings (names whose
                     rows get a heat map; () = every setting)
  search             enabled, documents, population, parents, mutations, crossovers,
                     iterations, probability, seed (SearchConfig fields); only: run the
                     searches and stop (their factors feed a fine-tune before evaluating)
  dtype              compute dtype
  mesh               data / fsdp / tensor / sequence axis sizes (-1: the rest) and num_devices
                     (0: all; N: the first N), as train.py's; default one device. On more than
                     one, parameters are placed by the training sharding rules and each window's
                     tokens split over "sequence" (`eval_mesh` checks the lengths divide)
  attention          the forwards' attention (`lctx_jax.attention.attend`): "xla", "flash",
                     "splash", "cudnn", or "ring" (sequence parallel; windows split over
                     mesh.sequence); an Infini-attention checkpoint keeps "infini"
  attention_block_size  its block (None: each kernel's default)
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax.numpy as jnp
import ml_collections

from lctx_jax import (architectures, checkpoint, convert, data, evaluation, longrope_search,
                      methods, paths, report, rope, sharding, training)
from lctx_jax.attention import IMPLEMENTATIONS
from lctx_jax.model import INFINI, Model
from lctx_jax.train_config import ConfigError, plain

ROPE_MODES = ("per_length", "checkpoint")
ATTENTION = tuple(impl for impl in IMPLEMENTATIONS if impl != "s2")  # S²-Attn trains only
_WHOLE_WINDOW = ("flash", "splash", "cudnn")  # kernels that attend a whole window per device


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.out_dir = "runs/eval"
    c.tokenizer = ""
    c.data = ml_collections.ConfigDict(dict(dataset="stdlib", split="validation",
                                            search_split="train", data_dir="",
                                            text_key="text"))
    c.original_length = 4096
    c.lengths = (4096, 8192, 16384, 32768)
    c.methods = ("none", "pi", "ntk", "dynamic", "yarn", "longrope")
    c.settings = []
    c.perplexity = ml_collections.ConfigDict(dict(mode="truncate", documents=5, stride=256,
                                                  batch_size=1))
    c.passkey = ml_collections.ConfigDict(dict(enabled=True, depths=(0.1, 0.5, 0.9), trials=10,
                                               style="prose", seed=0, batch_size=5))
    c.needle = ml_collections.ConfigDict(dict(enabled=False, needles=4,
                                              depths=(0.0, 0.25, 0.5, 0.75, 1.0), trials=4,
                                              seed=0, batch_size=4, documents=8, settings=()))
    c.search = ml_collections.ConfigDict(dict(enabled=True, documents=5, population=64,
                                              parents=32, mutations=16, crossovers=16,
                                              iterations=40, probability=0.3, seed=0,
                                              only=False))
    c.dtype = "float32"
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1, sequence=1,
                                            num_devices=1))
    c.attention = "xla"
    c.attention_block_size = ml_collections.config_dict.placeholder(int)  # None, or an int
    return c


def setting(name: str, checkpoint_dir: str, rope: str, methods: tuple[str, ...] = ()
            ) -> ml_collections.ConfigDict:
    """One row group of the report; `methods` () means config.methods."""
    return ml_collections.ConfigDict(dict(name=name, checkpoint=checkpoint_dir, rope=rope,
                                          methods=tuple(methods)))


def _methods(config: ml_collections.ConfigDict, s: ml_collections.ConfigDict
             ) -> tuple[str, ...]:
    """The setting's method names (a rope dict entry by its "name")."""
    return tuple(method_name(m) for m in (s.get("methods") or config.methods))


def method_name(entry: str | dict) -> str:
    return entry if isinstance(entry, str) else str(entry.get("name"))


def _method_entries(config: ml_collections.ConfigDict) -> list[tuple[str, Any]]:
    """(field, entry) of every entry of config.methods and of the settings' methods."""
    return [("config.methods", m) for m in config.methods] + [
        (f"config.settings[{i}].methods", m) for i, s in enumerate(config.settings)
        for m in (s.get("methods") or ())]


def custom_methods(config: ml_collections.ConfigDict) -> dict[str, dict[str, Any]]:
    """{name: its rope fields} of the rope-dict entries of config.methods and the settings."""
    return {str(m["name"]): {k: v for k, v in plain(m).items() if k != "name"}
            for _, m in _method_entries(config) if not isinstance(m, str)}


def _check_rope_dicts(config: ml_collections.ConfigDict) -> None:
    seen: dict[str, dict] = {}
    for field, m in _method_entries(config):
        if isinstance(m, str):
            continue
        m = plain(m)
        if not isinstance(m, dict) or not isinstance(m.get("name"), str):
            raise ConfigError(f"{field}: {m!r} is neither a method name nor a rope dict with a "
                              "\"name\" (its label) and a \"rope_type\"")
        if m.get("rope_type") not in rope.ROPE_TYPES[1:]:
            raise ConfigError(f"{field}: rope dict {m['name']!r} has rope_type "
                              f"{m.get('rope_type')!r}; use one of {rope.ROPE_TYPES[1:]}")
        if m["name"] in (*methods.METHODS, "longrope"):
            raise ConfigError(f"{field}: rope dict name {m['name']!r} is a built-in method's; "
                              "give it a label of its own")
        if seen.setdefault(m["name"], m) != m:
            raise ConfigError(f"{field}: two different rope dicts are named {m['name']!r}; "
                              "give each its own name")


def _searches(config: ml_collections.ConfigDict) -> bool:
    """Whether some setting puts LongRoPE's searched factors on its checkpoint."""
    return any("longrope" in _methods(config, s) for s in config.settings
               if s.rope == "per_length")


def validate(config: ml_collections.ConfigDict, published: bool = False) -> None:
    """Raises ConfigError naming the first bad field, before any model is loaded. published:
    for `--compile_only` (`lctx_jax.aot.compile_eval`), which reads no weights: a checkpoint
    directory without config.json is fine when `lctx_jax.architectures` knows its name, and
    no searched factors are needed."""
    unknown = set(config.keys()) - set(default_config().keys())
    if unknown:
        raise ConfigError(f"config has unknown fields {sorted(unknown)}; known: "
                          f"{sorted(default_config().keys())}")
    _check_rope_dicts(config)
    known = (*methods.METHODS, "longrope", *custom_methods(config))
    bad = [m for m in map(method_name, config.methods) if m not in known]
    if bad:
        raise ConfigError(f"config.methods: {bad} unknown; use names from {known}")
    if not config.lengths or min(config.lengths) < 2:
        raise ConfigError("config.lengths: give lengths of at least 2 tokens")
    if config.perplexity.mode not in ("truncate", "sliding"):
        raise ConfigError(f"config.perplexity.mode={config.perplexity.mode!r}; use 'truncate' "
                          "or 'sliding'")
    if config.attention not in ATTENTION:
        raise ConfigError(f"config.attention={config.attention!r}; use one of {ATTENTION}")
    block = config.attention_block_size
    if block is not None and (not isinstance(block, int) or isinstance(block, bool) or block < 1):
        raise ConfigError(f"config.attention_block_size={block!r} must be an int >= 1, or None "
                          "for each kernel's default")
    if not config.settings:
        raise ConfigError("config.settings is empty; add setting(name, checkpoint, rope)")
    unknown_settings = set(config.needle.settings) - {s.name for s in config.settings}
    if config.needle.enabled and (unknown_settings or config.needle.documents < 1
                                  or config.needle.needles < 1):
        raise ConfigError(f"config.needle: settings {sorted(unknown_settings)} are not in "
                          "config.settings, or documents / needles < 1; name settings of "
                          "config.settings (() = all) and give documents, needles >= 1")
    missing = []
    for i, s in enumerate(config.settings):
        if s.rope not in ROPE_MODES:
            raise ConfigError(f"config.settings[{i}].rope={s.rope!r}; use one of {ROPE_MODES}")
        bad = [m for m in _methods(config, s) if m not in known]
        if s.rope == "per_length" and bad:
            raise ConfigError(f"config.settings[{i}].methods: {bad} unknown; use names from "
                              f"{known}")
        for method in _methods(config, s):
            path = _checkpoint_dir(s, method)
            if not (path / "config.json").is_file() and not (
                    published and architectures.published(str(path))):
                missing.append(str(path))
    if missing:
        hint = (f"; --compile_only also knows {sorted(architectures.PUBLISHED)} by directory "
                "name" if published else "")
        raise ConfigError(f"checkpoints not found: {sorted(set(missing))}; train them first "
                          "(see the config's docstring for the commands) or drop the method"
                          + hint)
    if config.search.only and not (_searches(config) and config.search.enabled):
        raise ConfigError("config.search.only runs LongRoPE's search alone, but no setting "
                          "with rope 'per_length' has method 'longrope' (or search.enabled is "
                          "False): add one, or set search.only=False")
    if not published and _searches(config) and not config.search.enabled and not all(
            _factors_file(config, n).is_file() for n in _search_lengths(config)):
        raise ConfigError("config.methods has 'longrope' but config.search.enabled is False and "
                          f"no searched factors are in {pathlib.Path(config.out_dir) / 'search'}")


def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Search, perplexity and passkey for every setting × method × length; writes the report."""
    validate(config)
    mesh = eval_mesh(config)
    out_dir = pathlib.Path(config.out_dir).expanduser()
    tokenizer = data.load_tokenizer(config.tokenizer or first_checkpoint(config))
    if config.search.only:
        searched = _searched_factors(config, tokenizer)
        return {"search": {str(n): factors for n, factors in searched.items()}}
    longest = max(config.lengths)
    documents = _long_documents(config, tokenizer, config.data.split, longest,
                                config.perplexity.documents)
    results: dict[str, Any] = {"perplexity": {}, "passkey": {}, "needle": {}, "meta": {
        "original_length": config.original_length, "lengths": list(config.lengths),
        "methods": plain(config.methods), "perplexity": plain(config.perplexity),
        "passkey": plain(config.passkey), "search": plain(config.search),
        "documents": len(documents)}}
    corpus = data.fingerprint_of(config.data.dataset)
    if corpus is not None:
        results["meta"]["corpus"] = corpus
    if config.needle.enabled:
        results["meta"]["needle"] = plain(config.needle)
        texts = data.text_source(config.data.dataset, config.data.split,
                                 config.data.data_dir or None, config.data.text_key)
        haystack = [texts[i] for i in range(min(config.needle.documents, len(texts)))]
    searched = _searched_factors(config, tokenizer) if _searches(config) else {}
    for s in config.settings:
        results["perplexity"][s.name], results["passkey"][s.name] = {}, {}
        for method in _methods(config, s):
            checkpoint_model = with_attention(config, _load(_checkpoint_dir(s, method),
                                                            jnp.dtype(config.dtype), mesh))
            ppl, passkey, needle = {}, [], []
            niah = config.needle.enabled and (not config.needle.settings
                                              or s.name in config.needle.settings)
            for length in config.lengths:
                model = _for_length(config, s, checkpoint_model, method, length, searched)
                ppl[str(length)] = _perplexity(config, model, documents, length)
                line = (f"{s.name} | {method} | {length}: perplexity "
                        f"{ppl[str(length)]['perplexity']:.3f}")
                if config.passkey.enabled:
                    passkey.append(_passkey(config, model, tokenizer, length))
                    accuracy = passkey[-1]["accuracy"][0]
                    line += f", passkey {sum(accuracy) / len(accuracy):.0%}"
                if niah:
                    n = config.needle
                    needle.append(evaluation.needle_accuracy(
                        model, tokenizer, haystack, [length], n.depths, n.trials,
                        needles=n.needles, seed=n.seed, batch_size=n.batch_size))
                    accuracy = needle[-1]["accuracy"][0]
                    line += f", {n.needles}-key haystack {sum(accuracy) / len(accuracy):.0%}"
                print(line, flush=True)
            results["perplexity"][s.name][method] = ppl
            if passkey:
                results["passkey"][s.name][method] = _merge_lengths(passkey)
            if needle:
                results["needle"].setdefault(s.name, {})[method] = _merge_lengths(needle)
    files = report.write_report(results, out_dir)
    print("report: " + ", ".join(str(f) for f in files), flush=True)
    return results


# ----------------------------------------------------------------------------- pieces


def eval_mesh(config: ml_collections.ConfigDict, devices: list[Any] | None = None) -> Any:
    """The mesh config.mesh describes over `devices` (default: every device), or None for one
    device (`training.config_mesh`), checked against the windows: attention "ring" needs a
    "sequence" axis and rows that divide over data × fsdp, the kernels ("flash", "splash",
    "cudnn") whole windows per device, and every length splits evenly over "sequence" (into
    2 chunks per device for ring's zigzag order). ConfigError naming the field otherwise."""
    mesh = training.config_mesh(config, devices)
    shape = {} if mesh is None else mesh.shape
    parts = shape.get(sharding.SEQUENCE_AXIS, 1)
    if config.attention == "ring":
        if parts == 1:
            raise ConfigError("config.attention='ring' splits each window over the mesh axis "
                              "'sequence', but config.mesh gives that axis one device: set "
                              "config.mesh.sequence (-1: every device), or use attention 'xla' "
                              "or 'flash' on one device")
        rows = shape[sharding.DATA_AXIS] * shape[sharding.FSDP_AXIS]
        if config.perplexity.batch_size % rows:
            raise ConfigError(f"config.perplexity.batch_size={config.perplexity.batch_size} "
                              f"must be divisible by config.mesh data × fsdp = {rows} (ring "
                              "attention splits the rows over them)")
        parts *= 2
    elif config.attention in _WHOLE_WINDOW and parts > 1:
        raise ConfigError(f"config.attention={config.attention!r} attends a whole window on each "
                          f"device, but config.mesh splits windows over {parts} 'sequence' "
                          "devices: use attention='ring', or config.mesh.sequence=1")
    bad = [n for n in config.lengths if n % parts]
    if bad:
        raise ConfigError(f"config.lengths: {bad} do not split into {parts} equal parts (the "
                          f"mesh's sequence={shape.get(sharding.SEQUENCE_AXIS, 1)} devices"
                          + (", 2 each for ring attention" if config.attention == "ring" else "")
                          + f"): use multiples of {parts}, or another config.mesh.sequence")
    return mesh


def with_attention(config: ml_collections.ConfigDict, model: Model) -> Model:
    """`model` with config.attention and config.attention_block_size (an Infini-attention
    model keeps "infini", its only attention)."""
    if model.attention == INFINI:
        return model
    try:
        return model.replace(attention=config.attention,
                             attention_block_size=config.attention_block_size)
    except ValueError as err:
        raise ConfigError(f"config.attention={config.attention!r}, config.attention_block_size="
                          f"{config.attention_block_size!r}: {err}") from None


def first_checkpoint(config: ml_collections.ConfigDict) -> pathlib.Path:
    """The checkpoint directory of the first setting's first method."""
    return _checkpoint_dir(config.settings[0], _methods(config, config.settings[0])[0])


def _checkpoint_dir(s: ml_collections.ConfigDict, method: str) -> pathlib.Path:
    return pathlib.Path(s.checkpoint.replace("{method}", method)).expanduser()


def _load(path: pathlib.Path, dtype: Any, mesh: Any = None) -> Model:
    """The checkpoint at `path` (lctx_jax or HF), its parameters placed on `mesh` by the
    sharding rules (None: one device)."""
    if (path / "params").is_dir():
        return checkpoint.load(path, dtype=dtype, mesh=mesh)
    return convert.from_hf(path, dtype=dtype, mesh=mesh)


def _for_length(config: ml_collections.ConfigDict, s: ml_collections.ConfigDict, model: Model,
                method: str, length: int, searched: dict[int, dict]) -> Model:
    """The setting's checkpoint (loaded once) with the method's RoPE for `length`."""
    if s.rope == "checkpoint":
        return model
    factor = length / config.original_length
    custom = custom_methods(config).get(method)
    if factor <= 1 or method == "none":
        scaling = None
    elif method == "longrope":
        scaling = searched[length]
    elif custom is not None:
        scaling = {"factor": factor, "original_max_position_embeddings": config.original_length,
                   **custom}
    else:
        scaling = methods.scaling(method, factor, config.original_length)
    try:
        return model.replace(config=model.config.with_rope_scaling(scaling))
    except ValueError as err:
        raise ConfigError(f"config.methods {method!r} at length {length}: {err}") from None


def _long_documents(config: ml_collections.ConfigDict, tokenizer: data.Tokenizer, split: str,
                    length: int, count: int) -> list:
    texts = data.text_source(config.data.dataset, split, config.data.data_dir or None,
                             config.data.text_key)
    documents = evaluation.tokenize_documents(texts, tokenizer, min_tokens=length, limit=count)
    if len(documents) < count:
        raise ConfigError(f"{config.data.dataset}/{split} has only {len(documents)} documents of "
                          f">= {length} tokens; lower config.perplexity.documents / "
                          "config.search.documents or the largest length")
    return documents


def _perplexity(config: ml_collections.ConfigDict, model: Model, documents: list,
                length: int) -> dict[str, Any]:
    p = config.perplexity
    if p.mode == "truncate":
        result = evaluation.truncate_nll(model, documents, length, batch_size=p.batch_size)
    else:
        result = evaluation.sliding_window_nll(model, documents, length, stride=p.stride,
                                               batch_size=p.batch_size)
    return {"perplexity": result.perplexity, "tokens": result.tokens,
            "documents": result.documents}


def _passkey(config: ml_collections.ConfigDict, model: Model, tokenizer: data.Tokenizer,
             length: int) -> dict[str, Any]:
    p = config.passkey
    return evaluation.passkey_accuracy(model, tokenizer, [length], list(p.depths), p.trials,
                                       seed=p.seed, style=p.style, batch_size=p.batch_size)


def _merge_lengths(per_length: list[dict[str, Any]]) -> dict[str, Any]:
    """passkey_accuracy results of one length each (the RoPE differs per length) as one."""
    merged = dict(per_length[0])
    for key in ("lengths", "accuracy", "examples"):
        merged[key] = [item for out in per_length for item in out[key]]
    return merged


def _search_lengths(config: ml_collections.ConfigDict) -> list[int]:
    return [n for n in config.lengths if n > config.original_length]


def _factors_file(config: ml_collections.ConfigDict, length: int) -> pathlib.Path:
    ratio = length / config.original_length
    name = f"longrope_{ratio:g}x.json"
    return pathlib.Path(config.out_dir).expanduser() / "search" / name


def _searched_factors(config: ml_collections.ConfigDict, tokenizer: data.Tokenizer
                      ) -> dict[int, dict]:
    """LongRoPE's factors per length beyond L: searched (resumably) or read from earlier runs.
    Fitness documents come from `data.search_split`, not the evaluated split."""
    out = {}
    base_setting = next(s for s in config.settings if s.rope == "per_length")
    model = None
    for length in _search_lengths(config):
        path = _factors_file(config, length)
        if not path.is_file():
            if model is None:
                model = _load(_checkpoint_dir(base_setting, "longrope"), jnp.dtype(config.dtype))
            documents = _long_documents(config, tokenizer, config.data.search_split, length,
                                        config.search.documents)
            rope = model.config.rope  # the window L the factors extend
            search = config.search
            search_config = longrope_search.SearchConfig(
                population=search.population, parents=search.parents,
                mutations=search.mutations, crossovers=search.crossovers,
                iterations=search.iterations, p=search.probability, seed=search.seed)
            fitness = longrope_search.perplexity_fitness(model, documents, length)
            result = longrope_search.search(fitness, rope, length, search_config,
                                            state_path=path.with_suffix(".state.json"))
            scaling = longrope_search.rope_scaling(rope, length, result.factors,
                                                   result.start_tokens)
            paths.write_atomically(path, json.dumps(scaling, indent=1))
            print(f"longrope {length}: perplexity {result.fitness:.3f} after "
                  f"{result.evaluations} candidates -> {path}", flush=True)
        out[length] = json.loads(path.read_text())
    return out

