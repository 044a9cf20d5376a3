"""Input pipeline: random-access sources, deterministic order, global batches on a mesh.

The whole pipeline is a pure function of `(seed, step)`:

* Epoch e visits the examples in the order `np.random.default_rng([seed, e]).permutation(N)`.
* The epochs are concatenated into one infinite stream; the global batch at step s is
  stream positions `[s·B, (s+1)·B)`, so epochs wrap inside a batch when N is not a
  multiple of B (a dataset smaller than one batch is fine).
* Each process reads only its contiguous slice of `B / process_count` rows of that batch.
* The horizontal flip of example i in epoch e is bit i of
  `np.random.default_rng([seed, e, 1])`'s draw for that epoch, so it too is a pure function
  of (seed, epoch, index).

`Pipeline.batch_at(step)` computes this process's batch; a `Loader` runs it through grain
(a `MapDataset` over the steps, prefetched in a thread or in worker processes). The order is
this module's rather than grain's `shuffle`, so that epochs can wrap inside a batch, flips
follow (seed, epoch, index), and a run resumed across the change to grain reads the batches
it would have read. A `Loader`'s only state is the step of the next batch (`get_state()` /
`set_state()`), so a run restored from a checkpoint reads exactly the batches the
uninterrupted run would have, whatever `data.num_workers`.

Sources (all random access, `source[i] -> (uint8 [H, W, C] image, int label)`):

* `'digits'`: scikit-learn's bundled 8×8 digits (1,797 images, no download), values 0..16
  mapped to 0..255; the built-in default, for CPU smoke runs.
* `'folder'`: every PNG/JPEG/BMP/WebP image under `data.folder`, recursively, in sorted
  path order; the label is the index of the image's immediate subfolder of `data.folder`
  among the sorted subfolder names (AFHQ's `cat/dog/wild`), or 0 for images at the top.
* any other name: a tfds dataset read with `tfds.data_source` (array_record format, random
  access, no TensorFlow). It must already be prepared in `data.data_dir`; nothing is ever
  downloaded.

Preprocessing (`preprocess`) follows guided-diffusion's `center_crop_arr`, so FID reference
statistics match ADM's: while the short side is at least twice the target, halve with a BOX
filter; then resize so the short side equals `image_size` (BICUBIC when shrinking, BILINEAR
when enlarging: bilinear has no overshoot, which keeps the blocky 8×8 digits free of ringing);
then center-crop to a square. Images already at `image_size` pass through unchanged. Pixels
map to float32 in [−1, 1] as `x / 127.5 − 1`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import importlib.util
import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import grain
import jax
import numpy as np
from absl import flags
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
ON_CORRUPT = ("skip", "halt")
_MAX_REPLACEMENTS = 64  # consecutive unreadable files tolerated before giving up
_PROBE = 16  # images decoded when a folder is opened
_FLIP_STREAM = 1  # third word of the flip PRNG seed, keeps flips independent of the order


# --------------------------------------------------------------------------------------------
# Spec


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """What to read and how to shape it; the `data` section of a config.

    Attributes:
      name: 'digits' (scikit-learn, built in), 'folder' (images under `folder`), or a tfds
        name such as 'cifar10', 'celeb_a', 'imagenet_resized/32x32'.
      data_dir: tfds data directory; None uses tfds' default ($TFDS_DATA_DIR or
        ~/tensorflow_datasets). Only for tfds names.
      folder: root of an image folder; required when name == 'folder'.
      split: tfds split ('train', 'train[:90%]', ...). 'digits' has only 'train'; ignored
        for folders.
      image_size: output height and width in pixels.
      channels: 1 (grayscale) or 3 (RGB); grayscale sources are repeated to 3 channels and
        RGB sources converted to luma (ITU-R 601) as asked.
      random_flip: flip horizontally with probability 1/2, deterministically per
        (seed, epoch, index).
      class_conditional: the model uses labels; requires a source with more than one class.
        Labels are returned either way.
      crop_size: if > 0, first take a centered `crop_size`×`crop_size` crop of the raw image
        (e.g. 140 for CelebA 64×64, as DDIM does); 0 crops the largest centered square.
      prefetch: batches prepared ahead of the training step (grain's prefetch buffer).
      num_workers: grain worker processes preparing batches (decoding and resizing; each
        takes whole batches in turn): 0 prepares them in this process, in grain's prefetch
        thread; −1 is automatic: min(8, CPUs) for folders and tfds, 0 for the in-memory
        digits. The batches do not depend on it.
      num_threads: threads decoding and resizing the images of one batch, in each process
        that prepares batches; 0 = min(16, CPUs), divided among the worker processes.
      on_corrupt: what an unreadable image in a folder does: 'skip' (logged with its path,
        counted, and replaced by the next readable image in source order, so the batch is
        still a pure function of (seed, step)) or 'halt' (an error naming the file).
    """

    name: str = "digits"
    data_dir: str | None = None
    folder: str | None = None
    split: str = "train"
    image_size: int = 32
    channels: int = 3
    random_flip: bool = True
    class_conditional: bool = False
    crop_size: int = 0
    prefetch: int = 2
    num_workers: int = -1
    num_threads: int = 0
    on_corrupt: str = "skip"

    def __post_init__(self):
        _check_type("data.name", self.name, str)
        _check_type("data.split", self.split, str)
        if self.on_corrupt not in ON_CORRUPT:
            raise ValueError(
                f"data.on_corrupt={self.on_corrupt!r} is unknown; valid values: "
                f"{', '.join(ON_CORRUPT)}."
            )
        ints = ("image_size", "channels", "crop_size", "prefetch", "num_workers", "num_threads")
        for field in ints:
            _check_type(f"data.{field}", getattr(self, field), int)
        for field in ("random_flip", "class_conditional"):
            _check_type(f"data.{field}", getattr(self, field), bool)
        for field in ("data_dir", "folder"):
            if getattr(self, field) is not None:
                _check_type(f"data.{field}", getattr(self, field), (str, os.PathLike))
        if not self.name:
            raise ValueError("data.name: empty; use 'digits', 'folder', or a tfds dataset name.")
        if self.image_size < 1:
            raise ValueError(f"data.image_size must be ≥ 1, got {self.image_size}.")
        if self.channels not in (1, 3):
            raise ValueError(f"data.channels must be 1 or 3, got {self.channels}.")
        if self.crop_size < 0:
            raise ValueError(
                f"data.crop_size must be ≥ 0 (0 = largest square), got {self.crop_size}."
            )
        if self.prefetch < 1:
            raise ValueError(f"data.prefetch must be ≥ 1, got {self.prefetch}.")
        if self.num_workers < -1:
            raise ValueError(
                f"data.num_workers must be ≥ −1 (−1 = automatic, 0 = in this process), got "
                f"{self.num_workers}."
            )
        if self.num_threads < 0:
            raise ValueError(
                f"data.num_threads must be ≥ 0 (0 = automatic), got {self.num_threads}."
            )
        if self.name == "folder" and not self.folder:
            raise ValueError(
                "data.folder: must be set to an image directory when data.name='folder'."
            )
        if self.name != "folder" and self.folder:
            raise ValueError(
                f"data.folder is set ({self.folder!r}) but data.name={self.name!r}; "
                "set data.name='folder' to read it, or clear data.folder."
            )
        if self.name == "digits" and self.split != "train":
            raise ValueError(
                f"data.split: 'digits' has only the 'train' split, got {self.split!r}."
            )

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | Any) -> DataSpec:
        """Reads a ConfigDict (or mapping) section with this class's field names.

        Missing fields take the defaults; unknown fields are an error naming them. Empty
        strings for `data_dir`/`folder` mean None.
        """
        values = config_section_values(cfg, cls, "data")
        for field in ("data_dir", "folder"):
            if values.get(field) == "":
                values[field] = None
        return cls(**values)

    @property
    def is_tfds(self) -> bool:
        return self.name not in ("digits", "folder")


def config_section_values(cfg: Any, cls: type, section: str) -> dict[str, Any]:
    """A ConfigDict section (or mapping) as a dict, refusing fields the dataclass `cls` lacks."""
    values = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"{section}.{unknown[0]}: unknown field (all unknown: {unknown}); "
            f"known fields: {sorted(known)}."
        )
    return values


def _check_type(field: str, value: Any, types: type | tuple[type, ...]) -> None:
    bad_bool = isinstance(value, bool) and types is int  # bool is an int subclass
    if bad_bool or not isinstance(value, types):
        raise ValueError(f"{field}: expected {types}, got {value!r} ({type(value).__name__}).")


# --------------------------------------------------------------------------------------------
# Sources


class Source(Protocol):
    """Random access to raw examples."""

    num_classes: int  # 1 when the source has no labels (every label is 0)

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        """Returns (uint8 image [H, W, C] with C in {1, 3}, integer label)."""
        ...


class DigitsSource:
    """scikit-learn's 1,797 8×8 grayscale digits, bundled with the package (no download)."""

    num_classes = 10

    def __init__(self):
        table = _read_digits_table()  # [1797, 65]: 64 pixels in 0..16, then the label
        # 0..16 → 0..255, exactly (16 → 255).
        pixels = np.round(table[:, :64].astype(np.float64) * (255.0 / 16.0))
        self.images = pixels.astype(np.uint8).reshape(-1, 8, 8, 1)  # [1797, 8, 8, 1]
        self.labels = table[:, 64].astype(np.int32)  # [1797]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.images[index], int(self.labels[index])


def _read_digits_table() -> np.ndarray:
    """The table `sklearn.datasets.load_digits` reads, as int64 [1797, 65].

    Read straight from scikit-learn's bundled `digits.csv.gz`: importing
    `sklearn.datasets` costs about 3 s (it pulls in scipy.stats); `load_digits` is the
    fallback if the file ever moves.
    """
    spec = importlib.util.find_spec("sklearn")
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(location, "datasets", "data", "digits.csv.gz")
        if os.path.isfile(path):
            table = np.loadtxt(path, delimiter=",", dtype=np.int64)
            if table.shape == (1797, 65):
                return table
    from sklearn.datasets import load_digits

    digits = load_digits()
    return np.concatenate([digits.data.astype(np.int64), digits.target[:, None]], axis=1)


class UnreadableExample(ValueError):
    """A source file that cannot be decoded; `path` names it."""

    def __init__(self, path: str, message: str):
        super().__init__(message)
        self.path = path

    def __reduce__(self):  # raised in a grain worker process, re-raised in the trainer's
        return type(self), (self.path, str(self))


class FolderSource:
    """Every image under a folder, recursively, in sorted path order.

    Labels: the index of the image's immediate subfolder of `root` among the sorted names
    of the subfolders that hold images; 0 for images directly in `root`.
    """

    def __init__(self, root: str | os.PathLike):
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise FileNotFoundError(
                f"data.folder: {root!r} does not exist or is not a directory; point "
                "data.folder at a directory of PNG/JPEG images."
            )
        paths = []
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            paths += [
                os.path.relpath(os.path.join(dirpath, f), root)
                for f in filenames
                if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)
            ]
        if not paths:
            raise FileNotFoundError(
                f"data.folder: no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root!r}."
            )
        self.root = root
        self.paths = sorted(paths)  # relative, '/'-independent order
        tops = [p.split(os.sep)[0] if os.sep in p else None for p in self.paths]
        self.class_names = sorted({t for t in tops if t is not None})
        class_index = {name: i for i, name in enumerate(self.class_names)}
        self.labels = np.array([class_index.get(t, 0) for t in tops], dtype=np.int32)
        self.num_classes = max(1, len(self.class_names))

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, index: int) -> str:
        return os.path.join(self.root, self.paths[index])

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        path = self.path(index)
        try:
            with Image.open(path) as image:
                image = image.convert("L" if image.mode in ("1", "L", "LA") else "RGB")
                array = np.asarray(image)
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ...
            raise UnreadableExample(
                path,
                f"data.folder: cannot read image {path!r} ({type(e).__name__}: {e}); "
                "remove or replace the file, or set data.on_corrupt='skip'.",
            ) from e
        if array.ndim == 2:
            array = array[..., None]
        return array, int(self.labels[index])


