"""Sample quality: Fréchet distances between feature statistics, and an offline digits-FID.

FID (Heusel et al., 2017) compares two Gaussians fitted to network features:

    FID = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^{1/2}).

Protocol (what makes an FID comparable with the papers'; a mismatch in any of these is the
usual reason an FID does not match a published one): reference statistics come from the
full training set, samples are compared at the training resolution, and a warning is logged
when fewer samples are used than the protocol asks for (`MIN_SAMPLES`, 10,000 for the
Inception metrics; the reference set size, 1,797, for digits-FID), because FID estimated
from few samples is biased high.

Digits-FID is the offline metric of the built-in quick start: the same formula over the
128-d penultimate features of a small CNN (`DigitsNet`) trained by this module as a digit
classifier on 80% of scikit-learn's digits (held-out accuracy stored with the weights). The
weights ship in `ddpm_bs/assets/digits_features.npz` and are rebuilt, deterministically, by

    python -m ddpm_bs.evaluation --train_digits_features --out=ddpm_bs/assets/digits_features.npz

Digits-FID values are only comparable with each other (same weights, same 1,797-image
reference), never with Inception FIDs.

The Inception metrics use the FID Inception of `ddpm_bs.inception` (pytorch-fid's port of the
TF 2015 graph; weights converted once, never downloaded):

* `fid`: the formula above over pool3 features [2048] (Heusel et al., 2017).
* `sfid`: the same over the spatial features [2023] of `mixed_6/conv` (Nash et al., 2021), as
  guided-diffusion's evaluator computes it.
* `is`: the Inception Score (Salimans et al., 2016), exp(E_x KL(p(y|x) ‖ p(y))) with the
  softmax over all 1008 logits, averaged over consecutive splits of 5,000 samples as
  guided-diffusion's evaluator does (`IS_SPLIT_SIZE`; fewer samples make one split).

Reference statistics (mu, sigma of pool3; mu_s, sigma_s of the spatial features) are computed
over a config's training data once and saved, or read from guided-diffusion's reference
batches (`VIRTUAL_*.npz`, which carry them beside `arr_0`). Inception feature passes (of
samples, of a reference set) log their progress, rate and time left (`ddpm_bs.progress`):

    python -m ddpm_bs.evaluation --reference_stats --config=configs/cifar10_adm.py \
        --inception_weights=inception_fid.npz --out=cifar10_reference.npz
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import logging
import os
import pathlib
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import traverse_util

from ddpm_bs import data, inception, progress

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
DIGITS_FEATURES_PATH = pathlib.Path(__file__).resolve().parent / "assets" / "digits_features.npz"
DIGITS_SIZE = 8  # digits-FID compares images at 8×8, one channel
NUM_DIGITS = 1797  # scikit-learn's digits: the reference set of digits_fid
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as PIL's convert("L") and data.py use
_PARAMS_PREFIX = "params/"


# --------------------------------------------------------------------------------------------
# Fréchet distance


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of a feature set, in float64.

    Args:
      features: [N, D], N ≥ 2.

    Returns:
      mu [D] and sigma [D, D], the unbiased (N − 1) sample covariance, as `np.cov`.
    """
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f"features: expected a [N, D] array, got shape {features.shape}.")
    if features.shape[0] < 2:
        raise ValueError(f"features: need at least 2 rows for a covariance, got {features.shape}.")
    if not np.all(np.isfinite(features)):
        raise ValueError("features: contains NaN or inf.")
    mu = features.mean(axis=0)
    centered = features - mu[None, :]
    sigma = centered.T @ centered / (features.shape[0] - 1)
    return mu, sigma


