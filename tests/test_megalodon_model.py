"""The MEGALODON family (`lctx_jax.models.megalodon`) as a whole model: logits against an
independent float64 PyTorch forward of the released XuezheMax/megalodon code
(tests/megalodon_reference.py) read from what `lx.to_hf` writes; checkpoint round trips;
config errors; chunk locality and documents; generation with the constant-size decode state;
chunk parallelism over the mesh axis "sequence" (values, gradients and what crosses devices);
LoRA. The sequence operators themselves (cema, timestep_norm) are tested in
tests/test_megalodon_ops.py.

Models are tiny (model_dim 16, 2 layers (1 on meshes), chunk 8 (4 on meshes), vocabulary 64)
and their parameters are drawn here, all of them non-trivial: the zero-initialised ones
(every norm's weight and bias, qk_scale / qk_bias, the projections' biases, CEMA gamma's
imaginary part) too, so a missing "+ 1", a swapped gamma / beta or a dropped bias shows in the
logits.

Tolerances are relative to the largest reference value (`assert_rel`). f32 against the float64
reference agrees to ~1e-6 of the logits' scale here; 2e-5 is used.
"""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from megalodon_reference import MegalodonReference

import lctx_jax as lx
from lctx_jax import lora, models, sharding
from lctx_jax.models.megalodon import MegalodonConfig

VOCAB = 64
TOL = 2e-5          # ours (f32) vs the float64 reference, relative to the logits' scale
MESH_TOL = 1e-5     # the same model on a mesh vs one device (both f32)


def tiny(**overrides) -> MegalodonConfig:
    fields = {"vocab_size": VOCAB, "model_dim": 16, "num_layers": 2, "num_heads": 1,
              "z_dim": 8, "value_dim": 16, "ffn_hidden_dim": 24, "cema_ndim": 4,
              "chunk_size": 8, "norm_num_groups": 4}
    return MegalodonConfig(**{**fields, **overrides})


CONFIGS = {  # name -> config; together: swiglu on/off, scale_emb, share_emb, 1 and 2 heads,
    # norm groups 1, 4, 8, 16 (= model_dim: one feature per group), eps and rope theta
    "base": tiny(),
    "swiglu_scaled_tied": tiny(swiglu=True, scale_emb=True, tie_word_embeddings=True,
                               num_heads=2, z_dim=16, norm_num_groups=8),
    "heads2_groups16": tiny(num_heads=2, z_dim=16, value_dim=8, norm_num_groups=16,
                            norm_eps=1e-3, cema_ndim=3),
    "groups1_scaled": tiny(norm_num_groups=1, scale_emb=True, rope_theta=100.0, swiglu=True),
}


# ----------------------------------------------------------------------------- helpers


def random_params(config, seed: int = 0) -> dict:
    """A parameter tree of `config`'s shapes with every leaf drawn at random (norm offsets and
    biases ~ N(0, 0.3²): far from their zero init)."""
    shapes = lx.ModelSpec(config).abstract_params(jnp.float32)
    rng = np.random.default_rng(seed)
    flat = {}
    for path, shape in traverse_util.flatten_dict(shapes).items():
        shape = shape.shape
        name = path[-1]
        if path[-2:] in (("embed", "embedding"), ("lm_head", "kernel")):
            value = rng.standard_normal(shape) / np.sqrt(config.model_dim)
        elif name == "kernel":
            value = rng.standard_normal(shape) / np.sqrt(shape[-2])
        elif path[-2] == "cema":
            std = {"alpha": 0.5, "delta": 0.5, "theta": 1.0, "gamma": 1.0, "omega": 0.3}[name]
            value = std * rng.standard_normal(shape)
        else:  # norm weight / bias, projection biases, qk_scale, qk_bias
            assert name in ("weight", "bias", "qk_scale", "qk_bias"), path
            value = 0.3 * rng.standard_normal(shape)
        flat[path] = jnp.asarray(value, jnp.float32)
    return traverse_util.unflatten_dict(flat)


def make_model(config, seed: int = 0) -> lx.Model:
    return lx.Model(config, random_params(config, seed))


_FORWARDS: dict = {}


def logits(model: lx.Model, ids, segment_ids=None, adapters=None) -> np.ndarray:
    """model.apply jitted once per spec: models that agree in config, dtype, attention, mesh and
    LoRA config compute the same function and share one compilation."""
    spec = model.spec
    key = (spec.config, spec.attention, spec.mesh, spec.lora)
    if key not in _FORWARDS:
        _FORWARDS[key] = jax.jit(lambda p, i, s, a: spec.apply(p, i, segment_ids=s, adapters=a))
    return np.asarray(_FORWARDS[key](model.params, jnp.asarray(ids, jnp.int32),
                                     None if segment_ids is None
                                     else jnp.asarray(segment_ids, jnp.int32), adapters))


