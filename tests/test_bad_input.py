"""Bad input never passes silently: damaged config.json fields, weights and token ids each fail
with a message naming the field, tensor or position (or behave as transformers does, where it
defines the behaviour). One tiny Llama checkpoint, corrupted one way per case."""

import json
import logging
import math
import pathlib
import shutil
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers as tf
from jax.experimental import checkify
from safetensors.numpy import load_file, save_file

import lctx_jax as lx
from lctx_jax import data, evaluation

logging.getLogger("transformers").setLevel(logging.ERROR)

VOCAB = 64
WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> pathlib.Path:
    """A tiny Llama checkpoint with an older config.json: head_dim implied by hidden / heads,
    rope_theta at the top level and scaling under rope_scaling (the cases put it there)."""
    root = tmp_path_factory.mktemp("pristine")
    config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    tf.LlamaForCausalLM(config).save_pretrained(root)
    hf = json.loads((root / "config.json").read_text())
    hf.pop("head_dim", None)
    hf["rope_theta"] = hf.pop("rope_parameters")["rope_theta"]
    (root / "config.json").write_text(json.dumps(hf))
    return root


@pytest.fixture
def ckpt(pristine, tmp_path) -> pathlib.Path:
    """A fresh copy of the checkpoint to corrupt."""
    return pathlib.Path(shutil.copytree(pristine, tmp_path / "ckpt"))


def edit_config(path: pathlib.Path, **changes) -> None:
    hf = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is _DROP:
            hf.pop(key, None)
        else:
            hf[key] = value
    (path / "config.json").write_text(json.dumps(hf))


def edit_weights(path: pathlib.Path, change) -> None:
    tensors = load_file(path / WEIGHTS)
    change(tensors)
    save_file(tensors, path / WEIGHTS, metadata={"format": "pt"})


_DROP = object()
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
LONGROPE = {"rope_type": "longrope", "factor": 4.0, "original_max_position_embeddings": 32,
            "short_factor": [1.0] * 4, "long_factor": [2.0] * 4}

# (case, config.json changes, text the error must contain)
CONFIG_CASES = [
    ("vocab as a string", {"vocab_size": "64"}, "vocab_size='64' must be an integer"),
    ("zero hidden size", {"hidden_size": 0}, "hidden_size=0 must be >= 1"),
    ("fractional sizes", {"intermediate_size": 1.5}, "intermediate_size=1.5 must be an integer"),
    ("no layers", {"num_hidden_layers": 0}, "num_hidden_layers=0"),
    ("missing heads", {"num_attention_heads": _DROP}, "lacks the field 'num_attention_heads'"),
    ("hidden not heads x head_dim", {"num_attention_heads": 6}, "not a multiple of"),
    ("kv heads not dividing", {"num_key_value_heads": 3}, "num_key_value_heads"),
    ("negative eps", {"rms_norm_eps": -1}, "rms_norm_eps=-1.0 must be > 0.0"),
    ("zero eps", {"rms_norm_eps": 0}, "rms_norm_eps=0.0 must be > 0.0"),
    ("bos past the vocabulary", {"bos_token_id": 500}, "bos_token_id=500 is outside"),
    ("one eos past the vocabulary", {"eos_token_id": [2, 64]}, "eos_token_id=64 is outside"),
    ("negative eos", {"eos_token_id": -3}, "eos_token_id=-3 is outside"),
    ("tie as a string", {"tie_word_embeddings": "yes"}, "tie_word_embeddings='yes' must be true"),
    ("max positions 0", {"max_position_embeddings": 0}, "max_position_embeddings=0 must be >= 1"),
    ("negative theta", {"rope_theta": -1.0}, "rope_theta=-1.0 must be > 0.0"),
    ("infinite theta", {"rope_theta": math.inf}, "rope_theta=inf must be a finite number"),
    ("infinite factor", {"rope_scaling": {"rope_type": "linear", "factor": math.inf}},
     "factor=inf must be a finite number"),
    ("factor as a string", {"rope_scaling": {"rope_type": "linear", "factor": "8"}},
     "factor='8' must be a number"),
    ("factor below 1", {"rope_scaling": {"rope_type": "linear", "factor": 0.5}},
     "factor must be >= 1"),
    ("NaN long factor", {"rope_scaling": {**LONGROPE, "long_factor": [2.0, math.nan, 2.0, 2.0]}},
     "long_factor[1]=nan must be a finite number"),
    ("long factor not a list", {"rope_scaling": {**LONGROPE, "long_factor": 2.0}},
     "long_factor must be a list"),
    ("betas reversed", {"rope_scaling": {**YARN, "beta_fast": 1.0, "beta_slow": 32.0}},
     "beta_fast=1.0 must be > beta_slow=32.0"),
    ("original length 0", {"rope_scaling": {**YARN, "original_max_position_embeddings": 0}},
     "original_max_position_embeddings=0 must be >= 1"),
    ("type and rope_type disagree", {"rope_scaling": {"type": "linear", "rope_type": "yarn",
                                                      "factor": 2.0}}, "names two methods"),
    ("new layout, infinite factor", {"rope_parameters": {"rope_type": "linear", "factor": math.inf,
                                                         "rope_theta": 1e4}},
     "factor=inf must be a finite number"),
    ("negative start tokens", {"rope_scaling": {**LONGROPE, "start_tokens": -1}},
     "start_tokens=-1 must be >= 0"),
]