class TfdsSource:
    """A tfds dataset prepared in array_record form, read with `tfds.data_source`."""

    def __init__(self, name: str, split: str, data_dir: str | None):
        self.name = name
        self.data_source = _open_tfds(name, split, data_dir)
        features = self.data_source.dataset_info.features
        if "image" not in features:
            raise ValueError(
                f"data.name: tfds dataset {name!r} has no 'image' feature "
                f"(features: {sorted(features.keys())})."
            )
        label = features["label"] if "label" in features else None
        self.has_labels = label is not None and hasattr(label, "num_classes")
        self.num_classes = int(label.num_classes) if self.has_labels else 1

    def __len__(self) -> int:
        return len(self.data_source)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        example = self.data_source[index]
        image = np.asarray(example["image"], dtype=np.uint8)
        if image.ndim == 2:
            image = image[..., None]
        return image, int(example["label"]) if self.has_labels else 0


def _open_tfds(name: str, split: str, data_dir: str | None):
    """`tfds.data_source(..., download=False)` with errors that say what to do."""
    import tensorflow_datasets as tfds

    if data_dir is not None and not os.path.isdir(data_dir):
        raise FileNotFoundError(
            f"data.data_dir: {data_dir!r} does not exist. Set data.data_dir to the directory "
            f"where {name!r} was prepared (`tfds build {name} --data_dir=DIR "
            "--file_format=array_record`), or leave it unset for tfds' default."
        )
    where = f"data.data_dir={data_dir!r}" if data_dir else "tfds' default data_dir"
    how = (
        f"run `tfds build {name} --data_dir={data_dir or '~/tensorflow_datasets'} "
        "--file_format=array_record` on a machine with network (and TensorFlow), copy the "
        "directory here, and set data.data_dir to it"
    )
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(
            f"data.name: {name!r} is neither 'digits', 'folder' nor a registered tfds dataset."
        ) from e
    except Exception as e:
        try:
            prepared = tfds.builder(name, data_dir=data_dir).is_prepared()
        except Exception:
            prepared = False
        if not prepared:
            raise FileNotFoundError(
                f"data.name: tfds dataset {name!r} is not prepared in {where}; {how}. "
                "Nothing is downloaded at run time."
            ) from e
        if "file format" in str(e).lower() or isinstance(e, NotImplementedError):
            raise ValueError(
                f"data.data_dir: {name!r} is prepared in {where} but not in the array_record "
                f"format that random access needs; {how}."
            ) from e
        raise ValueError(
            f"data.split: cannot open split {split!r} of {name!r} in {where}: {e}"
        ) from e


