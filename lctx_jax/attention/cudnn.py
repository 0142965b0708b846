"""cuDNN flash attention (NVIDIA GPUs) through `jax.nn.dot_product_attention(...,
implementation="cudnn")`, with RoPE applied outside it.

    out[b, i, h] = Σ_j p_ij · v[b, j, h // G],  p_ij = softmax_j(scale · q'_i · k'_j), j visible

How our arguments become jax's (`attend` builds the call):
  q', k'        q, k rotated by `lx.rope.rotate_qk` at positions / kv_positions (one seq_len)
  GQA           passed as is: jax takes Hkv dividing Hq (k, v never repeated)
  causal        is_causal=True: cuDNN's causal mask, by index (it skips the masked blocks)
  window w      with causal: local_window_size=(w − 1, 0), cuDNN's sliding_window_length w
                (keys (i − w, i]), by index
  segment ids,  a boolean mask [B, 1, T, T] from `masks.visible` at the given positions (jax
  chunk_size,   adds it to the scores as a bias: T² elements per row in memory and no block
  a window      skipping, unlike the two masks above)
  without causal
cuDNN's masks are by index, so, as for "splash" (./splash.py), they equal ours when positions
are consecutive within each segment (arange, or packed documents restarting at 0; chunks follow
the positions here, being in the mask): self-attention only (S == T, and the keys take the
queries' segment ids; `attend` checks). Every query then sees itself, so the other impls' zeros
for a query without visible keys cannot arise.

Numerics: f32 scores and softmax statistics; with bf16 inputs jax's XLA formula rounds the
probabilities to bf16 before p·v (cuDNN feeds its matrix units bf16 too). cuDNN takes bf16 or
fp16 only (f32 is refused here, naming the fix). Its other support checks (head dim a multiple
of 8 and <= 128, <= 256 from Hopper; even T with a mask in training) raise from jax at trace
time.

implementation="xla" runs the same arguments through jax's XLA formula, on any backend: that is
how the argument construction is tested without a GPU (tests/test_splash_cudnn.py, against
./xla.py). Lowering for CUDA on a machine without the CUDA plugin fails at trace time (jax asks
the plugin for the cuDNN version: "cuDNN is not detected."); with that query patched, forward
and backward lower to the `__cudnn$fmha*` custom calls (also in the tests). Not run on a GPU.
On a mesh: `flash.attend_on_mesh` with this function (shard_map over batch axes and "tensor"
heads; a mesh that splits "sequence" is refused).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lctx_jax import rope as rope_lib
from lctx_jax.attention import masks


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool, positions: jax.Array,
           kv_positions: jax.Array, segment_ids: jax.Array | None,
           kv_segment_ids: jax.Array | None, scale: float,
           rope: rope_lib.RopeConfig | None = None, block_size: None = None,
           backend: str | None = None, seq_len: jax.Array | None = None,
           window: int | None = None, chunk_size: int | None = None,
           implementation: str = "cudnn") -> jax.Array:
    """q [B, T, Hq, D], k, v [B, T, Hkv, D] un-rotated; positions, kv_positions [B, T]; segment
    ids [B, T] (kv_segment_ids equal to segment_ids) or both None -> [B, T, Hq, D] in q's dtype.

    causal, window, chunk_size: the mask (see the module docstring for which piece goes where).
    block_size: None only (cuDNN picks its tiles; the argument is `attend`'s). backend: default
    jax.default_backend(); implementation="cudnn" needs "gpu". seq_len: the rotation's sequence
    length (default max position + 1). implementation: "cudnn" or "xla" (jax's XLA formula
    with the same arguments).
    """
    if block_size is not None:
        raise ValueError(f"block_size={block_size}: cuDNN picks its own tiles; leave it None "
                         "with impl='cudnn'")
    if implementation == "cudnn":
        backend = backend or jax.default_backend()
        if backend != "gpu":
            raise ValueError(f"impl='cudnn' runs cuDNN flash attention, which needs an NVIDIA "
                             f"GPU, not {backend!r}: use impl='xla' or 'flash' (or 'splash' "
                             "on TPU)")
        if q.dtype not in (jnp.bfloat16, jnp.float16):
            raise ValueError(f"impl='cudnn' takes bfloat16 or float16 q, k, v (cuDNN flash "
                             f"attention), got {q.dtype}: run the model with dtype=bfloat16, "
                             "or use impl='flash' for f32")
    if rope is not None:
        q, k = rope_lib.rotate_qk(q, k, rope, positions, kv_positions, seq_len=seq_len)
    dense = masks.Mask(causal=False, window=None if causal else window, chunk_size=chunk_size)
    mask = None
    if segment_ids is not None or dense != masks.Mask(causal=False):
        mask = masks.visible(dense, positions, kv_positions, segment_ids, kv_segment_ids)
        mask = mask[:, None]  # [B, 1, T, T]: every head
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, scale=scale, is_causal=causal,
        local_window_size=(window - 1, 0) if causal and window is not None else None,
        implementation=implementation)
