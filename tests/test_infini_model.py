"""Infini-attention as a model option (attention="infini", `lctx_jax.attention.infini`): on
LLaMA-family checkpoints, through export / import / save / load, generation, packing, errors,
parameter completion, gradients and meshes.

With gate logits of -1e4 (sigmoid = 0 exactly in f32) and one segment spanning the input, the
memory path is off and the local path is plain causal attention: it must then equal
transformers' logits on every family. Elsewhere the gates are random normal (not small), so the
memory path shapes the outputs and a bug in it shows.

Weights are drawn with initializer_range 0.2 so logits are O(1) (as in test_model.py).
"""

import json
import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf
from jax.sharding import PartitionSpec as P
from safetensors import safe_open

import lctx_jax as lx
from lctx_jax import models
from lctx_jax.attention.infini import InfiniConfig
from lctx_jax.generate import _prompt_layout

logging.getLogger("transformers").setLevel(logging.ERROR)

VOCAB, HIDDEN, HEADS, KV_HEADS, LAYERS = 96, 32, 4, 2, 2  # head_dim 8
HEAD_DIM = HIDDEN // HEADS
OFF = -1e4  # gate logit whose sigmoid is exactly 0 in f32: the memory path is switched off
FAMILIES = {
    "llama": (tf.LlamaForCausalLM, tf.LlamaConfig, {"attention_bias": True, "mlp_bias": True}),
    "mistral": (tf.MistralForCausalLM, tf.MistralConfig, {"sliding_window": None}),
    "qwen2": (tf.Qwen2ForCausalLM, tf.Qwen2Config, {"tie_word_embeddings": True}),
    "phi3": (tf.Phi3ForCausalLM, tf.Phi3Config, {
        "partial_rotary_factor": 0.5, "pad_token_id": 0, "eos_token_id": 2}),
}


def make_hf(family: str, directory: pathlib.Path) -> torch.nn.Module:
    model_cls, config_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    model = model_cls(config_cls(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=256,
        initializer_range=0.2, **extra)).eval()
    model.save_pretrained(directory)
    return model


def hf_logits(model: torch.nn.Module, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits.float().numpy()


def random_ids(batch: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, length))


_FORWARDS: dict = {}


def logits(model: lx.Model, ids, positions=None, segment_ids=None) -> np.ndarray:
    """model.apply jitted once per spec (config, dtype, attention, remat, mesh): models that
    agree in all of them compute the same function, so they share one compilation (each
    `Model`'s own `__call__` compiles anew, ~1.5 s here)."""
    spec = model.spec
    key = (spec.config, jnp.dtype(spec.dtype), spec.attention, spec.remat, spec.mesh)
    if key not in _FORWARDS:
        _FORWARDS[key] = jax.jit(spec.apply)
    return np.asarray(_FORWARDS[key](model.params, jnp.asarray(ids), positions, segment_ids))


def gates(model: lx.Model) -> np.ndarray:
    return np.asarray(model.params["layers"]["infini_gate"])


def with_gates(model: lx.Model, values: np.ndarray) -> lx.Model:
    params = {**model.params, "layers": {**model.params["layers"],
                                         "infini_gate": jnp.asarray(values, jnp.float32)}}
    return lx.Model.of(model.spec, params)


def random_gates(seed: int = 1) -> np.ndarray:
    """Gate logits ~ N(0, 1.5²): every head mixes in a sizeable share of its memory."""
    return 1.5 * np.random.default_rng(seed).standard_normal((LAYERS, HEADS)).astype(np.float32)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> pathlib.Path:
    directory = tmp_path_factory.mktemp("llama")
    make_hf("llama", directory)
    return directory


def infini_model(directory: pathlib.Path, segment_len: int = 8, update: str = "linear",
                 seed: int = 1) -> lx.Model:
    model = lx.from_hf(directory, attention="infini",
                       infini={"segment_len": segment_len, "update": update})
    return with_gates(model, random_gates(seed))


