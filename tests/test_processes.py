"""Agreement between processes (umup_jax.processes) and the checkpoint store's common
verdicts, with threads standing in for the processes of a run: a failure in one process is
raised in all of them (none is left waiting), and a damaged checkpoint is moved aside once
and skipped by all, whichever process found the damage.  (The two-process runs of
tests/test_sharding.py check the same over jax.distributed.)"""

import json
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from umup_jax import checkpoint as ckpt
from umup_jax import config as config_lib
from umup_jax import failures
from umup_jax import processes
from umup_jax import train as train_lib

WAIT_S = 60  # a thread left waiting this long fails its test instead of hanging it


class _Shared:
    def __init__(self, n):
        self.n = n
        self.barrier = threading.Barrier(n, timeout=WAIT_S)
        self.slots = [None] * n


class ThreadGroup:
    """Process ``index`` of ``shared.n``; all-gathers through a shared list and a barrier."""

    def __init__(self, shared: _Shared, index: int):
        self.shared, self.index, self.count = shared, index, shared.n

    def allgather(self, text):
        self.shared.slots[self.index] = text
        self.shared.barrier.wait()
        out = list(self.shared.slots)
        self.shared.barrier.wait()
        return out


def in_threads(fn, n=2):
    """``fn(group)`` in n threads; [(result, exception)] of each, in index order."""
    shared = _Shared(n)
    out = [None] * n

    def body(i):
        try:
            out[i] = (fn(ThreadGroup(shared, i)), None)
        except Exception as e:  # noqa: BLE001 - returned to the test
            out[i] = (None, e)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S * 4)
    assert not any(t.is_alive() for t in threads), "a thread was left waiting"
    return out


class FakeKeyValueStore:
    """The key-value part of jax.distributed's client, in memory."""

    def __init__(self):
        self.values, self.cond = {}, threading.Condition()

    def key_value_set(self, key, value):
        with self.cond:
            assert key not in self.values, f"{key} written twice"
            self.values[key] = value
            self.cond.notify_all()

    def blocking_key_value_get(self, key, timeout_in_ms):
        with self.cond:
            if not self.cond.wait_for(lambda: key in self.values, timeout_in_ms / 1000):
                raise RuntimeError(f"DEADLINE_EXCEEDED: GetKeyValue() timed out with key: {key}")
            return self.values[key]

    def key_value_delete(self, key):
        with self.cond:
            self.values.pop(key, None)

    def key_value_try_get(self, key):
        with self.cond:
            if key not in self.values:
                raise RuntimeError(f"NOT_FOUND: Config key {key} not found")
            return self.values[key]


def test_jax_processes_exchange_through_the_key_value_store_round_by_round():
    store = FakeKeyValueStore()

    def fn(g):
        group = processes.JaxProcesses(store, g.index, 2, timeout_s=WAIT_S)
        return [group.allgather(f"{r}:{g.index}:" + "x" * 5000 * g.index) for r in range(3)]

    (r0, e0), (r1, e1) = in_threads(fn)
    assert e0 is None and e1 is None and r0 == r1
    assert r0 == [[f"{r}:0:", f"{r}:1:" + "x" * 5000] for r in range(3)]  # any length
    # each process deletes its message of round r - 1 once round r is complete
    assert sorted(store.values) == ["umup_jax/exchange/2/0", "umup_jax/exchange/2/1"]


def test_a_process_that_never_arrives_is_named_after_the_timeout():
    group = processes.JaxProcesses(FakeKeyValueStore(), 0, 3, timeout_s=0.05)
    with pytest.raises(processes.ProcessFailedError,
                       match=r"process 1 did not reach exchange 0 within 0.05 s "
                             r"\(DEADLINE_EXCEEDED"):
        group.allgather("hello")


