"""eval.py on a mesh (lctx_jax.comparison: config.mesh, config.attention): on 8 simulated CPU
devices a tiny model's perplexities, ring or xla attention with each window split over
"sequence", equal the single-device run's; meshes and lengths that do not fit are ConfigErrors
naming the field; `eval.py --compile_only` (lctx_jax.aot.compile_eval) compiles the perplexity
forward with XLA's TPU compiler for a compile-only v5p slice from config.json alone."""

import importlib.util
import json
import pathlib
import subprocess
import sys

import jax
import pytest

import test_comparison
from lctx_jax import aot, comparison, evaluation
from lctx_jax.train_config import ConfigError
from test_aot import TINY

ROOT = pathlib.Path(__file__).resolve().parents[1]
workspace = test_comparison.workspace  # the fixture: corpus, tokenizer, a tiny checkpoint
pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices: "
                                "XLA_FLAGS=--xla_force_host_platform_device_count=8")


def eval_config(workspace: dict, out_dir, mesh: dict | None = None, attention: str = "xla",
                mode: str = "truncate"):
    c = comparison.default_config()
    c.out_dir = str(out_dir)
    c.tokenizer = workspace["tokenizer"]
    c.data.data_dir = workspace["data_dir"]
    c.original_length = 64
    c.lengths = (128,)
    c.methods = ("yarn",)  # YaRN s = 2: the RoPE reaches the mesh's model too
    c.settings = [comparison.setting("base", str(workspace["root"] / "ckpt"), "per_length")]
    c.perplexity.update(mode=mode, stride=128, documents=2, batch_size=2)
    c.passkey.enabled = False
    c.search.enabled = False
    if mesh is not None:
        c.mesh.update({"data": 1, "num_devices": 0, **mesh})
    c.attention = attention
    return c


@pytest.fixture(scope="module")
def single_device(workspace, tmp_path_factory):
    """mode -> the perplexities of the run on one device."""
    runs = {}

    def results(mode: str) -> dict:
        if mode not in runs:
            config = eval_config(workspace, tmp_path_factory.mktemp(mode), mode=mode)
            runs[mode] = comparison.run(config)["perplexity"]
        return runs[mode]
    return results


@pytest.mark.parametrize("mesh, attention, mode", [
    (dict(sequence=4, num_devices=4), "ring", "truncate"),
    (dict(fsdp=2, tensor=2, sequence=2), "ring", "truncate"),
    (dict(sequence=8), "xla", "sliding")])
def test_perplexity_on_a_mesh_equals_one_device(workspace, single_device, tmp_path, monkeypatch,
                                                mesh, attention, mode):
    config = eval_config(workspace, tmp_path, mesh, attention, mode)
    assert comparison.eval_mesh(config).shape["sequence"] == mesh["sequence"]
    expected = single_device(mode)
    forwards = []  # how each perplexity forward ran
    window_nll = evaluation.window_nll
    monkeypatch.setattr(evaluation, "window_nll", lambda model, *args: forwards.append(
        (model.attention, model.mesh.shape["sequence"])) or window_nll(model, *args))
    got = comparison.run(config)["perplexity"]
    assert set(forwards) == {(attention, mesh["sequence"])}
    for method, per_length in expected["base"].items():
        for length, result in per_length.items():
            assert got["base"][method][length]["tokens"] == result["tokens"]
            assert got["base"][method][length]["perplexity"] == pytest.approx(
                result["perplexity"], rel=1e-5), (method, length)


@pytest.mark.parametrize("changes, named", [
    (dict(attention="ring"), "config.attention='ring' splits each window"),
    (dict(mesh=dict(sequence=3)), "config.mesh: .*8 devices"),
    (dict(mesh=dict(sequence=8), attention="ring", lengths=(64, 100)),
     r"config.lengths: \[100\] do not split into 16 equal parts"),
    (dict(mesh=dict(sequence=4, num_devices=4), lengths=(66,)),
     r"config.lengths: \[66\] .* multiples of 4"),
    (dict(mesh=dict(fsdp=2, sequence=4), attention="ring", batch_size=1),
     "batch_size=1 must be divisible by config.mesh data × fsdp = 2"),
    (dict(mesh=dict(sequence=2, tensor=4), attention="flash"), "attends a whole window"),
])
def test_a_mesh_that_does_not_fit_the_windows_names_the_field(workspace, tmp_path, changes,
                                                                 named):
    config = eval_config(workspace, tmp_path, changes.get("mesh"),
                         changes.get("attention", "xla"))
    config.lengths = changes.get("lengths", config.lengths)
    config.perplexity.batch_size = changes.get("batch_size", 2)
    comparison.validate(config)
    with pytest.raises(ConfigError, match=named):
        comparison.eval_mesh(config)
    with pytest.raises(ConfigError, match=named):  # before anything is read
        comparison.run(config)


