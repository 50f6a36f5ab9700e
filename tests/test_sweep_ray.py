"""Sweeps on a local Ray (2 CPUs): the same rows as the local backend, failed runs recorded and
run again on rerun, a dead worker retried, resume after a killed driver, the independent
search's stage order, bad backend input."""

import csv
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from umup_jax import config as config_lib
from umup_jax import sweep as sweep_lib
from umup_jax import sweep_backends as backends

ray = pytest.importorskip("ray", reason="needs the optional 'ray' extra")

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Columns that may differ between two runs of the same sweep: only the measured wall time.
# Everything else (ids, config columns, overrides, losses, diverged, error) is a function of
# the run and its deterministic training, whichever process ran it.
PER_PROCESS = {"wall_time_s"}


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module (the backend reuses an initialised Ray)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    yield
    ray.shutdown()


def base(arg="smoke,train.steps=2"):
    return config_lib.proxy_config("umup", arg)


def csv_rows(workdir):
    with open(pathlib.Path(workdir) / "results.csv", newline="") as f:
        return {r["run_id"]: r for r in csv.DictReader(f)}


def comparable(rows):
    return {rid: {k: v for k, v in r.items() if k not in PER_PROCESS}
            for rid, r in rows.items()}


GRID = {"name": "g", "kind": "grid",
        "grid": {"model.hparams.attn_mult": [0.5, 2.0], "model.num_heads": [1, 3]}}


def test_ray_and_local_rows_are_identical_and_failures_are_recorded(local_ray, tmp_path):
    sweep_lib.run_sweep(base(), GRID, str(tmp_path / "local"), progress=False)
    sweep_lib.run_sweep(base(), GRID, str(tmp_path / "ray"), progress=False, backend="ray")
    local, remote = csv_rows(tmp_path / "local"), csv_rows(tmp_path / "ray")
    assert len(local) == 4 and list(next(iter(local.values()))) == sweep_lib.COLUMNS
    assert comparable(local) == comparable(remote)  # every column, losses exactly
    failed = [r for r in remote.values() if r["error"]]
    assert len(failed) == 2  # num_heads=3 does not divide width 32: raised in the worker
    assert all("width=32 is invalid" in r["error"] and r["diverged"] == "" for r in failed)
    ok = [r for r in remote.values() if not r["error"]]
    assert all(r["diverged"] == "0" and float(r["final_eval_loss"]) > 0 for r in ok)
    # A rerun runs the failed runs again (they fail again: one more row each); the finished
    # ones not.
    lines_before = (tmp_path / "ray" / "results.csv").read_text().splitlines()
    ok_ids = {r["run_id"] for r in ok}
    finished = [line for line in lines_before[1:] if line.split(",", 1)[0] in ok_ids]
    assert len(finished) == 2 and sweep_lib.COLUMNS[0] == "run_id"
    sweep_lib.run_sweep(base(), GRID, str(tmp_path / "ray"), progress=False, backend="ray")
    lines_after = (tmp_path / "ray" / "results.csv").read_text().splitlines()
    assert len(lines_after) == len(lines_before) + 2
    assert all(lines_after.count(line) == 1 for line in finished)


@pytest.mark.slow  # the default suite's time: see BUILD.md's slow tests
def test_independent_search_under_ray_equals_local(local_ray, tmp_path):
    spec = {"name": "ind", "kind": "independent",
            "lr": {"values": [0.5, 2.0]},
            "hps": {"model.hparams.attn_mult": [2.0]}}  # stage 2 needs stage 1's best η
    sweep_lib.run_sweep(base(), spec, str(tmp_path / "local"), progress=False)
    sweep_lib.run_sweep(base(), spec, str(tmp_path / "ray"), progress=False, backend="ray")
    assert comparable(csv_rows(tmp_path / "local")) == comparable(csv_rows(tmp_path / "ray"))
    chosen = [json.loads((tmp_path / d / "chosen.json").read_text()) for d in ("local", "ray")]
    assert chosen[0] == chosen[1]


def test_a_run_whose_config_raises_in_the_worker_is_recorded(local_ray, tmp_path):
    """The Ray side of tests/test_sweep.py's case (validate bypassed): the worker raises while
    building the run's config, the driver records the row without rebuilding it, and the
    worker's traceback (which Ray does not ship with the exception) reaches error.log."""
    spec = {"name": "bad", "kind": "grid", "grid": {"model.width": ["abc"]}}
    ov = {"model.width": "abc", "seed": 0}
    runner = sweep_lib.Runner(spec, base(), tmp_path, progress=False,
                              backend=backends.RayBackend())
    try:
        (row,) = runner.run([("grid", ov)])
    finally:
        runner.close()
    assert row["run_id"] == sweep_lib.run_id(ov) and json.loads(row["overrides"]) == ov
    assert row["error"] == ("config key 'model.width' expects an integer (it is 32), "
                            "got 'abc'")
    assert csv_rows(tmp_path)[row["run_id"]]["error"] == row["error"]
    log = (tmp_path / "error.log").read_text()
    assert "traceback in the Ray worker" in log and "in run_config" in log


