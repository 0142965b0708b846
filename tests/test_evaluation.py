"""lctx_jax.evaluation: both perplexity protocols against brute-force references built from
plain model.apply calls, compile counts, passkey prompts and scoring, and the report files."""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

import lctx_jax as lx
from lctx_jax import data, evaluation as ev, report
from test_training import TINY_MODEL

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def model():
    return lx.Model.init(lx.ModelConfig.from_hf(TINY_MODEL), jax.random.key(0))


@pytest.fixture(scope="module")
def tokenizer(small_corpus):
    return data.load_tokenizer(small_corpus["tokenizer"])


def documents(*lengths: int, seed: int = 0) -> list[np.ndarray]:
    """Random token documents of the given lengths, BOS first."""
    rng = np.random.default_rng(seed)
    return [np.concatenate([[1], rng.integers(3, TINY_MODEL["vocab_size"], n - 1)]
                           ).astype(np.int32) for n in lengths]


def target_log_probs(model, rows: list[np.ndarray], width: int) -> np.ndarray:
    """float64 [len(rows), width]: [r, i] = log p(rows[r][i + 1] | rows[r][:i + 1]), from one
    plain forward over the rows, each extended to width + 1 tokens with zeros (the model is
    causal, so what follows a token cannot change its prediction)."""
    ids = np.stack([np.pad(r, (0, width + 1 - len(r))) for r in rows])
    logits = np.asarray(model(ids), np.float64)[:, :-1]
    top = logits.max(-1, keepdims=True)
    log_z = top[..., 0] + np.log(np.exp(logits - top).sum(-1))
    return np.take_along_axis(logits, ids[:, 1:, None], -1)[..., 0] - log_z


def full_document_nll(model, docs) -> float:
    width = max(len(d) for d in docs) - 1
    log_probs = target_log_probs(model, docs, width)
    return -sum(log_probs[r, :len(d) - 1].sum() for r, d in enumerate(docs))


