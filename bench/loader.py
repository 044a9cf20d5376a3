"""Input-pipeline throughput: images per second through `data.build` on a folder of JPEGs.

Writes `--images` random 128×128 JPEGs (smooth colour fields plus noise, quality 90, in
class subfolders) to a temporary directory, then times the loaders over it at
`--image-size` (128 → 64 is one BOX halving, as for a 64×64 model): the grain loader
with its batches prepared in this process (`data.num_workers=0`) and in grain worker
processes (`--workers`), and, with `--old-rev`, the hand-built thread loader it replaced,
read from that git revision of `ddpm_bs/data.py` (so both run on the same files, machine
and load). Each figure is the median of `--repeats` timed runs of `--steps` batches after a
warm-up batch per worker process (which starts them); the loaders take turns within each
repeat, so machine load hits them alike. One JSON line per loader:

    {"bench": "loader", "loader": ..., "workers": ..., "images_per_s": ..., "min": ...,
     "max": ..., "images": ..., "image_size": ..., "batch": ..., "steps": ..., ...}

Usage:

    python bench/loader.py                       # 3,000 JPEGs, grain (0 and 2 workers) vs old
    python bench/loader.py --smoke               # 64 JPEGs, 2 steps, grain in process only
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from ddpm_bs import data  # noqa: E402

# The last revision of ddpm_bs/data.py with the hand-built loader (threads and a queue).
OLD_REV = "b9d362a38b2ae4655b45bdea5db7281498d37f69"


def write_jpegs(root: Path, n: int, size: int, seed: int = 0) -> None:
    """n size×size JPEGs in 4 class subfolders: a smooth random field plus pixel noise."""
    rng = np.random.default_rng(seed)
    for c in range(4):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        field = Image.fromarray(coarse).resize((size, size), Image.Resampling.BILINEAR)
        pixels = np.asarray(field, np.int16) + rng.integers(-20, 21, (size, size, 3))
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        image.save(root / f"class{i % 4}" / f"{i:06d}.jpg", quality=90)


def load_old_module(rev: str):
    """`ddpm_bs/data.py` at git revision `rev`, imported under another name."""
    source = subprocess.run(
        ["git", "show", f"{rev}:ddpm_bs/data.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "data_before_grain.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("data_before_grain", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def time_loader(module, folder: Path, workers: int | None, args) -> float:
    """Seconds for `args.steps` batches from a fresh loader, after one warm-up batch per worker
    process (grain's workers take batches in turn, so each has started) or one in all."""
    fields = dict(name="folder", folder=str(folder), image_size=args.image_size)
    if workers is not None:  # the grain loader; the old one's defaults are its thread pool
        fields["num_workers"] = workers
    spec = module.DataSpec(**fields)
    with module.build(spec, seed=0, global_batch_size=args.batch) as loader:
        for _ in range(max(1, workers or 0)):
            next(loader)
        start = time.perf_counter()
        for _ in range(args.steps):
            next(loader)
        return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--size", type=int, default=128, help="side of the JPEGs, pixels")
    parser.add_argument("--image-size", type=int, default=64, help="side the loader outputs")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40, help="timed batches per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", default="2", help="comma-separated grain worker counts")
    parser.add_argument("--old-rev", default=OLD_REV, help="git revision of the old loader")
    parser.add_argument("--no-old", action="store_true", help="skip the old loader")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.images, args.batch, args.steps, args.repeats = 64, 16, 2, 1
        args.workers, args.no_old = "", True

    loaders = {"grain": (data, 0)}
    for w in filter(None, args.workers.split(",")):
        loaders[f"grain_{int(w)}_workers"] = (data, int(w))
    if not args.no_old:
        loaders = {"old_threads": (load_old_module(args.old_rev), None), **loaders}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "jpegs"
        write_jpegs(folder, args.images, args.size)
        seconds = {name: [] for name in loaders}
        for _ in range(args.repeats):
            for name, (module, workers) in loaders.items():
                seconds[name].append(time_loader(module, folder, workers, args))
    images = args.steps * args.batch
    for name, (_, workers) in loaders.items():
        rates = [images / s for s in seconds[name]]
        record = {
            "bench": "loader",
            "loader": name,
            "workers": workers,
            "images_per_s": round(statistics.median(rates), 1),
            "min": round(min(rates), 1),
            "max": round(max(rates), 1),
            "images": args.images,
            "jpeg_size": args.size,
            "image_size": args.image_size,
            "batch": args.batch,
            "steps": args.steps,
            "repeats": args.repeats,
            "cpus": os.cpu_count(),
            "load_avg_1m": round(os.getloadavg()[0], 2),
            "date": time.strftime("%Y-%m-%d", time.gmtime()),
        }
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
