"""The Inception metrics (FID, sFID, IS), reference statistics, and scoring image sets and sample files."""

from __future__ import annotations

import dataclasses
import functools
import io
import itertools
import logging
import os
import pathlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import jax
import numpy as np
from etils import epath

from ddpm_bs import data, fields, inception, progress
from ddpm_bs.evaluation.digits import digits_fid
from ddpm_bs.evaluation.frechet import (
    _check_stats,
    frechet_distance,
    save_statistics,
    statistics,
    warn_if_few_samples,
)

logger = logging.getLogger(__name__)

METRICS = ("digits_fid", "fid", "sfid", "is")
INCEPTION_METRICS = ("fid", "sfid", "is")  # need sample.inception_weights
REFERENCE_METRICS = ("fid", "sfid")  # need sample.reference_stats too
MIN_SAMPLES = 10_000  # the Inception-FID protocol's minimum (50k for the large datasets)
IS_SPLIT_SIZE = 5_000  # samples per Inception Score split, as guided-diffusion's evaluator
INCEPTION_BATCH = 64  # images per Inception call, as guided-diffusion's evaluator
PROGRESS_BATCHES = 16  # Inception calls between progress updates (and reference-set reads)
REFERENCE_COMMAND = (
    "python -m ddpm_bs.evaluation --reference_stats --config=<config.py> "
    "--inception_weights=<inception_fid.npz> --out=<reference.npz>"
)


def parse_metrics(value: str | Sequence[str], field: str = "sample.metric") -> tuple[str, ...]:
    """'fid,sfid,is' (or a sequence of names) → ('fid', 'sfid', 'is'), each checked, in order."""
    names = value.split(",") if isinstance(value, str) else list(value)
    names = [n.strip() for n in names if n.strip()]
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise ValueError(
            f"{field}={value!r}: unknown metric {unknown[0] if unknown else '(none)'!r}; valid "
            f"metrics: {', '.join(METRICS)} (several: comma-separated, e.g. 'fid,sfid,is')."
        )
    return tuple(dict.fromkeys(names))


def inception_score(logits: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
    """Inception Score, exp(mean_i KL(p(y|x_i) ‖ p(y))), averaged over splits.

    As guided-diffusion's `Evaluator.compute_inception_score`: p(y|x) is the softmax of each
    row, p(y) the mean of p(y|x) over the split, the splits are consecutive runs of
    `split_size` rows (the last may be shorter), and the result is the mean of the per-split
    scores. In float64 from log-softmax, so p = 0 terms are 0 rather than NaN.

    Args:
      logits: [N, K] (Inception's `logits`, K = 1008; or log-probabilities).
      split_size: rows per split.

    Returns:
      The score, in [1, K].
    """
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[0] < 1:
        raise ValueError(f"logits: expected [N ≥ 1, K], got shape {logits.shape}.")
    if split_size < 1:
        raise ValueError(f"split_size must be ≥ 1, got {split_size}.")
    log_p = logits - logits.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    scores = []
    for start in range(0, log_p.shape[0], split_size):
        part = log_p[start : start + split_size]
        p = np.exp(part)
        with np.errstate(divide="ignore"):  # a class no row predicts: log 0 = −inf, masked
            log_marginal = np.log(p.mean(axis=0, keepdims=True))
        kl = (p * np.where(p > 0, part - log_marginal, 0.0)).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores))


class ReferenceStats(NamedTuple):
    """Inception statistics of a reference set (float64)."""

    mu: np.ndarray  # [2048] mean of pool3
    sigma: np.ndarray  # [2048, 2048] covariance of pool3
    mu_s: np.ndarray | None = None  # [2023] mean of the spatial features (sFID)
    sigma_s: np.ndarray | None = None  # [2023, 2023]


def inception_statistics(feats: Mapping[str, np.ndarray]) -> ReferenceStats:
    """ReferenceStats of `inception.features` output (pool3 and spatial)."""
    return ReferenceStats(*statistics(feats["pool3"]), *statistics(feats["spatial"]))


class _Moments:
    """Streaming mean and (N − 1) covariance in float64, shifted by the first batch's mean."""

    def __init__(self):
        self.n, self.shift, self.sum, self.outer = 0, None, None, None

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64)
        if self.shift is None:
            self.shift = x.mean(axis=0)
            self.sum = np.zeros_like(self.shift)
            self.outer = np.zeros((x.shape[1], x.shape[1]))
        d = x - self.shift
        self.n += x.shape[0]
        self.sum += d.sum(axis=0)
        self.outer += d.T @ d

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ValueError(f"need at least 2 images for a covariance, got {self.n}.")
        mean = self.sum / self.n
        sigma = (self.outer - self.n * np.outer(mean, mean)) / (self.n - 1)
        return self.shift + mean, 0.5 * (sigma + sigma.T)


