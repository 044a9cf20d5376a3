"""`evaluate_images` end to end on sets that differ, against direct computations in the test.

FID = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^{1/2}) (Heusel et al. 2017) computed here as
pytorch-fid does, with scipy's `sqrtm` of the product; IS = exp E_x KL(p(y|x) ‖ p(y))
(Salimans et al. 2016) in closed form for a set whose class probabilities are known.
"""

import numpy as np
import pytest
from scipy import linalg

from ddpm_bs import data, evaluation, inception


def frechet_sqrtm(f1, f2):
    """FID between two feature sets, the pytorch-fid way (float64, scipy sqrtm)."""
    mu1, mu2 = f1.mean(axis=0), f2.mean(axis=0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def to_uint8(x):
    return np.round((np.asarray(x) + 1.0) * 127.5).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def digits():
    spec = data.DataSpec(name="digits", image_size=8, channels=1, random_flip=False)
    return data.load_all(spec, with_labels=True)  # [1797, 8, 8, 1] in [−1, 1], labels


def test_digits_fid_of_a_different_set_is_the_frechet_distance_of_its_features(digits):
    images, labels = digits
    low = to_uint8(images[labels < 5])  # classes 0–4 only, against all ten
    rng = np.random.default_rng(0)
    noisy = to_uint8(np.clip(images[::3] + 0.3 * rng.standard_normal(images[::3].shape), -1, 1))
    reference = evaluation.digits_features(images)
    for samples in (low, noisy):
        got = evaluation.evaluate_images(samples, metrics="digits_fid")
        expected = frechet_sqrtm(evaluation.digits_features(samples), reference)
        assert expected > 1.0  # far from the identical-set case, FID ≈ 0
        np.testing.assert_allclose(got["digits_fid"], expected, rtol=1e-6)
        assert got["num_samples"] == len(samples)


# --- The Inception Score, on logits whose class probabilities are known ------------------

K, EPS = 4, 0.2  # classes of the set; each image puts 1 − ε on its class


def fake_features(images, params, *, batch_size=64):
    """Stands in for the Inception network (whose 2048-dim statistics would cost minutes here).

    The image's class c is its last pixel // 64; p(y|x) = 1 − ε on c, ε/(K−1) on the other
    classes below K, and exactly 0 on the remaining 1008 − K (logit −1e4).
    """
    del params, batch_size
    n = len(images)
    c = images.reshape(n, -1)[:, -1].astype(int) // 64
    probs = np.full((n, K), EPS / (K - 1))
    probs[np.arange(n), c] = 1 - EPS
    logits = np.full((n, 1008), -1e4)
    logits[:, :K] = np.log(probs)
    return {
        "pool3": np.zeros((n, inception.POOL_DIM)),
        "spatial": np.zeros((n, inception.SPATIAL_DIM)),
        "logits": logits,
    }


def test_inception_score_of_a_set_with_known_class_probabilities(monkeypatch):
    monkeypatch.setattr(inception, "features", fake_features)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (300, 8, 8, 3), dtype=np.uint8)
    images[:, -1, -1, -1] = np.tile(np.arange(K) * 64 + 10, 300 // K)  # balanced, interleaved
    got = evaluation.evaluate_images(images, metrics="is", inception_weights={}, is_split_size=1000)
    # p(y) is uniform on the K classes, so KL(p(y|x) ‖ p(y)) = ln K − H(p(y|x)) for every x.
    entropy = -(1 - EPS) * np.log(1 - EPS) - EPS * np.log(EPS / (K - 1))
    np.testing.assert_allclose(got["is"], K * np.exp(-entropy), rtol=1e-9)
    assert got["num_samples"] == 300
    # Three splits of 100 each hold the same balanced classes: the same score.
    halves = evaluation.evaluate_images(
        images, metrics="is", inception_weights={}, is_split_size=100
    )
    np.testing.assert_allclose(halves["is"], got["is"], rtol=1e-9)
