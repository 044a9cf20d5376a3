"""The train step's wiring, observed from outside through `Trainer.step` and its metrics.

With one example per step on one device, the metrics expose that example: `t_mean` is its
timestep, `loss_q{t·4//T}` its loss, and `loss` its importance-weighted loss. Many such steps
give the law the step draws t from, and the per-example inputs of the loss-aware sampler's
update, which a sequential numpy reference then replays. The optimizer and the EMA are read off
the parameters before and after each step.
"""

import collections
import functools
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats
from support import assert_bitwise_equal, checkpoint_steps, host_copy, smoke_config

from ddpm_bs import data, timesteps, train

# The step's wiring does not depend on the network: a two-conv stand-in compiles in a second.
pytestmark = pytest.mark.usefixtures("conv_denoiser")


def _one_example_config(**overrides):
    """One example per step on one device; lr small enough that nothing overflows."""
    defaults = dict(mesh__data=1, train__batch_size=1, optim__lr=1e-5, optim__warmup_steps=0)
    return smoke_config(**{**defaults, **overrides})


def _batch(trainer, batch_size, seed=0):
    rng = np.random.default_rng(seed)
    host = {
        "image": rng.uniform(-1, 1, (batch_size, *trainer.image_shape)).astype(np.float32),
        "label": np.zeros((batch_size,), np.int32),
    }
    return jax.device_put(host, trainer.batch_sharding)


def _run(config, num_steps, *, each_state=None):
    """Runs `num_steps` steps from init on one fixed batch; returns the metrics [num_steps].

    `each_state(state)` is called on the state before every step (and after the last).
    """
    trainer = train.Trainer(config)
    batch = _batch(trainer, config.train.batch_size)
    state = trainer.init()
    metrics = []
    for _ in range(num_steps):
        if each_state:
            each_state(state)
        state, m = trainer.step(state, batch, trainer.train_key)
        metrics.append(m)
    if each_state:
        each_state(state)
    metrics = jax.device_get(metrics)
    return trainer, state, {k: np.stack([m[k] for m in metrics]) for k in metrics[0]}


def _chi_square_p(draws, probs):
    """Pearson's χ² p-value of integer draws against `probs`, pooling bins expected below 5."""
    expected = probs * len(draws)
    observed = np.bincount(draws, minlength=len(probs)).astype(float)
    small = expected < 5
    if small.any():
        expected = np.append(expected[~small], expected[small].sum())
        observed = np.append(observed[~small], observed[small].sum())
    return stats.chisquare(observed, expected).pvalue


# --- Item 1: the train step draws t from the configured law --------------------------------

T = 20
LAWS = {  # two laws far from uniform on T = 20 steps
    "bernoulli": dict(timesteps__sampler="bernoulli", timesteps__t_delta=5, timesteps__p=0.95),
    "beta": dict(timesteps__sampler="beta", timesteps__beta_a=2.0, timesteps__beta_b=5.0),
}
LAW_ARGS = {
    "bernoulli": dict(t_delta=5, p=0.95),
    "beta": dict(a=2.0, b=5.0),
}