@pytest.mark.parametrize("case, changes, message", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_fields_are_named(ckpt, case, changes, message):
    edit_config(ckpt, **changes)
    with pytest.raises(ValueError) as err:
        lx.from_hf(ckpt)
    assert message in str(err.value)


def test_config_json_that_is_not_json_names_the_file(ckpt):
    (ckpt / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(ValueError, match=r"config.json is not valid JSON .* line 1"):
        lx.from_hf(ckpt)


def test_pad_id_minus_one_reads_as_no_pad(ckpt):
    edit_config(ckpt, pad_token_id=-1)
    with pytest.warns(UserWarning, match="pad_token_id=-1 read as null"):
        assert lx.from_hf(ckpt).config.pad_token_id is None


def test_agreeing_type_and_rope_type_are_one_method(ckpt):
    edit_config(ckpt, rope_scaling={"type": "linear", "rope_type": "linear", "factor": 2.0})
    assert lx.from_hf(ckpt).config.rope.factor == 2.0


# ----------------------------------------------------------------------------- weights


def _poison(value):
    def change(tensors):
        tensors["model.layers.0.mlp.up_proj.weight"][3, 5] = value
    return change


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_refused_by_name(ckpt, value):
    edit_weights(ckpt, _poison(value))
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.up_proj.weight .* at index \(3, 5\)"):
        lx.from_hf(ckpt)
    model = lx.from_hf(ckpt, check_finite=False)  # the explicit opt-out
    assert not np.isfinite(np.asarray(model.params["layers"]["up"]["kernel"])).all()


def test_non_finite_weights_in_a_sharded_checkpoint_are_refused(ckpt, tmp_path):
    edit_weights(ckpt, _poison(np.nan))
    model = lx.from_hf(ckpt, check_finite=False)
    lx.to_hf(model, tmp_path / "sharded", max_shard_bytes=4096)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    with pytest.raises(ValueError, match="model.layers.0.mlp.up_proj.weight"):
        lx.from_hf(tmp_path / "sharded")


@pytest.mark.parametrize("dtype, code", [(np.int32, "I32"), (np.bool_, "BOOL")])
def test_integer_and_bool_weights_are_refused(ckpt, dtype, code):
    def change(tensors):
        name = "model.norm.weight"
        tensors[name] = tensors[name].astype(dtype)
    edit_weights(ckpt, change)
    with pytest.raises(ValueError, match=f"model.norm.weight is stored as {code}"):
        lx.from_hf(ckpt)


def _shard_index(path: pathlib.Path, file_name: str) -> None:
    names = load_file(path / WEIGHTS).keys()
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {name: file_name for name in names}}))