# ----------------------------------------------------------------------------- 1. local path


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gates_off_one_segment_equals_transformers(family, tmp_path):
    """Gates at -1e4 and segment_len >= T: exactly causal attention with the family's RoPE
    (partial rotary for phi3), GQA and biases, so transformers' logits."""
    hf = make_hf(family, tmp_path)
    ids = random_ids(2, 40)
    ref = hf_logits(hf, ids)
    model = lx.from_hf(tmp_path, attention="infini", infini={"segment_len": 48, "gate_init": OFF})
    assert model.attention == "infini" and model.config.infini == InfiniConfig(48, "linear", OFF)
    assert model.params["layers"]["infini_gate"].dtype == jnp.float32
    np.testing.assert_array_equal(gates(model), np.full((LAYERS, HEADS), OFF, np.float32))
    assert np.abs(ref).max() > 0.5  # the comparison below is not vacuous
    np.testing.assert_allclose(np.asarray(model(ids)), ref, atol=1e-4, rtol=0)

    plain = lx.from_hf(tmp_path)  # no infini: the plain model, unaffected
    assert plain.attention == "xla" and plain.config.infini is None
    assert "infini_gate" not in plain.params["layers"]
    assert plain.config == model.config.with_infini(None)
    np.testing.assert_allclose(np.asarray(plain(ids)), ref, atol=1e-4, rtol=0)
    # other leaves are the checkpoint's, untouched by the gates being added
    rest = {k: v for k, v in model.params["layers"].items() if k != "infini_gate"}
    for a, b in zip(jax.tree.leaves(rest), jax.tree.leaves(plain.params["layers"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_segments_shorter_than_the_input_differ_from_full_attention(llama_dir):
    """The same gates-off model with segment_len < T attends only within segments: the first
    segment matches full attention, later ones do not (the segmenting is real)."""
    ids = random_ids(1, 24)
    full = np.asarray(lx.from_hf(llama_dir)(ids))
    seg = np.asarray(lx.from_hf(llama_dir, infini={"segment_len": 8, "gate_init": OFF})(ids))
    np.testing.assert_allclose(seg[:, :8], full[:, :8], atol=1e-5, rtol=0)
    assert np.abs(seg[:, 8:] - full[:, 8:]).max() > 0.1


# ----------------------------------------------------------------------------- 2. export


def test_export_import_save_load(llama_dir, tmp_path):
    model = infini_model(llama_dir, segment_len=8, update="delta")
    ids = random_ids(2, 40, seed=3)
    reference = logits(model, ids)
    out = tmp_path / "out"
    lx.to_hf(model, out)

    hf = json.loads((out / "config.json").read_text())
    assert hf["model_type"] == "lctx_infini" and hf["infini_base_model_type"] == "llama"
    assert hf["infini_attention"] == {"segment_len": 8, "update": "delta", "gate_init": 0.0}
    assert "Infini-attention" in hf["lctx_jax_note"] and "lctx_jax.from_hf" in hf["lctx_jax_note"]
    with safe_open(str(out / "model.safetensors"), "numpy") as f:
        for i in range(LAYERS):
            np.testing.assert_array_equal(f.get_tensor(f"model.layers.{i}.self_attn.infini_gate"),
                                          gates(model)[i])
    with pytest.raises(Exception, match="lctx_infini"):  # never silently loaded as a LLaMA
        tf.AutoConfig.from_pretrained(out)
    with pytest.raises(Exception, match="lctx_infini"):
        tf.AutoModelForCausalLM.from_pretrained(out)

    back = lx.from_hf(out)
    assert back.attention == "infini" and back.config == model.config
    assert back.dtype == model.dtype and back.remat == model.remat
    assert jax.tree.structure(back.params) == jax.tree.structure(model.params)
    np.testing.assert_array_equal(gates(back), gates(model))
    np.testing.assert_array_equal(logits(back, ids), reference)
    with pytest.raises(ValueError, match="infini"):
        lx.from_hf(out, attention="xla")
    with pytest.raises(ValueError, match="infini"):
        lx.from_hf(out, attention="flash")

    shorter = lx.from_hf(out, infini={"segment_len": 4})  # overrides the stored length only
    assert shorter.config.infini == InfiniConfig(4, "delta", 0.0) and shorter.attention == "infini"
    assert shorter.config == model.config.with_infini(InfiniConfig(4, "delta"))
    np.testing.assert_array_equal(gates(shorter), gates(model))  # the stored gates, not init
    four = logits(shorter, ids)
    np.testing.assert_array_equal(four, logits(lx.Model.of(shorter.spec, model.params), ids))
    assert np.abs(four - reference).max() > 1e-2  # segments of 4 are another model
    linear = lx.from_hf(out, infini={"update": "linear"})
    assert linear.config.infini == InfiniConfig(8, "linear", 0.0)
    assert np.abs(logits(linear, ids) - reference).max() > 1e-2  # the update rule is used

    lx.save(model, tmp_path / "ckpt")
    restored = lx.load(tmp_path / "ckpt")
    assert restored.attention == "infini" and restored.config == model.config
    np.testing.assert_array_equal(gates(restored), gates(model))
    np.testing.assert_array_equal(logits(restored, ids), reference)
    with pytest.raises(ValueError, match="infini"):
        lx.load(tmp_path / "ckpt", attention="xla")


# ----------------------------------------------------------------------------- 3. generation


def greedy_full_forward(model: lx.Model, prompts: list, new: int) -> np.ndarray:
    """Greedy decoding that re-runs the full forward (model.apply) for every token, in
    generate's left-padded layout: padding segment 0 at position 0, real tokens segment 1 at
    0, 1, ... The sequence lives in a fixed [B, P + new] buffer (one compilation); the columns
    not yet generated hold token 0 and cannot matter, the forward being causal
    (`check_causal`)."""
    lengths = np.array([len(p) for p in prompts])
    width = int(lengths.max())
    seq = np.zeros((len(prompts), width + new), np.int32)
    for b, p in enumerate(prompts):
        seq[b, width - len(p):width] = p
    positions, segments = _prompt_layout(jnp.asarray(lengths + new), width + new)
    for step in range(new):
        out = logits(model, seq, positions, segments)
        seq[:, width + step] = out[:, width + step - 1].argmax(-1)
    return seq


def check_causal(model: lx.Model, seq: np.ndarray, positions, segments, cut: int) -> None:
    """Logits before column `cut` do not depend on the tokens from `cut` on."""
    other = seq.copy()
    other[:, cut:] = random_ids(seq.shape[0], seq.shape[1] - cut, seed=cut)
    a, b = logits(model, seq, positions, segments), logits(model, other, positions, segments)
    np.testing.assert_array_equal(a[:, :cut], b[:, :cut])
    assert np.abs(a[:, cut:] - b[:, cut:]).max() > 1e-2


@pytest.mark.parametrize("update", ["linear", "delta"])
def test_generate_equals_the_full_forward(llama_dir, update):
    """Prompts of 37, 21 and 30 tokens (left padded to 37: 5 segments of 8) and 20 new tokens:
    generate's prefill + one-token steps with the O(N) decode state (memory written at each
    segment's last token, the local cache's slots reused) equal full forwards."""
    model = infini_model(llama_dir, segment_len=8, update=update)
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, VOCAB, n).tolist() for n in (37, 21, 30)]
    new = 20
    out = np.asarray(lx.generate(model, prompts, max_new_tokens=new, eos_token_id=()))
    expected = greedy_full_forward(model, prompts, new)
    np.testing.assert_array_equal(out, expected)
    positions, segments = _prompt_layout(jnp.asarray([37 + new, 21 + new, 30 + new]), 37 + new)
    for cut in (29, 40):  # mid-segment, segment start
        check_causal(model, expected, positions, segments, cut)
    if update == "delta":  # use_cache=False: a stream prefill over the whole sequence per token
        uncached = lx.generate(model, prompts, max_new_tokens=new, eos_token_id=(),
                               use_cache=False)
        np.testing.assert_array_equal(np.asarray(uncached), out)

    # the memory path matters: with gates off the generated tokens are others in every row
    off = with_gates(model, np.full((LAYERS, HEADS), OFF, np.float32))
    out_off = np.asarray(lx.generate(off, prompts, max_new_tokens=new, eos_token_id=()))
    np.testing.assert_array_equal(out_off[:, :37], out[:, :37])
    assert (out_off[:, 37:] != out[:, 37:]).any(axis=1).all()


@pytest.mark.parametrize("length", [1, 16])
def test_generate_from_a_whole_number_of_segments(llama_dir, length):
    """A prompt of one token, and one of exactly two segments (the prefill leaves the local
    cache empty and the first new token starts a segment), equal full forwards."""
    model = infini_model(llama_dir, segment_len=8, update="delta")
    prompts = [np.random.default_rng(length).integers(0, VOCAB, length).tolist()]
    out = np.asarray(lx.generate(model, prompts, max_new_tokens=12, eos_token_id=()))
    np.testing.assert_array_equal(out, greedy_full_forward(model, prompts, 12))


def test_a_sliding_window_holds_on_the_local_path(tmp_path):
    """Mistral's window applies inside the segment too: with the gates off and one segment
    spanning the input, logits equal the plain model's (which slides its window)."""
    hf = {"model_type": "mistral", "vocab_size": VOCAB, "hidden_size": HIDDEN,
          "intermediate_size": 64, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
          "num_key_value_heads": KV_HEADS, "max_position_embeddings": 64, "sliding_window": 4}
    plain = lx.Model.init(lx.ModelConfig.from_hf(hf), jax.random.key(2))
    spec = lx.ModelSpec(plain.config.with_infini(InfiniConfig(32, gate_init=OFF)))
    infini = lx.Model.of(spec, spec.complete_params(plain.params, jax.random.key(0)))
    ids = np.random.default_rng(0).integers(0, VOCAB, (1, 24))
    np.testing.assert_allclose(np.asarray(infini(ids)), np.asarray(plain(ids)), atol=1e-5)


# ----------------------------------------------------------------------------- 4. decode state


def test_decode_state_size_does_not_grow_with_the_prompt():
    plain = lx.ModelConfig.from_hf({
        "model_type": "llama", "vocab_size": VOCAB, "hidden_size": HIDDEN,
        "intermediate_size": 64, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "max_position_embeddings": 256})
    n, batch = 8, 3
    config = plain.with_infini(InfiniConfig(n))
    family = models.family_of(config)

    def shapes(cfg, size):
        state = jax.eval_shape(lambda: family.decode_state(cfg, batch, size, jnp.bfloat16))
        return jax.tree.map(lambda s: (s.shape, s.dtype), state)

    assert shapes(config, 16) == shapes(config, 100_000)
    assert shapes(plain, 16) != shapes(plain, 100_000)  # a KV cache grows with the size
    plain_bytes = sum(s.size * s.dtype.itemsize for s in jax.tree.leaves(
        jax.eval_shape(lambda: family.decode_state(plain, batch, 100_000, jnp.bfloat16))))
    assert plain_bytes == 2 * LAYERS * batch * 100_000 * KV_HEADS * HEAD_DIM * 2

    state = family.decode_state(config, batch, 100_000, jnp.bfloat16)
    assert state["m"].dtype == state["z"].dtype == jnp.float32  # the memory is f32 always
    assert state["k"].dtype == state["v"].dtype == jnp.bfloat16
    lead = LAYERS * batch
    memory = lead * KV_HEADS * (HEAD_DIM * HEAD_DIM + HEAD_DIM) * 4
    segment_cache = 2 * lead * n * KV_HEADS * HEAD_DIM * 2 + lead * n * 4  # k, v + segment ids
    doc = lead * 4
    assert sum(x.nbytes for x in jax.tree.leaves(state)) == memory + segment_cache + doc


# ----------------------------------------------------------------------------- 5. packing


@pytest.mark.parametrize("update", ["linear", "delta"])
def test_packed_documents_never_share_a_memory(llama_dir, update):
    """Doc A [0, 13), doc B [13, 40) with segments of 8: the boundary is mid-segment and B spans
    several segments, so B reads its own memory; A's tokens must not reach B's logits."""
    model = infini_model(llama_dir, segment_len=8, update=update)
    ids = random_ids(1, 40, seed=5)
    boundary = 13
    segment_ids = np.where(np.arange(40) < boundary, 1, 2)[None]
    positions = np.where(np.arange(40) < boundary, np.arange(40), np.arange(40) - boundary)[None]
    base = logits(model, ids, positions, segment_ids)
    changed_ids = ids.copy()
    changed_ids[0, :boundary] = random_ids(1, boundary, seed=6)[0]
    changed = logits(model, changed_ids, positions, segment_ids)
    assert np.abs(changed[:, :boundary] - base[:, :boundary]).max() > 1e-2
    np.testing.assert_array_equal(changed[:, boundary:], base[:, boundary:])
    # ...while without the document boundary, A's tokens do reach B (through memory and local)
    whole, whole_changed = logits(model, ids), logits(model, changed_ids)
    assert np.abs(whole_changed[:, 16:] - whole[:, 16:]).max() > 1e-2


# ----------------------------------------------------------------------------- 6. errors


def tiny_config(infini: InfiniConfig | None = None) -> lx.ModelConfig:
    config = lx.ModelConfig.from_hf({
        "model_type": "llama", "vocab_size": VOCAB, "hidden_size": HIDDEN,
        "intermediate_size": 64, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "max_position_embeddings": 256})
    return config.with_infini(infini)


def test_bad_combinations_and_settings_are_refused():
    infini = tiny_config(InfiniConfig(8))
    with pytest.raises(ValueError, match="infini"):
        lx.Model.init(infini, jax.random.key(0), attention="xla")
    with pytest.raises(ValueError, match="segment_len"):
        lx.ModelSpec(tiny_config(), attention="infini")
    assert lx.ModelSpec(infini).attention == "infini"  # the default for an infini config
    assert lx.ModelSpec(tiny_config()).attention == "xla"

    with pytest.raises(ValueError, match="segment_len"):
        InfiniConfig.from_dict({"segment_len": 0})
    with pytest.raises(ValueError, match="segment_len"):
        InfiniConfig.from_dict({"segment_len": 2.5})
    with pytest.raises(ValueError, match="update"):
        InfiniConfig.from_dict({"update": "x", "segment_len": 4})
    with pytest.raises(ValueError, match="segmnt_len"):
        InfiniConfig.from_dict({"segment_len": 4, "segmnt_len": 4})
    with pytest.raises(ValueError, match="segment_len"):
        InfiniConfig.from_dict({"update": "delta"})
    with pytest.raises(ValueError, match="gate_init"):
        InfiniConfig.from_dict({"segment_len": 4, "gate_init": float("nan")})
    assert InfiniConfig.from_dict({"segment_len": 4.0, "update": "delta", "gate_init": -2}) == (
        InfiniConfig(4, "delta", -2.0))


@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 (simulated) devices")
def test_a_sequence_split_mesh_is_refused():
    mesh = lx.make_mesh(data=1, fsdp=1, tensor=1, sequence=2, devices=jax.devices()[:2])
    with pytest.raises(ValueError, match="sequence"):
        lx.Model.init(tiny_config(InfiniConfig(8)), jax.random.key(0), mesh=mesh)
    lx.ModelSpec(tiny_config(), mesh=mesh)  # plain attention may split the sequence


def test_from_hf_argument_errors(llama_dir):
    with pytest.raises(ValueError, match="segment_len"):
        lx.from_hf(llama_dir, attention="infini")  # no settings
    with pytest.raises(ValueError, match="infini"):
        lx.from_hf(llama_dir, attention="xla", infini={"segment_len": 8})


# ----------------------------------------------------------------------------- 7. completion


def test_complete_params_adds_only_the_gates():
    plain = lx.Model.init(tiny_config(), jax.random.key(0))
    spec = lx.ModelSpec(tiny_config(InfiniConfig(8, gate_init=0.75)))
    completed = spec.complete_params(plain.params, jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(completed["layers"]["infini_gate"]),
                                  np.full((LAYERS, HEADS), 0.75, np.float32))
    assert completed["layers"]["infini_gate"].dtype == jnp.float32
    rest = {**completed, "layers": {k: v for k, v in completed["layers"].items()
                                    if k != "infini_gate"}}
    assert jax.tree.structure(rest) == jax.tree.structure(plain.params)
    for a, b in zip(jax.tree.leaves(rest), jax.tree.leaves(plain.params), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert spec.complete_params(completed, jax.random.key(2)) is completed  # nothing missing
    assert np.isfinite(logits(lx.Model.of(spec, completed), random_ids(1, 12))).all()

    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), plain.params)
    assert spec.complete_params(bf16, jax.random.key(1))["layers"]["infini_gate"].dtype == (
        jnp.bfloat16)

    extra = {**plain.params, "layers": {**plain.params["layers"],
                                        "extra": jnp.zeros((LAYERS, 3))}}
    with pytest.raises(ValueError, match="extra"):
        spec.complete_params(extra, jax.random.key(1))
    wrong = {**plain.params, "norm": {"scale": jnp.ones((HIDDEN + 1,))}}
    with pytest.raises(ValueError, match="norm/scale"):
        spec.complete_params(wrong, jax.random.key(1))
    bad_gate = {**completed, "layers": {**completed["layers"],
                                        "infini_gate": jnp.zeros((LAYERS, HEADS + 1))}}
    with pytest.raises(ValueError, match="infini_gate"):
        spec.complete_params(bad_gate, jax.random.key(1))


