"""Ahead-of-time compilation for TPU (lctx_jax.aot, `train.py --compile_only`): XLA's real TPU
compiler (libtpu, installed by the `tpu` extra) against compile-only v5p topologies on this CPU.

Small train steps of every attention implementation that runs on a pod (flash: Mosaic kernels
under shard_map; ring: shard_map + ppermute over "sequence"; s2: LongLoRA) compile for a
v5p:2x2x2 slice, a recipe's report ends in one "fit" line with the right exit status, a stage
that does not fit names its largest buffers, the ring step's per-chip memory grows linearly with
T/P under the layer scan, and hosts are given their part of every batch; MEGALODON's
chunk-parallel step compiles too.
"""

import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import lctx_jax as lx
from lctx_jax import aot, training
from lctx_jax.train_config import ConfigError, default_config, stage

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = dict(model_type="llama", vocab_size=512, hidden_size=256, intermediate_size=512,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=1024, bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def v5p8():
    return aot.topology_devices("v5p:2x2x2")


def tiny_config(mesh: dict, stages: list, **overrides):
    c = default_config()
    c.model = dict(TINY)
    c.tokenizer = "never/read.model"
    c.dtype = "bfloat16"
    c.remat = "full"
    c.mesh.update(**mesh)
    c.stages = stages
    for key, value in overrides.items():
        c[key] = value
    return c


MEGALODON = dict(model_type="megalodon", vocab_size=512, model_dim=128, num_layers=2,
                 num_heads=2, z_dim=64, value_dim=128, ffn_hidden_dim=256, cema_ndim=8,
                 chunk_size=128, norm_num_groups=8, swiglu=True, bos_token_id=1, eos_token_id=2)


def test_megalodon_chunk_parallel_step_compiles_for_v5p(v5p8, capsys):
    """MEGALODON's chunk-parallel train step (CEMA and TimestepNorm under shard_map over
    "sequence", states all-gathered, their backward reduce-scattered: TPU lowers no complex
    reduce-scatter) and eval step compile for a v5p:2x2x2 with XLA's TPU compiler."""
    config = tiny_config(dict(data=1, fsdp=2, sequence=4), [
        stage("pretrain", seq_len=1024, batch_size=4, steps=10, lr=1e-4)])
    config.model = dict(MEGALODON)
    reports = aot.compile_only(config, "v5p:2x2x2")
    assert all(r.fits and r.train.temporaries > 0 and r.eval is not None for r in reports)
    assert capsys.readouterr().out.splitlines()[-1].startswith("fit: all")


@pytest.mark.parametrize("name, topology", [
    ("v5p:2x2x2", "v5p:2x2x2"), ("v5p-8", "v5p:2x2x1"), ("v5p-16", "v5p:2x2x2"),
    ("v5p-32", "v5p:2x2x4"), ("v5p-64", "v5p:2x4x4"), ("v5p-128", "v5p:4x4x4"),
    ("v5litepod-16", "v5e:4x4"), ("v6e-8", "v6e:2x4")])
def test_slice_names(name, topology):
    assert aot.topology_name(name) == topology


@pytest.mark.parametrize("name", ["v5p-12", "v5p_2x2", "tpu-8"])
def test_bad_slice_names(name):
    with pytest.raises(ConfigError, match="compile_only"):
        aot.topology_name(name)


def test_flash_s2_and_ring_train_steps_compile_for_v5p(v5p8, capsys):
    """Every stage's train and eval step, LoRA included, compiled by XLA's TPU compiler (flash
    attention's Mosaic kernels too); the report ends with the fit line."""
    batch = dict(seq_len=1024, batch_size=8, steps=10, lr=1e-4)
    lora = default_config().lora
    lora.rank = 8
    flash_s2 = tiny_config(dict(data=2, fsdp=4), [
        stage("flash", attention="flash", **batch),
        stage("s2", attention="s2", rope_scaling={"rope_type": "linear", "factor": 4.0},
              **batch)], lora=lora)
    ring = tiny_config(dict(data=1, fsdp=2, sequence=4), [
        stage("ring", attention="ring", grad_accum=2,
              rope_scaling={"rope_type": "yarn", "factor": 4.0,
                            "original_max_position_embeddings": 256}, **batch)])
    for config in (flash_s2, ring):
        reports = aot.compile_only(config, "v5p:2x2x2")
        assert all(r.fits and r.train.temporaries > 0 and r.eval is not None for r in reports)
        assert capsys.readouterr().out.splitlines()[-1].startswith("fit: all")


def test_flash_kernels_are_in_the_tpu_program(v5p8):
    mesh = lx.make_mesh(data=2, fsdp=4, devices=v5p8)
    rope = lx.RopeConfig.from_hf({"hidden_size": 512, "num_attention_heads": 4,
                                  "max_position_embeddings": 4096})
    x = jax.ShapeDtypeStruct((8, 1024, 4, 128), jnp.bfloat16,
                             sharding=NamedSharding(mesh, P(("data", "fsdp"))))

    def loss(q, k, v):
        out = lx.attention.attend(q, k, v, impl="flash", rope=rope, mesh=mesh)
        return jnp.sum(out.astype(jnp.float32))

    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile().as_text()
    assert text.count("tpu_custom_call") >= 3  # forward, dq, dk/dv: Mosaic, not interpreted


def ring_temporaries(devices, length):
    mesh = lx.make_mesh(data=1, sequence=4, devices=devices[:4])
    config = lx.ModelConfig.from_hf({**TINY, "max_position_embeddings": length})
    params = jax.eval_shape(lambda: lx.Model.init(config, jax.random.key(0)).params)
    model = lx.Model(config, params, attention="ring", mesh=mesh, dtype=jnp.bfloat16,
                     remat="full")
    params = jax.tree.map(lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s),
                          params, model.param_shardings)
    ids = jax.ShapeDtypeStruct((1, length), jnp.int32,
                               sharding=lx.sharding.activation_sharding(mesh, (1, length)))
    step = jax.jit(jax.grad(lambda p, ids: lx.next_token_nll(model, ids, p)))
    return step.lower(params, ids).compile().memory_analysis().temp_size_in_bytes


