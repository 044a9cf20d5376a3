"""Where a training run's metrics go: the log, TensorBoard and `<workdir>/metrics.jsonl`.

`open_writers` gives the training loop a writer and a progress reporter. With TensorFlow
installed they are clu's (`create_default_writer`: the log, and TensorBoard summaries on the
main process; `ReportProgress`: steps/s and ETA). clu's metric writers import TensorFlow when
loaded, so without it (a GPU image with JAX alone, say) the run logs a warning and writes the log
and metrics.jsonl only, with a steps/s reporter of this module: training does not need TensorFlow.

metrics.jsonl holds every scalar a run logs, `{"step": N, "<name>": value, ...}` per line, for
plotting and scripts without TensorBoard. A resumed run appends again the steps it redoes after
its checkpoint, so readers keep the last value per (name, step), as `artifacts.read_metrics`
does.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from ddpm_bs import artifacts


def open_writers(workdir: str, *, is_main: bool, num_steps: int):
    """(writer, report): a clu-style MetricWriter and a `report(step, time)` callable, both
    called by the main process and every other (others log only)."""
    try:
        from clu import metric_writers, periodic_actions
    except ImportError as e:  # clu.metric_writers imports TensorFlow and TensorBoard
        if not any(name in f"{e.name} {e}".lower() for name in ("tensorflow", "tensorboard")):
            raise
        logging.warning(
            "TensorBoard summaries are off: clu's metric writers need TensorFlow and "
            "TensorBoard, which are not installed (%s). Scalars still go to the log and %s; "
            "pip install tensorflow-cpu for TensorBoard.",
            e,
            artifacts.METRICS_FILE,
        )
        writers = [LoggingWriter(), JsonlWriter(workdir)] if is_main else [LoggingWriter()]
        writer = MultiWriter(writers)
        return writer, Progress(num_steps, writer)
    writer = metric_writers.create_default_writer(workdir, just_logging=not is_main)
    if is_main:
        writer = metric_writers.MultiWriter([writer, JsonlWriter(workdir)])
    return writer, periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer)


class _ScalarsOnly:
    """The MetricWriter methods (clu's interface, duck-typed) that ignore all but scalars."""

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

    def write_pointcloud(self, step, point_clouds, *, point_colors=None, configs=None) -> None:
        del step, point_clouds, point_colors, configs

    def write_hparams(self, hparams) -> None:
        del hparams  # config.json has them

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.flush()


class JsonlWriter(_ScalarsOnly):
    """Keeps the scalars in `<workdir>/metrics.jsonl`; lines are appended on `flush`."""

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


class LoggingWriter(_ScalarsOnly):
    """Scalars to the log, one line per write: `[step] name=value, ...` (as clu logs them)."""

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        values = ", ".join(f"{k}={float(v):.6g}" for k, v in sorted(scalars.items()))
        logging.info("[%d] %s", step, values)


class MultiWriter:
    """Every call goes to each writer in turn."""

    def __init__(self, writers: Sequence[Any]):
        self._writers = list(writers)

    def __getattr__(self, name):
        def call(*args, **kwargs):
            for writer in self._writers:
                getattr(writer, name)(*args, **kwargs)

        return call


class Progress:
    """`report(step, now)` each step: every `every_secs` writes `steps_per_sec` and logs the
    percentage done and the time left (what clu's ReportProgress does, without TensorFlow)."""

    def __init__(self, num_steps: int, writer, every_secs: float = 60.0):
        self.num_steps, self.writer, self.every_secs = num_steps, writer, every_secs
        self._last: tuple[int, float] | None = None

    def __call__(self, step: int, now: float | None = None) -> None:
        now = time.time() if now is None else now
        if self._last is None:
            self._last = (step, now)
            return
        last_step, last_time = self._last
        if now - last_time < self.every_secs or step == last_step:
            return
        rate = (step - last_step) / (now - last_time)
        self._last = (step, now)
        self.writer.write_scalars(step, {"steps_per_sec": rate})
        left_min = (self.num_steps - step) / rate / 60.0
        logging.info(
            "Step %d of %d (%.1f%%), %.2f steps/s, %.1f min left.",
            step, self.num_steps, 100.0 * step / self.num_steps, rate, left_min,
        )  # fmt: skip
