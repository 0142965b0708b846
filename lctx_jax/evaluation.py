"""Long-context evaluation: perplexity under two protocols and passkey retrieval.

    docs = tokenize_documents(text_source("pg19", "test", text_key="book_text"), tok,
                              min_tokens=8192, limit=50)
    ppl = sliding_window_nll(model, docs, window=8192, stride=256)   # PI / Press et al.
    ppl = truncate_nll(model, docs, length=8192)                     # YaRN / LongRoPE
    acc = passkey_accuracy(model, tok, lengths=[2048, 4096], depths=[0, .5, 1], trials=10)

Perplexity. A document is a 1-D array of token ids starting with BOS; its targets are tokens
1..n−1, each predicted from the tokens before it inside one window. Every window is run on its
own, with positions counting from 0, right-padded to the call's one width, so an evaluation
call compiles once. The per-batch sums come back in f32 and are added up in float64 on the
host. Rows of a batch share the rotation's sequence length (the longest row's), which matters
only for length-dependent RoPE (dynamic NTK, LongRoPE) in the short last window of a document
under sliding_window_nll: use batch_size=1 there for per-window exactness.

Passkey retrieval (landmark attention, Mohtashami & Jaggi 2023; PI's evaluation): a task line,
neutral filler repeated to the wanted length, a needle sentence stating a 5-digit key twice at
a chosen depth, and a question whose answer prefix makes the key the natural continuation. The
prompts are assembled from token ids, so their length is exact; the model answers greedily.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import math
import re
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import jax
import numpy as np

from lctx_jax import losses, retrieval, token_ids
from lctx_jax.generate import generate
from lctx_jax.model import Model, ModelSpec

if TYPE_CHECKING:  # metrics never import the data pipeline (TFDS)
    from lctx_jax.data import Tokenizer

__all__ = ["Perplexity", "sliding_window_nll", "truncate_nll", "tokenize_documents",
           "PasskeyPrompt", "passkey_prompt", "passkey_accuracy"]

# ----------------------------------------------------------------------------- perplexity


@dataclasses.dataclass(frozen=True)
class Perplexity:
    """Summed NLL (nats) over `tokens` scored targets of `documents` documents; `skipped`
    documents were left out (too short for the protocol)."""

    nll_sum: float
    tokens: int
    documents: int
    skipped: int

    @property
    def loss(self) -> float:
        """Mean NLL per scored token."""
        return self.nll_sum / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    def as_dict(self) -> dict[str, float | int]:
        """The fields plus loss and perplexity, for a results file."""
        return {"perplexity": self.perplexity, "loss": self.loss,
                **dataclasses.asdict(self)}


def sliding_window_nll(model: Model, documents: Sequence[np.ndarray], window: int,
                       stride: int = 256, batch_size: int = 1) -> Perplexity:
    """Sliding-window perplexity (Press et al. 2021, as PI, Chen et al. 2023, evaluates).

    A window feeds the model up to `window` tokens, each predicting the token after it (as a
    training row does). Per document of n tokens, window k feeds tokens [k·stride,
    min(k·stride + window, n − 1)) and scores only the targets no earlier window scored; the
    windows stop at the first that predicts token n − 1. So every target is scored exactly
    once, with up to `window` tokens of context; stride = window gives disjoint windows.
    Documents with fewer than 2 tokens have no target and count as skipped. Windows of several
    documents share a batch of `batch_size` rows.
    """
    _check_int("window", window, 1, "")
    _check_int("batch_size", batch_size, 1, "")
    if not isinstance(stride, (int, np.integer)) or not 1 <= stride <= window:
        raise ValueError(f"stride must be an int in [1, window={window}], got {stride!r}: a "
                         "stride above the window would leave tokens unscored")
    documents = _as_documents(documents, model.config.vocab_size)
    scored = [d for d in documents if len(d) >= 2]
    if not scored:
        raise ValueError("every document has fewer than 2 tokens: there is no target to score")

    def windows() -> Iterable[tuple[np.ndarray, int, int]]:
        for doc in scored:
            last, begin, done = len(doc) - 1, 0, 0  # inputs [0, done) are already scored
            while done < last:
                end = min(begin + window, last)
                yield doc[begin:end + 1], end - begin, done - begin
                begin, done = begin + stride, end

    width = min(window, max(len(d) for d in scored) - 1)
    nll_sum, tokens = _score_windows(model, windows(), width, batch_size)
    return Perplexity(nll_sum, tokens, len(scored), len(documents) - len(scored))


def truncate_nll(model: Model, documents: Sequence[np.ndarray], length: int,
                 batch_size: int = 1) -> Perplexity:
    """Truncated-document perplexity (YaRN, Peng et al. 2023; LongRoPE, Ding et al. 2024):
    each document of at least `length` tokens is cut to its first `length`, fed whole, and all
    its length − 1 targets are scored; shorter documents are skipped."""
    _check_int("length", length, 2, "a window needs an input token and a target")
    _check_int("batch_size", batch_size, 1, "")
    documents = _as_documents(documents, model.config.vocab_size)
    kept = [d[:length] for d in documents if len(d) >= length]
    if not kept:
        longest = max(len(d) for d in documents)
        raise ValueError(f"no document has length={length} tokens (the longest has {longest}):"
                         " lower length or evaluate on longer documents")
    windows = ((d, length, 0) for d in kept)
    nll_sum, tokens = _score_windows(model, windows, length, batch_size)
    return Perplexity(nll_sum, tokens, len(kept), len(documents) - len(kept))


def tokenize_documents(texts: Iterable[str], tokenizer: Tokenizer, min_tokens: int = 0,
                       limit: int | None = None) -> list[np.ndarray]:
    """[bos] + encode(text) as int32 arrays, keeping those of at least min_tokens tokens (BOS
    included), the first `limit` of them (all when None)."""
    _check_int("min_tokens", min_tokens, 0, "")
    if limit is not None:
        _check_int("limit", limit, 1, "use None for no limit")
    out: list[np.ndarray] = []
    for text in texts:
        if limit is not None and len(out) == limit:
            break
        ids = np.asarray([tokenizer.bos_id, *tokenizer.encode(text)], np.int32)
        if len(ids) >= min_tokens:
            out.append(ids)
    return out


def _check_int(name: str, value: Any, least: int, why: str) -> None:
    if not isinstance(value, (int, np.integer)) or value < least:
        raise ValueError(f"{name} must be an int >= {least}, got {value!r}"
                         + (f" ({why})" if why else ""))


def _as_documents(documents: Sequence[np.ndarray], vocab_size: int) -> list[np.ndarray]:
    """Each document as a 1-D int32 array of ids in the vocabulary (`token_ids.check`)."""
    if not len(documents):
        raise ValueError("documents is empty: pass token-id arrays, e.g. from "
                         "tokenize_documents(texts, tokenizer)")
    return [np.asarray(token_ids.check(d, vocab_size, f"documents[{i}]", ndim=1,
                                       allow_empty=True))
            for i, d in enumerate(documents)]


def window_nll(model: Model | ModelSpec, params: Any, ids: jax.Array, positions: jax.Array,
               segments: jax.Array, score: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(summed NLL, scored targets) of one batch of windows, f32 scalars: ids int32 [B, W + 1],
    input i predicting ids[:, i + 1]; positions, segments int32 [B, W]; score f32 [B, W]. What
    `_score_windows` jits (and `lctx_jax.aot` compiles for a TPU slice); on the model's mesh
    the tokens are split over "sequence" (`lctx_jax.sharding`)."""
    hidden = model.hidden(params, ids[:, :-1], positions, segments)
    return losses.nll_sum(hidden, model.head(params), ids[:, 1:], score, model.dtype)