@pytest.mark.parametrize("where", ["../other/model.safetensors", "/tmp/model.safetensors",
                                   "sub/../../model.safetensors"])
def test_index_entries_outside_the_checkpoint_are_refused(ckpt, where):
    outside = ckpt.parent / "other"
    outside.mkdir()
    shutil.copy(ckpt / WEIGHTS, outside / WEIGHTS)  # a readable file: only the path is wrong
    _shard_index(ckpt, where)
    with pytest.raises(ValueError, match="not a file inside"):
        lx.from_hf(ckpt)


def test_index_entries_in_a_subdirectory_are_read(ckpt):
    _shard_index(ckpt, "shards/model.safetensors")
    (ckpt / "shards").mkdir()
    shutil.move(ckpt / WEIGHTS, ckpt / "shards" / WEIGHTS)
    assert lx.from_hf(ckpt).config.vocab_size == VOCAB


def test_index_that_is_not_json_names_the_file(ckpt):
    (ckpt / "model.safetensors.index.json").write_text("{")
    with pytest.raises(ValueError, match="index.json is not valid JSON"):
        lx.from_hf(ckpt)


def _hf_logits(path: pathlib.Path, ids: np.ndarray) -> np.ndarray:
    model = tf.AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits.float().numpy()


IDS = np.random.default_rng(0).integers(0, VOCAB, (2, 12))


@pytest.mark.parametrize("head", ["distinct", "equal copy"])
def test_a_tied_config_with_a_stored_head_reads_as_transformers(ckpt, head):
    edit_config(ckpt, tie_word_embeddings=True)

    def change(tensors):
        embedding = tensors["model.embed_tokens.weight"]
        tensors["lm_head.weight"] = (embedding[::-1].copy() if head == "distinct"
                                     else embedding.copy())
    edit_weights(ckpt, change)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = lx.from_hf(ckpt)
    untied = [w for w in caught if "reading them untied" in str(w.message)]
    assert model.config.tie_word_embeddings is (head == "equal copy")
    assert len(untied) == (head == "distinct")
    np.testing.assert_allclose(np.asarray(model(IDS)), _hf_logits(ckpt, IDS), atol=2e-5)


@pytest.mark.parametrize("first_float, config_dtype", [
    ("bfloat16", None), ("float32", None), ("float32", "bfloat16")])
def test_mixed_dtype_files_load_in_the_dtype_transformers_picks(ckpt, first_float, config_dtype):
    """transformers (dtype="auto") takes config.json's dtype, else the first floating-point
    tensor's (in the file's key order: lm_head.weight first here), and casts every weight."""
    edit_config(ckpt, dtype=config_dtype or _DROP)
    other = "float32" if first_float == "bfloat16" else "bfloat16"

    def change(tensors):
        for name in tensors:
            tensors[name] = tensors[name].astype(ml_dtypes.bfloat16 if other == "bfloat16"
                                                 else np.float32)
        tensors["lm_head.weight"] = tensors["lm_head.weight"].astype(
            ml_dtypes.bfloat16 if first_float == "bfloat16" else np.float32)
    edit_weights(ckpt, change)
    hf = tf.AutoModelForCausalLM.from_pretrained(ckpt)
    expected = str(hf.model.embed_tokens.weight.dtype).removeprefix("torch.")
    assert expected == (config_dtype or first_float)
    model = lx.from_hf(ckpt)
    assert {str(leaf.dtype) for leaf in jax.tree.leaves(model.params)} == {expected}


# ----------------------------------------------------------------------------- token ids