def test_the_exchange_timeout_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(processes.TIMEOUT_ENV, raising=False)
    assert processes.exchange_timeout_s() == processes.EXCHANGE_TIMEOUT_S == 6 * 3600
    monkeypatch.setenv(processes.TIMEOUT_ENV, "90")
    assert processes.JaxProcesses(FakeKeyValueStore(), 0, 2).timeout_s == 90.0
    for bad in ("0", "-3", "soon", "nan", "inf"):
        monkeypatch.setenv(processes.TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match="UMUP_JAX_EXCHANGE_TIMEOUT_S=.*positive number"):
            processes.exchange_timeout_s()


def test_the_shutdown_wait_comes_from_the_environment_and_a_bad_one_stops_a_run_early(
        monkeypatch, tmp_path):
    monkeypatch.delenv(failures.SHUTDOWN_WAIT_ENV, raising=False)
    assert failures.shutdown_wait_s() == failures.SHUTDOWN_WAIT_S == 30.0
    monkeypatch.setenv(failures.SHUTDOWN_WAIT_ENV, "2.5")
    assert failures.shutdown_wait_s() == 2.5
    for bad in ("0", "-3", "soon", "nan", "inf"):
        monkeypatch.setenv(failures.SHUTDOWN_WAIT_ENV, bad)
        with pytest.raises(ValueError, match="UMUP_JAX_SHUTDOWN_WAIT_S=.*positive number"):
            failures.shutdown_wait_s()
    with pytest.raises(ValueError, match="UMUP_JAX_SHUTDOWN_WAIT_S='inf'"):
        train_lib.train_and_evaluate(config_lib.proxy_config("umup", "smoke"), str(tmp_path))
    assert not any(tmp_path.iterdir())  # before any work


@pytest.fixture
def two_process_store(monkeypatch):
    """Process 0's view of a two-process run whose key-value store is in memory."""
    store = FakeKeyValueStore()
    monkeypatch.setattr(processes, "_CURRENT", processes.JaxProcesses(store, 0, 2))
    monkeypatch.setattr(processes, "_failing", threading.Event())
    return store


def _watch(calls, **kw):
    return processes.FailureWatch(processes._CURRENT, lambda i, m: calls.append((i, m)),
                                  poll_s=0.01, **kw)


def test_the_failure_watch_reports_another_process_failure(two_process_store):
    calls = []
    with _watch(calls, grace_s=0.05):
        two_process_store.key_value_set(processes.FAILED_KEY, '[1, "OSError: disk gone"]')
        deadline = time.time() + WAIT_S
        while not calls and time.time() < deadline:
            time.sleep(0.01)
    assert calls == [(1, "OSError: disk gone")]


def test_the_failure_watch_leaves_a_process_that_is_failing_itself_alone(two_process_store):
    calls = []
    with _watch(calls, grace_s=0.5):
        two_process_store.key_value_set(processes.FAILED_KEY, '[1, "ValueError: bad"]')
        time.sleep(0.1)  # within the grace: this process's own failure is under way
        processes.announce_failure(ValueError("bad here too"))
        time.sleep(0.8)
    assert calls == [] and processes.failing()
    # the first announcement stands
    assert two_process_store.values[processes.FAILED_KEY] == '[1, "ValueError: bad"]'


def test_an_exception_leaving_the_watched_block_is_announced(two_process_store):
    calls = []
    with pytest.raises(OSError):
        with _watch(calls):
            raise OSError(5, "Input/output error", "/data/shard-3")
    assert calls == [] and processes.failing()
    index, message = json.loads(two_process_store.values[processes.FAILED_KEY])
    assert (index, message) == (0, "OSError: [Errno 5] Input/output error: '/data/shard-3'")


def test_one_process_watches_nothing_and_announces_to_nobody(monkeypatch):
    monkeypatch.setattr(processes, "_CURRENT", None)
    monkeypatch.setattr(processes, "_failing", threading.Event())
    watch = processes.FailureWatch(processes.SINGLE, lambda i, m: None)
    with pytest.raises(KeyError):
        with watch:
            assert watch._thread is None
            raise KeyError("x")
    assert processes.failing()