def open_source(spec: DataSpec) -> Source:
    """Opens the source named by `spec`, raising clear errors before any heavy work."""
    if spec.name == "digits":
        source: Source = DigitsSource()
    elif spec.name == "folder":
        source = FolderSource(spec.folder)
        _probe(source, spec.on_corrupt)
    else:
        source = TfdsSource(spec.name, spec.split, spec.data_dir)
    if len(source) == 0:
        raise ValueError(f"data.name: {spec.name!r} split {spec.split!r} has no examples.")
    if spec.class_conditional and source.num_classes < 2:
        raise ValueError(
            f"data.class_conditional=True but {spec.name!r} has no class labels "
            "(for a folder: put each class in its own subfolder); set it to False."
        )
    return source


def _probe(source: FolderSource, on_corrupt: str) -> None:
    """Decodes the first images now, so a folder of unreadable files fails before training."""
    errors = []
    for index in range(min(_PROBE, len(source))):
        try:
            source[index]
            return
        except UnreadableExample as e:
            if on_corrupt == "halt":
                raise
            errors.append(e)
    raise ValueError(
        f"data.folder: none of the first {len(errors)} images under {source.root!r} can be "
        f"read ({errors[0]}); check the folder's files."
    )


def num_classes(spec: DataSpec) -> int:
    """Number of classes of the spec's source (1 when it has no labels)."""
    return open_source(spec).num_classes