def random_ids(batch: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, length)).astype(np.int32)


def assert_rel(got, want, tol, name=""):
    """max |got − want| ≤ tol · max |want| (and finite), with the figures in the message."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    assert np.all(np.isfinite(got)), f"{name}: non-finite values"
    scale = float(np.abs(want).max())
    err = float(np.abs(got - want).max())
    assert err <= tol * max(scale, 1e-30), f"{name}: max error {err:.3g} at scale {scale:.3g}"


def reference_for(model: lx.Model, directory, **overrides) -> MegalodonReference:
    lx.to_hf(model, directory)
    return MegalodonReference(directory, **overrides)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{name: (model, reference)} for every CONFIGS entry, exported once."""
    out = {}
    for name, config in CONFIGS.items():
        model = make_model(config, seed=len(out))
        out[name] = model, reference_for(model, tmp_path_factory.mktemp(name))
    return out


# ----------------------------------------------------------------------------- 1. reference


CASES = [("base", 5), ("base", 8), ("base", 24), ("swiglu_scaled_tied", 5),
         ("swiglu_scaled_tied", 24), ("heads2_groups16", 24), ("groups1_scaled", 16)]


@pytest.mark.parametrize("name,length", CASES)
def test_logits_equal_the_released_forward(exported, name, length):
    """Logits of our f32 model equal the float64 torch forward of the released code on the
    exported checkpoint: T < chunk (one short chunk), T = chunk, T = several chunks."""
    model, ref = exported[name]
    ids = random_ids(2, length, seed=length)
    want = ref.logits(ids).numpy()
    assert_rel(logits(model, ids), want, TOL, f"{name} T={length}")
    assert np.abs(want).max() > 1.0  # the logits are O(1): the comparison means something


def test_every_parameter_is_drawn_and_matters(exported):
    """No leaf of the compared models is at a trivial value, and the reference reads each
    zero-initialised kind of tensor: zeroing it (what a missing '+1' / a dropped tensor would
    amount to) moves the reference's logits far beyond TOL."""
    model, ref = exported["base"]
    for path, leaf in traverse_util.flatten_dict(model.params).items():
        assert float(jnp.std(leaf)) > 0.05, path
    ids = random_ids(2, 24, seed=24)
    want = ref.logits(ids).numpy()
    for name in ("layers.0.mega.timenorm.weight", "layers.1.mega.timenorm.bias",
                 "layers.0.mega.rmsnorm.weight", "layers.0.mega.gamma", "layers.1.mega.beta",
                 "layers.0.nffn.norm.weight", "layers.1.nffn.norm.bias",
                 "layers.0.mega.wz.bias", "output.final_norm.weight",
                 "output.final_norm.bias"):
        saved = ref.state[name].clone()
        ref.state[name] = torch.zeros_like(saved)
        try:
            moved = np.abs(ref.logits(ids).numpy() - want).max()
        finally:
            ref.state[name] = saved
        assert moved > 100 * TOL * np.abs(want).max(), (name, moved)


def test_tied_head_is_the_embedding(exported):
    """share_emb: the checkpoint has no head of its own (the released MegaOutputLayer reuses
    the embedding Parameter; the file holds a copy under output.output.weight)."""
    model, ref = exported["swiglu_scaled_tied"]
    assert "lm_head" not in model.params
    np.testing.assert_array_equal(ref.state["output.output.weight"].numpy(),
                                  ref.state["embed.weight"].numpy())


