"""Tests for ddpm_bs.timesteps: exact pmfs, draws that follow them, and the jit/vmap/shard contract."""

import functools
import math
import pathlib
import re

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import scipy.special
import scipy.stats
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from configs import default as default_config
from ddpm_bs import schedules, timesteps

T = 200  # grid of the every-sampler tests: ≥ 5,000 expected draws per bin for uniform
N_DRAWS = 1_000_000
N_CONTINUOUS = 200_000  # jax.random.beta is slow on CPU
# Chi-square / KS p-values must exceed P_MIN. Seeds are fixed, so a test's outcome never
# changes; 1e-3 means a correct sampler would fail at a fresh seed with probability 1e-3 per
# check (about 4 % over the ~40 such checks), while the wrong laws these tests guard against
# (one index shifted at t_δ, a CDF off by one, 1 % of mass moved) give p-values below 1e-10 at
# 10⁶ draws.
P_MIN = 1e-3
_KEY = jax.random.key(0)
_LOSS_AWARE = timesteps.loss_aware(10)


def _readme_snippets() -> list[str]:
    """The python blocks of README.md's section on using the samplers (kept in step by these tests)."""
    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## Use the samplers in your own JAX code", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


README_SNIPPET = _readme_snippets()[0]


# ---------------------------------------------------------------------------------------------
# Helpers.


def _warm_loss_aware_state(sampler):
    """A full history: every timestep holds H losses that grow with t (plus noise)."""
    num, depth = sampler.num_timesteps, sampler.history_per_term
    t = np.tile(np.arange(num), depth)
    rng = np.random.default_rng(0)
    losses = (1.0 + np.sin(t / 17.0) ** 2) * rng.uniform(0.5, 1.5, t.size)
    return sampler.update(sampler.init_state(), jnp.asarray(t), jnp.asarray(losses, jnp.float32))


SAMPLER_CASES = {
    "uniform": lambda: timesteps.uniform(T),
    "bernoulli": lambda: timesteps.bernoulli(T, 160, 0.8),
    "piecewise": lambda: timesteps.piecewise(T, (40, 40, 160), (0.1, 0.05, 0.6, 0.25)),
    "beta": lambda: timesteps.beta(T, 2.0, 5.0),
    "lognormal": lambda: timesteps.lognormal(T),
    "logit_normal": lambda: timesteps.logit_normal(T, 0.5, 1.2),
    "categorical": lambda: timesteps.categorical(np.arange(T) % 7),
    "loss_aware": lambda: timesteps.loss_aware(T),
    "ot_gap": lambda: timesteps.ot_gap(T, 0.6, "cosine", 0.1),
    "ot_rate": lambda: timesteps.ot_rate(T, 0.6, "linear", 0.05),
}
CONTINUOUS_LAW = {  # exact continuous CDFs; every other sampler spreads its pmf uniformly
    "beta": lambda u: scipy.stats.beta(2.0, 5.0).cdf(u),
    "logit_normal": lambda u: scipy.special.ndtr((scipy.special.logit(u) - 0.5) / 1.2),
}


@functools.cache
def _case(name):
    """(sampler, state or None), built once per test session."""
    sampler = SAMPLER_CASES[name]()
    return sampler, (_warm_loss_aware_state(sampler) if sampler.stateful else None)


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _sample(sampler, key, state, n, continuous):
    draw = sampler.continuous if continuous else sampler
    args = (key, (n,)) if state is None else (key, (n,), state)
    return draw(*args)


def _pmf(name):
    sampler, state = _case(name)
    if state is None:
        return sampler.probs
    probs = np.asarray(sampler.probs_from_state(state), np.float64)
    return probs / probs.sum()


def _draws(name, seed=0, n=N_DRAWS, continuous=False):
    sampler, state = _case(name)
    return np.asarray(_sample(sampler, jax.random.key(seed), state, n, continuous))


def _assert_chisquare(draws, probs):
    """Chi-square goodness of fit, pooling neighbouring bins until each expects ≥ 5 draws."""
    counts = np.bincount(np.asarray(draws).ravel(), minlength=probs.size)
    assert counts.size == probs.size, "draws outside [0, T)"
    assert counts[probs == 0].sum() == 0, "draws on indices of probability 0"
    expected = probs * counts.sum()
    obs, exp, acc_o, acc_e = [], [], 0, 0.0
    for o, e in zip(counts, expected, strict=True):
        acc_o, acc_e = acc_o + o, acc_e + e
        if acc_e >= 5:
            obs.append(acc_o)
            exp.append(acc_e)
            acc_o, acc_e = 0, 0.0
    obs[-1] += acc_o
    exp[-1] += acc_e
    exp = np.asarray(exp) * (sum(obs) / sum(exp))
    if len(obs) > 1:
        pvalue = scipy.stats.chisquare(obs, exp).pvalue
        assert pvalue > P_MIN, f"chi-square p-value {pvalue:.3g}"


def _algorithm_1_pmf(num, t_delta, p):
    """Algorithm 1's law written out in 1-based t: p·U{1..t_δ} + (1−p)·U{t_δ..T}."""
    one_based = np.arange(1, num + 1)
    first = (one_based <= t_delta) / t_delta
    second = (one_based >= t_delta) / (num - t_delta + 1)
    return p * first + (1 - p) * second  # entry k−1 is 1-based t = k


# ---------------------------------------------------------------------------------------------
# Bernoulli: the paper's Algorithm 1.

BERNOULLI_PARAMS = [
    (1000, 800, 0.8),
    (1000, 1, 0.8),
    (1000, 1000, 0.8),
    (1000, 800, 0.0),
    (1000, 800, 1.0),
    (1000, 1, 0.0),
    (1000, 1000, 1.0),
    (10, 5, 0.3),
    (1, 1, 0.5),
]


