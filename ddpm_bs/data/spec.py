"""The `data` config section: `DataSpec`, which checks its own fields and names them."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

ON_CORRUPT = ("skip", "halt")


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
