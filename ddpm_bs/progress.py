"""Progress of a long job (sampling, feature extraction, statistics): rate and time left.

    with progress.Progress("sampling", total=50_000, unit="img") as bar:
        for chunk in chunks:
            ...
            bar.update(len(chunk))

logs one line when the job starts, then at most every `every_secs` (30 s by default) and when it
ends: items done of the total, percent, the rate over the last interval in `unit`/s and the time
left at that rate, as clu's `ReportProgress` does for training steps. The last line gives the
whole job's mean rate and wall time. Where stderr is a terminal, a one-line bar is redrawn in
place as well. Only process 0 reports (`jax.process_index() == 0`); `total=None` reports counts
and rates without percent or time left.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import TextIO

import jax
from absl import logging

_BAR_WIDTH = 24
_BAR_EVERY_SECS = 0.2  # redraws of the terminal bar, at most this often


def format_duration(seconds: float) -> str:
    """`1h02m03s`, `4m05s` or `6s`: what `Progress` prints for elapsed time and time left."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class Progress:
    """A context manager counting the items a job has done; see the module docstring.

    Args:
      name: what the job is, first word of every line (`"sampling"`).
      total: items the job will do, or None when unknown.
      unit: what an item is (`"img"`, `"batch"`), printed after counts and rates.
      every_secs: seconds between log lines while the job runs.
      clock: monotonic seconds; tests pass a fake one.
      stream: where the terminal bar goes (stderr by default); the bar is drawn only when this
        stream is a terminal.
      enabled: whether this process reports; by default only process 0 does.
    """

    def __init__(
        self,
        name: str,
        total: int | None = None,
        *,
        unit: str = "it",
        every_secs: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        stream: TextIO | None = None,
        enabled: bool | None = None,
    ):
        if total is not None and total < 0:
            raise ValueError(f"Progress {name!r}: total must be >= 0 or None, got {total}.")
        self.name, self.total, self.unit = name, total, unit
        self.every_secs, self._clock = every_secs, clock
        self._stream = sys.stderr if stream is None else stream
        self._enabled = jax.process_index() == 0 if enabled is None else enabled
        self._tty = self._enabled and _isatty(self._stream)
        self.done = 0
        self._start = self._last_time = self._last_bar = 0.0
        self._last_done = 0

    def __enter__(self) -> Progress:
        self._start = self._last_time = self._clock()
        self._last_bar = -math.inf
        if self._enabled:
            to_do = "" if self.total is None else f", {self.total} {self.unit} to do"
            logging.info("%s: started%s.", self.name, to_do)
            self._draw_bar(self._start)
        return self

    def update(self, n: int = 1) -> None:
        """Counts `n` more items done."""
        self.done += n
        if not self._enabled:
            return
        now = self._clock()
        if now - self._last_time >= self.every_secs:
            self._log(now)
        self._draw_bar(now)

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._enabled:
            return
        now = self._clock()
        self._clear_bar()
        elapsed = now - self._start
        rate = self.done / elapsed if elapsed > 0 else float("nan")
        verb = "done" if exc_type is None else f"stopped ({exc_type.__name__})"
        logging.info(
            "%s: %s, %s in %s, %s.",
            self.name, verb, self._count(), format_duration(elapsed), self._rate(rate),
        )  # fmt: skip

    def _log(self, now: float) -> None:
        rate = (self.done - self._last_done) / (now - self._last_time)
        self._last_done, self._last_time = self.done, now
        self._clear_bar()
        logging.info("%s: %s, %s%s.", self.name, self._count(), self._rate(rate), self._eta(rate))

    def _count(self) -> str:
        if self.total is None:
            return f"{self.done} {self.unit}"
        percent = 100.0 * self.done / self.total if self.total else 100.0
        return f"{self.done}/{self.total} {self.unit} ({percent:.1f}%)"

    def _rate(self, rate: float) -> str:
        return f"{rate:.3g} {self.unit}/s"

    def _eta(self, rate: float) -> str:
        if self.total is None or rate <= 0:
            return ""
        return f", {format_duration(max(0, self.total - self.done) / rate)} left"

    def _draw_bar(self, now: float) -> None:
        if not self._tty or now - self._last_bar < _BAR_EVERY_SECS:
            return
        self._last_bar = now
        elapsed = now - self._start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        if self.total:
            filled = min(_BAR_WIDTH, _BAR_WIDTH * self.done // self.total)
            bar = f"[{'#' * filled}{'.' * (_BAR_WIDTH - filled)}] "
        else:
            bar = ""
        line = f"{self.name} {bar}{self._count()}, {self._rate(rate)}{self._eta(rate)}"
        self._stream.write(f"\r\033[K{line}")
        self._stream.flush()

    def _clear_bar(self) -> None:
        if self._tty:
            self._stream.write("\r\033[K")
            self._stream.flush()
            self._last_bar = -math.inf  # redraw on the next update


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
