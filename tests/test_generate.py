"""lctx_jax.generate against transformers' generate and against full forwards (PyTorch, CPU).

Tiny random checkpoints (initializer_range 0.2, so greedy choices are not near-ties) saved with
save_pretrained and loaded with lctx_jax.convert.from_hf. "Full forward" below means: every token
is the argmax of a forward pass over the whole sequence so far, with no cache. That is what
transformers' generate computes for Llama and, thanks to its re-prefill at the short/long switch,
for Phi-3 LongRoPE; for dynamic NTK neither transformers' cache nor ours reproduces it (see
test_dynamic_ntk_*), and `use_cache=False` does.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          Phi3Config, Phi3ForCausalLM)

from lctx_jax.convert import from_hf
from lctx_jax.generate import generate
from lctx_jax.layers import Context

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
            bos_token_id=None, eos_token_id=None, pad_token_id=None)
ORIGINAL = 64  # original / max position embeddings of the LongRoPE and dynamic NTK models


def _save(tmp_path_factory, name: str, hf_model):
    torch.manual_seed(0)
    hf_model = hf_model.eval()
    path = tmp_path_factory.mktemp(name)
    hf_model.save_pretrained(path)
    return hf_model, from_hf(path)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    torch.manual_seed(0)
    return _save(tmp_path_factory, "llama",
                 LlamaForCausalLM(LlamaConfig(max_position_embeddings=256, **TINY)))


@pytest.fixture(scope="module")
def phi3_longrope(tmp_path_factory):
    rng = np.random.default_rng(0)
    half = TINY["hidden_size"] // TINY["num_attention_heads"] // 2
    scaling = {"type": "longrope", "short_factor": np.sort(rng.uniform(1, 2, half)).tolist(),
               "long_factor": np.sort(rng.uniform(1, 6, half)).tolist()}
    torch.manual_seed(0)
    config = Phi3Config(max_position_embeddings=4 * ORIGINAL,
                        original_max_position_embeddings=ORIGINAL, rope_scaling=scaling, **TINY)
    return _save(tmp_path_factory, "phi3", Phi3ForCausalLM(config))


@pytest.fixture(scope="module")
def llama_dynamic(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=ORIGINAL,
                         rope_scaling={"rope_type": "dynamic", "factor": 4.0}, **TINY)
    return _save(tmp_path_factory, "dynamic", LlamaForCausalLM(config))


def prompts(batch: int, length: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, TINY["vocab_size"], (batch, length))


def hf_generate(hf_model, ids: np.ndarray, new: int) -> np.ndarray:
    ids = torch.as_tensor(ids)
    return hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                             do_sample=False).numpy()


@torch.no_grad()
def hf_full_forward_greedy(hf_model, ids: np.ndarray, new: int) -> np.ndarray:
    """Each token the argmax of transformers' forward over the whole sequence so far."""
    seq = torch.as_tensor(ids)
    for _ in range(new):
        seq = torch.cat([seq, hf_model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq.numpy()


# ----------------------------------------------------------------------------- greedy


def test_greedy_equals_transformers_llama(llama):
    hf_model, model = llama
    ids = prompts(2, 10)
    out = generate(model, ids, 24)
    assert out.shape == (2, 34) and out.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(out), hf_generate(hf_model, ids, 24))


def test_greedy_equals_transformers_with_a_sliding_window(tmp_path_factory):
    """Mistral with a window of 8: prompt 10 + 24 new tokens, so most steps attend to a window
    that excludes the prompt's start; transformers' generate and full forward agree."""
    torch.manual_seed(0)
    hf_model, model = _save(tmp_path_factory, "mistral", MistralForCausalLM(MistralConfig(
        max_position_embeddings=256, sliding_window=8, **TINY)))
    ids = prompts(2, 10)
    expected = hf_full_forward_greedy(hf_model, ids, 24)
    np.testing.assert_array_equal(hf_generate(hf_model, ids, 24), expected)
    np.testing.assert_array_equal(np.asarray(generate(model, ids, 24)), expected)
    # a left-padded batch: each row as if alone (positions count from its first real token)
    short = prompts(1, 6, seed=3)[0]
    batch = np.asarray(generate(model, [short, ids[0]], 24))
    np.testing.assert_array_equal(batch[0, 4:], np.asarray(generate(model, short[None], 24))[0])
    np.testing.assert_array_equal(batch[1], expected[0])


def test_greedy_equals_transformers_phi3_longrope_across_the_switch(phi3_longrope):
    """Prompt 50 + 30 new tokens crosses original_max_position_embeddings = 64 at the 15th new
    token: LongRoPE switches from the short to the long factors for the whole sequence.
    transformers' Phi-3 drops its cache and re-prefills there, which makes its generate equal to
    the full forward (checked); we re-prefill at the same step and must equal both."""
    hf_model, model = phi3_longrope
    ids = prompts(2, 50)
    expected = hf_generate(hf_model, ids, 30)
    np.testing.assert_array_equal(expected, hf_full_forward_greedy(hf_model, ids, 30))
    np.testing.assert_array_equal(np.asarray(generate(model, ids, 30)), expected)


def test_left_padded_batch_equals_each_prompt_alone(llama):
    _, model = llama
    rows = [prompts(1, n, seed=n)[0] for n in (3, 9, 6)]
    batch = np.asarray(generate(model, rows, 12))
    assert batch.shape == (3, 9 + 12)
    for row, out in zip(rows, batch):
        alone = np.asarray(generate(model, row[None], 12))[0]
        np.testing.assert_array_equal(out[9 - len(row):], alone)
        assert (out[:9 - len(row)] == 0).all()  # left padding: pad id 0 (config has none)
    # the same batch as an array with prompt_lengths (padding values do not matter)
    padded = np.where(batch[:, :9] == 0, 77, batch[:, :9])
    again = np.asarray(generate(model, padded, 12, prompt_lengths=[3, 9, 6]))
    np.testing.assert_array_equal(again[:, 9:], batch[:, 9:])


# ----------------------------------------------------------------------------- dynamic NTK


def test_dynamic_ntk_without_cache_equals_full_forward(llama_dynamic):
    """48 + 40 tokens run 24 tokens past max_position_embeddings = 64, where the NTK base grows
    with every token. use_cache=False is the definition: a full forward per token."""
    hf_model, model = llama_dynamic
    ids = prompts(2, 48)
    full = hf_full_forward_greedy(hf_model, ids, 40)
    np.testing.assert_array_equal(np.asarray(generate(model, ids, 40, use_cache=False)), full)
    # With the cache, the result is the full forward's up to the threshold (a step at position
    # p has seq_len p + 1 <= 64 for the first 17 new tokens).
    cached = np.asarray(generate(model, ids, 40))
    np.testing.assert_array_equal(cached[:, :48 + 17], full[:, :48 + 17])


@torch.no_grad()
def test_dynamic_ntk_cache_is_closer_to_full_forward_than_transformers(llama_dynamic):
    """Teacher-forced along one sequence: logits of each cached decode step vs the full forward.

    transformers caches rotated keys, so past 64 each key keeps the base of the step that wrote
    it (transformers issue #25104). Our cache holds un-rotated keys and re-rotates all of them
    with the current base, so the first layer is exact; deeper layers' cached k/v still come
    from hidden states computed under older bases, so we are closer but not equal. Both are
    exact up to the threshold.
    """
    hf_model, model = llama_dynamic
    prompt_len, total = 48, 96
    seq = torch.as_tensor(prompts(1, total, seed=5))
    full = np.stack([hf_model(seq[:, :t]).logits[0, -1].numpy()
                     for t in range(prompt_len, total + 1)])
    out = hf_model(seq[:, :prompt_len], use_cache=True)
    theirs, cache = [out.logits[0, -1].numpy()], out.past_key_values
    for t in range(prompt_len, total):
        out = hf_model(seq[:, t:t + 1], past_key_values=cache, use_cache=True,
                       position_ids=torch.tensor([[t]]))
        theirs.append(out.logits[0, -1].numpy())
        cache = out.past_key_values

    c = model.config
    step = jax.jit(lambda *args: model.module.apply({"params": model.params}, *args))
    ids = jnp.asarray(seq.numpy(), jnp.int32)
    kv_cache = {n: jnp.zeros((c.num_layers, 1, total, c.num_kv_heads, c.head_dim))
                for n in ("k", "v")}
    ours = []
    for start, end in [(0, prompt_len)] + [(t, t + 1) for t in range(prompt_len, total)]:
        so_far = jnp.arange(total)[None] < end
        kv_positions = jnp.where(so_far, jnp.arange(total)[None], 0)
        ctx = Context(kv_positions[:, start:end], so_far[:, start:end].astype(jnp.int32),
                      kv_positions, so_far.astype(jnp.int32), jnp.int32(start))
        logits, kv_cache = step(ids[:, start:end], ctx, kv_cache)
        ours.append(np.asarray(logits[0, -1]))

    error = {name: np.abs(np.stack(x) - full).max(-1)
             for name, x in (("ours", ours), ("theirs", theirs))}
    before = ORIGINAL - prompt_len + 1  # steps whose seq_len <= 64
    for name in error:
        assert error[name][:before].max() < 1e-4, name
    assert error["ours"][before:].mean() < 0.5 * error["theirs"][before:].mean()
    assert error["ours"][before:].max() > 1e-2  # stale deeper layers: not a full forward


# ----------------------------------------------------------------------------- sampling, EOS


def test_sampling(llama):
    _, model = llama
    ids = prompts(2, 10)
    key = jax.random.key(3)
    first = np.asarray(generate(model, ids, 24, temperature=1.0, rng=key))
    np.testing.assert_array_equal(
        np.asarray(generate(model, ids, 24, temperature=1.0, rng=key)), first)
    other = np.asarray(generate(model, ids, 24, temperature=1.0, rng=jax.random.key(4)))
    assert (other != first).any()
    assert ((first >= 0) & (first < TINY["vocab_size"])).all()
    np.testing.assert_array_equal(first[:, :10], ids)
    nucleus_of_one = generate(model, ids, 24, temperature=1.0, top_p=1e-6, rng=key)
    np.testing.assert_array_equal(np.asarray(nucleus_of_one), np.asarray(generate(model, ids, 24)))
    with pytest.raises(ValueError, match="rng"):
        generate(model, ids, 4, temperature=1.0)


def test_eos_stops_a_row_and_pads_it(llama):
    _, model = llama
    ids = prompts(2, 10)
    greedy = np.asarray(generate(model, ids, 24))
    eos = int(greedy[0, 10])
    out = np.asarray(generate(model, ids, 24, eos_token_id=eos))
    assert out[0, 10] == eos and (out[0, 11:] == eos).all()  # no pad_token_id: pad = eos
    hits = np.flatnonzero(greedy[1, 10:] == eos)
    stop = 10 + (hits[0] + 1 if hits.size else 24)
    np.testing.assert_array_equal(out[1, :stop], greedy[1, :stop])
    assert (out[1, stop:] == eos).all()
    alone = np.asarray(generate(model, ids[:1], 24, eos_token_id=(eos, 127)))  # loop ends early
    np.testing.assert_array_equal(alone, out[:1])


def test_rejects_bad_prompts(llama):
    _, model = llama
    with pytest.raises(ValueError, match="real tokens"):
        generate(model, prompts(2, 4), 2, prompt_lengths=[4, 0])
    with pytest.raises(ValueError, match="prompt_lengths"):
        generate(model, [[1, 2], [3]], 2, prompt_lengths=[2, 1])
    with pytest.raises(ValueError, match="top_p"):
        generate(model, prompts(1, 4), 2, top_p=0.0)
