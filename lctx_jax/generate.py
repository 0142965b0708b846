"""Autoregressive generation with a decode state (the family's: a KV cache for LLaMA): one
prefill call, then one jitted decode loop.

    tokens = generate(model, [[1, 5, 9], [1, 7]], max_new_tokens=32)   # greedy
    tokens = generate(model, ids, 64, temperature=0.8, top_p=0.95, rng=jax.random.key(0))

Layout. Prompts of different lengths are left-padded to the longest, P. Padding gets segment id
0 and real tokens 1, and the positions of each row count from 0 at its first real token, so a
padded row is computed as if it were alone (up to the batch-wide sequence length below). The
result is [B, P + max_new_tokens]: the padded prompt, then the generated tokens; a row that
emitted an end-of-sequence token emits `pad_token_id` (or the first EOS id) afterwards.

Positions and context extension. The cache holds *un-rotated* keys, and every call rotates the
queries and all cached keys from their positions with one sequence length,
seq_len = max(position) + 1 over the batch (`lctx_jax.attention.rotate_qk`). Within a step,
queries and keys therefore always share one rotation. That alone does not make a cached step
equal to a full forward when the rotation depends on seq_len: the keys and values of layers
above the first are functions of hidden states that earlier steps computed under the rotation
of *their* seq_len. Per method:
  LongRoPE     (Phi-3) the rotation changes once, when seq_len first exceeds
               original_max_position_embeddings. At that step the whole sequence so far is
               prefilled again (one full forward), as transformers' Phi-3 does, so every token
               equals a full forward over the sequence so far.
  dynamic NTK  the base changes with every token past max_position_embeddings. With the cache,
               the current step rotates q and all cached keys with the current base (closer to
               a full forward than transformers, whose cached keys keep the rotation of the
               step that wrote them, transformers issue #25104), but deeper layers' cached k/v
               are stale. `use_cache=False` recomputes the whole sequence for every token:
               exactly a full forward per step, at O((P + N)²) per token.
  others       the rotation does not depend on seq_len: cached decoding is exact.
Infini-attention models carry per layer the memory (M, z) and one segment of local KV cache
(`lctx_jax.attention.infini.stream`) instead of a cache of every token, and their prompt is
prefilled one segment at a time, so the decode state and the activations have the same size
whatever the prompt. Their segments are cut by column, so decoding equals a full
forward over the padded batch token for token (the local rotation has a fixed seq_len, the
segment, and LongRoPE's refresh does not apply); but a left-padded row's segments start at
its first column, not its first real token, so unlike the above it is not computed as if it
were alone: batch prompts of one length (passkey evaluation does) or generate row by row.
MEGALODON models likewise carry per layer their CEMA state, norm statistics and one chunk of
K/V, prefilled chunk by chunk; padding (segment 0) is left out of the norm statistics and adds
nothing to the CEMA state, but chunks too are cut by column: batch prompts of one length, or
generate row by row. Their state is recurrent, so use_cache=False is refused.
Because seq_len is batch-wide, rows of different lengths share one dynamic-NTK base / LongRoPE
factor set, as in transformers; with length-independent methods rows never interact.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lctx_jax import layers, models, token_ids
from lctx_jax.layers import Context
from lctx_jax.model import Model

__all__ = ["generate"]


def generate(model: Model, prompt_ids: Any, max_new_tokens: int = 32, *,
             temperature: float = 0.0, top_p: float = 1.0, rng: jax.Array | None = None,
             eos_token_id: int | Sequence[int] | None = None, prompt_lengths: Any = None,
             use_cache: bool = True) -> jax.Array:
    """Generates `max_new_tokens` tokens after each prompt -> int32 [B, P + max_new_tokens].

    prompt_ids: int [B, P] (with `prompt_lengths` [B]: only the last prompt_lengths[b] tokens
    of row b are real, the rest is left padding), or a list of 1-D int sequences, left-padded
    here with the pad id. Columns [:P] of the result are the padded prompt, [P:] the new tokens.
    temperature: 0 is greedy (argmax); > 0 samples from softmax(logits / temperature) restricted
    to the top-p nucleus (the most probable tokens whose cumulative probability before them is
    < top_p; the top token is always kept). rng: a jax.random key, required when sampling.
    eos_token_id: int or ids that end a row (default model.config.eos_token_id; () never).
    After a row's EOS it emits config.pad_token_id, or the first EOS id when that is None.
    use_cache: False runs a full forward over the whole sequence so far for every token
    (O((P + N)²) per token). Cached decoding gives the same tokens except with dynamic NTK past
    max_position_embeddings (see the module docstring).

    Compiled once per (B, P, max_new_tokens, greedy or sampling, use_cache, number of EOS ids);
    the parameters, prompt lengths, temperature and top_p are traced arguments.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    greedy = temperature == 0
    if not greedy and rng is None:
        raise ValueError("sampling (temperature > 0) needs rng, a jax.random key")
    if not use_cache and not model.family.refeeds:
        raise ValueError(f"use_cache=False refeeds the whole sequence for every token, which a "
                         f"{model.family.name} model's recurrent decode state cannot start "
                         "afresh; use use_cache=True (its cached decoding equals a full forward)")
    eos_ids, pad_id = _eos_and_pad(model, eos_token_id)
    prompt, lengths = _left_padded(prompt_ids, prompt_lengths, pad_id, model.config.vocab_size)
    if rng is None:
        rng = jax.random.key(0)  # unused by the greedy loop; keeps one signature
    return _generate(model.params, prompt, lengths, eos_ids, jnp.int32(pad_id),
                     jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p), rng,
                     module=model.module, cache_dtype=jnp.dtype(model.dtype),
                     max_new_tokens=max_new_tokens, greedy=greedy, use_cache=use_cache)


