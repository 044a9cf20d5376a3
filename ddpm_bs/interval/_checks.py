"""Argument checks shared by the interval modules; each error names the argument or field."""

from __future__ import annotations

from typing import Any

import numpy as np


def as_flat(images: Any, name: str) -> np.ndarray:
    array = np.asarray(images, dtype=np.float32)
    if array.ndim < 2:
        raise ValueError(f"{name} must be [n, H, W, C] or [n, d], got shape {array.shape}.")
    if array.shape[0] == 0 or array[0].size == 0:
        raise ValueError(f"{name} is empty (shape {array.shape}); it needs at least one image.")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} has non-finite values.")
    return array.reshape(array.shape[0], -1)


def check_timesteps(timesteps: Any, num_timesteps: int) -> np.ndarray:
    t = np.asarray(timesteps)
    if t.ndim != 1 or t.size == 0 or not np.issubdtype(t.dtype, np.integer):
        raise ValueError(
            f"timesteps must be a non-empty 1-D integer array, got {t.dtype} shape {t.shape}."
        )
    if t.min() < 0 or t.max() >= num_timesteps or np.any(np.diff(t) <= 0):
        raise ValueError(
            f"timesteps must be increasing 0-based indices in [0, {num_timesteps}), got "
            f"{t.tolist() if t.size <= 8 else t}."
        )
    return t.astype(np.int64)


def check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer ≥ {minimum}, got {value!r}.")


def check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}.")


def check_delta(name: str, value: Any) -> float:
    ok = isinstance(value, (int, float, np.floating)) and not isinstance(value, bool)
    if not (ok and 0.0 < float(value) < 1.0):
        raise ValueError(f"{name} must be in the open interval (0, 1), got {value!r}.")
    return float(value)
