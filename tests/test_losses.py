"""The chunked next-token loss (lctx_jax.losses) against cross-entropy on full logits: values
and gradients (f32), every chunking (dividing, padded, one chunk), tied and untied heads, masks
and document boundaries; and that its compiled program never holds [B, T, vocab]."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lctx_jax as lx
from lctx_jax import losses
from lctx_jax.layers import head_logits

VOCAB = 96


def tiny(tied: bool) -> lx.Model:
    config = lx.ModelConfig.from_hf({
        "model_type": "llama", "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 256, "tie_word_embeddings": tied})
    model = lx.Model.init(config, jax.random.key(0))
    # normal(0.02) weights give near-uniform logits; larger ones make a wrong target matter
    params = jax.tree.map(lambda x: x * 5 if x.ndim > 1 else x, model.params)
    return lx.Model(config, params)


def reference_nll(model, params, ids, loss_mask=None, segment_ids=None):
    """optax cross-entropy over the full [B, T, V] logits, positions 0..T-2 predicting 1..T-1."""
    logits = model.apply(params, ids, segment_ids=segment_ids)[:, :-1]
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:])
    weight = jnp.ones(nll.shape)
    if segment_ids is not None:
        weight = weight * (segment_ids[:, 1:] == segment_ids[:, :-1])
    if loss_mask is not None:
        weight = weight * loss_mask[:, :-1]
    return jnp.sum(nll * weight) / jnp.sum(weight)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("length, chunk", [(40, 8), (37, 8), (40, 64), (30, 7)])
def test_equals_full_logits_cross_entropy(tied, length, chunk):
    model = tiny(tied)
    ids = jax.random.randint(jax.random.key(1), (3, length), 0, VOCAB)
    mask = (jax.random.uniform(jax.random.key(2), (3, length)) > 0.3).astype(jnp.float32)
    segments = jnp.cumsum(jax.random.uniform(jax.random.key(3), (3, length)) > 0.9, axis=1)

    def ours(params):
        return lx.next_token_nll(model, ids, params, loss_mask=mask, segment_ids=segments,
                                 chunk_tokens=chunk)

    def theirs(params):
        return reference_nll(model, params, ids, mask, segments)

    value, grads = jax.value_and_grad(ours)(model.params)
    expected, expected_grads = jax.value_and_grad(theirs)(model.params)
    np.testing.assert_allclose(value, expected, rtol=2e-6)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads)):
        # f32 sums in another order: differences of a few ulp of the leaf's largest entry
        np.testing.assert_allclose(got, want, atol=2e-6 * float(jnp.max(jnp.abs(want))))


def test_bf16_gradients_match_autodiff_of_full_logits():
    """In bf16 the custom VJP casts dlogits to bf16 for its two matmuls, as autodiff of a bf16
    head matmul does: its gradients agree with autodiff's to bf16 precision."""
    model = tiny(False)
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), model.params)
    model = lx.Model(model.config, params, dtype=jnp.bfloat16)
    ids = jax.random.randint(jax.random.key(6), (2, 40), 0, VOCAB)

    def full(params):
        hidden = model.hidden(params, ids)
        logits = head_logits(hidden, model.head(params), jnp.bfloat16)[:, :-1]
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    ours = jax.grad(lambda p: lx.next_token_nll(model, ids, p, chunk_tokens=8))(params)
    for got, want in zip(jax.tree.leaves(ours), jax.tree.leaves(jax.grad(full)(params))):
        assert got.dtype == jnp.bfloat16
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        np.testing.assert_allclose(got, want, atol=2.0 ** -6 * np.abs(want).max())


def test_defaults_and_empty_mask():
    model = tiny(False)
    ids = jax.random.randint(jax.random.key(4), (2, 16), 0, VOCAB)
    np.testing.assert_allclose(lx.next_token_nll(model, ids),
                               reference_nll(model, model.params, ids), rtol=2e-6)
    assert float(lx.next_token_nll(model, ids, loss_mask=jnp.zeros((2, 16)))) == 0.0
    with pytest.raises(ValueError, match=r"input_ids must be \[B, T\]"):
        lx.next_token_nll(model, ids[0])


@pytest.mark.parametrize("length, chunk, n", [(1000, 256, 4), (1024, 256, 4), (1021, 256, 4),
                                              (100, 1024, 1), (1030, 256, 5)])
def test_num_chunks(length, chunk, n):
    assert losses.num_chunks(length, chunk) == n


def test_compiled_loss_never_holds_full_logits():
    """A [4, 4096] batch over a 4096-token vocabulary: full f32 logits would be 256 MiB (and as
    much again for their cotangent); the chunked loss and its gradient stay far below."""
    batch, length, width, vocab = 4, 4096, 64, 4096
    hidden = jax.ShapeDtypeStruct((batch, length, width), jnp.float32)
    head = jax.ShapeDtypeStruct((width, vocab), jnp.float32)
    targets = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    weights = jax.ShapeDtypeStruct((batch, length), jnp.float32)

    def loss(hidden, head, targets, weights):
        total, count = losses.nll_sum(hidden, head, targets, weights, chunk_tokens=256)
        return total / count

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(hidden, head, targets,
                                                             weights).compile()
    full_logits = batch * length * vocab * 4
    assert compiled.memory_analysis().temp_size_in_bytes < full_logits / 4


def test_tied_head_is_the_embedding():
    model = tiny(True)
    np.testing.assert_array_equal(model.head(model.params),
                                  model.params["embed"]["embedding"].T)
