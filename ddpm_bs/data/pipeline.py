"""The deterministic batch at each step (`Pipeline`), and the grain loader that prefetches it onto the mesh."""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
from absl import flags
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ddpm_bs.data.sources import (
    DigitsSource,
    Source,
    UnreadableExample,
    open_source,
    preprocess,
)
from ddpm_bs.data.spec import DataSpec

_MAX_REPLACEMENTS = 64  # consecutive unreadable files tolerated before giving up
_FLIP_STREAM = 1  # third word of the flip PRNG seed, keeps flips independent of the order


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
