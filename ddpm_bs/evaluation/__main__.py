"""`python -m ddpm_bs.evaluation`: train the digits-FID network, write reference statistics, score samples."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

from ddpm_bs.evaluation.digits import (
    DIGITS_FEATURES_PATH,
    digits_heldout_accuracy,
    save_digits_features,
    train_digits_features,
)
from ddpm_bs.evaluation.metrics import (
    INCEPTION_BATCH,
    METRICS,
    dataset_reference_statistics,
    evaluate_samples,
    save_reference,
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