def inception_features(
    images: np.ndarray,
    variables: Any,
    *,
    batch_size: int = INCEPTION_BATCH,
    progress_name: str | None = "Inception features",
) -> dict[str, np.ndarray]:
    """`inception.features` of `images`, reporting progress every `PROGRESS_BATCHES` batches
    under `progress_name` (None: silent). Same values and compiled batch shape as one call."""
    if progress_name is None:
        return inception.features(images, variables, batch_size=batch_size)
    n = images.shape[0]
    bounds = [*range(0, n, PROGRESS_BATCHES * batch_size), n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < batch_size:
        del bounds[-2]  # a tail shorter than a batch joins the piece before it
    parts = []
    with progress.Progress(progress_name, total=n, unit="img") as bar:
        for start, stop in itertools.pairwise(bounds):
            parts.append(inception.features(images[start:stop], variables, batch_size=batch_size))
            bar.update(stop - start)
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def _dataset_batches(
    source: data.Source, spec: data.DataSpec, n: int, chunk: int
) -> Iterator[np.ndarray]:
    """The source's images in order, preprocessed as for training, as uint8 batches.

    Pixels are quantised as samples are (`sampling.to_uint8`: round((x + 1)·127.5)), so
    reference and samples go through the same uint8 → Inception path. Streams in chunks, so
    large datasets need not fit in memory (`data.load_all` holds everything).
    """
    pipeline = data.Pipeline(source, spec, seed=0, global_batch_size=1, rows=(0, 1))
    try:
        for start in range(0, n, chunk):
            images, _ = pipeline.load(np.arange(start, min(start + chunk, n)))
            yield np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)
    finally:
        pipeline.close()


def dataset_reference_statistics(
    data_config: data.DataSpec | Mapping[str, Any] | Any,
    inception_weights: str | os.PathLike | Mapping[str, Any] | None,
    *,
    max_images: int | None = None,
    batch_size: int = INCEPTION_BATCH,
) -> tuple[ReferenceStats, int]:
    """Inception statistics of a dataset: a config's `data` section (or a `data.DataSpec`).

    Every example (or the first `max_images`) in source order, center-cropped and resized
    to `data.image_size` as training sees it, unflipped, quantised to uint8. Digits, image
    folders and prepared tfds datasets alike.

    Returns:
      (ReferenceStats with mu/sigma and mu_s/sigma_s, number of images used).
    """
    spec = (
        data_config
        if isinstance(data_config, data.DataSpec)
        else data.DataSpec.from_config(data_config)
    )
    if max_images is not None and max_images < 2:
        raise ValueError(f"max_images must be ≥ 2 (or None for all), got {max_images}.")
    if not isinstance(inception_weights, Mapping):
        if not inception_weights or not pathlib.Path(inception_weights).is_file():
            raise FileNotFoundError(inception.missing_weights_message(inception_weights))
    source = data.open_source(spec)  # a missing dataset fails before the weights load
    variables = _inception_variables(inception_weights)
    pool, spatial = _Moments(), _Moments()
    n = len(source) if max_images is None else min(max_images, len(source))
    chunk = PROGRESS_BATCHES * batch_size
    with progress.Progress("reference statistics", total=n, unit="img") as bar:
        for images in _dataset_batches(source, spec, n, chunk=chunk):
            feats = inception.features(images, variables, batch_size=batch_size)
            pool.add(feats["pool3"])
            spatial.add(feats["spatial"])
            bar.update(images.shape[0])
    return ReferenceStats(*pool.result(), *spatial.result()), pool.n


def save_reference(path: str | os.PathLike, reference: ReferenceStats, **metadata: Any) -> None:
    """Writes ReferenceStats with guided-diffusion's keys: mu, sigma, mu_s, sigma_s."""
    save_statistics(path, *reference, **metadata)


def _file_key(path: str | os.PathLike) -> tuple[str, int]:
    path = pathlib.Path(path).resolve()
    return str(path), path.stat().st_mtime_ns


@functools.lru_cache(maxsize=2)
def _cached_inception(key: tuple[str, int]) -> Any:
    return jax.device_put(inception.load_params(key[0]))