# ----------------------------------------------------------------------------- 8. gradients


def test_gradients_reach_the_gates(llama_dir):
    model = lx.from_hf(llama_dir, infini={"segment_len": 8, "gate_init": 0.5})
    ids = jnp.asarray(random_ids(2, 36, seed=7))  # 5 segments, the last one partial

    @jax.jit
    def loss(params):
        return lx.next_token_nll(model, ids, params=params)

    grads = jax.jit(jax.grad(loss))(model.params)
    for leaf in jax.tree.leaves(grads):
        assert np.isfinite(np.asarray(leaf)).all()
    gate_grad = np.asarray(grads["layers"]["infini_gate"])
    assert gate_grad.shape == (LAYERS, HEADS) and (np.abs(gate_grad) > 1e-6).all()

    # and it is the loss's derivative: a central difference along a random gate direction
    direction = np.random.default_rng(8).standard_normal((LAYERS, HEADS)).astype(np.float32)
    eps = 1e-2
    shifted = [loss(with_gates(model, gates(model) + s * eps * direction).params)
               for s in (1, -1)]
    numeric = (float(shifted[0]) - float(shifted[1])) / (2 * eps)
    np.testing.assert_allclose(float(np.sum(gate_grad * direction)), numeric, rtol=2e-2)


# ----------------------------------------------------------------------------- 9. meshes