class Shared(RuntimeError):
    pass


def test_together_returns_each_result_when_none_fails():
    assert in_threads(lambda g: processes.together("x", lambda: g.index * 10, g)) == [
        (0, None), (10, None)]
    assert processes.together("x", lambda: 5) == 5  # one process: fn() itself


def test_a_failure_in_one_process_is_raised_in_every_process():
    def fn(g):
        def work():
            if g.index == 1:
                raise OSError("No such file or directory: '/data/train.bin'\nsecond line")
            return "ok"
        return processes.together("loading the data", work, g)

    (r0, e0), (r1, e1) = in_threads(fn, n=3)[:2]
    assert r0 is None and isinstance(e0, processes.ProcessFailedError)
    assert str(e0).startswith(
        "process(es) [1] failed loading the data: process 1: OSError: No such file or "
        "directory: '/data/train.bin' (process 0 stops with them")
    assert type(e1) is OSError and "second line" in str(e1)  # its own, untouched


def test_both_failing_each_raises_its_own_naming_the_other():
    def fn(g):
        def work():
            raise (KeyError if g.index else ValueError)(f"bad {g.index}")
        return processes.together("x", work, g)

    (_, e0), (_, e1) = in_threads(fn)
    assert type(e0) is ValueError and type(e1) is KeyError
    assert e0.__notes__ == ["in other processes at the same step: process 1: KeyError: 'bad 1'"]


def test_a_shared_failure_is_raised_as_its_type_everywhere():
    def fn(g):
        def work():
            if g.index == 1:
                raise Shared("checkpoint 6 is damaged")
        return processes.together("x", work, g, shared=(Shared,))

    (_, e0), (_, e1) = in_threads(fn)
    assert type(e0) is Shared and str(e0) == "process 1: checkpoint 6 is damaged"
    assert type(e1) is Shared and str(e1) == "checkpoint 6 is damaged"

    def mixed(g):  # another kind of failure elsewhere wins: nobody handles it as shared
        def work():
            if g.index < 2:
                raise Shared("damaged") if g.index == 0 else OSError("disk")
        return processes.together("x", work, g, shared=(Shared,))

    (_, e0), (_, e1), (_, e2) = in_threads(mixed, n=3)
    assert type(e1) is OSError
    for e in (e0, e2):
        assert type(e) is processes.ProcessFailedError and "process 1: OSError: disk" in str(e)
    assert type(e0.__cause__) is Shared


def test_from_main_gives_process_0s_value_to_all():
    out = in_threads(lambda g: processes.from_main("x", lambda: [g.index, "a"], g), n=3)
    assert out == [([0, "a"], None)] * 3

    def failing(g):
        return processes.from_main("listing the checkpoints",
                                   lambda: 1 / 0 if g.index == 0 else 1, g)

    (_, e0), (_, e1) = in_threads(failing)
    assert type(e0) is ZeroDivisionError
    assert "process(es) [0] failed listing the checkpoints: process 0: ZeroDivisionError" in str(e1)


def test_check_agree_refuses_a_differing_value_in_every_process():
    out = in_threads(lambda g: processes.check_agree("the run config", f"cfg{g.index // 2}", g),
                     n=3)
    for _, e in out:
        assert "the 3 processes disagree on the run config: process(es) [2]" in str(e)
    assert in_threads(lambda g: processes.check_agree("x", "same", g)) == [(None, None)] * 2


def test_long_messages_are_cut_to_one_line():
    def fn(g):
        def work():
            if g.index:
                raise RuntimeError("é" * 5000 + "\nrest")
        return processes.together("x", work, g)

    (_, e0), _ = in_threads(fn)
    assert "é" * 300 + "…" in str(e0) and "rest" not in str(e0)


# ---------------------------------------------------------------------------------------------
# The checkpoint store: one verdict for all processes
# ---------------------------------------------------------------------------------------------

