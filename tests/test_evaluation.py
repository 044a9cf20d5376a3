"""FID math against closed forms and an independent sqrtm route; digits-FID sanity orderings;
the Inception Score's formula and closed forms; the Inception metrics end to end."""

import json
import logging
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg

from ddpm_bs import evaluation


def _random_cov(rng, d, rank=None):
    a = rng.normal(size=(d, rank or 2 * d))
    return a @ a.T / a.shape[1]


def _fid_sqrtm_reference(mu1, sigma1, mu2, sigma2):
    """pytorch-fid's route: scipy sqrtm of the non-symmetric product, real part."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    covmean = np.real(covmean)
    diff = mu1 - mu2
    return diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


@pytest.fixture(scope="module")
def digits():
    images, labels = evaluation.digits._digits_dataset()
    return images, labels


# --------------------------------------------------------------------------------------------
# Fréchet distance math


def test_frechet_distance_diagonal_matches_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    a, b = rng.uniform(0.1, 3.0, size=6), rng.uniform(0.1, 3.0, size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = evaluation.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_frechet_distance_is_symmetric_and_zero_for_identical_stats():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=10), rng.normal(size=10)
    s1, s2 = _random_cov(rng, 10), _random_cov(rng, 10)
    forward = evaluation.frechet_distance(mu1, s1, mu2, s2)
    np.testing.assert_allclose(forward, evaluation.frechet_distance(mu2, s2, mu1, s1), rtol=1e-9)
    assert evaluation.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_full_covariance_matches_sqrtm_route():
    rng = np.random.default_rng(2)
    d = 32
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
    expected = _fid_sqrtm_reference(mu1, s1, mu2, s2)
    np.testing.assert_allclose(evaluation.frechet_distance(mu1, s1, mu2, s2), expected, rtol=1e-8)


def test_frechet_distance_handles_singular_covariances():
    rng = np.random.default_rng(3)
    d = 16
    s1, s2 = _random_cov(rng, d, rank=4), _random_cov(rng, d, rank=5)  # rank-deficient
    mu = np.zeros(d)
    fid = evaluation.frechet_distance(mu, s1, mu, s2)
    assert np.isfinite(fid) and fid > 0
    # sqrtm on the singular product needs pytorch-fid's ε·I offset; the two agree closely.
    eps = 1e-10 * np.eye(d)
    np.testing.assert_allclose(fid, _fid_sqrtm_reference(mu, s1 + eps, mu, s2 + eps), rtol=1e-4)


def test_statistics_match_numpy():
    rng = np.random.default_rng(4)
    feats = rng.normal(size=(50, 7)).astype(np.float32)
    mu, sigma = evaluation.statistics(feats)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    np.testing.assert_allclose(mu, np.mean(feats.astype(np.float64), axis=0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(feats.astype(np.float64), rowvar=False), rtol=1e-10)


@pytest.mark.parametrize("shape", [(5,), (1, 3), (2, 3, 4)])
def test_statistics_rejects_bad_shapes(shape):
    with pytest.raises(ValueError, match="features"):
        evaluation.statistics(np.zeros(shape))


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="sigma1"):
        evaluation.frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="mu1 and mu2"):
        evaluation.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# --------------------------------------------------------------------------------------------
# Files


def test_save_load_statistics_round_trip(tmp_path):
    rng = np.random.default_rng(5)
    mu, sigma = rng.normal(size=4), _random_cov(rng, 4)
    path = tmp_path / "sub" / "ref.npz"
    evaluation.save_statistics(path, mu, sigma)
    mu2, sigma2 = evaluation.load_statistics(path)
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(sigma, sigma2)


def test_load_statistics_reads_guided_diffusion_batches_and_rejects_bare_images(tmp_path):
    images = np.zeros((2, 8, 8, 3), np.uint8)
    with_stats = tmp_path / "VIRTUAL_ref.npz"
    np.savez(with_stats, arr_0=images, mu=np.ones(3), sigma=np.eye(3))
    mu, sigma = evaluation.load_statistics(with_stats)
    np.testing.assert_array_equal(mu, np.ones(3))
    bare = tmp_path / "bare.npz"
    np.savez(bare, arr_0=images)
    with pytest.raises(ValueError, match="features first"):
        evaluation.load_statistics(bare)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        evaluation.load_statistics(tmp_path / "missing.npz")


def test_shipped_weights_are_small_and_accurate():
    size = evaluation.DIGITS_FEATURES_PATH.stat().st_size
    assert size < 400_000
    with np.load(evaluation.DIGITS_FEATURES_PATH) as f:
        assert float(f["heldout_accuracy"]) >= 0.95


# --------------------------------------------------------------------------------------------
# Digits-FID


def test_digits_features_shape_and_input_forms(digits):
    images, _ = digits
    feats = evaluation.digits_features(images[:10])
    assert feats.shape == (10, 128) and feats.dtype == np.float64
    as_uint8 = np.round((images[:10] + 1.0) * 127.5).astype(np.uint8)
    np.testing.assert_allclose(evaluation.digits_features(as_uint8), feats, atol=1e-4)
    rgb = np.repeat(as_uint8, 3, axis=-1)  # luma of a gray RGB image is the gray value
    np.testing.assert_allclose(evaluation.digits_features(rgb), feats, atol=1e-3)
    big = np.repeat(np.repeat(images[:10], 4, axis=1), 4, axis=2)  # 32×32 → resized to 8×8
    assert evaluation.digits_features(big).shape == (10, 128)


@pytest.mark.parametrize(
    "images, match",
    [
        (np.zeros((4, 8, 8)), "images"),
        (np.zeros((4, 8, 8, 2)), "images"),
        (np.full((4, 8, 8, 1), 255.0), r"\[−1, 1\]"),
        (np.zeros((4, 8, 8, 1), np.int32), "dtype"),
    ],
)
def test_digits_features_rejects_bad_images(images, match):
    with pytest.raises(ValueError, match=match):
        evaluation.digits_features(images)


def test_digits_fid_orderings(digits, caplog):
    images, _ = digits
    rng = np.random.default_rng(0)
    self_fid = evaluation.digits_fid(images)
    assert self_fid < 1e-6
    order = rng.permutation(len(images))
    half = len(images) // 2
    first, second = images[order[:half]], images[order[half:]]
    with caplog.at_level(logging.WARNING, logger=evaluation.frechet.__name__):
        split_fid = evaluation.digits_fid(
            first, reference=evaluation.statistics(evaluation.digits_features(second))
        )
    assert "biased high" in caplog.text
    assert 0 < split_fid
    noise = np.clip(rng.normal(size=images.shape), -1, 1).astype(np.float32)
    blank = np.full_like(images, -1.0)
    blank[:, 0, 0, 0] += rng.uniform(0, 1e-3, size=len(images))  # not exactly constant
    assert evaluation.digits_fid(noise) > 20 * split_fid
    assert evaluation.digits_fid(blank) > 20 * split_fid
    noised = [
        evaluation.digits_fid(np.clip(images + std * rng.normal(size=images.shape), -1, 1))
        for std in (0.05, 0.1, 0.2, 0.4, 0.8)
    ]
    assert bool(np.all(np.diff(noised) > 0)), noised


def test_evaluate_samples_reads_npz_and_names_bad_arguments(tmp_path, digits):
    images, _ = digits
    samples = np.round((images[:300] + 1.0) * 127.5).astype(np.uint8)
    path = tmp_path / "samples.npz"
    np.savez(path, images=samples)
    result = evaluation.evaluate_samples(path)
    assert set(result) == {"digits_fid", "num_samples"}
    assert result["num_samples"] == 300 and np.isfinite(result["digits_fid"])
    with pytest.raises(ValueError, match="metric.*digits_fid"):
        evaluation.evaluate_samples(path, metric="inception_fid")
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        evaluation.evaluate_samples(tmp_path / "nope.npz")
    other = tmp_path / "other.npz"
    np.savez(other, x=samples)
    with pytest.raises(ValueError, match="images"):
        evaluation.evaluate_samples(other)


# --------------------------------------------------------------------------------------------
# Inception Score


def _inception_score_reference(probs, split_size):
    """guided-diffusion's formula, literally: p·(log p − log mean p) per split, in float64."""
    scores = []
    for i in range(0, len(probs), split_size):
        part = probs[i : i + split_size]
        kl = part * (np.log(part) - np.log(np.mean(part, axis=0, keepdims=True)))
        scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
    return np.mean(scores)