@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 (simulated) devices")
@pytest.mark.parametrize("axes", [{"data": 2}, {"data": 1, "tensor": 2}])
def test_on_a_mesh_logits_equal_one_device(llama_dir, axes):
    model = infini_model(llama_dir, segment_len=8)
    ids = random_ids(2, 28, seed=9)
    single = logits(model, ids)
    mesh = lx.make_mesh(**axes, devices=jax.devices()[:2])
    sharded = lx.Model(model.config, model.params, mesh=mesh)
    assert sharded.param_shardings["layers"]["infini_gate"].spec == P()
    np.testing.assert_allclose(np.asarray(sharded(ids)), single, atol=1e-5, rtol=0)
    # parameters created on the mesh follow the rules too
    fresh = lx.Model.init(model.config, jax.random.key(0), mesh=mesh)
    assert fresh.params["layers"]["infini_gate"].sharding.spec == P()


@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 (simulated) devices")
def test_from_hf_onto_a_mesh_creates_the_gates_there(llama_dir):
    """A plain checkpoint read onto a mesh with Infini-attention: the new gates are created
    there, by the rules, next to the checkpoint's split weights, and the logits are the
    single-device model's."""
    mesh = lx.make_mesh(data=1, tensor=2, devices=jax.devices()[:2])
    settings = {"segment_len": 8, "gate_init": 0.25}
    placed = lx.from_hf(llama_dir, mesh=mesh, infini=settings)
    gate = placed.params["layers"]["infini_gate"]
    assert gate.sharding == jax.sharding.NamedSharding(mesh, P())
    np.testing.assert_array_equal(np.asarray(gate), np.full((LAYERS, HEADS), 0.25, np.float32))
    kernel = placed.params["layers"]["q"]["kernel"]
    assert kernel.sharding == placed.param_shardings["layers"]["q"]["kernel"]
    assert kernel.sharding.spec != P()  # split over "tensor"
    ids = random_ids(2, 20, seed=10)
    np.testing.assert_allclose(np.asarray(placed(ids)),
                               logits(lx.from_hf(llama_dir, infini=settings), ids),
                               atol=1e-5, rtol=0)