# ----------------------------------------------------------------------------- inputs


def _eos_and_pad(model: Model, eos_token_id: int | Sequence[int] | None
                 ) -> tuple[jax.Array, int]:
    """EOS ids int32 [E] (E may be 0) and the pad id."""
    eos = model.config.eos_token_id if eos_token_id is None else eos_token_id
    eos = () if eos is None else (eos,) if isinstance(eos, (int, np.integer)) else tuple(eos)
    pad = model.config.pad_token_id
    if pad is None:
        pad = eos[0] if eos else 0
    vocab = model.config.vocab_size
    for token in (*eos, pad):
        if not 0 <= int(token) < vocab:
            raise ValueError(f"token id {token} (EOS or pad) is outside the vocabulary [0, {vocab})")
    return jnp.asarray(eos, jnp.int32).reshape(-1), int(pad)


def _left_padded(prompt_ids: Any, prompt_lengths: Any, pad_id: int, vocab_size: int
                 ) -> tuple[jax.Array, jax.Array]:
    """(prompt int32 [B, P], lengths int32 [B]) from an array or a list of 1-D sequences,
    every id (padding included) checked to be in the vocabulary."""
    if isinstance(prompt_ids, (list, tuple)):
        if prompt_lengths is not None:
            raise ValueError("prompt_lengths is for an array prompt; a list of sequences "
                             "gives its lengths itself")
        if not prompt_ids:
            raise ValueError("prompt_ids is an empty list: give at least one prompt")
        rows = [token_ids.check(row, vocab_size, f"prompt_ids[{b}]", ndim=1)
                for b, row in enumerate(prompt_ids)]
        lengths = np.array([len(row) for row in rows], np.int32)
        prompt = np.full((len(rows), int(lengths.max())), pad_id, np.int32)
        for b, row in enumerate(rows):
            prompt[b, prompt.shape[1] - len(row):] = row
    else:
        prompt = np.asarray(token_ids.check(prompt_ids, vocab_size, "prompt_ids"))
        lengths = (np.full(prompt.shape[0], prompt.shape[1], np.int32) if prompt_lengths is None
                   else np.asarray(prompt_lengths, np.int32).reshape(-1))
        if lengths.shape != (prompt.shape[0],):
            raise ValueError(f"prompt_lengths must have one entry per row ({prompt.shape[0]}), "
                             f"got shape {lengths.shape}")
    if lengths.min() < 1 or lengths.max() > prompt.shape[1]:
        raise ValueError(f"every prompt needs 1 to P={prompt.shape[1]} real tokens, got "
                         f"lengths {lengths.tolist()}")
    return jnp.asarray(prompt), jnp.asarray(lengths)


def _prompt_layout(lengths: jax.Array, width: int) -> tuple[jax.Array, jax.Array]:
    """positions, segment ids int32 [B, width] of rows whose last `lengths` tokens are real:
    padding (segment 0) at position 0, real tokens (segment 1) at 0, 1, ... from the first."""
    offset = jnp.arange(width, dtype=jnp.int32)[None, :] - (width - lengths)[:, None]
    return jnp.maximum(offset, 0), (offset >= 0).astype(jnp.int32)


# ----------------------------------------------------------------------------- compiled loop


@functools.partial(jax.jit, static_argnames=("module", "cache_dtype", "max_new_tokens",
                                             "greedy", "use_cache"))
