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

METRICS_FILE = "metrics.jsonl"  # written by metric_log.JsonlWriter during training


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


def save_figure(fig: Any, path: str, dpi: int = 120) -> None:
    """A matplotlib Figure to a PNG."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    write_bytes(buffer.getvalue(), path)


def append_jsonl(records: list[dict[str, Any]], path: str | os.PathLike) -> None:
    """Appends one JSON line per record to `path` (created if absent).

    Local files are appended to; a last line left unfinished by a crash mid-append was never
    a record and is cut off first. Object stores cannot append, so there the file is rewritten
    (it stays small: a line per logged step or per finished run).
    """
    if not records:
        return
    text = "".join(json.dumps(json_safe(r), allow_nan=False) + "\n" for r in records)
    if is_remote(path):
        p = epath.Path(path)
        old = p.read_text() if p.exists() else ""
        write_bytes((old + text).encode(), path)
        return
    with open(path, "a+b") as f:
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.seek(0)
                f.truncate(f.read().rfind(b"\n") + 1)
        f.write(text.encode())


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a JSON-lines file; [] when it does not exist.

    A last line cut short by a crash mid-append is ignored; a bad line elsewhere raises.
    """
    p = epath.Path(path)
    if not p.exists():
        return []
    lines = p.read_text().splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}, line {i + 1}, is not JSON: {line[:80]!r}") from None
    return records


def read_metrics(workdir: str | os.PathLike) -> dict[str, np.ndarray]:
    """The series of `<workdir>/metrics.jsonl`: {name: float64 [n, 2] rows of (step, value)}.

    Steps ascend; the last value written for a step wins (a resumed run rewrites the steps it
    redid).
    """
    series: dict[str, dict[int, float]] = {}
    for record in read_jsonl(os.path.join(os.fspath(workdir), METRICS_FILE)):
        step = int(record["step"])
        for name, value in record.items():
            if name != "step":
                series.setdefault(name, {})[step] = np.nan if value is None else value
    return {
        name: np.array(sorted(values.items()), dtype=np.float64).reshape(-1, 2)
        for name, values in series.items()
    }