@pytest.fixture(scope="module")
def model(pristine):
    return lx.from_hf(pristine)


BAD_IDS = [
    ("id past the vocabulary", np.array([[1, 5, 64]]), r"input_ids\[0, 2\] = 64 is outside"),
    ("negative id", np.array([[1, -1, 3], [1, 2, 3]]), r"input_ids\[0, 1\] = -1 is outside"),
    ("float ids", np.array([[1.0, 2.0]]), "integer token ids, got dtype float64"),
    ("bool ids", np.array([[True, False]]), "integer token ids, got dtype bool"),
    ("1-D ids", np.array([1, 2, 3]), r"must be \[B, T\], got shape \(3,\)"),
    ("empty ids", np.zeros((1, 0), np.int32), "is empty"),
]


@pytest.mark.parametrize("case, ids, message", BAD_IDS, ids=[c[0] for c in BAD_IDS])
def test_bad_token_ids_are_refused_at_every_host_entry(model, case, ids, message):
    for call in (model, lambda x: lx.next_token_nll(model, x),
                 lambda x: lx.generate(model, x, max_new_tokens=2)):
        with pytest.raises(ValueError, match=message.replace("input_ids", "(input|prompt)_ids")):
            call(ids)
    if ids.ndim == 2 and ids.size and ids.dtype.kind == "i":  # device arrays are checked too
        with pytest.raises(ValueError, match=r"is outside"):
            model(jnp.asarray(ids))


def test_a_prompt_list_names_the_sequence_and_position(model):
    with pytest.raises(ValueError, match=r"prompt_ids\[1\]\[2\] = 200 is outside"):
        lx.generate(model, [[1, 5], [1, 5, 200]])


def test_evaluation_documents_are_checked(model):
    documents = [np.arange(10), np.array([1, 2, 99, 4])]
    with pytest.raises(ValueError, match=r"documents\[1\]\[2\] = 99 is outside"):
        evaluation.sliding_window_nll(model, documents, window=8, stride=8)
    with pytest.raises(ValueError, match=r"documents\[1\]\[2\] = 99 is outside"):
        evaluation.truncate_nll(model, documents, length=4)


def test_apply_checks_ids_under_checkify_when_asked(model):
    ids = jnp.asarray([[1, 2, 70]])
    unchecked = jax.jit(model.apply)(model.params, ids)  # the pure path does not check
    assert unchecked.shape == (1, 3, VOCAB)
    checked = jax.jit(checkify.checkify(
        lambda p, x: model.apply(p, x, check_ids=True)))
    err, _ = checked(model.params, ids)
    with pytest.raises(checkify.JaxRuntimeError, match="holds 70 at flat index 2"):
        err.throw()
    err, _ = checked(model.params, jnp.asarray([[1, 2, 3]]))
    err.throw()  # in range: no error


class _NoBos:
    """A tokenizer whose model defines no BOS piece (sentencepiece then says -1)."""
    bos_id, eos_id, vocab_size = -1, 2, 96

    def encode(self, text):
        return [5] * len(text.split())


def test_a_tokenizer_without_bos_cannot_frame_documents():
    with pytest.raises(ValueError, match="bos_id is -1"):
        data.PackedBatches(["a b c"] * 4, _NoBos(), seq_len=16, batch_size=2, seed=0)


def test_an_empty_tokenizer_file_is_refused(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"")
    with pytest.raises(ValueError, match="holds no sentencepiece pieces"):
        data.load_tokenizer(tmp_path / "tokenizer.model")


def test_orbax_checkpoints_with_non_finite_weights_are_refused(ckpt, tmp_path):
    edit_weights(ckpt, _poison(np.inf))
    lx.save(lx.from_hf(ckpt, check_finite=False), tmp_path / "orbax")
    with pytest.raises(ValueError, match="holds NaN or inf in layers/up/kernel"):
        lx.load(tmp_path / "orbax")
    assert not np.isfinite(np.asarray(
        lx.load(tmp_path / "orbax", check_finite=False).params["layers"]["up"]["kernel"])).all()


