"""Connecting to Ray: join the cluster we run in, or start a private local one.

Inside ``ray job submit`` (RAY_ADDRESS set) or with an explicit address, the driver joins that
cluster. Otherwise it starts its *own* local Ray on a free GCS port and addresses it
explicitly: the job's processes (workers, Ray Train's and Ray Data's helper actors) get
``RAY_ADDRESS`` pointing at it, so another Ray on the same machine (a second run, a notebook, a
test session) never makes Ray's helpers ask "which instance?" ("Found multiple active Ray
instances"). The instance lives and dies with the driver, as any ``ray.init`` one does.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)
# A local run is a CPU run: DeepSpeed need not probe for accelerators (and warn on every rank).
_QUIET = {"DS_ACCELERATOR": "cpu"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A busy machine can make a local Ray's start time out: Ray waits 30 s (not configurable) for
# its raylet to register with its GCS, and under load (measured: two busy loops beside a
# training on 2 cores) the first answer took 75 s. The start is then made again, after a pause
# that grows (10, 20, 30, 40 s: a burst of load can pass): three back-to-back starts all
# timed out once (3 minutes beside two busy loops and a ZeRO training).
LOCAL_STARTS = 5
RESTART_PAUSE_S = 10
_START_TIMED_OUT = "timed out during startup"  # Ray's message (a bare Exception)


def start_local_ray(num_cpus: int, *, dashboard: bool = False) -> str:
    """Start a private local Ray with ``num_cpus`` logical CPUs; return its GCS address.

    ``dashboard``: also start Ray's dashboard process, which serves the state API. Ray Train's
    placement-group cleaner polls that API (without it, the cleaner logs a warning every few
    seconds), so a run that trains needs it; generation and ranking do not. It costs about ten
    extra Python processes and a third more CPU per start (16.5 against 12.1 CPU-s for a start,
    one task and a shutdown, measured on 2 cores).

    The workers run at the driver's priority (``nice tuna-ray run ...`` lowers both), not Ray's
    default of 15 below it: beside two busy loops on 2 cores, a niced training worker got so
    little CPU that a 6-step tiny training did not reach step 2 in 9 minutes.

    A start that times out (a busy machine) is made again, up to ``LOCAL_STARTS`` times in all,
    after the processes it left are stopped and a growing pause; any other failure is raised
    as it is.
    """
    import ray

    # A private, driver-owned local Ray on this machine: no token to hand around.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    for attempt in range(1, LOCAL_STARTS):
        before = _descendants()
        try:
            return _start_once(ray, num_cpus, dashboard)
        except Exception as exc:
            if _START_TIMED_OUT not in str(exc):
                raise
            left = _stop_new_ray_processes(before)
            log.warning(
                "the local Ray did not start in time (a busy machine?): %s Stopped the %d "
                "process(es) it left; starting it again in %d s (%d/%d).",
                exc,
                left,
                RESTART_PAUSE_S * attempt,
                attempt + 1,
                LOCAL_STARTS,
            )
            time.sleep(RESTART_PAUSE_S * attempt)
    return _start_once(ray, num_cpus, dashboard)  # the last start: its failure is raised


def _start_once(ray, num_cpus: int, dashboard: bool) -> str:
    port = int(os.environ.get("RAY_GCS_SERVER_PORT") or _free_port())
    address = f"127.0.0.1:{port}"
    log.info(
        "starting a private local Ray (%s, %d logical CPUs%s)",
        address,
        num_cpus,
        ", with its dashboard" if dashboard else "",
    )
    previous = os.environ.get("RAY_GCS_SERVER_PORT")
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)  # how ray.init picks its GCS port
    try:
        ray.init(
            # "local": always a new instance; None would join one that `ray start` left running
            address="local",
            num_cpus=num_cpus,
            include_dashboard=dashboard,
            dashboard_host="127.0.0.1",
            dashboard_port=_free_port() if dashboard else None,
            log_to_driver=True,
            runtime_env={"env_vars": {"RAY_ADDRESS": address, **_QUIET}},
            # Workers at the driver's own priority: Ray's default (nice +15 for every worker)
            # lets any other program on the machine starve the run's training and generation.
            _system_config={"worker_niceness": 0},
        )
    finally:
        if previous is None:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)
        else:
            os.environ["RAY_GCS_SERVER_PORT"] = previous
    return address


def _descendants() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True)}


def _stop_new_ray_processes(before: set[int]) -> int:
    """Kill this process's descendants that a failed start left (its GCS, raylet, log monitor,
    reaper...): those not there before it whose command line names Ray. Return how many."""
    import psutil

    new = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.pid not in before and "ray" in " ".join(proc.cmdline()):
                new.append(proc)
        except psutil.Error:  # ended meanwhile
            continue
    for proc in new:
        try:
            proc.kill()  # SIGKILL: also ends a stopped process
        except psutil.Error:
            pass
    psutil.wait_procs(new, timeout=10)
    return len(new)


def quiet_ray_data() -> None:
    """Ray Data's own progress bars and per-dataset INFO lines off in this process: the stages
    print their own progress (records done, rate, ETA), and a run that succeeds stays short."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.enable_auto_log_stats = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # ... which it would announce with a warning in every process
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def ensure_ray(address: str | None = None, *, min_cpus: float = 0, trains: bool = False) -> None:
    """Initialise Ray once.

    Inside ``ray job submit`` (RAY_ADDRESS set) or with an explicit address, join that cluster.
    Otherwise start a private local Ray with at least ``min_cpus`` + 2 logical CPUs: training
    workers hold their CPUs for the whole run, and Ray Data tasks need CPUs of their own beside
    them (on a 2-core laptop with 2 workers and 2 logical CPUs the data pipeline would wait
    forever). ``trains``: Ray Train will run in it, so the local Ray gets its dashboard
    (``start_local_ray``).
    """
    import ray

    if ray.is_initialized():
        return
    quiet_ray_data()
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    start_local_ray(max(os.cpu_count() or 1, int(min_cpus + 0.999) + 2), dashboard=trains)


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
