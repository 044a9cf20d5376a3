"""The device mesh and how arrays are laid out on it.

The mesh has two axes, `data` and `fsdp`. A global batch is split over both (every device
holds B / (data·fsdp) examples). Parameters, their EMAs and the optimizer state are
replicated over `data` and, when `fsdp > 1`, split over `fsdp` by one rule over shapes
(`param_spec`): an array of at least `min_size` elements is split on its largest dimension
that `fsdp` divides; smaller arrays (biases, norms, step counters) stay replicated. XLA then
all-gathers each weight where it is used and reduce-scatters its gradient, so the bytes of
params + EMA + Adam moments per device fall by about `fsdp`× while activations stay
batch-sharded (ZeRO-3 / FSDP).

Devices are laid out by `jax.make_mesh` (topology-aware on TPU) as long as each process's
devices hold a contiguous block of the batch, else process-major (`jax.devices()` order), so
each process reads only its own rows (ddpm_bs.data).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ddpm_bs import fields

AXES = ("data", "fsdp")
MIN_SHARDED_SIZE = 1 << 14  # elements (64 KiB in float32); smaller arrays are replicated


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    """The `mesh` config section: devices on the `data` and `fsdp` axes (−1: all the other leaves)."""

    data: int = -1
    fsdp: int = 1

    RULES: ClassVar[dict[str, fields.Check]] = {
        "data": fields.integer(1, or_minus_one=True),
        "fsdp": fields.integer(1, or_minus_one=True),
    }

    @classmethod
    def from_config(cls, cfg: Any) -> MeshSpec:
        spec = cls(**fields.read(cfg, "mesh", cls.RULES, optional=("fsdp",)))
        if spec.data == -1 and spec.fsdp == -1:
            fields.fail("mesh.fsdp", -1, "mesh.data and mesh.fsdp are both -1", "set one to a size")
        return spec

    def shape(self, num_devices: int) -> tuple[int, int]:
        """(data, fsdp) resolved on `num_devices`, checked to fit them; ConfigError otherwise."""
        try:
            data, fsdp = mesh_shape(self.data, self.fsdp, num_devices)
        except ValueError as e:
            path = "mesh.fsdp" if "mesh.fsdp" in str(e) else "mesh.data"
            raise fields.ConfigError(str(e), path) from None
        if num_devices % (data * fsdp):  # both explicit: a prefix of the devices
            divisors = ", ".join(str(d) for d in range(1, num_devices + 1) if num_devices % d == 0)
            fields.fail(
                "mesh.fsdp",
                self.fsdp,
                f"mesh.data={self.data} × mesh.fsdp={self.fsdp} = {data * fsdp} must divide the "
                f"{num_devices} devices: one of {divisors}",
                "change mesh.data or mesh.fsdp, or set one of them to -1",
            )
        return data, fsdp


def mesh_shape(data: int, fsdp: int, num_devices: int) -> tuple[int, int]:
    """Resolves `mesh.data` and `mesh.fsdp` (−1 = all devices the other axis leaves).

    Raises:
      ValueError: naming the config field, when the axes do not fit the devices.
    """
    for name, value in (("mesh.data", data), ("mesh.fsdp", fsdp)):
        if not isinstance(value, int) or isinstance(value, bool) or (value < 1 and value != -1):
            raise ValueError(f"{name}={value!r} must be −1 (all remaining devices) or ≥ 1.")
    if data == -1 and fsdp == -1:
        raise ValueError("mesh.data and mesh.fsdp are both −1; set one of them to a size.")
    other = fsdp if data == -1 else data
    if num_devices % other:
        field = "mesh.fsdp" if data == -1 else "mesh.data"
        raise ValueError(
            f"{field}={other} does not divide the {num_devices} devices; use a divisor of "
            f"{num_devices}."
        )
    if data == -1:
        data = num_devices // fsdp
    elif fsdp == -1:
        fsdp = num_devices // data
    if data * fsdp > num_devices:
        raise ValueError(
            f"mesh.data={data} × mesh.fsdp={fsdp} = {data * fsdp} devices, but only "
            f"{num_devices} are visible."
        )
    return data, fsdp


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A ('data', 'fsdp') mesh over data·fsdp devices, laid out by `jax.make_mesh`.

    `jax.make_mesh` follows the TPU interconnect's topology (elsewhere, the device order). The
    process-major order (`jax.devices()` sorted by process) is used instead where that layout
    would not give each process one contiguous block of the batch, which `ddpm_bs.data` reads, or
    where `jax.make_mesh` refuses the devices (multi-slice TPU). Axes are `AxisType.Auto`,
    as `Mesh(...)` makes them (`jax.make_mesh` defaults to Explicit ones).
    """
    devices = list(jax.devices() if devices is None else devices)
    data, fsdp = mesh_shape(data, fsdp, len(devices))
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))[: data * fsdp]
    auto = (AxisType.Auto,) * len(AXES)
    try:
        mesh = jax.make_mesh((data, fsdp), AXES, axis_types=auto, devices=devices)
    except ValueError:  # a multi-slice topology
        mesh = None
    if mesh is None or not processes_contiguous(mesh.devices):
        mesh = Mesh(np.asarray(devices).reshape(data, fsdp), AXES, axis_types=auto)
    return mesh


def processes_contiguous(devices: np.ndarray) -> bool:
    """Whether each process's devices form one run of `devices` in row-major order, so that a
    batch split over the mesh's axes gives each process a contiguous block of rows."""
    owners = [d.process_index for d in np.asarray(devices).flat]
    starts = [p for i, p in enumerate(owners) if i == 0 or owners[i - 1] != p]
    return len(starts) == len(set(starts))


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes a batch is split over (a data-only mesh works too)."""
    return tuple(a for a in AXES if a in mesh.axis_names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(batch_axes(mesh)))


def num_batch_shards(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def param_spec(shape: tuple[int, ...], fsdp: int, min_size: int = MIN_SHARDED_SIZE) -> P:
    """Where one parameter-shaped array lives: split over 'fsdp' on its largest divisible dim."""
    if fsdp == 1 or math.prod(shape) < min_size:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp == 0:
            return P(*([None] * dim), "fsdp")
    return P()


def state_shardings(abstract_state: Any, mesh: Mesh) -> Any:
    """NamedShardings for every leaf of a (train-)state pytree by `param_spec`."""
    fsdp = mesh.shape["fsdp"] if "fsdp" in mesh.axis_names else 1
    return jax.tree.map(
        lambda leaf: NamedSharding(mesh, param_spec(tuple(leaf.shape), fsdp)), abstract_state
    )