@pytest.mark.parametrize("law", sorted(LAWS))
def test_the_step_draws_t_from_the_configured_law_with_importance_weights(law):
    config = _one_example_config(
        diffusion__num_timesteps=T, timesteps__importance_weighting=True, **LAWS[law]
    )
    _, _, m = _run(config, 1500)
    probs = timesteps.get_sampler(law, T, **LAW_ARGS[law]).probs
    t = m["t_mean"].astype(np.int64)
    np.testing.assert_array_equal(t, m["t_mean"])  # one example: t_mean is its t
    assert t.min() >= 0 and t.max() < T
    # Fixed seed: deterministic. The uniform law's p-value here is below 1e-100.
    assert _chi_square_p(t, probs) > 1e-3, np.bincount(t, minlength=T)
    # improved-diffusion's loss_q0..q3: each step's one loss lands in the quarter t·4//T.
    quarters = np.stack([m[f"loss_q{q}"] for q in range(4)], axis=1)
    np.testing.assert_array_equal(quarters[np.arange(len(t)), t * 4 // T], m["mse"])
    assert np.count_nonzero(quarters) == np.count_nonzero(m["mse"])
    # importance_weighting: the example's loss is weighted by 1/(T·p(t)).
    np.testing.assert_allclose(m["loss"] / m["mse"], 1.0 / (T * probs[t]), rtol=1e-5)


# --- Item 2: the loss-aware sampler inside training ----------------------------------------

H, U, T_LA = 2, 0.1, 4  # history per timestep, uniform mass, timesteps (each its own quarter)


def _loss_aware_config(**overrides):
    return _one_example_config(
        diffusion__num_timesteps=T_LA,
        timesteps__sampler="loss_aware",
        timesteps__history=H,
        timesteps__uniform_prob=U,
        # loss = mse/√SNR ≠ mse: the sampler must see the per-example loss, and its law then
        # leans hard on t = 3 (SNR ≈ 1e-4 on this 4-step cosine schedule)
        loss__weighting="debias",
        **overrides,
    )


class _SequentialLossAware:
    """improved-diffusion's LossSecondMomentResampler, one example at a time, in numpy."""

    def __init__(self):
        self.history = [collections.deque(maxlen=H) for _ in range(T_LA)]

    def probs(self):
        if any(len(h) < H for h in self.history):
            return np.full(T_LA, 1.0 / T_LA)
        w = np.sqrt([np.mean(np.square(np.asarray(h, np.float64))) for h in self.history])
        return (1 - U) * w / w.sum() + U / T_LA

    def update(self, t, loss):
        self.history[t].append(loss)

    def arrays(self):
        history = np.zeros((T_LA, H), np.float32)
        for t, h in enumerate(self.history):
            history[t, : len(h)] = list(h)
        return history, np.array([len(h) for h in self.history], np.int32)


def test_loss_aware_state_follows_a_sequential_reference_through_the_step():
    states = []
    config = _loss_aware_config(timesteps__importance_weighting=True)
    _, _, m = _run(config, 400, each_state=lambda s: states.append(host_copy(s.sampler_state)))
    t = m["t_mean"].astype(np.int64)
    quarters = np.stack([m[f"loss_q{q}"] for q in range(4)], axis=1)
    losses = quarters[np.arange(len(t)), t]  # T = 4: loss_q{t} is the example's own loss
    assert np.count_nonzero(quarters) == np.count_nonzero(losses)
    assert not np.allclose(losses, m["mse"])  # the weighting makes loss ≠ mse

    reference = _SequentialLossAware()
    expected_counts = np.zeros(T_LA)
    for step in range(len(t)):
        probs = reference.probs()
        expected_counts += probs
        # importance weights come from the state the step drew t with
        np.testing.assert_allclose(
            m["loss"][step] / losses[step], 1.0 / (T_LA * probs[t[step]]), rtol=1e-5
        )
        reference.update(t[step], losses[step])
        history, counts = reference.arrays()
        np.testing.assert_array_equal(states[step + 1].counts, counts)
        np.testing.assert_array_equal(states[step + 1].history, history)
    # After warm-up the law is far from uniform ...
    assert reference.probs().min() < 0.5 / T_LA
    # ... and the draws follow it (Pearson's statistic against the summed pmfs; the draws'
    # varying laws make it stochastically smaller than χ²(T−1), so the test is conservative).
    observed = np.bincount(t, minlength=T_LA)
    chi2 = np.sum((observed - expected_counts) ** 2 / expected_counts)
    assert stats.chi2.sf(chi2, T_LA - 1) > 1e-3, (observed, expected_counts)


def test_a_stopped_and_resumed_loss_aware_run_ends_bitwise_equal(tmp_path, monkeypatch):
    config = smoke_config(
        train__num_steps=16,
        train__checkpoint_every=0,
        mesh__data=1,  # one device writes a checkpoint ~3× faster than eight
        diffusion__num_timesteps=T_LA,
        timesteps__sampler="loss_aware",
        timesteps__history=H,
        timesteps__uniform_prob=U,
        timesteps__importance_weighting=True,
    )
    straight = host_copy(train.train_and_evaluate(config, str(tmp_path / "straight")))
    assert np.all(straight.sampler_state.counts == H)  # warm: the state shapes the draws

    batch_at = data.Pipeline.batch_at

    def sigterm_once_at_step_12(self, step):
        if step == 12:  # the loader runs a few batches ahead; the main thread gets the signal
            signal.raise_signal(signal.SIGTERM)
        return batch_at(self, step)

    monkeypatch.setattr(data.Pipeline, "batch_at", sigterm_once_at_step_12)
    stopped = train.train_and_evaluate(config, str(tmp_path / "resumed"))
    monkeypatch.setattr(data.Pipeline, "batch_at", batch_at)
    stop = int(stopped.step)
    assert 1 <= stop < 16 and checkpoint_steps(tmp_path / "resumed") == [stop]
    assert np.all(np.asarray(stopped.sampler_state.counts) == H)  # warm when stopped
    resumed = host_copy(train.train_and_evaluate(config, str(tmp_path / "resumed")))
    assert_bitwise_equal(straight, resumed)


# --- Item 5: EMA and the optimizer -----------------------------------------------------------


def _params_after_each_step(config, num_steps):
    """Host copies of (params, ema_params) before the first step and after each step."""
    seen = []
    _, _, m = _run(
        config,
        num_steps,
        each_state=lambda s: seen.append(host_copy((s.params, s.ema_params))),
    )
    return seen, m


EMA_RATES, LR, WARMUP, WD, ADAMW_STEPS = (0.9, 0.5), 1e-2, 4, 0.5, 7


@functools.cache
def _adamw_run():
    """One run shared by the EMA and AdamW tests (each config compiles its own step).

    Adam with b1 = b2 = 0 and a tiny ε is memoryless: its update is sign(g) per element,
    whatever g is. AdamW then moves each parameter by −lr_k·(sign(g) + wd·p), so
    |Δp/lr_k + wd·p| = 1 wherever g ≠ 0, and the lr_k of every step can be read off.
    """
    config = _one_example_config(
        optim__lr=LR,
        optim__warmup_steps=WARMUP,
        optim__weight_decay=WD,
        optim__b1=0.0,
        optim__b2=0.0,
        optim__eps=1e-12,
        optim__grad_clip=0.0,
        train__ema_rates=EMA_RATES,
    )
    return _params_after_each_step(config, ADAMW_STEPS)


def test_ema_is_r_e_plus_one_minus_r_p_for_each_rate():
    seen, _ = _adamw_run()
    params0, ema0 = seen[0]
    for ema in ema0:
        assert_bitwise_equal(ema, params0)  # the EMA starts at the initial parameters
    for (_, ema_before), (params, ema_after) in zip(seen[:-1], seen[1:], strict=True):
        for r, e, new in zip(EMA_RATES, ema_before, ema_after, strict=True):
            expected = jax.tree.map(lambda e, p, r=r: r * e + (1 - r) * p, e, params)
            jax.tree.map(
                lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), new, expected
            )
    final_params, (ema_a, ema_b) = seen[-1]
    a, b, p = (jax.tree.leaves(x)[0] for x in (ema_a, ema_b, final_params))
    assert not np.allclose(a, b) and not np.allclose(a, p)  # the two rates really differ


def test_warm_up_and_decoupled_weight_decay_follow_optax_adamw():
    g = jnp.array([3e-3, -2.0, 5e-1])
    adam = optax.scale_by_adam(b1=0.0, b2=0.0, eps=1e-12)  # memoryless: sign(g)
    np.testing.assert_allclose(adam.update(g, adam.init(g))[0], jnp.sign(g), rtol=1e-6)

    seen, m = _adamw_run()
    expected_lr = LR * np.minimum(np.arange(ADAMW_STEPS), WARMUP) / WARMUP  # linear_schedule
    np.testing.assert_allclose(m["lr"], expected_lr, rtol=1e-6)
    assert_bitwise_equal(seen[1][0], seen[0][0])  # lr_0 = 0: the first step changes nothing
    for k in range(1, ADAMW_STEPS):
        before, after = (jax.tree.leaves(seen[i][0]) for i in (k, k + 1))
        for p, q in zip(before, after, strict=True):
            unit = np.abs((q - p) / expected_lr[k] + WD * p)
            # Δp is a float32 difference of parameters p: its rounding is ~1.2e-7·|p|/lr_k.
            tolerance = 3e-7 * (1 + np.abs(p)) / expected_lr[k]
            assert np.all(np.abs(unit - 1) <= tolerance), (k, np.max(np.abs(unit - 1)))


def test_gradient_clipping_is_by_global_norm_before_adam():
    # With a large ε Adam's first step is −lr·g/(|g| + ε): invertible, so an unclipped run gives
    # g, whose norm must be the logged grad_norm; a clipped run must then move the parameters
    # by optax's clip_by_global_norm → scale_by_adam → scale(−lr) applied to g by hand.
    lr, eps = 0.1, 1e-2
    common = dict(optim__lr=lr, optim__eps=eps, optim__b1=0.0, optim__b2=0.0)
    seen, m = _params_after_each_step(_one_example_config(optim__grad_clip=0.0, **common), 1)
    (p0, _), (p1, _) = seen
    step = jax.tree.map(lambda a, b: b - a, p0, p1)
    grads = jax.tree.map(lambda d: -np.sign(d) * eps * np.abs(d) / (lr - np.abs(d)), step)
    norm = float(optax.tree.norm(grads))
    np.testing.assert_allclose(norm, m["grad_norm"][0], rtol=1e-3)

    clip = norm / 4
    seen, m = _params_after_each_step(_one_example_config(optim__grad_clip=clip, **common), 1)
    (q0, _), (q1, _) = seen
    assert_bitwise_equal(q0, p0)
    np.testing.assert_allclose(m["grad_norm"][0], norm, rtol=1e-3)  # logged before clipping
    tx = optax.chain(
        optax.clip_by_global_norm(clip),
        optax.scale_by_adam(b1=0.0, b2=0.0, eps=eps),
        optax.scale(-lr),
    )
    expected, _ = tx.update(grads, tx.init(grads))
    jax.tree.map(
        lambda d, e: np.testing.assert_allclose(d, e, rtol=2e-3, atol=2e-7),
        jax.tree.map(lambda a, b: b - a, q0, q1),
        expected,
    )


def test_samples_and_evaluations_use_the_first_ema_not_the_raw_parameters(tmp_path):
    # Two runs that differ only in their EMA rates: (0.5,) and (0.9, 0.5). Training does not
    # read the EMA, so their raw parameters are bitwise equal, and so are run A's EMA and run
    # B's second one. Outputs from the raw parameters, or from the last EMA, would then be
    # equal across the runs; outputs from the first EMA differ.
    from ddpm_bs import artifacts, generate

    outputs = {}
    for name, rates in (("a", (0.5,)), ("b", (0.9, 0.5))):
        config = smoke_config(
            mesh__data=1,
            optim__lr=0.05,
            optim__warmup_steps=0,
            train__num_steps=4,
            train__ema_rates=rates,
            train__eval_every=4,
            train__eval_samples=8,
            train__sample_every=4,
        )
        config.sample.num_samples, config.sample.steps = 8, 4
        workdir = tmp_path / name
        state = host_copy(train.train_and_evaluate(config, str(workdir)))
        path = generate.run_sample(config, str(workdir))
        with np.load(path) as f:
            images = f["images"]
        outputs[name] = {
            "state": state,
            "eval_in_training": artifacts.read_metrics(workdir)["eval/digits_fid"][-1, 1],
            "grid": (workdir / "samples" / "step_00000004.png").read_bytes(),
            "mode_sample": images,
            "mode_eval": generate.run_eval(config, str(workdir))["digits_fid"],
        }
    a, b = outputs["a"], outputs["b"]
    assert_bitwise_equal(a["state"].params, b["state"].params)
    assert_bitwise_equal(a["state"].ema_params[0], b["state"].ema_params[1])
    assert a["eval_in_training"] != b["eval_in_training"]
    assert a["grid"] != b["grid"]
    assert not np.array_equal(a["mode_sample"], b["mode_sample"])
    assert a["mode_eval"] != b["mode_eval"]
