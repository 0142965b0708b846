"""Hugging Face safetensors checkpoints <-> lctx_jax parameters, and the conversion CLI.

    python -m lctx_jax.convert hf-to-orbax SRC DST
    python -m lctx_jax.convert orbax-to-hf SRC DST

Safetensors only: pickle-based files (pytorch_model.bin) are never unpickled. Every expected
tensor must be present, floating point, finite and of the shape the config implies, and a
sharded index may only name files inside the checkpoint directory; anything else is an error
that names the tensor (or file), never a silently wrong model.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import warnings
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from jax.experimental import multihost_utils
from safetensors.numpy import save as safetensors_bytes
from tqdm.auto import tqdm

from lctx_jax import models, paths, sharding
from lctx_jax.attention.infini import InfiniConfig
from lctx_jax.model import Model, ModelSpec

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved
MAX_SHARD_BYTES = 5 * 2**30


# ----------------------------------------------------------------------------- reading


class SafetensorsReader:
    """Tensors of a checkpoint directory: model.safetensors or sharded with an index.

    check_finite: every tensor read is checked for NaN / inf (ValueError naming it).
    """

    def __init__(self, path: str | os.PathLike, check_finite: bool = True) -> None:
        self.path = pathlib.Path(path)
        self.check_finite = check_finite
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            files = _index_files(index)
        elif (self.path / "model.safetensors").exists():
            files = ["model.safetensors"]
        else:
            pickled = [p.name for pattern in ("*.bin", "*.pt") for p in self.path.glob(pattern)]
            hint = (f" Found {pickled}: pickle files are never loaded (they can run code); "
                    "re-save with transformers' save_pretrained(..., safe_serialization=True)."
                    if pickled else "")
            raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in "
                                    f"{self.path}.{hint}")
        self.files = files
        self._handles = {}
        self._where: dict[str, str] = {}
        for name in files:
            file = self.path / name
            if not file.exists():
                raise FileNotFoundError(f"shard {name} listed in model.safetensors.index.json is "
                                        f"missing from {self.path}")
            try:
                handle = safe_open(str(file), framework="numpy")
            except (SafetensorError, OSError) as err:
                raise ValueError(f"{file} is not a complete safetensors file ({err}); it may be "
                                 "truncated: download or convert it again") from err
            self._handles[name] = handle
            for key in handle.keys():
                self._where[key] = name

    def names(self) -> set[str]:
        return set(self._where)

    def _handle(self, name: str) -> Any:
        if name not in self._where:
            raise ValueError(f"checkpoint {self.path} has no tensor {name}")
        return self._handles[self._where[name]]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """The safetensors dtype code, e.g. "BF16", "F32", "I64", "BOOL"."""
        return self._handle(name).get_slice(name).get_dtype()

    def get(self, name: str) -> np.ndarray:
        try:
            value = self._handle(name).get_tensor(name)
        except SafetensorError as err:
            raise ValueError(f"tensor {name} in {self._where[name]} cannot be read ({err}); the "
                             "file may be truncated") from err
        return self._finite(value, name)

    def get_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a tensor, reading only those."""
        try:
            value = self._handle(name).get_slice(name)[start:stop]
        except SafetensorError as err:
            raise ValueError(f"tensor {name} in {self._where[name]} cannot be read ({err}); the "
                             "file may be truncated") from err
        return self._finite(value, f"{name} (rows {start}:{stop})")

    def _finite(self, value: np.ndarray, name: str) -> np.ndarray:
        if self.check_finite and not np.isfinite(value).all():
            bad = np.argwhere(~np.isfinite(value))[0]
            raise ValueError(
                f"tensor {name} of {self.path} holds {value[tuple(bad)]} at index "
                f"{tuple(int(i) for i in bad)}: the weights are damaged or diverged; use "
                "another copy, or pass check_finite=False to load them anyway")
        return value

    def default_dtype(self, hf: Mapping[str, Any]) -> np.dtype:
        """The dtype transformers (5.x, dtype="auto") loads the model in: config.json's
        dtype (or torch_dtype), else the first floating-point tensor's of the first file."""
        named = hf.get("dtype") or hf.get("torch_dtype")
        if named is not None and named != "auto":
            if named not in _FLOAT_DTYPES.values():
                raise ValueError(f"{self.path / 'config.json'}: dtype={named!r} is not one of "
                                 f"{sorted(set(_FLOAT_DTYPES.values()))}")
            return _np_dtype(named)
        first = self._handles[self.files[0]]
        for key in first.keys():
            code = first.get_slice(key).get_dtype()
            if code in _FLOAT_DTYPES:
                return _np_dtype(_FLOAT_DTYPES[code])
        return np.dtype(np.float32)