def test_state_dict_names_and_shapes(exported):
    """The exported tensors are exactly the released state dict's (names and torch shapes,
    Linear weights [out, in]), the buffers (TimestepNorm's priors, the rotary frequencies) as
    the released code initialises them."""
    model, ref = exported["swiglu_scaled_tied"]
    c = model.config
    d, z, v, f, n = c.model_dim, c.z_dim, c.value_dim, c.ffn_hidden_dim, c.cema_ndim
    want = {"embed.weight": (VOCAB, d), "output.output.weight": (VOCAB, d),
            "output.final_norm.weight": (d,), "output.final_norm.bias": (d,),
            "output.final_norm.prior_count": (), "output.final_norm.prior_mean": (8,),
            "output.final_norm.prior_logv": (8,), "rope.freqs": (c.head_dim // 2,)}
    for i in range(c.num_layers):
        m, ffn = f"layers.{i}.mega.", f"layers.{i}.nffn."
        want.update({
            m + "timenorm.weight": (d,), m + "timenorm.bias": (d,),
            m + "timenorm.prior_count": (), m + "timenorm.prior_mean": (8,),
            m + "timenorm.prior_logv": (8,),
            m + "cema.alpha": (d, n, 1), m + "cema.delta": (d, n, 1), m + "cema.theta": (d, 1, 1),
            m + "cema.gamma": (d, n, 2), m + "cema.omega": (d, 1), m + "rmsnorm.weight": (d,),
            m + "wz.weight": (z, d), m + "wz.bias": (z,), m + "wv.weight": (v, d),
            m + "wv.bias": (v,), m + "wr.weight": (v, d), m + "wr.bias": (v,),
            m + "wh1.weight": (d, d), m + "wh1.bias": (d,), m + "wh2.weight": (d, v),
            m + "gamma": (2, z), m + "beta": (2, z),
            ffn + "norm.weight": (d,), ffn + "norm.bias": (d,), ffn + "fc1.weight": (f, d),
            ffn + "fc2.weight": (d, f), ffn + "fc3.weight": (f, d)})
    assert {k: tuple(t.shape) for k, t in ref.state.items()} == want
    for name, t in ref.state.items():
        if "prior" in name:
            assert not t.any(), name  # count 0, mean 0, log-variance 0
    assert ref.state["layers.0.mega.timenorm.prior_count"].dtype == torch.int64
    # the released RotaryEmbedding's buffer: 1 / base^(j / d_z), j = 0, 2, ...
    j = np.arange(0, c.head_dim, 2)
    np.testing.assert_allclose(ref.state["rope.freqs"].numpy(),
                               1.0 / c.rope_theta ** (j / c.head_dim), rtol=1e-6)
    # gamma / beta are qk_scale / qk_bias, in that order (q row 0, k row 1)
    np.testing.assert_array_equal(ref.state["layers.1.mega.gamma"].numpy(),
                                  np.asarray(model.params["layers"]["qk_scale"][1]))
    np.testing.assert_array_equal(ref.state["layers.1.mega.beta"].numpy(),
                                  np.asarray(model.params["layers"]["qk_bias"][1]))
    np.testing.assert_array_equal(ref.state["layers.0.mega.wz.weight"].numpy(),
                                  np.asarray(model.params["layers"]["wz"]["kernel"][0]).T)


def test_config_json_fields(exported):
    """config.json carries the released ModelConf's fields with our values (share_emb for
    tie_word_embeddings)."""
    model, ref = exported["swiglu_scaled_tied"]
    c, conf = model.config, ref.conf
    assert ref.raw_config["model_type"] == "megalodon"
    for ours, theirs in (("vocab_size", "vocab_size"), ("model_dim", "model_dim"),
                         ("num_layers", "num_layers"), ("num_heads", "num_heads"),
                         ("z_dim", "z_dim"), ("value_dim", "value_dim"),
                         ("ffn_hidden_dim", "ffn_hidden_dim"), ("cema_ndim", "cema_ndim"),
                         ("chunk_size", "chunk_size"), ("norm_num_groups", "norm_num_groups"),
                         ("norm_eps", "norm_eps"), ("swiglu", "swiglu"),
                         ("scale_emb", "scale_emb"), ("tie_word_embeddings", "share_emb")):
        assert getattr(conf, theirs) == getattr(c, ours), theirs
        assert theirs in ref.raw_config, theirs
    assert "tie_word_embeddings" not in ref.raw_config


def test_config_json_speaks_the_released_vocabulary(tmp_path):
    """A non-default rope_theta reaches the released code's config field: the reference reads
    only ModelConf's keys (rope_base) and must then equal our logits."""
    model = make_model(CONFIGS["groups1_scaled"], seed=3)  # rope_theta = 100
    ref = reference_for(model, tmp_path)
    assert ref.raw_config.get("rope_base") == 100.0
    ids = random_ids(2, 16, seed=16)
    assert_rel(logits(model, ids), ref.logits(ids).numpy(), TOL)


# ----------------------------------------------------------------------------- 2. round trips


def test_init_is_the_released_init(exported):
    """Model.init: every norm weight / bias, qk_scale / qk_bias and projection bias zero (the
    released offsets from 1), CEMA gamma's imaginary part zero, kernels 'he'
    N(0, 1/(3·fan_in)), embedding N(0, 1/D); the parameter tree is the one compared above."""
    config = CONFIGS["base"]
    model = lx.Model.init(config, jax.random.key(0))
    flat = traverse_util.flatten_dict(model.params)
    assert flat.keys() == traverse_util.flatten_dict(exported["base"][0].params).keys()
    for path, leaf in flat.items():
        leaf = np.asarray(leaf)
        if path[-1] in ("bias", "qk_scale", "qk_bias") or path[-2:] in (
                ("timenorm", "weight"), ("rmsnorm", "weight"), ("ffn_norm", "weight"),
                ("final_norm", "weight")):
            assert not leaf.any(), path
        elif path[-1] == "kernel" and path[0] == "layers":
            want = 1 / np.sqrt(3 * leaf.shape[-2])
            assert 0.75 < leaf.std() / want < 1.25, (path, leaf.std(), want)
    assert not flat[("layers", "cema", "gamma")][..., 1].any()
    assert 0.8 < np.asarray(flat[("embed", "embedding")]).std() * 4 < 1.2  # 1/√16
    assert np.all(np.isfinite(logits(model, random_ids(2, 24, seed=24))))



def assert_same_model(back: lx.Model, model: lx.Model) -> None:
    """Equal config, bit-equal parameters and logits."""
    assert back.config == model.config and isinstance(back.config, MegalodonConfig)
    flat, flat_back = (traverse_util.flatten_dict(p) for p in (model.params, back.params))
    assert flat.keys() == flat_back.keys()
    for path in flat:
        np.testing.assert_array_equal(flat_back[path], flat[path], err_msg=str(path))
    ids = random_ids(2, 24, seed=24)
    np.testing.assert_array_equal(logits(back, ids), logits(model, ids))


def test_hf_round_trip(exported, tmp_path):
    model, _ = exported["base"]
    lx.to_hf(model, tmp_path)
    assert_same_model(lx.from_hf(tmp_path), model)
    # the tied model: no head of its own after the round trip either
    tied, _ = exported["swiglu_scaled_tied"]
    lx.to_hf(tied, tmp_path / "tied")
    back = lx.from_hf(tmp_path / "tied")
    assert "lm_head" not in back.params and back.config.tie_word_embeddings
    np.testing.assert_array_equal(back.params["embed"]["embedding"],
                                  tied.params["embed"]["embedding"])


@pytest.mark.parametrize("config", [
    CONFIGS["base"], CONFIGS["swiglu_scaled_tied"], CONFIGS["groups1_scaled"],
    tiny(bos_token_id=1, eos_token_id=(2, 3), pad_token_id=0, norm_eps=1e-6),
    tiny(eos_token_id=5)])
def test_config_round_trip(config):
    hf = json.loads(json.dumps(config.to_hf()))
    assert MegalodonConfig.from_hf(hf) == config
    assert models.config_from_hf(hf) == config


def test_config_from_released_dict():
    """A config.json in the released ModelConf's vocabulary: rope_base read as rope_theta,
    share_emb as tie_word_embeddings, ModelConf's defaults for the rest."""
    hf = {"model_type": "megalodon", "vocab_size": VOCAB, "model_dim": 32, "num_layers": 2,
          "num_heads": 2, "z_dim": 16, "value_dim": 32, "ffn_hidden_dim": 48, "rope_base": 500.0,
          "share_emb": True, "swiglu": True, "efficient_attn": None, "init_mode": "he",
          "rescale_nffn": False, "norm_affine": True, "dropout": 0.0}
    c = MegalodonConfig.from_hf(hf)
    assert (c.rope_theta, c.tie_word_embeddings, c.swiglu, c.cema_ndim, c.chunk_size,
            c.norm_num_groups, c.norm_eps) == (500.0, True, True, 16, 2048, 32, 1e-5)


def test_orbax_round_trip(exported, tmp_path):
    model, _ = exported["base"]
    lx.save(model, tmp_path / "ckpt")
    assert_same_model(lx.load(tmp_path / "ckpt"), model)


# ----------------------------------------------------------------------------- 3. errors


def released(**changes) -> dict:
    return {**CONFIGS["base"].to_hf(), **changes}


@pytest.mark.parametrize("changes,match", [
    ({"rescale_nffn": True}, "rescale_nffn"),
    ({"dropout": 0.1}, "dropout"),
    ({"attention_dropout": 0.1}, "attention_dropout"),
    ({"hidden_dropout": 0.1}, "hidden_dropout"),
    ({"norm_affine": False}, "norm_affine"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"z_dim": 10, "num_heads": 4}, "num_heads"),
    ({"value_dim": 6, "num_heads": 4, "z_dim": 8}, "num_heads"),
    ({"norm_num_groups": 5}, "norm_num_groups"),
    ({"z_dim": 6, "num_heads": 2}, "even"),
    ({"model_type": "llama"}, "model_type"),
])
def test_config_errors(changes, match):
    with pytest.raises(ValueError, match=match):
        MegalodonConfig.from_hf(released(**changes))


def test_rope_scaling_is_refused(exported, tmp_path):
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}
    with pytest.raises(ValueError, match="rope_scaling"):
        MegalodonConfig.from_hf(released(), rope_scaling=scaling)
    with pytest.raises(ValueError, match="rope_scaling"):
        CONFIGS["base"].with_rope_scaling(scaling)
    assert CONFIGS["base"].with_rope_scaling(None) is CONFIGS["base"]
    model, _ = exported["base"]
    lx.to_hf(model, tmp_path)
    with pytest.raises(ValueError, match="rope_scaling"):
        lx.from_hf(tmp_path, rope_scaling=scaling)