def _check_stats(name: str, mu: np.ndarray, sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu = np.asarray(mu, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    if mu.ndim != 1:
        raise ValueError(f"mu{name}: expected a [D] vector, got shape {mu.shape}.")
    if sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(
            f"sigma{name}: expected shape {(mu.shape[0], mu.shape[0])} to match mu{name}, "
            f"got {sigma.shape}."
        )
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
        raise ValueError(f"mu{name}/sigma{name}: contain NaN or inf.")
    return mu, sigma


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric PSD square root via eigh; round-off negative eigenvalues are clipped to 0."""
    matrix = 0.5 * (matrix + matrix.T)
    eigvals, eigvecs = np.linalg.eigh(matrix)
    return (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))[None, :]) @ eigvecs.T


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    Tr((Σ₁Σ₂)^{1/2}) is computed in the symmetric form Tr((Σ₁^{1/2} Σ₂ Σ₁^{1/2})^{1/2}): the
    two matrices are similar, and the second is symmetric PSD, so its trace root is the sum
    of the square roots of its (clipped ≥ 0) eigenvalues from `eigh`. Unlike pytorch-fid's
    `scipy.linalg.sqrtm(Σ₁Σ₂)` of a non-symmetric product, this needs no ε·I retry for
    singular covariances (N < D, dead features), never produces imaginary parts to drop, and
    is symmetric in its arguments up to round-off. On well-conditioned inputs both agree to
    ~1e-9 relative (tested).

    Args:
      mu1, mu2: [D] means.
      sigma1, sigma2: [D, D] covariances.

    Returns:
      The distance, a float ≥ 0 (tiny negative round-off is clipped to 0).
    """
    mu1, sigma1 = _check_stats("1", mu1, sigma1)
    mu2, sigma2 = _check_stats("2", mu2, sigma2)
    if mu1.shape != mu2.shape:
        raise ValueError(f"mu1 and mu2: feature sizes differ, {mu1.shape} vs {mu2.shape}.")
    diff = mu1 - mu2
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    eigvals = np.linalg.eigvalsh(0.5 * (middle + middle.T))
    tr_covmean = np.sqrt(np.clip(eigvals, 0.0, None)).sum()
    fid = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean
    return float(max(fid, 0.0))


def save_statistics(
    path: str | os.PathLike,
    mu: np.ndarray,
    sigma: np.ndarray,
    mu_s: np.ndarray | None = None,
    sigma_s: np.ndarray | None = None,
    **metadata: Any,
) -> None:
    """Writes reference statistics as an .npz: `mu` [D], `sigma` [D, D], optionally the
    spatial `mu_s` [D_s], `sigma_s` [D_s, D_s] (guided-diffusion's key names), and metadata
    scalars or strings (ignored when reading)."""
    arrays = dict(zip(("mu", "sigma"), _check_stats("", mu, sigma), strict=True))
    if (mu_s is None) != (sigma_s is None):
        raise ValueError("mu_s and sigma_s: pass both or neither.")
    if mu_s is not None:
        arrays.update(zip(("mu_s", "sigma_s"), _check_stats("_s", mu_s, sigma_s), strict=True))
    arrays.update({k: np.asarray(v) for k, v in metadata.items()})
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:  # a file object keeps np.savez from appending ".npz"
        np.savez(f, **arrays)


def load_statistics(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Reads `mu`, `sigma` from an .npz written by `save_statistics`.

    guided-diffusion's evaluator reference batches (`VIRTUAL_*.npz`) also hold `mu` and
    `sigma` (Inception pool features) beside the images in `arr_0`, and are read the same
    way. An .npz holding only images cannot be used: its features must be computed first.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"statistics file not found: {str(path)!r}.")
    with np.load(path) as f:
        keys = set(f.files)
        if {"mu", "sigma"} <= keys:
            return _check_stats("", f["mu"], f["sigma"])
    if "arr_0" in keys or "images" in keys:
        raise ValueError(
            f"{str(path)!r} holds images (keys {sorted(keys)}) but no 'mu'/'sigma': compute "
            "their features first (Inception: `load_reference(path, inception_weights=...)`; "
            "digits: `statistics(digits_features(images))`) and save them with "
            "`save_statistics`."
        )
    raise ValueError(f"{str(path)!r}: expected keys 'mu' and 'sigma', found {sorted(keys)}.")


def warn_if_few_samples(num_samples: int, minimum: int, metric: str) -> bool:
    """Logs a warning when `num_samples < minimum`; returns whether it warned."""
    if num_samples < minimum:
        logger.warning(
            "%s from %d samples, fewer than the protocol's %d: FID estimated on few samples "
            "is biased high, so compare only numbers computed on equal sample counts.",
            metric,
            num_samples,
            minimum,
        )
        return True
    return False


# --------------------------------------------------------------------------------------------
# The digits feature network


class DigitsNet(nn.Module):
    """A small digit classifier whose penultimate layer gives the digits-FID features.

    [B, 8, 8, 1] in [−1, 1] → conv3×3(32) → ReLU → conv3×3(32) → ReLU → 2×2 average pool →
    dense(`features`) = the features (pre-activation, so no dead-ReLU zero-variance
    coordinates) → ReLU → dense(10) logits.
    """

    features: int = 128
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Returns (logits [B, num_classes], features [B, features])."""
        x = nn.relu(nn.Conv(32, (3, 3), name="conv1")(x))
        x = nn.relu(nn.Conv(32, (3, 3), name="conv2")(x))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        feats = nn.Dense(self.features, name="features")(x)
        logits = nn.Dense(self.num_classes, name="logits")(nn.relu(feats))
        return logits, feats


@functools.cache
def _digits_dataset() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as the diffusion model sees them: [1797, 8, 8, 1] in [−1, 1], labels.

    Loaded once per process; the arrays are read-only.
    """
    spec = data.DataSpec(name="digits", image_size=DIGITS_SIZE, channels=1, random_flip=False)
    images, labels = data.load_all(spec, with_labels=True)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def _split(num: int, seed: int, train_fraction: float = 0.8) -> tuple[np.ndarray, np.ndarray]:
    order = np.asarray(jax.random.permutation(jax.random.PRNGKey(seed), num))
    cut = int(round(train_fraction * num))
    return np.sort(order[:cut]), np.sort(order[cut:])


def _shift(images: jax.Array, key: jax.Array) -> jax.Array:
    """Random translation by −1..1 pixel per axis, padding with the background value −1."""
    batch = images.shape[0]
    padded = jnp.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-1.0)
    offsets = jax.random.randint(key, (batch, 2), 0, 3)

    def crop(image, offset):
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), images.shape[1:])

    return jax.vmap(crop)(padded, offsets)