# --------------------------------------------------------------------------------------------
# Preprocessing


def preprocess(
    image: np.ndarray, *, image_size: int, channels: int, crop_size: int = 0
) -> np.ndarray:
    """uint8 [H, W, C] → float32 [image_size, image_size, channels] in [−1, 1].

    Center crop (`crop_size` > 0: a fixed square first) and resize as guided-diffusion's
    `center_crop_arr` does (see the module docstring).
    """
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    pil = Image.fromarray(array.astype(np.uint8, copy=False))
    pil = pil.convert("RGB" if channels == 3 else "L")
    if crop_size:
        width, height = pil.size
        left, top = (width - crop_size) // 2, (height - crop_size) // 2
        pil = pil.crop((left, top, left + crop_size, top + crop_size))
    while min(pil.size) >= 2 * image_size:
        pil = pil.resize(tuple(x // 2 for x in pil.size), resample=Image.Resampling.BOX)
    if min(pil.size) != image_size:
        scale = image_size / min(pil.size)
        resample = Image.Resampling.BICUBIC if scale < 1 else Image.Resampling.BILINEAR
        pil = pil.resize(tuple(max(image_size, round(x * scale)) for x in pil.size), resample)
    out = np.asarray(pil)
    top, left = (out.shape[0] - image_size) // 2, (out.shape[1] - image_size) // 2
    out = out[top : top + image_size, left : left + image_size]
    if out.ndim == 2:
        out = out[..., None]
    return out.astype(np.float32) / 127.5 - 1.0


# --------------------------------------------------------------------------------------------
# Deterministic order


class Pipeline:
    """The deterministic part: which examples, flipped or not, preprocessed, at each step.

    Args:
      source: random-access examples.
      spec: the data spec (image size, channels, flip, crop).
      seed: non-negative integer; the order is a pure function of (seed, step).
      global_batch_size: B, examples per step over all processes.
      rows: this process's rows [start, stop) of each global batch.
    """

    def __init__(
        self,
        source: Source,
        spec: DataSpec,
        *,
        seed: int,
        global_batch_size: int,
        rows: tuple[int, int],
    ):
        self.source = source
        self.spec = spec
        self.seed = int(seed)
        self.global_batch_size = int(global_batch_size)
        self.rows = rows
        self.num_examples = len(source)
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._lock = threading.Lock()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._cache: np.ndarray | None = None
        self.num_threads = spec.num_threads or min(16, os.cpu_count() or 1)
        self.unreadable: dict[str, str] = {}  # path → error, skipped under on_corrupt='skip'
        self.log_skips = True  # False in grain's worker processes: the loader logs for them
        if isinstance(source, DigitsSource):  # tiny and in memory: preprocess once
            pairs = [self._load(i) for i in range(self.num_examples)]
            self._cache = np.stack([image for image, _ in pairs])
            self._cache_labels = np.array([label for _, label in pairs], dtype=np.int32)

    @property
    def local_batch_size(self) -> int:
        return self.rows[1] - self.rows[0]

    @property
    def num_classes(self) -> int:
        return self.source.num_classes

    def epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(permutation [N] int64, flips [N] bool indexed by example) of one epoch."""
        with self._lock:
            if epoch not in self._epochs:
                n = self.num_examples
                perm = np.random.default_rng([self.seed, epoch]).permutation(n)
                flip_rng = np.random.default_rng([self.seed, epoch, _FLIP_STREAM])
                flips = flip_rng.random(n) < 0.5 if self.spec.random_flip else np.zeros(n, bool)
                if len(self._epochs) >= 4:  # a batch rarely spans more than two epochs
                    del self._epochs[min(self._epochs)]
                self._epochs[epoch] = (perm, flips)
            return self._epochs[epoch]

    def indices_at(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(example indices [B_local] int64, flips [B_local] bool) of this process at `step`."""
        if step < 0:
            raise ValueError(f"step must be ≥ 0, got {step}.")
        start = step * self.global_batch_size
        positions = np.arange(start + self.rows[0], start + self.rows[1], dtype=np.int64)
        epochs, offsets = np.divmod(positions, self.num_examples)
        indices = np.empty_like(positions)
        flips = np.empty(positions.shape, dtype=bool)
        for e in np.unique(epochs):
            perm, epoch_flips = self.epoch(int(e))
            mask = epochs == e
            indices[mask] = perm[offsets[mask]]
            flips[mask] = epoch_flips[indices[mask]]
        return indices, flips

    def _load(self, index: int) -> tuple[np.ndarray, int]:
        image, label = self._read(int(index))
        spec = self.spec
        out = preprocess(
            image, image_size=spec.image_size, channels=spec.channels, crop_size=spec.crop_size
        )
        return out, label

    def _read(self, index: int) -> tuple[np.ndarray, int]:
        """source[index], or under on_corrupt='skip' the next readable example after it."""
        for offset in range(_MAX_REPLACEMENTS):
            try:
                return self.source[(index + offset) % self.num_examples]
            except UnreadableExample as e:
                if self.spec.on_corrupt == "halt":
                    raise
                self.note_unreadable([(e.path, str(e))])
        raise ValueError(
            f"data.folder: {_MAX_REPLACEMENTS} consecutive images from index {index} cannot be "
            "read; check the folder's files."
        )

    def note_unreadable(self, skipped: Sequence[tuple[str, str]]) -> None:
        """Counts (path, error) pairs as skipped, logging each path the first time."""
        for path, error in skipped:
            with self._lock:
                new = path not in self.unreadable
                self.unreadable.setdefault(path, error)
            if new and self.log_skips:
                logging.warning(
                    "data: skipping unreadable image %s (%d so far; data.on_corrupt='skip'): %s",
                    path,
                    len(self.unreadable),
                    error,
                )

    def __getstate__(self) -> dict[str, Any]:
        """For grain's worker processes: no lock, pool or epoch cache; skips not logged."""
        state = dict(self.__dict__, _lock=None, _pool=None, _epochs={}, log_skips=False)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    def _map(self, fn: Callable[[int], Any], indices: Sequence[int]) -> list[Any]:
        with self._lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(self.num_threads, "ddpm_bs-data")
            pool = self._pool
        return list(pool.map(fn, indices))

    def load(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Preprocessed, unflipped images [n, H, W, C] float32 and labels [n] int32."""
        if self._cache is not None:
            return self._cache[indices], self._cache_labels[indices]
        pairs = self._map(self._load, indices)
        images = np.stack([image for image, _ in pairs])
        labels = np.array([label for _, label in pairs], dtype=np.int32)
        return images, labels

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        """This process's batch at `step`.

        Returns:
          image: [B_local, H, W, C] float32 in [−1, 1]; label: [B_local] int32.
        """
        indices, flips = self.indices_at(step)
        images, labels = self.load(indices)
        images = np.where(flips[:, None, None, None], images[:, :, ::-1], images)
        return {"image": images, "label": labels}

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------------------------
# Loader (grain)


_LAST_STEP = np.iinfo(np.int64).max // 2**20  # end of the step range: never reached


class _BatchAt:
    """The grain map from a step to (step, this process's host batch, newly skipped paths).

    Runs in grain's prefetch threads or, pickled, in its worker processes. The skipped paths
    ride along with the batch because a worker's `Pipeline.unreadable` is its own copy.
    """

    def __init__(self, pipeline: Pipeline):
        self.pipeline = pipeline
        self._reported: set[str] = set()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"pipeline": self.pipeline}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["pipeline"])

    def __call__(self, step: int) -> tuple[int, dict[str, np.ndarray], tuple[tuple[str, str], ...]]:
        batch = self.pipeline.batch_at(int(step))
        with self._lock:
            unreadable = self.pipeline.unreadable
            new = tuple((p, unreadable[p]) for p in sorted(unreadable.keys() - self._reported))
            self._reported.update(p for p, _ in new)
        return int(step), batch, new


class Loader:
    """Iterator over batches whose whole state is the step of the next batch.

    A grain pipeline over the steps, `MapDataset.range(step, …).map(batch_at)`, prepared
    `prefetch` batches ahead either in grain's prefetch thread in this process, which also
    places each batch as a global `jax.Array` (`jax.make_array_from_process_local_data`)
    given a sharding, or, with `num_workers` > 0, in grain's worker processes (started with
    'spawn': a script that builds one needs an `if __name__ == "__main__":` guard), each
    preparing whole batches in turn with its own decode threads. The step is the checkpointed
    state rather than grain's iterator state, which depends on the worker count: a run may
    resume with other `data.num_workers`. Use it as a context manager or call `close()`.

    Yields:
      dict(image=[B, H, W, C] float32, label=[B] int32): global jax.Arrays sharded by
      `sharding` when one is given, else this process's numpy batch [B_local, ...].
    """

    def __init__(
        self,
        pipeline: Pipeline,
        *,
        sharding: NamedSharding | None = None,
        start_step: int = 0,
        prefetch: int = 2,
        num_workers: int = 0,
    ):
        self.pipeline = pipeline
        self.sharding = sharding
        self.prefetch = prefetch
        self.num_workers = num_workers
        self._step = int(start_step)
        self._iterator: grain.DatasetIterator | None = None

    # State ----------------------------------------------------------------------------------
    @property
    def step(self) -> int:
        """Step of the batch the next `next()` returns."""
        return self._step

    def get_state(self) -> dict[str, int]:
        """JSON-serializable state, e.g. for `orbax.checkpoint.args.JsonSave`."""
        return {"step": self._step}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Restores `get_state()`'s result; the next batch is the one at `state['step']`."""
        step = int(np.asarray(state["step"]))
        if step < 0:
            raise ValueError(f"data loader state: step must be ≥ 0, got {step}.")
        self._close_iterator()
        self._step = step

    # Batches --------------------------------------------------------------------------------
    @property
    def global_batch_size(self) -> int:
        return self.pipeline.global_batch_size

    @property
    def num_examples(self) -> int:
        return self.pipeline.num_examples

    @property
    def num_classes(self) -> int:
        return self.pipeline.num_classes

    @property
    def skipped_examples(self) -> int:
        """Unreadable files skipped so far (data.on_corrupt='skip'), in any worker."""
        return len(self.pipeline.unreadable)

    @property
    def element_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
        """Global shapes, dtypes (and sharding) of a batch, for `jax.eval_shape`/`jit`."""
        spec = self.pipeline.spec
        shapes = {
            "image": (self.global_batch_size, spec.image_size, spec.image_size, spec.channels),
            "label": (self.global_batch_size,),
        }
        dtypes = {"image": np.float32, "label": np.int32}
        return {
            k: jax.ShapeDtypeStruct(shapes[k], dtypes[k], sharding=self.sharding) for k in shapes
        }

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        """This process's host batch at `step` (no grain, no device), as `Pipeline.batch_at`."""
        return self.pipeline.batch_at(step)

    def __iter__(self) -> Loader:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._iterator is None:
            self._iterator = iter(self._dataset(self._step))
        try:
            step, batch = next(self._iterator)
        except BaseException:
            self._close_iterator()  # the next call retries this step
            raise
        assert step == self._step, (step, self._step)
        self._step += 1
        return batch

    def _dataset(self, start: int) -> grain.IterDataset:
        """Placed batches from step `start` on, `prefetch` ahead (no further: a batch that
        has been read is one the run has paid for)."""
        steps = grain.MapDataset.range(start, _LAST_STEP).map(_BatchAt(self.pipeline))
        if not self.num_workers:  # grain's prefetch thread reads and places each batch
            placed = steps.map(self._place)
            read = grain.ReadOptions(num_threads=1, prefetch_buffer_size=self.prefetch)
            return placed.to_iter_dataset(read)
        options = grain.MultiprocessingOptions(
            num_workers=self.num_workers,
            per_worker_buffer_size=max(1, -(-self.prefetch // self.num_workers)),
        )
        if not flags.FLAGS.is_parsed():  # grain reads an absl flag as its workers start
            flags.FLAGS.mark_as_parsed()  # (library callers, pytest): keep the defaults
        sequential = steps.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
        return sequential.mp_prefetch(options).map(self._receive)

    def _place(self, item: tuple[int, dict[str, np.ndarray], tuple[tuple[str, str], ...]]):
        step, batch, _ = item
        return step, _place(batch, self.sharding, self.global_batch_size)

    def _receive(self, item: tuple[int, dict[str, np.ndarray], tuple[tuple[str, str], ...]]):
        """`_place` for a worker process's batch, counting the paths it skipped (threads share
        the pipeline's count; a worker process has its own)."""
        self.pipeline.note_unreadable(item[2])
        return self._place(item)

    def _close_iterator(self) -> None:
        iterator, self._iterator = self._iterator, None
        if iterator is not None:
            iterator.close()

    def close(self) -> None:
        """Stops grain's threads and worker processes and the decode pool; the state is kept."""
        self._close_iterator()
        self.pipeline.close()

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _place(
    batch: dict[str, np.ndarray], sharding: NamedSharding | None, global_batch_size: int
) -> dict[str, Any]:
    if sharding is None:
        return batch
    return {
        k: jax.make_array_from_process_local_data(sharding, v, (global_batch_size, *v.shape[1:]))
        for k, v in batch.items()
    }


# --------------------------------------------------------------------------------------------
# Entry points


def _process_rows(sharding: NamedSharding, global_batch_size: int) -> tuple[int, int]:
    """Rows [start, stop) of a global batch that this process's devices hold."""
    index_map = sharding.addressable_devices_indices_map((global_batch_size,))
    spans = sorted({index[0].indices(global_batch_size)[:2] for index in index_map.values()})
    start, stop = spans[0][0], spans[0][1]
    for a, b in spans[1:]:
        if a != stop:
            raise ValueError(
                "mesh: this process's devices do not hold a contiguous block of the batch "
                "along 'data'; build the mesh with jax.make_mesh so each process's devices "
                "are adjacent along the data axis."
            )
        stop = b
    return start, stop


def build(
    spec: DataSpec,
    *,
    seed: int,
    global_batch_size: int,
    mesh: Mesh | None = None,
    sharding: NamedSharding | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    start_step: int = 0,
) -> Loader:
    """Builds a `Loader` over `spec`'s data, checking the configuration first.

    Args:
      spec: what to read (`DataSpec.from_config(config.data)`).
      seed: non-negative integer (`config.seed`); the batches are a pure function of
        (seed, step).
      global_batch_size: B (`config.train.batch_size`), examples per step over all processes.
      mesh: if given, batches are global jax.Arrays sharded as `NamedSharding(mesh,
        P('data'))`, and this process reads the rows its devices hold.
      sharding: instead of `mesh`, any batch-dimension NamedSharding, e.g.
        `NamedSharding(mesh, P(('data', 'fsdp')))`.
      process_index, process_count: without a mesh, this process reads rows
        [i·B/n, (i+1)·B/n) of each global batch; default jax.process_index()/process_count().
        (With a mesh the rows follow the mesh's devices; do not pass these then.)
      start_step: step of the first batch (or call `set_state` later).

    Raises:
      ValueError, FileNotFoundError: with the config field to fix, before reading any data.
    """
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
    if (
        not isinstance(global_batch_size, (int, np.integer))
        or isinstance(global_batch_size, bool)
        or global_batch_size < 1
    ):
        raise ValueError(f"train.batch_size must be a positive integer, got {global_batch_size!r}.")
    if mesh is not None and sharding is not None:
        raise ValueError("build: pass either mesh or sharding, not both.")
    if mesh is not None:
        if "data" not in mesh.axis_names:
            raise ValueError(f"mesh has no 'data' axis (axes: {mesh.axis_names}); name one 'data'.")
        sharding = NamedSharding(mesh, PartitionSpec("data"))
    if sharding is not None:
        if process_index is not None or process_count is not None:
            raise ValueError(
                "build: with a mesh/sharding the process's rows follow its devices; "
                "do not pass process_index/process_count."
            )
        batch_axes = sharding.spec[0] if len(sharding.spec) else None
        batch_axes = () if batch_axes is None else batch_axes
        batch_axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
        num_shards = int(np.prod([sharding.mesh.shape[a] for a in batch_axes], dtype=np.int64))
        if global_batch_size % num_shards:
            raise ValueError(
                f"train.batch_size={global_batch_size} is not divisible by the {num_shards} "
                f"devices along the mesh's batch axes {batch_axes}; use a multiple of {num_shards}."
            )
        rows = _process_rows(sharding, global_batch_size)
    else:
        process_count = jax.process_count() if process_count is None else process_count
        process_index = jax.process_index() if process_index is None else process_index
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} not in [0, {process_count}).")
        if global_batch_size % process_count:
            raise ValueError(
                f"train.batch_size={global_batch_size} is not divisible by the process count "
                f"{process_count}; use a multiple of {process_count}."
            )
        local = global_batch_size // process_count
        rows = (process_index * local, (process_index + 1) * local)
    if start_step < 0:
        raise ValueError(f"start_step must be ≥ 0, got {start_step}.")
    source = open_source(spec)
    pipeline = Pipeline(
        source, spec, seed=int(seed), global_batch_size=int(global_batch_size), rows=rows
    )
    workers = spec.num_workers
    if workers == -1:
        in_memory = isinstance(source, DigitsSource)
        workers = 0 if in_memory else min(8, os.cpu_count() or 1)
    if workers and not spec.num_threads:
        pipeline.num_threads = max(1, pipeline.num_threads // workers)
    return Loader(
        pipeline,
        sharding=sharding,
        start_step=start_step,
        prefetch=spec.prefetch,
        num_workers=workers,
    )


def load_all(
    spec: DataSpec, max_examples: int | None = None, *, with_labels: bool = False
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """All examples (or the first `max_examples`) in source order, preprocessed, unflipped.

    For FID reference statistics and the optimal-transport locator.

    Returns:
      images [n, image_size, image_size, channels] float32 in [−1, 1]; with `with_labels`,
      also labels [n] int32.
    """
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples must be ≥ 1 or None, got {max_examples}.")
    source = open_source(spec)
    n = len(source) if max_examples is None else min(max_examples, len(source))
    pipeline = Pipeline(source, spec, seed=0, global_batch_size=1, rows=(0, 1))
    try:
        chunks = [pipeline.load(np.arange(i, min(i + 1024, n))) for i in range(0, n, 1024)]
    finally:
        pipeline.close()
    images = np.concatenate([c[0] for c in chunks])
    labels = np.concatenate([c[1] for c in chunks])
    return (images, labels) if with_labels else images
