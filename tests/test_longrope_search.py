"""LongRoPE: RoPE as runtime arrays (one compiled forward for every candidate) and the
evolutionary search over per-dimension factors: seeds, operators, improvement, resume, the
perplexity fitness, and the exported rope_scaling dict."""

import dataclasses

import jax
import jax.monitoring
import jax.numpy as jnp
import numpy as np
import pytest

import lctx_jax as lx
from lctx_jax import longrope_search as ls
from lctx_jax.rope import RopeConfig, longrope_arrays

VOCAB, ORIGINAL, LONG = 128, 32, 64  # tiny models: head_dim 16 (8 rotary pairs), L = 32
HALF = 8


def tiny_hf(**overrides) -> dict:
    return dict(model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=ORIGINAL, **overrides)


LONGROPE = {"rope_type": "longrope", "factor": LONG / ORIGINAL,
            "original_max_position_embeddings": ORIGINAL,
            "short_factor": np.linspace(1.0, 1.2, HALF).tolist(),
            "long_factor": np.linspace(1.0, 2.4, HALF).tolist()}


@pytest.fixture(scope="module")
def model():
    """A random longrope model (its weights serve the plain-llama config too)."""
    return lx.Model.init(lx.ModelConfig.from_hf(tiny_hf(rope_scaling=LONGROPE)),
                         jax.random.key(0))


@pytest.fixture(scope="module")
def documents():
    rng = np.random.default_rng(0)
    return [rng.integers(0, VOCAB, n) for n in (LONG, LONG + 7, LONG + 20)]


def with_rope(model, rope):
    return lx.Model(dataclasses.replace(model.config, rope=rope), model.params)


def perplexity(logits, ids):
    """exp(mean next-token nll) in f64 from logits [k, T, V] and ids [k, T]."""
    logits = np.asarray(logits, np.float64)[:, :-1]
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return float(np.exp(-np.take_along_axis(logp, ids[:, 1:, None], -1).mean()))


# ----------------------------------------------------------------------------- RopeArrays


@pytest.mark.parametrize("start_tokens", [0, 4])
def test_rope_arrays_forward_equals_config_forward(model, start_tokens):
    """Past L the RopeArrays of rope.long_factor rotate exactly as the RopeConfig does."""
    rope = dataclasses.replace(model.config.rope, start_tokens=start_tokens)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, VOCAB, (2, LONG + 16)), jnp.int32)
    plain = with_rope(model, rope)(ids)
    arrays = longrope_arrays(rope, rope.long_factor, start_tokens)
    forward = jax.jit(model.apply)
    traced = forward(model.params, ids, rope=arrays)
    np.testing.assert_allclose(np.asarray(traced), np.asarray(plain), rtol=0, atol=1e-6)
    # kept start tokens change the logits, through the same compiled forward
    other = forward(model.params, ids, rope=longrope_arrays(rope, rope.long_factor, 8))
    assert not np.allclose(np.asarray(other), np.asarray(plain), atol=1e-4)
    assert forward._cache_size() == 1


def test_rope_arrays_need_xla_attention(model):
    arrays = longrope_arrays(model.config.rope, model.config.rope.long_factor)
    q = jnp.zeros((1, 8, 4, 16))
    for impl in ("flash", "ring"):
        with pytest.raises(NotImplementedError, match="attention='xla'"):
            lx.attention.attend(q, q, q, impl=impl, rope=arrays)
    with pytest.raises(ValueError, match="rotary_dim/2 = 8"):
        model.apply(model.params, jnp.zeros((1, 4), jnp.int32),
                    rope=dataclasses.replace(arrays, inv_freq=arrays.inv_freq[:4]))
    with pytest.raises(ValueError, match="8 entries"):
        longrope_arrays(model.config.rope, [1.0] * 4)


# ----------------------------------------------------------------------------- search space


def big_rope(original=4096):
    return RopeConfig(head_dim=128, rotary_dim=128, max_position_embeddings=original)


