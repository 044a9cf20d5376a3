"""Paired comparison of timestep laws over seeds: per-run scores, differences, bootstrap intervals.

Every score is computed per run from its digits-FID curve (lower is better) against a target
taken from the reference run of the same seed (uniform's final digits-FID), then compared as the
difference law − reference at each seed. Seeds are the unit of replication: the interval is a
percentile bootstrap of the mean difference over seeds (`RESAMPLES` resamples with replacement,
generator seeded with `BOOTSTRAP_SEED`, central `LEVEL`). A difference counts only when its
interval excludes zero and at least `MIN_SEEDS` seeds are paired; with fewer it is no verdict.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
LEVEL = 0.95
MIN_SEEDS = 5
# name → +1 if larger is better, −1 if smaller is better
METRICS = {"final_fid": -1, "auc": -1, "speedup": +1}


def area_under_curve(steps: Sequence[float], values: Sequence[float]) -> float:
    """The trapezoid area under values(steps) divided by the step range: a mean value over
    training, in the values' units (for FID: lower means better sooner as well as at the end)."""
    steps, values = np.asarray(steps, np.float64), np.asarray(values, np.float64)
    if steps.size < 2 or steps[-1] <= steps[0]:
        raise ValueError(f"an area needs ≥ 2 increasing steps, got {steps.tolist()}.")
    return float(np.sum((values[1:] + values[:-1]) / 2 * np.diff(steps)) / (steps[-1] - steps[0]))


def steps_to_reach(steps: Sequence[float], values: Sequence[float], target: float) -> float | None:
    """The step at which the curve first comes down to `target`, linearly interpolated between
    the last evaluation above it and the first at or below it; None if it never does.

    A curve at or below the target at its first evaluation gives that step (there is no earlier
    point to interpolate from, so the step is an upper bound and a speedup from it a lower bound).
    """
    for i, (step, value) in enumerate(zip(steps, values, strict=True)):
        if value <= target:
            if i == 0:
                return float(step)
            s0, v0 = steps[i - 1], values[i - 1]
            return float(s0 + (v0 - target) / (v0 - value) * (step - s0))
    return None


def run_scores(steps: Sequence[float], values: Sequence[float], target: float) -> dict:
    """One run's scores: 'final_fid', 'auc', 'steps' to `target` (None if never) and 'speedup',
    the last step over those steps (None if never): 2.0 means the target came at half the run."""
    reached = steps_to_reach(steps, values, target)
    return {
        "final_fid": float(values[-1]),
        "auc": area_under_curve(steps, values),
        "steps": reached,
        "speedup": float(steps[-1]) / reached if reached else None,
    }


def bootstrap_interval(
    values: Sequence[float],
    resamples: int = RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = LEVEL,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (one per seed).

    The values are sorted first, so the interval depends on the set of values only, not on
    the order the seeds come in.
    """
    values = np.sort(np.asarray(values, np.float64))
    if values.size == 0:
        raise ValueError("a bootstrap interval needs at least one value.")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(resamples, values.size))].mean(axis=1)
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(lo), float(hi)


@dataclasses.dataclass(frozen=True)
class Difference:
    """law − reference of one score over the seeds both have."""

    metric: str
    seeds: tuple[int, ...]  # paired seeds with a value on both sides
    missing: tuple[int, ...]  # paired seeds where either side has no value (never reached)
    mean: float | None
    interval: tuple[float, float] | None

    @property
    def effect(self) -> str:
        """'better', 'worse' or 'no difference' (interval holds 0); '' when not a verdict:
        fewer than MIN_SEEDS seeds, or a seed without a value."""
        if self.interval is None or self.missing or len(self.seeds) < MIN_SEEDS:
            return ""
        lo, hi = self.interval
        if lo <= 0 <= hi:
            return "no difference"
        return "better" if (lo > 0) == (METRICS[self.metric] > 0) else "worse"


def paired_difference(
    law: Mapping[int, Mapping], reference: Mapping[int, Mapping], metric: str
) -> Difference:
    """law[seed][metric] − reference[seed][metric] over their common seeds, with its interval."""
    seeds = sorted(set(law) & set(reference))
    have = [s for s in seeds if law[s][metric] is not None and reference[s][metric] is not None]
    diffs = [law[s][metric] - reference[s][metric] for s in have]
    return Difference(
        metric=metric,
        seeds=tuple(have),
        missing=tuple(s for s in seeds if s not in have),
        mean=float(np.mean(diffs)) if diffs else None,
        interval=bootstrap_interval(diffs) if diffs else None,
    )


def compare(
    curves: Mapping[int, tuple[Sequence[float], Sequence[float]]],
    reference: Mapping[int, tuple[Sequence[float], Sequence[float]]],
) -> tuple[dict[int, dict], dict[int, dict], dict[str, Difference]]:
    """Scores a law's runs and the reference's (seed → (steps, FID)), each against the
    reference's final FID at the same seed, and their paired differences per metric.

    Returns (law scores per seed, reference scores per seed, metric → Difference).
    """
    seeds = sorted(set(curves) & set(reference))
    targets = {s: float(reference[s][1][-1]) for s in seeds}
    law = {s: run_scores(*curves[s], targets[s]) for s in seeds}
    ref = {s: run_scores(*reference[s], targets[s]) for s in seeds}
    return law, ref, {m: paired_difference(law, ref, m) for m in METRICS}