def test_ring_step_memory_is_linear_in_tokens_per_chip(v5p8):
    small, large = ring_temporaries(v5p8, 8192), ring_temporaries(v5p8, 32768)
    assert large / small < 4.5, (small, large)


def test_a_stage_that_does_not_fit_names_its_largest_buffers(tmp_path):
    config = tmp_path / "big.py"
    config.write_text(f"""
import sys
sys.path.insert(0, {str(ROOT / 'tests')!r})
from test_aot import tiny_config
from lctx_jax.train_config import stage

def get_config():
    return tiny_config(dict(data=8), [stage("huge", seq_len=32768, batch_size=4096, steps=1,
                                            lr=1e-4)], remat="none", eval_batches=0)
""")
    out = subprocess.run([sys.executable, "train.py", "--config", str(config),
                          "--compile_only=v5p-16"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 1, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert "DOES NOT FIT" in out.stdout and "largest buffers" in out.stdout
    assert "GiB: " in lines[lines.index("  largest buffers (XLA's buffer assignment, per "
                                        "chip):") + 1]
    assert lines[-1].startswith("does not fit: stages ['huge']")


def test_recipe_on_its_slice_from_the_command_line():
    """What a user runs before downloading anything: the recipe's architecture is the shipped
    one of the checkpoint it names."""
    out = subprocess.run([sys.executable, "train.py", "--config",
                          "configs/llama2_7b_longlora_100k.py", "--compile_only=v5p:2x2x2"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert out.stdout.splitlines()[-1].startswith("fit: all 1 stage(s) on v5p:2x2x2")


def test_each_host_feeds_its_rows_of_the_batch(v5p8):
    """v5p:2x2x2 has two hosts of 4 chips. sequence=8 spans both: each reads every row (one
    data shard for both; each device takes its tokens). data=8 gives each host its own rows,
    read from a shard of its own, wherever make_mesh puts them."""
    shape = (2, 8, 1024)
    spanning = lx.make_mesh(data=1, sequence=8, devices=v5p8)
    parts = [training.host_part(NamedSharding(spanning, P(None, None, "sequence")), shape, p)
             for p in (0, 1)]
    assert parts == [(tuple(range(8)), 0, 1)] * 2
    rows = lx.make_mesh(data=8, devices=v5p8)
    parts = [training.host_part(NamedSharding(rows, P(None, "data")), shape, p) for p in (0, 1)]
    assert sorted(shard for _, shard, _ in parts) == [0, 1] and parts[0][2] == 2
    assert sorted(parts[0][0] + parts[1][0]) == list(range(8))
    uneven = Mesh([[d for d in v5p8 if d.process_index == 0][:2] + [
        d for d in v5p8 if d.process_index == 1]], ("x", "data"))  # 2 rows vs 4 per host
    with pytest.raises(ConfigError, match="overlapping or unequal"):
        training.host_part(NamedSharding(uneven, P(None, "data")), (2, 6, 1024), 0)
