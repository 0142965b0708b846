"""Synthetic key-value retrieval in the corpus's own style: needle rows mixed into training
batches, and the multi-needle needle-in-a-haystack prompts of the evaluation (RULER's
multi-key NIAH: several keys in the haystack, one asked for).

A needle is a Python constant, `NAME = 48213  # remember this value: 48213`, the haystack is
lines of the corpus's own documents, and a question is `# NAME, as set above:` and `NAME =`,
answered by " 48213". With one needle named PASS_KEY the task line, needle and question are those of
`lctx_jax.evaluation`'s "python" passkey style, so a model that learned these documents
meets the passkey prompt in a form it knows (there the filler is repeated lines instead).

    rows = NeedleRows(documents, tokenizer, seq_len=256, seed=0)
    ids, weights = rows.row(batch, r)   # [seq_len + 1] ids, every value asked; loss weights
    prompt = needle_prompt(tokenizer, haystack_lines(tokenizer, docs), 1024, 0.5, 4, rng)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import numpy as np

WORDS = ("ALPHA", "AMBER", "BIRCH", "CEDAR", "COBALT", "CORAL", "DELTA", "EMBER", "FALCON",
         "GARNET", "HARBOR", "IVORY", "JADE", "LUNAR", "MAPLE", "NORTH", "ONYX", "PEARL",
         "QUARTZ", "RAVEN", "SILVER", "TIGER", "VIOLET", "WILLOW")
KINDS = ("KEY", "CODE", "PORT", "LIMIT", "SEED")
NAMES = tuple(f"{w}_{k}" for w in WORDS for k in KINDS)  # 120 constant names
PASS_KEY = "PASS_KEY"
_TRAINING_STREAM = 1  # training rows draw from [seed, 1, ...]: never an evaluation cell's stream


def task_line(names: Sequence[str]) -> str:
    """The first line: which constants to remember (the passkey style's line for PASS_KEY)."""
    if len(names) == 1:
        return f"# Somewhere below, {names[0]} is set to a five-digit number. Remember it.\n"
    listed = ", ".join(names[:-1]) + " and " + names[-1]
    return f"# Somewhere below, {listed} are set to five-digit numbers. Remember them.\n"


NEEDLE = "{name} = {value}  # remember this value: {value}\n"


def needle_line(name: str, value: int) -> str:
    return NEEDLE.format(name=name, value=value)


def question(name: str) -> str:
    """The question; its answer is f" {value}". It ends as the needle begins ("NAME ="), so
    the answer is a copy of what followed that prefix, as in the classic passkey prompt ("...
    The pass key is" after "The pass key is 12345")."""
    return f"\n# {name}, as set above:\n{name} ="


def _draw_needles(rng: np.random.Generator, count: int) -> tuple[list[str], list[int]]:
    """`count` distinct names (PASS_KEY among them half the time) and 5-digit values."""
    names = [str(n) for n in rng.choice(NAMES, count, replace=False)]
    if rng.uniform() < 0.5:
        names[int(rng.integers(count))] = PASS_KEY
    return names, [int(v) for v in rng.integers(10_000, 100_000, count)]


def _haystack(lines: Callable[[int], list[int]], count: int, inserts: Sequence[list[int]],
              depths: Sequence[float], rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """`count` tokens of haystack lines (lines(i) for i from a random start on, the last one cut
    at a token boundary) with each insert put between two whole lines, at the boundary nearest
    depth·count -> (ids, where each insert starts)."""
    stream: list[int] = []
    boundaries = [0]
    line = int(rng.integers(1 << 30))
    while len(stream) < count:
        stream += lines(line)
        if len(stream) <= count:
            boundaries.append(len(stream))
        line += 1
    stream = stream[:count]
    cuts = [min(boundaries, key=lambda b: abs(b - d * count)) for d in depths]
    out: list[int] = []
    starts = [0] * len(inserts)
    start = 0
    for cut, j in sorted(zip(cuts, range(len(inserts)))):
        out += stream[start:cut]
        starts[j] = len(out)
        out += inserts[j]
        start = cut
    return out + stream[start:], starts


class NeedleRows:
    """Training rows of needle documents: row(batch, r) is seq_len + 1 tokens, [bos] the task
    line, lines of a random `documents` entry (from a random line on; in half the rows 2 to 8
    of its lines repeated, as the passkey prompt repeats its filler: the repeats, copies from
    a period back, are how a small model learns to copy at all) holding 1 to max_needles
    needles at random depths, then every needle's question and answer (random order, one per
    line), drawn from np.random.default_rng([seed, 1, batch, r]). Trained with the loss on
    every token, as text: only the answers need retrieval, and their tokens weigh
    `answer_weight` (a handful of tokens among the row's hundreds: left at weight 1, a small
    model does not learn to copy them within a demo's budget). `lctx_jax.training` mixes a
    share of such rows into each batch: the stage's `retrieval`."""

    def __init__(self, documents: Sequence[str], tokenizer: object, seq_len: int, seed: int,
                 max_needles: int = 4, answer_weight: float = 1.0):
        if not 1 <= max_needles <= len(NAMES):
            raise ValueError(f"max_needles must be in [1, {len(NAMES)}], got {max_needles!r}")
        if not answer_weight > 0:
            raise ValueError(f"answer_weight must be > 0, got {answer_weight!r}")
        self._documents, self._tokenizer = documents, tokenizer
        self.seq_len, self.seed, self.max_needles = seq_len, int(seed), int(max_needles)
        self.answer_weight = float(answer_weight)
        self._lines = functools.lru_cache(maxsize=16)(self._document_lines)
        encode = tokenizer.encode
        costliest = sorted((*NAMES, PASS_KEY), key=lambda n: -len(encode(
            needle_line(n, 99_999) + question(n) + " 99999\n")))[:self.max_needles]
        if self._free_tokens(costliest, [99_999] * self.max_needles) < 0:
            raise ValueError(f"seq_len {seq_len} cannot hold {self.max_needles} needles and their "
                             "questions: lower max_needles or raise seq_len")

    def _free_tokens(self, names: Sequence[str], values: Sequence[int]) -> int:
        """The row's tokens left for the haystack after the task line, needles and answers."""
        encode = self._tokenizer.encode
        used = 1 + len(encode(task_line(sorted(names)))) + sum(
            len(encode(needle_line(n, v))) + len(encode(question(n) + f" {v}\n"))
            for n, v in zip(names, values))
        return self.seq_len + 1 - used

    def _document_lines(self, index: int) -> list[list[int]]:
        lines = self._documents[index].split("\n")
        return [self._tokenizer.encode(line + "\n") for line in lines]

    def row(self, batch: int, r: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids int32 [seq_len + 1], the loss weight of each target ids[1:], float32
        [seq_len]: answer_weight on the answers' tokens and on the value each needle restates
        ("# remember this value: V"), 1 elsewhere)."""
        rng = np.random.default_rng([self.seed, _TRAINING_STREAM, batch, r])
        names, values = _draw_needles(rng, int(rng.integers(1, self.max_needles + 1)))
        encode = self._tokenizer.encode
        head = [self._tokenizer.bos_id, *encode(task_line(sorted(names)))]
        needles = [encode(needle_line(n, v)) for n, v in zip(names, values)]
        tail, answer = [], []  # question and answer encoded apart, as a prompt and its reply
        for j in rng.permutation(len(names)):
            asked, reply = encode(question(names[j])), encode(f" {values[j]}\n")
            tail += asked + reply
            answer += [False] * len(asked) + [True] * len(reply)
        count = self.seq_len + 1 - len(head) - sum(map(len, needles)) - len(tail)
        if count < 0:  # (a tokenizer for which some value costs more than 99999 does)
            raise ValueError(f"seq_len {self.seq_len} cannot hold needles {names}: lower "
                             "max_needles or raise seq_len")
        lines = self._lines(int(rng.integers(len(self._documents))))
        base, period = int(rng.integers(len(lines))), len(lines)
        if rng.uniform() < 0.5:  # half the rows repeat a few lines, as the passkey's filler
            period = int(rng.integers(2, 9))
        body, starts = _haystack(lambda i: lines[(base + i % period) % len(lines)], count,
                                 needles, rng.uniform(size=len(names)), rng)
        ids = np.asarray([*head, *body, *tail], np.int32)
        weights = np.ones(self.seq_len, np.float32)
        weights[len(ids) - 1 - len(tail):][np.asarray(answer)] = self.answer_weight
        for start, needle, value in zip(starts, needles, values):  # "... this value: V\n"
            end = len(head) + start + len(needle) - 1  # the newline after the restated V
            restated = len(encode(f" {value}\n")) - 1
            weights[end - restated - 1:end - 1] = self.answer_weight
        return ids, weights


class MixedBatches:
    """Batches of `text` (an iterator of packed batches, e.g. `lctx_jax.data.PackedBatches`,
    of batch_size − count rows) with `count` rows of `needles` spread evenly among them: the
    same keys, shapes [batch_size, seq_len], needle rows one document each (positions from 0,
    segment 1, loss on every token, weighted as `NeedleRows.row` says). A share count /
    batch_size of the tokens is synthetic.
    get_state / set_state carry the text stream's position and the needle batch counter."""

    def __init__(self, text: object, needles: NeedleRows, count: int):
        self._text, self._needles, self.count = text, needles, int(count)
        self.batch_size = text.batch_size + self.count
        spacing = self.batch_size / self.count
        self._needle_at = [int((j + 1) * spacing) - 1 for j in range(self.count)]
        self._batch = 0

    def __iter__(self) -> "MixedBatches":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        text = next(self._text)
        rows, weights = map(np.stack, zip(*(self._needles.row(self._batch, r)
                                            for r in range(self.count))))
        self._batch += 1
        shape = (self.count, self._needles.seq_len)
        needle = {"input_ids": rows[:, :-1], "targets": rows[:, 1:],
                  "positions": np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape),
                  "segment_ids": np.ones(shape, np.int32),
                  "loss_mask": weights}
        is_needle = np.zeros(self.batch_size, bool)
        is_needle[self._needle_at] = True
        out = {}
        for key, value in text.items():
            merged = np.empty((self.batch_size, *value.shape[1:]), value.dtype)
            merged[~is_needle], merged[is_needle] = value, needle[key]
            out[key] = merged
        return out

    def get_state(self) -> dict[str, int]:
        return {**self._text.get_state(), "needle_batch": self._batch,
                "needle_seed": self._needles.seed}

    def set_state(self, state: dict[str, int]) -> None:
        state = dict(state)
        batch, seed = state.pop("needle_batch", None), state.pop("needle_seed", None)
        if batch is None or seed != self._needles.seed:
            raise ValueError(f"state {state} holds no needle stream of seed "
                             f"{self._needles.seed}: pass a dict returned by get_state() of a "
                             "mixed stream with the same seed")
        self._text.set_state(state)
        self._batch = int(batch)


@dataclasses.dataclass(frozen=True)
class NeedlePrompt:
    """ids int32 [length]: the prompt, BOS first; answer: the asked value as text; names:
    the needles' names (the asked one first); key_start: the asked needle's first token."""

    ids: np.ndarray
    answer: str
    names: tuple[str, ...]
    key_start: int


def haystack_lines(tokenizer: object, documents: Sequence[str]) -> list[list[int]]:
    """The token ids of every line of `documents` (each with its newline), in order."""
    return [tokenizer.encode(line + "\n") for doc in documents for line in doc.split("\n")]


def needle_prompt(tokenizer: object, haystack: Sequence[list[int]], length: int, depth: float,
                  needles: int, rng: np.random.Generator) -> NeedlePrompt:
    """A prompt of exactly `length` tokens: [bos] task line, haystack lines (from a random
    line on, the last one cut at a token boundary) with `needles` needles between lines, the
    asked one at the line boundary nearest depth·(haystack tokens) and the others at random
    depths, then the question for the asked one."""
    if not 0 <= depth <= 1:
        raise ValueError(f"depth must be in [0, 1] (0: first, 1: last), got {depth!r}")
    names, values = _draw_needles(rng, needles)
    head = [tokenizer.bos_id, *tokenizer.encode(task_line(sorted(names)))]
    inserts = [tokenizer.encode(needle_line(n, v)) for n, v in zip(names, values)]
    tail = tokenizer.encode(question(names[0]))
    count = length - len(head) - sum(map(len, inserts)) - len(tail)
    if count < 0:
        raise ValueError(f"length {length} cannot hold the task line, {needles} needles and "
                         f"the question ({length - count} tokens)")
    body, starts = _haystack(lambda i: haystack[i % len(haystack)], count, inserts,
                             [depth, *rng.uniform(size=needles - 1)], rng)
    ids = np.asarray([*head, *body, *tail], np.int32)
    return NeedlePrompt(ids, str(values[0]), tuple(names), len(head) + starts[0])