def test_dataclass_errors():
    with pytest.raises(ValueError, match="num_heads"):
        tiny(z_dim=10, num_heads=4)
    with pytest.raises(ValueError, match="norm_num_groups"):
        tiny(norm_num_groups=3)
    with pytest.raises(ValueError, match="even"):
        tiny(z_dim=6, num_heads=2)
    with pytest.raises(ValueError, match="chunk_size"):
        tiny(chunk_size=0)
    with pytest.raises(ValueError, match="eos_token_id"):
        tiny(eos_token_id=VOCAB)


def test_sequence_length_and_attention_errors(exported):
    model, _ = exported["base"]
    for length in (12, 20):  # longer than a chunk of 8, not a multiple of it
        with pytest.raises(ValueError, match="chunk_size=8"):
            jax.eval_shape(model.apply, model.params, random_ids(2, length))
    with pytest.raises(ValueError, match="xla"):
        jax.eval_shape(model.replace(attention="flash").apply, model.params, random_ids(2, 8))


def test_recurrent_state_refusals(exported):
    """generate(use_cache=False) would refeed the sequence into a recurrent state; a call with
    a decode state longer than a chunk cannot fit the chunk's K/V slots: both named errors."""
    model, _ = exported["base"]
    with pytest.raises(ValueError, match="use_cache=True"):
        lx.generate(model, random_ids(1, 5), 3, use_cache=False)
    c = model.config
    state = lx.models.family_of(c).decode_state(c, 1, 16, jnp.float32)
    ids = random_ids(1, c.chunk_size + 1)
    ctx = lx.layers.Context(jnp.zeros(ids.shape, jnp.int32), None, None, None, jnp.int32(0))
    with pytest.raises(ValueError, match="at most one chunk"):
        jax.eval_shape(lambda p: model.module.apply({"params": p}, ids, ctx, state),
                       model.params)


