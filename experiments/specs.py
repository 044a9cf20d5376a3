"""The experiments of `experiments/REPORT.md`, each a list of runs built for a size.

A run is a named set of config overrides on `configs/digits.py` and one of three kinds:
'train' (train and evaluate digits-FID along the way), 'locate' (the W₂ curve and t_δ of
two digit classes) or 'sample' (score a trained run's EMA with one sampler and step count).
Sizes:

  test  a handful of steps on a one-level U-Net, one value per grid: the test suite runs it;
  cpu   the digits' native 8×8 on the quick-start model, about 1.5 hours for everything on a
        2-core CPU (the figures in REPORT.md so far);
  gpu   digits upsampled to 32×32 on a larger U-Net, sized to the device's time.

The `laws` experiment (and `laws_weighted`) is the protocol that can tell timestep laws apart:
longer training, more seeds, more samples per evaluation (`Size.law_overrides`). Its runs are
paired by seed: `config.seed` sets the initialisation, the data order, the noise and the
evaluation samples, and the timestep key is a separate split of the per-step key
(ddpm_bs/train.py), so two runs of one seed differ only in the law that turns the same random
words into timesteps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

from configs import digits

UNIFORM = {"timesteps.sampler": "uniform"}
BS = {"timesteps.sampler": "bernoulli", "timesteps.p": 0.8, "timesteps.t_delta": 800}
METHODS = {"uniform": UNIFORM, "bs": BS}
# Table 3's samplers. Epsilon Scaling divides ε̂ by b at every step of ancestral (DDPM)
# sampling, as ADM-ES does; b = 1.017 is its CIFAR-10 setting, not tuned for digits.
SAMPLERS = {
    "ddim": {"sample.method": "ddim"},
    "eps_scaling": {
        "sample.method": "ddpm",
        "sample.eps_scale_k": 0.0,
        "sample.eps_scale_b": 1.017,
    },
    "dpm_solver": {"sample.method": "dpm_solver"},
}


@dataclasses.dataclass(frozen=True)
class Size:
    """How big each experiment's runs are, and which grid values they cover."""

    name: str
    overrides: Mapping[str, Any]  # on configs/digits.py, for every training run
    seeds: tuple[int, ...]  # speedup (Tables 1 and 4) and ablations (Figures 5 and 6)
    other_seeds: tuple[int, ...]  # combinations, timestep samplers
    schedules: tuple[str, ...]
    p_values: tuple[float, ...]
    t_fractions: tuple[float, ...]
    weightings: tuple[str, ...]
    timestep_samplers: tuple[str, ...]
    sampler_steps: tuple[int, ...]
    sampler_samples: int  # images scored per (model, sampler, steps)
    ot_pairs: tuple[tuple[int, int], ...]
    ot_overrides: Mapping[str, Any]  # interval.* for the OT-decay curves
    law_overrides: Mapping[str, Any]  # `laws`: on top of `overrides` (steps, evaluations)
    law_seeds: tuple[int, ...]  # `laws`: every law; uniform also runs as many seeds again
    law_schedules: tuple[str, ...]  # `laws`: cosine first; add 'linear' for the second grid
    law_names: tuple[str, ...] | None = None  # `laws`: None for every law in LAWS


# The paper's grids (Figures 5 and 6, Tables 2 and 3) and the class pairs of the OT curves.
_PAPER_GRID = dict(
    schedules=("linear", "cosine"),
    p_values=(0.3, 0.5, 0.7, 0.8, 0.9),
    t_fractions=(0.5, 0.6, 0.7, 0.8, 0.9),
    weightings=("p2", "min_snr", "debias"),
    timestep_samplers=("lognormal", "logit_normal", "loss_aware"),
    sampler_steps=(10, 25, 50, 100),
    ot_pairs=((0, 1), (1, 7), (3, 8), (4, 9), (5, 6)),
)

