"""`<workdir>/metrics.jsonl`: every scalar a run logs, a JSON line per write, for plotting and
scripts without TensorBoard.

Each line is `{"step": N, "<name>": value, ...}`. A resumed run appends again the steps it
redoes after its checkpoint, so readers keep the last value per (name, step), as
`artifacts.read_metrics` does. This module imports clu's writer interface (and with it
TensorFlow): the training loop imports it only once the run is known to be good.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from clu.metric_writers import interface

from ddpm_bs import artifacts


class JsonlWriter(interface.MetricWriter):
    """A clu MetricWriter that keeps scalars only; lines are appended on `flush`."""

    def __init__(self, workdir: str):
        self._path = os.path.join(workdir, artifacts.METRICS_FILE)
        self._pending: list[dict[str, Any]] = []

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        self._pending.append({"step": int(step), **{k: float(v) for k, v in scalars.items()}})
        if len(self._pending) >= 100:
            self.flush()

    def flush(self) -> None:
        artifacts.append_jsonl(self._pending, self._path)
        self._pending = []

    def close(self) -> None:
        self.flush()

    # Images, texts and the rest live in TensorBoard only.
    def write_summaries(self, step, values, metadata=None) -> None:
        del step, values, metadata

    def write_images(self, step, images) -> None:
        del step, images

    def write_videos(self, step, videos) -> None:
        del step, videos

    def write_audios(self, step, audios, *, sample_rate) -> None:
        del step, audios, sample_rate

    def write_texts(self, step, texts) -> None:
        del step, texts

    def write_histograms(self, step, arrays, num_buckets=None) -> None:
        del step, arrays, num_buckets

    def write_hparams(self, hparams) -> None:
        del hparams  # config.json has them
