"""The mesh and the FSDP layout on 8 fake CPU devices: same numbers, ~8× less state per device."""

import importlib
import types

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh
from jax.sharding import PartitionSpec as P

from configs import default
from ddpm_bs import data, sharding, train


@pytest.mark.parametrize(
    "shape, fsdp, expected",
    [
        ((3, 3, 128, 256), 8, P(None, None, None, "fsdp")),  # largest divisible dim
        ((3, 3, 256, 128), 8, P(None, None, "fsdp")),
        ((1001, 512), 8, P(None, "fsdp")),  # the largest dim is not divisible: the next one
        ((3, 3, 129, 130), 8, P()),  # no dim divisible by 8: replicated
        ((256,), 8, P()),  # small: replicated
        ((), 8, P()),  # a step counter
        ((3, 3, 128, 256), 1, P()),  # no fsdp axis to split over
    ],
)
def test_param_spec_splits_big_arrays_on_their_largest_divisible_dim(shape, fsdp, expected):
    assert sharding.param_spec(shape, fsdp) == expected


@pytest.mark.parametrize(
    "data_, fsdp, expected",
    [(-1, 1, (8, 1)), (2, -1, (2, 4)), (-1, 8, (1, 8)), (4, 2, (4, 2)), (2, 2, (2, 2))],
)
def test_mesh_shape_resolves_the_remaining_devices(data_, fsdp, expected):
    assert sharding.mesh_shape(data_, fsdp, 8) == expected
    mesh = sharding.make_mesh(data_, fsdp)
    assert (mesh.shape["data"], mesh.shape["fsdp"]) == expected


@pytest.mark.parametrize(
    "data_, fsdp, match",
    [
        (-1, -1, "both −1"),
        (3, -1, r"mesh\.data=3 does not divide the 8 devices"),
        (-1, 3, r"mesh\.fsdp=3 does not divide"),
        (4, 4, r"16 devices, but only 8"),
        (0, 1, r"mesh\.data=0 must be"),
    ],
)
def test_mesh_shape_errors_name_the_field(data_, fsdp, match):
    with pytest.raises(ValueError, match=match):
        sharding.mesh_shape(data_, fsdp, 8)


def test_make_mesh_takes_jax_make_meshs_layout_with_auto_axes(monkeypatch):
    calls = []

    def topology_mesh(shape, names, axis_types=None, *, devices):  # a layout of its own
        calls.append((tuple(shape), tuple(names), tuple(d.id for d in devices)))
        axis_types = axis_types or (AxisType.Explicit,) * len(shape)  # jax.make_mesh's default
        return Mesh(np.asarray(devices[::-1]).reshape(shape), names, axis_types=axis_types)

    monkeypatch.setattr(jax, "make_mesh", topology_mesh)
    mesh = sharding.make_mesh(2, 2)
    assert calls == [((2, 2), ("data", "fsdp"), (0, 1, 2, 3))]  # the first 4, process-major
    assert [d.id for d in mesh.devices.flat] == [3, 2, 1, 0]
    assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)  # as Mesh(...), not Explicit


def test_make_mesh_falls_back_to_process_major_order(monkeypatch):
    def multi_slice(*args, **kwargs):
        raise ValueError("`jax.make_mesh` does not support multi-slice topologies.")

    monkeypatch.setattr(jax, "make_mesh", multi_slice)
    mesh = sharding.make_mesh(4, 2)
    assert [d.id for d in mesh.devices.flat] == list(range(8))
    assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)


@pytest.mark.parametrize(
    "owners, contiguous",
    [
        ([0, 0, 1, 1], True),
        ([1, 1, 0, 0], True),  # any process order, each one block
        ([0, 1, 0, 1], False),  # interleaved: each process's rows would be split
        ([0, 0, 1, 1, 0, 0], False),
    ],
)
def test_processes_contiguous(owners, contiguous):
    devices = np.asarray([types.SimpleNamespace(process_index=p) for p in owners], object)
    assert sharding.processes_contiguous(devices.reshape(2, -1)) is contiguous


def _config(fsdp):
    c = default.smoke(importlib.import_module("configs.digits").get_config())
    c.model.model_channels = 64  # 3×3×64×64 kernels and up: big enough to be split
    c.train.batch_size = 16
    c.mesh.data, c.mesh.fsdp = (-1, 1) if fsdp == 1 else (1, fsdp)
    return c


def _step(config):
    trainer = train.Trainer(config)
    loader = data.build(data.DataSpec.from_config(config.data), seed=0, global_batch_size=16)
    batch = jax.device_put(loader.batch_at(0), trainer.batch_sharding)
    state = trainer.init()
    compiled = trainer.step.lower(state, batch, trainer.train_key).compile()
    state, metrics = compiled(state, batch, trainer.train_key)
    return trainer, compiled, jax.device_get(state), jax.device_get(metrics)


def test_fsdp_equals_data_parallel_with_an_eighth_of_the_state_per_device():
    _, dp_compiled, dp_state, dp_metrics = _step(_config(1))
    fs_trainer, fs_compiled, fs_state, fs_metrics = _step(_config(8))

    np.testing.assert_allclose(fs_metrics["loss"], dp_metrics["loss"], rtol=1e-5)
    np.testing.assert_allclose(fs_metrics["grad_norm"], dp_metrics["grad_norm"], rtol=1e-4)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
        fs_state.params,
        dp_state.params,
    )

    # The big kernels are split over fsdp; the batch over all 8 devices in both layouts.
    params = jax.tree.leaves(fs_state.params)
    specs = [s.spec for s in jax.tree.leaves(fs_trainer.state_sharding.params)]
    largest = max(range(len(params)), key=lambda i: params[i].size)
    assert "fsdp" in specs[largest]
    assert all(
        ("fsdp" in s) == (p.size >= sharding.MIN_SHARDED_SIZE)
        for s, p in zip(specs, params, strict=True)
    )
    assert fs_trainer.batch_sharding.spec == P(("data", "fsdp"))

    # Per-device bytes of the step's inputs (state + batch) as XLA compiled them.
    state_bytes = sum(a.nbytes for a in jax.tree.leaves(dp_state))
    dp_args = dp_compiled.memory_analysis().argument_size_in_bytes
    fs_args = fs_compiled.memory_analysis().argument_size_in_bytes
    assert dp_args >= state_bytes  # replicated: every device holds the whole state
    assert dp_args / fs_args > 6.5, (dp_args, fs_args)  # ~8×, less the small replicated arrays
