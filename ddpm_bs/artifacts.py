"""Files a run writes (JSON summaries, PNGs), written atomically: a temporary file, then a rename.

A crash mid-write leaves the previous file intact, never a truncated one. Paths may be local
or remote (`gs://…`, through etils.epath, as orbax uses).
"""

from __future__ import annotations

import io
import json
import math
import os
from typing import Any

import numpy as np
from etils import epath


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


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` is a URL-style path (gs://, s3://, …) rather than a local one."""
    return "://" in os.fspath(path)


def write_bytes(data: bytes, path: str | os.PathLike) -> None:
    """Writes `data` to `path` through a temporary file and a rename."""
    tmp = epath.Path(os.fspath(path) + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(epath.Path(path))  # atomic on a local filesystem; a copy on object stores


def write_json(obj: Any, path: str, indent: int = 1) -> None:
    text = json.dumps(json_safe(obj), indent=indent, allow_nan=False)
    write_bytes(text.encode(), path)


def save_png(image: np.ndarray, path: str) -> None:
    """uint8 [H, W, C] (C = 1 or 3) to a PNG."""
    from PIL import Image

    if image.shape[-1] == 1:
        image = image[..., 0]
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    write_bytes(buffer.getvalue(), path)