def _score_windows(model: Model, windows: Iterable[tuple[np.ndarray, int, int]], width: int,
                   batch_size: int) -> tuple[float, int]:
    """(summed NLL, scored targets) over windows (tokens, fed, first): the model is fed
    tokens[:fed] at positions 0.. and input i predicts tokens[i + 1]; inputs first..len − 2 are
    scored. Windows are packed into rows of `width` inputs, right-padded; padding is a
    segment of its own at position 0, so it is invisible to real tokens and leaves the
    rotation's sequence length (max position + 1, for dynamic NTK / LongRoPE) at the longest
    row's; unused rows are all padding."""

    batch_nll = jax.jit(functools.partial(window_nll, model))

    def empty() -> tuple[np.ndarray, ...]:  # fresh arrays: jax may alias a host array
        return (np.zeros((batch_size, width + 1), np.int32),
                *(np.zeros((batch_size, width), dtype) for dtype in (np.int32, np.int32,
                                                                     np.float32)))

    nll, count, in_flight = 0.0, 0, collections.deque()

    def collect(keep: int) -> None:
        """Adds up finished batches until `keep` are left in flight."""
        nonlocal nll, count
        while len(in_flight) > keep:
            batch_sum, batch_count = in_flight.popleft()
            nll += float(batch_sum)  # float64 on the host
            count += round(float(batch_count))

    ids, positions, segments, score = empty()
    row = 0
    for tokens, fed, first in windows:
        ids[row, :len(tokens)] = tokens
        positions[row, :fed] = np.arange(fed)
        segments[row, :fed] = 1
        score[row, first:len(tokens) - 1] = 1.0
        row += 1
        if row == batch_size:
            in_flight.append(batch_nll(model.params, ids, positions, segments, score))
            collect(keep=2)  # the host prepares batches at most two ahead of the device
            (ids, positions, segments, score), row = empty(), 0
    if row:
        in_flight.append(batch_nll(model.params, ids, positions, segments, score))
    collect(keep=0)
    return nll, count