def test_orbax_config_that_is_not_json_names_the_file(model, tmp_path):
    lx.save(model, tmp_path / "orbax")
    (tmp_path / "orbax" / "config.json").write_text("{]")
    with pytest.raises(ValueError, match=r"orbax/config.json is not valid JSON"):
        lx.load(tmp_path / "orbax")


def test_a_tied_config_storing_only_the_head_is_a_clear_error(ckpt):
    edit_config(ckpt, tie_word_embeddings=True)

    def change(tensors):
        tensors["lm_head.weight"] = tensors.pop("model.embed_tokens.weight")
    edit_weights(ckpt, change)
    with pytest.raises(ValueError, match="lacks 1 tensors .*model.embed_tokens.weight"):
        lx.from_hf(ckpt)


def test_a_hub_cache_snapshot_with_symlinked_shards_loads(pristine, tmp_path):
    """Hugging Face's cache: snapshots/<rev>/ holds symlinks into ../../blobs/."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc123"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    names = load_file(pristine / WEIGHTS).keys()
    index = {"metadata": {}, "weight_map": {name: WEIGHTS for name in names}}
    files = {"config.json": (pristine / "config.json").read_bytes(), WEIGHTS:
             (pristine / WEIGHTS).read_bytes(),
             "model.safetensors.index.json": json.dumps(index).encode()}
    for i, (name, content) in enumerate(files.items()):
        (blobs / f"blob{i}").write_bytes(content)
        (snapshot / name).symlink_to(f"../../blobs/blob{i}")
    np.testing.assert_array_equal(np.asarray(lx.from_hf(snapshot)(IDS)),
                                  np.asarray(lx.from_hf(pristine)(IDS)))


def test_orbax_round_trip_of_mixed_parameter_dtypes(model, tmp_path):
    """bf16 kernels with f32 norms: each leaf is restored in its own dtype and verifies."""
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x if "norm" in jax.tree_util.keystr(path) else x.astype(jnp.bfloat16),
        model.params)
    lx.save(lx.Model(model.config, params), tmp_path / "mixed")
    restored = lx.load(tmp_path / "mixed").params
    assert jax.tree.map(lambda x: x.dtype, restored) == jax.tree.map(lambda x: x.dtype, params)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# Hub config.json files as published (architecture fields), in the shapes that vary: each must
# read, whatever older or newer layout it uses.
HUB_CONFIGS = {
    "Llama-3.1-8B-Instruct": {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "max_position_embeddings": 131072, "rms_norm_eps": 1e-05,
        "rope_theta": 500000.0, "head_dim": 128, "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009], "torch_dtype": "bfloat16",
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"}},
    "Phi-3-mini-128k-instruct": {
        "model_type": "phi3", "vocab_size": 32064, "hidden_size": 3072,
        "intermediate_size": 8192, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 32, "max_position_embeddings": 131072,
        "original_max_position_embeddings": 4096, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
        "sliding_window": 262144, "bos_token_id": 1, "eos_token_id": 32000, "pad_token_id": 32000,
        "rope_scaling": {"type": "su", "rope_type": "longrope", "short_factor": [1.05] * 48,
                         "long_factor": [1.5] * 48}},
    "Qwen2-7B": {
        "model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584,
        "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
        "num_key_value_heads": 4, "max_position_embeddings": 131072, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "sliding_window": 131072, "use_sliding_window": False,
        "max_window_layers": 28, "bos_token_id": 151643, "eos_token_id": 151643,
        "tie_word_embeddings": False, "rope_scaling": None},
    "Mistral-7B-v0.3": {
        "model_type": "mistral", "vocab_size": 32768, "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "max_position_embeddings": 32768, "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0, "sliding_window": None, "head_dim": None,
        "bos_token_id": 1, "eos_token_id": 2},
    "llama-7b (2023 conversion)": {
        "model_type": "llama", "vocab_size": 32000, "hidden_size": 4096,
        "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
        "max_position_embeddings": 2048.0, "rms_norm_eps": 1e-06, "bos_token_id": 0,
        "eos_token_id": 1, "pad_token_id": -1},
}


@pytest.mark.parametrize("name", list(HUB_CONFIGS))
def test_published_hub_configs_read(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the 2023 conversion's pad_token_id -1
        config = lx.models.config_from_hf(HUB_CONFIGS[name])
    hf = HUB_CONFIGS[name]
    assert (config.vocab_size, config.num_heads * config.head_dim) == (
        hf["vocab_size"], hf["hidden_size"])


def _train_config(init_from: pathlib.Path, **overrides):
    from lctx_jax.train_config import default_config, stage
    c = default_config()
    c.init_from = str(init_from)
    c.stages = [stage("base", seq_len=16, batch_size=2, steps=1, lr=1e-4)]
    c.hf_overrides = overrides
    return c


def test_hf_overrides_can_fix_a_bad_field_but_not_change_shapes(ckpt):
    from lctx_jax import train_config
    edit_config(ckpt, pad_token_id=VOCAB)  # past the vocabulary: the config alone is refused
    with pytest.raises(train_config.ConfigError, match="pad_token_id=64 is outside"):
        train_config.validate(_train_config(ckpt))
    fixed = _train_config(ckpt, pad_token_id=0)
    train_config.validate(fixed)
    config = lx.models.config_from_hf(train_config.base_hf_config(fixed))
    assert lx.from_hf(ckpt, config=config).config.pad_token_id == 0  # the weights read with it
    with pytest.raises(train_config.ConfigError, match="hf_overrides.vocab_size=96 changes"):
        train_config.validate(_train_config(ckpt, pad_token_id=0, vocab_size=96))


def test_training_from_a_tied_config_with_a_distinct_head_starts_untied(ckpt):
    from lctx_jax import train_config
    edit_config(ckpt, tie_word_embeddings=True)
    edit_weights(ckpt, lambda t: t.update(
        {"lm_head.weight": t["model.embed_tokens.weight"][::-1].copy()}))
    with pytest.warns(UserWarning, match="reading them untied"):
        base = train_config.base_hf_config(_train_config(ckpt))
    assert base["tie_word_embeddings"] is False


@pytest.mark.parametrize("field, value, message", [
    ("rms_norm_eps", -1.0, "rms_norm_eps=-1.0 must be finite and > 0"),
    ("num_layers", 0, "num_layers=0 must be an int >= 1"),
    ("hidden_size", 32.5, "hidden_size=32.5 must be an int >= 1"),
    ("eos_token_id", (2, 99), "eos_token_id=99 is outside the vocabulary"),
])
def test_a_directly_built_config_is_checked_too(model, field, value, message):
    import dataclasses
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        dataclasses.replace(model.config, **{field: value})


@pytest.mark.parametrize("keyword, value, message", [
    ("positions", np.arange(12.0)[None], "positions must be integers, got dtype float64"),
    ("positions", np.arange(12)[None], r"positions has shape \(1, 12\); it needs input_ids' "
                                       r"\(2, 12\)"),
    ("segment_ids", np.ones((2, 10), np.int32), r"segment_ids has shape \(2, 10\)"),
])
def test_positions_and_segment_ids_are_checked_at_the_host(model, keyword, value, message):
    for call in (lambda **kw: model(IDS, **kw), lambda **kw: lx.next_token_nll(model, IDS, **kw)):
        with pytest.raises(ValueError, match=message):
            call(**{keyword: value})
    positions = np.tile(np.arange(12), (2, 1))
    np.testing.assert_array_equal(np.asarray(model(IDS, positions=positions)),
                                  np.asarray(model(IDS)))