def _inception_variables(weights: str | os.PathLike | Mapping[str, Any] | None) -> Any:
    """Device-resident Inception variables; a path is loaded once per file version."""
    if isinstance(weights, Mapping):
        return jax.device_put(dict(weights))
    if not weights or not pathlib.Path(weights).is_file():
        raise FileNotFoundError(inception.missing_weights_message(weights))
    return _cached_inception(_file_key(weights))


def _missing_reference_message(path: str | os.PathLike | None) -> str:
    where = f"not found at {str(path)!r}" if path else "not set"
    return (
        f"reference statistics {where} (config field sample.reference_stats): fid and sfid "
        "compare against a reference set. Compute its statistics with "
        f"`{REFERENCE_COMMAND}`, or use one of guided-diffusion's reference batches "
        "(VIRTUAL_*.npz), and set sample.reference_stats to the .npz."
    )


def _read_reference(
    path: pathlib.Path,
) -> tuple[ReferenceStats | None, np.ndarray | None]:
    """(statistics, None) from a stats file; (None, images) from an image-only batch."""
    with np.load(path) as f:
        keys = set(f.files)
        if {"mu", "sigma"} <= keys:
            spatial = {"mu_s", "sigma_s"} <= keys
            return ReferenceStats(
                *_check_stats("", f["mu"], f["sigma"]),
                *(_check_stats("_s", f["mu_s"], f["sigma_s"]) if spatial else (None, None)),
            ), None
        for key in ("arr_0", "images"):
            if key in keys:
                return None, f[key]
    raise ValueError(
        f"sample.reference_stats={str(path)!r}: expected 'mu'/'sigma' (and 'mu_s'/'sigma_s') "
        f"or images in 'arr_0', found keys {sorted(keys)}; make one with `{REFERENCE_COMMAND}`."
    )


def _reference_from_images(images: np.ndarray, variables: Any, where: str, batch_size: int):
    images = inception.check_images(images, where)
    feats = inception_features(
        images, variables, batch_size=batch_size, progress_name="reference features"
    )
    return inception_statistics(feats)


@functools.lru_cache(maxsize=2)
def _cached_reference(key: tuple[str, int], weights: Any, batch_size: int) -> ReferenceStats:
    """`weights`: the weights file's `_file_key`, or the (missing) path as given."""
    stats, images = _read_reference(pathlib.Path(key[0]))
    if stats is not None:
        return stats
    where = f"sample.reference_stats={key[0]!r}"
    if not isinstance(weights, tuple):
        raise FileNotFoundError(
            f"{where} holds only images, whose Inception features need the weights: "
            + inception.missing_weights_message(weights)
        )
    return _reference_from_images(images, _cached_inception(weights), where, batch_size)


def load_reference(
    reference: str | os.PathLike | ReferenceStats,
    *,
    inception_weights: str | os.PathLike | Mapping[str, Any] | None = None,
    batch_size: int = INCEPTION_BATCH,
) -> ReferenceStats:
    """Reference statistics from a stats .npz or a guided-diffusion reference batch.

    Reads `mu`, `sigma` and, when present, `mu_s`, `sigma_s`; a batch with only images
    (`arr_0`, uint8 [N, H, W, C]) has its Inception statistics computed with
    `inception_weights`. Files are read once per version (cached), so a training loop may
    call this at every evaluation.
    """
    if isinstance(reference, ReferenceStats):
        return reference
    if not reference or not pathlib.Path(reference).is_file():
        raise FileNotFoundError(_missing_reference_message(reference))
    if isinstance(inception_weights, Mapping):  # in-memory weights: read, compute, no cache
        stats, images = _read_reference(pathlib.Path(reference))
        if stats is not None:
            return stats
        where = f"sample.reference_stats={str(reference)!r}"
        return _reference_from_images(
            images, _inception_variables(inception_weights), where, batch_size
        )
    weights = str(inception_weights) if inception_weights else None
    if weights and pathlib.Path(weights).is_file():
        weights = _file_key(weights)
    return _cached_reference(_file_key(reference), weights, batch_size)


