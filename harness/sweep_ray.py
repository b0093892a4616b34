"""The engine under `sweep`: many tasks on Ray (a local instance, or a cluster at `--address`), each with its memory
asked of Ray's scheduler, each result written as it comes, a task whose worker dies retried once.

Ray is an optional extra (`pip install 'llama3-harness[ray]'`): imported here only, when a sweep runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import HarnessError
from .files import atomic_path

RETRIES = 1  # a task whose worker dies (killed, out of memory) runs once more, then is reported
ADDRESS_TIMEOUT_S = 5.0  # a cluster that does not answer a TCP connect within this is unreachable


@dataclass(frozen=True)
class Task:
    """One unit of work: `fn(**kwargs)` in a Ray worker, given `memory` bytes by Ray's scheduler."""

    id: str  # stable across reruns: the name of its result file
    name: str  # what a person reads in the table and in error lines
    memory: int  # bytes requested from Ray (a logical resource: two tasks never share more than a node offers)
    kwargs: dict[str, Any]


def import_ray():
    try:
        import ray
    except ImportError:
        raise HarnessError("sweep needs Ray: pip install 'llama3-harness[ray]' (docs/sweep.md)") from None
    return ray


def check_address(address: str) -> None:
    """`--address HOST:PORT` (or `ray://HOST:PORT`) answers a TCP connect, so that an unreachable cluster is one line
    at once, not Ray's minutes of retries. `auto` (the cluster `ray start` left on this machine) is Ray's to find."""
    if address in ("auto", "local"):
        return
    where = address.removeprefix("ray://")
    host, _, port = where.rpartition(":")
    if not host or not port.isdigit():
        raise HarnessError(f"--address {address}: expected HOST:PORT, ray://HOST:PORT or auto")
    try:
        socket.create_connection((host, int(port)), timeout=ADDRESS_TIMEOUT_S).close()
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise HarnessError(f"--address {address}: no Ray cluster answers there ({reason})") from None


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[Any]:
    """Ray for the block: the one this process already runs (a test's, a notebook's), else a connection to `address`
    (or $RAY_ADDRESS), else a local instance on this machine (`ray.init()`), shut down after the block."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        check_address(address)
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    import logging

    try:
        local = {} if address else {"include_dashboard": False}  # a cluster's dashboard is the cluster's business
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING, **local)
    except (ConnectionError, RuntimeError) as e:
        raise HarnessError(f"--address {address}: cannot connect to Ray ({str(e).splitlines()[0]})") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def node_memory(ray, *, smallest: bool = False) -> int:
    """Bytes of Ray's `memory` resource on the largest alive node with CPUs (or the smallest, `smallest`)."""
    offers = [
        n["Resources"].get("memory", 0) for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) > 0
    ]
    if not offers:
        raise HarnessError("the Ray cluster has no alive node with CPUs")
    return int(min(offers) if smallest else max(offers))


def read_record(results: Path, task_id: str) -> dict[str, Any] | None:
    path = results / f"{task_id}.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None  # a torn file cannot happen (atomic_path), but a hand-edited one: run the task again


def write_record(results: Path, record: dict[str, Any]) -> None:
    with atomic_path(results / f"{record['id']}.json") as tmp:
        tmp.write_text(json.dumps(record, indent=1, default=str) + "\n", encoding="utf-8")


def run_tasks(
    tasks: list[Task],
    fn: Callable[..., dict[str, Any]],
    results: Path,
    *,
    on_record: Callable[[dict[str, Any]], None] = lambda record: None,
) -> list[dict[str, Any]]:
    """Every task not already done (a `results/ID.json` with status done) as a Ray task, one CPU and its memory each;
    each record written to `results` as it arrives, then passed to `on_record` (the skipped ones first, marked
    `skipped`). Returns the records in task order.
    A record's status: `done`; `error` (the task raised HarnessError: bad input); `failed` (it raised anything else,
    or its worker died on each of 1 + RETRIES tries)."""
    import ray

    results.mkdir(parents=True, exist_ok=True)
    records = {}
    for task in tasks:
        if (old := read_record(results, task.id)) is not None and old.get("status") == "done":
            records[task.id] = {**old, "skipped": True}
            on_record(records[task.id])
    remote = ray.remote(_measured)
    pending = {
        remote.options(num_cpus=1, memory=task.memory, max_retries=RETRIES, name=task.name).remote(
            fn, task.kwargs
        ): task
        for task in tasks
        if task.id not in records
    }
    while pending:
        (ref,), _ = ray.wait(list(pending), num_returns=1)
        task = pending.pop(ref)
        record = _record(ray, task, ref)
        write_record(results, record)
        records[task.id] = record
        on_record(record)
    return [records[task.id] for task in tasks]


def _record(ray, task: Task, ref) -> dict[str, Any]:
    """What became of one task: its result and measurements, or its error as one line."""
    record = {"id": task.id, "name": task.name, "memory_request": task.memory, "kwargs": task.kwargs}
    try:
        return {**record, "status": "done", **ray.get(ref)}
    except ray.exceptions.RayTaskError as e:  # the task raised: not retried, the same input would raise again
        cause = getattr(e, "cause", None) or e
        status = "error" if isinstance(cause, HarnessError) else "failed"
        message = str(cause) if isinstance(cause, HarnessError) else f"{type(cause).__name__}: {cause}"
        return {**record, "status": status, "error": message.strip().splitlines()[0] if message.strip() else status}
    except ray.exceptions.RayError as e:  # the worker died (killed, out of memory, its node lost) on every try
        return {
            **record,
            "status": "failed",
            "error": f"its worker died on each of {1 + RETRIES} tries (killed, or out of memory: asked "
            f"{task.memory / 2**30:.2f} GiB): {type(e).__name__}",
        }


# ---- in the worker ---------------------------------------------------------------------------------------------------


def _measured(fn: Callable[..., dict[str, Any]], kwargs: dict[str, Any]) -> dict[str, Any]:
    """`fn(**kwargs)` with its wall time, the worker's peak RSS during it, the node and the process it ran in."""
    _reset_peak_rss()
    start = time.perf_counter()
    result = fn(**kwargs)
    return {
        "result": result,
        "seconds": time.perf_counter() - start,
        "peak_memory": _peak_rss(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }


def _reset_peak_rss() -> None:
    """Linux: the process's peak RSS (VmHWM) back to its current RSS, so a reused worker measures this task alone."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_rss() -> int | None:
    """Bytes: VmHWM on Linux (since `_reset_peak_rss`); elsewhere the process's lifetime peak (`ru_maxrss`)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    try:
        import resource
        import sys
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
