"""Orbax checkpoints of a Model: `save(model, dir)` and `load(dir, mesh=None)`.

A checkpoint directory holds config.json (the HF config plus an "lctx_jax" entry with the
parameter dtype) and params/ (Orbax). Everything is first written to a sibling temporary
directory and renamed into place at the end, so a directory under the final name is always
complete; a killed save leaves only `<dir>.tmp-*`, which `load` reports.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from lctx_jax import sharding
from lctx_jax.model import Decoder, Model, ModelConfig, default_positions, Context

FORMAT = "lctx_jax.checkpoint/1"


def save(model: Model, ckpt_dir: str | os.PathLike) -> None:
    """Writes `model` to ckpt_dir (which must not exist yet), atomically."""
    final = pathlib.Path(ckpt_dir).absolute()
    if final.exists():
        raise FileExistsError(f"{final} exists; choose a new directory or remove it first")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
    try:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(tmp / "params", model.params)
        checkpointer.wait_until_finished()
        config = {**model.config.to_hf(),
                  "lctx_jax": {"format": FORMAT, "param_dtype": str(model.param_dtype)}}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def abstract_params(config: ModelConfig, param_dtype: Any, mesh: Any) -> Any:
    """Shapes and dtypes of the parameter tree, each leaf carrying the sharding to restore into:
    the sharding rules' on a mesh (`lctx_jax.sharding`), else the first device."""
    ids = jnp.zeros((1, 1), jnp.int32)
    ctx = Context(default_positions(ids), None, None, None, None)
    shapes = jax.eval_shape(Decoder(config, param_dtype=param_dtype).init,
                            jax.random.key(0), ids, ctx)["params"]
    if mesh is None:
        shardings = jax.tree.map(
            lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), shapes)
    else:
        shardings = sharding.param_shardings(shapes, mesh, config.head_dim)
    return jax.tree.map(lambda s, target: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                               sharding=target),
                        shapes, shardings)


def load(ckpt_dir: str | os.PathLike, mesh: Any = None, dtype: Any = jnp.float32,
         attention: str = "xla", remat: str = "none") -> Model:
    """Restores a Model saved by `save`; with a mesh, every parameter is restored straight into
    its sharding by the rules (`lctx_jax.sharding.param_shardings`): each device reads only
    its own shard, whatever the mesh the checkpoint was saved from."""
    path = pathlib.Path(ckpt_dir).absolute()
    if not path.exists():
        partial = sorted(path.parent.glob(path.name + ".tmp-*")) if path.parent.exists() else []
        if partial:
            raise FileNotFoundError(f"{path} does not exist, but {partial[0].name} does: a save "
                                    "was interrupted before it finished; re-run the save")
        raise FileNotFoundError(f"no checkpoint at {path}")
    config_file, params_dir = path / "config.json", path / "params"
    if not config_file.exists() or not params_dir.exists():
        raise ValueError(f"{path} is not an lctx_jax checkpoint: it needs config.json and "
                         "params/ (written by lctx_jax.save)")
    hf = json.loads(config_file.read_text())
    meta = hf.pop("lctx_jax", {})
    if meta.get("format") != FORMAT:
        raise ValueError(f"{config_file} has format {meta.get('format')!r}, expected {FORMAT!r}")
    config = ModelConfig.from_hf(hf)
    target = abstract_params(config, jnp.dtype(meta["param_dtype"]), mesh)
    try:
        params = ocp.StandardCheckpointer().restore(params_dir, target)
    except Exception as err:  # orbax raises many types for damaged files
        raise ValueError(f"cannot restore the parameters in {params_dir} ({err}); the "
                         "checkpoint is damaged or was written for another config") from err
    return Model(config, params, dtype=dtype, attention=attention, remat=remat, mesh=mesh)