@pytest.mark.parametrize("num,t_delta,p", BERNOULLI_PARAMS)
def test_bernoulli_pmf_matches_algorithm_1(num, t_delta, p):
    sampler = timesteps.bernoulli(num_timesteps=num, t_delta=t_delta, p=p)
    probs = sampler.probs
    assert probs.dtype == np.float64 and probs.shape == (num,)
    np.testing.assert_allclose(probs, _algorithm_1_pmf(num, t_delta, p), rtol=1e-13, atol=0)
    np.testing.assert_allclose(probs.sum(), 1.0, rtol=1e-13)


@pytest.mark.parametrize("num,t_delta,p", BERNOULLI_PARAMS)
def test_bernoulli_branch_masses_count_the_shared_index_once_each_way(num, t_delta, p):
    probs = timesteps.bernoulli(num, t_delta, p).probs
    shared_first, shared_second = p / t_delta, (1 - p) / (num - t_delta + 1)
    np.testing.assert_allclose(probs[t_delta - 1], shared_first + shared_second, rtol=1e-13)
    first_branch = probs[: t_delta - 1].sum() + shared_first  # 1-based {1..t_δ}
    second_branch = probs[t_delta:].sum() + shared_second  # 1-based {t_δ..T}
    np.testing.assert_allclose([first_branch, second_branch], [p, 1 - p], atol=1e-13)


def test_bernoulli_with_p_equal_to_t_delta_over_T_is_uniform_but_at_t_delta():
    """The paper's p = 0.8, t_δ/T = 0.8: every t but t_δ keeps (almost) uniform mass."""
    probs = timesteps.bernoulli(1000, 800, 0.8).probs
    np.testing.assert_allclose(probs[:799], 1 / 1000, rtol=1e-13)
    np.testing.assert_allclose(probs[800:], 0.2 / 201, rtol=1e-13)  # 0.995 / 1000
    np.testing.assert_allclose(probs[799], 1 / 1000 + 0.2 / 201, rtol=1e-13)
    # Total variation from uniform: 1/1000 moved onto t_δ from the 200 steps above it.
    np.testing.assert_allclose(0.5 * np.abs(probs - 1 / 1000).sum(), 0.2 / 201, rtol=1e-12)


@pytest.mark.parametrize("num,t_delta,p", BERNOULLI_PARAMS[:5])
def test_bernoulli_draws_pass_chi_square(num, t_delta, p):
    sampler = timesteps.bernoulli(num, t_delta, p)
    draws = np.asarray(_sample(sampler, jax.random.key(1), None, N_DRAWS, False))
    assert draws.dtype == np.int32 and draws.min() >= 0 and draws.max() < num
    _assert_chisquare(draws, sampler.probs)
    if p == 0.0:
        assert draws.min() >= t_delta - 1
    if p == 1.0:
        assert draws.max() <= t_delta - 1


def test_bernoulli_has_the_law_of_piecewise_with_one_boundary():
    for t_delta, p in [(800, 0.8), (1, 0.3), (1000, 0.7), (500, 0.0), (500, 1.0), (333, 0.1)]:
        bern = timesteps.bernoulli(1000, t_delta, p)
        piece = timesteps.piecewise(1000, (t_delta,), (p, 1 - p))
        np.testing.assert_allclose(bern.probs, piece.probs, rtol=1e-13, atol=1e-18)


def test_laws_drawn_with_one_key_are_quantile_coupled():
    """The index grows with the one uniform number behind it, so laws that nearly agree draw
    nearly the same timesteps from the same key: at the paper's setting Algorithm 1 and the
    uniform law are never more than one step apart (independent draws: 333 on average)."""
    key, shape = jax.random.key(9), (20_000,)
    uniform = np.asarray(timesteps.uniform(1000)(key, shape))
    bern = np.asarray(timesteps.bernoulli(1000, 800, 0.8)(key, shape))
    piece = np.asarray(timesteps.piecewise(1000, (800,), (0.8, 0.2))(key, shape))
    assert np.abs(uniform - bern).max() <= 1
    assert np.abs(piece - bern).max() <= 1 and np.mean(piece != bern) < 0.001  # float rounding
    u = np.asarray(jax.random.uniform(key, shape))
    assert np.all(np.diff(bern[np.argsort(u, kind="stable")]) >= 0)  # monotone in u


def test_bernoulli_works_under_jit_and_vmap_over_keys():
    sampler = timesteps.bernoulli(num_timesteps=1000, t_delta=800, p=0.8)
    key = jax.random.key(3)
    eager = sampler(key, (64,))
    chex.assert_shape(eager, (64,))
    chex.assert_type(eager, jnp.int32)

    @functools.partial(jax.jit, static_argnums=0)
    @chex.assert_max_traces(n=1)
    def draw(s, k):
        return s(k, (64,))

    np.testing.assert_array_equal(draw(sampler, key), eager)
    # An equal sampler built separately hits the same compiled function (hash/eq on fields).
    np.testing.assert_array_equal(draw(timesteps.bernoulli(1000, np.int64(800), 0.8), key), eager)
    np.testing.assert_array_equal(jax.jit(lambda k: sampler(k, (64,)))(key), eager)

    keys = jax.random.split(key, 5)
    batched = jax.jit(jax.vmap(lambda k: sampler(k, (64,))))(keys)
    chex.assert_shape(batched, (5, 64))
    for i in range(5):
        np.testing.assert_array_equal(batched[i], sampler(keys[i], (64,)))


