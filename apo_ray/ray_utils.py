"""Starting or joining Ray the same way everywhere.

An ``--address`` joins that cluster; without one, ``RAY_ADDRESS`` does, as it does for every Ray program (and as
``ray job submit`` sets it for its drivers); with neither we start an embedded local Ray (``address="local"``),
which offers the ``sim`` slots the loop's rollout actors ask for. The dashboard binds 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

# Environment every Ray worker needs: headless EGL rendering, DeepSpeed on CPU, no usage pings.
WORKER_ENV = {
    "MUJOCO_GL": "egl",
    "PYOPENGL_PLATFORM": "egl",
    "DS_ACCELERATOR": "cpu",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
}


def worker_env() -> dict[str, str]:
    env = {k: os.environ.get(k, v) for k, v in WORKER_ENV.items()}
    # fault-injection and debug switches travel to the actors too
    env.update({k: v for k, v in os.environ.items() if k.startswith("APO_RAY_")})
    return env


_embedded = False


def embedded() -> bool:
    """True while this process runs on the single-node Ray it started itself (not a cluster it joined)."""
    return _embedded


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[None]:
    """Use the running Ray if any; else join ``address`` (default ``RAY_ADDRESS``) or, with neither, start an
    embedded one; stop it after."""
    for k, v in WORKER_ENV.items():
        os.environ.setdefault(k, v)
    import ray

    if ray.is_initialized():
        yield
        return
    kwargs: dict = {"runtime_env": {"env_vars": worker_env()}, "log_to_driver": False,
                    "configure_logging": True, "logging_level": "ERROR"}
    address = join_address(address)
    if address:
        # Inside `ray job submit` the job's runtime env and ours both set env_vars (MUJOCO_GL, ...): without
        # this Ray refuses to merge them ("Failed to merge the Job's runtime env"). Ours is built from this
        # process's environment, which already holds the job's values, so overriding loses nothing.
        os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
        ray.init(address=address, **kwargs)
    else:
        _start_embedded(ray, num_cpus, kwargs)
    global _embedded
    _embedded = not address
    try:
        yield
    finally:
        _embedded = False
        ray.shutdown()


def join_address(address: str | None) -> str | None:
    """The cluster to join: ``address``, else ``RAY_ADDRESS``; None (or ``local``) starts an embedded Ray."""
    address = address or os.environ.get("RAY_ADDRESS", "").strip() or None
    if address and address.startswith(("http://", "https://")):
        from apo_ray.errors import UserError

        # the job server's address (``ray job submit``'s) is not one a driver can join
        raise UserError(f"Ray address {address} is a job server, not a cluster to join",
                        "--address / RAY_ADDRESS", "pass the GCS address (HOST:6379, or auto on a node of the "
                        "cluster), or submit the command with `ray job submit`")
    return None if address == "local" else address


EMBEDDED_START_TRIES = 3


def _start_embedded(ray, num_cpus: int | None, kwargs: dict) -> None:
    # Ray gives a new node's raylet a fixed 30 s to register with its GCS; on a box already loaded by another
    # run (2 cores, a training beside it) that can pass, and the stage would fail for nothing: start again
    import psutil

    me = psutil.Process()
    # the embedded node plays a rollout node too: one simulator slot per core (cluster.yaml's `sim`), so rollout
    # actors hold a slot rather than a CPU, and the ones a loop keeps idle leave the CPUs to datasets and training.
    # Ray's own count (cgroup quotas included), so the slots match the CPUs it offers.
    cores = num_cpus or ray._private.utils.get_num_cpus()
    for attempt in range(1, EMBEDDED_START_TRIES + 1):
        before = {p.pid for p in me.children(recursive=True)}
        try:
            ray.init(address="local", num_cpus=num_cpus, resources={"sim": float(cores)}, include_dashboard=False,
                     dashboard_host="127.0.0.1", **kwargs)
            return
        except Exception as e:
            if "timed out during startup" not in str(e) or attempt == EMBEDDED_START_TRIES:
                raise
            # the failed node is not registered anywhere (ray.shutdown cannot see it): stop what it spawned
            for p in me.children(recursive=True):
                if p.pid not in before:
                    with contextlib.suppress(psutil.Error):
                        p.kill()
            ray.shutdown()
            time.sleep(2.0 * attempt)


AUTOSCALER_CONFIG = "~/ray_bootstrap_config.yaml"
"""Where ``ray up`` leaves the cluster config on the head node, beside the drivers ``ray job submit`` starts
there (``APO_RAY_AUTOSCALER_CONFIG`` overrides it)."""


def autoscaler_config_path() -> str:
    return os.path.expanduser(os.environ.get("APO_RAY_AUTOSCALER_CONFIG", AUTOSCALER_CONFIG))


def under_autoscaler() -> bool:
    """True on a head that ``ray up`` started: its autoscaler removes a node only while no actor holds any of
    its resources."""
    return os.path.isfile(autoscaler_config_path())


def offered_resources(current: dict[str, float], autoscaler: dict | None) -> dict[str, float]:
    """The most of each resource the cluster can hold: what it has now, or, under an autoscaler, the head's plus
    every worker type at its ``max_workers``. A GPU node type at ``min_workers: 0`` is absent from
    ``ray.cluster_resources()`` until something asks for a GPU, so the current view alone never scales it up."""
    out = {k: float(v) for k, v in current.items() if v > 0}
    types = (autoscaler or {}).get("available_node_types") or {}
    head = (autoscaler or {}).get("head_node_type")
    total: dict[str, float] = {}
    for name, node in types.items():
        if not isinstance(node, dict):
            continue
        n = 1 if name == head else node.get("max_workers", 0)
        for k, v in (node.get("resources") or {}).items():
            if isinstance(v, int | float) and v > 0 and isinstance(n, int) and n > 0:
                total[k] = total.get(k, 0.0) + n * float(v)
    return {k: max(out.get(k, 0.0), total.get(k, 0.0)) for k in out.keys() | total.keys()}


def cluster_offers() -> dict[str, float]:
    """:func:`offered_resources` of the connected cluster; off an autoscaled head, its resources now."""
    import ray
    import yaml

    path = autoscaler_config_path()
    try:
        with open(path) as f:
            autoscaler = yaml.safe_load(f)
    except FileNotFoundError:
        autoscaler = None
    except yaml.YAMLError as e:
        from apo_ray.errors import UserError

        raise UserError(f"the autoscaler config is not YAML ({str(e).splitlines()[0]})", path,
                        "restore it with `ray up cluster.yaml`, or point APO_RAY_AUTOSCALER_CONFIG at it") from None
    return offered_resources(ray.cluster_resources(), autoscaler if isinstance(autoscaler, dict) else None)
