"""Agreement between the processes of a multi-process run (one process per host).

Every collective of a run, a train step's all-reduce or one of orbax's barriers, waits for all
processes.  A process that raises alone, say on a checkpoint file only it found damaged or on
data only it could not read, leaves the others waiting in their next collective until
``jax.distributed``'s heartbeat ends the job minutes later, with no word of what went wrong.
So each step that one process may fail alone runs under :func:`together`: every process runs
it, then all exchange their outcomes (one all-gather of a short message), and either all go
on or all raise, each naming the process that failed and why.  Decisions that one process
makes for all (which checkpoint is intact, moving a damaged one aside) go through the same
exchange (:func:`from_main`), so the processes act on one verdict.  Where no exchange is
made (the training loop: one per step would cost a round trip each), a failing process
announces its failure (:func:`announce_failure`) and a :class:`FailureWatch` thread in each
other process ends it, instead of letting it wait in an all-reduce for good.

A group is anything with ``index``, ``count``, ``allgather(text) → [text of each process]``;
:func:`current` gives the run's (:class:`JaxProcesses` over ``jax.distributed``, or
:data:`SINGLE` for one process, where :func:`together` simply calls the function).  Tests use
threads with a shared group.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from typing import Any, Callable, Optional, Sequence, TypeVar

T = TypeVar("T")


class ProcessFailedError(RuntimeError):
    """Raised in every process that did not fail itself when another process of the run
    failed at the same step; its message names those processes and their errors."""


def message_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of ``exc``'s message, at most ``limit`` characters (third-party errors
    can run to hundreds of lines)."""
    lines = str(exc).strip().splitlines()
    msg = lines[0] if lines else ""
    return msg[:limit] + "…" if len(msg) > limit else msg


