"""lctx_jax.retrieval: needle documents for training (every question answerable from its own
row), the mixing of needle rows into packed batches (exact share, resumable), and the
multi-key needle-in-a-haystack prompts and their scoring."""

import re

import jax
import numpy as np
import pytest

import lctx_jax as lx
from lctx_jax import data, evaluation as ev, retrieval, training
from lctx_jax.train_config import ConfigError, stage, validate
from test_training import TINY_MODEL, read_metrics, tiny_config

ASSIGNED = re.compile(r"^([A-Z_]+) = (\d{5})  # remember this value: \2$", re.M)
ASKED = re.compile(r"^# ([A-Z_]+), as set above:\n\1 = (\d{5})$", re.M)


@pytest.fixture(scope="module")
def tokenizer(small_corpus):
    return data.load_tokenizer(small_corpus["tokenizer"])


@pytest.fixture(scope="module")
def documents(small_corpus):
    docs = data.text_source("stdlib", "train", small_corpus["data_dir"])
    return [docs[i] for i in range(40)]


def test_needle_rows_answer_every_question_from_their_own_needles(tokenizer, documents):
    rows = retrieval.NeedleRows(documents, tokenizer, seq_len=500, seed=7, max_needles=4,
                                answer_weight=5.0)
    counts = set()
    for batch in range(3):
        for r in range(4):
            ids, weights = rows.row(batch, r)
            assert ids.shape == (501,) and ids[0] == tokenizer.bos_id
            assert set(np.unique(weights)) == {1.0, 5.0} and weights.shape == (500,)
            weighted = tokenizer.decode(ids[1:][weights == 5.0])  # restated values, answers
            text = tokenizer.decode(ids[1:])
            assert weighted == "".join(f" {v}" for _, v in ASSIGNED.findall(text)) + "".join(
                f" {v}\n" for _, v in ASKED.findall(text))
            assigned, asked = dict(ASSIGNED.findall(text)), ASKED.findall(text)
            assert asked and dict(asked) == assigned          # each needle asked once, right
            assert len(asked) == len(set(n for n, _ in asked))
            first_question = text.index(", as set above:")
            assert all(text.index(f"{n} = ") < first_question for n in assigned)
            counts.add(len(asked))
            np.testing.assert_array_equal(ids, rows.row(batch, r)[0])   # a pure function
    assert len(counts) > 1 and counts <= {1, 2, 3, 4}
    assert not np.array_equal(rows.row(0, 0)[0], retrieval.NeedleRows(
        documents, tokenizer, 500, seed=8).row(0, 0)[0])
    with pytest.raises(ValueError, match="cannot hold 4 needles"):
        retrieval.NeedleRows(documents, tokenizer, seq_len=300, seed=0, max_needles=4)


def test_mixed_batches_hold_the_share_and_resume_exactly(tokenizer, documents):
    def stream():
        text = data.PackedBatches(documents, tokenizer, 192, 6, seed=0)
        return retrieval.MixedBatches(
            text, retrieval.NeedleRows(documents, tokenizer, 192, 0, max_needles=1), count=2)

    mixed = stream()
    first = next(mixed)
    assert {k: v.shape for k, v in first.items()} == {k: (8, 192) for k in first}
    needle = [i for i in range(8) if tokenizer.decode(first["input_ids"][i]).startswith(
        "# Somewhere below")]
    assert needle == [3, 7]                             # spread evenly, 2 of 8 rows
    assert (first["segment_ids"][needle] == 1).all() and (first["loss_mask"][needle] == 1).all()
    weighted = retrieval.MixedBatches(data.PackedBatches(documents, tokenizer, 192, 6, seed=0),
                                      retrieval.NeedleRows(documents, tokenizer, 192, 0,
                                                           max_needles=1, answer_weight=4.0), 2)
    mask = next(weighted)["loss_mask"]
    assert (mask[needle] == 4.0).sum() == 2 * (7 + 6)  # the answer and the restated value
    assert (np.delete(mask, needle, 0) <= 1).all()
    np.testing.assert_array_equal(first["positions"][3], np.arange(192))
    np.testing.assert_array_equal(first["targets"][3][:-1], first["input_ids"][3][1:])
    state = mixed.get_state()
    expected = [next(mixed) for _ in range(2)]
    resumed = stream()
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    with pytest.raises(ValueError, match="needle stream"):
        resumed.set_state({k: v for k, v in state.items() if k != "needle_batch"})


