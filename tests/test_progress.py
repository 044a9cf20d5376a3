"""progress.Progress: the lines it logs, under a fake clock (no sleeping)."""

import io
import logging

import jax
import numpy as np
import pytest

from ddpm_bs import progress


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "absl"]


def test_logs_start_every_interval_and_end_with_rate_and_time_left(caplog):
    clock = FakeClock()
    caplog.set_level(logging.INFO)
    with progress.Progress("sampling", total=1000, unit="img", clock=clock, enabled=True) as bar:
        clock.now = 10.0
        bar.update(100)  # 10 s after the start: under the 30 s interval, no line
        clock.now = 30.0
        bar.update(200)  # 300 done in 30 s: 10 img/s, 700 left -> 70 s
        clock.now = 40.0
        bar.update(100)
        clock.now = 60.0
        bar.update(500)  # 600 done in this interval of 30 s: 20 img/s, 100 left -> 5 s
        clock.now = 62.0
    assert _messages(caplog) == [
        "sampling: started, 1000 img to do.",
        "sampling: 300/1000 img (30.0%), 10 img/s, 1m10s left.",
        "sampling: 900/1000 img (90.0%), 20 img/s, 5s left.",
        # 900 in 62 s: 14.516... img/s
        "sampling: done, 900/1000 img (90.0%) in 1m02s, 14.5 img/s.",
    ]


def test_unknown_total_reports_counts_and_rates_only(caplog):
    clock = FakeClock()
    caplog.set_level(logging.INFO)
    with progress.Progress("features", unit="batch", every_secs=5, clock=clock, enabled=True) as b:
        clock.now = 8.0
        b.update(4)
    assert _messages(caplog) == [
        "features: started.",
        "features: 4 batch, 0.5 batch/s.",
        "features: done, 4 batch in 8s, 0.5 batch/s.",
    ]


def test_an_exception_is_reported_and_passes_through(caplog):
    clock = FakeClock()
    caplog.set_level(logging.INFO)
    with pytest.raises(KeyError):
        with progress.Progress("stats", total=10, clock=clock, enabled=True) as bar:
            clock.now = 2.0
            bar.update(3)
            raise KeyError("x")
    assert _messages(caplog)[-1] == "stats: stopped (KeyError), 3/10 it (30.0%) in 2s, 1.5 it/s."


def test_only_process_zero_reports(caplog, monkeypatch):
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    terminal = Terminal()
    with progress.Progress("sampling", total=4, clock=FakeClock(), stream=terminal) as bar:
        bar.update(4)
    assert _messages(caplog) == [] and terminal.getvalue() == ""
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    with progress.Progress("sampling", total=4, clock=FakeClock()) as bar:
        bar.update(4)
    assert len(_messages(caplog)) == 2


def test_the_bar_is_drawn_on_a_terminal_only():
    clock = FakeClock()
    terminal, pipe = Terminal(), io.StringIO()
    for stream in (terminal, pipe):
        clock.now = 0.0
        with progress.Progress("eval", total=8, clock=clock, stream=stream, enabled=True) as bar:
            clock.now = 1.0
            bar.update(2)  # a quarter of the 24-character bar: 6 marks
    assert pipe.getvalue() == ""
    drawn = terminal.getvalue().split("\r\033[K")
    assert "eval [######" + "." * 18 + "] 2/8 it (25.0%), 2 it/s, 3s left" in drawn
    assert drawn[-1] == ""  # the bar is cleared before the last log line


@pytest.mark.parametrize(
    "seconds, text", [(0, "0s"), (59.4, "59s"), (61, "1m01s"), (3600 + 62, "1h01m02s")]
)
def test_format_duration(seconds, text):
    assert progress.format_duration(seconds) == text


# --------------------------------------------------------------------------------------------
# Where long jobs report


@pytest.mark.parametrize("n, last_piece", [(1030, 6), (1026, 66), (50, 50), (3, 3)])
def test_inception_features_in_pieces_equal_one_pass(monkeypatch, caplog, n, last_piece):
    from ddpm_bs import evaluation, inception

    calls = []

    def features(images, variables, *, batch_size):  # stands in for the network
        calls.append(images.shape[0])
        flat = images.reshape(images.shape[0], -1).astype(np.float32)
        return {"pool3": flat[:, :2], "spatial": flat[:, 2:5], "logits": flat[:, :1]}

    monkeypatch.setattr(inception, "features", features)
    monkeypatch.setattr(evaluation.metrics, "PROGRESS_BATCHES", 16)
    images = np.random.default_rng(0).integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)
    caplog.set_level(logging.INFO)
    pieces = evaluation.inception_features(images, None, batch_size=4, progress_name="feats")
    whole = features(images, None, batch_size=4)
    for key in whole:
        np.testing.assert_array_equal(pieces[key], whole[key])
    # Pieces of 16 batches; a tail shorter than one batch joins the piece before it, so the
    # network sees no batch shape but 4 (and n itself when n < 4).
    assert calls[:-1] == [64] * (len(calls) - 2) + [last_piece]
    assert _messages(caplog)[-1].startswith(f"feats: done, {n}/{n} img (100.0%)")