def test_generation_memory_does_not_grow_with_the_prompt():
    """XLA's compiled memory of the whole generate program (prefill + decode loop): with
    Infini-attention the prompt is prefilled segment by segment into a fixed state, so from a
    128- to an 8192-token prompt only the token buffer and its int32 masks grow (~11 bytes per
    prompt token here); the plain model's KV cache and prefill activations grow by > 1 KiB per
    token."""
    import importlib
    generate_module = importlib.import_module("lctx_jax.generate")
    hf = {"model_type": "llama", "vocab_size": 512, "hidden_size": 128,
          "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "max_position_embeddings": 64}
    plain = lx.ModelConfig.from_hf(hf)
    growth = {}
    for name, config in (("plain", plain), ("infini", plain.with_infini(InfiniConfig(64)))):
        model = lx.Model.init(config, jax.random.key(0))
        temps = []
        for width in (128, 8192):
            compiled = generate_module._generate.lower(
                model.params, jnp.zeros((1, width), jnp.int32), jnp.full((1,), width, jnp.int32),
                jnp.zeros((0,), jnp.int32), jnp.int32(0), jnp.float32(1), jnp.float32(1),
                jax.random.key(0), module=model.module, cache_dtype=jnp.dtype(jnp.float32),
                max_new_tokens=8, greedy=True, use_cache=True).compile()
            temps.append(compiled.memory_analysis().temp_size_in_bytes)
        growth[name] = (temps[1] - temps[0]) / (8192 - 128)
    assert growth["infini"] < 32, growth
    assert growth["plain"] > 1024, growth
