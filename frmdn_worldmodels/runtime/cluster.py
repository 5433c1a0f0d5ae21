"""Starting or joining Ray: a local Ray with the machine's cores, or a cluster via
``ray.address``/RAY_ADDRESS."""

from __future__ import annotations

import logging
import os
import socket

from frmdn_worldmodels.runtime.config import ConfigError, RayConfig

REACH_SECONDS = 5.0
"""How long a cluster address may take to accept a connection before it is reported unreachable."""


def check_reachable(address: str) -> None:
    """Refuse a ``host:port`` cluster address where nothing accepts a connection within ``REACH_SECONDS``
    (``ray.init`` itself would wait minutes without a word); ``auto`` and ``ray://`` addresses are Ray's."""
    if address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"ray.address must be 'auto' or host:port, got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=REACH_SECONDS).close()
    except OSError as error:
        raise ConfigError(
            f"ray.address={address}: no Ray cluster answers there ({error.strerror or error}); start one "
            "with `ray start --head`, or leave ray.address unset for a local Ray"
        ) from None


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
        check_reachable(address)
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
