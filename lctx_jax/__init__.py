"""lctx_jax: context-window extension for long-context language models in JAX/Flax.

The public interface is re-exported here (see the README: "Models and checkpoints").
"""

from lctx_jax import attention, models, rope, sharding
from lctx_jax.convert import from_hf, to_hf
from lctx_jax.generate import generate
from lctx_jax.losses import next_token_nll
from lctx_jax.model import Model, ModelConfig, ModelSpec
from lctx_jax.rope import RopeConfig
from lctx_jax.sharding import make_mesh

__all__ = ["attention", "models", "rope", "RopeConfig", "Model", "ModelConfig", "ModelSpec",
           "from_hf", "to_hf", "save", "load", "generate", "next_token_nll", "sharding",
           "make_mesh"]
__version__ = "0.1.0"


def __getattr__(name: str):  # save / load on first use: importing lctx_jax needs no Orbax
    if name in ("save", "load"):
        from lctx_jax import checkpoint
        return getattr(checkpoint, name)
    raise AttributeError(f"module 'lctx_jax' has no attribute {name!r}")