def test_a_task_whose_worker_dies_is_retried(local_ray, tmp_path):
    """A worker process that dies (os._exit: no exception reaches Ray) is retried, up to
    ``max_retries``; beyond them the unit's outcome is Ray's error (a failed run's row)."""

    def die_the_first_time(unit, marker):  # local: cloudpickle sends it by value
        import os
        import pathlib

        if not pathlib.Path(marker).exists():
            pathlib.Path(marker).write_text("died")
            os._exit(1)
        return ["rows of " + unit.members[0][0]]

    unit = backends.Unit([("g", {})])
    retried = backends.RayBackend()  # max_retries=2, as the sweep uses it
    ((_, outcome),) = retried.run([unit], die_the_first_time, str(tmp_path / "a"))
    assert outcome == ["rows of g"] and (tmp_path / "a").exists()  # died once, then ran
    no_retry = backends.RayBackend(max_retries=0)
    ((_, outcome),) = no_retry.run([unit], die_the_first_time, str(tmp_path / "b"))
    assert isinstance(outcome, ray.exceptions.RayError)
    assert not isinstance(outcome, ray.exceptions.RayTaskError)  # a death, not a raise


DRIVER = """
import sys
from umup_jax import config as C, sweep as S
spec = {"name": "k", "kind": "grid", "grid": {"model.hparams.attn_mult": [0.5, 1.0, 2.0]}}
S.run_sweep(C.proxy_config("umup", "smoke,train.steps=2"), spec, sys.argv[1], progress=False,
            backend="ray")
"""


@pytest.mark.slow  # the default suite's time: see BUILD.md's slow tests
def test_killed_driver_rerun_runs_only_missing_runs(local_ray, tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(tmp_path)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while not ((tmp_path / "results.csv").exists()
               and len((tmp_path / "results.csv").read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.time() < deadline, "driver ended too early"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
    time.sleep(1.0)
    proc.wait()
    before = csv_rows(tmp_path)
    # Two tasks run at a time: the first row lands while the third run has yet to finish.
    assert 1 <= len(before) < 3
    spec = {"name": "k", "kind": "grid", "grid": {"model.hparams.attn_mult": [0.5, 1.0, 2.0]}}
    sweep_lib.run_sweep(base(), spec, str(tmp_path), progress=False, backend="ray")
    after = csv_rows(tmp_path)
    assert len(after) == 3 and all(after[rid] == row for rid, row in before.items())
    lines = (tmp_path / "results.csv").read_text().splitlines()
    assert len(lines) == 1 + 3  # no finished run was trained (and recorded) twice


def test_bad_backend_input(tmp_path, monkeypatch, local_ray):
    with pytest.raises(backends.BackendError, match=r"--gpus_per_task=4 is more than any node"):
        sweep_lib.run_sweep(base(), GRID, str(tmp_path / "g"), progress=False, backend="ray",
                            gpus_per_task=4)
    assert not list((tmp_path / "g").glob("runs/*"))
    with pytest.raises(backends.BackendError, match="--backend='slurm' is invalid"):
        sweep_lib.run_sweep(base(), GRID, str(tmp_path / "s"), progress=False, backend="slurm")


def test_unreachable_address_fails_fast(tmp_path):
    t0 = time.time()
    with pytest.raises(backends.BackendError, match=r"cannot reach the Ray cluster at "
                                                    r"--ray_address='127.0.0.1:9'"):
        backends.RayBackend(address="127.0.0.1:9")
    assert time.time() - t0 < 10
    with pytest.raises(backends.BackendError, match="--ray_address='nowhere' is invalid"):
        backends.RayBackend(address="nowhere")


def test_cli_unreachable_ray_address_is_one_line(tmp_path):
    sweep = tmp_path / "s.json"
    sweep.write_text(json.dumps(GRID))
    cmd = [sys.executable, "-m", "umup_jax.sweep",
           f"--config={ROOT / 'configs' / 'umup_proxy.py'}:smoke,train.steps=2",
           f"--sweep={sweep}", f"--workdir={tmp_path / 'w'}", "--backend=ray",
           "--ray_address=127.0.0.1:9", "--noprogress"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == ("python -m umup_jax.sweep: error: cannot reach the Ray "
                                   "cluster at --ray_address='127.0.0.1:9' " +
                                   proc.stderr.split("'127.0.0.1:9' ", 1)[1].strip())
    assert "\n" not in proc.stderr.strip() and not (tmp_path / "w" / "runs").exists()