# safetensors dtype codes of the floating-point types a checkpoint may store
_FLOAT_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


def _np_dtype(name: str) -> np.dtype:
    return np.dtype(jnp.dtype(name))


def _index_files(index: pathlib.Path) -> list[str]:
    """The shard files model.safetensors.index.json names: plain file names or paths inside
    the checkpoint directory (a path that leaves it is refused, whatever the index says). The
    check is on the names: a symlink inside the directory may point elsewhere, as the shards
    of a Hugging Face hub cache snapshot point into its blobs/."""
    weight_map = paths.read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise ValueError(f"{index}: weight_map must be an object of tensor name -> shard file")
    files = sorted(set(weight_map.values()))
    for name in files:
        parts = pathlib.PurePosixPath(name).parts
        if not parts or pathlib.PurePosixPath(name).is_absolute() or ".." in parts or (
                "\\" in name or ":" in name):
            raise ValueError(f"{index} names the shard {name!r}, which is not a file inside "
                             f"{index.parent}; shards must be named relative to the checkpoint "
                             "directory")
    return files


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """config.json of a Hugging Face checkpoint directory, as transformers (5.x) resolves it:
    a config that ties the LM head to the embedding while the weights store a head that
    differs reads untied, with a warning (transformers then keeps both)."""
    file = pathlib.Path(path) / "config.json"
    if not file.exists():
        raise FileNotFoundError(f"{file} not found: a Hugging Face checkpoint directory holds "
                                "config.json and *.safetensors")
    hf = paths.read_json(file)
    if hf.get("tie_word_embeddings") is True and any(
            (file.parent / name).exists() for name in _WEIGHT_FILES):
        hf = _untie_a_distinct_head(SafetensorsReader(file.parent, check_finite=False), hf)
    return hf


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def _untie_a_distinct_head(reader: SafetensorsReader, hf: dict[str, Any]) -> dict[str, Any]:
    try:
        tied = models.family_for(hf.get("model_type")).hf_tied_head
    except ValueError:  # an unknown model_type: config_from_hf says so
        return hf
    if tied is None or not set(tied) <= reader.names():
        return hf
    head, embedding = tied
    if np.array_equal(reader.get(head), reader.get(embedding)):
        return hf
    warnings.warn(f"{reader.path}: config.json ties the LM head to the embedding, but {head} is "
                  f"stored and differs from {embedding}; reading them untied, as transformers "
                  "does (set tie_word_embeddings to false to silence this)", stacklevel=4)
    return {**hf, "tie_word_embeddings": False}


def _check_names_and_shapes(reader: SafetensorsReader, config: Any) -> None:
    layout = models.family_of(config).hf_layout(config)
    present = {n for n in reader.names()
               if not n.endswith(_IGNORED_SUFFIXES) and layout.get(n, ()) is not None}
    layout = {name: shape for name, shape in layout.items() if shape is not None}
    missing, unexpected = sorted(set(layout) - present), sorted(present - set(layout))
    if missing:
        raise ValueError(f"checkpoint {reader.path} lacks {len(missing)} tensors the config "
                         f"implies, e.g. {missing[:3]}")
    if unexpected:
        raise ValueError(f"checkpoint {reader.path} has {len(unexpected)} tensors this "
                         f"{config.model_type} config does not use, e.g. {unexpected[:3]}")
    for name, shape in layout.items():
        actual = reader.shape(name)
        if actual != shape:
            raise ValueError(f"tensor {name} has shape {actual}, but config.json implies "
                             f"{shape}: the checkpoint and config.json do not belong together")
        if reader.dtype(name) not in _FLOAT_DTYPES:
            raise ValueError(f"tensor {name} is stored as {reader.dtype(name)}; weights must be "
                             f"floating point ({', '.join(_FLOAT_DTYPES)}); quantized or "
                             "integer checkpoints are not read")


