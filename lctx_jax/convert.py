"""Hugging Face safetensors checkpoints <-> lctx_jax parameters, and the conversion CLI.

    python -m lctx_jax.convert hf-to-orbax SRC DST
    python -m lctx_jax.convert orbax-to-hf SRC DST

Safetensors only: pickle-based files (pytorch_model.bin) are never unpickled. Every expected
tensor must be present with the shape the config implies; anything else is an error that names
the tensor, never a silently wrong model.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from jax.experimental import multihost_utils
from safetensors.numpy import save as safetensors_bytes
from tqdm.auto import tqdm

from lctx_jax import models, paths, sharding
from lctx_jax.model import Model

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved
MAX_SHARD_BYTES = 5 * 2**30


# ----------------------------------------------------------------------------- reading


class SafetensorsReader:
    """Tensors of a checkpoint directory: model.safetensors or sharded with an index."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = pathlib.Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (self.path / "model.safetensors").exists():
            files = ["model.safetensors"]
        else:
            pickled = [p.name for p in self.path.glob("*.bin")] + [p.name for p in self.path.glob("*.pt")]
            hint = (f" Found {pickled}: pickle files are never loaded (they can run code); "
                    "re-save with transformers' save_pretrained(..., safe_serialization=True)."
                    if pickled else "")
            raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in "
                                    f"{self.path}.{hint}")
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

    def get(self, name: str) -> np.ndarray:
        try:
            return self._handles[self._where[name]].get_tensor(name)
        except SafetensorError as err:
            raise ValueError(f"tensor {name} in {self._where[name]} cannot be read ({err}); the "
                             "file may be truncated") from err

    def get_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a tensor, reading only those."""
        try:
            return self._handles[self._where[name]].get_slice(name)[start:stop]
        except SafetensorError as err:
            raise ValueError(f"tensor {name} in {self._where[name]} cannot be read ({err}); the "
                             "file may be truncated") from err


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    file = pathlib.Path(path) / "config.json"
    if not file.exists():
        raise FileNotFoundError(f"{file} not found: a Hugging Face checkpoint directory holds "
                                "config.json and *.safetensors")
    return json.loads(file.read_text())


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
        handle = reader._handles[reader._where[name]]
        actual = tuple(handle.get_slice(name).get_shape())
        if actual != shape:
            raise ValueError(f"tensor {name} has shape {actual}, but config.json implies "
                             f"{shape}: the checkpoint and config.json do not belong together")


def iter_params_from_hf(reader: SafetensorsReader, config: Any, dtype: Any = None,
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
            rope_scaling: Mapping[str, Any] | None = None, attention: str = "xla",
            mesh: Any = None, param_dtype: Any = None, remat: str = "none",
            progress: bool = False) -> Model:
    """A Model from a transformers checkpoint directory (config.json + *.safetensors).

    dtype: compute dtype. param_dtype: storage dtype, default the checkpoint's (bf16 stays bf16).
    rope_scaling: a context-extension method put on the checkpoint, e.g.
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096}.
    mesh: a Mesh from `lctx_jax.make_mesh`: every parameter is split by the sharding rules
    (`lctx_jax.sharding`). Each leaf is built on the host once and each device receives only
    its own shard (`jax.make_array_from_callback`); the host copy is dropped before the next
    leaf is read, so host memory peaks at about one stacked leaf (e.g. all layers' gate
    kernels), not the model.
    """
    config = models.config_from_hf(read_hf_config(path), rope_scaling)
    rules = models.family_of(config).sharding_rules
    params: dict = {}
    for leaf_path, host in iter_params_from_hf(SafetensorsReader(path), config, param_dtype,
                                               progress):
        if mesh is None:
            value = jax.device_put(host)
        else:
            spec = sharding.param_spec("/".join(leaf_path), host.shape, mesh, rules,
                                       config.head_dim)
            value = sharding.place(host, jax.sharding.NamedSharding(mesh, spec))
        del host  # the device copy is all that is kept
        _set(params, leaf_path, value)
    return Model(config, params, dtype=dtype, attention=attention, remat=remat, mesh=mesh)


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
        shards[-1][name] = np.ascontiguousarray(array)
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
    if args.command == "hf-to-orbax":
        model = from_hf(args.src, progress=True)
        checkpoint.save(model, args.dst)
    else:
        model = checkpoint.load(args.src)
        to_hf(model, args.dst, progress=True)
    print(f"{args.command}: wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