@pytest.mark.parametrize("split_size", [1000, 10, 7])
def test_inception_score_matches_the_formula_on_a_hand_built_distribution(split_size):
    rng = np.random.default_rng(6)
    probs = rng.dirichlet(np.full(5, 0.3), size=30) + 1e-12  # peaked rows, none exactly 0
    probs /= probs.sum(axis=1, keepdims=True)
    expected = _inception_score_reference(probs, split_size)
    got = evaluation.inception_score(np.log(probs) + 3.0, split_size=split_size)  # logits
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    assert 1.0 < got < 5.0


def test_inception_score_closed_forms():
    k = 8
    assert evaluation.inception_score(np.zeros((12, k))) == pytest.approx(1.0, abs=1e-12)
    same = np.tile(np.log([0.7, 0.2, 0.1]), (9, 1))  # every image predicts the same p(y|x)
    assert evaluation.inception_score(same) == pytest.approx(1.0, abs=1e-12)
    one_hot = np.where(np.eye(k, dtype=bool), 0.0, -1e4)  # p(y|x_i) = e_i: IS = #classes
    assert evaluation.inception_score(one_hot) == pytest.approx(k, rel=1e-12)
    two_splits = np.concatenate([one_hot, one_hot[:4]])  # splits of 8 and 4 → mean(8, 4)
    assert evaluation.inception_score(two_splits, split_size=k) == pytest.approx(6.0, rel=1e-12)


