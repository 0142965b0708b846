"""lctx_jax: context-window extension for LLaMA-family models in JAX/Flax.

The public names of ../shared/API.md are re-exported here.
"""

from lctx_jax import rope
from lctx_jax.rope import RopeConfig

__all__ = ["rope", "RopeConfig"]
__version__ = "0.1.0"