SIZES = {
    "test": Size(
        name="test",
        overrides={
            # One level, one residual block: compiles in seconds (the plumbing is under test).
            "model.model_channels": 32,
            "model.channel_mult": (1,),
            "model.num_res_blocks": 1,
            "model.attention_resolutions": (),
            "model.num_heads": 1,
            "mesh.data": 1,  # a checkpoint from 1 device writes 3× faster than from 8 on a CPU
            "train.batch_size": 8,
            "train.num_steps": 2,
            "train.eval_every": 1,
            "train.eval_samples": 16,
            "train.num_samples": 8,
            "train.sample_steps": 4,
            "interval.num_images": 40,
            "interval.num_t": 8,
            "interval.num_seeds": 1,
        },
        seeds=(0,),
        other_seeds=(0,),
        schedules=("cosine",),
        p_values=(0.5,),
        t_fractions=(0.6,),
        weightings=("p2",),
        timestep_samplers=("lognormal",),
        sampler_steps=(4,),
        sampler_samples=16,
        ot_pairs=((0, 1),),
        ot_overrides={"interval.num_images": 40, "interval.num_t": 8, "interval.num_seeds": 1},
        law_overrides={"train.num_steps": 3},
        law_seeds=(0, 1),
        law_schedules=("cosine",),
        # the laws with their own plumbing: located t_δ, a state, a located W₂ curve
        law_names=("uniform", "bs_p0.9_auto", "loss_aware", "ot_gap"),
    ),
    "cpu": Size(
        name="cpu",
        overrides={
            "data.image_size": 8,  # configs/digits.py's quick-start U-Net, at the digits' 8×8
            "train.batch_size": 64,
            "train.num_steps": 500,
            "train.eval_every": 100,
            "train.eval_samples": 400,
            "train.num_samples": 100,
            "train.sample_steps": 20,
        },
        seeds=(0, 1, 2),
        other_seeds=(0,),
        **_PAPER_GRID,
        sampler_samples=400,
        ot_overrides={},
        # 4× the steps of the other experiments; digits-FID of 1,797 samples (as many as the
        # digits) at 8 evaluations, drawn in 3 chunks of 599.
        law_overrides={
            "train.num_steps": 2000,
            "train.eval_every": 250,
            "train.eval_samples": 1797,
            "train.num_samples": 599,
        },
        law_seeds=(0, 1, 2, 3, 4),
        law_schedules=("cosine",),
    ),
    "gpu": Size(
        name="gpu",
        overrides={
            "data.image_size": 32,
            "model.model_channels": 64,
            "model.channel_mult": (1, 2, 2),
            "model.num_res_blocks": 2,
            "model.attention_resolutions": (16,),
            "model.num_heads": 4,
            "model.dropout": 0.1,
            "model.dtype": "bfloat16",
            "optim.lr": 1e-3,
            "optim.warmup_steps": 200,
            "train.batch_size": 128,
            "train.num_steps": 3000,
            "train.eval_every": 250,
            "train.eval_samples": 1797,
            "train.num_samples": 600,
            "train.sample_steps": 50,
            "train.ema_rates": (0.999,),
        },
        seeds=(0, 1, 2),
        other_seeds=(0, 1, 2),
        **_PAPER_GRID,
        sampler_samples=1797,
        ot_overrides={"data.image_size": 32},
        law_overrides={},  # 3,000 steps, 12 evaluations of 1,797 samples already
        law_seeds=(0, 1, 2, 3, 4),
        law_schedules=("cosine",),
    ),
}


@dataclasses.dataclass(frozen=True)
class Run:
    """One run of an experiment; `settings` are the overrides that define it."""

    name: str
    kind: str  # 'train', 'locate' or 'sample'
    settings: Mapping[str, Any]
    train: Run | None = None  # kind 'sample': the run whose final EMA is scored

    def config(self, size: Size) -> ml_collections.ConfigDict:
        """The run's config; a 'sample' run's sits on top of its trained run's settings."""
        return config_for(size, {**(self.train.settings if self.train else {}), **self.settings})


