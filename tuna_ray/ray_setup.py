"""Connecting to Ray: join the cluster we run in, or start a local one with room for data tasks."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def ensure_ray(address: str | None = None, *, min_cpus: float = 0) -> None:
    """Initialise Ray once.

    Inside ``ray job submit`` (RAY_ADDRESS set) or with an explicit address, join that cluster.
    Otherwise start a local Ray with at least ``min_cpus`` + 2 logical CPUs: training workers
    hold their CPUs for the whole run, and Ray Data tasks need CPUs of their own beside them
    (on a 2-core laptop with 2 workers and 2 logical CPUs the data pipeline would wait forever).
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    # A private, driver-owned local Ray on this machine: no token to hand around.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    num_cpus = max(os.cpu_count() or 1, int(min_cpus + 0.999) + 2)
    log.info("starting a local Ray with %d logical CPUs", num_cpus)
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)


def check_resources(*, cpus: float, gpus: float, what: str) -> None:
    """Fail fast, with a clear message, when the cluster can never fit ``what``.

    Autoscaling clusters advertise the resources they can add; a static cluster without them
    would otherwise wait forever for workers that never start.
    """
    import ray

    total = ray.cluster_resources()
    autoscaling = os.environ.get("TUNA_RAY_AUTOSCALING", "") == "1"
    for name, need in (("CPU", cpus), ("GPU", gpus)):
        have = total.get(name, 0)
        if need > have and not autoscaling:
            raise RuntimeError(
                f"{what} needs {need:g} {name} but the Ray cluster has {have:g}; lower "
                f"scaling.num_workers / cpus_per_worker, set scaling.use_gpu=false, or on an "
                f"autoscaling cluster set TUNA_RAY_AUTOSCALING=1 to wait for new nodes"
            )
