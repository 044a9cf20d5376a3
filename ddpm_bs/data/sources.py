"""Random-access sources (digits, image folders, tfds data sources) and the preprocessing of an image."""

from __future__ import annotations

import importlib.util
import os
from typing import Protocol

import numpy as np
from PIL import Image

from ddpm_bs.data.spec import DataSpec

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_PROBE = 16  # images decoded when a folder is opened


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
