"""Test session setup. pytest imports this before any test module, hence before jax: 8
simulated CPU devices for the sharded tests (test_ring.py, test_sharding.py). An XLA_FLAGS
already set in the environment wins."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
