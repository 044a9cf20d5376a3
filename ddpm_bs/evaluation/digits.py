"""Digits-FID: a small digit classifier's features (weights shipped in ddpm_bs/assets), and the metric."""

from __future__ import annotations

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
from ddpm_bs.evaluation.frechet import (
    frechet_distance,
    load_statistics,
    statistics,
    warn_if_few_samples,
)

logger = logging.getLogger(__name__)

DIGITS_FEATURES_PATH = (
    pathlib.Path(__file__).resolve().parents[1] / "assets" / "digits_features.npz"
)
DIGITS_SIZE = 8  # digits-FID compares images at 8×8, one channel
NUM_DIGITS = 1797  # scikit-learn's digits: the reference set of digits_fid
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as PIL's convert("L") and ddpm_bs.data use
_PARAMS_PREFIX = "params/"


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
    cut = round(train_fraction * num)
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
    train_idx, _test_idx = _split(len(labels), seed)
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
    path: str | os.PathLike,
    params: Mapping[str, Any],
    *,
    heldout_accuracy: float,
    seed: int,
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


def load_digits_features(
    path: str | os.PathLike = DIGITS_FEATURES_PATH,
) -> dict[str, Any]:
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