def _check_reference_dims(reference: ReferenceStats, metrics: Sequence[str], where: str) -> None:
    if "fid" in metrics and reference.mu.shape != (inception.POOL_DIM,):
        raise ValueError(
            f"{where}: its mu has shape {reference.mu.shape}, but fid needs Inception pool3 "
            f"statistics [{inception.POOL_DIM}] (digits-FID statistics have 128); make them "
            f"with `{REFERENCE_COMMAND}`."
        )
    if "sfid" in metrics:
        if reference.mu_s is None:
            raise ValueError(
                f"{where}: has no 'mu_s'/'sigma_s' (spatial statistics), which sfid needs; "
                f"recompute it with `{REFERENCE_COMMAND}` (it writes both), or drop sfid from "
                "sample.metric."
            )
        if reference.mu_s.shape != (inception.SPATIAL_DIM,):
            raise ValueError(
                f"{where}: its mu_s has shape {reference.mu_s.shape}, but sfid needs "
                f"[{inception.SPATIAL_DIM}] (mixed_6/conv, 17·17·7)."
            )


def check_metric_inputs(
    metrics: str | Sequence[str],
    inception_weights: str | os.PathLike | Mapping[str, Any] | None = None,
    reference: str | os.PathLike | ReferenceStats | None = None,
) -> tuple[str, ...]:
    """Parses `metrics` and checks that the files they need exist; cheap, raises early.

    Returns:
      The metric names.
    """
    metrics = parse_metrics(metrics)
    if any(m in INCEPTION_METRICS for m in metrics) and not isinstance(inception_weights, Mapping):
        if not inception_weights or not pathlib.Path(inception_weights).is_file():
            raise FileNotFoundError(inception.missing_weights_message(inception_weights))
    if any(m in REFERENCE_METRICS for m in metrics) and not isinstance(reference, ReferenceStats):
        if not reference or not pathlib.Path(reference).is_file():
            raise FileNotFoundError(_missing_reference_message(reference))
    return metrics


def evaluate_images(
    images: np.ndarray,
    *,
    metrics: str | Sequence[str],
    inception_weights: str | os.PathLike | Mapping[str, Any] | None = None,
    reference: str | os.PathLike | ReferenceStats | None = None,
    batch_size: int = INCEPTION_BATCH,
    is_split_size: int = IS_SPLIT_SIZE,
    progress_name: str | None = "Inception features",
) -> dict[str, Any]:
    """Scores samples with any of `METRICS`; the function for a training loop to call.

    Everything is checked before any feature is computed (metric names, image shape and
    dtype, weights and reference files, reference dimensions). Weights and reference files
    are read once per file version and kept on the device; the network compiles once per
    batch shape, so calling this at every evaluation step costs only the forward passes.
    Call it on one process with all samples (gather them first on multi-host runs).

    Args:
      images: uint8 [N, H, W, C ∈ {1, 3}] samples (`sampling.to_uint8` of the sampler's
        output); uint8 because the FID protocol scores quantised images.
      metrics: names from `METRICS`, a sequence or one comma-separated string.
      inception_weights: the converted weights' .npz path (`sample.inception_weights`) or
        variables from `inception.load_params`; needed by fid, sfid and is.
      reference: for fid/sfid: a stats .npz or guided-diffusion reference batch
        (`sample.reference_stats`), or ReferenceStats. digits_fid always compares with the
        1,797 digits.
      batch_size: images per Inception call.
      is_split_size: samples per Inception Score split.
      progress_name: the name the samples' Inception pass logs its progress under (rate,
        time left); None logs nothing.

    Returns:
      {metric: float for each metric, 'num_samples': N}. fid/sfid log a warning below
      `MIN_SAMPLES` samples.
    """
    metrics = check_metric_inputs(metrics, inception_weights, reference)
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(
            f"images: expected uint8 samples, got dtype {images.dtype}; quantise them with "
            "`sampling.to_uint8` (the FID protocol scores uint8 images)."
        )
    images = inception.check_images(images)
    needs_inception = any(m in INCEPTION_METRICS for m in metrics)
    if any(m in REFERENCE_METRICS for m in metrics) and images.shape[0] < 2:
        raise ValueError(f"images: fid/sfid need at least 2 samples, got {images.shape[0]}.")
    variables = _inception_variables(inception_weights) if needs_inception else None
    ref = None
    if any(m in REFERENCE_METRICS for m in metrics):
        ref = load_reference(reference, inception_weights=inception_weights, batch_size=batch_size)
        where = f"sample.reference_stats={str(reference)!r}"
        _check_reference_dims(ref, metrics, "reference" if reference is ref else where)
    result: dict[str, Any] = {}
    feats = {}
    if needs_inception:
        feats = inception_features(
            images, variables, batch_size=batch_size, progress_name=progress_name
        )
    for metric in metrics:
        if metric == "digits_fid":
            result[metric] = digits_fid(images)
        elif metric == "fid":
            warn_if_few_samples(images.shape[0], MIN_SAMPLES, "fid")
            result[metric] = frechet_distance(*statistics(feats["pool3"]), ref.mu, ref.sigma)
        elif metric == "sfid":
            warn_if_few_samples(images.shape[0], MIN_SAMPLES, "sfid")
            mu_s, sigma_s = statistics(feats["spatial"])
            result[metric] = frechet_distance(mu_s, sigma_s, ref.mu_s, ref.sigma_s)
        elif metric == "is":
            result[metric] = inception_score(feats["logits"], is_split_size)
    result["num_samples"] = int(images.shape[0])
    return result