@pytest.mark.parametrize(
    "sampler", [timesteps.bernoulli(1000, 800, 0.8), timesteps.ot_gap(1000, 0.61)], ids=str
)
def test_sharded_draws_equal_unsharded_on_8_devices(sampler):
    """Algorithm 1's arithmetic and the CDF-table path (every other law) alike."""
    devices = jax.devices()
    assert len(devices) == 8
    mesh = Mesh(np.array(devices), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    key = jax.random.key(7)
    plain = jax.jit(lambda k: sampler(k, (4096,)))(key)
    sharded = jax.jit(lambda k: sampler(k, (4096,)), out_shardings=sharding)(key)
    assert sharded.sharding.is_equivalent_to(sharding, 1)
    np.testing.assert_array_equal(sharded, plain)

    keys = jax.random.split(key, 8)
    per_key = jax.vmap(lambda k: sampler(k, (16,)))
    sharded_keys = jax.device_put(keys, sharding)
    out = jax.jit(per_key, out_shardings=sharding)(sharded_keys)
    chex.assert_shape(out, (8, 16))
    np.testing.assert_array_equal(out, per_key(keys))


# ---------------------------------------------------------------------------------------------
# Piecewise.


def test_piecewise_three_intervals_matches_hand_written_pmf():
    # 1-based intervals {1..3}, {3..7}, {7..10} with masses 0.2, 0.5, 0.3.
    sampler = timesteps.piecewise(10, (3, 7), (0.2, 0.5, 0.3))
    a, b, c = 0.2 / 3, 0.5 / 5, 0.3 / 4
    expected = [a, a, a + b, b, b, b, b + c, c, c, c]
    np.testing.assert_allclose(sampler.probs, expected, rtol=1e-14)
    draws = np.asarray(_sample(sampler, jax.random.key(4), None, N_DRAWS, False))
    _assert_chisquare(draws, sampler.probs)


def test_piecewise_handles_equal_boundaries_and_zero_masses():
    # Interval 2 is the single 1-based index {4}; interval 3 has no mass.
    sampler = timesteps.piecewise(10, (4, 4, 8), (0.3, 0.2, 0.0, 0.5))
    expected = np.zeros(10)
    expected[0:4] += 0.3 / 4
    expected[3] += 0.2
    expected[7:10] += 0.5 / 3
    np.testing.assert_allclose(sampler.probs, expected, rtol=1e-14)
    draws = np.asarray(_sample(sampler, jax.random.key(5), None, N_DRAWS, False))
    _assert_chisquare(draws, sampler.probs)


def test_piecewise_many_intervals_use_the_searchsorted_path():
    bounds = tuple(range(10, 1000, 10))  # 100 intervals
    masses = np.random.default_rng(0).dirichlet(np.ones(len(bounds) + 1))
    sampler = timesteps.piecewise(1000, bounds, tuple(masses))
    draws = np.asarray(_sample(sampler, jax.random.key(6), None, N_DRAWS, False))
    _assert_chisquare(draws, sampler.probs)


# ---------------------------------------------------------------------------------------------
# Every sampler.

ALL = list(SAMPLER_CASES)


@pytest.mark.parametrize("name", ALL)
def test_probs_is_a_pmf(name):
    sampler, _ = _case(name)
    probs = sampler.probs
    assert isinstance(probs, np.ndarray) and probs.dtype == np.float64
    assert probs.shape == (T,)
    assert np.all(probs >= 0)
    np.testing.assert_allclose(probs.sum(), 1.0, rtol=1e-12)
    assert not probs.flags.writeable
    np.testing.assert_allclose(_pmf(name).sum(), 1.0, rtol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_draws_follow_probs(name):
    draws = _draws(name)
    assert draws.dtype == np.int32 and draws.shape == (N_DRAWS,)
    assert draws.min() >= 0 and draws.max() < T
    _assert_chisquare(draws, _pmf(name))


@pytest.mark.parametrize("name", ALL)
def test_draws_are_a_pure_function_of_the_key(name):
    np.testing.assert_array_equal(_draws(name, seed=0), _draws(name, seed=0))
    assert np.mean(_draws(name, seed=0) != _draws(name, seed=1)) > 0.5


@pytest.mark.parametrize("name", ALL)
def test_continuous_time_law(name):
    u = _draws(name, seed=2, n=N_CONTINUOUS, continuous=True)
    assert u.dtype == np.float32 and u.shape == (N_CONTINUOUS,)
    assert u.min() > 0 and u.max() < 1
    scaled = u.astype(np.float64) * T
    index = np.floor(scaled).astype(np.int64)
    _assert_chisquare(index, _pmf(name))  # the continuous law discretizes to probs
    if name in CONTINUOUS_LAW:
        pvalue = scipy.stats.kstest(u.astype(np.float64), CONTINUOUS_LAW[name]).pvalue
    else:  # piecewise-constant extension: uniform inside each step
        pvalue = scipy.stats.kstest(scaled - index, "uniform").pvalue
    assert pvalue > P_MIN, f"KS p-value {pvalue:.3g}"


SINGLE_STEP = {
    "uniform": lambda: timesteps.uniform(1),
    "bernoulli": lambda: timesteps.bernoulli(1, 1, 0.8),
    "piecewise": lambda: timesteps.piecewise(1, (1,), (0.5, 0.5)),
    "beta": lambda: timesteps.beta(1, 2.0, 5.0),
    "lognormal": lambda: timesteps.lognormal(1),
    "logit_normal": lambda: timesteps.logit_normal(1),
    "categorical": lambda: timesteps.categorical((3.0,)),
    "loss_aware": lambda: timesteps.loss_aware(1),
    "ot_gap": lambda: timesteps.ot_gap(1, 0.6),
    "ot_rate": lambda: timesteps.ot_rate(1, 0.6),
}


@pytest.mark.parametrize("name", ALL)
def test_single_timestep_grid(name):
    sampler = SINGLE_STEP[name]()
    np.testing.assert_array_equal(sampler.probs, [1.0])
    if name in ("uniform", "bernoulli", "beta", "loss_aware"):  # one of each drawing path
        state = (sampler.init_state(),) if sampler.stateful else ()
        np.testing.assert_array_equal(sampler(_KEY, (100,), *state), np.zeros(100, np.int32))


def test_lognormal_pmf_is_the_normal_mass_of_log_sigma_bins():
    sampler = timesteps.lognormal(1000, p_mean=-1.2, p_std=1.2, schedule="linear")
    betas = np.linspace(1e-4, 0.02, 1000)
    log_sigma = 0.5 * np.log(1.0 / np.cumprod(1.0 - betas) - 1.0)
    edges = np.concatenate([[-np.inf], 0.5 * (log_sigma[1:] + log_sigma[:-1]), [np.inf]])
    expected = np.diff(scipy.stats.norm(-1.2, 1.2).cdf(edges))
    np.testing.assert_allclose(sampler.probs, expected, rtol=1e-9, atol=1e-15)


def test_beta_and_logit_normal_pmfs_match_their_cdfs():
    grid = np.arange(101) / 100
    np.testing.assert_allclose(
        timesteps.beta(100, 0.7, 3.0).probs,
        np.diff(scipy.stats.beta(0.7, 3.0).cdf(grid)),
        rtol=1e-10,
    )
    logit_cdf = [0.0] + [scipy.stats.norm(0.3, 0.8).cdf(math.log(x / (1 - x))) for x in grid[1:-1]]
    np.testing.assert_allclose(
        timesteps.logit_normal(100, 0.3, 0.8).probs, np.diff(logit_cdf + [1.0]), rtol=1e-10
    )


def test_samplers_are_hashable_and_equal_by_parameters():
    a = timesteps.piecewise(100, [10, 50], [0.2, 0.3, 0.5])
    b = timesteps.piecewise(100, (np.int64(10), 50), (0.2, 0.3, 0.5))
    assert a == b and hash(a) == hash(b)
    _ = a.probs  # cached values do not change equality
    assert a == b and hash(a) == hash(b)
    assert timesteps.uniform(100) != timesteps.uniform(101)
    assert len({timesteps.lognormal(100), timesteps.lognormal(100, schedule="linear")}) == 2


def test_get_sampler_builds_every_named_sampler():
    assert list(timesteps.SAMPLERS) == [
        "uniform",
        "bernoulli",
        "piecewise",
        "beta",
        "lognormal",
        "logit_normal",
        "loss_aware",
        "ot_gap",
        "ot_rate",
    ]
    kwargs = {
        "uniform": {},
        "bernoulli": {"t_delta": 80, "p": 0.8},
        "piecewise": {"boundaries": [20, 80], "masses": [0.2, 0.6, 0.2]},
        "beta": {"a": 2.0, "b": 3.0},
        "lognormal": {"p_mean": -1.0},
        "logit_normal": {"std": 0.5},
        "loss_aware": {"history_per_term": 5},
        "ot_gap": {"decay_rate": 0.5, "floor": 0.2},
        "ot_rate": {"decay_rate": 0.5, "schedule": "linear"},
    }
    for name in timesteps.SAMPLERS:
        sampler = timesteps.get_sampler(name, 100, **kwargs[name])
        assert sampler == getattr(timesteps, name)(100, **kwargs[name])


# ---------------------------------------------------------------------------------------------
# Loss-aware.


class _SequentialLossSecondMoment:
    """improved-diffusion's LossSecondMomentResampler bookkeeping, one example at a time."""

    def __init__(self, num, depth, uniform_prob):
        self.history = np.zeros((num, depth), np.float32)
        self.counts = np.zeros(num, np.int64)
        self.depth, self.uniform_prob = depth, uniform_prob

    def update(self, ts, losses):
        for t, loss in zip(ts, losses, strict=True):
            if self.counts[t] == self.depth:
                self.history[t, :-1] = self.history[t, 1:]
                self.history[t, -1] = loss
            else:
                self.history[t, self.counts[t]] = loss
                self.counts[t] += 1

    def probs(self):
        num = self.history.shape[0]
        if not (self.counts == self.depth).all():
            return np.full(num, 1.0 / num)
        w = np.sqrt(np.mean(self.history.astype(np.float64) ** 2, axis=-1))
        return (1 - self.uniform_prob) * w / w.sum() + self.uniform_prob / num


def test_loss_aware_update_matches_sequential_reference():
    num, depth = 7, 4
    sampler = timesteps.loss_aware(num, history_per_term=depth, uniform_prob=0.01)
    reference = _SequentialLossSecondMoment(num, depth, 0.01)
    update = jax.jit(sampler.update)
    state = sampler.init_state()
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, num, 12) for _ in range(6)]
    batches.insert(2, np.array([3] * 9 + [1, 3, 5]))  # t=3 repeats more than H times
    for t in batches:
        losses = rng.uniform(0, 2, t.size).astype(np.float32)
        state = update(state, jnp.asarray(t, jnp.int32), jnp.asarray(losses))
        reference.update(t, losses)
        np.testing.assert_array_equal(state.history, reference.history)
        np.testing.assert_array_equal(state.counts, reference.counts)
        np.testing.assert_allclose(sampler.probs_from_state(state), reference.probs(), rtol=1e-5)
    chex.assert_type(state.history, jnp.float32)
    chex.assert_type(state.counts, jnp.int32)