def train_digits_features(
    seed: int = 0,
    steps: int = 300,
    batch_size: int = 128,
    learning_rate: float = 2e-3,
) -> dict[str, Any]:
    """Trains `DigitsNet` on a fixed 80% of the digits; deterministic for a given seed.

    The split is a `jax.random.permutation` of the 1,797 digits keyed by `seed`;
    `digits_heldout_accuracy(params, seed)` scores the other 20%. Augmentation: random
    ±1-pixel shifts. Optimizer: AdamW with cosine decay. The whole loop is one `lax.scan`,
    so the result is a pure function of the arguments.

    Returns:
      params, a nested dict of float32 arrays.
    """
    images, labels = _digits_dataset()
    train_idx, test_idx = _split(len(labels), seed)
    x_train, y_train = jnp.asarray(images[train_idx]), jnp.asarray(labels[train_idx])
    model = DigitsNet()
    key = jax.random.PRNGKey(seed)
    init_key, train_key = jax.random.split(key)
    params = model.init(init_key, x_train[:1])["params"]
    tx = optax.adamw(optax.cosine_decay_schedule(learning_rate, steps), weight_decay=1e-4)
    opt_state = tx.init(params)

    def loss_fn(params, x, y):
        logits, _ = model.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def step(carry, i):
        params, opt_state = carry
        batch_key, shift_key = jax.random.split(jax.random.fold_in(train_key, i))
        idx = jax.random.randint(batch_key, (batch_size,), 0, x_train.shape[0])
        x = _shift(x_train[idx], shift_key)
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y_train[idx])
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    (params, _), losses = jax.jit(lambda p, o: jax.lax.scan(step, (p, o), jnp.arange(steps)))(
        params, opt_state
    )
    logger.info("digits features: final training loss %.4f", float(losses[-1]))
    return jax.device_get(params)


def digits_heldout_accuracy(params: Mapping[str, Any], seed: int = 0) -> float:
    """Classification accuracy of `DigitsNet` params on the 20% that seed `seed` held out."""
    images, labels = _digits_dataset()
    _, test_idx = _split(len(labels), seed)
    logits, _ = DigitsNet().apply({"params": params}, jnp.asarray(images[test_idx]))
    return float(np.mean(np.asarray(jnp.argmax(logits, axis=-1)) == labels[test_idx]))


def save_digits_features(
    path: str | os.PathLike, params: Mapping[str, Any], *, heldout_accuracy: float, seed: int
) -> None:
    """Writes params as a flat .npz (`params/conv1/kernel`, ...) plus metadata scalars."""
    flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
    arrays = {_PARAMS_PREFIX + k: np.asarray(v, dtype=np.float32) for k, v in flat.items()}
    arrays["heldout_accuracy"] = np.float64(heldout_accuracy)
    arrays["seed"] = np.int64(seed)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        np.savez_compressed(f, **arrays)