# ----------------------------------------------------------------------------- passkey


@dataclasses.dataclass(frozen=True)
class _Style:
    """Prompt texts; `needle` has a {key} field. prose pieces are sentences separated by a
    space; python pieces are lines ending in a newline."""

    task: str
    filler: tuple[str, ...]
    needle: str
    question: str
    prose: bool


PASSKEY_STYLES = {
    "prose": _Style(
        task="A pass key is hidden somewhere in the long text that follows. Find it and keep "
             "it in mind: you will be asked for it at the end.",
        filler=("The kettle sits on the stove.", "A bus stops at the corner.",
                "The library opens after breakfast.", "Clouds drift over the hills.",
                "A cat sleeps by the window.", "The bakery sells fresh bread."),
        needle="Here is the pass key: {key}. Keep the pass key {key} in mind.",
        question="What number is the pass key? Answer: the pass key is",
        prose=True),
    "python": _Style(  # the single-needle case of lctx_jax.retrieval's documents
        task=retrieval.task_line([retrieval.PASS_KEY]),
        filler=("count = count + step\n",
                "def double(value):\n    return value + value\n",
                "label = name.upper()\n",
                "items.append(label)\n",
                "def is_empty(values):\n    return not values\n"),
        needle=retrieval.NEEDLE.format(name=retrieval.PASS_KEY, value="{key}"),
        question=retrieval.question(retrieval.PASS_KEY),
        prose=False),
}
_ANSWER_TOKENS = 8  # generated per prompt: the key's digits (and a space) fit with room to spare


@dataclasses.dataclass(frozen=True)
class PasskeyPrompt:
    """ids int32 [length]: the prompt, BOS first; answer: the key as text; key_start: the
    index of the needle's first token."""

    ids: np.ndarray
    answer: str
    key_start: int


