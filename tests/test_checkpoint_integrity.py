"""Checkpoint integrity: a flipped bit in an Orbax parameter file (which Orbax itself loads
without complaint) fails `lctx_jax.load` naming the array, as does a damaged train-loop
checkpoint on resume; checksums do not depend on how an array is sharded; checkpoints written
before manifests still load."""

import json
import pathlib
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from test_training import TINY_MODEL, tiny_config, workspace  # noqa: F401 (the fixture)

import lctx_jax as lx
from lctx_jax import checksums, training
from lctx_jax.train_config import ConfigError, stage


def tiny_model() -> lx.Model:
    return lx.Model.init(lx.ModelConfig.from_hf(TINY_MODEL), jax.random.key(0))


def damage(directory: pathlib.Path, count: int = 0) -> None:
    """Flips one bit in the middle of the largest file under `directory` (Orbax's OCDBT data
    file, holding the arrays' bytes), or with count > 0 inverts `count` bytes there."""
    files = [p for p in directory.rglob("*") if p.is_file()]
    target = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    middle = len(data) // 2
    if count:
        data[middle:middle + count] = bytes(b ^ 0xFF for b in data[middle:middle + count])
    else:
        data[middle] ^= 0x10
    target.write_bytes(bytes(data))


def changed_arrays(a, b) -> list[str]:
    flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
    flat_b = jax.tree_util.tree_leaves(b)
    return [jax.tree_util.keystr(path, simple=True, separator="/")
            for (path, x), y in zip(flat_a, flat_b)
            if not np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True)]


def test_a_flipped_bit_fails_load_naming_the_array(tmp_path):
    model = tiny_model()
    lx.save(model, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "checksums.json").exists()
    np.testing.assert_array_equal(lx.load(tmp_path / "ckpt").params["norm"]["scale"],
                                  model.params["norm"]["scale"])  # intact: verifies
    damage(tmp_path / "ckpt" / "params")
    # the explicit opt-out (and no finite check: the flipped bit may be an exponent's -> inf)
    unverified = lx.load(tmp_path / "ckpt", verify=False, check_finite=False)
    changed = changed_arrays(model.params, unverified.params)
    assert len(changed) == 1, changed  # what Orbax alone loads: one wrong value, no error
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'ckpt'} is corrupt: array "
                                                   f"{changed[0]} ")) as err:
        lx.load(tmp_path / "ckpt")
    assert "another copy" in str(err.value) and "re-save" in str(err.value)


def test_many_damaged_bytes_are_a_clear_error(tmp_path):
    lx.save(tiny_model(), tmp_path / "ckpt")
    damage(tmp_path / "ckpt" / "params", count=256)
    with pytest.raises(ValueError, match="corrupt|damaged") as err:
        lx.load(tmp_path / "ckpt")
    assert str(tmp_path / "ckpt") in str(err.value)


def test_checkpoints_without_a_manifest_load_unverified(tmp_path):
    model = tiny_model()
    lx.save(model, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "checksums.json").unlink()  # config.json still names it
    with pytest.raises(ValueError, match="checksums.json but it is missing"):
        lx.load(tmp_path / "ckpt")
    config_file = tmp_path / "ckpt" / "config.json"  # as saved before manifests existed
    config = json.loads(config_file.read_text())
    del config["lctx_jax"]["checksums"]
    config_file.write_text(json.dumps(config))
    restored = lx.load(tmp_path / "ckpt")
    assert not changed_arrays(model.params, restored.params)


def test_checksums_do_not_depend_on_sharding_and_see_every_word():
    x = jax.random.normal(jax.random.key(1), (16, 24))
    tree = {"f32": x, "bf16": {"w": x.astype(jnp.bfloat16)},
            "int": jnp.arange(40, dtype=jnp.int32).reshape(8, 5), "step": jnp.int32(7),
            "mask": [jnp.arange(8) % 3 == 0], "int8": jnp.arange(16, dtype=jnp.int8)}
    plain = checksums.checksums(jax.device_put(tree, jax.devices()[0]))
    assert sorted(plain) == ["bf16/w", "f32", "int", "int8", "mask/0", "step"]
    assert all(re.fullmatch(r"[0-9a-f]{16}", v) for v in plain.values())
    mesh = lx.make_mesh(data=2, fsdp=2, tensor=2)
    specs = {"f32": P("data", ("fsdp", "tensor")), "bf16": {"w": P("tensor", "data")},
             "int": P(("data", "fsdp", "tensor")), "step": P(), "mask": [P("fsdp")],
             "int8": P(("fsdp", "data"))}
    sharded = jax.tree.map(lambda v, s: jax.device_put(v, NamedSharding(mesh, s)), tree, specs)
    assert len(sharded["f32"].sharding.device_set) == 8
    assert checksums.checksums(sharded) == plain
    # One changed word (the last ulp of one value, one bf16 bit, one int) changes its entry
    # only; so does swapping two values.
    one_ulp = tree["f32"].at[5, 7].set(jnp.nextafter(x[5, 7], jnp.inf))
    swapped = tree["int"].at[0, 1].set(tree["int"][1, 0]).at[1, 0].set(tree["int"][0, 1])
    bf16 = jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(
        tree["bf16"]["w"], jnp.uint16).at[3, 3].add(1), jnp.bfloat16)
    for key, value in (("f32", one_ulp), ("int", swapped), ("bf16", {"w": bf16})):
        changed = checksums.checksums({**tree, key: value})
        assert [k for k in plain if changed[k] != plain[k]] == [
            "bf16/w" if key == "bf16" else key]
    with pytest.raises(ValueError, match=r"/x is corrupt: array f32 does not match"):
        checksums.verify(checksums.checksums({**tree, "f32": one_ulp}), plain, "/x")
    checksums.verify(checksums.checksums(sharded), plain, "/x")


def test_a_damaged_train_checkpoint_fails_the_resume_naming_it(workspace, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    c = tiny_config(workspace, run_dir, eval_batches=0, checkpoint_every=2)
    c.stages = [stage("base", seq_len=32, batch_size=4, steps=2, lr=3e-3)]
    training.run(c)
    step_dir = run_dir / "checkpoints" / "2"
    meta_file = step_dir / "meta" / "metadata"
    saved = json.loads(meta_file.read_text())["checksums"]
    assert "trainable/layers/q/kernel" in saved and "opt_state/1/0/count" in saved

    def resume(**overrides) -> None:  # the stage resumes at its end, then saves its model
        shutil.rmtree(run_dir / "models", ignore_errors=True)
        training.run(tiny_config(workspace, run_dir, eval_batches=0, checkpoint_every=2,
                                 stages=c.stages, **overrides))

    damage(step_dir / "state")
    with pytest.raises(ConfigError, match=re.escape(f"the checkpoint {step_dir} is corrupt: "
                                                    "array ")) as err:
        resume()
    named = re.search(r"corrupt: array (\S+) does not match", str(err.value)).group(1)
    assert named in saved and f"delete {step_dir}" in str(err.value)
    assert not (run_dir / "models" / "base").exists()
    resume(verify_checkpoints=False)  # the opt-out resumes
    meta = json.loads(meta_file.read_text())
    del meta["checksums"]  # a checkpoint written before checksums: resumes unverified
    meta_file.write_text(json.dumps(meta))
    resume()
    # the model holds the flipped bit (verification was off): which array and bit it lands in
    # depends on Orbax's file layout, and an exponent bit makes an inf, so not checked here
    assert lx.load(run_dir / "models" / "base", check_finite=False) is not None