def load_digits_features(path: str | os.PathLike = DIGITS_FEATURES_PATH) -> dict[str, Any]:
    """Reads the params written by `save_digits_features`."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"digits feature weights not found: {str(path)!r}; rebuild them with "
            "`python -m ddpm_bs.evaluation --train_digits_features --out=<path>`."
        )
    with np.load(path) as f:
        flat = {k[len(_PARAMS_PREFIX) :]: f[k] for k in f.files if k.startswith(_PARAMS_PREFIX)}
    if not flat:
        raise ValueError(f"{str(path)!r}: no 'params/...' arrays; not a digits feature file.")
    return traverse_util.unflatten_dict(flat, sep="/")


@functools.lru_cache(maxsize=1)
def _shipped_feature_fn():
    params = jax.device_put(load_digits_features(DIGITS_FEATURES_PATH))
    apply = jax.jit(lambda x: DigitsNet().apply({"params": params}, x)[1])
    return apply


def _to_digits_input(images: np.ndarray) -> np.ndarray:
    """uint8 or float [N, H, W, C] → float32 [N, 8, 8, 1] in [−1, 1]."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.shape[0] < 1:
        raise ValueError(
            f"images: expected [N, H, W, C] with N ≥ 1 and C in (1, 3), got shape {images.shape}."
        )
    if images.dtype == np.uint8:
        x = images.astype(np.float32) / 127.5 - 1.0
    elif np.issubdtype(images.dtype, np.floating):
        x = images.astype(np.float32)
        if not np.all(np.isfinite(x)):
            raise ValueError("images: contains NaN or inf.")
        lo, hi = float(x.min()), float(x.max())
        if lo < -1.01 or hi > 1.01:
            raise ValueError(
                f"images: float images must lie in [−1, 1], got values in [{lo:.3g}, {hi:.3g}]; "
                "clip them, or pass uint8 for 0..255 pixels."
            )
    else:
        raise ValueError(f"images: expected uint8 or float pixels, got dtype {images.dtype}.")
    if x.shape[-1] == 3:
        x = np.tensordot(x, np.asarray(_LUMA, np.float32), axes=([3], [0]))[..., None]
    if x.shape[1:3] != (DIGITS_SIZE, DIGITS_SIZE):
        target = (x.shape[0], DIGITS_SIZE, DIGITS_SIZE, 1)
        x = np.asarray(jax.image.resize(x, target, method="linear", antialias=True))
    return x


