"""lctx_jax.data: the stdlib corpus and its TFDS build, the sentencepiece tokenizer, and packing
(checked against a plain re-computation of the token stream)."""

import hashlib
import json
import tarfile

import numpy as np
import pytest

from lctx_jax import data

EXCLUDED = {"site-packages", "test", "tests", "idle_test", "__pycache__"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def corpus(data_dir):
    return {split: data.text_source("stdlib", split, data_dir)
            for split in ("train", "validation")}


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer") / "small.model"
    return data.train_tokenizer(corpus["train"], 512, path, max_bytes=1_000_000)


def stdlib_files_by_split():
    """name -> text per split, read straight from the shipped archive."""
    out = {"train": {}, "validation": {}}
    with tarfile.open(data.CORPUS_ARCHIVE) as archive:
        for member in archive.getmembers():
            name = member.name
            if not name.endswith(".py") or EXCLUDED & set(name.split("/")[:-1]):
                continue
            split = ("validation" if int(hashlib.sha1(name.encode()).hexdigest(), 16) % 100 < 5
                     else "train")
            try:
                out[split][name] = archive.extractfile(member).read().decode("utf-8")
            except UnicodeDecodeError:
                pass
    return out


# --- text sources ----------------------------------------------------------------------------

def test_stdlib_build_matches_the_files_and_splits(corpus, data_dir):
    expected = stdlib_files_by_split()
    builder = data.LocalText(config=data.STDLIB, data_dir=data_dir)
    for split, docs in corpus.items():
        names = [r["name"].decode() for r in builder.as_data_source(split=split)]
        assert names == sorted(expected[split])          # relative-path order
        assert list(docs) == [expected[split][n] for n in names]
        assert all(isinstance(d, str) for d in docs)
    assert 10 < len(corpus["validation"]) < len(corpus["train"]) / 10
    assert not set(expected["train"]) & set(expected["validation"])


def test_the_shipped_corpus_is_pinned_by_its_fingerprint(corpus):
    # the figures in the README are labelled with this fingerprint: a change to the shipped
    # archive (or to how documents are read from it) must show up here
    assert data.corpus_fingerprint() == "stdlib-eb6f8507a2fb"
    assert len(corpus["train"]) == 700 and len(corpus["validation"]) == 34


def test_text_source_reuses_build_and_checks_inputs(corpus, data_dir, tmp_path):
    again = data.text_source("stdlib", "validation", data_dir)   # reuses the build
    assert list(again) == list(corpus["validation"])
    assert again[-1] == again[len(again) - 1]
    with pytest.raises(IndexError):
        again[len(again)]
    with pytest.raises(KeyError, match="book_text.*'name', 'text'"):
        data.text_source("stdlib", "train", data_dir, text_key="book_text")
    with pytest.raises(FileNotFoundError, match="download_and_prepare.*array_record"):
        data.text_source("pg19", "train", str(tmp_path), text_key="book_text")


def test_local_text_of_any_directory(tmp_path):
    root = tmp_path / "notes"
    (root / "a" / "skip").mkdir(parents=True)
    files = {f"a/{i:02d}.md": f"note {i}\n\tü  \n" for i in range(40)}
    for name, text in files.items():
        (root / name).write_text(text, encoding="utf-8")
    (root / "a" / "skip" / "x.md").write_text("excluded")
    (root / "a" / "latin1.md").write_bytes(b"caf\xe9")            # not UTF-8: skipped
    (root / "a" / "other.txt").write_text("not matched")
    config = data.TextFilesConfig(name="notes", version="1.0.0", root=str(root),
                                  pattern="**/*.md", exclude_dirs=("skip",),
                                  validation_percent=20)
    got = [t for split in ("train", "validation")
           for t in data.text_source(config, split, str(tmp_path / "tfds"))]
    assert sorted(got) == sorted(files.values())
    assert 0 < len(data.text_source(config, "validation", str(tmp_path / "tfds"))) < 40
    before = data.corpus_fingerprint(config)
    (root / "a" / "00.md").write_text("changed")
    data.corpus_fingerprint.cache_clear()
    assert data.corpus_fingerprint(config) != before
    with tarfile.open(tmp_path / "notes.tar.gz", "w:gz") as archive:   # an archive as root
        archive.add(root, arcname=".", recursive=True)
    packed = data.TextFilesConfig(name="packed", version="1.0.0",
                                  root=str(tmp_path / "notes.tar.gz"), pattern="**/*.md",
                                  exclude_dirs=("skip",), validation_percent=20)
    assert data.corpus_fingerprint(packed).split("-")[1] == data.corpus_fingerprint(
        config).split("-")[1]


# --- tokenizer -------------------------------------------------------------------------------

TRICKY = ["", "\n", "\n\n\n", "\tindented\twith tabs\t", "trailing spaces   \n  ",
          "    def f(x):\n        return x  # 12345 007\n\n", "héllo wörld — ✓ 日本語 \U0001F600",
          " leading space", "\r\nwindows\r\n", "x" * 5000]


def test_tokenizer_round_trip(tokenizer, corpus):
    docs = list(corpus["validation"])
    picked = [max(docs, key=lambda d: d.count("\n\n")),
              max(docs, key=lambda d: sum(ord(c) > 127 for c in d)),
              *docs[:5]]
    assert any(ord(c) > 127 for c in picked[1])
    for text in picked + TRICKY:
        ids = tokenizer.encode(text)
        assert all(isinstance(i, int) for i in ids)
        assert tokenizer.decode(ids) == text
        assert tokenizer.decode(np.asarray(ids, np.int32)) == text
    assert (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (
        512, 1, 2, 3)
    assert tokenizer.encode("") == []
    newline = tokenizer.encode("\n")
    assert len(newline) == 1 and tokenizer.encode("\n\n") == newline * 2
    assert len(tokenizer.encode("1234")) == 4                      # digits split


def test_train_tokenizer_is_deterministic_and_cached(corpus, tmp_path):
    texts = list(corpus["validation"])
    a = data.train_tokenizer(texts, 400, tmp_path / "a.model", max_bytes=200_000)
    data.train_tokenizer(texts, 400, tmp_path / "b.model", max_bytes=200_000)
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.model", "b.model"]  # no tmp left

    def must_not_train():
        raise AssertionError("cached_tokenizer trained although the file exists")

    cached = data.cached_tokenizer(tmp_path / "a.model", must_not_train, 400)
    assert cached.encode(texts[0]) == a.encode(texts[0])
    with pytest.raises(ValueError, match="vocab_size 400, not 500"):
        data.cached_tokenizer(tmp_path / "a.model", must_not_train, 500)
    fresh = data.cached_tokenizer(tmp_path / "new" / "c.model", lambda: texts[:3], 400)
    assert fresh.vocab_size == 400 and (tmp_path / "new" / "c.model").is_file()
    with pytest.raises(ValueError, match="vocab_size 200"):
        data.train_tokenizer(texts, 200, tmp_path / "d.model")
    with pytest.raises(ValueError, match="no non-empty line"):
        data.train_tokenizer(["", "\n"], 400, tmp_path / "d.model")


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.model.*tokenizer\.model.*train_tokenizer"):
        data.load_tokenizer(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match="neither tokenizer.model"):
        data.load_tokenizer(tmp_path)


def byte_level_bpe(texts, directory, config=None, special=None):
    """A byte-level BPE tokenizer.json as Llama 3 and Qwen2 ship (trained here on `texts`), with
    their special tokens, and the checkpoint's config.json / tokenizer_config.json."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|begin_of_text|>",
                                                                  "<|end_of_text|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config))
    if special is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(special))
    return directory


def test_hf_tokenizer_json_equals_transformers(corpus, tmp_path):
    """tokenizer.json through the `tokenizers` library: ids as transformers' fast tokenizer
    gives them without special tokens, exact round trip, BOS/EOS from the checkpoint."""
    import transformers as tf
    texts = list(corpus["validation"])[:20]
    directory = byte_level_bpe(texts, tmp_path / "ckpt",
                               config={"bos_token_id": 0, "eos_token_id": [1, 0]})
    reference = tf.PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"))
    for tok in (data.load_tokenizer(directory), data.load_tokenizer(directory / "tokenizer.json")):
        assert isinstance(tok, data.HFTokenizer)
        assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, len(reference))
        for text in texts[:5] + ["naïve café 🚀\n\tx = 1"]:
            ids = tok.encode(text)
            assert ids == reference.encode(text, add_special_tokens=False)
            assert tok.decode(ids) == text
    rows = next(data.PackedBatches(texts, tok, 64, 2, seed=0))
    assert rows["input_ids"][0, 0] == 0  # documents framed with the checkpoint's BOS


def test_hf_tokenizer_special_ids_from_tokenizer_config(corpus, tmp_path):
    texts = list(corpus["validation"])[:5]
    directory = byte_level_bpe(texts, tmp_path / "a", special={
        "bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|end_of_text|>"}})
    tok = data.load_tokenizer(directory)
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    byte_level_bpe(texts, tmp_path / "b")
    with pytest.raises(ValueError, match="no BOS id: set bos_token_id"):
        data.load_tokenizer(tmp_path / "b")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not a Hugging Face tokenizer.json"):
        data.load_tokenizer(tmp_path / "c")


# --- packing ---------------------------------------------------------------------------------

class CharTokenizer:
    """One token per character: ord(c) + 3; bos 1, eos 2."""
    bos_id, eos_id = 1, 2

    def encode(self, text):
        return [ord(c) + 3 for c in text]


def documents(n=23, seed=0):
    rng = np.random.default_rng(seed)
    return ["".join(chr(97 + (i + j) % 26) for j in range(rng.integers(0, 30))) for i in range(n)]


def reference_stream(docs, seed, shard_index=0, shard_count=1, min_tokens=0, epochs=3):
    """Tokens and document-start flags of the first `epochs` epochs, computed plainly."""
    shard = list(range(shard_index, len(docs), shard_count))
    tokens, starts = [], []
    for epoch in range(epochs):
        for k in np.random.default_rng([seed, epoch]).permutation(len(shard)):
            ids = CharTokenizer().encode(docs[shard[k]])
            if len(ids) >= min_tokens:
                tokens += [1, *ids, 2]
                starts += [True] + [False] * (len(ids) + 1)
    return np.array(tokens), np.array(starts)


def reference_rows(tokens, starts, seq_len, rows):
    """The packed fields of the first `rows` rows, token by token."""
    out = {k: [] for k in ("input_ids", "targets", "positions", "segment_ids", "loss_mask")}
    for r in range(rows):
        w, s = tokens[r * seq_len: r * seq_len + seq_len + 1], starts[r * seq_len:][:seq_len + 1]
        segment, position = 0, 0
        for t in range(seq_len):
            if t == 0 or s[t]:
                segment, position = segment + 1, 0
            out["input_ids"].append(w[t])
            out["targets"].append(w[t + 1])
            out["segment_ids"].append(segment)
            out["positions"].append(position)
            out["loss_mask"].append(0.0 if s[t + 1] else 1.0)
            position += 1
    return {k: np.array(v).reshape(rows, seq_len) for k, v in out.items()}


def take(batches, n):
    out = [next(batches) for _ in range(n)]
    return {k: np.concatenate([b[k] for b in out]) for k in out[0]}


def stream_of(rows):
    """The stream the rows were cut from: the first input token, then every target."""
    return np.r_[rows["input_ids"][0, 0], rows["targets"].reshape(-1)]


def documents_in(stream):
    """The documents (as token tuples) whose bos and eos both lie in the stream."""
    bos, = np.nonzero(stream == 1)
    return [tuple(stream[b + 1:e]) for b in bos
            for e in [b + 1 + np.argmax(stream[b + 1:] == 2)] if stream[e] == 2]


def test_boundaries_by_hand():
    """One document "ab", seq_len 3: the stream is 1 a b 2 1 a b 2 ..."""
    a, b = ord("a") + 3, ord("b") + 3
    rows = next(data.PackedBatches(["ab"], CharTokenizer(), 3, 3, seed=0))
    np.testing.assert_array_equal(rows["input_ids"], [[1, a, b], [2, 1, a], [b, 2, 1]])
    np.testing.assert_array_equal(rows["targets"], [[a, b, 2], [1, a, b], [2, 1, a]])
    np.testing.assert_array_equal(rows["segment_ids"], [[1, 1, 1], [1, 2, 2], [1, 1, 2]])
    np.testing.assert_array_equal(rows["positions"], [[0, 1, 2], [0, 0, 1], [0, 1, 0]])
    np.testing.assert_array_equal(rows["loss_mask"], [[1, 1, 1], [0, 1, 1], [1, 0, 1]])


@pytest.mark.parametrize("seq_len, batch_size, min_tokens", [(16, 4, 0), (5, 3, 0), (64, 2, 10)])
def test_packing_matches_reference(seq_len, batch_size, min_tokens):
    docs = documents()
    batches = data.PackedBatches(docs, CharTokenizer(), seq_len, batch_size, seed=7,
                                 min_tokens=min_tokens)
    tokens, starts = reference_stream(docs, 7, min_tokens=min_tokens)
    n = (len(tokens) - 1) // (seq_len * batch_size)                 # batches within 3 epochs
    got = take(batches, n)
    want = reference_rows(tokens, starts, seq_len, n * batch_size)
    assert {k: v.dtype for k, v in got.items()} == {
        "input_ids": np.int32, "targets": np.int32, "positions": np.int32,
        "segment_ids": np.int32, "loss_mask": np.float32}
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    # every stream token but the first is a target exactly once
    np.testing.assert_array_equal(stream_of(got), tokens[:n * batch_size * seq_len + 1])
    if min_tokens:
        assert min(len(d) for d in documents_in(stream_of(got))) >= min_tokens


def test_epochs_seeds_and_determinism():
    docs = documents(40)
    one_epoch = sum(len(d) + 2 for d in docs)
    first, again, other = (take(data.PackedBatches(docs, CharTokenizer(), 32, 4, seed),
                                2 * one_epoch // 128 + 1) for seed in (3, 3, 4))
    for k in first:
        np.testing.assert_array_equal(first[k], again[k])
    assert not np.array_equal(first["input_ids"], other["input_ids"])
    stream = stream_of(first)
    epoch0, epoch1 = documents_in(stream[:one_epoch]), documents_in(stream[one_epoch:2 * one_epoch])
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1    # same documents, new order


def test_shards_are_disjoint_and_cover_the_documents():
    docs = [f"doc{i:03d}" for i in range(30)]                          # distinct documents
    seen = []
    for shard in range(4):
        batches = data.PackedBatches(docs, CharTokenizer(), 8, 2, seed=1, shard_index=shard,
                                     shard_count=4)
        per_epoch = sum(len(docs[i]) + 2 for i in range(shard, 30, 4))
        stream = stream_of(take(batches, per_epoch // 16 + 1))[:per_epoch]
        found = {"".join(chr(t - 3) for t in d) for d in documents_in(stream)}
        assert found == set(docs[shard::4])
        seen.append(found)
    assert set().union(*seen) == set(docs) and sum(map(len, seen)) == len(docs)


def test_state_resumes_bit_exact():
    docs = documents(9)
    batches = data.PackedBatches(docs, CharTokenizer(), 7, 3, seed=5)
    states, produced = [], []
    for _ in range(20):                                 # ~3 epochs: crosses epoch boundaries
        states.append(json.loads(json.dumps(batches.get_state())))
        produced.append(next(batches))
    assert any(s["offset"] > 0 for s in states)                     # mid-document
    assert {s["epoch"] for s in states} >= {0, 1, 2}
    for i in (0, 4, 11, 17):
        resumed = data.PackedBatches(docs, CharTokenizer(), 7, 3, seed=5)
        resumed.set_state(states[i])
        for want in produced[i:i + 3]:
            got = next(resumed)
            for k in want:
                np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_bad_arguments_and_states():
    docs, tok = documents(5), CharTokenizer()
    for kwargs, field in [({"seq_len": 0}, "seq_len"), ({"batch_size": 0}, "batch_size"),
                          ({"shard_index": 2, "shard_count": 2}, "shard_index"),
                          ({"shard_index": 0, "shard_count": 0}, "shard_count"),
                          ({"seed": -1}, "seed"), ({"shard_index": 5, "shard_count": 6}, "empty")]:
        args = {"seq_len": 4, "batch_size": 2, "seed": 0, **kwargs}
        with pytest.raises(ValueError, match=field):
            data.PackedBatches(docs, tok, **args)
    with pytest.raises(ValueError, match="min_tokens=30"):
        data.PackedBatches(docs, tok, 4, 2, seed=0, min_tokens=30)
    batches = data.PackedBatches(docs, tok, 4, 2, seed=0)
    state = batches.get_state()
    with pytest.raises(ValueError, match="seed"):
        data.PackedBatches(docs, tok, 4, 2, seed=1).set_state(state)
    with pytest.raises(ValueError, match="exactly the keys"):
        batches.set_state({"epoch": 0, "index": 0, "offset": 0})
    with pytest.raises(ValueError, match="offset 1000"):
        batches.set_state({**state, "offset": 1000})


def test_packing_real_tokenizer(tokenizer, corpus):
    docs = corpus["validation"]
    batches = data.PackedBatches(docs, tokenizer, 256, 2, seed=0, min_tokens=300)
    stream = stream_of(take(batches, 12))
    texts = {tokenizer.decode(d) for d in documents_in(stream)}
    assert texts and texts <= set(docs)
    assert all(len(tokenizer.encode(t)) >= 300 for t in texts)