@pytest.mark.parametrize("field, value", [("attention", "s2"), ("attention", "ringg"),
                                          ("attention_block_size", 0)])
def test_bad_attention_fields_are_config_errors(workspace, tmp_path, field, value):
    config = eval_config(workspace, tmp_path)
    config[field] = value
    with pytest.raises(ConfigError, match=f"config.{field}={value!r}"):
        comparison.validate(config)


# ----------------------------------------------------------------------------- compile only


@pytest.fixture(scope="module")
def architecture_only(tmp_path_factory) -> pathlib.Path:
    """A checkpoint directory holding config.json and no weights."""
    path = tmp_path_factory.mktemp("arch") / "tiny"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({**TINY, "max_position_embeddings": 4096}))
    return path


def compile_config(checkpoint: pathlib.Path, lengths: tuple) -> object:
    c = comparison.default_config()
    c.settings = [comparison.setting("base", str(checkpoint), "per_length")]
    c.lengths = lengths
    c.dtype = "bfloat16"
    c.mesh.update(data=1, sequence=-1, num_devices=0)
    c.attention = "ring"
    return c


def test_compile_only_sizes_the_perplexity_forward_for_v5p(architecture_only, capsys):
    reports = aot.compile_eval(compile_config(architecture_only, (2048, 8192)), "v5p:2x2x1")
    assert [r.name for r in reports] == ["2048", "8192"] and all(r.fits for r in reports)
    assert reports[0].mesh["sequence"] == 4
    small, large = (r.forward.temporaries for r in reports)
    assert 0 < small < large < 8 * small  # activations per chip: T/P tokens, not T²
    lines = capsys.readouterr().out.splitlines()
    assert "  perplexity forward: arguments" in lines[3]
    assert lines[-1].startswith("fit: all 2 length(s) on v5p:2x2x1 (4 chips): largest peak")


def test_the_7b_config_targets_a_slice_before_any_download():
    spec = importlib.util.spec_from_file_location("eval_llama2_7b",
                                                  ROOT / "configs" / "eval_llama2_7b.py")
    eval_llama2_7b = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eval_llama2_7b)
    config = eval_llama2_7b.get_config("1m")
    assert config.lengths == (1 << 20,) and not config.passkey.enabled
    with pytest.raises(ConfigError, match="checkpoints not found"):
        comparison.validate(config)
    comparison.validate(config, published=True)  # Llama-2-7b-hf: known by name
    assert comparison.eval_mesh(config, aot.topology_devices("v5p-8")).shape["sequence"] == 4
    other = eval_llama2_7b.get_config("/ckpt/Llama-2-7b-hf,2048k")
    assert other.lengths == (1 << 21,) and other.settings[0].checkpoint == "/ckpt/Llama-2-7b-hf"
    assert eval_llama2_7b.get_config("/ckpt/x").lengths == (4096, 8192, 16384, 32768)
    with pytest.raises(ConfigError, match="LENGTH one of"):
        eval_llama2_7b.get_config("1m,2048k")


def test_eval_compile_only_from_the_command_line(architecture_only, tmp_path):
    config = tmp_path / "tiny_eval.py"
    config.write_text(f"""
import sys
sys.path.insert(0, {str(ROOT / 'tests')!r})
from test_eval_mesh import compile_config

def get_config():
    return compile_config(__import__("pathlib").Path({str(architecture_only)!r}), (100,))
""")
    out = subprocess.run([sys.executable, "eval.py", "--config", str(config),
                          "--compile_only=v5p-8"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "eval.py: config error: config.lengths: [100] do not split into 8" in out.stderr