def iter_params_from_hf(reader: SafetensorsReader, config: Any, dtype: Any,
                        progress: bool = False) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    """(path, numpy array) of every leaf of the family decoder's parameter tree, one leaf at a
    time (the family's `read_hf`), after checking every tensor's name and shape."""
    _check_names_and_shapes(reader, config)
    leaves = models.family_of(config).read_hf(reader, config, dtype)
    yield from tqdm(leaves, desc="tensors", disable=not progress)


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def from_hf(path: str | os.PathLike, dtype: Any = jnp.float32,
            rope_scaling: Mapping[str, Any] | None = None, attention: str | None = None,
            mesh: Any = None, param_dtype: Any = None, remat: str = "none",
            progress: bool = False, check_finite: bool = True, config: Any = None,
            infini: Mapping[str, Any] | None = None) -> Model:
    """A Model from a transformers checkpoint directory (config.json + *.safetensors).

    dtype: compute dtype. param_dtype: storage dtype, default the one transformers loads
    (config.json's dtype, else the first floating-point tensor's: bf16 stays bf16; tensors
    stored in another dtype are cast to it). check_finite: a NaN or inf weight is a ValueError
    naming the tensor (False: load it anyway). A tied config (tie_word_embeddings) whose
    checkpoint stores an lm_head that differs from the embedding is read untied, with a
    warning, as transformers does (`read_hf_config`). config: a family config to read the
    weights with instead of config.json's (e.g. with fields overridden, as train.py's
    hf_overrides); its tensor shapes must be the checkpoint's.
    rope_scaling: a context-extension method put on the checkpoint, e.g.
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096}; the
    model's max_position_embeddings becomes the extended length (`RopeConfig.from_hf`), which
    `to_hf` writes with the original length kept.
    attention: as `Model`'s (default: "infini" for an Infini-attention checkpoint, else
    "xla"). attention="infini" with infini={"segment_len": N, "update": "linear" | "delta",
    "gate_init": β0} puts Infini-attention on any LLaMA-family checkpoint (its gates start at
    gate_init); on an Infini-attention checkpoint `infini` overrides its stored settings.
    mesh: a Mesh from `lctx_jax.make_mesh`: every parameter is split by the sharding rules
    (`lctx_jax.sharding`). Each leaf is built on the host once and each device receives only
    its own shard (`jax.make_array_from_callback`); the host copy is dropped before the next
    leaf is read, so host memory peaks at about one stacked leaf (e.g. all layers' gate
    kernels), not the model.
    """
    hf = read_hf_config(path)
    if config is None:
        config = models.config_from_hf(hf, rope_scaling)
    elif rope_scaling is not None:
        raise ValueError("from_hf takes config= or rope_scaling=, not both: put the scaling on "
                         "the config (config.with_rope_scaling)")
    if attention == "infini" or infini is not None:
        if attention not in (None, "infini"):
            raise ValueError(f"infini settings were given with attention={attention!r}; use "
                             "attention='infini'")
        if not hasattr(config, "with_infini"):
            raise ValueError(f"a {config.model_type} model has no Infini-attention option")
        config = config.with_infini(InfiniConfig.over(config.infini, infini))
    spec = ModelSpec(config, dtype, attention, remat, mesh)  # refuses a bad combination now
    reader = SafetensorsReader(path, check_finite)
    param_dtype = reader.default_dtype(hf) if param_dtype is None else param_dtype
    rules = models.family_of(config).sharding_rules
    stored_config = _as_stored(reader, config)
    params: dict = {}
    for leaf_path, host in iter_params_from_hf(reader, stored_config, param_dtype, progress):
        if mesh is None:
            value = jax.device_put(host)
        else:
            leaf_spec = sharding.param_spec("/".join(leaf_path), host.shape, mesh, rules,
                                            config.head_dim)
            value = sharding.place(host, jax.sharding.NamedSharding(mesh, leaf_spec))
        del host  # the device copy is all that is kept
        _set(params, leaf_path, value)
    if stored_config is not config:
        params = spec.complete_params(params, jax.random.key(0))
    return Model.of(spec, params)