# ----------------------------------------------------------------------------- 4. locality


@pytest.mark.parametrize("t", [3, 8, 13, 23])
def test_a_token_changes_no_earlier_logit(exported, t):
    """Changing the token at t (inside the first chunk, at a chunk start, mid-chunk, last)
    leaves every logit before t unchanged (up to the FFT convolution's round-off, which mixes
    all positions at ~1e-7 of the scale) and changes the logits at t."""
    model, _ = exported["base"]
    base = random_ids(1, 24, seed=7)
    changed = base.copy()
    changed[0, t] = (changed[0, t] + 17) % VOCAB
    out = logits(model, np.concatenate([base, changed]))
    assert_rel(out[1, :t], out[0, :t], 1e-5, f"before {t}")
    assert np.abs(out[1, t] - out[0, t]).max() > 1e-2 * np.abs(out[0, t]).max()


def test_documents_do_not_attend_across(exported):
    """segment ids [1]*5 + [2]*19 and left padding [0]*3 + [1]*21: equal to the reference with
    a block-diagonal mask (CEMA and the norm statistics run on across the boundary; padding
    is left out of them) and different from the same tokens without segment ids."""
    model, ref = exported["base"]
    ids = random_ids(2, 24, seed=11)
    segments = np.array([[1] * 5 + [2] * 19, [0] * 3 + [1] * 21], np.int32)
    ours = logits(model, ids, segments)
    want = ref.logits(ids, torch.as_tensor(segments)).numpy()
    assert_rel(ours[0], want[0], TOL, "two documents")
    assert_rel(ours[1, 3:], want[1, 3:], TOL, "left padding")
    plain = logits(model, ids)
    assert_rel(ours[0, :5], plain[0, :5], 1e-5, "first document")
    assert np.abs(ours[0, 5:8] - plain[0, 5:8]).max() > 1e-2  # the first chunk's tail
    # the reference's mask is not the plain one either
    assert np.abs(want[0, 5:8] - ref.logits(ids).numpy()[0, 5:8]).max() > 1e-2