def digits_features(images: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Penultimate `DigitsNet` features of images, with the shipped weights.

    Args:
      images: [N, H, W, C], uint8 0..255 or float in [−1, 1] (a float outside [−1.01, 1.01]
        is an error: clip samples first). C = 3 is converted to luma (ITU-R 601, as the data
        pipeline does); H×W ≠ 8×8 is resized to 8×8 with an antialiased (triangle) filter.
      batch_size: images per forward pass.

    Returns:
      features [N, 128] float64.
    """
    x = _to_digits_input(images)
    apply = _shipped_feature_fn()
    chunks = []
    for start in range(0, x.shape[0], batch_size):
        chunk = x[start : start + batch_size]
        pad = batch_size - chunk.shape[0] if x.shape[0] > batch_size else 0
        if pad:  # keep one compiled shape for the tail chunk
            chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
        out = np.asarray(apply(jnp.asarray(chunk)), dtype=np.float64)
        chunks.append(out[: out.shape[0] - pad])
    return np.concatenate(chunks)


@functools.lru_cache(maxsize=1)
def _digits_reference() -> tuple[np.ndarray, np.ndarray]:
    images, _ = _digits_dataset()
    return statistics(digits_features(images))


def digits_reference_statistics() -> tuple[np.ndarray, np.ndarray]:
    """(mu [128], sigma [128, 128]) of all 1,797 digits, computed once and cached."""
    mu, sigma = _digits_reference()
    return mu.copy(), sigma.copy()


def digits_fid(
    images: np.ndarray,
    reference: tuple[np.ndarray, np.ndarray] | str | os.PathLike | None = None,
) -> float:
    """Digits-FID of images against the 1,797 training digits (or `reference`).

    Args:
      images: [N, H, W, C] samples, as `digits_features` takes them; N ≥ 2.
      reference: None for all of scikit-learn's digits; a (mu, sigma) pair; or the path of
        an .npz written by `save_statistics`.

    Returns:
      The Fréchet distance between the feature Gaussians. Logs a warning when N is below the
      reference set size (1,797): the estimate is biased high for few samples.
    """
    if reference is None:
        mu_ref, sigma_ref = _digits_reference()
    elif isinstance(reference, (str, os.PathLike)):
        mu_ref, sigma_ref = load_statistics(reference)
    else:
        mu_ref, sigma_ref = reference
    feats = digits_features(images)
    if feats.shape[0] < 2:
        raise ValueError(f"images: need at least 2 images for a covariance, got {feats.shape[0]}.")
    warn_if_few_samples(feats.shape[0], NUM_DIGITS, "digits_fid")
    mu, sigma = statistics(feats)
    return frechet_distance(mu, sigma, mu_ref, sigma_ref)


# --------------------------------------------------------------------------------------------
# Inception metrics: FID, sFID, IS


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


def _read_reference(path: pathlib.Path) -> tuple[ReferenceStats | None, np.ndarray | None]:
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


def _main(argv: Sequence[str]) -> None:
    from absl import app, flags

    del argv
    f = flags.FLAGS
    config = f["config"].value
    sample = config.sample if config is not None else None
    weights = f.inception_weights or (sample.inception_weights if sample else None)
    if f.train_digits_features:
        out = f.out or str(DIGITS_FEATURES_PATH)
        params = train_digits_features(seed=f.seed, steps=f.steps)
        accuracy = digits_heldout_accuracy(params, seed=f.seed)
        save_digits_features(out, params, heldout_accuracy=accuracy, seed=f.seed)
        print(f"wrote {out} ({os.path.getsize(out)} bytes); held-out accuracy {accuracy:.4f}")
    if f.reference_stats:
        if config is None or not f.out:
            raise app.UsageError("--reference_stats needs --config=<config.py> and --out=<.npz>")
        reference, n = dataset_reference_statistics(
            config.data, weights, max_images=f.max_images, batch_size=f.batch_size
        )
        save_reference(f.out, reference, num_images=n, data=json.dumps(config.data.to_dict()))
        print(json.dumps({"reference_stats": f.out, "num_images": n, "data": config.data.name}))
    if f.samples:
        reference = f.reference or (sample.reference_stats if sample else None)
        metric = f.metric or (sample.metric if sample else "digits_fid")
        result = evaluate_samples(
            f.samples,
            metric=metric,
            inception_weights=weights,
            reference=reference,
            batch_size=f.batch_size,
        )
        print(json.dumps(result))
    if not (f.train_digits_features or f.reference_stats or f.samples):
        raise app.UsageError(
            "nothing to do: pass --train_digits_features, --reference_stats and/or --samples"
        )


def _cli() -> None:
    """`python -m ddpm_bs.evaluation ...`; the flags exist only when run as a script."""
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config",
        None,
        "Config file: --reference_stats reads its data section (override fields with "
        "--config.data.data_dir=...); its sample.inception_weights, sample.reference_stats and "
        "sample.metric are the defaults of the flags below.",
    )
    flags.DEFINE_bool("train_digits_features", False, "Train the digits-FID network, write --out.")
    flags.DEFINE_integer("seed", 0, "--train_digits_features: seed.")
    flags.DEFINE_integer("steps", 300, "--train_digits_features: training steps.")
    flags.DEFINE_bool("reference_stats", False, "Write the config data's Inception stats to --out.")
    flags.DEFINE_integer("max_images", None, "--reference_stats: use only the first N images.")
    flags.DEFINE_string("out", None, "Output .npz (digits weights default: the shipped asset).")
    flags.DEFINE_string("samples", None, "A samples .npz to score with --metric.")
    flags.DEFINE_string("metric", None, f"Comma-separated metrics from {METRICS}.")
    flags.DEFINE_string("inception_weights", None, "Converted Inception .npz (ddpm_bs.inception).")
    flags.DEFINE_string("reference", None, "Reference stats .npz or guided-diffusion batch.")
    flags.DEFINE_integer("batch_size", INCEPTION_BATCH, "Images per Inception call.")

    def main(argv):
        try:
            _main(argv)
        except (ValueError, FileNotFoundError) as e:
            sys.exit(f"ddpm_bs.evaluation: {e}")  # one line: the message names what to fix

    app.run(main)


if __name__ == "__main__":
    _cli()