@pytest.mark.parametrize("length, depth", [(300, 0.0), (400, 0.5), (500, 1.0), (357, 0.3)])
def test_needle_prompt_is_exact_and_puts_the_asked_key_at_its_depth(tokenizer, documents,
                                                                    length, depth):
    lines = retrieval.haystack_lines(tokenizer, documents[:3])
    p = retrieval.needle_prompt(tokenizer, lines, length, depth, 3, np.random.default_rng(1))
    assert p.ids.shape == (length,) and p.ids[0] == tokenizer.bos_id
    text = tokenizer.decode(p.ids[1:])
    assigned = dict(ASSIGNED.findall(text))
    assert sorted(assigned) == sorted(p.names) and len(set(p.names)) == 3
    assert assigned[p.names[0]] == p.answer
    assert text.endswith(retrieval.question(p.names[0]))
    needle = tokenizer.encode(retrieval.needle_line(p.names[0], int(p.answer)))
    assert list(p.ids[p.key_start:p.key_start + len(needle)]) == needle
    head = 1 + len(tokenizer.encode(retrieval.task_line(sorted(p.names))))
    haystack = length - head - len(tokenizer.encode(retrieval.question(p.names[0]))) - sum(
        len(tokenizer.encode(retrieval.needle_line(n, int(v)))) for n, v in assigned.items())
    others = sum(len(tokenizer.encode(retrieval.needle_line(n, int(assigned[n]))))
                 for n in p.names[1:] if text.index(f"{n} = ") < text.index(f"{p.names[0]} = "))
    offset = p.key_start - head - others           # haystack tokens before the asked needle
    longest_line = max(len(line) for line in lines)
    assert abs(offset - depth * haystack) <= longest_line
    with pytest.raises(ValueError, match="cannot hold"):
        retrieval.needle_prompt(tokenizer, lines, 100, 0.5, 3, np.random.default_rng(0))


def _answering(tokenizer, which):
    """A fake generate that answers with the value of needle `which(names in prompt, asked)`."""
    def fake_generate(model, prompts, max_new_tokens, eos_token_id):
        rows = []
        for prompt in np.asarray(prompts):
            text = tokenizer.decode(prompt)
            assigned = ASSIGNED.findall(text)
            asked = re.search(r"\n([A-Z_]+) =$", text).group(1)
            value = dict(assigned)[which([n for n, _ in assigned], asked)]
            new = tokenizer.encode(f" {value}\n")[:max_new_tokens]
            rows.append(np.concatenate([prompt, new, [2] * (max_new_tokens - len(new))]))
        return np.stack(rows)
    return fake_generate


@pytest.mark.parametrize("which, perfect", [(lambda names, asked: asked, True),
                                            (lambda names, asked: names[0], False)])
def test_needle_accuracy_scores_the_asked_key_only(tokenizer, documents, monkeypatch, which,
                                                   perfect):
    model = lx.Model.init(lx.ModelConfig.from_hf(TINY_MODEL), jax.random.key(0))
    monkeypatch.setattr(ev, "generate", _answering(tokenizer, which))
    out = ev.needle_accuracy(model, tokenizer, documents[:3], [300, 360], [0.0, 0.5, 1.0],
                             trials=4, needles=3, batch_size=3)
    grid = np.array(out["accuracy"])
    assert grid.shape == (2, 3) and out["needles"] == 3
    if perfect:
        assert (grid == 1).all()
    else:                    # answering the first needle in the text: right at depth 0 only
        assert (grid[:, 0] == 1).all() and grid[:, 1:].mean() < 0.6


def test_retrieval_stage_field_is_checked(small_corpus, tmp_path):
    c = tiny_config(small_corpus, tmp_path / "run")
    c.stages[0].retrieval = {"share": 1.5}
    with pytest.raises(ConfigError, match="retrieval"):
        validate(c)
    c.stages[0].retrieval = {"share": 0.25}
    c.stages[0].task = "passkey-python"
    with pytest.raises(ConfigError, match="retrieval mixes documents into text.*has none"):
        validate(c)
    c.stages[0].task = "text"
    c.stages[0].retrieval = {"share": 0.25, "max_needles": True}
    with pytest.raises(ConfigError, match="max_needles"):
        validate(c)
    c.stages = [stage("mix", seq_len=32, batch_size=4, steps=2, lr=1e-3,
                      retrieval={"share": 0.3})]
    with pytest.raises(ConfigError, match="whole number of rows"):
        validate(c)


def test_training_with_retrieval_rows_resumes_exactly(small_corpus, tmp_path):
    """A stage with retrieval rows and grad_accum 2: its data position (the text stream's and
    the needle batch counter) goes into the checkpoint, so a run resumed from step 4 repeats
    the straight run's steps 5 and 6 exactly; too short a row for the needles fails before
    anything trains."""
    import shutil
    c = tiny_config(small_corpus, tmp_path / "straight", checkpoint_every=2, log_every=1)
    c.stages = [stage("mix", seq_len=192, batch_size=4, steps=6, lr=1e-3, grad_accum=2,
                      retrieval={"share": 0.5, "max_needles": 1, "answer_weight": 4.0})]
    training.run(c)
    straight = read_metrics(tmp_path / "straight")
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "straight", resumed)
    for later in ("checkpoints/6", "models"):
        shutil.rmtree(resumed / later)
    c.run_dir = str(resumed)
    training.run(c)
    again = read_metrics(resumed)
    assert sorted(again) == list(range(1, 7))
    for step in (5, 6):
        assert again[step]["loss"] == straight[step]["loss"], step
    c.run_dir = str(tmp_path / "short")
    c.stages[0].seq_len = 64
    with pytest.raises(ConfigError, match=r"stages\[0\].retrieval.*cannot hold"):
        training.run(c)
    assert not (tmp_path / "short" / "checkpoints").exists()
