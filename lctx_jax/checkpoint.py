"""Orbax checkpoints of a Model: `save(model, dir)` and `load(dir, mesh=None)`, on local disks
or object stores (gs://), from one process or from every process of a multi-host run.

A checkpoint directory holds params/ (Orbax), checksums.json (the manifest) and config.json
(the HF config plus an "lctx_jax" entry with the parameter dtype and the manifest's name).
params/ is written by Orbax with its own commit protocol (a temporary directory renamed when
complete on a local disk, a commit marker on GCS), every process writing its own shards into
that one directory; checksums.json, then config.json, are written after it, by process 0, so a
directory with config.json is complete. A directory without it is a save that was interrupted:
`load` says so, and `save` replaces it.

The manifest holds a checksum of every parameter array (`lctx_jax.checksums`: computed on
device, the same whatever the mesh or the number of hosts), taken from the arrays `save` was
given. `load` recomputes them on the restored arrays and raises ValueError naming the arrays
that differ (a flipped bit or a damaged file in params/, which Orbax itself loads without
complaint), unless verify=False; so what is checked is the whole round trip: file bytes,
decoding and placement. A checkpoint written before manifests existed (no "checksums" entry in
config.json) loads unverified.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from lctx_jax import checksums, models, paths
from lctx_jax.model import Model, ModelSpec

FORMAT = "lctx_jax.checkpoint/1"
MANIFEST = "checksums.json"  # {"algorithm": ..., "arrays": {path: checksum}}


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
    sums = checksums.checksums(model.params)  # on device, while Orbax writes
    checkpointer.wait_until_finished()
    if jax.process_index() == 0:  # the manifest first: config.json, written last, marks done
        manifest = {"algorithm": checksums.ALGORITHM, "arrays": sums}
        paths.write_atomically(path / MANIFEST, json.dumps(manifest, indent=1) + "\n")
        meta = {"format": FORMAT, "param_dtype": str(model.param_dtype), "checksums": MANIFEST}
        dtypes = {_name(leaf_path): str(leaf.dtype) for leaf_path, leaf
                  in jax.tree_util.tree_flatten_with_path(model.params)[0]}
        if len(set(dtypes.values())) > 1:  # e.g. bf16 kernels with f32 norms
            meta["param_dtypes"] = dtypes
        config = {**model.config.to_hf(), "lctx_jax": meta}
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
         attention: str | None = None, remat: str = "none", verify: bool = True,
         check_finite: bool = True) -> Model:
    """Restores a Model saved by `save`; with a mesh, every parameter is restored straight into
    its sharding by the rules (`lctx_jax.sharding.param_shardings`): each device reads only
    its own shard, whatever the mesh the checkpoint was saved from.

    verify: check every restored array against the checkpoint's manifest (one pass over the
    parameters on device) and raise ValueError naming any that differ; False skips it (for
    speed). Checkpoints saved before manifests existed load unverified.
    check_finite: a parameter holding NaN or inf is a ValueError naming it (False: load it
    anyway). attention: as `Model`'s (default "infini" for an Infini-attention model, else
    "xla")."""
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
    hf = paths.read_json(config_file)
    meta = hf.pop("lctx_jax", {})
    if meta.get("format") != FORMAT:
        raise ValueError(f"{config_file} has format {meta.get('format')!r}, expected {FORMAT!r}")
    config = models.config_from_hf(hf)
    expected = _manifest(path, meta) if verify else None
    target = abstract_params(config, jnp.dtype(meta["param_dtype"]), mesh)
    if "param_dtypes" in meta:  # a tree of mixed dtypes restores each leaf in its own
        target = jax.tree_util.tree_map_with_path(
            lambda leaf_path, x: jax.ShapeDtypeStruct(
                x.shape, jnp.dtype(meta["param_dtypes"][_name(leaf_path)]), sharding=x.sharding),
            target)
    try:
        params = ocp.StandardCheckpointer().restore(params_dir, target)
    except Exception as err:  # orbax raises many types for damaged files
        raise ValueError(f"cannot restore the parameters in {params_dir} ({err}); the "
                         "checkpoint is damaged or was written for another config: restore it "
                         "from another copy, or re-save the model") from err
    summary = (checksums.summarize(params, with_checksums=expected is not None)
               if expected is not None or check_finite else None)
    if expected is not None:
        checksums.verify(summary.checksums, expected, f"the checkpoint {path}",
                         advice="its files changed after the save (disk, transfer or copy "
                                "corruption); restore the directory from another copy, or "
                                "re-save the model (lctx_jax.save)")
    if check_finite and summary.nonfinite:
        raise ValueError(f"the checkpoint {path} holds NaN or inf in {summary.nonfinite[0]}: "
                         "the model was saved after training diverged; use an earlier "
                         "checkpoint, or load(..., check_finite=False) to inspect it")
    return Model(config, params, dtype=dtype, attention=attention, remat=remat, mesh=mesh)


def _name(leaf_path: Any) -> str:
    """A leaf's path as `lctx_jax.checksums` names it: "layers/q/kernel"."""
    return jax.tree_util.keystr(leaf_path, simple=True, separator="/")


def _manifest(path: Any, meta: dict) -> dict[str, str] | None:
    """The checksums `save` recorded, or None for a checkpoint saved before manifests."""
    if "checksums" not in meta:
        return None
    manifest_file = path / meta["checksums"]
    if not manifest_file.exists():
        raise ValueError(f"{path} is incomplete: config.json names the manifest "
                         f"{meta['checksums']} but it is missing; restore the directory from "
                         "another copy, or re-save the model (load(..., verify=False) skips "
                         "the check)")
    try:
        manifest = paths.read_json(manifest_file)
        algorithm, arrays = manifest["algorithm"], manifest["arrays"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{manifest_file} is damaged ({err!r}); restore the directory from "
                         "another copy, or re-save the model") from err
    if algorithm != checksums.ALGORITHM:
        raise ValueError(f"{manifest_file} uses checksum algorithm {algorithm!r}; this "
                         f"lctx_jax verifies {checksums.ALGORITHM!r} (load(..., verify=False) "
                         "skips the check)")
    return arrays