def passkey_prompt(tokenizer: Tokenizer, length: int, depth: float, key: int,
                   style: str = "prose") -> PasskeyPrompt:
    """A passkey-retrieval prompt of exactly `length` tokens:
    [bos] + task + filler + needle + filler + question.

    The filler (the style's sentences, repeated) takes every token the rest leaves, the last
    sentence cut at a token boundary. The needle goes at the sentence boundary nearest to
    depth · (filler tokens), so depth 0 puts it right after the task and depth 1 right before
    the question. Styles: "prose" (for natural-language models) and "python" (a constant in
    Python source, for models trained on code, with a tokenizer that adds no dummy-prefix space,
    as `lctx_jax.data.train_tokenizer`'s; LLaMA's would indent every line by one space).
    """
    if style not in PASSKEY_STYLES:
        raise ValueError(f"style must be one of {list(PASSKEY_STYLES)}, got {style!r}")
    if not 0 <= depth <= 1:
        raise ValueError(f"depth must be in [0, 1] (0: needle first, 1: last), got {depth!r}")
    if not isinstance(key, (int, np.integer)) or not 10_000 <= key <= 99_999:
        raise ValueError(f"key must be a 5-digit int in [10000, 99999], got {key!r}")
    s = PASSKEY_STYLES[style]
    encode = _piece_encoder(tokenizer, s.prose)
    task = [tokenizer.bos_id, *tokenizer.encode(s.task)]
    needle = encode(s.needle.format(key=key))
    question = encode(s.question)
    fixed = len(task) + len(needle) + len(question)
    _check_int("length", length, fixed,
               f"the task, needle and question of style {style!r} take {fixed} tokens")
    before, after = _filler([encode(text) for text in s.filler], length - fixed, depth)
    ids = np.asarray([*task, *before, *needle, *after, *question], np.int32)
    return PasskeyPrompt(ids, str(key), len(task) + len(before))


def _piece_encoder(tokenizer: Tokenizer, prose: bool) -> Callable[[str], list[int]]:
    """encode for a piece that follows other pieces: prose pieces get a leading space unless
    the tokenizer adds one itself (sentencepiece's dummy prefix, as LLaMA's does)."""
    adds_space = tokenizer.decode([*tokenizer.encode("a"), *tokenizer.encode("b")]) != "ab"
    lead = " " if prose and not adds_space else ""
    return lambda text: tokenizer.encode(lead + text)


def _filler(sentences: list[list[int]], count: int, depth: float
            ) -> tuple[list[int], list[int]]:
    """`count` tokens of the sentences repeated, split at the sentence boundary (or the end)
    nearest to depth · count -> (before, after)."""
    stream: list[int] = []
    boundaries = [0]
    for sentence in itertools.cycle(sentences):
        if len(stream) >= count:
            break
        stream += sentence
        boundaries.append(len(stream))
    candidates = [b for b in boundaries if b <= count] + [count]
    split = min(candidates, key=lambda b: abs(b - depth * count))
    return stream[:split], stream[split:count]


def passkey_accuracy(model: Model, tokenizer: Tokenizer, lengths: Sequence[int],
                     depths: Sequence[float], trials: int, seed: int = 0, style: str = "prose",
                     batch_size: int = 1) -> dict[str, Any]:
    """Greedy passkey retrieval accuracy per (length, depth) over `trials` random keys.

    Keys of a cell come from np.random.default_rng([seed, length, round(depth · 1000)]), so a
    cell's prompts do not depend on the other cells. A trial is correct when the first five
    consecutive digits of the generated text (spaces removed) are the key. Prompts of a length
    run in batches of batch_size (the last one padded), one compile per length.

    Returns {"lengths": [...], "depths": [...], "accuracy": [[per depth] per length] in [0, 1],
    "trials": trials, "style": style, "examples": [one per length: {"length", "depth",
    "prompt_tail", "expected", "got"}, a failed trial when there is one]}.
    """
    def prompts(length: int, depth: float, rng: np.random.Generator) -> list[PasskeyPrompt]:
        keys = rng.integers(10_000, 100_000, trials)
        return [passkey_prompt(tokenizer, length, depth, int(k), style) for k in keys]

    out = _accuracy_grid(model, tokenizer, lengths, depths, trials, seed, batch_size, prompts)
    return {**out, "style": style}


