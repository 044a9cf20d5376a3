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

Modules, one job each:
  frechet    the Fréchet distance, feature statistics and the few-samples warning;
  digits     the digits feature network (training, the shipped weights) and digits-FID;
  metrics    the Inception metrics, reference statistics, and scoring image sets and files;
  __main__   the `python -m ddpm_bs.evaluation` command.
"""

from ddpm_bs.evaluation.digits import (
    DIGITS_FEATURES_PATH,
    DIGITS_SIZE,
    NUM_DIGITS,
    DigitsNet,
    digits_features,
    digits_fid,
    digits_heldout_accuracy,
    digits_reference_statistics,
    load_digits_features,
    save_digits_features,
    train_digits_features,
)
from ddpm_bs.evaluation.frechet import (
    frechet_distance,
    load_statistics,
    save_statistics,
    statistics,
    warn_if_few_samples,
)
from ddpm_bs.evaluation.metrics import (
    INCEPTION_BATCH,
    INCEPTION_METRICS,
    IS_SPLIT_SIZE,
    METRICS,
    MIN_SAMPLES,
    PROGRESS_BATCHES,
    REFERENCE_COMMAND,
    REFERENCE_METRICS,
    MetricSpec,
    ReferenceStats,
    check_metric_inputs,
    dataset_reference_statistics,
    evaluate_images,
    evaluate_samples,
    inception,
    inception_features,
    inception_score,
    inception_statistics,
    load_reference,
    load_samples,
    parse_metrics,
    save_reference,
)

__all__ = [
    "DIGITS_FEATURES_PATH",
    "DIGITS_SIZE",
    "DigitsNet",
    "INCEPTION_BATCH",
    "INCEPTION_METRICS",
    "IS_SPLIT_SIZE",
    "METRICS",
    "MIN_SAMPLES",
    "MetricSpec",
    "NUM_DIGITS",
    "PROGRESS_BATCHES",
    "REFERENCE_COMMAND",
    "REFERENCE_METRICS",
    "ReferenceStats",
    "check_metric_inputs",
    "dataset_reference_statistics",
    "digits_features",
    "digits_fid",
    "digits_heldout_accuracy",
    "digits_reference_statistics",
    "evaluate_images",
    "evaluate_samples",
    "frechet_distance",
    "inception",
    "inception_features",
    "inception_score",
    "inception_statistics",
    "load_digits_features",
    "load_reference",
    "load_samples",
    "load_statistics",
    "parse_metrics",
    "save_digits_features",
    "save_reference",
    "save_statistics",
    "statistics",
    "train_digits_features",
    "warn_if_few_samples",
]