def _as_stored(reader: SafetensorsReader, config: Any) -> Any:
    """The config whose tensors the checkpoint holds: `config`, or for an Infini-attention
    config over a checkpoint without its gates (any LLaMA-family one) the config without
    Infini-attention (the gates are then initialised, `ModelSpec.complete_params`)."""
    if getattr(config, "infini", None) is None:
        return config
    layout = models.family_of(config).hf_layout
    plain = config.with_infini(None)
    gates = set(layout(config)) - set(layout(plain))
    return config if gates & reader.names() else plain


# ----------------------------------------------------------------------------- writing


def params_to_hf(params: Mapping[str, Any], config: Any) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) pairs of the transformers checkpoint (the family's `write_hf`), each
    brought to the host when it is yielded (gathered from every process when it is split
    across hosts, so on several hosts every process must iterate)."""
    return models.family_of(config).write_hf(params, config, to_host)


def to_host(x: Any) -> np.ndarray:
    """A (possibly sharded, possibly multi-host) array as one host numpy array."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def to_hf(model: Model, out_dir: str | os.PathLike, max_shard_bytes: int = MAX_SHARD_BYTES,
          progress: bool = False) -> None:
    """config.json + model.safetensors (sharded with an index past max_shard_bytes) that
    transformers loads with equal logits. Each file is written whole or not at all
    (`lctx_jax.paths.write_atomically`), so a killed export never leaves a half-written file
    under a final name. On several hosts every process calls it (the parameters are gathered
    leaf by leaf) and process 0 writes."""
    out = paths.as_path(out_dir)
    writer = jax.process_index() == 0
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, array in tqdm(params_to_hf(model.params, model.config), desc="tensors",
                            disable=not (progress and writer)):
        if not writer:  # took part in the gathering; keeps nothing
            continue
        if size and size + array.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = np.ascontiguousarray(array).reshape(array.shape)  # keeps 0-d
        size += array.nbytes
    if not writer:
        return
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, shard in zip(names, shards):
        paths.write_atomically(out / name, safetensors_bytes(shard, metadata={"format": "pt"}))
    if len(shards) > 1:
        weight_map = {t: n for n, shard in zip(names, shards) for t in shard}
        total = sum(a.nbytes for shard in shards for a in shard.values())
        paths.write_atomically(out / "model.safetensors.index.json", json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    paths.write_atomically(out / "config.json", json.dumps(model.config.to_hf(), indent=2) + "\n")


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """The conversion CLI. A bad SRC or DST (missing, damaged, not a checkpoint, DST already
    holding one: the ValueError / OSError the readers raise) is one line on stderr and exit
    status 2, as argparse reports bad arguments; other exceptions keep their traceback."""
    from lctx_jax import checkpoint

    parser = argparse.ArgumentParser(prog="python -m lctx_jax.convert",
                                     description="Convert checkpoints between Hugging Face "
                                                 "safetensors and Orbax.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command, help_text in [("hf-to-orbax", "HF directory -> Orbax checkpoint"),
                               ("orbax-to-hf", "Orbax checkpoint -> HF directory")]:
        p = sub.add_parser(command, help=help_text)
        p.add_argument("src")
        p.add_argument("dst")
    args = parser.parse_args(argv)
    dst = paths.as_path(args.dst)
    try:
        if args.command == "hf-to-orbax":
            if checkpoint.is_complete(dst):  # before reading SRC, which can take minutes
                raise FileExistsError(f"{dst} holds a checkpoint; choose a new directory or "
                                      "remove it")
            model = from_hf(args.src, progress=True)
            checkpoint.save(model, dst)
        else:
            if (dst / "config.json").exists():  # no stale shards or index mixed in
                raise FileExistsError(f"{dst} holds a Hugging Face checkpoint (config.json); "
                                      "choose a new directory or remove it")
            model = checkpoint.load(args.src)
            to_hf(model, dst, progress=True)
    except (ValueError, OSError) as err:  # what the readers raise for bad files and configs
        message = " ".join(line.strip() for line in str(err).splitlines())
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        return 2
    print(f"{args.command}: wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