def needle_accuracy(model: Model, tokenizer: Tokenizer, haystack: Sequence[str],
                    lengths: Sequence[int], depths: Sequence[float], trials: int,
                    needles: int = 4, seed: int = 0, batch_size: int = 1) -> dict[str, Any]:
    """Multi-key needle-in-a-haystack accuracy (RULER's MK-NIAH) per (length, depth): each
    prompt (`lctx_jax.retrieval.needle_prompt`) hides `needles` constants in lines of the
    `haystack` documents and asks for the one at `depth`; scored as `passkey_accuracy`
    (greedy, the first five digits), with the same seeding per cell.

    Returns passkey_accuracy's dict with "needles" instead of "style"."""
    _check_int("needles", needles, 1, "")
    lines = retrieval.haystack_lines(tokenizer, haystack)
    if not lines:
        raise ValueError("haystack has no documents to take lines from")

    def prompts(length: int, depth: float, rng: np.random.Generator
                ) -> list[retrieval.NeedlePrompt]:
        return [retrieval.needle_prompt(tokenizer, lines, length, depth, needles, rng)
                for _ in range(trials)]

    out = _accuracy_grid(model, tokenizer, lengths, depths, trials, seed, batch_size, prompts)
    return {**out, "needles": needles}


def _accuracy_grid(model: Model, tokenizer: Tokenizer, lengths: Sequence[int],
                   depths: Sequence[float], trials: int, seed: int, batch_size: int,
                   prompts_of: Callable[[int, float, np.random.Generator], list]
                   ) -> dict[str, Any]:
    """Greedy exact-key accuracy of prompts_of(length, depth, rng) (objects with .ids and
    .answer) per cell, rng = default_rng([seed, length, round(depth · 1000)])."""
    _check_int("trials", trials, 1, "")
    _check_int("batch_size", batch_size, 1, "")
    lengths, depths = [int(n) for n in lengths], [float(d) for d in depths]
    if not lengths or not depths:
        raise ValueError(f"lengths and depths must be non-empty, got {lengths} and {depths}")
    accuracy, examples = [], []
    for length in lengths:
        row, example, example_failed = [], None, False
        for depth in depths:
            cell = prompts_of(length, depth,
                              np.random.default_rng([seed, length, round(depth * 1000)]))
            answers = _greedy_answers(model, np.stack([p.ids for p in cell]), batch_size)
            texts = [tokenizer.decode(a) for a in answers]
            correct = [_first_key(t) == p.answer for t, p in zip(texts, cell)]
            row.append(float(np.mean(correct)))
            if example is None or (not example_failed and not all(correct)):
                shown = correct.index(False) if not all(correct) else 0
                example_failed = not correct[shown]
                example = {"length": length, "depth": depth,
                           "prompt_tail": tokenizer.decode(cell[shown].ids[-24:]),
                           "expected": cell[shown].answer, "got": texts[shown]}
        accuracy.append(row)
        examples.append(example)
    return {"lengths": lengths, "depths": depths, "accuracy": accuracy, "trials": trials,
            "examples": examples}