def test_loss_aware_probs_uniform_until_warm_then_sqrt_second_moment():
    sampler = timesteps.loss_aware(5, history_per_term=3, uniform_prob=0.001)
    np.testing.assert_array_equal(sampler.probs, np.full(5, 0.2))
    state = sampler.update(sampler.init_state(), jnp.array([0, 1, 2, 3, 4] * 2), jnp.ones(10))
    np.testing.assert_array_equal(sampler.probs_from_state(state), np.full(5, 0.2, np.float32))
    t = jnp.array([0, 1, 2, 3, 4])
    state = sampler.update(state, t, jnp.array([1.0, 2.0, 3.0, 4.0, 5.0]))
    history = np.array([[1, 1, 1], [1, 1, 2], [1, 1, 3], [1, 1, 4], [1, 1, 5]], np.float64)
    w = np.sqrt((history**2).mean(-1))
    expected = 0.999 * w / w.sum() + 0.001 / 5
    np.testing.assert_allclose(sampler.probs_from_state(state), expected, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Importance weights.


@pytest.mark.parametrize(
    "name",
    [
        "uniform",
        "bernoulli",
        "piecewise",
        "beta",
        "logit_normal",
        "loss_aware",
        "ot_gap",
        "ot_rate",
    ],
)
def test_importance_weights_make_the_objective_unbiased(name):
    sampler, state = _case(name)
    extra = () if state is None else (state,)
    w = timesteps.importance_weights(sampler, jnp.arange(T), *extra)
    chex.assert_type(w, jnp.float32)
    f = np.cos(np.arange(T) / 13.0) + 2.0
    # E_{t~probs}[w(t) f(t)] = Σ_t probs[t] w(t) f(t) must be the uniform mean of f.
    np.testing.assert_allclose(
        np.sum(_pmf(name) * np.asarray(w, np.float64) * f), f.mean(), rtol=1e-6
    )


def test_importance_weights_of_bernoulli_by_hand():
    sampler = timesteps.bernoulli(1000, 800, 0.8)
    w = timesteps.importance_weights(sampler, jnp.array([[0, 799], [800, 999]]))
    chex.assert_shape(w, (2, 2))
    want = [[1 / (1000 * 0.001), 1 / (1000 * (0.001 + 0.2 / 201))], [201 / 200, 201 / 200]]
    np.testing.assert_allclose(w, want, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Bad input.

BAD_INPUTS = [
    (lambda: timesteps.uniform(0), r"num_timesteps .*\[1, .*got 0"),
    (lambda: timesteps.uniform(10.5), r"num_timesteps .*got 10\.5"),
    (lambda: timesteps.uniform(True), r"num_timesteps .*got True"),
    (lambda: timesteps.bernoulli(1000, 0, 0.8), r"t_delta .*\[1, num_timesteps=1000\], got 0"),
    (lambda: timesteps.bernoulli(1000, 1001, 0.8), r"t_delta .*got 1001"),
    (lambda: timesteps.bernoulli(1000, 800.0, 0.8), r"t_delta .*got 800\.0"),
    (lambda: timesteps.bernoulli(1000, 800, 1.5), r"p must be .*\[0\.0, 1\.0\], got 1\.5"),
    (lambda: timesteps.bernoulli(1000, 800, -0.1), r"p must be .*got -0\.1"),
    (lambda: timesteps.bernoulli(1000, 800, float("nan")), r"p must be .*got nan"),
    (lambda: timesteps.piecewise(10, (3,), (0.5, 0.4)), r"masses must sum to 1 .*0\.9"),
    (lambda: timesteps.piecewise(10, (3,), (1.2, -0.2)), r"masses must be .*non-negative"),
    (
        lambda: timesteps.piecewise(10, (3,), (0.5, 0.25, 0.25)),
        r"masses .*len\(boundaries\) \+ 1 = 2",
    ),
    (
        lambda: timesteps.piecewise(10, (7, 3), (0.3, 0.3, 0.4)),
        r"boundaries must be sorted.*\(7, 3\)",
    ),
    (
        lambda: timesteps.piecewise(10, (0,), (0.5, 0.5)),
        r"boundaries .*\[1, num_timesteps=10\].*\(0,\)",
    ),
    (lambda: timesteps.piecewise(10, (11,), (0.5, 0.5)), r"boundaries .*\(11,\)"),
    (lambda: timesteps.piecewise(10, (2.5,), (0.5, 0.5)), r"boundaries .*\(2\.5,\)"),
    (lambda: timesteps.beta(10, 0.0, 1.0), r"a must be .*\(0\.0, inf\), got 0\.0"),
    (lambda: timesteps.beta(10, 1.0, -2.0), r"b must be .*got -2\.0"),
    (lambda: timesteps.logit_normal(10, std=0.0), r"std must be .*got 0\.0"),
    (lambda: timesteps.logit_normal(10, mean=float("inf")), r"mean must be .*got inf"),
    (lambda: timesteps.lognormal(10, p_std=-1.0), r"p_std must be .*got -1\.0"),
    (
        lambda: timesteps.lognormal(10, schedule="quadratic"),
        r"schedule .*linear, cosine.*quadratic",
    ),
    (lambda: timesteps.loss_aware(10, history_per_term=0), r"history_per_term .*got 0"),
    (
        lambda: timesteps.loss_aware(10, uniform_prob=2.0),
        r"uniform_prob .*\[0\.0, 1\.0\], got 2\.0",
    ),
    (lambda: timesteps.categorical(()), r"weights must be"),
    (lambda: timesteps.get_sampler("gaussian", 10), r"'gaussian' is unknown; valid names: uniform"),
    (lambda: timesteps.ot_gap(10, 0.0), r"decay_rate must be .*\(0\.0, inf\), got 0\.0"),
    (lambda: timesteps.ot_rate(10, float("nan")), r"decay_rate must be .*got nan"),
    (lambda: timesteps.ot_rate(10, 0.5, floor=1.5), r"floor must be .*\[0\.0, 1\.0\], got 1\.5"),
    (lambda: timesteps.ot_gap(10, 0.5, schedule="custom"), r"schedule .*linear, cosine.*custom"),
    (lambda: timesteps.uniform(10)(_KEY, 5), r"shape must be a tuple .*got 5"),
    (lambda: timesteps.uniform(10)(_KEY, [5]), r"shape must be a tuple .*got \[5\]"),
    (lambda: timesteps.beta(10, 1.0, 1.0).continuous(_KEY, (2.0,)), r"shape .*\(2\.0,\)"),
    (
        lambda: _LOSS_AWARE.update(_LOSS_AWARE.init_state(), jnp.zeros(4, jnp.int32), jnp.zeros(3)),
        r"losses must have the same shape as t.*\(3,\).*\(4,\)",
    ),
    (
        lambda: timesteps.importance_weights(_LOSS_AWARE, jnp.zeros(2, jnp.int32)),
        r"state is required",
    ),
    (
        lambda: timesteps.importance_weights(
            timesteps.uniform(10), jnp.zeros(2, jnp.int32), _LOSS_AWARE.init_state()
        ),
        r"state is only used",
    ),
]


@pytest.mark.parametrize("build,match", BAD_INPUTS, ids=[m.split()[0] for _, m in BAD_INPUTS])
def test_bad_input_raises_value_error_naming_the_argument(build, match):
    with pytest.raises(ValueError, match=match):
        build()


# ---------------------------------------------------------------------------------------------
# OT-derived laws: built from the fitted W₂ decay exactly as their formulas say.


def _linear_alphas_cumprod(num):
    """DDPM's linear schedule written out: β from 1e-4 to 0.02 (scaled by 1000/T), ᾱ = Π(1 − β)."""
    scale = 1000 / num
    return np.cumprod(1.0 - np.linspace(scale * 1e-4, scale * 0.02, num))


def _cosine_alphas_cumprod(num, s=0.008):
    """Improved DDPM's cosine schedule (Eq. 17), β clipped at 0.999, ᾱ = Π(1 − β)."""
    f = np.cos((np.arange(num + 1) / num + s) / (1 + s) * np.pi / 2) ** 2
    betas = np.minimum(1 - f[1:] / f[:-1], 0.999)
    return np.cumprod(1.0 - betas)


ALPHAS = {"linear": _linear_alphas_cumprod, "cosine": _cosine_alphas_cumprod}


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("decay_rate,floor", [(0.61, 0.1), (0.5, 0.0), (2.0, 0.3)])
def test_ot_gap_is_the_fitted_w2_curve_plus_a_floor(schedule, decay_rate, floor):
    num = 1000
    w = np.exp(-decay_rate * -np.log(ALPHAS[schedule](num)))  # W(t)/W(0) = e^{−K s(t)}
    expected = (1 - floor) * w / w.sum() + floor / num
    sampler = timesteps.ot_gap(num, decay_rate, schedule, floor)
    np.testing.assert_allclose(sampler.probs, expected, rtol=1e-9)
    assert np.all(np.diff(sampler.probs) <= 0)  # mass falls as the distributions merge


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("decay_rate,floor", [(0.61, 0.1), (0.5, 0.0), (2.0, 0.3)])
def test_ot_rate_is_the_fall_of_the_fitted_w2_curve_plus_a_floor(schedule, decay_rate, floor):
    num = 1000
    w = np.exp(-decay_rate * -np.log(ALPHAS[schedule](num)))
    fall = np.concatenate([[1.0], w[:-1]]) - w  # W(t−1) − W(t), W(−1) = 1
    expected = (1 - floor) * fall / fall.sum() + floor / num
    sampler = timesteps.ot_rate(num, decay_rate, schedule, floor)
    np.testing.assert_allclose(sampler.probs, expected, rtol=1e-9)
    peak = int(np.argmax(sampler.probs))
    assert 0 < peak < num - 1  # rises, then falls: mass where W drops fastest


def test_ot_laws_floor_gives_every_timestep_at_least_floor_over_T():
    for law in (timesteps.ot_gap, timesteps.ot_rate):
        probs = law(1000, 5.0, "cosine", 0.1).probs  # a fast decay starves the tail without it
        assert probs.min() >= 0.1 / 1000 * (1 - 1e-12)
        assert law(1000, 5.0, "cosine", 0.0).probs[-100:].sum() < 1e-3


@pytest.mark.parametrize("t_delta", [1, 500, 800, 912, 999])
def test_auto_p_is_the_w2_area_on_the_significant_interval_and_favours_it(t_delta):
    w = np.exp(-0.61 * -np.log(_cosine_alphas_cumprod(1000)))
    p = timesteps.auto_p(t_delta, 0.61, "cosine", 1000)
    np.testing.assert_allclose(p, w[:t_delta].sum() / w.sum(), rtol=1e-12)
    assert p > t_delta / 1000  # more than uniform mass on {1..t_δ}
    warnings = timesteps.warnings_for(timesteps.bernoulli(1000, t_delta, p))
    assert not any("less than uniform mass" in w for w in warnings)


# ---------------------------------------------------------------------------------------------
# from_config: the `timesteps` section, validated by the factory built from it.

COSINE = schedules.get_schedule("cosine", 1000)
LINEAR = schedules.get_schedule("linear", 1000)
INTERVAL = {"t_delta": 912, "decay_rate": 0.61, "schedule": "cosine", "num_timesteps": 1000}


def _section(**overrides):
    cfg = default_config.get_config().timesteps
    for name, value in overrides.items():
        cfg[name] = value
    return cfg


def test_default_config_reads_every_field_of_the_timesteps_section():
    assert set(default_config.get_config().timesteps) <= set(timesteps.FIELDS)
    assert timesteps.from_config(_section(), schedule=COSINE) == timesteps.uniform(1000)


@pytest.mark.parametrize(
    "overrides,expected",
    [
        ({"sampler": "bernoulli", "t_delta": 700, "p": 0.9}, timesteps.bernoulli(1000, 700, 0.9)),
        (
            {"sampler": "piecewise", "boundaries": [100, 900], "masses": [0.3, 0.5, 0.2]},
            timesteps.piecewise(1000, (100, 900), (0.3, 0.5, 0.2)),
        ),
        ({"sampler": "beta", "beta_a": 2.0, "beta_b": 3.0}, timesteps.beta(1000, 2.0, 3.0)),
        (
            {"sampler": "lognormal", "p_mean": -1.0, "p_std": 1.5},
            timesteps.lognormal(1000, -1.0, 1.5, "linear"),
        ),
        (
            {"sampler": "logit_normal", "logit_mean": 0.5, "logit_std": 0.7},
            timesteps.logit_normal(1000, 0.5, 0.7),
        ),
        (
            {"sampler": "loss_aware", "history": 4, "uniform_prob": 0.01},
            timesteps.loss_aware(1000, 4, 0.01),
        ),
        (
            {"sampler": "ot_gap", "decay_rate": 0.7, "ot_floor": 0.2},
            timesteps.ot_gap(1000, 0.7, "linear", 0.2),
        ),
        (
            {"sampler": "ot_rate", "decay_rate": 0.7, "ot_floor": 0.2},
            timesteps.ot_rate(1000, 0.7, "linear", 0.2),
        ),
    ],
    ids=lambda v: v["sampler"] if isinstance(v, dict) else "",
)
def test_from_config_builds_each_law_from_its_fields(overrides, expected):
    cfg = _section(**{"decay_rate": "auto", "ot_floor": 0.1, **overrides})
    assert timesteps.from_config(cfg, schedule=LINEAR) == expected
    assert not timesteps.needs_interval(cfg)


def test_auto_fields_read_the_located_interval():
    cfg = _section(sampler="bernoulli", t_delta="auto", p=0.8)
    assert timesteps.needs_interval(cfg)
    sampler = timesteps.from_config(cfg, schedule=COSINE, interval=INTERVAL)
    assert sampler == timesteps.bernoulli(1000, 912, 0.8)
    cfg = _section(sampler="bernoulli", t_delta="auto", p="auto", decay_rate="auto")
    sampler = timesteps.from_config(cfg, schedule=COSINE, interval=INTERVAL)
    assert sampler == timesteps.bernoulli(1000, 912, timesteps.auto_p(912, 0.61, "cosine", 1000))
    assert timesteps.warnings_for(sampler) == []
    cfg = _section(sampler="bernoulli", t_delta=800, p="auto", decay_rate=0.5)
    assert not timesteps.needs_interval(cfg)
    assert timesteps.from_config(cfg, schedule=COSINE).p == timesteps.auto_p(
        800, 0.5, "cosine", 1000
    )
    cfg = _section(sampler="ot_rate", decay_rate="auto", ot_floor=0.1)
    assert timesteps.needs_interval(cfg)
    sampler = timesteps.from_config(cfg, schedule=COSINE, interval=INTERVAL)
    assert sampler == timesteps.ot_rate(1000, 0.61, "cosine", 0.1)


BAD_CONFIGS = [
    (
        {"sampler": "gaussian"},
        "timesteps.sampler='gaussian': must be one of 'uniform', 'bernoulli', 'piecewise', "
        "'beta', 'lognormal', 'logit_normal', 'loss_aware', 'ot_gap', 'ot_rate'; fix it in the "
        "config file or with --config.timesteps.sampler=<value>.",
    ),
    (
        {"importance_weighting": 1},
        "timesteps.importance_weighting=1: must be True or False; fix it in the config file or "
        "with --config.timesteps.importance_weighting=<value>.",
    ),
    (
        {"sampler": "bernoulli", "p": 1.5},
        "timesteps.p=1.5: p must be a finite real number in [0.0, 1.0], got 1.5; fix it in the "
        "config file or with --config.timesteps.p=<value>.",
    ),
    (
        {"sampler": "bernoulli", "t_delta": 1001},
        "timesteps.t_delta=1001: must be 'auto' or an integer in [1, diffusion.num_timesteps="
        "1000] (the paper's 1-based t_δ; 'auto' locates it with optimal transport); e.g. "
        "--config.timesteps.t_delta=auto.",
    ),
    (
        {"sampler": "beta", "beta_b": -2.0},
        "timesteps.beta_b=-2.0: b must be a finite real number in (0.0, inf), got -2.0; fix it "
        "in the config file or with --config.timesteps.beta_b=<value>.",
    ),
    (
        {"sampler": "loss_aware", "history": 0},
        "timesteps.history=0: history_per_term must be an integer ≥ 1, got 0; fix it in the "
        "config file or with --config.timesteps.history=<value>.",
    ),
    (
        {"sampler": "ot_gap", "decay_rate": 0.5, "ot_floor": 1.5},
        "timesteps.ot_floor=1.5: floor must be a finite real number in [0.0, 1.0], got 1.5; fix "
        "it in the config file or with --config.timesteps.ot_floor=<value>.",
    ),
    (
        {"t_deltaa": 800},
        "timesteps.t_deltaa=800: unknown field (did you mean timesteps.t_delta?); remove it or "
        "fix its name (configs/default.py documents every field).",
    ),
]


@pytest.mark.parametrize("overrides,message", BAD_CONFIGS, ids=lambda v: str(v)[:30])
def test_from_config_errors_are_one_line_naming_the_field(overrides, message):
    cfg = _section(**{"decay_rate": "auto", "ot_floor": 0.1})
    cfg = ml_collections.ConfigDict({**cfg.to_dict(), **overrides})
    with pytest.raises(ValueError) as error:
        timesteps.from_config(cfg, schedule=COSINE)
    assert str(error.value) == message


def test_check_finds_bad_fields_before_the_interval_is_located():
    cfg = _section(sampler="bernoulli", t_delta="auto", p=1.5)
    with pytest.raises(ValueError, match=r"^timesteps.p=1.5: p must be"):
        timesteps.check(cfg, schedule=COSINE)
    cfg = _section(sampler="bernoulli", t_delta="auto", p="auto", decay_rate="auto")
    timesteps.check(cfg, schedule=COSINE)
    cfg = _section(sampler="ot_rate", decay_rate="auto", ot_floor=-0.1)
    with pytest.raises(ValueError, match=r"^timesteps.ot_floor=-0.1: floor must be"):
        timesteps.check(cfg, schedule=COSINE)


def test_from_config_missing_field_or_interval_names_what_to_do():
    cfg = ml_collections.ConfigDict({"sampler": "ot_gap", "importance_weighting": False})
    with pytest.raises(ValueError, match=r"^timesteps.decay_rate: missing; timesteps.sampler="):
        timesteps.from_config(cfg, schedule=COSINE)
    cfg = _section(sampler="bernoulli", t_delta="auto", p=0.9)
    with pytest.raises(ValueError, match=r"^timesteps.t_delta='auto': needs the located interval"):
        timesteps.from_config(cfg, schedule=COSINE)
    with pytest.raises(ValueError, match=r"located for schedule 'cosine' .*'linear'"):
        timesteps.from_config(cfg, schedule=LINEAR, interval=INTERVAL)
    cfg = _section(sampler="ot_gap", decay_rate="auto", ot_floor=0.1)
    with pytest.raises(ValueError, match=r"^timesteps.decay_rate='auto': interval.json has deca"):
        timesteps.from_config(cfg, schedule=COSINE, interval={**INTERVAL, "decay_rate": math.nan})
    custom = schedules.schedule_from_betas(np.full(1000, 0.01))
    with pytest.raises(ValueError, match=r"^timesteps.sampler='ot_gap': needs a named schedule"):
        timesteps.from_config(cfg, schedule=custom, interval=INTERVAL)


# ---------------------------------------------------------------------------------------------
# Saying the truth: warnings at training start, TV distance to uniform.


def test_tv_to_uniform_by_hand():
    assert timesteps.tv_to_uniform(timesteps.uniform(1000)) == 0.0
    # Paper's p = t_δ/T = 0.8: 1/1000 moved onto t_δ from the 200 steps above it.
    np.testing.assert_allclose(
        timesteps.tv_to_uniform(timesteps.bernoulli(1000, 800, 0.8)), 0.2 / 201, rtol=1e-12
    )
    # p = 0.9: indices 0..799 hold 0.9 + 0.1/201 instead of 800/1000.
    tv = timesteps.tv_to_uniform(timesteps.bernoulli(1000, 800, 0.9))
    np.testing.assert_allclose(tv, 0.9 + 0.1 / 201 - 0.8, rtol=1e-12)


def test_warnings_say_when_bernoulli_is_uniform_or_favours_the_wrong_interval():
    (near,) = timesteps.warnings_for(timesteps.bernoulli(1000, 800, 0.8))
    assert "total-variation distance 0.000995" in near and "experiments/REPORT.md" in near
    (wrong,) = timesteps.warnings_for(timesteps.bernoulli(1000, 912, 0.8))  # digits' auto t_δ
    assert "less than uniform mass" in wrong and "0.88/T" in wrong and "2.25/T" in wrong
    assert timesteps.warnings_for(timesteps.bernoulli(1000, 800, 0.9)) == []
    assert timesteps.warnings_for(timesteps.uniform(1000)) == []
    assert timesteps.warnings_for(timesteps.loss_aware(1000)) == []
    assert timesteps.warnings_for(timesteps.ot_gap(1000, 0.61)) == []
    (flat,) = timesteps.warnings_for(timesteps.beta(1000, 1.0, 1.0))  # uniform in disguise
    assert "Beta law is within total-variation distance" in flat


# ---------------------------------------------------------------------------------------------
# README.


def test_readme_snippet_runs():
    namespace = {}
    exec(README_SNIPPET, namespace)
    t, w = namespace["t"], namespace["w"]
    chex.assert_shape(t, (128,))
    chex.assert_type(t, jnp.int32)
    assert int(t.min()) >= 0 and int(t.max()) < 1000
    chex.assert_shape(w, (128,))
    chex.assert_type(w, jnp.float32)
    np.testing.assert_allclose(
        w, 1.0 / (1000 * namespace["sampler"].probs[np.asarray(t)]), rtol=1e-6
    )
