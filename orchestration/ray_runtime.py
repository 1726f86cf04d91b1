"""The one place that starts or joins Ray, and checks stage resources against the cluster.

Without an address, a local Ray is started bound to 127.0.0.1 with its temp dir under the
run's local cache, and stopped at exit. With RAY_ADDRESS or ``ray.address`` it joins that
cluster, after checking the address answers at all (ray.init would otherwise retry for a
long time).
"""
from __future__ import annotations

import logging
import os
import re
import socket
import tempfile
from pathlib import Path
from typing import Any

from orchestration.stage import Resources

# AF_UNIX socket paths are limited to 107 bytes and Ray nests its sockets ~70 bytes deep.
_MAX_TEMP_DIR = 40


class RayError(RuntimeError):
    """Ray cannot be used as configured; one line saying why."""


def _check_reachable(address: str) -> None:
    hostport = address.removeprefix("ray://").split("/", 1)[0]
    if address in ("auto", "local") or ":" not in hostport:
        return
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=5):
            return
    except (OSError, ValueError) as exc:
        raise RayError(f"Ray cluster at {address} is unreachable: {exc}") from None


def ray_temp_dir(cache_dir: str | Path) -> str:
    """A temp dir for a local Ray under the cache dir, or a short one in /tmp when that path is too long."""
    path = Path(cache_dir, "ray").resolve()
    if len(str(path)) > _MAX_TEMP_DIR:
        path = Path(tempfile.gettempdir(), f"vfm-ray-{os.getuid()}")
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def start_ray(address: str | None, *, num_cpus: int | None, num_gpus: int | None, dashboard: bool,
              object_store_memory_gb: float | None, cache_dir: str | Path) -> dict[str, Any]:
    """Start or join Ray; returns {"address", "started": whether this call started or joined it}.
    A Ray already initialised in this process (a test session, a notebook) is reused and left running."""
    import ray

    address = os.environ.get("RAY_ADDRESS") or address
    if address:
        _check_reachable(address)
    if ray.is_initialized():
        return {"address": address or "local", "started": False}
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        try:
            ray.init(address=address, log_to_driver=True, logging_level="WARNING")
        except Exception as exc:
            raise RayError(f"cannot join the Ray cluster at {address}: {str(exc).splitlines()[0]}") from None
        return {"address": address, "started": True}
    kwargs: dict[str, Any] = {}
    if object_store_memory_gb:
        kwargs["object_store_memory"] = int(object_store_memory_gb * 2**30)
    # Ray 2.60 turns token auth on for every new local cluster (the token goes to ~/.ray/auth_token)
    # and says so in a warning on each start; that is the secure choice and nothing to act on.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=dashboard,
             dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1", _temp_dir=ray_temp_dir(cache_dir),
             logging_level="WARNING", configure_logging=True, **kwargs)
    return {"address": "local", "started": True}


def stop_ray(started: dict[str, Any]) -> None:
    """Shut down (or leave) the Ray that start_ray started (or joined); one it merely reused stays."""
    import ray

    if started["started"] and ray.is_initialized():
        ray.shutdown()


def cluster_gpus() -> float:
    """GPUs of the whole Ray cluster (0 on a CPU-only one)."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


def largest_node() -> dict[str, float]:
    """CPUs and GPUs of the biggest alive node: one task can never ask for more than that."""
    import ray

    best = {"CPU": 0.0, "GPU": 0.0}
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        res = node.get("Resources", {})
        best["CPU"] = max(best["CPU"], float(res.get("CPU", 0)))
        best["GPU"] = max(best["GPU"], float(res.get("GPU", 0)))
    return best


def check_resources(requests: dict[str, Resources]) -> None:
    """Refuse stages Ray would wait on forever: a single request no node can satisfy, or a
    pool held for the whole stage that leaves no CPU of the cluster for the stage's tasks."""
    import ray

    node = largest_node()
    total = ray.cluster_resources()
    total_cpus, total_gpus = float(total.get("CPU", 0)), float(total.get("GPU", 0))
    for stage, request in requests.items():
        cpus, gpus = request.cpus, request.gpus
        if cpus > node["CPU"] or gpus > node["GPU"]:
            raise RayError(
                f"stage {stage} needs {cpus:g} CPUs and {gpus:g} GPUs in one task"
                + (f" ({request.asked_by})" if request.asked_by else "")
                + f", but the largest node of the Ray cluster has {node['CPU']:g} CPUs and {node['GPU']:g} GPUs; "
                "lower the stage's resources in the config or add bigger nodes")
        if request.held_cpus + 1 > total_cpus or request.held_gpus > total_gpus:
            raise RayError(
                f"stage {stage} holds {request.held_cpus:g} CPUs and {request.held_gpus:g} GPUs for its whole run "
                f"({request.held_by or 'its actor pool'}) and needs at least 1 more CPU for its tasks, but the Ray "
                f"cluster has {total_cpus:g} CPUs and {total_gpus:g} GPUs in all; lower those settings or add nodes")


def remote_cause(exc: BaseException, types: type[BaseException] | tuple[type[BaseException], ...]) -> BaseException | None:
    """The exception of ``types`` that a Ray task raised, behind the RayTaskError Ray hands back
    (which also subclasses the cause's class), or None. Ray Data hands back a map function's own
    exception only with ``DataContext.raise_original_map_exception`` on, and appends lines to its
    message. Stages re-raise what this finds as one line, not as a remote traceback.
    """
    import ray.exceptions

    current: BaseException | None = exc
    while isinstance(current, ray.exceptions.RayTaskError):
        current = current.cause
    return current if isinstance(current, types) else None


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def remote_text(exc: BaseException) -> str:
    """The message of ``exc`` without Ray's terminal colours."""
    return _ANSI.sub("", str(exc)).strip()


def error_line(exc: BaseException) -> str:
    """``Type: first line``; for an error a Ray task raised, that of the task's own exception (the
    RayTaskError around it starts with the task's name in terminal colours and a pid)."""
    cause = remote_cause(exc, BaseException) or exc
    text = remote_text(cause).splitlines()
    return f"{type(cause).__name__}: {text[0]}" if text else type(cause).__name__
