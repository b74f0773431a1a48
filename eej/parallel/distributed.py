"""Multi-host JAX: one process per host (or per GPU), joined through a coordinator.

    eej generate ... --mesh data=16 --coordinator 10.0.0.1:1234 --num-processes 2 --process-id 0

Every process runs the same command on the same inputs; each drives its local devices and the
mesh spans all of them. Settings come from the arguments, else from EEJ_COORDINATOR,
EEJ_NUM_PROCESSES and EEJ_PROCESS_ID. On a cluster JAX can read itself (SLURM, Open MPI, Cloud
TPU pods, Kubernetes JobSets), `--coordinator auto` lets JAX detect all three.
"""

from __future__ import annotations

import os

import jax

ENV = {"coordinator": "EEJ_COORDINATOR", "num_processes": "EEJ_NUM_PROCESSES", "process_id": "EEJ_PROCESS_ID"}


class DistributedError(ValueError):
    """Incomplete or inconsistent multi-host settings."""


def settings_from(coordinator: str | None, num_processes: int | None, process_id: int | None) -> dict | None:
    """The three settings, each from its argument or else its environment variable; None if none is set."""
    values = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    for key, var in ENV.items():
        if values[key] is None and os.environ.get(var):
            raw = os.environ[var]
            try:
                values[key] = raw if key == "coordinator" else int(raw)
            except ValueError:
                raise DistributedError(f"{var} must be an integer, got {raw!r}") from None
    if all(v is None for v in values.values()):
        return None
    if values["coordinator"] == "auto":  # JAX's cluster detection fills in whatever is left out
        return values
    missing = [f"--{k.replace('_', '-')} ({ENV[k]})" for k, v in values.items() if v is None]
    if missing:
        raise DistributedError(f"multi-host decoding also needs {', '.join(missing)}")
    if values["num_processes"] < 1 or not 0 <= values["process_id"] < values["num_processes"]:
        raise DistributedError(
            f"process id {values['process_id']} is not in 0..{values['num_processes'] - 1} "
            f"(num processes {values['num_processes']})"
        )
    if ":" not in values["coordinator"]:
        raise DistributedError(f"coordinator must be HOST:PORT, got {values['coordinator']!r}")
    return values


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None) -> bool:
    """Join the multi-host job if settings are given; returns whether JAX now runs distributed.

    coordinator "auto": let JAX detect the cluster's settings. Must run before anything touches a
    JAX device. CPU collectives go through gloo, so a CPU-only job (tests, hosts without
    accelerators) works too; the setting does not affect GPU/TPU collectives.
    """
    settings = settings_from(coordinator, num_processes, process_id)
    if settings is None:
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    address = None if settings["coordinator"] == "auto" else settings["coordinator"]
    jax.distributed.initialize(
        coordinator_address=address, num_processes=settings["num_processes"], process_id=settings["process_id"]
    )
    return True
