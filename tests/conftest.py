"""Test session setup. pytest imports this before any test module, hence before jax: 8
simulated CPU devices for the sharded tests (test_ring.py, test_sharding.py); an XLA_FLAGS
already set in the environment wins. libtpu (compile-only TPU topologies, test_aot.py) takes a
lock file per machine; the test process and the `train.py --compile_only` it starts both load
it, which ALLOW_MULTIPLE_LIBTPU_LOAD permits (no TPU is ever attached here)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


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