def test_seeds_are_monotone_in_bounds_and_on_the_grid():
    rope, target = big_rope(), 4 * 4096
    config = ls.SearchConfig()
    space = ls.SearchSpace.of(rope, target, config)
    assert (space.lo, space.hi, space.per_unit) == (100, 500, 100)
    seeds = ls.seed_genomes(rope, target, space)
    for genome in seeds.values():
        assert space.contains(genome) and genome[1] == 0
    assert seeds["pi"][0] == (400,) * 64
    raw = ls.seed_factors(rope, target)
    j = np.arange(64)
    np.testing.assert_allclose(raw["ntk"], 4.0 ** (2 * j / 126))
    ntk = RopeConfig(rope_type="ntk", head_dim=128, rotary_dim=128, factor=4.0)
    ratio = np.asarray(lx.rope.default_frequencies(ntk)) / np.asarray(lx.rope.frequencies(ntk)[0])
    np.testing.assert_allclose(raw["ntk"], ratio, rtol=1e-5)  # θ_j / θ'_j, b' = b·s^(d/(d−2))
    assert raw["ntk"][-1] == pytest.approx(4.0)
    yarn = np.asarray(seeds["yarn"][0])
    assert yarn[0] == 100 and yarn[-1] == 400  # extrapolated high, interpolated low frequencies
    # short re-search at L: s = 1, λ in [1, 1.25], every seed is the original rotation
    short = ls.SearchSpace.of(rope, 4096, config)
    assert (short.lo, short.hi) == (100, 125)
    assert set(ls.seed_genomes(rope, 4096, short).values()) == {((100,) * 64, 0)}
    with pytest.raises(ValueError, match="target_length"):
        ls.SearchSpace.of(rope, 2048, config)


def test_mutations_and_crossovers_stay_in_the_space_and_are_new():
    rope, target = big_rope(original=16), 64  # n̂ choices limited to < 64
    config = ls.SearchConfig()
    space = ls.SearchSpace.of(rope, target, config)
    assert space.starts == (0, 1, 2, 4, 8, 12, 16, 20, 24, 28, 32)
    rng = np.random.default_rng(0)
    pool = ls.initial_population(rope, target, space, config, rng)
    assert len(pool) == config.population == len(set(pool))
    seen = set(pool)
    for i in range(400):
        a, b = (pool[int(x)] for x in rng.choice(len(pool), 2, replace=False))
        child = (ls.mutate(a, space, config, rng, seen) if i % 2
                 else ls.crossover(a, b, space, config, rng, seen))
        assert child is not None and child not in seen
        assert space.contains(child), child
        assert all(isinstance(k, int) for k in child[0]) and child[1] < target
        seen.add(child)
        pool.append(child)
    assert len({n for _, n in pool}) > 3  # n̂ is searched too


def test_config_is_validated():
    with pytest.raises(ValueError, match="parents \\+ mutations \\+ crossovers"):
        ls.SearchConfig(population=10)
    with pytest.raises(ValueError, match="step"):
        ls.SearchConfig(step=0.03)
    with pytest.raises(ValueError, match="p must be"):
        ls.SearchConfig(p=0)


# ----------------------------------------------------------------------------- search


SMALL = ls.SearchConfig(population=16, parents=8, mutations=4, crossovers=4, iterations=6,
                        p=0.3, max_ratio=1.25, seed=3)
HIDDEN = np.linspace(1.1, 3.6, HALF)  # the synthetic optimum: λ*, n̂* = 8


