"""Orbax checkpoints of a Model: `save(model, dir)` and `load(dir, mesh=None)`, on local disks
or object stores (gs://), from one process or from every process of a multi-host run.

A checkpoint directory holds params/ (Orbax) and config.json (the HF config plus an "lctx_jax"
entry with the parameter dtype). params/ is written by Orbax with its own commit protocol (a
temporary directory renamed when complete on a local disk, a commit marker on GCS), every
process writing its own shards into that one directory; config.json is written after it, by
process 0, so a directory with config.json is complete. A directory without it is a save that
was interrupted: `load` says so, and `save` replaces it.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from lctx_jax import models, paths
from lctx_jax.model import Model, ModelSpec

FORMAT = "lctx_jax.checkpoint/1"


def save(model: Model, ckpt_dir: str | os.PathLike) -> None:
    """Writes `model` to ckpt_dir (which must not hold a complete checkpoint yet). On several
    hosts every process calls it, with the same directory."""
    path = paths.as_path(ckpt_dir)
    if is_complete(path):
        raise FileExistsError(f"{path} holds a checkpoint; choose a new directory or remove it")
    if jax.process_index() == 0 and path.exists():  # left by an interrupted save
        path.rmtree()
    _barrier("lctx_jax.save: cleared")  # every process, whatever it saw
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path / "params", model.params)
    checkpointer.wait_until_finished()
    if jax.process_index() == 0:
        config = {**model.config.to_hf(),
                  "lctx_jax": {"format": FORMAT, "param_dtype": str(model.param_dtype)}}
        paths.write_atomically(path / "config.json", json.dumps(config, indent=2) + "\n")
    _barrier("lctx_jax.save: done")


def is_complete(ckpt_dir: str | os.PathLike) -> bool:
    """Whether ckpt_dir holds a checkpoint that `save` finished."""
    return (paths.as_path(ckpt_dir) / "config.json").exists()


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def abstract_params(config: Any, param_dtype: Any, mesh: Any) -> Any:
    """Shapes and dtypes of the parameter tree, each leaf carrying the sharding to restore into:
    the family's sharding rules on a mesh (`lctx_jax.sharding`), else the first device."""
    return ModelSpec(config, mesh=mesh).abstract_params(param_dtype)


def load(ckpt_dir: str | os.PathLike, mesh: Any = None, dtype: Any = jnp.float32,
         attention: str = "xla", remat: str = "none") -> Model:
    """Restores a Model saved by `save`; with a mesh, every parameter is restored straight into
    its sharding by the rules (`lctx_jax.sharding.param_shardings`): each device reads only
    its own shard, whatever the mesh the checkpoint was saved from."""
    path = paths.as_path(ckpt_dir)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    config_file, params_dir = path / "config.json", path / "params"
    if not config_file.exists():
        raise FileNotFoundError(f"{path} has no config.json: a save was interrupted before it "
                                "finished (or this is not an lctx_jax checkpoint); re-run the "
                                "save")
    if not params_dir.exists():
        raise ValueError(f"{path} is not an lctx_jax checkpoint: it needs config.json and "
                         "params/ (written by lctx_jax.save)")
    hf = json.loads(config_file.read_text())
    meta = hf.pop("lctx_jax", {})
    if meta.get("format") != FORMAT:
        raise ValueError(f"{config_file} has format {meta.get('format')!r}, expected {FORMAT!r}")
    config = models.config_from_hf(hf)
    target = abstract_params(config, jnp.dtype(meta["param_dtype"]), mesh)
    try:
        params = ocp.StandardCheckpointer().restore(params_dir, target)
    except Exception as err:  # orbax raises many types for damaged files
        raise ValueError(f"cannot restore the parameters in {params_dir} ({err}); the "
                         "checkpoint is damaged or was written for another config") from err
    return Model(config, params, dtype=dtype, attention=attention, remat=remat, mesh=mesh)