def brute_force_sliding(model, docs, window: int, stride: int) -> tuple[float, int]:
    """Per target t (1..n−1): the window that scores it is the first whose inputs
    [b, b + window), b a multiple of stride, include t − 1, i.e. b = stride·⌈(t − window) /
    stride⌉ (at least 0); t is scored from a forward over that window's inputs only."""
    cells = [(d, stride * max(0, -(-(t - window) // stride)), t)
             for d, doc in enumerate(docs) for t in range(1, len(doc))]
    starts = sorted({(d, b) for d, b, _ in cells})
    rows = [docs[d][b:min(b + window, len(docs[d]) - 1) + 1] for d, b in starts]
    log_probs = dict(zip(starts, target_log_probs(model, rows, window)))
    return -sum(log_probs[d, b][t - 1 - b] for d, b, t in cells), len(cells)


# ----------------------------------------------------------------------------- perplexity


def test_one_window_per_document_equals_full_document_logits(model):
    docs = documents(20, 33, 7)
    result = ev.sliding_window_nll(model, docs, window=40, stride=8)
    expected = full_document_nll(model, docs)
    assert result.tokens == 19 + 32 + 6 and result.documents == 3 and result.skipped == 0
    np.testing.assert_allclose(result.nll_sum, expected, rtol=1e-5)
    np.testing.assert_allclose(result.loss, expected / result.tokens, rtol=1e-5)
    np.testing.assert_allclose(result.perplexity, np.exp(expected / result.tokens), rtol=1e-5)


@pytest.mark.parametrize("window, stride, batch_size", [(16, 5, 2), (16, 16, 1), (12, 1, 1),
                                                        (10, 7, 1)])
def test_sliding_window_scores_each_target_once_in_its_window(model, window, stride,
                                                              batch_size):
    # lengths: not multiples of the stride, one shorter than the window, one window + 1 long
    # (a single window), a 1-token document (nothing to score: skipped)
    docs = documents(43, 9, 37, window + 1, 1)
    result = ev.sliding_window_nll(model, docs, window=window, stride=stride,
                                   batch_size=batch_size)
    expected, count = brute_force_sliding(model, docs[:-1], window, stride)
    assert result.tokens == count == sum(len(d) - 1 for d in docs)
    assert (result.documents, result.skipped) == (4, 1)
    np.testing.assert_allclose(result.nll_sum, expected, rtol=1e-5)


def test_truncate_cuts_documents_and_skips_short_ones(model):
    docs = documents(30, 12, 25, 24)
    result = ev.truncate_nll(model, docs, length=25, batch_size=3)  # one row is all padding
    expected = full_document_nll(model, [docs[0][:25], docs[2][:25]])
    assert (result.tokens, result.documents, result.skipped) == (48, 2, 2)
    np.testing.assert_allclose(result.nll_sum, expected, rtol=1e-5)
    with pytest.raises(ValueError, match=r"length=31.*longest has 30"):
        ev.truncate_nll(model, docs, length=31)


def test_bad_arguments_name_the_argument(model):
    docs = documents(10)
    with pytest.raises(ValueError, match="stride"):
        ev.sliding_window_nll(model, docs, window=8, stride=9)
    with pytest.raises(ValueError, match="batch_size"):
        ev.sliding_window_nll(model, docs, window=8, batch_size=0)
    with pytest.raises(ValueError, match=r"documents\[0\]"):
        ev.truncate_nll(model, [np.zeros((2, 3), np.int32)], length=2)
    with pytest.raises(ValueError, match="documents is empty"):
        ev.truncate_nll(model, [], length=2)


def test_batching_is_exact_and_compiles_once(model, monkeypatch):
    traces = []
    hidden = model.hidden

    def counting_hidden(*args, **kwargs):
        traces.append(args[1].shape)
        return hidden(*args, **kwargs)

    monkeypatch.setattr(model, "hidden", counting_hidden)
    docs = documents(30, 20, 41, 35, 17, 50, seed=1)  # 34 windows
    one = ev.sliding_window_nll(model, docs, window=12, stride=4, batch_size=1)
    three = ev.sliding_window_nll(model, docs, window=12, stride=4, batch_size=3)
    assert one.tokens == three.tokens
    np.testing.assert_allclose(three.nll_sum, one.nll_sum, rtol=1e-5)
    assert traces == [(1, 12), (3, 12)]  # one trace (compile) per call, however many windows


def test_tokenize_documents(tokenizer):
    texts = ["x = 1\n", "def f():\n    return 2\n" * 5, "", "y = 2\n" * 9]
    docs = ev.tokenize_documents(texts, tokenizer)
    assert [d[0] for d in docs] == [tokenizer.bos_id] * 4 and docs[2].tolist() == [1]
    assert tokenizer.decode(docs[1][1:]) == texts[1] and docs[1].dtype == np.int32
    long = ev.tokenize_documents(texts, tokenizer, min_tokens=len(docs[0]) + 1, limit=1)
    assert len(long) == 1 and np.array_equal(long[0], docs[1])


# ----------------------------------------------------------------------------- passkey


@pytest.mark.parametrize("style", ["prose", "python"])
def test_passkey_prompt_has_exact_length_and_needle_depth(tokenizer, style):
    s = ev.PASSKEY_STYLES[style]
    encode = ev._piece_encoder(tokenizer, s.prose)
    longest_sentence = max(len(encode(text)) for text in s.filler)
    task = 1 + len(tokenizer.encode(s.task))
    fixed = task + len(encode(s.needle.format(key=12345))) + len(encode(s.question))
    for length in (fixed, 200, 333):
        for depth in (0.0, 0.3, 0.5, 1.0):
            p = ev.passkey_prompt(tokenizer, length, depth, 58210, style)
            assert p.ids.shape == (length,) and p.ids.dtype == np.int32
            assert p.ids[0] == tokenizer.bos_id and p.answer == "58210"
            filler = length - fixed
            assert abs(p.key_start - task - depth * filler) <= longest_sentence / 2 + 1
            text = tokenizer.decode(p.ids)
            assert text.count("58210") == 2
            assert tokenizer.decode(p.ids[p.key_start:]).lstrip().startswith(
                s.needle.split("{key}")[0].strip())
    assert text.endswith(s.question.strip())


def test_passkey_prompt_rejects_bad_arguments(tokenizer):
    with pytest.raises(ValueError, match=r"length must be an int >= \d+"):
        ev.passkey_prompt(tokenizer, 20, 0.5, 12345)
    with pytest.raises(ValueError, match="depth"):
        ev.passkey_prompt(tokenizer, 200, 1.5, 12345)
    with pytest.raises(ValueError, match="key"):
        ev.passkey_prompt(tokenizer, 200, 0.5, 1234)
    with pytest.raises(ValueError, match="style"):
        ev.passkey_prompt(tokenizer, 200, 0.5, 12345, style="poem")


def test_passkey_accuracy_runs_on_a_model(model, tokenizer):
    out = ev.passkey_accuracy(model, tokenizer, lengths=[120, 150], depths=[0.0, 1.0],
                              trials=3, style="python", batch_size=2)
    assert out["lengths"] == [120, 150] and out["depths"] == [0.0, 1.0]
    assert np.array(out["accuracy"]).shape == (2, 2) and out["trials"] == 3
    assert all(0 <= a <= 1 for row in out["accuracy"] for a in row)
    assert [e["length"] for e in out["examples"]] == [120, 150]
    json.dumps(out)


@pytest.mark.parametrize("answer, accuracy", [(lambda key: f" {key}.\n", 1.0),
                                              (lambda key: " " + "".join(
                                                  str((int(c) + 1) % 10) for c in key), 0.0),
                                              (lambda key: f"{key[:2]} {key[2:]}", 1.0)])
def test_passkey_scoring(model, tokenizer, monkeypatch, answer, accuracy):
    def fake_generate(model, prompts, max_new_tokens, eos_token_id):
        rows = []
        for prompt in np.asarray(prompts):
            key = re.search(r"\d{5}", tokenizer.decode(prompt)).group()
            new = tokenizer.encode(answer(key))[:max_new_tokens]
            pad = [tokenizer.eos_id] * (max_new_tokens - len(new))
            rows.append(np.concatenate([prompt, new, pad]))
        return np.stack(rows)

    monkeypatch.setattr(ev, "generate", fake_generate)
    out = ev.passkey_accuracy(model, tokenizer, lengths=[160, 200], depths=[0.0, 0.5, 1.0],
                              trials=4, batch_size=3)
    assert out["accuracy"] == [[accuracy] * 3] * 2
    example = out["examples"][0]
    assert (example["expected"] == example["got"].strip(" .\n").replace(" ", "")) == bool(
        accuracy)


def test_passkey_keys_depend_only_on_the_cell(model, tokenizer, monkeypatch):
    seen = []

    def fake_generate(model, prompts, max_new_tokens, eos_token_id):
        seen.extend(re.search(r"\d{5}", tokenizer.decode(p)).group() for p in np.asarray(prompts))
        return np.pad(np.asarray(prompts), ((0, 0), (0, max_new_tokens)))

    monkeypatch.setattr(ev, "generate", fake_generate)
    ev.passkey_accuracy(model, tokenizer, [200], [0.5], trials=5, seed=3, batch_size=2)
    alone = list(seen)
    seen.clear()
    ev.passkey_accuracy(model, tokenizer, [160, 200], [0.0, 0.5], trials=5, seed=3)
    assert len(alone) == 6 and seen[-5:] == alone[:5]  # the last batch is padded with a repeat
    expected = np.random.default_rng([3, 200, 500]).integers(10_000, 100_000, 5)
    assert alone[:5] == [str(k) for k in expected]


# ----------------------------------------------------------------------------- report


def test_write_report(tmp_path):
    ppl = ev.Perplexity(nll_sum=200.0, tokens=100, documents=2, skipped=1)
    passkey = {"lengths": [256, 512], "depths": [0.0, 0.5, 1.0], "trials": 10,
               "accuracy": [[1.0, 0.9, 0.8], [0.5, 0.2, np.float64(0.2)]], "examples": []}
    results = {
        "perplexity": {
            "no fine-tune": {"pi": {"256": ppl, "512": {"perplexity": 25.1234}},
                             "yarn": {256: ppl.as_dict(), "1024": {"perplexity": float("nan")}}},
            "fine-tuned": {"yarn": {"512": {"perplexity": 5.0}}}},
        "passkey": {"no fine-tune": {"pi": passkey, "yarn/2x": passkey},
                    "fine-tuned": {"pi": passkey}},
        "needle": {"fine-tuned": {"pi": {**passkey, "needles": 4}}},
        "meta": {"model": "tiny", "protocol": "sliding window, stride 256"},
    }
    paths = report.write_report(results, tmp_path / "report")
    names = sorted(p.name for p in paths)
    assert names == ["needle_pi.png", "passkey_pi.png", "passkey_yarn_2x.png",
                     "perplexity.png", "results.json", "results.md"]
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == names  # no temp files
    for path in paths:
        if path.suffix == ".png":
            assert path.read_bytes().startswith(PNG)

    saved = json.loads((tmp_path / "report" / "results.json").read_text())
    assert saved["perplexity"]["no fine-tune"]["pi"]["256"]["perplexity"] == pytest.approx(
        np.exp(2.0))
    assert saved["perplexity"]["no fine-tune"]["yarn"]["1024"]["perplexity"] is None
    assert saved["passkey"]["fine-tuned"]["pi"]["accuracy"][1][2] == 0.2

    md = (tmp_path / "report" / "results.md").read_text()
    assert "- model: tiny" in md
    assert "| method | 256 | 512 | 1024 |" in md
    assert "| pi | 7.39 | 25.12 | – |" in md
    assert "| yarn | 7.39 | – | – |" in md
    assert "| yarn/2x | 90.0 | 30.0 |" in md
    # one table of every method, then one per setting; one needle setting: no combined table
    assert md.count("## Perplexity: ") == 3 and md.count("## Passkey retrieval (") == 3
    assert md.count("## Multi-key needle in a haystack (") == 1
    assert "| pi · fine-tuned | 90.0 | 30.0 |" in md
    assert "| yarn · no fine-tune | 7.39 | – | – |" in md
    assert "| yarn/2x · no fine-tune | 90.0 | 30.0 |" in md


def test_metrics_import_no_training_stack():
    """evaluation.py is metrics only: importing it pulls in neither the training stack
    (optax, Orbax, TFDS) nor matplotlib (lctx_jax.report draws the plots)."""
    code = ("import sys, lctx_jax.evaluation; print(sorted(m for m in ('matplotlib', 'optax', "
            "'orbax', 'tensorflow_datasets', 'lctx_jax.training') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"}, check=True)
    assert out.stdout.strip() == "[]"