def test_left_padding_of_whole_chunks_is_the_row_alone(exported):
    """Padding (segment 0) is left out of the norm statistics, feeds CEMA zeros and is not
    attended: rows padded by one whole chunk give the logits of the rows alone (their chunks
    then hold the same tokens)."""
    model, _ = exported["base"]
    alone = random_ids(2, 16, seed=13)
    padded = np.concatenate([np.full((2, 8), 5, np.int32), alone], axis=1)
    segments = np.array([[0] * 8 + [1] * 16] * 2, np.int32)
    assert_rel(logits(model, padded, segments)[:, 8:], logits(model, alone), 1e-5)


# ----------------------------------------------------------------------------- 5. generation


@pytest.mark.parametrize("prompt_len,new", [
    (2, 4),     # inside the first chunk (forward over 5 tokens)
    (13, 12),   # the prompt spans a chunk boundary, decoding crosses the next (24 tokens)
    (8, 9),     # the prompt ends exactly at a chunk boundary (16 tokens)
])
def test_generate_equals_full_forward(exported, prompt_len, new):
    """Greedy tokens from the decode state (prefilled chunk by chunk, then one token at a time)
    are the argmax of one full forward over the generated sequence, token for token."""
    model, _ = exported["base"]
    prompt = random_ids(2, prompt_len, seed=prompt_len)
    out = np.asarray(lx.generate(model, prompt, max_new_tokens=new))
    assert out.shape == (2, prompt_len + new)
    np.testing.assert_array_equal(out[:, :prompt_len], prompt)
    full = logits(model, out[:, :-1])
    np.testing.assert_array_equal(out[:, prompt_len:], full[:, prompt_len - 1:].argmax(-1))


def test_generate_left_padded_prompts(exported):
    """Prompts of 13 and 10 tokens: the shorter is left-padded (segment 0); tokens equal the
    argmax of a full forward with those segment ids."""
    model, _ = exported["base"]
    rows = [random_ids(1, 13, seed=21)[0], random_ids(1, 10, seed=22)[0]]
    out = np.asarray(lx.generate(model, [list(r) for r in rows], max_new_tokens=12))
    np.testing.assert_array_equal(out[1, 3:13], rows[1])
    segments = np.ones((2, 24), np.int32)
    segments[1, :3] = 0
    full = logits(model, out[:, :-1], segments)
    np.testing.assert_array_equal(out[:, 13:], full[:, 12:].argmax(-1))


def test_decode_state_does_not_grow():
    config = CONFIGS["base"]
    family = models.family_of(config)
    small, large = (family.decode_state(config, 3, size, jnp.float32) for size in (16, 4096))
    shapes = jax.tree.map(lambda x: (x.shape, x.dtype), small)
    assert shapes == jax.tree.map(lambda x: (x.shape, x.dtype), large)
    assert shapes["layers"]["k"][0] == (2, 3, 8, 1, 8)  # [L, B, chunk, heads, head_dim]
    assert shapes["layers"]["h"] == ((2, 3, 16, 4), jnp.complex64)


# ----------------------------------------------------------------------------- 6. meshes


MESH_CONFIG = tiny(num_heads=2, z_dim=16, chunk_size=4, cema_ndim=2, num_layers=1)  # 1 layer:
MESH_LEN = 32  # compiles in about half the time of 2; 32 tokens = 1 chunk on each of 8 devices


def loss_fn(spec):
    def run(params, ids, segments):
        def loss(params):
            out = spec.apply(params, ids, segment_ids=segments)
            return jnp.mean(jnp.sin(3.0 * out)), out
        (_, out), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return out, grads
    return run


def sharded(spec, mesh, shape):
    """run jitted with the rule shardings of params and the activation spec of [B, T]."""
    params = spec.shardings_of(lx.ModelSpec(spec.config).abstract_params(jnp.float32))
    ids = sharding.activation_sharding(mesh, shape)
    out = sharding.activation_sharding(mesh, (*shape, spec.config.vocab_size),
                                       sharding.TENSOR_AXIS)
    return jax.jit(loss_fn(spec), in_shardings=(params, ids, ids), out_shardings=(out, params))


