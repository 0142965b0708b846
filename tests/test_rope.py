"""lctx_jax.rope against transformers' rope init functions and rotary embeddings (PyTorch, CPU).

Tolerances. Both sides compute in f32 with the same operation order and IEEE rounding. Our
`b ** (2j/d)` is the correctly rounded f32 power; torch's is within 0.6 ulp, so now and then one
ulp off, and that ulp passes through up to three more f32 roundings (reciprocal, product with
the factor, YaRN's blend): inverse frequencies are compared to 4 ulp. Llama 3's smoothing,
smooth = (L/wavelen − low)/(high − low), weighs that ulp by up to (s − 1)·low/(high − low) < s
near the low-frequency edge, so llama3 gets (4 + s) ulp. cos/sin are compared twice: from
transformers' own inverse frequencies (isolates the rotation: f32 cos/sin agree to ~1e-6 at
these angles), and end to end, where the frequency difference grows with the position to at
most max_position · ulps · ulp(inv_freq) in the angle.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, Phi3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

import lctx_jax as lx
from lctx_jax import longrope_search, methods

FREQ_RTOL = 4 * 2.0 ** -23  # 4 ulp in f32
ROT_ATOL = 2e-6

HF_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")


def random_scaling(rope_type: str, rng: np.random.Generator, rotary_dim: int, max_pos: int):
    """A random but valid scaling dict for `rope_type`, as a user's config.json would hold."""
    factor = float(np.round(rng.uniform(1.0, 16.0), 2))
    orig = int(rng.choice([max_pos // 8, max_pos // 4, max_pos // 2]))
    if rope_type == "default":
        return {"rope_type": "default"}
    if rope_type in ("linear", "dynamic", "ntk"):
        return {"rope_type": rope_type, "factor": factor}
    if rope_type == "yarn":
        out = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": orig,
               "beta_fast": float(rng.choice([16, 32, 64])), "beta_slow": float(rng.choice([1, 2]))}
        variant = rng.integers(4)
        if variant == 1:
            out["mscale"], out["mscale_all_dim"] = 0.707, 1.0
        elif variant == 2:
            out["attention_factor"] = float(rng.uniform(0.8, 1.5))
        elif variant == 3:
            out["truncate"] = False
        return out
    if rope_type == "longrope":
        half = rotary_dim // 2
        short = np.sort(rng.uniform(1.0, 2.0, half))
        long = np.sort(rng.uniform(1.0, 1.25 * factor, half))
        out = {"rope_type": "longrope", "short_factor": short.tolist(),
               "long_factor": long.tolist(), "original_max_position_embeddings": orig}
        if rng.integers(2):
            out["factor"] = factor
        return out
    if rope_type == "llama3":
        low = float(rng.choice([1.0, 2.0]))
        return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                "high_freq_factor": low * float(rng.choice([2.0, 4.0])),
                "original_max_position_embeddings": orig}
    raise AssertionError(rope_type)


def random_config(rope_type: str, seed: int, layout: str) -> dict:
    """A config.json dict in the old (rope_scaling + top-level rope_theta) or new layout."""
    rng = np.random.default_rng(seed)
    head_dim = int(rng.choice([32, 64, 96, 128]))
    heads = int(rng.choice([2, 4]))
    theta = float(rng.choice([10000.0, 50000.0, 500000.0, 1e6, np.round(rng.uniform(1e3, 1e6))]))
    max_pos = int(rng.choice([1024, 2048, 4096]))
    scaling = random_scaling(rope_type, rng, head_dim, max_pos)
    config = {"hidden_size": head_dim * heads, "num_attention_heads": heads,
              "num_key_value_heads": heads, "max_position_embeddings": max_pos,
              "intermediate_size": 64, "num_hidden_layers": 1, "vocab_size": 32}
    if rng.integers(2):
        config["head_dim"] = head_dim
    if layout == "old":
        scaling = dict(scaling)
        scaling["type"] = scaling.pop("rope_type")
        config.update(rope_theta=theta, rope_scaling=scaling)
    else:
        config["rope_parameters"] = {**scaling, "rope_theta": theta}
    return config


def hf_frequencies(config: dict, seq_len):
    hf = LlamaConfig(**config)
    rope_type = hf.rope_parameters["rope_type"]
    if rope_type == "default":
        return LlamaRotaryEmbedding.compute_default_rope_parameters(hf, device="cpu",
                                                                    seq_len=seq_len)
    return ROPE_INIT_FUNCTIONS[rope_type](hf, "cpu", seq_len=seq_len)


def hf_cos_sin(config: dict, positions: np.ndarray):
    emb = LlamaRotaryEmbedding(LlamaConfig(**config))
    cos, sin = emb(torch.zeros(1, dtype=torch.float32), torch.as_tensor(positions))
    return cos.numpy(), sin.numpy()


def frequency_ulps(rope: lx.RopeConfig) -> float:
    return 4 + (rope.factor if rope.rope_type == "llama3" else 0)


def angle_tolerance(inv_freq: np.ndarray, max_position: int, factor: float, ulps: float) -> float:
    """Largest cos/sin change that `ulps` ulp of difference in inv_freq cause at max_position."""
    ulp = np.spacing(np.abs(inv_freq).astype(np.float32)).max()
    return ROT_ATOL + ulps * max_position * float(ulp) * factor


def lengths_around(rope: lx.RopeConfig) -> list[int]:
    switch = (rope.original_max_position_embeddings if rope.rope_type == "longrope"
              else rope.max_position_embeddings)
    return [1, switch - 1, switch, switch + 1, 3 * switch + 7]


@pytest.mark.parametrize("layout", ["old", "new"])
@pytest.mark.parametrize("rope_type", HF_TYPES)
@pytest.mark.parametrize("seed", range(4))
def test_frequencies_match_transformers(rope_type, seed, layout):
    config = random_config(rope_type, seed, layout)
    rope = lx.RopeConfig.from_hf(config)
    assert rope.rope_type == rope_type
    for seq_len in [None] + lengths_around(rope):
        ref, ref_factor = hf_frequencies(config, seq_len)
        inv_freq, factor = lx.rope.frequencies(rope, seq_len)
        np.testing.assert_allclose(np.asarray(inv_freq), ref.numpy(),
                                   rtol=frequency_ulps(rope) * 2.0 ** -23, atol=0)
        assert factor == pytest.approx(ref_factor, rel=1e-12)


@pytest.mark.parametrize("rope_type", HF_TYPES)
@pytest.mark.parametrize("seed", range(3))
def test_cos_sin_match_rotary_embedding(rope_type, seed):
    config = random_config(rope_type, 100 + seed, "new")
    rope = lx.RopeConfig.from_hf(config)
    cos_sin = jax.jit(lambda p: lx.rope.cos_sin(rope, p))
    for length in lengths_around(rope):
        positions = np.arange(length)[None]
        ref_cos, ref_sin = hf_cos_sin(config, positions)
        cos, sin = cos_sin(jnp.asarray(positions))
        inv_freq, factor = hf_frequencies(config, length)
        tol = angle_tolerance(inv_freq.numpy(), length, factor, frequency_ulps(rope))
        np.testing.assert_allclose(np.asarray(cos), ref_cos, rtol=0, atol=tol)
        np.testing.assert_allclose(np.asarray(sin), ref_sin, rtol=0, atol=tol)


@pytest.mark.parametrize("rope_type", HF_TYPES)
def test_rotation_from_transformers_frequencies_is_tight(rope_type):
    """Same inv_freq in, the rotation itself agrees to f32 cos/sin accuracy."""
    config = random_config(rope_type, 7, "new")
    positions = np.arange(0, 3000, 3)[None]
    ref_cos, ref_sin = hf_cos_sin(config, positions)
    seq_len = int(positions.max()) + 1
    inv_freq, factor = hf_frequencies(config, seq_len)
    cos, sin = lx.rope.rotation(jnp.asarray(positions), jnp.asarray(inv_freq.numpy()), factor)
    np.testing.assert_allclose(np.asarray(cos), ref_cos, rtol=0, atol=ROT_ATOL)
    np.testing.assert_allclose(np.asarray(sin), ref_sin, rtol=0, atol=ROT_ATOL)


def test_apply_matches_transformers_partial_rotary():
    """Phi-3 with partial_rotary_factor: rotate the first rotary_dim dims, pass the rest."""
    from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb

    half = 16
    rng = np.random.default_rng(0)
    config = Phi3Config(hidden_size=256, num_attention_heads=4, partial_rotary_factor=0.5,
                        max_position_embeddings=1024, original_max_position_embeddings=256,
                        rope_scaling={"type": "longrope", "short_factor": [1.0] * half,
                                      "long_factor": np.linspace(1, 4, half).tolist()})
    rope = lx.RopeConfig.from_hf(config)
    assert (rope.head_dim, rope.rotary_dim) == (64, 32)
    positions = np.arange(600)[None]
    ref_cos, ref_sin = Phi3RotaryEmbedding(config)(torch.zeros(1), torch.as_tensor(positions))
    q = rng.standard_normal((1, 4, 600, 64)).astype(np.float32)  # transformers: [B, H, T, D]
    ref_q, _ = apply_rotary_pos_emb(torch.as_tensor(q), torch.as_tensor(q), ref_cos, ref_sin)

    cos, sin = lx.rope.cos_sin(rope, jnp.asarray(positions))
    inv_freq, factor = lx.rope.frequencies(rope, 600)
    tol = angle_tolerance(np.asarray(inv_freq), 600, factor, frequency_ulps(rope))
    np.testing.assert_allclose(np.asarray(cos), ref_cos.numpy(), atol=tol, rtol=0)
    ours = lx.rope.apply(jnp.asarray(q.transpose(0, 2, 1, 3)), cos, sin)
    np.testing.assert_allclose(np.asarray(ours).transpose(0, 2, 1, 3), ref_q.numpy(),
                               atol=8 * tol, rtol=0)
    np.testing.assert_array_equal(np.asarray(ours)[..., 32:], q.transpose(0, 2, 1, 3)[..., 32:])


def test_apply_matches_transformers_full_rotary_bf16():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    rng = np.random.default_rng(1)
    positions = np.arange(64)[None]
    config = random_config("llama3", 3, "new")
    rope = lx.RopeConfig.from_hf(config)
    ref_cos, ref_sin = hf_cos_sin(config, positions)
    x = rng.standard_normal((1, 64, 2, rope.head_dim)).astype(np.float32)
    x_bf16 = torch.as_tensor(x).to(torch.bfloat16)
    ref, _ = apply_rotary_pos_emb(x_bf16.transpose(1, 2), x_bf16.transpose(1, 2),
                                  torch.as_tensor(ref_cos).to(torch.bfloat16),
                                  torch.as_tensor(ref_sin).to(torch.bfloat16))
    cos, sin = lx.rope.cos_sin(rope, jnp.asarray(positions), dtype=jnp.bfloat16)
    ours = lx.rope.apply(jnp.asarray(x, jnp.bfloat16), cos, sin)
    assert ours.dtype == jnp.bfloat16
    # Same cos/sin up to one bf16 rounding, same op order: agree to a bf16 ulp of |x| <~ 4.
    np.testing.assert_allclose(np.asarray(ours, np.float32),
                               ref.transpose(1, 2).float().numpy(), atol=2 ** -5, rtol=0)


def test_old_and_new_layouts_agree_and_transformers_config_objects_load():
    old = random_config("yarn", 11, "old")
    new = random_config("yarn", 11, "new")
    assert lx.RopeConfig.from_hf(old) == lx.RopeConfig.from_hf(new)
    assert lx.RopeConfig.from_hf(LlamaConfig(**old)) == lx.RopeConfig.from_hf(new)


def test_phi3_su_and_top_level_original_max_position():
    config = {"model_type": "phi3", "hidden_size": 128, "num_attention_heads": 2,
              "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
              "rope_theta": 10000.0,
              "rope_scaling": {"type": "su", "short_factor": [1.0] * 32,
                               "long_factor": [2.0] * 32}}
    rope = lx.RopeConfig.from_hf(config)
    assert rope.rope_type == "longrope"
    assert rope.original_max_position_embeddings == 4096
    assert rope.factor == 32.0
    _, factor = lx.rope.frequencies(rope)
    assert factor == pytest.approx(math.sqrt(1 + math.log(32) / math.log(4096)))


def test_rope_scaling_override_extends_any_checkpoint():
    base = {"hidden_size": 256, "num_attention_heads": 4, "max_position_embeddings": 4096,
            "rope_theta": 500000.0}
    rope = lx.RopeConfig.from_hf(base, rope_scaling={"rope_type": "yarn", "factor": 8.0,
                                                     "original_max_position_embeddings": 4096})
    assert (rope.rope_type, rope.theta, rope.factor) == ("yarn", 500000.0, 8.0)


def extension(name: str, original: int) -> dict:
    """The rope_scaling of `name` (a methods.METHODS name, or "longrope": searched-style
    factors to the target 201; for L = 71, (201 / L)·L is not 201 in floating point)."""
    if name != "longrope":
        return methods.scaling(name, 4.0, original)
    rope = lx.RopeConfig(head_dim=64, rotary_dim=64, max_position_embeddings=original)
    return longrope_search.rope_scaling(rope, 201, np.linspace(1.0, 4.0, 32))


@pytest.mark.parametrize("name", ["pi", "ntk", "dynamic", "yarn", "llama3", "longrope"])
def test_a_method_on_a_checkpoint_extends_its_max_position_embeddings(name):
    """M = L·s (longrope: its target), L kept; dynamic NTK keeps M = L, which transformers'
    formula reads as the original length. From an already extended config (M = 4L, L kept
    at the top level, as our exports write it) a method extends L again, not M."""
    original = 71
    scaling = extension(name, original)
    expected = {"dynamic": original, "longrope": 201}.get(name, 4 * original)
    heads = {"hidden_size": 256, "num_attention_heads": 4}  # head_dim 64
    checkpoints = [{**heads, "max_position_embeddings": original},
                   {**heads, "max_position_embeddings": 4 * original,
                    "original_max_position_embeddings": original,
                    "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}]
    # without L in the dict, L is the checkpoint's: its top-level L, else its M
    unnamed = {k: v for k, v in scaling.items() if k != "original_max_position_embeddings"}
    for config in checkpoints:
        for given in (scaling, unnamed):
            rope = lx.RopeConfig.from_hf(config, rope_scaling=given)
            assert (rope.max_position_embeddings, rope.original_max_position_embeddings) == (
                expected, original)


def test_reading_a_config_keeps_its_max_position_embeddings():
    """Without rope_scaling the config's M stands, whatever its method (Llama 3.1: 16·L)."""
    config = {"hidden_size": 256, "num_attention_heads": 4, "max_position_embeddings": 131072,
              "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    rope = lx.RopeConfig.from_hf(config)
    assert (rope.max_position_embeddings, rope.original_max_position_embeddings) == (131072, 8192)


def test_ntk_is_default_with_scaled_base():
    config = random_config("ntk", 5, "new")
    rope = lx.RopeConfig.from_hf(config)
    d, s = rope.rotary_dim, rope.factor
    exported = rope.to_hf()
    assert exported["rope_type"] == "default"
    assert exported["rope_theta"] == pytest.approx(rope.theta * s ** (d / (d - 2)))
    ref, _ = hf_frequencies({**config, "rope_parameters": exported}, None)
    np.testing.assert_allclose(np.asarray(lx.rope.frequencies(rope)[0]), ref.numpy(),
                               rtol=FREQ_RTOL, atol=0)


@pytest.mark.parametrize("rope_type", HF_TYPES)
def test_to_hf_round_trips(rope_type):
    rope = lx.RopeConfig.from_hf(random_config(rope_type, 21, "old"))
    config = {"hidden_size": rope.head_dim * 2, "num_attention_heads": 2, "head_dim": rope.head_dim,
              "max_position_embeddings": rope.max_position_embeddings,
              "rope_parameters": rope.to_hf()}
    assert lx.RopeConfig.from_hf(config) == rope
    LlamaConfig(**config)  # transformers accepts what we write


# ----------------------------------------------------------------------------- properties


def test_linear_is_default_at_scaled_positions():
    rope = lx.RopeConfig.from_hf({"hidden_size": 512, "num_attention_heads": 4,
                                  "rope_scaling": {"type": "linear", "factor": 4.0}})
    positions = jnp.arange(0, 8192, 4)
    cos, sin = lx.rope.cos_sin(rope, positions)
    default = lx.rope.default_frequencies(rope)
    cos_ref, sin_ref = lx.rope.rotation(positions // 4, default, 1.0)
    # m/4 is exact for these positions; only the f32 rounding of θ/4 vs θ differs: none.
    np.testing.assert_allclose(np.asarray(cos), np.asarray(cos_ref), atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(sin), np.asarray(sin_ref), atol=1e-6, rtol=0)


def test_yarn_with_factor_one_is_default():
    config = {"hidden_size": 512, "num_attention_heads": 4, "max_position_embeddings": 4096}
    default = lx.RopeConfig.from_hf(config)
    yarn = lx.RopeConfig.from_hf({**config, "rope_scaling": {"type": "yarn", "factor": 1.0}})
    inv_default, af_default = lx.rope.frequencies(default)
    inv_yarn, af_yarn = lx.rope.frequencies(yarn)
    # v·(1 − e) + v·e rounds back to v within one ulp
    np.testing.assert_allclose(np.asarray(inv_yarn), np.asarray(inv_default), rtol=2 ** -23)
    assert af_yarn == af_default == 1.0


def test_llama3_is_continuous_across_the_band_edges():
    """With 512 densely spaced wavelengths, the scale θ'/θ walks from 1 to 1/s without jumps."""
    s = 8.0
    rope = lx.RopeConfig.from_hf({
        "hidden_size": 4096, "num_attention_heads": 4, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": s, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})
    ratio = np.asarray(lx.rope.frequencies(rope)[0] / lx.rope.default_frequencies(rope))
    assert ratio[0] == 1.0 and ratio[-1] == pytest.approx(1 / s)
    assert np.all(np.diff(ratio) <= 1e-7)  # monotone
    assert np.abs(np.diff(ratio)).max() < 0.03  # a jump at an edge would be 1 - 1/s = 0.875


def test_longrope_start_tokens_keep_original_rotation():
    half = 32
    config = {"hidden_size": 256, "num_attention_heads": 4, "max_position_embeddings": 8192,
              "rope_parameters": {"rope_type": "longrope", "original_max_position_embeddings": 1024,
                                  "short_factor": [1.0] * half,
                                  "long_factor": np.linspace(1.0, 10.0, half).tolist(),
                                  "start_tokens": 4}}
    rope = lx.RopeConfig.from_hf(config)
    plain = lx.RopeConfig.from_hf({k: v for k, v in config.items() if k != "rope_parameters"})
    positions = jnp.arange(2048)
    cos, sin = lx.rope.cos_sin(rope, positions)
    cos_plain, sin_plain = lx.rope.cos_sin(plain, positions)
    no_keep = lx.RopeConfig(**{**rope.__dict__, "start_tokens": 0})
    cos_scaled, _ = lx.rope.cos_sin(no_keep, positions)
    np.testing.assert_array_equal(np.asarray(cos[:4]), np.asarray(cos_plain[:4]))
    np.testing.assert_array_equal(np.asarray(sin[:4]), np.asarray(sin_plain[:4]))
    np.testing.assert_array_equal(np.asarray(cos[4:]), np.asarray(cos_scaled[4:]))
    assert rope.to_hf()["start_tokens"] == 4


# ----------------------------------------------------------------------------- jit


@pytest.mark.parametrize("rope_type", ["dynamic", "longrope"])
def test_traced_seq_len_does_not_recompile(rope_type):
    config = random_config(rope_type, 31, "new")
    rope = lx.RopeConfig.from_hf(config)
    traces = []

    @jax.jit
    def freqs(seq_len):
        traces.append(1)
        return lx.rope.frequencies(rope, seq_len)[0]

    for length in lengths_around(rope):
        # transformers' forward recomputes dynamic frequencies (in f32) only past M
        grown = rope_type == "longrope" or length > rope.max_position_embeddings
        ref, _ = hf_frequencies(config, torch.tensor(length) if grown else None)
        ours = np.asarray(freqs(jnp.int32(length)))
        if grown:
            np.testing.assert_allclose(ours, ref.numpy(), rtol=FREQ_RTOL, atol=0)
        else:  # exactly the default frequencies, as transformers keeps them up to M
            np.testing.assert_array_equal(ours, np.asarray(lx.rope.frequencies(rope)[0]))
    assert len(traces) == 1


# ----------------------------------------------------------------------------- errors


BASE = {"hidden_size": 256, "num_attention_heads": 4, "max_position_embeddings": 4096}


@pytest.mark.parametrize("scaling, field", [
    ({"rope_type": "rotary9000"}, "rope_type"),
    ({"rope_type": "linear", "factor": 0.5}, "factor"),
    ({"rope_type": "linear"}, "factor"),
    ({"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0}, "low_freq_factor"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0},
     "low_freq_factor < high_freq_factor"),
    ({"rope_type": "longrope", "short_factor": [1.0] * 32, "long_factor": [1.0] * 31},
     "long_factor must have rotary_dim/2 = 32"),
    ({"rope_type": "longrope", "long_factor": [1.0] * 32}, "short_factor"),
    ({"rope_type": "default", "rope_theta": -1.0}, "rope_theta"),
    ({"rope_type": "yarn", "factor": 4.0, "start_tokens": 4}, "start_tokens"),
])
def test_bad_input_names_the_field(scaling, field):
    with pytest.raises(ValueError, match=field):
        lx.RopeConfig.from_hf({**BASE, "rope_parameters": scaling})


def test_missing_head_dim_information():
    with pytest.raises(ValueError, match="head_dim"):
        lx.RopeConfig.from_hf({"max_position_embeddings": 4096})
