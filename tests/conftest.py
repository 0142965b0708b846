"""Test session setup. pytest imports this before any test module, hence before jax: 8
simulated CPU devices for the sharded tests (test_ring.py, test_sharding.py). An XLA_FLAGS
already set in the environment wins."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> dict:
    """The embedded corpus built once (TFDS) and a 512-token tokenizer trained on 60 of its
    documents: {"root", "data_dir", "tokenizer" (path)}, shared by the training / eval tests."""
    from lctx_jax import data
    root = tmp_path_factory.mktemp("corpus")
    data_dir = str(root / "tfds")
    docs = data.text_source("stdlib", "train", data_dir)
    tokenizer = root / "tok512.model"
    data.train_tokenizer((docs[i] for i in range(60)), 512, tokenizer)
    return {"root": root, "data_dir": data_dir, "tokenizer": str(tokenizer)}