def config_for(size: Size, settings: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """configs/digits.py with the size's overrides, then the run's settings."""
    config = digits.get_config()
    config.train.sample_every = 0  # the report shows FID curves; `sample` mode draws grids
    config.train.checkpoint_every = 10**9  # only the final step (and on SIGTERM)
    config.train.log_every = 50
    config.train.keep_checkpoints = 1
    for dotted, value in {**size.overrides, **settings}.items():
        node = config
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def _train(name: str, seed: int, schedule: str = "cosine", **settings: Any) -> Run:
    return Run(name, "train", {"diffusion.schedule": schedule, "seed": seed, **settings})


def ot_decay(size: Size) -> list[Run]:
    """Figure 1b: W₂(t)/W₂(0) between digit classes, its exponential fit and t_δ/T."""
    return [
        Run(
            f"{schedule}/{a}-{b}",
            "locate",
            {
                "diffusion.schedule": schedule,
                "interval.set_a": f"class:{a}",
                "interval.set_b": f"class:{b}",
                **size.ot_overrides,
            },
        )
        for schedule in size.schedules
        for a, b in size.ot_pairs
    ]


def speedup(size: Size) -> list[Run]:
    """Tables 1 and 4: ADM against ADM-BS (p = 0.8, t_δ/T = 0.8) per schedule and seed."""
    return [
        _train(f"{schedule}/{method}/seed{seed}", seed, schedule, **METHODS[method])
        for schedule in size.schedules
        for method in METHODS
        for seed in size.seeds
    ]


def ablations(size: Size) -> list[Run]:
    """Figures 5 and 6: p at t_δ/T = 0.8, t_δ/T at p = 0.8, and the OT-located t_δ."""
    runs = []
    for seed in size.seeds:
        runs.append(_train(f"uniform/seed{seed}", seed, **UNIFORM))
        for p in dict.fromkeys((*size.p_values, 0.8)):
            runs.append(_train(f"p={p:g}/seed{seed}", seed, **{**BS, "timesteps.p": p}))
        for f in dict.fromkeys((*size.t_fractions, 0.8)):
            t_delta = round(f * 1000)
            runs.append(
                _train(f"t/T={f:g}/seed{seed}", seed, **{**BS, "timesteps.t_delta": t_delta})
            )
        runs.append(_train(f"t=auto/seed{seed}", seed, **{**BS, "timesteps.t_delta": "auto"}))
    return runs


def combinations(size: Size) -> list[Run]:
    """Table 2: BS with the P2, Min-SNR and Debias loss weightings, against each alone."""
    return [
        _train(
            f"{weighting}/{method}/seed{seed}",
            seed,
            **METHODS[method],
            **{"loss.weighting": weighting},
        )
        for seed in size.other_seeds
        for weighting in ("none", *size.weightings)
        for method in METHODS
    ]


def samplers(size: Size) -> list[Run]:
    """Table 3: DDIM, Epsilon Scaling and DPM-Solver at each step count, ADM and ADM-BS."""
    runs = []
    for method, law in METHODS.items():
        trained = _train(f"{method}/seed0", 0, **law)
        for sampler, settings in SAMPLERS.items():
            for steps in size.sampler_steps:
                runs.append(
                    Run(
                        f"{method}/{sampler}/{steps}",
                        "sample",
                        {
                            **settings,
                            "sample.steps": steps,
                            "sample.num_samples": size.sampler_samples,
                        },
                        train=trained,
                    )
                )
    return runs


def timestep_samplers(size: Size) -> list[Run]:
    """BS against other non-uniform timestep samplers, at equal steps and batch."""
    settings = {**METHODS, **{name: {"timesteps.sampler": name} for name in size.timestep_samplers}}
    return [
        _train(f"{name}/seed{seed}", seed, **s)
        for seed in size.other_seeds
        for name, s in settings.items()
    ]


# The timestep laws `laws` compares, each as overrides on configs/digits.py.
# loss_aware: its draws stay uniform until every one of the T = 1000 timesteps holds `history`
# losses. history × T ≤ steps × batch is needed for that to happen at all (10 × 1000 ≤
# 2000 × 64 at the cpu size); under uniform draws of 64 per step it happens at step ~364
# (median; 95 % by step ~425, Poisson estimate), so the law is loss-aware for the last 80 % of
# the run. (The first `timestep_samplers` run, 500 steps, was uniform for most of its length.)
LOSS_AWARE_HISTORY = 10
LAWS = {
    "uniform": UNIFORM,
    "bs": BS,  # the paper's p = 0.8, t_δ = 800: uniform but at t_δ (REPORT.md)
    # p = 0.9 on the located t_δ: differs from uniform by |p − t_δ/T| in total variation.
    "bs_p0.9_auto": {**BS, "timesteps.p": 0.9, "timesteps.t_delta": "auto"},
    # Both located: t_δ where W₂ falls below δ·W₂(0), and p = the share of the W₂ curve's mass
    # below t_δ (timesteps.p='auto'), which always exceeds t_δ/T, so the law favours {1..t_δ}.
    "bs_auto": {
        **BS,
        "timesteps.p": "auto",
        "timesteps.t_delta": "auto",
        "timesteps.decay_rate": "auto",
    },
    "logit_normal": {"timesteps.sampler": "logit_normal"},  # SD3's, mean 0, std 1
    "lognormal": {"timesteps.sampler": "lognormal"},  # EDM's σ law on the DDPM grid
    "loss_aware": {"timesteps.sampler": "loss_aware", "timesteps.history": LOSS_AWARE_HISTORY},
    # The W₂-derived laws (ddpm_bs.timesteps) with their defaults: a uniform floor of
    # timesteps.ot_floor and the decay rate of the W₂ curve located in the run's workdir
    # (timesteps.decay_rate='auto').
    "ot_gap": {"timesteps.sampler": "ot_gap"},
    "ot_rate": {"timesteps.sampler": "ot_rate"},
}

# The law `laws_weighted` combines with the weightings, unless the sweep names another
# (--law): the best of the first pass of `laws`. Until that pass has run, logit-normal, the
# only law that moved digits-FID in `timestep_samplers` (one seed, 500 steps).
BEST_LAW = "logit_normal"
LAW_WEIGHTINGS = {
    "none": {"loss.weighting": "none"},
    "min_snr": {"loss.weighting": "min_snr", "loss.min_snr_gamma": 5.0},
    "p2": {"loss.weighting": "p2", "loss.p2_k": 1.0, "loss.p2_gamma": 1.0},
}


def law_seeds(size: Size, law: str) -> tuple[int, ...]:
    """The seeds `law` runs at: uniform runs twice as many, so two disjoint sets of
    `size.law_seeds`' length show how far apart the same law lands (the noise floor)."""
    if law != "uniform":
        return size.law_seeds
    n = len(size.law_seeds)
    return (*size.law_seeds, *range(max(size.law_seeds) + 1, max(size.law_seeds) + 1 + n))


def _law_run(size: Size, name: str, seed: int, schedule: str, **settings: Any) -> Run:
    return _train(name, seed, schedule, **size.law_overrides, **settings)


def laws(size: Size) -> list[Run]:
    """Timestep laws at equal steps and batch, paired by seed, on the longer protocol."""
    names = [n for n in LAWS if size.law_names is None or n in size.law_names]
    return [
        _law_run(size, f"{schedule}/{law}/seed{seed}", seed, schedule, **LAWS[law])
        for schedule in size.law_schedules
        for law in names
        for seed in law_seeds(size, law)
    ]


def laws_weighted(size: Size, law: str = BEST_LAW) -> list[Run]:
    """Table 2's question asked of a law that differs from uniform: `law` and uniform, each
    alone, with Min-SNR-5 and with P2 (those of `size.weightings`), on the `laws` protocol (the
    unweighted runs are the `laws` runs themselves, trained once)."""
    if law not in LAWS or law == "uniform":
        valid = ", ".join(n for n in LAWS if n != "uniform")
        raise ValueError(f"--law={law!r} is not a law to combine; valid: {valid}.")
    weightings = [w for w in LAW_WEIGHTINGS if w == "none" or w in size.weightings]
    return [
        _law_run(
            size,
            f"{schedule}/{weighting}/{name}/seed{seed}",
            seed,
            schedule,
            **LAWS[name],
            **LAW_WEIGHTINGS[weighting],
        )
        for schedule in size.law_schedules
        for weighting in weightings
        for name in ("uniform", law)
        for seed in size.law_seeds
    ]


EXPERIMENTS: dict[str, Callable[..., list[Run]]] = {
    "ot_decay": ot_decay,
    "speedup": speedup,
    "samplers": samplers,
    "ablations": ablations,
    "combinations": combinations,
    "timestep_samplers": timestep_samplers,
    "laws": laws,
    "laws_weighted": laws_weighted,
}