def first_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message`` (:func:`message_line`)."""
    msg = message_line(exc, limit)
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


class SingleProcess:
    """The group of a one-process run: nothing to exchange."""

    index = 0
    count = 1

    def allgather(self, text: str) -> list[str]:
        return [text]


SINGLE = SingleProcess()


class JaxProcesses:
    """The processes of ``jax.distributed``.  Messages travel through the coordination
    service's key-value store (the one ``jax.distributed`` already runs; orbax keeps its
    barriers there too), not through device collectives: an exchange can neither be confused
    with a collective that a process left mid-way (orbax's barriers, a train step) nor needs
    a compile, and a message may be any length.

    Exchange ``r`` is key ``umup_jax/exchange/<r>/<process>``; every process runs the same
    exchanges in the same order, so ``r`` counts them.  A process waits at most
    ``timeout_s`` for each other one (:data:`EXCHANGE_TIMEOUT_S`); a process that died is
    reported sooner by ``jax.distributed``'s own heartbeat."""

    def __init__(self, client=None, index: Optional[int] = None, count: Optional[int] = None,
                 timeout_s: Optional[float] = None):
        import jax

        self.client = _client() if client is None else client
        if self.client is None:
            raise RuntimeError("several JAX processes but no jax.distributed client: call "
                               "jax.distributed.initialize() first")
        self.index = jax.process_index() if index is None else index
        self.count = jax.process_count() if count is None else count
        self.timeout_s = exchange_timeout_s() if timeout_s is None else timeout_s
        self._round = 0

    def _key(self, r: int, i: int) -> str:
        return f"umup_jax/exchange/{r}/{i}"

    def allgather(self, text: str) -> list[str]:
        r = self._round
        self._round += 1
        self.client.key_value_set(self._key(r, self.index), text)
        out = []
        for i in range(self.count):
            if i == self.index:
                out.append(text)
                continue
            try:
                out.append(self.client.blocking_key_value_get(
                    self._key(r, i), int(self.timeout_s * 1000)))
            except Exception as e:  # a timeout, or the service going down
                raise ProcessFailedError(
                    f"process {i} did not reach exchange {r} within {self.timeout_s:g} s "
                    f"({message_line(e, 200)}); it is stuck or gone, so process "
                    f"{self.index} stops (raise {TIMEOUT_ENV} for steps that take longer)"
                ) from e
        if r:  # every process has read round r - 1, since each has written round r
            try:
                self.client.key_value_delete(self._key(r - 1, self.index))
            except Exception:  # noqa: BLE001 - a leftover key costs a few bytes, nothing else
                pass
        return out


# Longest wait for another process at one exchange (loading a big corpus, a slow restore).
EXCHANGE_TIMEOUT_S = 6 * 3600.0
TIMEOUT_ENV = "UMUP_JAX_EXCHANGE_TIMEOUT_S"


def exchange_timeout_s() -> float:
    """:data:`EXCHANGE_TIMEOUT_S`, or ``$UMUP_JAX_EXCHANGE_TIMEOUT_S`` (seconds) if set."""
    return seconds_from_env(TIMEOUT_ENV, EXCHANGE_TIMEOUT_S)


def seconds_from_env(name: str, default: float) -> float:
    """The environment variable ``name`` as a wait in seconds (a finite positive number), or
    ``default`` where it is unset; anything else is a ``ValueError`` naming it."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise ValueError(f"{name}={raw!r}: give the seconds to wait, a positive number")
    return value


_CURRENT: Optional[JaxProcesses] = None


def current():
    """The group of this run's processes: :data:`SINGLE` for one process, else one
    :class:`JaxProcesses` shared by all callers (its exchanges are counted, so every part of
    the run must use the same one)."""
    global _CURRENT
    import jax

    if jax.process_count() == 1:
        return SINGLE
    if _CURRENT is None or _CURRENT.client is not _client():
        _CURRENT = JaxProcesses()
    return _CURRENT


def _client():
    """``jax.distributed``'s client (``None`` before ``initialize``), the one orbax uses."""
    from jax._src import distributed

    return distributed.global_state.client


def together(what: str, fn: Callable[[], T], group=None,
             shared: Sequence[type] = ()) -> T:
    """``fn()`` in every process of ``group``; returns its result if it raised in none.

    If it raised in any process, every process raises, after the exchange, so that none is
    left waiting in the next collective:

    * a process whose own ``fn`` raised re-raises that exception;
    * if some process raised an exception that is not of a ``shared`` type, the others raise
      :class:`ProcessFailedError` ``"process(es) [i] failed <what>: process i: <Type>:
      <first line>"``;
    * (a process whose own failure was of a ``shared`` type raises that
      :class:`ProcessFailedError` too: nobody goes on to handle a shared outcome alone);
    * if every failure is of a ``shared`` type (an outcome the caller handles in every process
      alike, such as a damaged checkpoint or a refused resume), the others raise the first
      failing process's type, with its message prefixed by ``"process i: "``.  Such a type
      must take its message as its one argument.

    One process (``group.count == 1``): ``fn()`` itself, exceptions untouched.
    """
    group = SINGLE if group is None else group
    if group.count == 1:
        return fn()
    error: Optional[Exception] = None
    result: Any = None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - exchanged, then re-raised in this process
        error = e
    # [kind, message, type name]: kind -1 none, i < len(shared) shared[i], len(shared) any
    # other.
    mine = [-1, ""]
    if error is not None:
        mine = [next((i for i, cls in enumerate(shared) if isinstance(error, cls)),
                     len(shared)), message_line(error), type(error).__name__]
    outcomes = [json.loads(t) for t in group.allgather(json.dumps(mine))]
    failed = [(i, o) for i, o in enumerate(outcomes) if o[0] >= 0]
    if not failed:
        return result
    said = lambda o: f"{o[2]}: {o[1]}" if o[1] else o[2]  # noqa: E731
    unshared = [(i, o) for i, o in failed if o[0] == len(shared)]
    own_is_shared = error is not None and mine[0] < len(shared)
    if error is not None and not (unshared and own_is_shared):
        others = [f"process {i}: {said(o)}" for i, o in failed if i != group.index]
        if others:  # this process's traceback names the others' failures too
            error.add_note("in other processes at the same step: " + "; ".join(others))
        raise error
    if unshared:  # also where this process's own failure was a shared one: nobody goes on
        raise ProcessFailedError(
            f"process(es) {[i for i, _ in unshared]} failed {what}: "
            + "; ".join(f"process {i}: {said(o)}" for i, o in unshared)
            + f" (process {group.index} stops with them; the failing process's own "
            "error.log has its traceback)") from error
    i, o = failed[0]
    raise shared[o[0]](f"process {i}: {o[1]}")


def from_main(what: str, fn: Callable[[], T], group=None, shared: Sequence[type] = ()) -> T:
    """``fn()`` in process 0 only, its JSON-able result returned in every process (process 0
    decides for all: which checkpoint is intact, what was moved where).  Its failure is
    raised everywhere as in :func:`together`."""
    group = SINGLE if group is None else group
    if group.count == 1:
        return fn()
    value = together(what, lambda: json.dumps(fn() if group.index == 0 else None),
                     group, shared)
    return json.loads(group.allgather(value)[0])


def check_agree(what: str, value: str, group=None) -> None:
    """Refuses, in every process alike, a ``value`` that is not the same in all of them (the
    run's config, its tokens' fingerprint): compares SHA-256 digests of ``value``.  Every
    process must train the same thing, and a check that failed in one process only (a
    resume refused there) would otherwise part the processes."""
    group = SINGLE if group is None else group
    if group.count == 1:
        return
    every = group.allgather(hashlib.sha256(value.encode()).hexdigest())
    differ = [i for i, d in enumerate(every) if d != every[0]]
    if differ:
        raise ValueError(f"the {len(every)} processes disagree on {what}: process(es) {differ} "
                         "differ from process 0; every process must run the same config on "
                         "the same data")


# -- a failure announced to the others ----------------------------------------------------

# Key of the first announced failure: ``[process index, "Type: first line"]``.
FAILED_KEY = "umup_jax/failed"
_failing = threading.Event()  # set once this process has begun to fail


def announce_failure(exc: BaseException) -> None:
    """Marks this process as failing and, with several processes, tells the others through
    the key-value store (:data:`FAILED_KEY`; the first announcement stands), so that one
    waiting in a collective that this process will never join learns of it through its
    :class:`FailureWatch`.  Never raises."""
    _failing.set()
    group = _CURRENT
    if group is None:
        return
    try:
        group.client.key_value_set(FAILED_KEY, json.dumps([group.index, first_line(exc)]))
    except Exception:  # noqa: BLE001 - another process announced first, or the service is gone
        pass


def failing() -> bool:
    """Whether this process has begun to fail (:func:`announce_failure`)."""
    return _failing.is_set()


class FailureWatch:
    """Watches for another process's failure while this one runs a stretch in which it does
    not exchange outcomes: the training loop, whose every step waits in an all-reduce that
    a failed process never joins, so the others would wait until ``jax.distributed``'s
    heartbeat or shutdown timeout ends them, minutes later and without a word of why.

    A context manager: inside, a thread polls :data:`FAILED_KEY` every ``poll_s``; once
    another process has announced a failure and this one has not begun to fail itself
    within ``grace_s`` (a failure that every process raises, like :func:`together`'s, is
    announced by each), ``on_failure(index, message)`` runs in that thread and is expected
    to end the process.  An exception leaving the block is announced
    (:func:`announce_failure`) before it propagates.  One process: nothing is watched."""

    def __init__(self, group, on_failure: Callable[[int, str], None], poll_s: float = 1.0,
                 grace_s: float = 5.0):
        self.group = SINGLE if group is None else group
        self.on_failure = on_failure
        self.poll_s, self.grace_s = poll_s, grace_s
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _announced(self) -> Optional[tuple[int, str]]:
        try:
            raw = self.group.client.key_value_try_get(FAILED_KEY)
        except Exception:  # noqa: BLE001 - not announced (NOT_FOUND), or the service is gone
            return None
        index, message = json.loads(raw)
        return int(index), str(message)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            found = self._announced()
            if found is None or found[0] == self.group.index:
                continue
            deadline = time.monotonic() + self.grace_s
            while time.monotonic() < deadline and not _failing.is_set():
                if self._stop.wait(0.1):
                    return
            if not _failing.is_set():
                self.on_failure(*found)
            return

    def __enter__(self) -> "FailureWatch":
        if self.group.count > 1:
            self._thread = threading.Thread(target=self._watch, name="umup_jax-failure-watch",
                                            daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None and not isinstance(exc, (SystemExit, GeneratorExit)):
            announce_failure(exc)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.poll_s + 1.0)
