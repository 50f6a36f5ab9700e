"""Where a sweep's units of work run: in this process (``local``) or as Ray tasks (``ray``).

A *unit* is one batched group of runs that share shapes (trained as one vmapped computation)
or one run; :func:`umup_jax.sweep.execute_unit` turns a unit into its results rows.  A backend
only decides where units execute and hands each outcome back as it arrives; the driver
(:class:`umup_jax.sweep.Runner`) alone writes ``results.csv``, so run ids, resume and the
divergence rules are the same whatever the backend.

``ray`` uses an existing cluster (``--ray_address`` or ``RAY_ADDRESS``) or starts a local one
in-process.  Each unit is a task that requests ``gpus_per_task`` GPUs (default: 1 where the
cluster has GPUs, else none) and ``cpus_per_task`` CPUs, so Ray sets the task's visible devices
(``CUDA_VISIBLE_DEVICES``); every task runs in a fresh worker process (``max_calls=1``), so JAX
initialises on exactly the devices Ray assigned.  A task whose worker dies is retried
(``max_retries``); a unit that raises is reported as failed and the sweep goes on.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import socket
import warnings
from typing import Any, Callable, Iterator, Optional

BACKENDS = ("local", "ray")


class BackendError(ValueError):
    """A backend that cannot be used as asked (names the flag)."""


@dataclasses.dataclass
class Unit:
    """Runs that execute together: their (group, overrides), in order."""

    members: list[tuple[str, dict]]


Outcome = tuple[Unit, Any]  # (unit, rows) or (unit, BaseException)
Execute = Callable[[Unit, Any], list]  # a module-level function (Ray imports it by name)


class LocalBackend:
    """Units run one after another in this process."""

    name = "local"

    def run(self, units: list[Unit], execute: Execute, context: Any) -> Iterator[Outcome]:
        for unit in units:
            try:
                yield unit, execute(unit, context)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:  # recorded as a failed run; the sweep goes on
                yield unit, exc

    def close(self) -> None:
        pass


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fails fast (naming the address) if a ``host:port`` / ``ray://host:port`` address
    does not accept connections; ``auto``/``local`` are left to Ray."""
    if address in ("auto", "local"):
        return
    target = address.split("://", 1)[-1]
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise BackendError(f"--ray_address={address!r} is invalid: use host:port, "
                           "ray://host:port or auto")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise BackendError(f"cannot reach the Ray cluster at --ray_address={address!r} "
                           f"({exc}); start it with `ray start --head` or fix the address"
                           ) from None


class RayBackend:
    """Units run as Ray tasks, as many at once as the cluster's resources allow."""

    name = "ray"

    def __init__(self, address: Optional[str] = None, gpus_per_task: Optional[float] = None,
                 cpus_per_task: float = 1.0, max_retries: int = 2):
        try:
            import ray
        except ImportError:
            raise BackendError("--backend=ray needs Ray: pip install -e '.[ray]'") from None
        self._ray = ray
        address = address or os.environ.get("RAY_ADDRESS") or None
        if address:
            _check_reachable(address)
        if not cpus_per_task > 0:
            raise BackendError(f"--cpus_per_task={cpus_per_task} is invalid: it must be > 0")
        self._started = False
        if not ray.is_initialized():
            package_root = str(pathlib.Path(__file__).resolve().parent.parent)
            env = {"PYTHONPATH": os.pathsep.join(
                p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
            with warnings.catch_warnings():
                # Ray starts its processes with fork+exec; JAX's at-fork warning is about a
                # fork that keeps running Python, which this is not.
                warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called",
                                        category=RuntimeWarning)
                ray.init(address=address, include_dashboard=False, log_to_driver=False,
                         runtime_env=None if address else {"env_vars": env})
            self._started = True
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        most_gpus = max((n["Resources"].get("GPU", 0) for n in nodes), default=0)
        most_cpus = max((n["Resources"].get("CPU", 0) for n in nodes), default=0)
        if gpus_per_task is None:
            gpus_per_task = 1.0 if most_gpus > 0 else 0.0
        if gpus_per_task < 0 or gpus_per_task > most_gpus:
            self.close()
            raise BackendError(
                f"--gpus_per_task={gpus_per_task:g} is more than any node has (the largest "
                f"node has {most_gpus:g} GPUs); no task was submitted")
        if cpus_per_task > most_cpus:
            self.close()
            raise BackendError(
                f"--cpus_per_task={cpus_per_task:g} is more than any node has (the largest "
                f"node has {most_cpus:g} CPUs); no task was submitted")
        self.gpus_per_task, self.cpus_per_task = gpus_per_task, cpus_per_task
        self.max_retries = max_retries
        self.resources = ray.cluster_resources()

    def run(self, units: list[Unit], execute: Execute, context: Any) -> Iterator[Outcome]:
        ray = self._ray
        remote = ray.remote(num_gpus=self.gpus_per_task, num_cpus=self.cpus_per_task,
                            max_calls=1, max_retries=self.max_retries,
                            retry_exceptions=False)(execute)
        shared = ray.put(context)
        pending = {remote.remote(unit, shared): unit for unit in units}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                unit = pending.pop(ref)
                try:
                    yield unit, ray.get(ref)
                except ray.exceptions.RayTaskError as exc:  # the unit raised: its cause
                    cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                    if cause is not exc and hasattr(cause, "add_note"):
                        # The cause arrives without its traceback; the worker's is in the
                        # RayTaskError's text, kept as a note for the driver's error.log.
                        cause.add_note("traceback in the Ray worker:\n"
                                       + re.sub(r"\x1b\[[0-9;]*m", "", str(exc)))
                    yield unit, cause
                except ray.exceptions.RayError as exc:  # worker died beyond its retries
                    yield unit, exc

    def close(self) -> None:
        if self._started and self._ray.is_initialized():
            self._ray.shutdown()
        self._started = False


def make_backend(name: str, ray_address: Optional[str] = None,
                 gpus_per_task: Optional[float] = None, cpus_per_task: float = 1.0):
    if name == "local":
        return LocalBackend()
    if name == "ray":
        return RayBackend(ray_address, gpus_per_task, cpus_per_task)
    raise BackendError(f"--backend={name!r} is invalid: allowed are {BACKENDS}")