@pytest.fixture(scope="module")
def one_device():
    model = make_model(MESH_CONFIG, seed=5)
    ids = random_ids(2, MESH_LEN, seed=5)
    segments = np.array([[1] * 9 + [2] * 23, [0] * 6 + [1] * 26], np.int32)
    out, grads = jax.jit(loss_fn(model.spec))(model.params, ids, segments)
    return model, ids, segments, np.asarray(out), grads


@pytest.mark.parametrize("axes", [{"sequence": 8}, {"sequence": 4, "tensor": 2},
                                  {"data": 2, "sequence": 4},
                                  {"sequence": 2, "fsdp": 2, "tensor": 2}],
                         ids=lambda axes: "-".join(f"{k}{v}" for k, v in axes.items()))
def test_chunk_parallel_equals_one_device(one_device, axes):
    """Split over the mesh axis 'sequence' (pieces of whole chunks on their devices, CEMA
    state and norm statistics passed as prefixes), with batch / FSDP / tensor splits: logits
    and every parameter gradient equal the single-device ones."""
    model, ids, segments, want, want_grads = one_device
    mesh = lx.make_mesh(**{"data": 1, **axes})
    spec = model.replace(mesh=mesh).spec
    params = jax.device_put(model.params, spec.shardings_of(model.params))
    out, grads = sharded(spec, mesh, ids.shape)(params, ids, segments)
    assert out.sharding.spec[1] == sharding.SEQUENCE_AXIS
    assert_rel(out, want, MESH_TOL, "logits")
    for (path, g), w in zip(traverse_util.flatten_dict(grads).items(),
                            traverse_util.flatten_dict(want_grads).values()):
        assert_rel(g, w, MESH_TOL, "/".join(path))


def test_chunk_parallel_length_error(one_device):
    model, *_ = one_device
    spec = model.replace(mesh=lx.make_mesh(data=1, sequence=8)).spec
    with pytest.raises(ValueError, match="chunk_size=4"):  # 16 = 4 chunks for 8 devices
        jax.eval_shape(spec.apply, model.params, random_ids(2, 16))
    for length in (12, 20, 48):  # whole chunks, but not whole chunks per device (nor T/P)
        with pytest.raises(ValueError, match="multiple of 32"):
            jax.eval_shape(spec.apply, model.params, random_ids(2, length))
    jax.eval_shape(spec.apply, model.params, random_ids(2, 64))  # 2 chunks per device


_BYTES = {"f32": 4, "s32": 4, "u32": 4, "c64": 8, "f64": 8, "s64": 8, "u64": 8, "c128": 16,
          "bf16": 2, "f16": 2, "pred": 1, "s8": 1, "u8": 1}
_COLLECTIVE = re.compile(r"=\s*(.+?)\s+(all-gather|reduce-scatter|collective-permute|"
                         r"all-to-all|all-reduce)(-start)?\(")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")


def collectives(hlo: str) -> list[tuple[str, list[tuple[str, tuple[int, ...], int]]]]:
    """(op, [(dtype, dims, bytes) of every array in its result shape]) per collective
    instruction; a tuple-shaped result lists each element (a -start op's tuple holds its
    operands and results)."""
    found = []
    for line in hlo.splitlines():
        m = _COLLECTIVE.search(line)
        if not m:
            continue
        arrays = []
        for dtype, dims in _ARRAY.findall(m.group(1)):
            shape = tuple(int(d) for d in dims.split(",") if d)
            arrays.append((dtype, shape, _BYTES[dtype] * int(np.prod(shape, dtype=np.int64))))
        assert arrays, line
        found.append((m.group(2), arrays))
    return found


def test_collectives_parser():
    hlo = ("  %all-reduce.1 = (f32[64,16]{1,0}, f32[16]{0}, /*index=2*/c64[2,3]{1,0}) "
           "all-reduce(%a, %b, %c), channel_id=2\n"
           "  %ag = c64[8,2,16,2]{3,2,1,0} all-gather(%x), dimensions={0}\n"
           "  %cp = (f32[4]{0}, f32[4]{0}) collective-permute-start(%y)\n"
           "  %add = f32[4]{0} add(%p, %q)\n")
    assert collectives(hlo) == [
        ("all-reduce", [("f32", (64, 16), 4096), ("f32", (16,), 64), ("c64", (2, 3), 48)]),
        ("all-gather", [("c64", (8, 2, 16, 2), 4096)]),
        ("collective-permute", [("f32", (4,), 16), ("f32", (4,), 16)])]


