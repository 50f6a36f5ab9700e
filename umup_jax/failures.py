"""How a command-line run ends when it fails: one clear line on the console, a non-zero exit,
and the details (full tracebacks, third-party log output) in files in the run directory.

Console output of a run is what the user reads; a failure deep inside orbax or TensorStore can
print hundreds of lines of traceback that hide the one sentence that matters.  The entry
points therefore:

* send Python/absl logging (orbax, jax, our own warnings) to ``WORKDIR/run.log``
  (:func:`log_to_workdir`); our own progress and warnings are printed as well;
* turn an exception into ``<program>: error: <what happened, where, what to do>`` on stderr
  (the format of :mod:`umup_jax.cli`'s usage errors, which exit with status 2), append the
  full traceback to ``WORKDIR/error.log`` and exit with status 1 (:func:`exit_on_failure`).

The library itself raises ordinary exceptions whose messages already say what, where and what
to do (config errors name the key, data errors the file, checkpoint errors the step and
folder); only the entry points catch them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import sys
import threading
import time
import traceback
from typing import Iterator, Optional

RUN_LOG = "run.log"
ERROR_LOG = "error.log"


def log_to_workdir(workdir: pathlib.Path | str, level: int = logging.WARNING) -> pathlib.Path:
    """Routes Python logging (absl's handler included) to ``workdir/run.log``."""
    path = pathlib.Path(workdir).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    log_file = path / RUN_LOG
    handler = logging.FileHandler(log_file, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for h in list(root.handlers):  # absl's stderr handler: the console gets our prints only
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    return log_file


def one_line(exc: BaseException) -> str:
    """The exception's message as one line; unexpected exception types are named."""
    text = " ".join(str(exc).split())
    ours = type(exc).__module__.startswith("umup_jax") or isinstance(
        exc, (ValueError, FileNotFoundError, KeyError))
    if not text:
        return type(exc).__name__
    if len(text) > 600:
        text = text[:600] + "…"
    return text if ours else f"{type(exc).__name__}: {text}"


def _append_error_log(workdir: Optional[pathlib.Path | str], body: str) -> Optional[pathlib.Path]:
    """Appends ``body`` to ``workdir/error.log`` under a line with the time, the process (with
    several, which share one error.log) and the command; its path, or ``None`` if it could
    not be written."""
    if workdir is None:
        return None
    path = pathlib.Path(workdir).expanduser() / ERROR_LOG
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')}{_process_tag()} "
                    f"{' '.join(sys.argv)}\n{body}\n")
    except OSError:
        return None
    return path


def write_traceback(exc: BaseException, workdir: Optional[pathlib.Path | str]) -> Optional[pathlib.Path]:
    """Appends the full traceback to ``workdir/error.log`` (:func:`_append_error_log`);
    returns its path (``None`` if it could not be written)."""
    return _append_error_log(workdir, "".join(traceback.format_exception(exc)))


def _process_tag() -> str:
    """`` process i of n`` in a multi-process run, whose processes share one error.log."""
    n = _process_count()
    return f" process {sys.modules['jax'].process_index()} of {n}" if n > 1 else ""


def _process_count() -> int:
    """``jax.process_count()`` if jax is imported, else 1 (also where asking fails, e.g. a
    backend that did not start: the failure being reported matters more)."""
    jax = sys.modules.get("jax")
    try:
        return jax.process_count() if jax is not None else 1
    except Exception:  # noqa: BLE001
        return 1


@contextlib.contextmanager
def exit_on_failure(workdir: Optional[pathlib.Path | str]) -> Iterator[None]:
    """Runs the body; any exception becomes one ``<program>: error: …`` line on stderr (plus
    where the traceback went, if ``workdir`` is given) and exit status 1.  ``SystemExit``,
    Ctrl-C and :class:`umup_jax.cli.UsageError` (bad input, exit status 2) pass through.
    One of several processes announces the failure to the others and exits through
    :func:`leave_processes_and_exit`."""
    from umup_jax.cli import UsageError

    try:
        yield
    except (SystemExit, KeyboardInterrupt, UsageError):  # UsageError: cli.app_main reports it
        raise
    except BaseException as exc:  # the one place a run's failure is reported
        if "jax" in sys.modules:  # other processes of the run stop too (processes.FailureWatch)
            from umup_jax import processes

            processes.announce_failure(exc)
        where = write_traceback(exc, workdir)
        tail = f" (traceback in {where})" if where else ""
        from umup_jax.cli import program_name

        print(f"{program_name()}: error: {one_line(exc)}{tail}", file=sys.stderr, flush=True)
        if _process_count() > 1:
            leave_processes_and_exit(1)
        sys.exit(1)


# Longest wait for jax.distributed's shutdown before a failing process exits anyway.
SHUTDOWN_WAIT_S = 30.0
SHUTDOWN_WAIT_ENV = "UMUP_JAX_SHUTDOWN_WAIT_S"


def shutdown_wait_s() -> float:
    """:data:`SHUTDOWN_WAIT_S`, or ``$UMUP_JAX_SHUTDOWN_WAIT_S`` (seconds) if set."""
    from umup_jax import processes

    return processes.seconds_from_env(SHUTDOWN_WAIT_ENV, SHUTDOWN_WAIT_S)


def leave_processes_and_exit(status: int):
    """Leaves ``jax.distributed``, waiting at most :func:`shutdown_wait_s` for the other
    processes, and exits with ``status``.

    ``sys.exit`` would leave through JAX's ``atexit`` shutdown, whose barrier waits for every
    process: where another process died (SIGKILL, the OOM killer), its collectives fail at
    once in this one (gloo: "Connection closed by peer"), but the barrier waits until the
    coordination service's heartbeat timeout (100 s) and then aborts this process (status
    134, a page of C++ stack).  Here the shutdown runs in a thread for at most the wait;
    the exit is ``os._exit``, after flushing the console and the log files (metrics,
    checkpoints and ``error.log`` are written as the run goes).  The others' failure watch
    (``processes.FailureWatch``) stops them within seconds, so a live group meets in the
    barrier well within the wait."""
    import logging

    import jax

    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    leave = threading.Thread(target=jax.distributed.shutdown, daemon=True)
    leave.start()
    try:
        wait = shutdown_wait_s()
    except ValueError:  # refused at the start of a run; here the exit must not fail
        wait = SHUTDOWN_WAIT_S
    leave.join(wait)
    os._exit(status)


def stop_for_failed_process(workdir: Optional[pathlib.Path | str]):
    """``on_failure(index, message)`` for :class:`umup_jax.processes.FailureWatch`: ends
    this process, which another process's failure left waiting in a collective.  Says so
    in one ``<program>: error: …`` line and in ``error.log``, leaves ``jax.distributed``
    cleanly (the failed process waits for that in its own shutdown) and exits with status
    1.  The main thread is blocked in the collective, so the exit is ``os._exit``: what
    the run wrote is flushed as it goes (metrics, checkpoints), nothing else is pending."""
    from umup_jax.cli import program_name

    def on_failure(index: int, message: str) -> None:
        import jax

        me = jax.process_index()
        text = (f"process {index} failed: {message}; process {me} stops too (process "
                f"{index}'s traceback is in error.log)")
        _append_error_log(workdir, text + "\n")
        print(f"{program_name()}: error: {text}", file=sys.stderr, flush=True)
        leave_processes_and_exit(1)

    return on_failure