class PasskeyBatches:
    """Endless iterator of passkey-retrieval training batches (the Infini-attention paper's
    fine-tune on passkey inputs): rows of exactly seq_len + 1 tokens, `passkey_prompt` of a
    random 5-digit key at a random depth followed by the key as its answer (and, after a
    shorter prompt, end-of-sequence tokens as another document). Each batch: input_ids,
    targets, positions, segment_ids int32 and loss_mask float32 [batch_size, seq_len] (as
    `lctx_jax.data.PackedBatches`), the loss on the answer's tokens only.

    shortest: 0 makes every prompt as long as the row allows; else prompt lengths are drawn
    uniformly from [shortest, that], so the answer falls anywhere relative to a segmented
    model's segment boundaries (a prompt of k·N tokens has its answer start a new segment).
    Row r of batch i draws from np.random.default_rng([seed, shard_index, stream, i, r]) with
    stream 1 for evaluation (`evaluation=True`) and 0 for training, so a resumed stream
    (`set_state`) continues exactly and evaluation never sees a training row.
    style: as `passkey_prompt`'s.
    """

    def __init__(self, tokenizer: Tokenizer, seq_len: int, batch_size: int, seed: int,
                 shard_index: int = 0, style: str = "prose", shortest: int = 0,
                 evaluation: bool = False):
        if style not in PASSKEY_STYLES:
            raise ValueError(f"style must be one of {list(PASSKEY_STYLES)}, got {style!r}")
        _check_int("shortest", shortest, 0, "")
        if shortest > seq_len:
            raise ValueError(f"shortest={shortest} prompt tokens do not fit in seq_len={seq_len}")
        self._tokenizer, self.seq_len, self.batch_size, self.style = (tokenizer, seq_len,
                                                                     batch_size, style)
        self.shortest = shortest
        self._encode = _piece_encoder(tokenizer, PASSKEY_STYLES[style].prose)
        self._key = {"seed": int(seed), "shard_index": int(shard_index),
                     "stream": int(evaluation)}
        self._batch = 0
        self._row(0, 0)  # a seq_len too short for the prompt fails here, not mid-training
        if shortest:  # and so does a shortest prompt that cannot hold the task
            passkey_prompt(tokenizer, shortest, 0.5, 10_000, style)

    def _row(self, batch: int, row: int) -> tuple[np.ndarray, int, int]:
        """(the row's seq_len + 1 tokens, where its answer starts, how long the answer is)."""
        rng = np.random.default_rng([*self._key.values(), batch, row])
        key = int(rng.integers(10_000, 100_000))
        answer = self._encode(("" if PASSKEY_STYLES[self.style].prose else " ") + str(key))
        longest = self.seq_len + 1 - len(answer)
        length = int(rng.integers(min(self.shortest, longest), longest + 1)) if (
            self.shortest) else longest
        prompt = passkey_prompt(self._tokenizer, length, float(rng.uniform()), key, self.style)
        tail = [self._tokenizer.eos_id] * (longest - length)
        return np.asarray([*prompt.ids, *answer, *tail], np.int32), length, len(answer)

    def __iter__(self) -> "PasskeyBatches":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows, starts, answers = zip(*(self._row(self._batch, r)
                                      for r in range(self.batch_size)))
        self._batch += 1
        w = np.stack(rows)  # [batch_size, seq_len + 1]
        index = np.arange(self.seq_len)[None, :]
        start, end = np.asarray(starts)[:, None], np.asarray(starts)[:, None] + np.asarray(
            answers)[:, None]
        prompt = index < end  # the prompt and its answer; the eos tail is another document
        return {"input_ids": w[:, :-1], "targets": w[:, 1:],
                "positions": np.where(prompt, index, index - end).astype(np.int32),
                "segment_ids": np.where(prompt, 1, 2).astype(np.int32),
                "loss_mask": ((index >= start - 1) & (index < end - 1)).astype(np.float32)}

    def get_state(self) -> dict[str, int]:
        return {"batch": self._batch, **self._key}

    def set_state(self, state: dict[str, int]) -> None:
        if set(state) != {"batch", *self._key} or any(state[k] != v
                                                      for k, v in self._key.items()):
            raise ValueError(f"state {state} is not a passkey stream of {self._key}: pass a "
                             "dict returned by get_state() of the same seed, shard and stream")
        self._batch = int(state["batch"])


def _greedy_answers(model: Model, prompts: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """The generated ids [_ANSWER_TOKENS] of each prompt row (rows of equal length)."""
    batch = min(batch_size, len(prompts))
    out = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        padded = np.concatenate([chunk, np.repeat(chunk[:1], batch - len(chunk), axis=0)])
        tokens = np.asarray(generate(model, padded, max_new_tokens=_ANSWER_TOKENS,
                                     eos_token_id=()))
        out.extend(tokens[:len(chunk), prompts.shape[1]:])
    return out


def _first_key(text: str) -> str:
    """The first five consecutive digits of text with spaces removed ('' if none)."""
    match = re.search(r"\d{5}", text.replace(" ", ""))
    return match.group() if match else ""