def test_parse_metrics_reads_comma_lists_and_names_the_field():
    assert evaluation.parse_metrics("fid, sfid,is,fid") == ("fid", "sfid", "is")
    assert evaluation.parse_metrics(["digits_fid"]) == ("digits_fid",)
    with pytest.raises(ValueError, match=r"sample.metric='fid,kid'.*'kid'.*digits_fid, fid"):
        evaluation.parse_metrics("fid,kid")
    with pytest.raises(ValueError, match="sample.metric"):
        evaluation.parse_metrics(" , ")


def test_streamed_moments_match_statistics():
    rng = np.random.default_rng(7)
    feats = rng.normal(size=(50, 6)) * [1, 2, 3, 1, 1, 1] + 1e3  # a large offset
    moments = evaluation.metrics._Moments()
    for start in range(0, 50, 16):
        moments.add(feats[start : start + 16].astype(np.float32))
    mu, sigma = moments.result()
    mu_ref, sigma_ref = evaluation.statistics(feats.astype(np.float32))
    np.testing.assert_allclose(mu, mu_ref, rtol=1e-12)
    np.testing.assert_allclose(sigma, sigma_ref, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Reference statistics and the Inception metrics end to end (random Inception weights)


def test_reference_files_guided_diffusion_batches_and_their_errors(tmp_path):
    rng = np.random.default_rng(8)
    stats = evaluation.ReferenceStats(
        rng.normal(size=2048), np.eye(2048), rng.normal(size=2023), np.eye(2023)
    )
    ours = tmp_path / "ref.npz"
    evaluation.save_reference(ours, stats, num_images=7, data="digits")
    loaded = evaluation.load_reference(ours)
    for a, b in zip(loaded, stats, strict=True):
        np.testing.assert_array_equal(a, b)
    virtual = tmp_path / "VIRTUAL_batch.npz"  # guided-diffusion: images beside the statistics
    np.savez(virtual, arr_0=np.zeros((2, 8, 8, 3), np.uint8), **stats._asdict())
    np.testing.assert_array_equal(evaluation.load_reference(virtual).mu_s, stats.mu_s)
    no_spatial = tmp_path / "no_spatial.npz"
    evaluation.save_statistics(no_spatial, stats.mu, stats.sigma)
    with pytest.raises(ValueError, match="no 'mu_s'/'sigma_s'.*--reference_stats"):
        evaluation.metrics._check_reference_dims(
            evaluation.load_reference(no_spatial), ["sfid"], "ref"
        )
    digits_stats = evaluation.ReferenceStats(np.zeros(128), np.eye(128))
    with pytest.raises(ValueError, match=r"pool3 statistics \[2048\]"):
        evaluation.metrics._check_reference_dims(digits_stats, ["fid"], "ref")
    images_only = tmp_path / "images_only.npz"
    np.savez(images_only, arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(FileNotFoundError, match="only images.*sample.inception_weights"):
        evaluation.load_reference(images_only)


def test_inception_metrics_check_their_inputs_before_any_work(tmp_path, monkeypatch):
    def no_features(*args, **kwargs):
        raise AssertionError("features computed before the inputs were checked")

    monkeypatch.setattr(evaluation.inception, "features", no_features)
    images = np.zeros((4, 8, 8, 3), np.uint8)
    with pytest.raises(FileNotFoundError, match="not set.*sample.inception_weights.*--convert"):
        evaluation.evaluate_images(images, metrics="is")
    weights = tmp_path / "w.npz"
    weights.write_bytes(b"")  # exists; the reference check comes first
    with pytest.raises(FileNotFoundError, match="sample.reference_stats.*--reference_stats"):
        evaluation.evaluate_images(images, metrics="fid,is", inception_weights=weights)
    with pytest.raises(ValueError, match="uint8.*to_uint8"):
        evaluation.evaluate_images(images.astype(np.float32), metrics="digits_fid")
    with pytest.raises(ValueError, match="sample.metric"):
        evaluation.evaluate_images(images, metrics="fid_inf")


@pytest.fixture(scope="module")
def inception_files(tmp_path_factory):
    """Random Inception weights in the converted format, and digits reference statistics
    written by the CLI (`--reference_stats`) from the first 3 digits."""
    from ddpm_bs import inception

    root = tmp_path_factory.mktemp("inception")
    weights, reference = root / "inception_fid.npz", root / "digits_reference.npz"
    inception.save_params(weights, inception.random_params(seed=1))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ddpm_bs.evaluation",
            "--reference_stats",
            "--config=configs/digits.py",
            f"--inception_weights={weights}",
            f"--out={reference}",
            "--max_images=3",
            "--batch_size=2",
        ],
        cwd=pathlib.Path(__file__).resolve().parents[1],
        env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""),
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[-1])["num_images"] == 3
    return weights, reference