DEVICE = jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _state(step):
    return {"w": jnp.full((4, 8), float(step)), "step": jnp.int32(step)}


ABSTRACT = {"w": jax.ShapeDtypeStruct((4, 8), jnp.float32, sharding=DEVICE),
            "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=DEVICE)}


@pytest.fixture
def saved(tmp_path):
    """A run directory with checkpoints 3 and 6 (manifests included)."""
    store = ckpt.CheckpointStore(tmp_path / "checkpoints", keep=3)
    for step in (3, 6):
        store.save(step, _state(step), {"next": step}, {"seed": 0}, "fp")
    store.close()
    return tmp_path / "checkpoints"


def _restore_in(directory, group, patch=None):
    store = ckpt.CheckpointStore(directory, keep=3, writer=group.index == 0, group=group)
    if patch is not None:
        patch(store, group.index)
    try:
        step, state, data = store.restore_latest(ABSTRACT)
        return step, int(state["step"]), data, store.token_fingerprint(step)
    finally:
        store.close()


def _corrupt_dirs(directory):
    return sorted(p.name.split("-")[0] for p in (directory / "corrupt").iterdir())


def test_damage_that_only_process_0_checks_is_skipped_by_every_process(saved):
    for f in (saved / "6" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(f.read_bytes()[:1])  # fails process 0's manifest check
    out = in_threads(lambda g: _restore_in(saved, g))
    assert out == [((3, 3, {"next": 3}, "fp"), None)] * 2
    assert _corrupt_dirs(saved) == ["6"] and sorted(p.name for p in saved.iterdir()) == [
        "3", "corrupt"]


def test_damage_one_process_reads_makes_every_process_fall_back(saved):
    """Process 1 alone fails to decode step 6's state (its shards); without a common verdict
    process 0 would train on from step 6 and process 1 from step 3 (or hang)."""
    def patch(store, index):
        if index == 1:
            real = store._restore_item

            def restore(step, item, args=None):
                if step == 6 and item == "state":
                    raise ValueError("DATA_LOSS: corrupt record in a shard of process 1")
                return real(step, item, args)
            store._restore_item = restore

    out = in_threads(lambda g: _restore_in(saved, g, patch))
    assert out == [((3, 3, {"next": 3}, "fp"), None)] * 2
    assert _corrupt_dirs(saved) == ["6"]


def test_a_persistent_read_error_in_one_process_stops_all(saved, monkeypatch):
    monkeypatch.setattr(ckpt, "RETRY_WAIT_S", 0.0)

    def patch(store, index):
        if index == 1:
            def restore(step, item, args=None):
                raise OSError("Resource temporarily unavailable")
            store._restore_item = restore

    (_, e0), (_, e1) = in_threads(lambda g: _restore_in(saved, g, patch))
    assert type(e1) is ckpt.CheckpointReadError and "after 3 tries" in str(e1)
    assert type(e0) is processes.ProcessFailedError
    assert ("process(es) [1] failed checking checkpoint step 6: process 1: "
            "CheckpointReadError") in str(e0)
    assert not (saved / "corrupt").exists()  # nothing moved


def test_a_manifest_process_0_cannot_write_stops_every_process(tmp_path, monkeypatch):
    def fail(path):
        raise OSError("No space left on device")

    monkeypatch.setattr(ckpt, "write_manifest", fail)

    def save(g):
        store = ckpt.CheckpointStore(tmp_path / "c", keep=2, writer=g.index == 0, group=g)
        if g.index:  # orbax's own multi-process save is not for threads: one writes it
            store._manager.save = lambda *a, **k: None
        try:
            return store.save(3, _state(3), {}, {})
        finally:
            store.close()

    (_, e0), (_, e1) = in_threads(save)
    assert type(e0) is OSError
    assert ("failed writing the manifest of checkpoint step 3: process 0: OSError: No space"
            in str(e1))
