"""Decoding on a device mesh: data parallel over batch rows (`data` axis), tensor parallel over heads and
the FFN (`model` axis), on one host or many (`jax.distributed`).

    from eej.parallel import make_mesh
    engine = eej.Engine(model, strategy, method_params, mesh=make_mesh(data=4, model=2))

- `mesh`: `make_mesh`, `parse_mesh_spec` ("data=8,model=1").
- `sharding`: `DecodeSharding` — which PartitionSpec every param, cache and decode-state leaf gets
  (by name and shape, generically over pytrees, so method strategies need nothing special),
  placement of host data as global arrays, `to_host`, and `per_shard` for kernels (shard_map).
- `distributed`: `initialize` multi-host JAX from options or environment variables.
See docs/scale.md.
"""

from eej.parallel.mesh import MESH_AXES, MeshError, make_mesh, parse_mesh_spec
from eej.parallel.sharding import DecodeSharding, per_shard, to_host

__all__ = ["MESH_AXES", "DecodeSharding", "MeshError", "make_mesh", "parse_mesh_spec", "per_shard", "to_host"]