def test_run_eval_scores_fid_sfid_is_against_a_reference_file(inception_files, tmp_path, digits):
    from configs import digits as digits_config
    from ddpm_bs import generate

    weights, reference = inception_files
    with np.load(reference) as f:
        assert f["mu"].shape == (2048,) and f["sigma_s"].shape == (2023, 2023)
        assert int(f["num_images"]) == 3
        assert np.trace(f["sigma"]) > 1e-2 and np.trace(f["sigma_s"]) > 1e-2  # features vary
    config = digits_config.get_config()
    config.sample.metric = "fid,sfid,is"
    config.sample.inception_weights = str(weights)
    config.sample.reference_stats = str(reference)
    samples = tmp_path / "samples"
    samples.mkdir()
    same = np.round((digits[0][:3] + 1.0) * 127.5).astype(np.uint8)  # the reference's images
    np.savez(samples / "ddim4_step00000001.npz", images=same)
    result = generate.run_eval(config, str(tmp_path))
    assert set(result) == {"fid", "sfid", "is", "num_samples", "samples"}
    assert result["num_samples"] == 3 and result["fid"] < 1e-6 and result["sfid"] < 1e-6
    assert 1.0 <= result["is"] <= 3.0  # at most the number of samples in the split
    assert (tmp_path / "eval.jsonl").read_text().count('"sfid"') == 1


def test_run_eval_checks_inception_inputs_before_reading_samples(tmp_path):
    from configs import digits as digits_config
    from ddpm_bs import generate

    config = digits_config.get_config()
    config.sample.metric = "digits_fid,is"  # no samples in tmp_path either: weights come first
    with pytest.raises(FileNotFoundError, match="sample.inception_weights"):
        generate.run_eval(config, str(tmp_path))
    config.sample.metric = "fid,dice"
    with pytest.raises(ValueError, match="sample.metric='fid,dice'"):
        generate.run_eval(config, str(tmp_path))
