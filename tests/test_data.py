"""Tests for ddpm_bs.data: sources, preprocessing, deterministic order, sharding, errors."""

import dataclasses
import importlib
import os
import socket
import subprocess
import sys
import threading
import time

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import NamedSharding, PartitionSpec
from PIL import Image

from ddpm_bs import data

DIGITS_8 = data.DataSpec(image_size=8, channels=1, random_flip=False)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test: nothing may download data."""

    def refuse(*args, **kwargs):
        raise AssertionError("the data pipeline tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _collect(loader, n):
    return [jax.tree.map(np.asarray, next(loader)) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])


# --------------------------------------------------------------------------------------------
# Digits


def test_digits_source_matches_sklearn_load_digits():
    from sklearn.datasets import load_digits

    source = data.DigitsSource()
    digits = load_digits()
    assert len(source) == 1797 and source.num_classes == 10
    np.testing.assert_array_equal(source.labels, digits.target)
    expected = np.round(digits.images * 255.0 / 16.0).astype(np.uint8)
    np.testing.assert_array_equal(source.images[..., 0], expected)
    assert source.images.dtype == np.uint8 and source.images.max() == 255


def test_digits_native_size_is_the_raw_pixels_in_minus_one_one():
    images, labels = data.load_all(DIGITS_8, with_labels=True)
    raw = data.DigitsSource()
    assert images.shape == (1797, 8, 8, 1) and images.dtype == np.float32
    np.testing.assert_allclose(images, raw.images / 127.5 - 1.0, atol=1e-6)
    np.testing.assert_array_equal(labels, raw.labels)
    assert set(np.unique(labels)) == set(range(10))


@pytest.mark.parametrize("channels", [1, 3])
def test_digits_upsampled_shape_dtype_range(channels):
    spec = data.DataSpec(image_size=24, channels=channels, random_flip=False)
    images = data.load_all(spec, max_examples=100)
    assert images.shape == (100, 24, 24, channels) and images.dtype == np.float32
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert images.min() == -1.0 and images.max() > 0.9  # background black, strokes bright


def test_digits_three_channels_repeat_the_gray_channel():
    gray = data.load_all(data.DataSpec(image_size=16, channels=1), max_examples=50)
    rgb = data.load_all(data.DataSpec(image_size=16, channels=3), max_examples=50)
    np.testing.assert_array_equal(rgb, np.repeat(gray, 3, axis=-1))


def test_batch_at_shapes_and_labels():
    with data.build(data.DataSpec(image_size=16), seed=0, global_batch_size=32) as loader:
        batch = loader.batch_at(0)
        assert loader.num_examples == 1797 and loader.num_classes == 10
    assert batch["image"].shape == (32, 16, 16, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (32,) and batch["label"].dtype == np.int32
    assert batch["label"].min() >= 0 and batch["label"].max() <= 9


# --------------------------------------------------------------------------------------------
# Determinism and order


def test_batches_are_a_pure_function_of_seed_and_step():
    spec = data.DataSpec(image_size=8, channels=1)
    a = data.build(spec, seed=3, global_batch_size=16)
    b = data.build(spec, seed=3, global_batch_size=16)
    c = data.build(spec, seed=4, global_batch_size=16)
    with a, b, c:
        _assert_batches_equal([a.batch_at(5)], [a.batch_at(5)])
        _assert_batches_equal([a.batch_at(5)], [b.batch_at(5)])
        _assert_batches_equal(_collect(a, 4), _collect(b, 4))
        assert not np.array_equal(a.batch_at(0)["image"], c.batch_at(0)["image"])
        # The iterator yields exactly batch_at(step), in order.
        _assert_batches_equal(_collect(c, 3), [c.batch_at(s) for s in range(3)])


def test_iterator_restored_from_state_continues_the_uninterrupted_stream():
    spec = data.DataSpec(image_size=8, channels=3)
    with data.build(spec, seed=1, global_batch_size=100) as uninterrupted:
        reference = _collect(uninterrupted, 40)  # crosses two epoch boundaries (N = 1797)
    with data.build(spec, seed=1, global_batch_size=100) as first:
        _collect(first, 23)
        state = first.get_state()
    assert state == {"step": 23}
    with data.build(spec, seed=1, global_batch_size=100) as resumed:
        resumed.set_state(state)
        _assert_batches_equal(_collect(resumed, 17), reference[23:])
        # Rewinding a running iterator (prefetch thread alive) also works.
        resumed.set_state({"step": np.int64(5)})
        _assert_batches_equal(_collect(resumed, 3), reference[5:8])
        assert resumed.step == 8


def test_each_epoch_visits_every_example_exactly_once():
    batch = 64
    with data.build(DIGITS_8, seed=7, global_batch_size=batch) as loader:
        n = loader.num_examples
        steps = -(-3 * n // batch)  # covers three epochs
        indices = np.concatenate([loader.pipeline.indices_at(s)[0] for s in range(steps)])
        source_labels = loader.pipeline.source.labels
        labels = np.concatenate([loader.batch_at(s)["label"] for s in range(steps)])
    epochs = [indices[e * n : (e + 1) * n] for e in range(3)]
    for e, order in enumerate(epochs):
        np.testing.assert_array_equal(np.sort(order), np.arange(n))
        np.testing.assert_array_equal(order, np.random.default_rng([7, e]).permutation(n))
        np.testing.assert_array_equal(
            np.bincount(labels[e * n : (e + 1) * n]), np.bincount(source_labels)
        )
    assert not np.array_equal(epochs[0], epochs[1])  # a fresh shuffle each epoch


def test_dataset_smaller_than_a_batch_wraps_epochs(tmp_path):
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 60 * i, np.uint8)).save(tmp_path / f"{i}.png")
    spec = data.DataSpec(
        name="folder", num_workers=0, folder=str(tmp_path), image_size=8, random_flip=False
    )
    with data.build(spec, seed=0, global_batch_size=8) as loader:
        indices, _ = loader.pipeline.indices_at(0)
        batch = next(loader)
    np.testing.assert_array_equal(np.sort(indices[:3]), [0, 1, 2])
    np.testing.assert_array_equal(np.sort(indices[3:6]), [0, 1, 2])
    assert batch["image"].shape == (8, 8, 8, 3)


def test_flip_is_deterministic_about_half_and_a_mirror():
    flipped_spec = data.DataSpec(image_size=8, channels=1, random_flip=True)
    with data.build(flipped_spec, seed=2, global_batch_size=1797) as flipping:
        _, flips = flipping.pipeline.indices_at(0)
        np.testing.assert_array_equal(flips, flipping.pipeline.indices_at(0)[1])
        assert 0.45 < flips.mean() < 0.55
        assert not np.array_equal(flips, flipping.pipeline.indices_at(1)[1])  # next epoch
        flipped = flipping.batch_at(0)["image"]
    with data.build(DIGITS_8, seed=2, global_batch_size=1797) as plain:
        unflipped = plain.batch_at(0)["image"]
    np.testing.assert_array_equal(flipped[~flips], unflipped[~flips])
    np.testing.assert_array_equal(flipped[flips], unflipped[flips][:, :, ::-1])


def test_process_slices_concatenate_to_the_global_batch():
    spec = data.DataSpec(image_size=8, channels=1)
    whole = data.build(spec, seed=0, global_batch_size=96, process_index=0, process_count=1)
    halves = [
        data.build(spec, seed=0, global_batch_size=96, process_index=i, process_count=2)
        for i in range(2)
    ]
    with whole, halves[0], halves[1]:
        for step in (0, 18, 19):  # step 18 straddles the epoch boundary (1797 = 18·96 + 69)
            parts = [h.batch_at(step) for h in halves]
            assert parts[0]["image"].shape == (48, 8, 8, 1)
            expected = whole.batch_at(step)
            for key in ("image", "label"):
                np.testing.assert_array_equal(
                    np.concatenate([p[key] for p in parts]), expected[key]
                )


def test_mesh_loader_yields_global_arrays_sharded_over_data():
    mesh = jax.make_mesh((8,), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    spec = data.DataSpec(image_size=8, channels=3)
    with data.build(spec, seed=0, global_batch_size=16, mesh=mesh) as loader:
        assert loader.element_spec["image"].shape == (16, 8, 8, 3)
        for step in range(3):
            batch = next(loader)
            for key, expected in loader.batch_at(step).items():
                array = batch[key]
                assert isinstance(array, jax.Array)
                assert array.sharding.is_equivalent_to(sharding, array.ndim)
                assert array.shape == expected.shape and array.dtype == expected.dtype
                assert {s.data.shape[0] for s in array.addressable_shards} == {2}
                np.testing.assert_array_equal(np.asarray(array), expected)


@pytest.mark.parametrize("prefetch", [1, 3])
def test_the_loader_reads_at_most_prefetch_batches_ahead(monkeypatch, prefetch):
    read, batch_at = [], data.Pipeline.batch_at

    def recording(self, step):
        read.append(step)
        return batch_at(self, step)

    monkeypatch.setattr(data.Pipeline, "batch_at", recording)
    spec = dataclasses.replace(DIGITS_8, prefetch=prefetch)
    with data.build(spec, seed=0, global_batch_size=8) as loader:
        _collect(loader, 4)
        time.sleep(0.5)  # time for the prefetch thread to run as far ahead as it may
        assert max(read) == 3 + prefetch  # batches 0..3 taken, `prefetch` more ready
        assert sorted(read) == list(range(4 + prefetch))


def test_close_stops_the_prefetch_threads():
    before = set(threading.enumerate())
    loader = data.build(DIGITS_8, seed=0, global_batch_size=8)
    next(loader)
    started = set(threading.enumerate()) - before
    assert started  # grain's prefetch threads
    loader.close()
    for thread in started:
        thread.join(timeout=10)
        assert not thread.is_alive(), thread.name
    assert loader.get_state() == {"step": 1}


# --------------------------------------------------------------------------------------------
# tfds (mocked: no TensorFlow, no download)


def test_tfds_cifar10_mock_through_data_source(no_network):
    spec = data.DataSpec(name="cifar10", image_size=16, random_flip=False, num_workers=0)
    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, num_examples=20):
        raw = tfds.data_source("cifar10", split="train", download=False)
        assert raw[0]["image"].shape == (32, 32, 3)
        with data.build(spec, seed=0, global_batch_size=8) as loader:
            assert loader.num_examples == 20 and loader.num_classes == 10
            batch = next(loader)
        native = data.load_all(data.DataSpec(name="cifar10", image_size=32), with_labels=True)
    assert batch["image"].shape == (8, 16, 16, 3) and batch["image"].dtype == np.float32
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
    assert batch["label"].dtype == np.int32 and 0 <= batch["label"].min() <= 9
    images, labels = native
    assert images.shape == (20, 32, 32, 3)  # already 32×32: passes through unchanged
    np.testing.assert_allclose(images[3], raw[3]["image"] / 127.5 - 1.0, atol=1e-6)
    assert labels[3] == raw[3]["label"]


def test_tfds_path_imports_no_tensorflow():
    # In a fresh interpreter: other tests import clu, which imports TensorFlow for its writers.
    code = (
        "import sys, tensorflow_datasets as tfds\n"
        "from ddpm_bs import data\n"
        "with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, num_examples=8):\n"
        "    with data.build(data.DataSpec(name='cifar10', image_size=8, num_workers=0), seed=0,"
        " global_batch_size=4) as loader:\n"
        "        next(loader)\n"
        "assert 'tensorflow' not in sys.modules, 'the array_record path imported TensorFlow'\n"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_tfds_unprepared_dataset_says_how_to_prepare_it(tmp_path, no_network):
    spec = data.DataSpec(name="cifar10", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"data\.name.*not prepared.*tfds build cifar10"):
        data.build(spec, seed=0, global_batch_size=8)


def test_tfds_missing_data_dir_names_the_field(tmp_path, no_network):
    spec = data.DataSpec(name="cifar10", data_dir=str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match=r"data\.data_dir"):
        data.build(spec, seed=0, global_batch_size=8)


def test_unknown_dataset_name_names_the_field(no_network):
    with pytest.raises(ValueError, match=r"data\.name.*no_such_dataset_xyz"):
        data.build(data.DataSpec(name="no_such_dataset_xyz"), seed=0, global_batch_size=8)


def test_empty_dataset_is_an_error(no_network):
    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, num_examples=0):
        with pytest.raises(ValueError, match=r"data\.name.*no examples"):
            data.build(data.DataSpec(name="cifar10"), seed=0, global_batch_size=8)


# --------------------------------------------------------------------------------------------
# Image folders


def _banded(width, height, band, center, edge):
    """[height, width, 3]: `center` colour, with `band`-pixel `edge` strips on the long sides."""
    image = np.empty((height, width, 3), np.uint8)
    image[:] = center
    if width > height:
        image[:, :band], image[:, width - band :] = edge, edge
    else:
        image[:band], image[height - band :] = edge, edge
    return image


@pytest.fixture
def image_folder(tmp_path):
    """cat/: two wide PNGs; dog/: a tall JPEG and a grayscale PNG; all non-square."""
    green, red = (0, 255, 0), (255, 0, 0)
    (tmp_path / "cat").mkdir()
    (tmp_path / "dog" / "nested").mkdir(parents=True)
    Image.fromarray(_banded(48, 32, 8, green, red)).save(tmp_path / "cat" / "a.png")
    Image.fromarray(_banded(48, 32, 8, green, red)).save(tmp_path / "cat" / "b.PNG")
    Image.fromarray(_banded(32, 48, 8, green, red)).save(
        tmp_path / "dog" / "c.jpg", quality=95, subsampling=0
    )
    Image.fromarray(np.full((20, 30), 200, np.uint8)).save(tmp_path / "dog" / "nested" / "d.png")
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    return tmp_path


def test_folder_source_labels_from_sorted_subfolders(image_folder):
    source = data.FolderSource(image_folder)
    assert source.paths == ["cat/a.png", "cat/b.PNG", "dog/c.jpg", "dog/nested/d.png"]
    assert source.class_names == ["cat", "dog"] and source.num_classes == 2
    np.testing.assert_array_equal(source.labels, [0, 0, 1, 1])


def test_folder_images_are_center_cropped_and_resized(image_folder):
    spec = data.DataSpec(name="folder", folder=str(image_folder), image_size=16, channels=3)
    images, labels = data.load_all(spec, with_labels=True)
    assert images.shape == (4, 16, 16, 3) and images.dtype == np.float32
    np.testing.assert_array_equal(labels, [0, 0, 1, 1])
    green = np.array([-1.0, 1.0, -1.0], np.float32)
    # 48×32 → BOX-halved to 24×16 → centre 16 columns: exactly the green square, no red.
    np.testing.assert_array_equal(images[0], np.broadcast_to(green, (16, 16, 3)))
    # The tall JPEG: the same, up to compression error at the rows next to the cut-off red.
    np.testing.assert_allclose(images[2, 1:-1], np.broadcast_to(green, (14, 16, 3)), atol=0.1)
    assert images[2, :, :, 0].max() < -0.5  # no red band left
    np.testing.assert_allclose(images[3], 200 / 127.5 - 1.0, atol=1e-6)  # gray → RGB


def test_folder_with_a_corrupt_image_halts_naming_its_path(image_folder):
    bad = image_folder / "dog" / "zzz.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    spec = data.DataSpec(
        name="folder", num_workers=0, folder=str(image_folder), image_size=8, on_corrupt="halt"
    )
    with pytest.raises(ValueError, match=r"data\.folder.*zzz\.png"):
        data.load_all(spec)
    with data.build(spec, seed=0, global_batch_size=5) as loader:  # 5 images: every batch has it
        with pytest.raises(ValueError, match=r"data\.folder.*zzz\.png"):
            next(loader)
        assert loader.step == 0


def test_folder_with_a_corrupt_image_skips_and_counts_it(image_folder, caplog):
    bad = image_folder / "dog" / "zzz.png"  # last in source order: replaced by index 0, cat/a.png
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    spec = data.DataSpec(
        name="folder", num_workers=0, folder=str(image_folder), image_size=8, random_flip=False
    )
    with data.build(spec, seed=0, global_batch_size=5) as loader, caplog.at_level("WARNING"):
        batches = [next(loader) for _ in range(3)]  # the corrupt file is in every batch
        assert loader.skipped_examples == 1
    assert sum("zzz.png" in r.getMessage() for r in caplog.records) == 1  # reported once
    bad.unlink()
    readable = data.load_all(spec)  # the 4 good images
    for step, batch in enumerate(batches):
        indices, _ = loader.pipeline.indices_at(step)
        np.testing.assert_array_equal(batch["image"], readable[np.where(indices == 4, 0, indices)])


def test_worker_processes_give_the_same_batches_and_count_skips_once(image_folder, caplog):
    bad = image_folder / "dog" / "zzz.png"  # in every batch of 5: both workers meet it
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    spec = data.DataSpec(name="folder", folder=str(image_folder), image_size=8, num_workers=2)
    in_process = dataclasses.replace(spec, num_workers=0)
    with data.build(in_process, seed=0, global_batch_size=5) as loader:
        expected = _collect(loader, 4)
    caplog.clear()
    with data.build(spec, seed=0, global_batch_size=5) as loader, caplog.at_level("WARNING"):
        assert loader.num_workers == 2
        _assert_batches_equal(_collect(loader, 4), expected)
        assert loader.skipped_examples == 1  # counted in this process, once over the workers
    assert sum("zzz.png" in r.getMessage() for r in caplog.records) == 1
    halting = dataclasses.replace(spec, on_corrupt="halt", num_workers=1)
    with data.build(halting, seed=0, global_batch_size=5) as loader:
        with pytest.raises(ValueError, match=r"data\.folder.*zzz\.png"):
            next(loader)
        assert loader.step == 0


def test_folder_with_a_corrupt_first_image_fails_at_build_when_halting(tmp_path):
    (tmp_path / "a.png").write_bytes(b"garbage")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "b.png")
    spec = data.DataSpec(name="folder", folder=str(tmp_path), on_corrupt="halt")
    with pytest.raises(ValueError, match=r"data\.folder.*a\.png"):
        data.build(spec, seed=0, global_batch_size=8)
    data.build(data.DataSpec(name="folder", folder=str(tmp_path)), seed=0, global_batch_size=8)


def test_folder_of_only_unreadable_images_fails_at_build(tmp_path):
    for name in ("a.png", "b.jpg"):
        (tmp_path / name).write_bytes(b"garbage")
    spec = data.DataSpec(name="folder", folder=str(tmp_path))
    with pytest.raises(ValueError, match=r"data\.folder: none of the first 2 images"):
        data.build(spec, seed=0, global_batch_size=8)


def test_empty_or_missing_folder_is_an_error(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("")
    for folder in (tmp_path / "empty", tmp_path / "missing"):
        spec = data.DataSpec(name="folder", folder=str(folder))
        with pytest.raises(FileNotFoundError, match=r"data\.folder"):
            data.build(spec, seed=0, global_batch_size=8)


def test_class_conditional_needs_labels(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "x.png")
    spec = data.DataSpec(name="folder", folder=str(tmp_path), class_conditional=True)
    with pytest.raises(ValueError, match=r"data\.class_conditional"):
        data.build(spec, seed=0, global_batch_size=8)


# --------------------------------------------------------------------------------------------
# Configuration errors


def test_from_config_reads_fields_and_defaults():
    cfg = ml_collections.ConfigDict(
        {"name": "folder", "folder": "/images", "image_size": 64, "data_dir": ""}
    )
    spec = data.DataSpec.from_config(cfg)
    assert spec == data.DataSpec(name="folder", folder="/images", image_size=64)
    assert data.DataSpec.from_config(ml_collections.ConfigDict()) == data.DataSpec()
    with pytest.raises(ValueError, match=r"data\.imagesize: unknown field"):
        data.DataSpec.from_config(ml_collections.ConfigDict({"imagesize": 64}))


def test_default_config_and_data_spec_agree_in_both_directions():
    section = importlib.import_module("configs.default").get_config().data
    assert set(section.keys()) == {f.name for f in dataclasses.fields(data.DataSpec)}
    assert data.DataSpec.from_config(section) == data.DataSpec()


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(image_size=0), r"data\.image_size"),
        (dict(image_size=32.0), r"data\.image_size"),
        (dict(channels=2), r"data\.channels"),
        (dict(name="folder"), r"data\.folder"),
        (dict(name="cifar10", folder="/x"), r"data\.folder"),
        (dict(split="test"), r"data\.split"),
        (dict(random_flip=1), r"data\.random_flip"),
        (dict(num_workers=-2), r"data\.num_workers must be ≥ −1"),
        (dict(num_threads=-1), r"data\.num_threads"),
        (dict(prefetch=0), r"data\.prefetch"),
    ],
)
def test_spec_validation_names_the_field(fields, match):
    with pytest.raises(ValueError, match=match):
        data.DataSpec(**fields)


def test_batch_size_must_split_over_processes_and_devices():
    with pytest.raises(ValueError, match=r"train\.batch_size=64 .*process count 3"):
        data.build(DIGITS_8, seed=0, global_batch_size=64, process_index=0, process_count=3)
    mesh = jax.make_mesh((8,), ("data",))
    with pytest.raises(ValueError, match=r"train\.batch_size=12 .*8 devices"):
        data.build(DIGITS_8, seed=0, global_batch_size=12, mesh=mesh)
    with pytest.raises(ValueError, match=r"train\.batch_size"):
        data.build(DIGITS_8, seed=0, global_batch_size=0)
    with pytest.raises(ValueError, match=r"seed"):
        data.build(DIGITS_8, seed=-1, global_batch_size=8)


def test_batch_can_be_sharded_over_several_mesh_axes():
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"))
    sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    with data.build(DIGITS_8, seed=0, global_batch_size=16, sharding=sharding) as loader:
        batch = next(loader)
        np.testing.assert_array_equal(np.asarray(batch["image"]), loader.batch_at(0)["image"])
    assert {s.data.shape[0] for s in batch["image"].addressable_shards} == {2}
    with pytest.raises(ValueError, match=r"train\.batch_size=12 .*8 devices"):
        data.build(DIGITS_8, seed=0, global_batch_size=12, sharding=sharding)
