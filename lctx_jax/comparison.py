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
  methods            names from lctx_jax.methods.METHODS, plus "longrope" (searched factors)
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
  search             enabled, documents, population, parents, mutations, crossovers,
                     iterations, probability, seed (SearchConfig fields)
  dtype              compute dtype
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax.numpy as jnp
import ml_collections

from lctx_jax import (checkpoint, convert, data, evaluation, longrope_search, methods, paths,
                      report)
from lctx_jax.model import Model
from lctx_jax.train_config import ConfigError, plain

ROPE_MODES = ("per_length", "checkpoint")


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
    c.search = ml_collections.ConfigDict(dict(enabled=True, documents=5, population=64,
                                              parents=32, mutations=16, crossovers=16,
                                              iterations=40, probability=0.3, seed=0))
    c.dtype = "float32"
    return c


def setting(name: str, checkpoint_dir: str, rope: str, methods: tuple[str, ...] = ()
            ) -> ml_collections.ConfigDict:
    """One row group of the report; `methods` () means config.methods."""
    return ml_collections.ConfigDict(dict(name=name, checkpoint=checkpoint_dir, rope=rope,
                                          methods=tuple(methods)))


def _methods(config: ml_collections.ConfigDict, s: ml_collections.ConfigDict) -> tuple:
    return tuple(s.get("methods") or config.methods)


def _searches(config: ml_collections.ConfigDict) -> bool:
    """Whether some setting puts LongRoPE's searched factors on its checkpoint."""
    return any("longrope" in _methods(config, s) for s in config.settings
               if s.rope == "per_length")


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the first bad field, before any model is loaded."""
    unknown = set(config.keys()) - set(default_config().keys())
    if unknown:
        raise ConfigError(f"config has unknown fields {sorted(unknown)}; known: "
                          f"{sorted(default_config().keys())}")
    known = (*methods.METHODS, "longrope")
    bad = [m for m in config.methods if m not in known]
    if bad:
        raise ConfigError(f"config.methods: {bad} unknown; use names from {known}")
    if not config.lengths or min(config.lengths) < 2:
        raise ConfigError("config.lengths: give lengths of at least 2 tokens")
    if config.perplexity.mode not in ("truncate", "sliding"):
        raise ConfigError(f"config.perplexity.mode={config.perplexity.mode!r}; use 'truncate' "
                          "or 'sliding'")
    if not config.settings:
        raise ConfigError("config.settings is empty; add setting(name, checkpoint, rope)")
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
            if not (path / "config.json").is_file():
                missing.append(str(path))
    if missing:
        raise ConfigError(f"checkpoints not found: {sorted(set(missing))}; train them first "
                          "(see the config's docstring for the commands) or drop the method")
    if _searches(config) and not config.search.enabled and not all(
            _factors_file(config, n).is_file() for n in _search_lengths(config)):
        raise ConfigError("config.methods has 'longrope' but config.search.enabled is False and "
                          f"no searched factors are in {pathlib.Path(config.out_dir) / 'search'}")


def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Search, perplexity and passkey for every setting × method × length; writes the report."""
    validate(config)
    out_dir = pathlib.Path(config.out_dir).expanduser()
    first = _checkpoint_dir(config.settings[0], _methods(config, config.settings[0])[0])
    tokenizer = data.load_tokenizer(config.tokenizer or first)
    longest = max(config.lengths)
    documents = _long_documents(config, tokenizer, config.data.split, longest,
                                config.perplexity.documents)
    results: dict[str, Any] = {"perplexity": {}, "passkey": {}, "meta": {
        "original_length": config.original_length, "lengths": list(config.lengths),
        "methods": list(config.methods), "perplexity": plain(config.perplexity),
        "passkey": plain(config.passkey), "search": plain(config.search),
        "documents": len(documents)}}
    searched = _searched_factors(config, tokenizer) if _searches(config) else {}
    for s in config.settings:
        results["perplexity"][s.name], results["passkey"][s.name] = {}, {}
        for method in _methods(config, s):
            checkpoint_model = _load(_checkpoint_dir(s, method), jnp.dtype(config.dtype))
            ppl, passkey = {}, []
            for length in config.lengths:
                model = _for_length(config, s, checkpoint_model, method, length, searched)
                ppl[str(length)] = _perplexity(config, model, documents, length)
                line = (f"{s.name} | {method} | {length}: perplexity "
                        f"{ppl[str(length)]['perplexity']:.3f}")
                if config.passkey.enabled:
                    passkey.append(_passkey(config, model, tokenizer, length))
                    accuracy = passkey[-1]["accuracy"][0]
                    line += f", passkey {sum(accuracy) / len(accuracy):.0%}"
                print(line, flush=True)
            results["perplexity"][s.name][method] = ppl
            if passkey:
                results["passkey"][s.name][method] = _merge_lengths(passkey)
    files = report.write_report(results, out_dir)
    print("report: " + ", ".join(str(f) for f in files), flush=True)
    return results


# ----------------------------------------------------------------------------- pieces


def _checkpoint_dir(s: ml_collections.ConfigDict, method: str) -> pathlib.Path:
    return pathlib.Path(s.checkpoint.replace("{method}", method)).expanduser()


def _load(path: pathlib.Path, dtype: Any) -> Model:
    if (path / "params").is_dir():
        return checkpoint.load(path, dtype=dtype)
    return convert.from_hf(path, dtype=dtype)


def _for_length(config: ml_collections.ConfigDict, s: ml_collections.ConfigDict, model: Model,
                method: str, length: int, searched: dict[int, dict]) -> Model:
    """The setting's checkpoint (loaded once) with the method's RoPE for `length`."""
    if s.rope == "checkpoint":
        return model
    factor = length / config.original_length
    if factor <= 1 or method == "none":
        scaling = None
    elif method == "longrope":
        scaling = searched[length]
    else:
        scaling = methods.scaling(method, factor, config.original_length)
    return model.replace(config=model.config.with_rope_scaling(scaling))


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

