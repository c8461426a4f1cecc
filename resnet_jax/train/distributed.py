"""Joining a multi-process (multi-host) job through JAX's own distributed runtime.

Every process runs the same command; ``jax.distributed.initialize`` connects them through the
coordinator, after which ``jax.devices()`` lists the devices of every process and one jit program
spans them all. On Cloud TPU pods, SLURM and other clusters JAX finds the coordinator, process
count and id by itself (``--config.distributed.auto_detect=true``).
"""

from __future__ import annotations

import jax
import ml_collections


def initialize(config: ml_collections.ConfigDict) -> None:
    """Join the job described by ``config.distributed``; a single-process run does nothing.

    Must run before anything touches a JAX device.
    """
    settings = config.distributed
    if settings.coordinator_address is None and not settings.auto_detect:
        return
    if settings.cpu_collectives:  # CPU-only processes (tests, CPU clusters) exchange data through gloo
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if settings.coordinator_address is None:
        jax.distributed.initialize()
        return
    missing = [k for k in ("num_processes", "process_id") if settings[k] is None]
    if missing:
        raise ValueError(
            f"distributed.coordinator_address is set but {missing} are not: give every process "
            "--config.distributed.num_processes=N and its own --config.distributed.process_id=I."
        )
    jax.distributed.initialize(settings.coordinator_address, settings.num_processes, settings.process_id)
