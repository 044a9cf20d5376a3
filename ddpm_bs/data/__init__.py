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
map to float32 in [−1, 1] as `x / 127.5 −

Modules, one job each:
  spec      `DataSpec`, the `data` config section, checked;
  sources   the random-access sources and `preprocess`;
  pipeline  `Pipeline` (the batch at each step), the grain `Loader`, `build` and `load_all`.
"""

from ddpm_bs.data.pipeline import Loader, Pipeline, build, load_all
from ddpm_bs.data.sources import (
    IMAGE_EXTENSIONS,
    DigitsSource,
    FolderSource,
    Source,
    TfdsSource,
    UnreadableExample,
    num_classes,
    open_source,
    preprocess,
)
from ddpm_bs.data.spec import ON_CORRUPT, DataSpec, config_section_values

__all__ = [
    "IMAGE_EXTENSIONS",
    "ON_CORRUPT",
    "DataSpec",
    "DigitsSource",
    "FolderSource",
    "Loader",
    "Pipeline",
    "Source",
    "TfdsSource",
    "UnreadableExample",
    "build",
    "config_section_values",
    "load_all",
    "num_classes",
    "open_source",
    "preprocess",
]
