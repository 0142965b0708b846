"""LongRoPE's evolutionary search for per-dimension RoPE rescale factors (Ding et al. 2024).

A genome is λ [rotary_dim/2], the factor each rotary frequency is divided by (θ_j / λ_j),
monotone non-decreasing in j, each λ_j in [1, max_ratio·s] on a grid of `step`
(s = target_length / L, L the original context), plus n̂ kept start tokens (positions < n̂ keep
the original rotation) from `N_HAT`. Lower fitness is better: perplexity at the target length.

  seeds        PI (λ = s), NTK-aware (λ_j = s^(2j/(d−2))), YaRN (θ_j / yarn inv_freq_j),
               snapped to the grid; the rest of the first population mutates them
  iteration    evaluate the new candidates, keep the `parents` best, add `mutations` mutants
               and `crossovers` children of them: the next population
  mutation     each gene, with probability p, redrawn between its neighbours (stays monotone)
  crossover    from the better of two parents, each gene taken from the other with probability
               p; kept if monotone; after max_tries, a mutation of the better parent instead

`perplexity_fitness` scores candidates with one compiled forward: the rotation enters as
traced `lctx_jax.rope.RopeArrays`, so no candidate recompiles. `rope_scaling` turns a result
into the Hugging Face "longrope" dict that `RopeConfig.from_hf` and `lctx_jax.from_hf` read.

Short factors (LongRoPE's re-search at the original length): the same `search` at
target_length = L (s = 1, so λ in [1, max_ratio]) with a fitness at length L. transformers
applies the long model's attention factor at every length, so score short candidates with it
(`perplexity_fitness(model, docs, L, factor=s_long)`), and fix n̂ to the long result's
(`SearchConfig(start_tokens=(n̂,))`): one n̂ serves both. Then
`rope_scaling(rope, long_length, long.factors, long.start_tokens, short_factor=short.factors)`.

A search with `state_path` saves its whole state after every iteration and a rerun continues
from there, to the same result as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from lctx_jax import losses, paths, rope as rope_lib
from lctx_jax.rope import RopeConfig

N_HAT = (0, 1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 64, 128, 256)  # kept start token choices

Genome = tuple[tuple[int, ...], int]  # (grid ints k_j with λ_j = k_j · step, n̂)
Fitness = Callable[[np.ndarray, int], float]  # (λ f32 [rotary_dim/2], n̂) -> lower is better


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """The search's settings; defaults are the paper's (64 = 32 parents + 16 + 16 children)."""

    population: int = 64
    parents: int = 32  # the best kept each iteration
    mutations: int = 16
    crossovers: int = 16
    iterations: int = 40  # evaluation rounds, the first on the seeded population
    p: float = 0.3  # per-gene mutation / crossover probability
    step: float = 0.01  # grid of λ; 1/step must be an integer
    max_ratio: float = 1.25  # λ ≤ max_ratio · s
    max_tries: int = 20  # draws until a new candidate, per mutation or crossover
    start_tokens: tuple[int, ...] = N_HAT  # n̂ choices (those below target_length are used)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("population", "parents", "iterations", "max_tries"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"SearchConfig.{name} must be a positive int, got "
                                 f"{getattr(self, name)!r}")
        for name in ("mutations", "crossovers"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"SearchConfig.{name} must be an int >= 0, got "
                                 f"{getattr(self, name)!r}")
        if self.parents + self.mutations + self.crossovers != self.population:
            raise ValueError(
                f"SearchConfig.population ({self.population}) must equal parents + mutations + "
                f"crossovers ({self.parents} + {self.mutations} + {self.crossovers}): each "
                "iteration keeps the parents and adds the children")
        if self.crossovers and self.parents < 2:
            raise ValueError("SearchConfig.crossovers needs parents >= 2")
        if not 0 < self.p <= 1:
            raise ValueError(f"SearchConfig.p must be in (0, 1], got {self.p}")
        if not self.step > 0 or abs(1 / self.step - round(1 / self.step)) > 1e-6:
            raise ValueError(f"SearchConfig.step must be 1/n for an integer n (e.g. 0.01), got "
                             f"{self.step}")
        if not self.max_ratio >= 1:
            raise ValueError(f"SearchConfig.max_ratio must be >= 1, got {self.max_ratio}")
        if not self.start_tokens or any(not isinstance(n, int) or n < 0
                                        for n in self.start_tokens):
            raise ValueError(f"SearchConfig.start_tokens must be a non-empty tuple of ints >= 0, "
                             f"got {self.start_tokens!r}")


def original_length(rope: RopeConfig) -> int:
    """L: rope's original_max_position_embeddings, else its max_position_embeddings."""
    return rope.original_max_position_embeddings or rope.max_position_embeddings


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """The genomes: λ_j = k_j / per_unit with lo ≤ k_0 ≤ … ≤ k_{half−1} ≤ hi, n̂ in starts."""

    half: int
    per_unit: int  # 1 / step
    lo: int  # λ = 1
    hi: int  # λ = max_ratio · s, rounded down to the grid
    starts: tuple[int, ...]

    @classmethod
    def of(cls, rope: RopeConfig, target_length: int, config: SearchConfig) -> "SearchSpace":
        length = original_length(rope)
        if target_length < length:
            raise ValueError(f"target_length ({target_length}) must be >= the original context "
                             f"L = {length} (use target_length = L for short factors)")
        per_unit = round(1 / config.step)
        hi = math.floor(config.max_ratio * target_length / length * per_unit + 1e-6)
        starts = tuple(n for n in config.start_tokens if n < target_length)
        if not starts:
            raise ValueError(f"no start_tokens choice of {config.start_tokens} is below "
                             f"target_length {target_length}")
        return cls(rope.rotary_dim // 2, per_unit, per_unit, hi, starts)

    def factors(self, genome: Genome) -> np.ndarray:
        """λ f64 [half] of a genome."""
        return np.asarray(genome[0], np.float64) / self.per_unit

    def snap(self, factors: Any, start_tokens: int) -> Genome:
        """The nearest genome: λ rounded to the grid, clipped to bounds, made monotone."""
        k = np.clip(np.rint(np.asarray(factors, np.float64) * self.per_unit), self.lo, self.hi)
        return tuple(int(x) for x in np.maximum.accumulate(k)), start_tokens

    def contains(self, genome: Genome) -> bool:
        k, start = np.asarray(genome[0]), genome[1]
        return (k.shape == (self.half,) and k[0] >= self.lo and k[-1] <= self.hi
                and bool(np.all(np.diff(k) >= 0)) and start in self.starts)


# ----------------------------------------------------------------------------- seeds


def seed_factors(rope: RopeConfig, target_length: int) -> dict[str, np.ndarray]:
    """λ f64 [rotary_dim/2] of PI, NTK-aware and YaRN for s = target_length / L (off-grid).

    NTK: b' = b·s^(d/(d−2)) gives λ_j = θ_j / θ'_j = s^(2j/(d−2)). YaRN: rope.py's yarn
    frequencies (default betas) for factor s and original length L.
    """
    length, d = original_length(rope), rope.rotary_dim
    s = target_length / length
    j = np.arange(d // 2, dtype=np.float64)
    yarn = RopeConfig(rope_type="yarn", theta=rope.theta, head_dim=rope.head_dim, rotary_dim=d,
                      max_position_embeddings=target_length, factor=s,
                      original_max_position_embeddings=length)
    yarn_ratio = (np.asarray(rope_lib.default_frequencies(yarn), np.float64)
                  / np.asarray(rope_lib.frequencies(yarn)[0], np.float64))
    return {"pi": np.full(d // 2, s),
            "ntk": s ** (2 * j / (d - 2)) if d > 2 else np.ones(1),
            "yarn": yarn_ratio}


def seed_genomes(rope: RopeConfig, target_length: int, space: SearchSpace) -> dict[str, Genome]:
    """The seeds snapped into the space, with n̂ = the first choice (0 by default)."""
    return {name: space.snap(factors, space.starts[0])
            for name, factors in seed_factors(rope, target_length).items()}


# ----------------------------------------------------------------------------- operators


def mutate(parent: Genome, space: SearchSpace, config: SearchConfig, rng: np.random.Generator,
           seen: set[Genome]) -> Genome | None:
    """A mutant of `parent` not in `seen`, or None after config.max_tries draws.

    Each gene, with probability p, is redrawn uniformly on the grid between its neighbours'
    current values (first: from lo; last: up to hi), so the genome stays monotone; n̂ moves to
    another choice with probability p.
    """
    for _ in range(config.max_tries):
        k = list(parent[0])
        for j in np.flatnonzero(rng.random(space.half) < config.p):
            low = k[j - 1] if j > 0 else space.lo
            high = k[j + 1] if j + 1 < space.half else space.hi
            k[j] = int(rng.integers(low, high + 1))
        start = parent[1]
        if len(space.starts) > 1 and rng.random() < config.p:
            others = [n for n in space.starts if n != start]
            start = others[int(rng.integers(len(others)))]
        child = (tuple(k), start)
        if child not in seen:
            return child
    return None


def crossover(better: Genome, other: Genome, space: SearchSpace, config: SearchConfig,
              rng: np.random.Generator, seen: set[Genome]) -> Genome | None:
    """A child not in `seen`: `better` with each gene (and n̂) taken from `other` with
    probability p, kept if monotone; after config.max_tries draws, `mutate(better)`."""
    ours, theirs = np.asarray(better[0]), np.asarray(other[0])
    for _ in range(config.max_tries):
        k = np.where(rng.random(space.half) < config.p, theirs, ours)
        start = other[1] if rng.random() < config.p else better[1]
        child = (tuple(int(x) for x in k), start)
        if np.all(np.diff(k) >= 0) and child not in seen:
            return child
    return mutate(better, space, config, rng, seen)


def initial_population(rope: RopeConfig, target_length: int, space: SearchSpace,
                       config: SearchConfig, rng: np.random.Generator) -> list[Genome]:
    """The distinct seeds, then mutants of them in turn up to config.population genomes."""
    population = list(dict.fromkeys(seed_genomes(rope, target_length, space).values()))
    seeds, seen = tuple(population), set(population)
    for i in range(config.population - len(population)):
        child = mutate(seeds[i % len(seeds)], space, config, rng, seen)
        if child is not None:
            population.append(child)
            seen.add(child)
    return population


def next_population(ranked: Sequence[Genome], evaluated: set[Genome], space: SearchSpace,
                    config: SearchConfig, rng: np.random.Generator) -> list[Genome]:
    """The `parents` best of `ranked` (best first) plus their new mutants and children."""
    parents = list(ranked[:config.parents])
    seen = set(evaluated) | set(parents)
    children = []

    def add(child: Genome | None) -> None:
        if child is not None:
            children.append(child)
            seen.add(child)

    for _ in range(config.mutations):
        add(mutate(parents[int(rng.integers(len(parents)))], space, config, rng, seen))
    for _ in range(config.crossovers):
        i, j = sorted(rng.choice(len(parents), 2, replace=False))  # ranked: i is the better
        add(crossover(parents[i], parents[j], space, config, rng, seen))
    return parents + children


# ----------------------------------------------------------------------------- search


@dataclasses.dataclass(frozen=True, eq=False)
class SearchResult:
    factors: np.ndarray  # best λ f64 [rotary_dim/2], on the grid
    start_tokens: int  # best n̂
    fitness: float  # its fitness (perplexity)
    history: tuple[float, ...]  # best fitness after each iteration (non-increasing)
    evaluations: int  # distinct candidates evaluated


def search(fitness: Fitness, rope: RopeConfig, target_length: int,
           config: SearchConfig = SearchConfig(), state_path: str | Path | None = None,
           progress: bool = True) -> SearchResult:
    """Searches λ, n̂ minimising `fitness` for extending `rope`'s context L to target_length.

    fitness(λ f32 [rotary_dim/2], n̂) is called once per distinct genome (cached; NaN counts
    as +inf), e.g. `perplexity_fitness(model, documents, target_length)`. With state_path, the
    state is written there (JSON, atomically) after every iteration; a rerun with the same
    path and settings continues from it (config.iterations may grow) to the same result as an
    uninterrupted run.
    """
    space = SearchSpace.of(rope, target_length, config)
    setup = _setup(rope, target_length, config)
    path = Path(state_path) if state_path is not None else None
    if path is not None and path.exists():
        iteration, population, cache, history, rng = _load(path, setup)
    else:
        iteration, cache, history = 0, {}, []
        rng = np.random.default_rng(config.seed)
        population = initial_population(rope, target_length, space, config, rng)

    bar = tqdm(total=config.iterations, initial=min(iteration, config.iterations),
               desc=f"longrope search {target_length}", disable=not progress)
    best = min(cache.values(), default=math.inf)
    while iteration < config.iterations:
        if iteration:
            population = next_population(population, set(cache), space, config, rng)
        for genome in population:
            if genome not in cache:
                value = float(fitness(space.factors(genome).astype(np.float32), genome[1]))
                cache[genome] = math.inf if math.isnan(value) else value
                best = min(best, cache[genome])
                bar.set_postfix(best=f"{best:.4g}", evaluated=len(cache))
        population = sorted(population, key=cache.__getitem__)
        history.append(cache[population[0]])
        iteration += 1
        if path is not None:
            _save(path, setup, iteration, population, cache, history, rng, space)
        bar.update()
    bar.close()
    winner = population[0]
    return SearchResult(factors=space.factors(winner), start_tokens=winner[1],
                        fitness=cache[winner], history=tuple(history), evaluations=len(cache))


def _setup(rope: RopeConfig, target_length: int, config: SearchConfig) -> dict[str, Any]:
    """What a saved state must match to be continued (all but the iteration count)."""
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "iterations"}
    return json.loads(json.dumps({
        "target_length": target_length, "original_length": original_length(rope),
        "rotary_dim": rope.rotary_dim, "theta": rope.theta, **settings}))


def _save(path: Path, setup: dict, iteration: int, population: list[Genome],
          cache: dict[Genome, float], history: list[float], rng: np.random.Generator,
          space: SearchSpace) -> None:
    best = population[0]
    state = {
        "setup": setup, "iteration": iteration,
        "best": {"factors": space.factors(best).tolist(), "start_tokens": best[1],
                 "fitness": cache[best]},
        "history": history,
        "population": [[list(k), n] for k, n in population],
        "evaluated": [[list(k), n, value] for (k, n), value in cache.items()],
        "rng": rng.bit_generator.state,
    }
    paths.write_atomically(path, json.dumps(state))


def _load(path: Path, setup: dict) -> tuple:
    state = json.loads(path.read_text())
    for key, value in setup.items():
        if state["setup"].get(key) != value:
            raise ValueError(f"{path} holds a search with {key}={state['setup'].get(key)!r}, "
                             f"not {value!r}: use another state_path, or delete it to start "
                             "over")
    rng = np.random.default_rng()
    rng.bit_generator.state = state["rng"]
    population = [(tuple(k), n) for k, n in state["population"]]
    cache = {(tuple(k), n): value for k, n, value in state["evaluated"]}
    return state["iteration"], population, cache, list(state["history"]), rng


# ----------------------------------------------------------------------------- fitness


def perplexity_fitness(model: Any, documents: Sequence[Any], length: int,
                       factor: float | None = None) -> Fitness:
    """fitness(λ, n̂) = perplexity of `model` with LongRoPE factors λ and n̂ kept start tokens.

    Truncate protocol (LongRoPE, YaRN): each document (1-D ints, >= length tokens) is cut to
    `length` and scored in one window, all length − 1 next-token targets; the perplexity is
    exp of the mean over all documents. The attention factor is LongRoPE's for s = `factor`
    (default length / L). One jitted (params, ids, RopeArrays) -> mean nll serves every
    candidate; documents run one at a time (lax.map) and the LM head in chunks
    (`lctx_jax.losses`), so no [length, vocab] logits are held. Runs full attention ("xla"):
    RopeArrays needs it, and S²-Attn is training only.
    """
    rope = model.config.rope
    s = length / original_length(rope) if factor is None else factor
    if length < 2:
        raise ValueError(f"length must be >= 2 (one next-token target), got {length}")
    if not s >= 1:
        raise ValueError(f"factor s must be >= 1, got {s} (length {length} is below the "
                         f"original context {original_length(rope)}; pass factor=)")
    if not documents:
        raise ValueError("perplexity_fitness needs at least one document")
    if getattr(model.config, "infini", None) is not None:
        raise ValueError("the LongRoPE search scores a model whose attention spans the whole "
                         "length; an Infini-attention model rotates within its segments only")
    rows = []
    for i, doc in enumerate(documents):
        doc = np.asarray(doc)
        if doc.ndim != 1 or doc.shape[0] < length:
            raise ValueError(f"document {i} has shape {doc.shape}; the truncate protocol needs "
                             f"1-D token ids with at least length={length} tokens")
        rows.append(doc[:length])
    ids = jnp.asarray(np.stack(rows), jnp.int32)  # [k, length]
    target = _longrope(rope, s)
    forward = model if model.attention == "xla" else model.replace(attention="xla")

    @jax.jit
    def mean_nll(params: Any, ids: jax.Array, arrays: rope_lib.RopeArrays) -> jax.Array:
        def nll(doc: jax.Array) -> jax.Array:  # [length] -> mean next-token nll
            targets, weights = losses.shifted_targets(doc[None])
            hidden = forward.hidden(params, doc[None], rope=arrays)
            total, count = losses.nll_sum(hidden, forward.head(params), targets,
                                          weights, forward.dtype)
            return total / count
        return jnp.mean(jax.lax.map(nll, ids))

    def fitness(factors: np.ndarray, start_tokens: int) -> float:
        arrays = rope_lib.longrope_arrays(target, factors, start_tokens)
        return float(np.exp(np.float64(mean_nll(model.params, ids, arrays))))

    return fitness


def _longrope(rope: RopeConfig, factor: float) -> RopeConfig:
    """A "longrope" config on rope's base and rotary dims with extension ratio `factor` (its
    attention factor is what `rope_scaling` with that ratio gives); factors all 1."""
    ones = (1.0,) * (rope.rotary_dim // 2)
    return RopeConfig(rope_type="longrope", theta=rope.theta, head_dim=rope.head_dim,
                      rotary_dim=rope.rotary_dim,
                      max_position_embeddings=rope.max_position_embeddings, factor=factor,
                      original_max_position_embeddings=original_length(rope),
                      short_factor=ones, long_factor=ones)


# ----------------------------------------------------------------------------- export


def rope_scaling(rope: RopeConfig, target_length: int, long_factor: Any, start_tokens: int = 0,
                 short_factor: Any = None) -> dict[str, Any]:
    """The Hugging Face "longrope" scaling dict for searched factors on `rope`'s base.

    {"rope_type": "longrope", "factor": s = target_length / L, "original_max_position_embeddings":
    L, "long_factor": λ (used past L), "short_factor": (default all 1: the original rotation up
    to L), "start_tokens": n̂ (lctx_jax's key, omitted when 0)}. Pass it as
    `RopeConfig.from_hf(config, rope_scaling=...)` or `lctx_jax.from_hf(path, rope_scaling=...)`.
    """
    length, half = original_length(rope), rope.rotary_dim // 2
    if target_length < length:
        raise ValueError(f"target_length ({target_length}) must be >= the original context "
                         f"L = {length}")
    if short_factor is None:
        short_factor = np.ones(half)
    lists = {}
    for name, value in (("long_factor", long_factor), ("short_factor", short_factor)):
        value = np.asarray(value, np.float64)
        if value.shape != (half,):
            raise ValueError(f"{name} must have rotary_dim/2 = {half} entries, got shape "
                             f"{value.shape}")
        lists[name] = [float(x) for x in value]
    out = {"rope_type": "longrope", "factor": target_length / length,
           "original_max_position_embeddings": length, **lists}
    if start_tokens:
        out["start_tokens"] = int(start_tokens)
    return out