# --------------------------------------------------------------------------------------------
# Samples on disk


def load_samples(npz_path: str | os.PathLike) -> np.ndarray:
    """Images from a samples .npz (local or gs://…): key `images` (ours) or `arr_0`
    (guided-diffusion's)."""
    path = epath.Path(npz_path)
    if not path.is_file():
        raise FileNotFoundError(f"npz_path: samples file not found: {str(path)!r}.")
    with np.load(io.BytesIO(path.read_bytes())) as f:
        for key in ("images", "arr_0"):
            if key in f.files:
                return f[key]
        keys = sorted(f.files)
    raise ValueError(f"npz_path: {str(path)!r} has no 'images' (or 'arr_0') array; keys {keys}.")


def evaluate_samples(
    npz_path: str | os.PathLike,
    *,
    metric: str | Sequence[str] = "digits_fid",
    inception_weights: str | os.PathLike | Mapping[str, Any] | None = None,
    reference: str | os.PathLike | ReferenceStats | None = None,
    batch_size: int = INCEPTION_BATCH,
) -> dict[str, Any]:
    """Scores a samples .npz (key `images` or `arr_0`, uint8 [N, H, W, C]) with `METRICS`.

    Args:
      npz_path: the samples file.
      metric: one name, several comma-separated ('fid,sfid,is'), or a sequence.
      inception_weights, reference, batch_size: as `evaluate_images`.

    Returns:
      {metric: float for each metric, 'num_samples': N}.
    """
    metrics = check_metric_inputs(metric, inception_weights, reference)
    images = load_samples(npz_path)
    return evaluate_images(
        images,
        metrics=metrics,
        inception_weights=inception_weights,
        reference=reference,
        batch_size=batch_size,
    )


def metric_names(value: Any) -> list[str] | None:
    """sample.metric as a list of names: one name, a comma-separated string, or a tuple."""
    if isinstance(value, str):
        names = [name.strip() for name in value.split(",")]
    elif isinstance(value, (tuple, list)) and all(isinstance(v, str) for v in value):
        names = [name.strip() for name in value]
    else:
        return None
    return names if names and all(names) else None


def _metric_field(value: Any) -> str | None:
    names = metric_names(value)
    if names is not None and all(name in METRICS for name in names):
        return None
    return (
        f"must be one of {fields.listing(METRICS)}, or a comma-separated list of them "
        "(e.g. 'digits_fid')"
    )


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    """The `sample` section's metric fields: what mode=eval and in-training evaluation score."""

    metric: str = "digits_fid"
    inception_weights: str | None = None
    reference_stats: str | None = None

    RULES: ClassVar[dict[str, fields.Check]] = {
        "metric": _metric_field,
        "inception_weights": fields.path,
        "reference_stats": fields.path,
    }

    @classmethod
    def from_config(cls, cfg: Any, *, others: tuple[str, ...] = ()) -> MetricSpec:
        """Reads and checks the fields; `others` are the section's fields another spec reads.

        The Inception metrics need converted weights and, for FID/sFID, reference statistics
        (nothing is downloaded): a metric without its file fails here, naming the field.
        """
        values = fields.read(
            cfg,
            "sample",
            cls.RULES,
            optional=("inception_weights", "reference_stats"),
            others=others,
        )
        names = metric_names(values["metric"])
        needs = (("inception_weights", INCEPTION_METRICS), ("reference_stats", REFERENCE_METRICS))
        for field, metrics in needs:
            wanting = [name for name in names if name in metrics]
            if wanting and not values.get(field):
                fields.fail(
                    f"sample.{field}",
                    values.get(field),
                    f"sample.metric={', '.join(wanting)} needs it (a path to an .npz)",
                    f"set --config.sample.{field}=<file.npz> (see ddpm_bs.evaluation), or choose "
                    "sample.metric=digits_fid",
                )
        return cls(**values)
