"""Stopping a run cleanly: SIGTERM / SIGINT, and the cluster's preemption notice.

`StopRequest` is a context manager around the training loop. While it is active, the first
SIGTERM or SIGINT only sets a flag; the loop finishes its current step, writes a checkpoint
synchronously and returns, so the process exits 0 and a rerun of the same command resumes.
A second SIGINT (Ctrl-C twice) interrupts at once.

With several processes every one must stop at the same step, or their checkpoints would
disagree. There JAX's preemption sync service decides: when any process receives SIGTERM
(the notice SLURM, GKE and Cloud TPU send before evicting), all processes agree on the next
safe step, and `reached(step)` is true on each of them at that step. SIGINT is then not
intercepted (a Ctrl-C on one process of a job is not a preemption).
"""

from __future__ import annotations

import logging
import signal
import threading

import jax
from jax.experimental import multihost_utils


class StopRequest:
    """Tells the loop, at each step, whether to checkpoint and stop."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be installed from the main thread
        # With several processes JAX's preemption service owns SIGTERM (see the module doc).
        signals = (signal.SIGINT, signal.SIGTERM) if jax.process_count() == 1 else ()
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        del frame
        name = signal.Signals(signum).name
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C
        self.signal_name = name
        logging.warning(
            "%s received: finishing the current step, then writing a checkpoint and stopping "
            "(press Ctrl-C again to interrupt at once).",
            name,
        )

    def reached(self, step: int) -> bool:
        """Whether to checkpoint and stop after `step` (every process calls it every step)."""
        if jax.process_count() > 1:
            if multihost_utils.reached_preemption_sync_point(step):
                self.signal_name = self.signal_name or "preemption notice"
                return True
            return False
        return self.signal_name is not None
