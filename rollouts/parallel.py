"""Starting or joining Ray: a local Ray with the machine's cores, or a cluster via
``ray.address``/RAY_ADDRESS."""

from __future__ import annotations

import logging
import os

from worldmodel.config import RayConfig


def init_ray(config: RayConfig) -> None:
    """Start a local Ray (or join the configured cluster) once per process."""
    import ray

    if ray.is_initialized():
        return
    address = config.address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict = {
        "ignore_reinit_error": True,
        "include_dashboard": False,
        "logging_level": logging.WARNING,
        "log_to_driver": True,
    }
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=config.num_cpus or os.cpu_count(), **kwargs)


def ray_map(config: RayConfig, num_cpus_per_task: float = 1.0):
    """A ``map_fn(fn, items) -> list`` that runs ``fn(item)`` as Ray tasks, results in the order of ``items``.

    Lets code below the Ray layer (e.g. the memory sweep in ``worldmodel``) run in parallel without importing
    Ray.
    """

    def map_fn(fn, items):
        import ray

        init_ray(config)
        remote = ray.remote(num_cpus=num_cpus_per_task)(fn)
        return ray.get([remote.remote(item) for item in items])

    return map_fn
