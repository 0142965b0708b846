"""eval.py's run (lctx_jax.comparison) end to end on a tiny model: search, perplexity and
passkey for every method and length, the report, and the config errors."""

import json

import jax
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
