"""eval.py's run (lctx_jax.comparison) end to end on a tiny model: search, perplexity and
passkey for every method and length, the report, and the config errors."""

import json

import jax
import numpy as np
import pytest

import lctx_jax as lx
from lctx_jax import comparison
from lctx_jax.train_config import ConfigError
from test_training import TINY_MODEL


@pytest.fixture(scope="module")
def workspace(small_corpus) -> dict:
    """The shared corpus and tokenizer, and a tiny model saved as an lctx_jax checkpoint."""
    root = small_corpus["root"]
    if not (root / "ckpt").exists():
        config = lx.ModelConfig.from_hf({**TINY_MODEL, "max_position_embeddings": 128})
        lx.save(lx.Model.init(config, jax.random.key(0)), root / "ckpt")
    return small_corpus


def tiny_config(workspace: dict, out_dir):
    c = comparison.default_config()
    c.out_dir = str(out_dir)
    c.tokenizer = workspace["tokenizer"]
    c.data.data_dir = workspace["data_dir"]
    c.original_length = 128
    c.lengths = (128, 256)
    c.methods = ("none", "pi", "yarn", "longrope")
    c.settings = [comparison.setting("base", str(workspace["root"] / "ckpt"), "per_length")]
    c.perplexity.documents = 2
    c.perplexity.batch_size = 2
    c.passkey.update(depths=(0.5,), trials=2, batch_size=2, style="python")
    c.search.update(documents=2, population=4, parents=2, mutations=1, crossovers=1,
                    iterations=2)
    return c


def test_methods_side_by_side_end_to_end(workspace, tmp_path):
    results = comparison.run(tiny_config(workspace, tmp_path / "out"))
    ppl = results["perplexity"]["base"]
    assert set(ppl) == {"none", "pi", "yarn", "longrope"}
    # At the original length every method is the plain RoPE: identical numbers.
    at_l = {method: ppl[method]["128"]["perplexity"] for method in ppl}
    assert len(set(at_l.values())) == 1, at_l
    assert len({ppl[method]["256"]["perplexity"] for method in ppl}) == 4
    searched = json.loads((tmp_path / "out" / "search" / "longrope_2x.json").read_text())
    assert searched["rope_type"] == "longrope" and len(searched["long_factor"]) == 8
    for method in ppl:
        passkey = results["passkey"]["base"][method]
        assert passkey["lengths"] == [128, 256] and len(passkey["accuracy"]) == 2
        assert all(0.0 <= a <= 1.0 for row in passkey["accuracy"] for a in row)
    assert (tmp_path / "out" / "passkey_longrope.png").is_file()
    for name in ("results.json", "results.md", "perplexity.png"):
        assert (tmp_path / "out" / name).is_file()
    table = (tmp_path / "out" / "results.md").read_text()
    assert "longrope" in table and "256" in table


def test_config_errors_name_the_field(workspace, tmp_path):
    c = tiny_config(workspace, tmp_path / "out")
    c.methods = ("none", "rope_magic")
    with pytest.raises(ConfigError, match="config.methods"):
        comparison.validate(c)
    c = tiny_config(workspace, tmp_path / "out")
    c.settings = [comparison.setting("ft", str(tmp_path / "runs-{method}"), "checkpoint")]
    with pytest.raises(ConfigError, match="runs-none"):
        comparison.validate(c)
    c = tiny_config(workspace, tmp_path / "out")
    c.perplexity.mode = "windowed"
    with pytest.raises(ConfigError, match="perplexity.mode"):
        comparison.validate(c)


def test_rope_dicts_as_methods_and_the_needle_haystack(workspace, tmp_path):
    """A method given as a rope dict: its factor and L filled in per length, so a dict equal
    to a named method scores the same, and one with other fields scores differently; the
    needle-in-a-haystack grid runs only for the settings named; the corpus is recorded."""
    c = tiny_config(workspace, tmp_path / "out")
    c.methods = ("yarn", {"name": "yarn, as a dict", "rope_type": "yarn"},
                 {"name": "yarn, beta_fast 8", "rope_type": "yarn", "beta_fast": 8.0})
    c.settings.append(comparison.setting("again", str(workspace["root"] / "ckpt"),
                                         "per_length", ("yarn",)))
    c.lengths = (256, 512)  # the tiny tokenizer's needle and question take 130 tokens
    c.passkey.enabled = False
    c.needle.update(enabled=True, needles=1, depths=(0.0, 1.0), trials=2, batch_size=2,
                    documents=2, settings=("base",))
    model = lx.load(workspace["root"] / "ckpt")
    rope = {m: comparison._for_length(c, c.settings[0], model, m, 512, {}).config.rope
            for m in ("yarn", "yarn, as a dict", "yarn, beta_fast 8")}
    assert rope["yarn, as a dict"] == rope["yarn"] != rope["yarn, beta_fast 8"]
    assert rope["yarn, beta_fast 8"].beta_fast == 8.0 and rope["yarn"].factor == 4.0
    results = comparison.run(c)
    ppl = {m: r["256"]["perplexity"] for m, r in results["perplexity"]["base"].items()}
    assert ppl["yarn, as a dict"] == ppl["yarn"]
    needle = results["needle"]
    assert list(needle) == ["base"] and set(needle["base"]) == set(ppl)
    assert np.array(needle["base"]["yarn"]["accuracy"]).shape == (2, 2)
    assert results["meta"]["corpus"].startswith("stdlib-")
    assert (tmp_path / "out" / "needle_yarn.png").is_file()
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| yarn, beta_fast 8 · base |" in table and "| yarn · again |" in table


@pytest.mark.parametrize("entry, field", [
    ({"rope_type": "yarn"}, "name"),
    ({"name": "x", "rope_type": "magic"}, "rope_type"),
    ({"name": "pi", "rope_type": "linear"}, "built-in"),
])
def test_bad_rope_dict_methods_name_the_problem(workspace, tmp_path, entry, field):
    c = tiny_config(workspace, tmp_path / "out")
    c.methods = ("none", entry)
    with pytest.raises(ConfigError, match=field):
        comparison.validate(c)
