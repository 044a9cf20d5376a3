"""Where a training run's metrics go: the log, TensorBoard, `<workdir>/metrics.jsonl` and W&B.

`open_writers` gives the training loop one writer (clu's MetricWriter interface:
`write_scalars`, `write_images`, `write_hparams`, `flush`, `close`) and a progress reporter.
With TensorFlow installed (`pip install -e ".[tf]"`) the writer is clu's (`create_default_writer`:
the log, and TensorBoard summaries on the main process) and the reporter clu's `ReportProgress`.
Without it (the default install: clu's metric writers import TensorFlow when loaded) the log
gets the scalars from `LoggingWriter`, TensorBoard event files are written by tensorboardX
(`TensorBoardWriter`: scalars, image grids, hparams) and the reporter is `Progress`.

metrics.jsonl holds every scalar a run logs, `{"step": N, "<name>": value, ...}` per line, for
plotting and scripts without TensorBoard. A resumed run appends again the steps it redoes after
its checkpoint, so readers keep the last value per (name, step), as `artifacts.read_metrics`
does. With `train.wandb_project` set, the main process also logs to Weights & Biases
(`WandbWriter`); `check_writers` checks that setting before any expensive work.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
from etils import epath
from flax import traverse_util

from ddpm_bs import artifacts

WANDB_ID_FILE = "wandb_id.txt"  # the W&B run id, so that a resumed run logs into the same run


def check_writers(config: ml_collections.ConfigDict) -> None:
    """Checks the writer settings of `config.train`: a W&B project (`wandb_project`) needs the
    wandb package. Call before expensive work; raises ValueError."""
    project = config.train.get("wandb_project")
    if project is not None and not isinstance(project, str):
        raise ValueError(
            f"train.wandb_project must be a string (None for no W&B logging), got "
            f"{type(project).__name__} {project!r}."
        )
    if project and importlib.util.find_spec("wandb") is None:
        raise ValueError(
            f"train.wandb_project={project!r} needs the wandb package, which is not installed: "
            "pip install wandb (and `wandb login`), or leave train.wandb_project unset to log "
            "without Weights & Biases."
        )


def open_writers(
    workdir: str,
    *,
    is_main: bool,
    num_steps: int,
    wandb_project: str | None = None,
):
    """(writer, report): a clu-style MetricWriter and a `report(step, time)` callable, both
    called by the main process and every other (others log only).

    Args:
      workdir: the run directory (local or gs://…): TensorBoard event files, metrics.jsonl.
      is_main: whether this is process 0, the only one that writes files or logs to W&B.
      num_steps: the run's last step, for the reporter's percentage and time left.
      wandb_project: `train.wandb_project`; a project adds a `WandbWriter` on the main
        process (wandb is imported only then).
    """
    clu = _clu_writers()
    if clu is not None:
        metric_writers, periodic_actions = clu
        writers = [metric_writers.create_default_writer(workdir, just_logging=not is_main)]
    else:
        writers = [LoggingWriter()]
        if is_main:
            writers += _tensorboardx_writer(workdir)
    if is_main:
        writers.append(JsonlWriter(workdir))
        if wandb_project:
            writers.append(WandbWriter(workdir, project=wandb_project))
    writer = MultiWriter(writers)
    if clu is not None:
        return writer, periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer)
    return writer, Progress(num_steps, writer)


def _clu_writers():
    """clu's (metric_writers, periodic_actions) modules, or None without TensorFlow or clu."""
    try:
        from clu import metric_writers, periodic_actions
    except ImportError as e:  # clu.metric_writers imports TensorFlow and TensorBoard
        if not any(n in f"{e.name} {e}".lower() for n in ("tensorflow", "tensorboard", "clu")):
            raise
        return None
    return metric_writers, periodic_actions


def _tensorboardx_writer(workdir: str) -> list[Any]:
    """[TensorBoardWriter(workdir)], or [] with a warning when tensorboardX is not installed."""
    if importlib.util.find_spec("tensorboardX") is None:
        logging.warning(
            "TensorBoard summaries are off: neither TensorFlow (for clu's writers) nor "
            "tensorboardX is installed. Scalars still go to the log and %s; pip install "
            "tensorboardX for TensorBoard.",
            artifacts.METRICS_FILE,
        )
        return []
    return [TensorBoardWriter(workdir)]


def flat_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as TensorBoard hparams: `{"section.field": value}`; numbers, strings and
    bools as they are, None as "None", anything else (tuples, lists) as its JSON text."""
    flat = traverse_util.flatten_dict(config.to_dict(), sep=".")
    return {
        name: value
        if isinstance(value, (int, float, str, bool))
        else ("None" if value is None else json.dumps(value))
        for name, value in flat.items()
    }


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


class TensorBoardWriter(_ScalarsOnly):
    """Scalars, images and hparams to TensorBoard event files in `logdir`, through tensorboardX
    (no TensorFlow needed); as clu's SummaryWriter writes them."""

    def __init__(self, logdir: str):
        import tensorboardX

        self._summary = tensorboardX.summary
        self._writer = tensorboardX.SummaryWriter(logdir=logdir)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        for name, value in scalars.items():
            self._writer.add_scalar(name, float(value), global_step=int(step))

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        """images: {name: uint8 or [0, 1] float [N, H, W, C] or [H, W, C]}, C = 1 or 3; N > 1
        images are tiled into one grid."""
        for name, value in images.items():
            value = np.asarray(value)
            value = value[None] if value.ndim == 3 else value
            self._writer.add_images(name, value, global_step=int(step), dataformats="NHWC")

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """The hparams plugin's session-start record in the run's own event file (as TensorFlow's
        `hparams_api.hparams` writes it; TensorBoard finds the metrics from the scalars)."""
        _, session_start, _ = self._summary.hparams(dict(hparams), {})
        self._writer.file_writer.add_summary(session_start)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbWriter(_ScalarsOnly):
    """Scalars, images and hparams to a Weights & Biases run named after the workdir, in the
    team of the WANDB_ENTITY environment variable (else the user's default). The run id is kept
    in `<workdir>/wandb_id.txt`, so a resumed training run logs into the same W&B run."""

    def __init__(self, workdir: str, *, project: str):
        import wandb

        self._wandb = wandb
        epath.Path(workdir).mkdir(parents=True, exist_ok=True)
        id_path = epath.Path(workdir, WANDB_ID_FILE)
        if id_path.exists():
            run_id = id_path.read_text().strip()
        else:
            run_id = uuid.uuid4().hex[:16]
            artifacts.write_bytes(run_id.encode(), id_path)
        self._run = wandb.init(
            project=project,
            name=os.path.basename(os.path.normpath(workdir)),
            id=run_id,
            resume="allow",
            dir=None if artifacts.is_remote(workdir) else workdir,  # its files: <workdir>/wandb
        )

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        self._run.log({name: float(value) for name, value in scalars.items()}, step=int(step))

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        logged = {}
        for name, value in images.items():
            value = np.asarray(value)
            value = value[None] if value.ndim == 3 else value
            if value.shape[-1] == 1:
                value = value[..., 0]
            logged[name] = [self._wandb.Image(image) for image in value]
        self._run.log(logged, step=int(step))

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        self._run.config.update(dict(hparams), allow_val_change=True)

    def close(self) -> None:
        self._run.finish()


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
