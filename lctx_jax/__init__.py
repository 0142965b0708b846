"""lctx_jax: context-window extension for LLaMA-family models in JAX/Flax.

The public names of ../shared/API.md are re-exported here.
"""

from lctx_jax import attention, rope, sharding
from lctx_jax.checkpoint import load, save
from lctx_jax.convert import from_hf, to_hf
from lctx_jax.generate import generate
from lctx_jax.losses import next_token_nll
from lctx_jax.model import Model, ModelConfig
from lctx_jax.rope import RopeConfig
from lctx_jax.sharding import make_mesh

__all__ = ["attention", "rope", "RopeConfig", "Model", "ModelConfig", "from_hf", "to_hf",
           "save", "load", "generate", "next_token_nll", "sharding", "make_mesh"]
__version__ = "0.1.0"
