"""Multi-host runs: start JAX's multi-controller runtime (`jax.distributed`) before anything else.

Every process runs the same `train.py` command. Process 0 hosts the coordinator; the others connect
to it. Where the three facts come from, first match wins:

1. config `parallel.coordinator_address / num_processes / process_id`;
2. the environment: `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`;
3. JAX's own cluster detection (SLURM, Open MPI, Cloud TPU pod slices, Kubernetes), used for
   whatever is still unset.

`parallel.distributed: auto` initialises when an address is given or a multi-process SLURM / Open
MPI job is detected; `on` always does (what a TPU pod slice needs); `off` never does.
"""

from __future__ import annotations

import os

import jax

from gpt_jax.config import ConfigError, ParallelConfig


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"${name}={value!r} is not an integer") from None


def cluster_job_detected() -> str | None:
    """The launcher of a multi-process job this process belongs to, or None."""
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_PROCID" in os.environ:
        return "SLURM"
    if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return "Open MPI"
    return None


def distributed_args(pc: ParallelConfig) -> dict | None:
    """The keyword arguments for `jax.distributed.initialize`, or None for a single-process run."""
    if pc.distributed == "off":
        return None
    args = {"coordinator_address": pc.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None,
            "num_processes": pc.num_processes if pc.num_processes is not None else _env_int("JAX_NUM_PROCESSES"),
            "process_id": pc.process_id if pc.process_id is not None else _env_int("JAX_PROCESS_ID")}
    if pc.distributed == "auto" and args["coordinator_address"] is None and cluster_job_detected() is None:
        return None
    n, i = args["num_processes"], args["process_id"]
    if n is not None and n < 1:
        raise ConfigError(f"parallel.num_processes must be positive, got {n}")
    if i is not None and n is not None and not 0 <= i < n:
        raise ConfigError(f"parallel.process_id={i} is outside [0, {n}); number the processes 0 .. {n - 1}")
    if args["coordinator_address"] is not None and ":" not in args["coordinator_address"]:
        raise ConfigError(f"coordinator address {args['coordinator_address']!r} needs a port, e.g. 10.0.0.1:1234")
    return args


def initialize(pc: ParallelConfig) -> bool:
    """Start `jax.distributed` if this run is multi-process; True when it is (or already was)."""
    if jax.distributed.is_initialized():
        return True
    args = distributed_args(pc)
    if args is None:
        return False
    try:
        jax.distributed.initialize(**args)
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"could not start the multi-host runtime with {args}: {e}. Give every process the same "
                          "parallel.coordinator_address (host:port of process 0), parallel.num_processes and its "
                          "own parallel.process_id (or the JAX_* environment variables), or set "
                          "parallel.distributed=off for a single-process run") from e
    return True


def barrier(name: str) -> None:
    """Wait until every process gets here (no-op in a single-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is true on any one (no-op in a single-process run)."""
    if jax.process_count() == 1:
        return bool(flag)
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.int32(bool(flag)))).any())
