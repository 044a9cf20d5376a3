"""Files a run writes (JSON summaries, PNGs), written atomically: a temporary file, then a rename.

A crash mid-write leaves the previous file intact, never a truncated one.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np


def json_safe(obj: Any) -> Any:
    """NaN/inf become None (strict JSON); numpy scalars become Python; containers are walked."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(obj: Any, path: str, indent: int = 1) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(json_safe(obj), f, indent=indent, allow_nan=False)
    os.replace(tmp, path)


def save_png(image: np.ndarray, path: str) -> None:
    """uint8 [H, W, C] (C = 1 or 3) to a PNG."""
    from PIL import Image

    if image.shape[-1] == 1:
        image = image[..., 0]
    tmp = path + ".tmp"
    Image.fromarray(image).save(tmp, format="PNG")
    os.replace(tmp, path)