def _generate(params: Any, prompt: jax.Array, lengths: jax.Array, eos_ids: jax.Array,
              pad_id: jax.Array, temperature: jax.Array, top_p: jax.Array, rng: jax.Array, *,
              module: Any, cache_dtype: jnp.dtype, max_new_tokens: int, greedy: bool,
              use_cache: bool) -> jax.Array:
    """Prefill at cache slot 0, then a while_loop of one-token steps that stops early once every
    row has emitted EOS. A step either decodes (feeds one token) or refreshes (feeds the whole
    sequence so far again at slot 0, overwriting the cache): every step with use_cache=False,
    once at the LongRoPE switch otherwise."""
    c = module.config
    batch, width = prompt.shape
    total = width + max_new_tokens
    size = total - 1  # the last token is returned, never fed
    sequence = jnp.concatenate(
        [prompt, jnp.full((batch, max_new_tokens), pad_id, jnp.int32)], axis=1)
    positions, segments = _prompt_layout(lengths + max_new_tokens, total)
    positions, segments = positions[:, :size], segments[:, :size]
    cache = models.family_of(c).decode_state(c, batch, size, cache_dtype)
    head = layers.head_kernel(params, c.tie_word_embeddings)

    def forward(sequence: jax.Array, cache: dict, start: jax.Array | int, length: int,
                known: jax.Array | int) -> tuple[jax.Array, dict]:
        """Feeds sequence[:, start:start + length] at cache slot `start`, of which the first
        `known` columns are the sequence so far (the rest is hidden: segment 0, position 0)
        -> (logits [B, V] of column known − 1, cache)."""
        so_far = jnp.arange(size)[None, :] < known
        kv_positions = jnp.where(so_far, positions, 0)
        kv_segments = jnp.where(so_far, segments, 0)
        window = functools.partial(jax.lax.dynamic_slice_in_dim, start_index=start,
                                   slice_size=length, axis=1)
        ctx = Context(window(kv_positions), window(kv_segments), kv_positions, kv_segments,
                      jnp.asarray(start, jnp.int32))
        hidden, cache = module.apply({"params": params}, window(sequence), ctx, cache,
                                     logits=False)  # the head runs on one column only
        last = jax.lax.dynamic_index_in_dim(hidden, known - 1 - start, 1, keepdims=False)
        return layers.head_logits(last, head, module.dtype), cache

    def choose(logits: jax.Array, step: jax.Array | int) -> jax.Array:
        """[B, V] -> int32 [B]."""
        if greedy:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return _sample_top_p(logits / temperature, top_p, jax.random.fold_in(rng, step))

    chunk = models.family_of(c).prefill_chunk(c) or width
    chunks = (width - 1) // chunk  # whole pieces before the one holding the last column
    if chunks:  # Infini-attention, MEGALODON: prefill piece by piece, activations O(N) not O(P)
        cache = jax.lax.fori_loop(
            0, chunks, lambda i, cache: forward(sequence, cache, i * chunk, chunk, width)[1],
            cache)
    logits, cache = forward(sequence, cache, chunks * chunk, width - chunks * chunk, width)
    first = choose(logits, 0)
    sequence = sequence.at[:, width].set(first)
    done = jnp.isin(first, eos_ids)

    def step_logits(step: jax.Array, sequence: jax.Array, cache: dict
                    ) -> tuple[jax.Array, dict]:
        known = width + step

        def decode(cache: dict) -> tuple[jax.Array, dict]:
            return forward(sequence, cache, known - 1, 1, known)

        def refresh(cache: dict) -> tuple[jax.Array, dict]:
            return forward(sequence, cache, 0, size, known)

        if not use_cache:
            return refresh(cache)
        if c.rope is not None and c.rope.rope_type == "longrope" and c.infini is None:
            # the one step whose seq_len = max(lengths) + step first exceeds the original length
            switch = c.rope.original_max_position_embeddings + 1 - jnp.max(lengths)
            return jax.lax.cond(step == switch, refresh, decode, cache)
        return decode(cache)

    def cond(state: tuple) -> jax.Array:
        step, _, _, done = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state: tuple) -> tuple:
        step, cache, sequence, done = state
        logits, cache = step_logits(step, sequence, cache)
        token = jnp.where(done, pad_id, choose(logits, step))
        sequence = jax.lax.dynamic_update_slice(sequence, token[:, None], (0, width + step))
        return step + 1, cache, sequence, done | jnp.isin(token, eos_ids)

    return jax.lax.while_loop(cond, body, (jnp.int32(1), cache, sequence, done))[2]


def _sample_top_p(logits: jax.Array, top_p: jax.Array, key: jax.Array) -> jax.Array:
    """One token per row from softmax(logits [B, V]) restricted to the top-p nucleus -> [B]."""
    sorted_logits, order = jax.lax.top_k(logits, logits.shape[-1])  # descending
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.where(mass_before < top_p, sorted_logits, -jnp.inf)  # rank 0 always kept
    rank = jax.random.categorical(key, kept, axis=-1)
    return jnp.take_along_axis(order, rank[:, None], axis=-1)[:, 0].astype(jnp.int32)
