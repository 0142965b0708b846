"""Training data for causal LM training: text sources (TFDS), tokenizers, and packing of
documents into fixed-length rows with segment ids.

    docs = text_source("stdlib", "train")              # the shipped stdlib corpus, built here
    docs = text_source("pg19", "train", text_key="book_text")   # a prepared TFDS dataset
    tok = cached_tokenizer(path, lambda: docs, vocab_size=4096)
    batches = PackedBatches(docs, tok, seq_len=2048, batch_size=8, seed=0)
    batch = next(batches)          # dict of [batch_size, seq_len] numpy arrays
    state = batches.get_state()    # JSON-serialisable; set_state(state) resumes bit-exact

Tokenizers: a sentencepiece model (`SentencePieceTokenizer`) or a Hugging Face tokenizer.json
(`HFTokenizer`, byte-level BPE as Llama 3 and Qwen2 ship), found by `load_tokenizer`.

Text sources are random-access sequences of str read with TFDS `as_data_source` (ArrayRecord
files; no TensorFlow needed). The embedded corpus "stdlib" is the `*.py` files of CPython
3.11.7's standard library (test directories left out), shipped with the package as
`CORPUS_ARCHIVE` so that it is the same on every machine and Python; `corpus_fingerprint` names
it in run outputs and reports. `LocalText` builds it, or any directory or tar archive of text
files described by a `TextFilesConfig`, in a few seconds, once.

Packing. Each document becomes `[bos] + encode(text) + [eos]`; a shard's documents, in the
epoch's shuffled order, form one token stream, and row r is cut from its seq_len + 1 tokens
w = stream[r·seq_len : (r + 1)·seq_len + 1]: input_ids = w[:-1], targets = w[1:].
Rows overlap by one token, so every stream token but the first is a target exactly once; a
document longer than a row continues in the next row. Per row, segment_ids number the documents
of input_ids from 1, positions count from 0 at each document start and at the row start, and
loss_mask is 0 where the target is the next document's bos.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import hashlib
import io
import operator
import os
import pathlib
import tarfile
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

import numpy as np
import sentencepiece as spm
import tensorflow_datasets as tfds

from lctx_jax import paths

DEFAULT_DATA_DIR = "~/.cache/lctx_jax/tfds"

# ---------------------------------------------------------------------------------------------
# Text sources


@dataclasses.dataclass(eq=False)
class TextFilesConfig(tfds.core.BuilderConfig):
    """The files under `root` (a directory, or a .tar / .tar.xz / .tar.gz archive) matching
    `pattern` (pathlib glob, relative to root; in an archive, fnmatch on the member's name),
    one document each, skipping files in any directory named in `exclude_dirs` and files that
    are not UTF-8. A file goes to "validation" when sha1(relative path) % 100 <
    validation_percent, else to "train". A build is reused while (name, version) stay the same:
    change one of them when the files change."""

    root: str = ""
    pattern: str = "**/*"
    exclude_dirs: tuple[str, ...] = ()
    validation_percent: int = 5


CORPUS_ARCHIVE = pathlib.Path(__file__).parent / "corpus" / "python-3.11.7-stdlib.tar.xz"

# The embedded corpus: the 734 *.py files of CPython 3.11.7's standard library (test
# directories left out), shipped in CORPUS_ARCHIVE with the PSF license, so that every machine
# and every Python trains on the same documents (`corpus_fingerprint` names them).
STDLIB = TextFilesConfig(
    name="stdlib",
    version="1.0.0",  # (builds of the running Python's stdlib were named by its version)
    description="The *.py sources of CPython 3.11.7's standard library (shipped archive).",
    root=str(CORPUS_ARCHIVE),
    pattern="**/*.py",
    exclude_dirs=("site-packages", "test", "tests", "idle_test", "__pycache__"),
)


def _text_files(config: TextFilesConfig) -> list[tuple[str, bytes]]:
    """(relative posix path, contents) of the config's files, sorted by relative path."""
    root = pathlib.Path(config.root)
    excluded = set(config.exclude_dirs)
    if root.is_file() and tarfile.is_tarfile(root):
        pattern = config.pattern.replace("**/", "")  # fnmatch's * also matches "/"
        files = []
        with tarfile.open(root) as archive:
            for member in archive.getmembers():
                name = member.name.removeprefix("./")
                if (member.isfile() and fnmatch.fnmatchcase(name, pattern)
                        and not set(name.split("/")[:-1]) & excluded):
                    files.append((name, archive.extractfile(member).read()))
        return sorted(files)
    if not root.is_dir():
        raise FileNotFoundError(f"TextFilesConfig {config.name!r}: root {root} is neither a "
                                "directory nor a tar archive; set root to what holds the text "
                                "files")
    files = []
    for path in root.glob(config.pattern):
        relative = path.relative_to(root)
        if path.is_file() and not set(relative.parts[:-1]) & excluded:
            files.append((relative.as_posix(), path.read_bytes()))
    return sorted(files)


def _utf8(files: Iterable[tuple[str, bytes]]) -> Iterator[tuple[str, str]]:
    """(name, text) of the files that are UTF-8."""
    for name, raw in files:
        try:
            yield name, raw.decode("utf-8")
        except UnicodeDecodeError:
            continue


def fingerprint_of(dataset: str) -> str | None:
    """The corpus fingerprint of a dataset name: the shipped corpus's for "stdlib", else None
    (a TFDS dataset is named by its name and version)."""
    return corpus_fingerprint() if dataset == "stdlib" else None


@functools.lru_cache(maxsize=8)
def corpus_fingerprint(config: TextFilesConfig = STDLIB) -> str:
    """"<name>-<12 hex digits>": sha256 over the (relative path, text) of every document of
    both splits, in order. Equal fingerprints, equal corpora: runs and reports record it."""
    digest = hashlib.sha256()
    for name, text in _utf8(_text_files(config)):
        digest.update(name.encode() + b"\0" + text.encode() + b"\0")
    return f"{config.name}-{digest.hexdigest()[:12]}"


def _split_of(relative_path: str, validation_percent: int) -> str:
    digest = int(hashlib.sha1(relative_path.encode()).hexdigest(), 16)
    return "validation" if digest % 100 < validation_percent else "train"


class LocalText(tfds.core.GeneratorBasedBuilder):
    """A directory of text files as a TFDS dataset: features "text" (the file's contents) and
    "name" (its path relative to the root), splits "train" and "validation", records in
    relative-path order. Configs: `STDLIB`, or pass any `TextFilesConfig` as `config=`."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [STDLIB]
    # Nothing is downloaded, so there are no URL checksums to look up. (The lookup also needs
    # the importlib_resources backport, which TFDS does not require on Python >= 3.9.)
    url_infos = None

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.builder_config.description,
            features=tfds.features.FeaturesDict(
                {"text": tfds.features.Text(), "name": tfds.features.Text()}),
            disable_shuffling=True)

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        return {split: self._generate_examples(split) for split in ("train", "validation")}

    def _generate_examples(self, split: str) -> Iterator[tuple[str, dict[str, str]]]:
        config = self.builder_config
        for name, text in _utf8(_text_files(config)):
            if _split_of(name, config.validation_percent) == split:
                yield name, {"text": text, "name": name}


class _TextColumn(Sequence[str]):
    """One text feature of a TFDS random-access data source, as a read-only sequence of str."""

    def __init__(self, source: Any, key: str):
        self._source, self._key = source, key

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> str:  # type: ignore[override]
        i = operator.index(index)
        n = len(self._source)
        if not -n <= i < n:
            raise IndexError(f"document index {index} out of range for {n} documents")
        value = self._source[i % n][self._key]
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def text_source(name: str | TextFilesConfig, split: str, data_dir: str | None = None,
                text_key: str = "text") -> Sequence[str]:
    """Random-access documents (str) of `split` of a dataset.

    name: "stdlib" or a TextFilesConfig: built here with `LocalText` on first use (seconds),
          into data_dir (default ~/.cache/lctx_jax/tfds), and reused afterwards.
          Any other name: a TFDS dataset (e.g. "pg19" with text_key="book_text") that must
          already be prepared in ArrayRecord format in data_dir (None: TFDS's default dir).
    """
    if isinstance(name, TextFilesConfig) or name == "stdlib":
        config = STDLIB if name == "stdlib" else name
        data_dir = os.path.expanduser(data_dir or DEFAULT_DATA_DIR)
        builder = LocalText(config=config, data_dir=data_dir, file_format="array_record")
        builder.download_and_prepare()
    else:
        builder = tfds.builder(name, data_dir=data_dir)
        if not builder.is_prepared():
            raise FileNotFoundError(
                f"TFDS dataset {name!r} is not prepared in {builder.data_dir}; prepare it once "
                f"with tfds.builder({name!r}, data_dir={data_dir!r}).download_and_prepare("
                "file_format='array_record') (random access needs ArrayRecord files), or pass "
                "the data_dir where it is prepared")
    features = builder.info.features
    if text_key not in features:
        raise KeyError(f"text_key {text_key!r} is not a feature of {builder.name}; its features "
                       f"are {sorted(features.keys())}")
    return _TextColumn(builder.as_data_source(split=split), text_key)


# ---------------------------------------------------------------------------------------------
# Tokenizer

_TRAIN_THREADS = 2  # recorded in the model file: fixed, so that training is reproducible


class Tokenizer(Protocol):
    """What training and evaluation need of a tokenizer: ids without special tokens, and the
    BOS / EOS ids that frame each document."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    @property
    def bos_id(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...


class SentencePieceTokenizer:
    """A sentencepiece model (LLaMA 1/2's and Mistral's tokenizer.model, or one trained by
    `train_tokenizer`). encode(text) -> ids without BOS/EOS; decode(ids) -> text."""

    files = ("tokenizer.model",)

    def __init__(self, model_proto: bytes, source: Any = None):
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.source = source

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        """-1 when the model has none (LLaMA's)."""
        return self._sp.pad_id()

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()


class HFTokenizer:
    """A Hugging Face `tokenizer.json` (byte-level BPE as Llama 3 and Qwen2 ship, or any other
    the `tokenizers` library reads). encode(text) -> ids without special tokens (documents are
    framed with bos_id / eos_id by the packing, as for sentencepiece); decode(ids) -> text."""

    files = ("tokenizer.json", "tokenizer_config.json")

    def __init__(self, tokenizer: Any, bos_id: int, eos_id: int, source: Any = None):
        self._tok = tokenizer
        self._bos, self._eos = bos_id, eos_id
        self.source = source

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def bos_id(self) -> int:
        return self._bos

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)


def load_tokenizer(path: str | os.PathLike) -> SentencePieceTokenizer | HFTokenizer:
    """The tokenizer at `path`: a sentencepiece model file (tokenizer.model), a Hugging Face
    tokenizer.json, or a checkpoint directory holding one of them (tokenizer.model first).
    For tokenizer.json the BOS / EOS ids come from the directory's config.json
    (bos_token_id, eos_token_id; the first of a list), else from tokenizer_config.json's
    bos_token / eos_token."""
    path = paths.as_path(path)
    if path.is_dir():
        found = [path / name for name in ("tokenizer.model", "tokenizer.json")
                 if (path / name).is_file()]
        if not found:
            raise FileNotFoundError(f"{path} holds neither tokenizer.model (sentencepiece) nor "
                                    "tokenizer.json (Hugging Face tokenizers); give the file "
                                    "as config.tokenizer")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(
            f"no tokenizer at {path}: give a checkpoint's tokenizer.model or tokenizer.json (or "
            "its directory), or train one with lctx_jax.data.train_tokenizer(texts, vocab_size, "
            "path)")
    if path.name.endswith(".json"):
        return _hf_tokenizer(path)
    try:
        tokenizer = SentencePieceTokenizer(path.read_bytes(), source=path)
    except RuntimeError as err:
        raise ValueError(f"{path} is not a sentencepiece model ({err}); a Hugging Face "
                         "tokenizer must be named *.json") from err
    if not tokenizer.vocab_size:
        raise ValueError(f"{path} holds no sentencepiece pieces (an empty or damaged file); "
                         "copy the tokenizer.model again")
    return tokenizer


def _hf_tokenizer(path: Any) -> HFTokenizer:
    import tokenizers

    try:
        tok = tokenizers.Tokenizer.from_str(path.read_text())
    except Exception as err:  # tokenizers raises its own Exception type
        raise ValueError(f"{path} is not a Hugging Face tokenizer.json ({err})") from err
    ids = {}
    config_file = path.parent / "config.json"
    tokenizer_config = path.parent / "tokenizer_config.json"
    config = paths.read_json(config_file) if config_file.is_file() else {}
    special = paths.read_json(tokenizer_config) if tokenizer_config.is_file() else {}
    for which in ("bos", "eos"):
        value = config.get(f"{which}_token_id")
        if isinstance(value, list):
            value = value[0] if value else None
        if value is None:
            token = special.get(f"{which}_token")
            token = token.get("content") if isinstance(token, dict) else token
            value = tok.token_to_id(token) if token else None
        if value is None:
            raise ValueError(f"{path}: no {which.upper()} id: set {which}_token_id in "
                             f"{config_file} or {which}_token in {tokenizer_config}")
        ids[which] = int(value)
    return HFTokenizer(tok, ids["bos"], ids["eos"], source=path)


def _training_lines(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
    """The non-empty lines of the first max_bytes (UTF-8) of texts."""
    seen = 0
    for text in texts:
        for line in text.split("\n"):
            if seen >= max_bytes:
                return
            if line:
                seen += len(line.encode())
                yield line


def train_tokenizer(texts: Iterable[str], vocab_size: int, path: str | os.PathLike, *,
                    max_bytes: int = 16_000_000) -> SentencePieceTokenizer:
    """Trains a BPE sentencepiece model on the lines of the first max_bytes of texts and writes
    it to `path` atomically. Deterministic given its inputs.

    Made for code and prose: no normalization, whitespace kept as is (runs of spaces become
    pieces, so indentation is cheap), "\\n" is a piece of its own, digits are split, and
    characters outside the vocabulary fall back to their UTF-8 bytes, so decode(encode(text))
    == text for any text without U+2581 ("▁", sentencepiece's space marker). Ids: unk 0,
    bos 1, eos 2 (LLaMA's), pad 3.
    """
    reserved = 256 + 5  # byte pieces; unk, bos, eos, pad, "\n"
    if vocab_size <= reserved:
        raise ValueError(f"vocab_size {vocab_size} leaves no room for learned pieces: it must "
                         f"exceed {reserved} (256 byte pieces and 5 special pieces)")
    lines = list(_training_lines(texts, max_bytes))
    if not lines:
        raise ValueError("texts has no non-empty line to train the tokenizer on")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, split_digits=True,
        add_dummy_prefix=False, user_defined_symbols=["\n"], character_coverage=0.9995,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, input_sentence_size=0,
        num_threads=_TRAIN_THREADS, minloglevel=2)
    paths.write_atomically(path, model.getvalue())
    return SentencePieceTokenizer(model.getvalue(), source=paths.as_path(path))


def cached_tokenizer(path: str | os.PathLike, texts_factory: Callable[[], Iterable[str]],
                     vocab_size: int) -> Tokenizer:
    """The tokenizer at `path`; trained on texts_factory() and saved there first if missing."""
    if not paths.as_path(path).exists():
        return train_tokenizer(texts_factory(), vocab_size, path)
    tokenizer = load_tokenizer(path)
    if tokenizer.vocab_size != vocab_size:
        raise ValueError(f"the tokenizer at {path} has vocab_size {tokenizer.vocab_size}, not "
                         f"{vocab_size}: pass vocab_size={tokenizer.vocab_size}, or delete the "
                         "file to train a new one")
    return tokenizer


# ---------------------------------------------------------------------------------------------
# Packing

_CACHED_DOCUMENTS = 16  # tokenized documents kept (LRU): a long document spans many rows


def check_framing(tokenizer: Tokenizer) -> None:
    """ValueError unless the tokenizer's BOS and EOS ids are tokens of its vocabulary: packing
    frames each document as [bos] doc [eos] (sentencepiece says -1 for a piece it lacks)."""
    vocab = getattr(tokenizer, "vocab_size", None)
    for name in ("bos_id", "eos_id"):
        token = getattr(tokenizer, name)
        if token < 0 or (vocab is not None and token >= vocab):
            raise ValueError(f"the tokenizer's {name} is {token}, not a token of its vocabulary "
                             f"[0, {vocab}): documents are framed as [bos] doc [eos], so it "
                             "needs both (train it with bos_id / eos_id set)")


class PackedBatches:
    """Endless iterator of packed batches of one host's shard of `documents`.

    Each batch: input_ids, targets, positions, segment_ids int32 and loss_mask float32, all
    [batch_size, seq_len] (see the module docstring). The shard is documents[i] with
    i % shard_count == shard_index; epoch e visits it in the order
    np.random.default_rng([seed, e]).permutation(shard size). Documents with fewer than
    min_tokens tokens (not counting bos/eos) are skipped. Documents are tokenized lazily, as the
    stream reaches them. `tokenizer` is anything with encode(str) -> ids, bos_id and eos_id.
    """

    def __init__(self, documents: Sequence[str], tokenizer: Tokenizer, seq_len: int,
                 batch_size: int, seed: int, shard_index: int = 0, shard_count: int = 1,
                 min_tokens: int = 0):
        for field, value, least in (("seq_len", seq_len, 1), ("batch_size", batch_size, 1),
                                    ("shard_count", shard_count, 1), ("seed", seed, 0),
                                    ("min_tokens", min_tokens, 0)):
            if not isinstance(value, (int, np.integer)) or value < least:
                raise ValueError(f"{field} must be an int >= {least}, got {value!r}")
        if not 0 <= shard_index < shard_count:
            raise ValueError(f"shard_index must be in [0, shard_count={shard_count}), got "
                             f"{shard_index!r}: use the host's index, e.g. jax.process_index()")
        check_framing(tokenizer)
        self._shard = range(shard_index, len(documents), shard_count)
        if not self._shard:
            raise ValueError(f"shard {shard_index} of {shard_count} is empty: there are only "
                             f"{len(documents)} documents; use shard_count <= {len(documents)}")
        self._documents, self._tokenizer = documents, tokenizer
        self.seq_len, self.batch_size, self.min_tokens = seq_len, batch_size, min_tokens
        self._key = {"seed": int(seed), "shard_index": int(shard_index),
                     "shard_count": int(shard_count), "num_documents": len(documents)}
        self._tokens = functools.lru_cache(maxsize=_CACHED_DOCUMENTS)(self._tokenize)
        self._order = functools.lru_cache(maxsize=2)(self._permutation)
        self._position = (0, 0, 0)  # (epoch, index in the epoch's order, token offset)
        self._read(self._position, 1)  # fail here, not mid-training, if min_tokens drops all

    def _tokenize(self, document: int) -> np.ndarray:
        ids = self._tokenizer.encode(self._documents[document])
        return np.asarray([self._tokenizer.bos_id, *ids, self._tokenizer.eos_id], np.int32)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self._key["seed"], epoch]).permutation(len(self._shard))

    def _document(self, epoch: int, index: int) -> int:
        return self._shard[int(self._order(epoch)[index])]

    def _read(self, position: tuple[int, int, int], n: int
              ) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int]]:
        """The n stream tokens from `position`, whether each starts a document [n] bool, and
        the position after them."""
        epoch, index, offset = position
        tokens, starts, skipped = [], [], 0
        while n:
            ids = self._tokens(self._document(epoch, index))
            if offset == 0 and len(ids) - 2 < self.min_tokens:
                skipped += 1
                if skipped == len(self._shard):
                    raise ValueError(f"no document of shard {self._key['shard_index']} has "
                                     f"min_tokens={self.min_tokens} tokens; lower min_tokens")
                offset = len(ids)
            else:
                skipped = 0
                taken = ids[offset:offset + n]
                tokens.append(taken)
                starts.append(np.arange(offset, offset + len(taken)) == 0)
                offset += len(taken)
                n -= len(taken)
            if offset == len(ids):
                index, offset = index + 1, 0
                if index == len(self._shard):
                    epoch, index = epoch + 1, 0
        return np.concatenate(tokens), np.concatenate(starts), (epoch, index, offset)

    def __iter__(self) -> PackedBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        windows, starts = [], []
        for _ in range(self.batch_size):
            row, row_starts, self._position = self._read(self._position, self.seq_len)
            last, last_start, _ = self._read(self._position, 1)
            windows.append(np.concatenate([row, last]))
            starts.append(np.concatenate([row_starts, last_start]))
        w, starts = np.stack(windows), np.stack(starts)  # [batch_size, seq_len + 1]
        segment_start = starts[:, :-1].copy()
        segment_start[:, 0] = True
        index = np.arange(self.seq_len)
        first = np.maximum.accumulate(np.where(segment_start, index, 0), axis=1)
        return {"input_ids": w[:, :-1], "targets": w[:, 1:],
                "positions": (index - first).astype(np.int32),
                "segment_ids": np.cumsum(segment_start, axis=1, dtype=np.int32),
                "loss_mask": (~starts[:, 1:]).astype(np.float32)}

    def get_state(self) -> dict[str, int]:
        """The stream position of the next batch, plus what it belongs to (JSON-ready ints)."""
        epoch, index, offset = self._position
        return {"epoch": epoch, "index": index, "offset": offset, **self._key}

    def set_state(self, state: dict[str, int]) -> None:
        """Continues from a `get_state()` of an iterator over the same documents, seed and
        shard (seq_len and batch_size may differ)."""
        expected = {"epoch", "index", "offset", *self._key}
        if set(state) != expected:
            raise ValueError(f"state must have exactly the keys {sorted(expected)}, got "
                             f"{sorted(state)}: pass a dict returned by get_state()")
        mismatched = {k: (state[k], v) for k, v in self._key.items() if state[k] != v}
        if mismatched:
            raise ValueError("state belongs to another data stream: (state, this) differ for "
                             f"{mismatched}; build PackedBatches with the state's settings")
        epoch, index, offset = (int(state[k]) for k in ("epoch", "index", "offset"))
        if epoch < 0 or not 0 <= index < len(self._shard):
            raise ValueError(f"state epoch {epoch} / index {index} out of range: epoch >= 0 and "
                             f"0 <= index < {len(self._shard)} (the shard's documents)")
        length = len(self._tokens(self._document(epoch, index)))
        if not 0 <= offset < length:
            raise ValueError(f"state offset {offset} out of range: the document at index "
                             f"{index} of epoch {epoch} has {length} tokens")
        self._position = (epoch, index, offset)