class Distance:
    """Synthetic fitness: distance to a hidden monotone λ* and n̂* (counts its calls)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, factors, start_tokens):
        assert factors.dtype == np.float32 and factors.shape == (HALF,)
        self.calls += 1
        return float(np.abs(factors - HIDDEN).mean() + 0.01 * abs(start_tokens - 8))


def small_rope():
    return RopeConfig(head_dim=16, rotary_dim=16, max_position_embeddings=ORIGINAL)


def test_search_improves_on_the_seeds():
    fitness, rope, target = Distance(), small_rope(), 4 * ORIGINAL
    config = dataclasses.replace(SMALL, iterations=12)
    result = ls.search(fitness, rope, target, config, progress=False)
    space = ls.SearchSpace.of(rope, target, config)
    best_seed = min(Distance()(space.factors(g).astype(np.float32), g[1])
                    for g in ls.seed_genomes(rope, target, space).values())
    assert result.history[0] <= best_seed
    assert result.fitness < 0.5 * result.history[0]
    assert list(result.history) == sorted(result.history, reverse=True)
    assert result.fitness == result.history[-1] == fitness(
        result.factors.astype(np.float32), result.start_tokens) and len(result.history) == 12
    assert result.evaluations == fitness.calls - 1  # each genome once (+ the check above)
    assert np.all(np.diff(result.factors) >= 0) and result.factors.max() <= 5.0


def test_resume_continues_to_the_uninterrupted_result(tmp_path):
    rope, target, state = small_rope(), 4 * ORIGINAL, tmp_path / "search.json"
    whole = ls.search(Distance(), rope, target, SMALL, progress=False)
    first = Distance()
    ls.search(first, rope, target, dataclasses.replace(SMALL, iterations=3), state, False)
    second = Distance()
    resumed = ls.search(second, rope, target, SMALL, state, False)
    np.testing.assert_array_equal(resumed.factors, whole.factors)
    assert resumed.start_tokens == whole.start_tokens and resumed.fitness == whole.fitness
    assert resumed.history == whole.history and resumed.evaluations == whole.evaluations
    assert first.calls + second.calls == whole.evaluations  # nothing evaluated twice
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError, match="seed=3, not 4"):
        ls.search(Distance(), rope, target, dataclasses.replace(SMALL, seed=4), state, False)


# ----------------------------------------------------------------------------- fitness


def test_perplexity_fitness_compiles_once_and_equals_the_plain_forward(model, documents):
    rope = model.config.rope
    fitness = ls.perplexity_fitness(model, documents, LONG)
    long = np.asarray(rope.long_factor, np.float32)
    value = fitness(long, 0)
    ids = np.stack([d[:LONG] for d in documents])
    assert value == pytest.approx(perplexity(model(ids), ids), rel=1e-5)

    compiles = []

    def listen(name, *args, **kwargs):
        if name == "/jax/core/compile/backend_compile_duration":
            compiles.append(name)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        kept = fitness(long, 4)
        others = [fitness(np.linspace(1.0, 1.0 + x, HALF).astype(np.float32), n)
                  for x, n in ((0.5, 0), (2.0, 8), (3.0, 2))]
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert compiles == []
    assert len({value, kept, *others}) == 5
    with_start = with_rope(model, dataclasses.replace(rope, start_tokens=4))
    assert kept == pytest.approx(perplexity(with_start(ids), ids), rel=1e-5)
    with pytest.raises(ValueError, match="length=65"):
        ls.perplexity_fitness(model, documents, LONG + 1)


def test_rope_scaling_round_trip_through_from_hf(model, documents, tmp_path):
    """A plain llama gets the searched factors through from_hf(rope_scaling=...); its forward
    equals the RopeArrays forward the fitness used, past L (long) and at L (short)."""
    base = lx.Model(lx.ModelConfig.from_hf(tiny_hf()), model.params)
    long = np.round(np.linspace(1.0, 2.3, HALF), 2)
    short = np.round(np.linspace(1.0, 1.1, HALF), 2)
    scaling = ls.rope_scaling(base.config.rope, LONG, long, start_tokens=4, short_factor=short)
    assert scaling == {"rope_type": "longrope", "factor": 2.0,
                       "original_max_position_embeddings": ORIGINAL,
                       "long_factor": long.tolist(), "short_factor": short.tolist(),
                       "start_tokens": 4}
    lx.to_hf(base, tmp_path)
    loaded = lx.from_hf(tmp_path, rope_scaling=scaling)
    assert loaded.config.rope == RopeConfig.from_hf(base.config.to_hf(), rope_scaling=scaling)
    assert loaded.config.rope.long_factor == tuple(long) and loaded.config.rope.start_tokens == 4

    ids = np.stack([d[:LONG] for d in documents])
    arrays = longrope_arrays(loaded.config.rope, long, 4)
    np.testing.assert_allclose(np.asarray(loaded(ids)),
                               np.asarray(base.apply(base.params, ids, rope=arrays)), atol=1e-6)
    fitness = ls.perplexity_fitness(base, documents, LONG)
    assert fitness(long.astype(np.float32), 4) == pytest.approx(perplexity(loaded(ids), ids),
                                                                rel=1e-5)
    # short factors: searched at L, scored with the long model's attention factor
    short_fitness = ls.perplexity_fitness(base, documents, ORIGINAL, factor=LONG / ORIGINAL)
    head = ids[:, :ORIGINAL]
    assert short_fitness(short.astype(np.float32), 4) == pytest.approx(
        perplexity(loaded(head), head), rel=1e-5)
