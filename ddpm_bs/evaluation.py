"""Sample quality: Fréchet distances between feature statistics, and an offline digits-FID.

FID (Heusel et al., 2017) compares two Gaussians fitted to network features:

    FID = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^{1/2}).

Protocol (DESIGN.md, "My FID doesn't match the paper"): reference statistics come from the
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
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from ddpm_bs import data

logger = logging.getLogger(__name__)

METRICS = ("digits_fid",)
MIN_SAMPLES = 10_000  # the Inception-FID protocol's minimum (50k for the large datasets)
DIGITS_FEATURES_PATH = pathlib.Path(__file__).resolve().parent / "assets" / "digits_features.npz"
DIGITS_SIZE = 8  # digits-FID compares images at 8×8, one channel
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


def save_statistics(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray) -> None:
    """Writes reference statistics as an .npz with keys `mu` [D] and `sigma` [D, D]."""
    mu, sigma = _check_stats("", mu, sigma)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:  # a file object keeps np.savez from appending ".npz"
        np.savez(f, mu=mu, sigma=sigma)


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
            "their features first (e.g. `statistics(digits_features(images))`) and save them "
            "with `save_statistics`."
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


def _digits_dataset() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as the diffusion model sees them: [1797, 8, 8, 1] in [−1, 1], labels."""
    spec = data.DataSpec(name="digits", image_size=DIGITS_SIZE, channels=1, random_flip=False)
    images, labels = data.load_all(spec, with_labels=True)
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
    warn_if_few_samples(feats.shape[0], len(_digits_dataset()[1]), "digits_fid")
    mu, sigma = statistics(feats)
    return frechet_distance(mu, sigma, mu_ref, sigma_ref)


# --------------------------------------------------------------------------------------------
# Samples on disk


def load_samples(npz_path: str | os.PathLike) -> np.ndarray:
    """Images from a samples .npz: key `images` (ours) or `arr_0` (guided-diffusion's)."""
    path = pathlib.Path(npz_path)
    if not path.is_file():
        raise FileNotFoundError(f"npz_path: samples file not found: {str(path)!r}.")
    with np.load(path) as f:
        for key in ("images", "arr_0"):
            if key in f.files:
                return f[key]
        keys = sorted(f.files)
    raise ValueError(f"npz_path: {str(path)!r} has no 'images' (or 'arr_0') array; keys {keys}.")


def evaluate_samples(npz_path: str | os.PathLike, *, metric: str = "digits_fid") -> dict[str, Any]:
    """Scores a samples .npz (key `images`, uint8 [N, H, W, C]) with one of `METRICS`.

    Returns:
      {metric: float, 'num_samples': N}.
    """
    if metric not in METRICS:
        raise ValueError(f"metric: unknown metric {metric!r}; valid names are {METRICS}.")
    images = load_samples(npz_path)
    if metric == "digits_fid":
        value = digits_fid(images)
    return {metric: value, "num_samples": int(images.shape[0])}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--train_digits_features",
        action="store_true",
        help="train the digits-FID feature network and write its weights to --out",
    )
    parser.add_argument("--out", default=str(DIGITS_FEATURES_PATH), help="weights .npz path")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--samples", help="a samples .npz to score with --metric")
    parser.add_argument("--metric", default="digits_fid", choices=METRICS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    if args.train_digits_features:
        params = train_digits_features(seed=args.seed, steps=args.steps)
        accuracy = digits_heldout_accuracy(params, seed=args.seed)
        save_digits_features(args.out, params, heldout_accuracy=accuracy, seed=args.seed)
        print(
            f"wrote {args.out} ({os.path.getsize(args.out)} bytes); held-out accuracy {accuracy:.4f}"
        )
    if args.samples:
        print(evaluate_samples(args.samples, metric=args.metric))
    if not (args.train_digits_features or args.samples):
        parser.error("nothing to do: pass --train_digits_features and/or --samples=<npz>")