def test_only_states_cross_devices():
    """Compiled forward + backward on sequence=8: every all-gather / reduce-scatter /
    collective-permute / all-to-all moves at most the CEMA states (P·B·D·N complex64) or the
    norm statistics, every all-reduce at most one parameter's gradient; both bounds are below
    the size of one device's activation [B, T/P, D], so no activation crosses devices."""
    config = tiny(num_heads=2, z_dim=16, cema_ndim=1, num_layers=1)
    b, t, p = 4, 256, 8
    mesh = lx.make_mesh(data=1, sequence=p)
    spec = lx.ModelSpec(config, mesh=mesh)
    shapes = spec.abstract_params(jnp.float32)  # placed by the rules
    ids = jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=sharding.activation_sharding(
        mesh, (b, t)))
    hlo = sharded(spec, mesh, (b, t)).lower(shapes, ids, ids).compile().as_text()
    d, n, g = config.model_dim, config.cema_ndim, config.norm_num_groups
    cema_bytes, stats_bytes = p * b * d * n * 8, p * b * g * 4  # complex64; f32 / int32
    state_bytes = max(cema_bytes, stats_bytes)
    param_bytes = max(4 * int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
    activation_bytes = b * (t // p) * d * 4
    assert max(state_bytes, param_bytes) < activation_bytes  # the bounds mean something
    found = collectives(hlo)
    kinds = {op for op, _ in found}
    assert "all-gather" in kinds and "all-reduce" in kinds, kinds
    gathered = [nbytes for op, arrays in found if op == "all-gather" for _, _, nbytes in arrays]
    # the CEMA states (XLA may move complex64 as f32 [..., 2, ...]) and the norm statistics
    assert cema_bytes in gathered and stats_bytes in gathered, (gathered, cema_bytes)
    for op, arrays in found:
        limit = param_bytes if op == "all-reduce" else state_bytes
        for dtype, shape, nbytes in arrays:
            assert nbytes <= limit, (op, dtype, shape, nbytes, limit)


# ----------------------------------------------------------------------------- 7. LoRA


def test_lora_adapters_equal_the_merged_model(exported):
    """Adapters on every MEGALODON projection (wz, wv, wr, wh1, wh2, fc1, fc2, fc3), applied
    inside the layers, give the logits of the model with them merged into the kernels."""
    model, _ = exported["swiglu_scaled_tied"]
    cfg = lora.LoraConfig(rank=4, alpha=8.0, targets=models.family_of(model.config).lora_targets)
    rng = np.random.default_rng(3)
    adapters = jax.tree.map(lambda x: jnp.asarray(0.05 * rng.standard_normal(x.shape), x.dtype),
                            lora.init(model.params, cfg, jax.random.key(1)))
    assert set(adapters["layers"]) == set(cfg.targets)
    ids = random_ids(2, 24, seed=24)
    inside = logits(lx.Model(model.config, model.params, lora=cfg), ids, adapters=adapters)
    merged = logits(lx.Model(model.config, lora.merge(model.params, adapters, cfg)), ids)
    assert_rel(inside, merged, 1e-5)
    assert np.abs(inside - logits(model, ids)).max() > 1e-2  # the adapters do something


def test_lora_targets_and_trainable_norms():
    params = random_params(CONFIGS["swiglu_scaled_tied"])
    cfg = lora.LoraConfig(targets=("wz", "wv", "fc1"))
    selected = {path for path, on in traverse_util.flatten_dict(
        lora.trainable_mask(params, cfg)).items() if on}
    norms = {("layers", "timenorm", "weight"), ("layers", "timenorm", "bias"),
             ("layers", "rmsnorm", "weight"), ("layers", "ffn_norm", "weight"),
             ("layers", "ffn_norm", "bias"), ("final_norm", "weight"), ("final_norm", "bias")}
    assert selected == norms | {("embed", "embedding")}
    only_norms = lora.LoraConfig(targets=("wz",), trainable=("norm",))
    assert {path for path, on in traverse_util.flatten_dict(
        lora.trainable_mask(params, only_norms)).items() if on} == norms
    assert set(models.family_of(CONFIGS["base"]).lora_targets) == {
        "wz", "wv", "wr", "wh1", "wh2", "fc1", "fc2", "fc3"}
    with pytest.raises(ValueError, match="LoRA targets"):
        lx.ModelSpec(CONFIGS["base"], lora=lora.LoraConfig(targets=("q", "v")))
