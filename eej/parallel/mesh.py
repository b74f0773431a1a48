"""Device meshes for decoding: axes `data` (batch rows) and `model` (attention heads, FFN, vocabulary)."""

from __future__ import annotations

import jax
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "model")


class MeshError(ValueError):
    """A mesh that cannot be built from the given spec and devices."""


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """"data=8,model=1" -> {"data": 8, "model": 1}; an axis left out has size 1."""
    sizes = {axis: 1 for axis in MESH_AXES}
    seen = set()
    for part in spec.split(","):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in MESH_AXES:
            raise MeshError(f"bad mesh spec {spec!r}: expected comma-separated AXIS=SIZE with AXIS in {', '.join(MESH_AXES)}")
        if name in seen:
            raise MeshError(f"bad mesh spec {spec!r}: axis {name!r} given twice")
        try:
            size = int(value)
        except ValueError:
            raise MeshError(f"bad mesh spec {spec!r}: size of {name!r} must be an integer, got {value.strip()!r}") from None
        if size < 1:
            raise MeshError(f"bad mesh spec {spec!r}: size of {name!r} must be >= 1")
        sizes[name] = size
        seen.add(name)
    return sizes


def make_mesh(data: int | None = None, model: int = 1, devices=None) -> Mesh:
    """A (data, model) mesh over `devices` (default: all devices of all processes).

    data None: every device not used by `model`. With several processes the mesh must span all
    devices (each process drives its own). Axes are `Auto`: jit propagates the shardings of its
    inputs, so model code needs no sharding annotations.
    """
    devices = list(jax.devices() if devices is None else devices)
    if model < 1 or (data is not None and data < 1):
        raise MeshError(f"mesh axis sizes must be >= 1, got data={data}, model={model}")
    if data is None:
        if len(devices) % model:
            raise MeshError(f"model={model} does not divide the {len(devices)} devices")
        data = len(devices) // model
    need = data * model
    if need > len(devices):
        raise MeshError(f"mesh data={data},model={model} needs {need} devices but {len(devices)} are available")
    if jax.process_count() > 1 and need != len(devices):
        raise MeshError(
            f"with {jax.process_count()} processes the mesh must use all {len(devices)} devices, "
            f"got data={data},model={model}"
        )
    return jax.make_mesh((data, model), MESH_AXES, axis_types=(AxisType.Auto, AxisType.Auto), devices=devices[:need])
