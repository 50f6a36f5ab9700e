"""Sharded training on forced CPU devices (subprocesses): mesh shapes agree with 1 device,
parameter shardings follow the logical rules, FSDP memory, reshard on restore, two processes
with jax.distributed, and errors before compilation."""

import json
import re
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import xla_flags
from umup_jax import sharding as sharding_lib
from umup_jax.metrics import read_metrics

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    env = {**os.environ, "XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=8")}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "sharded_worker.py"), str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.mark.parametrize("mesh", ["8x1x1", "2x4x1", "2x2x2"])
def test_meshes_match_one_device(worker, mesh):
    np.testing.assert_allclose(worker["losses"][mesh], worker["losses"]["1"], rtol=1e-4)


@pytest.mark.parametrize("mesh", ["1", "8x1x1", "2x4x1", "2x2x2", "1x8x1"])
def test_parameter_shardings_follow_the_rules(worker, mesh):
    specs = worker["sharding_ok"][mesh]
    assert specs["['params']['layer_0']['ffn_up']"][0] == ["fsdp", "tensor"]
    assert specs["['params']['layer_1']['attn_qkv']"][0] == ["fsdp", None, "tensor"]
    for path, (expected, got) in specs.items():
        assert expected == got, (mesh, path)


def test_fsdp_over_8_devices_holds_at_most_a_sixth(worker):
    b = worker["bytes"]["1x8x1"]
    print(f"\nparams+optimizer state: {b['total']} bytes unsharded, "
          f"{b['max_per_device']} per device under FSDP over 8")
    assert b["max_per_device"] * 6 <= b["total"]
    assert worker["bytes"]["1"]["max_per_device"] == b["total"]


def test_save_on_2x4_restore_on_4x2_and_one_device(worker):
    r = worker["restore"]
    for name in ("4x2x1", "1"):
        assert r[f"{name}_params_equal"] and r[f"{name}_sharding_ok"]
        assert r[f"{name}_data_state"] == {"next_index": 3}
        np.testing.assert_allclose(r[name], r["2x4x1"], rtol=1e-6)
        assert r[f"{name}_update_max_rel"] < 1e-5  # same per-parameter LRs after the reshard


def test_activations_split_over_the_batch_and_only_weights_are_gathered(worker):
    """Under FSDP (mesh 2x4x1) the residual stream is split over data × fsdp on its batch
    axis, not over the width as the embedding table is (XLA's propagation gave it the table's
    split before ``sharding.constrain_batch``); so, past the embedding lookup, the train
    step's collectives are FSDP's own, on weights and their gradients: none moves an
    activation (an array with the run's sequence length, 48, which no weight has: before,
    every RMSNorm all-reduced one and 11 all-to-alls resharded them) and none is an
    all-to-all.  The lookup (``jit(_take)``) may exchange rows: XLA looks tokens up in the
    width-split table and sends the rows to their batch shard (an all-to-all here; at width
    256 it gathers the table instead)."""
    for name, spec in worker["stream_specs"].items():
        assert spec == [["data", "fsdp"]], (name, spec)
    ops = [o for o in worker["collectives"] if "jit(_take)" not in o[2]]
    assert any(op == "all-gather" for op, _, _ in ops), ops  # FSDP gathers its weights
    assert not [o for o in ops if o[0] in ("all-to-all", "collective-permute")], ops
    activation = re.compile(r"\[(?:[0-9]+,)*48(?:,[0-9]+)*\]")
    assert not [o for o in ops if activation.search(o[1])], ops


def test_fp8_trains_under_sharding(worker):
    losses = worker["fp8_losses"]
    assert all(np.isfinite(losses["2x2x2"]))
    np.testing.assert_allclose(losses["2x2x2"], losses["1"], rtol=1e-3)


@pytest.mark.parametrize("variant", ["umup_8x1x1_k2", "umup_2x2x2_k2_scan_remat_chunks",
                                     "sp_4x2x1_k2", "umup_2x4x1_k2_gather_once",
                                     "umup_2x4x1_k2_gather_reduce_once",
                                     "sp_2x2x2_k2_reduce_once_scan_chunks"])
def test_accumulation_over_data_replicas_equals_one_device(worker, variant):
    """With ``mesh.data`` > 1 and 2 micro-batches each replica's gradient is computed apart
    (``train.make_grad_fn``'s vmap over ``data``) and summed once: one step's loss, activation
    RMS (two u-μP variants) and every gradient equal one device's without accumulation to 1e-6 of their
    RMS (measured ≤ 5.5e-7), also scanned, rematerialised, with the chunked loss and the
    three mesh axes, with FSDP's weights gathered once per step
    (``train.fsdp_gather_once``) and with its gradients reduced once per step
    (``train.fsdp_reduce_once``: the running sums kept per data × fsdp replica)."""
    found = worker["accum"][variant]
    assert found["split"]
    assert found["max_rel"] <= 1e-6, found


def _kinds(found: dict) -> dict:
    """The per-collective rows of the worker's ``step_collectives`` (not its byte counts)."""
    return {k: v for k, v in found.items() if isinstance(v, dict)}


def test_accumulation_all_reduces_the_gradient_once_per_step(worker):
    """Mesh 8x1x1, 4 micro-batches, the chunked loss: the compiled train step all-reduces
    once per step, outside every loop, the fp32 gradient (and the loss); the plain
    accumulation loop, as XLA partitions it, all-reduced inside the loop every micro-batch's
    gradient and every chunk's readout gradient (12 all-reduces, 4.4× the bytes)."""
    split, plain = (worker["accum_collectives"][k] for k in ("split", "plain"))
    params = split["param_bytes"]
    assert set(_kinds(split)) == {"all-reduce"}, split
    reduced = split["all-reduce"]
    assert (reduced["in_loops"], reduced["outside"]) == (0, 1)
    assert params <= reduced["bytes"] <= params + 64
    assert plain["all-reduce"]["in_loops"] >= 4, plain
    assert plain["all-reduce"]["bytes"] >= 3 * params, plain


@pytest.mark.parametrize("variant", ["umup_8x1x1_chunks4_fp8", "umup_2x4x1_chunks4",
                                     "sp_2x2x2_chunks2_scan"])
def test_chunked_loss_over_batch_replicas_equals_one_device(worker, variant):
    """``model.loss_chunks`` without accumulation on a mesh that splits the batch: the chunked
    loss's backward sums each batch replica's readout gradient apart
    (``loss_chunks.chunked_readout_loss``'s vmap over the batch axes, the readout weight
    gathered once); one step's loss, every gradient, activation RMS (u-μP) and FP8 cast
    statistics (``paper_simple``) equal one device's to 1e-6 of their RMS (measured
    ≤ 5.2e-7), on data parallelism, FSDP and, scanned, three mesh axes (SP)."""
    found = worker["chunks"][variant]
    assert not found["split"]  # no accumulation: only the chunked loss splits the replicas
    assert found["max_rel"] <= 1e-6, found


def test_chunked_loss_reduces_the_readout_gradient_once(worker):
    """``model.loss_chunks=4``, no accumulation. Mesh 8x1x1: the compiled step's only
    all-reduce is outside every loop and carries the gradient once (the params' fp32 bytes
    and the loss); summed into a replicated carry, XLA all-reduced each chunk's readout
    gradient inside the chunks' loop, 4 times, the step moving 3 readout gradients more.
    Mesh 2x4x1 (FSDP): no collective inside the loop either (the readout weight gathered
    before it, its gradient reduced after it), and fewer bytes in all than with an
    FSDP-sharded carry, whose loop reduced each chunk's gradient."""
    c = worker["chunks_collectives"]
    per_replica, plain = c["8x1x1_per_replica"], c["8x1x1_plain"]
    params, readout = per_replica["param_bytes"], per_replica["readout_bytes"]
    assert set(_kinds(per_replica)) == {"all-reduce"}, per_replica
    reduced = per_replica["all-reduce"]
    assert (reduced["in_loops"], reduced["outside"]) == (0, 1), reduced
    assert params <= reduced["bytes"] <= params + 64
    assert plain["all-reduce"]["in_loops"] == 4, plain
    assert plain["all-reduce"]["bytes"] >= params + 3 * readout, plain

    fsdp, fsdp_plain = _kinds(c["2x4x1_per_replica"]), _kinds(c["2x4x1_plain"])
    assert sum(v["in_loops"] for v in fsdp.values()) == 0, fsdp
    assert sum(v["in_loops"] for v in fsdp_plain.values()) >= 4, fsdp_plain
    assert (sum(v["bytes"] for v in fsdp.values())
            < sum(v["bytes"] for v in fsdp_plain.values()) - 2 * readout), (fsdp, fsdp_plain)


def test_fsdp_reduce_once_leaves_no_collective_in_the_accumulation_loop(worker):
    """Mesh 2x4x1, 4 micro-batches, ``train.fsdp_gather_once``: with
    ``train.fsdp_reduce_once`` the compiled step has no collective inside the loop (the
    weights gathered before it, the gradient reduced after it) and moves under half the
    bytes; without it each micro-batch's gradient was reduced over ``fsdp`` in the loop."""
    found = worker["fsdp_once_collectives"]

    def totals(c):
        return (sum(v["in_loops"] for v in _kinds(c).values()),
                sum(v["bytes"] for v in _kinds(c).values()))

    (loops_once, bytes_once), (loops, bytes_) = (totals(found["gather_reduce"]),
                                                 totals(found["gather"]))
    assert loops_once == 0 and loops >= 4, found
    assert bytes_once < 0.5 * bytes_, found


def test_bad_meshes_fail_before_compilation_naming_sizes(worker):
    e = worker["errors"]
    assert "has 3 devices but 8 are available" in e["mesh_size"]
    assert "dimension 2 is not divisible by mesh axis 'tensor' of size 8" in e["indivisible_dim"]
    assert "train.batch_size=4 is not divisible by data × fsdp = 1 × 8 = 8" in e["batch"]


def test_mesh_shape_resolution():
    assert sharding_lib.mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == (4, 2, 1)
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        sharding_lib.mesh_shape({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(ValueError, match="8 is not divisible by 3"):
        sharding_lib.mesh_shape({"data": -1, "fsdp": 3}, 8)
    with pytest.raises(ValueError, match="mesh.tensor=0 is invalid"):
        sharding_lib.mesh_shape({"tensor": 0}, 8)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _main_cmd(workdir, arg, main=None):
    return [sys.executable, *(["-m", "umup_jax.main"] if main is None else [str(main)]),
            f"--config={ROOT / 'configs' / 'umup_proxy.py'}:{arg}", f"--workdir={workdir}"]


def _two_processes(workdir, arg, logs, args=("", ""), envs=({}, {}), mains=(None, None)):
    """main in two processes on localhost (one CPU device each), jax.distributed via the
    environment; process i's stdout and stderr go to ``logs/<i>.out`` / ``.err``, and
    ``args[i]`` is appended to its config ARG, ``envs[i]`` to its environment; ``mains[i]``,
    a script that runs ``umup_jax.main`` (after patching it), replaces ``-m umup_jax.main``."""
    port = _free_port()
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for pid in range(2):
        env = {**os.environ, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
               "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(pid), **envs[pid]}
        with open(logs / f"{pid}.out", "w") as out, open(logs / f"{pid}.err", "w") as err:
            procs.append(subprocess.Popen(_main_cmd(workdir, arg + args[pid], mains[pid]),
                                          cwd=ROOT, env=env, stdout=out, stderr=err,
                                          text=True))
    return procs


def _finish(procs, logs, timeout=240):
    """Every process's (status, stdout, stderr) from ``logs``; kills them all if one hangs."""
    deadline = time.time() + timeout
    hung = False
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.time(), 1))
        except subprocess.TimeoutExpired:
            hung = True
    if hung:
        for p in procs:
            p.kill()
            p.wait()
    outs = [((logs / f"{i}.out").read_text(), (logs / f"{i}.err").read_text())
            for i in range(len(procs))]
    if hung:
        pytest.fail("the processes hung: " + " | ".join(o[0][-500:] for o in outs))
    return [(p.returncode, *o) for p, o in zip(procs, outs)]


def test_two_processes_match_one_and_a_sigterm_to_one_stops_both_at_one_step(tmp_path):
    """Two processes train as one does (they with 2 accumulated micro-batches, over the data
    replicas, the one process without); a SIGTERM to one of them stops both after the same step
    (143 each, one checkpoint there) instead of one process entering the checkpoint's
    collectives while the other enters the next step's, and the resumed run's losses are the
    uninterrupted run's."""
    steps = 12
    arg = (f"smoke,train.steps={steps},train.batch_size=8,train.eval_batch_size=8,"
           "train.checkpoint_every=1000,train.eval_every=1000,optimizer.schedule=constant")
    single = subprocess.run(_main_cmd(tmp_path / "single", arg), cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]

    # The two processes accumulate 2 micro-batches: each process's replica computes its
    # gradient apart and the step all-reduces once (train.splits_over_data_replicas).
    multi = tmp_path / "multi"
    multi_arg = arg + ",train.grad_accum_steps=2"
    procs = _two_processes(multi, multi_arg, tmp_path / "logs")
    # Before the training loop (process 0's banner, after jax.distributed is up): JAX's
    # preemption notifier would take it and the run would train on to the end.
    deadline = time.time() + 240
    while "umup-jax:" not in (tmp_path / "logs" / "0.out").read_text():
        assert all(p.poll() is None for p in procs) and time.time() < deadline
        time.sleep(0.01)
    procs[1].send_signal(signal.SIGTERM)  # process 1 only: process 0 has no signal
    (rc0, out0, err0), (rc1, _, err1) = _finish(procs, tmp_path / "logs")
    assert (rc0, rc1) == (128 + signal.SIGTERM,) * 2, err0[-2000:] + err1[-2000:]
    stopped = json.loads((multi / "results.json").read_text())
    assert "2 process(es)" in out0 and stopped["devices"] == 2
    assert stopped["interrupted"] and stopped["signal"] == signal.SIGTERM
    s = stopped["steps"]
    assert 1 <= s <= 3 and f"saved checkpoint at step {s}" in out0  # voted with step 0
    assert sorted(int(d.name) for d in (multi / "checkpoints").iterdir()
                  if d.name.isdigit()) == [s]

    # The rerun resumes and finishes.
    logs2 = tmp_path / "logs2"
    for rc, _, err in _finish(_two_processes(multi, multi_arg, logs2), logs2):
        assert rc == 0, err[-3000:]
    done = json.loads((multi / "results.json").read_text())
    assert not done["interrupted"] and done["steps"] == steps
    a = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "single" / "metrics.jsonl")}
    rows = read_metrics(multi / "metrics.jsonl")
    b = {r["step"]: r["loss"] for r in rows}
    assert sorted(a) == sorted(b) == list(range(steps)) and len(rows) == steps
    np.testing.assert_allclose([b[t] for t in a], [a[t] for t in a], rtol=1e-5)
    single_done = json.loads((tmp_path / "single" / "results.json").read_text())
    np.testing.assert_allclose(done["final_eval_loss"], single_done["final_eval_loss"],
                               rtol=1e-5)


def test_processes_that_disagree_on_the_config_are_refused_in_every_process(tmp_path):
    """Process 1 with another seed: both processes refuse, before any data is read, instead
    of one resume check failing alone (or the run training two different things)."""
    arg = "smoke,train.batch_size=8,train.eval_batch_size=8"
    logs = tmp_path / "logs"
    results = _finish(_two_processes(tmp_path / "run", arg, logs, args=("", ",seed=1")), logs)
    for rc, out, err in results:
        assert rc != 0 and "the 2 processes disagree on the run config: process(es) [1]" in (
            out + err), err[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_failure_in_one_process_stops_both_at_once_naming_it(tmp_path):
    """Process 1 alone cannot load the data (its cache directory is not a directory): both
    exit 1 within seconds, process 0 naming process 1 and its error, instead of process 0
    waiting in the next collective until jax.distributed's heartbeat gives up."""
    arg = "smoke,train.batch_size=8,train.eval_batch_size=8"
    logs = tmp_path / "logs"
    t0 = time.time()
    procs = _two_processes(tmp_path / "run", arg, logs,
                           envs=({}, {"UMUP_JAX_CACHE": "/etc/passwd/cache"}))
    (rc0, out0, err0), (rc1, out1, err1) = _finish(procs, logs, timeout=150)
    assert (rc0, rc1) == (1, 1), err0[-2000:] + err1[-2000:]
    assert time.time() - t0 < 120
    assert ("error: process(es) [1] failed loading the data and building "
            "the model: process 1: NotADirectoryError: [Errno 20] Not a directory: "
            "'/etc/passwd/cache'") in err0
    assert "error: NotADirectoryError: [Errno 20] Not a directory" in err1


@pytest.mark.parametrize("failing", [1, 0])
def test_a_failure_inside_the_training_loop_stops_the_other_process_within_seconds(
        tmp_path, failing):
    """One process's input pipeline fails at step 3 while the other waits in the step's
    all-reduce: that one stops within seconds (its failure watch reads the announcement),
    naming the failed process and its error, both exit 1.  Before, the waiting process
    hung until jax.distributed's timeouts, over 6 minutes in a run stopped by hand."""
    arg = "smoke,train.steps=8,train.batch_size=8,train.eval_batch_size=8"
    logs = tmp_path / "logs"
    mains = [None, None]
    mains[failing] = ROOT / "tests" / "failing_main.py"
    t0 = time.time()
    procs = _two_processes(tmp_path / "run", arg, logs, mains=tuple(mains))
    results = _finish(procs, logs, timeout=150)
    elapsed = time.time() - t0
    assert [rc for rc, _, _ in results] == [1, 1], [err[-2000:] for _, _, err in results]
    assert elapsed < 90
    other = 1 - failing
    error = "OSError: [Errno 5] Input/output error: '/data/train/shard-00003.bin'"
    assert f"error: {error} (traceback in" in results[failing][2]
    assert (f"error: process {failing} failed: {error}; process {other} stops too "
            f"(process {failing}'s traceback is in error.log)") in results[other][2]
    log = (tmp_path / "run" / "error.log").read_text()
    assert f"process {failing} of 2" in log and f"process {other} of 2" in log


def test_a_process_killed_outright_leaves_the_other_one_line_and_status_1(tmp_path):
    """Process 1 SIGKILLed mid-training announces nothing; process 0's next all-reduce fails
    at once (gloo: the connection closed).  It says so in one line and exits 1 after at most
    UMUP_JAX_SHUTDOWN_WAIT_S (here 3 s) in jax.distributed's shutdown.  Before, its atexit
    shutdown waited for the dead process until the heartbeat timeout (92 s measured) and then
    aborted it: status 134 under a page of C++ stack."""
    arg = ("smoke,train.steps=100000,train.batch_size=8,train.eval_batch_size=8,"
           "train.eval_every=1000000,train.checkpoint_every=1000000,train.log_every=1")
    run, logs = tmp_path / "run", tmp_path / "logs"
    env = {"UMUP_JAX_SHUTDOWN_WAIT_S": "3"}
    procs = _two_processes(run, arg, logs, envs=(env, env))
    deadline = time.time() + 240
    while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text():
        assert all(p.poll() is None for p in procs) and time.time() < deadline
        time.sleep(0.05)
    procs[1].kill()
    t0 = time.time()
    (rc0, _, err0), (rc1, _, _) = _finish(procs, logs, timeout=120)
    elapsed = time.time() - t0
    assert rc1 == -signal.SIGKILL and rc0 == 1, err0[-3000:]
    assert elapsed < 30, elapsed  # the wait of 3 s, plus the step in flight
    lines = [l for l in err0.splitlines() if not l.startswith("[Gloo]")]
    assert len(lines) == 1 and lines[0].startswith("python -m umup_jax.main: error: "), lines
    assert not (run / "results.json").exists()


@pytest.mark.slow  # the default suite's time: see BUILD.md's slow tests
def test_two_processes_skip_a_damaged_checkpoint_together(tmp_path):
    """The newest checkpoint damaged: process 0 finds it (manifest), both processes move it
    aside once and resume from the one before, and the run finishes with the losses of an
    undamaged one."""
    arg = ("smoke,train.steps=4,train.batch_size=8,train.eval_batch_size=8,"
           "train.checkpoint_every=2,train.eval_every=1000,optimizer.schedule=constant")
    run = tmp_path / "run"
    # A persistent compilation cache of their own: process 0 would read, in the second run,
    # the programs it wrote in the first, while process 1 compiles its own (on jax 0.12.1
    # the two then wait for each other in the first step for good).  The run turns it off.
    cache = tmp_path / "xla-cache"
    envs = ({"JAX_COMPILATION_CACHE_DIR": str(cache),
             "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"},) * 2
    for rc, out, err in _finish(_two_processes(run, arg, tmp_path / "l1", envs=envs),
                                tmp_path / "l1"):
        assert rc == 0, err[-3000:]
    assert f"note: the persistent compilation cache ({cache}) is off for this run" in (
        (tmp_path / "l1" / "0.out").read_text())
    assert not cache.exists() or not any(cache.iterdir())
    first = {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl")}
    for f in (run / "checkpoints" / "4" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(f.read_bytes()[:1])
    logs = tmp_path / "l2"
    (rc0, out0, err0), (rc1, _, err1) = _finish(
        _two_processes(run, arg.replace("steps=4", "steps=6"), logs, envs=envs), logs)
    assert (rc0, rc1) == (0, 0), err0[-3000:] + err1[-3000:]
    assert "checkpoint step 4 is damaged" in out0 and "resumed from checkpoint step 2" in out0
    assert [p.name.split("-")[0] for p in (run / "checkpoints" / "corrupt").iterdir()] == ["4"]
    rows = [r for r in read_metrics(run / "metrics.jsonl")]
    again = {r["step"]: r["loss"] for r in rows if r["step"] in (2, 3)}
    np.testing.assert_allclose([again[2], again[3]], [first[2], first[3]], rtol=1e-6)
    assert json.loads((run / "results.json").read_text())["steps"] == 6


@pytest.mark.parametrize("count,platform,needs", [
    (2, "cpu", True), (8, "cpu", True), (1, "cpu", False), (2, "gpu", False),
    (2, "tpu", False)])
def test_only_several_cpu_processes_need_identical_programs(count, platform, needs):
    assert sharding_lib.processes_need_identical_programs(count, platform) is needs


@pytest.fixture
def jax_settings():
    """Restores the jax settings that keep_processes_on_one_executable changes."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    names = ("jax_include_full_tracebacks_in_locations", "jax_enable_compilation_cache",
             "jax_compilation_cache_dir")
    before = {n: getattr(jax.config, n) for n in names}
    yield jax
    for n, v in before.items():
        jax.config.update(n, v)
    cc.reset_cache()


def _lowered_with_locations(jax, wrap: bool) -> str:
    """The lowered HLO, locations included, of one program traced from one of two call
    stacks (a fresh function each time, so that nothing comes from JAX's trace cache)."""
    def f(x):
        return jax.numpy.tanh(x) * 2.0

    def lower():
        return jax.jit(f).lower(jax.numpy.ones(3)).as_text(debug_info=True)

    def through_another_frame():
        return lower()

    return through_another_frame() if wrap else lower()


def test_one_process_keeps_its_settings(jax_settings, tmp_path):
    """With one process the cache stays on and full tracebacks stay in the programs."""
    jax = jax_settings
    jax.config.update("jax_compilation_cache_dir", str(tmp_path))
    jax.config.update("jax_include_full_tracebacks_in_locations", True)
    assert sharding_lib.keep_processes_on_one_executable() is None
    assert jax.config.jax_enable_compilation_cache
    assert jax.config.jax_include_full_tracebacks_in_locations


def test_several_cpu_processes_get_programs_that_do_not_depend_on_how_they_started(
        jax_settings, tmp_path, monkeypatch):
    """As a process of two on the CPU: the cache is off (with a note naming it), and a program
    traced through an extra Python frame lowers to the same text, locations included (on jax
    0.12.1 any difference between the processes' programs hangs their first collective)."""
    jax = jax_settings
    jax.config.update("jax_compilation_cache_dir", str(tmp_path))
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_include_full_tracebacks_in_locations", True)
    assert _lowered_with_locations(jax, False) != _lowered_with_locations(jax, True)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    note = sharding_lib.keep_processes_on_one_executable()
    assert note.startswith(f"the persistent compilation cache ({tmp_path}) is off for this "
                           "run: with 2 processes on the CPU"), note
    assert not jax.config.jax_enable_compilation_cache
    assert _lowered_with_locations(jax, False) == _lowered_with_locations(jax, True)
    assert "tanh" in _lowered_with_locations(jax, False)


def test_several_cpu_processes_without_a_cache_get_no_note(jax_settings, monkeypatch):
    """The cache already off: nothing to say, but the programs still lose their call stacks."""
    jax = jax_settings
    jax.config.update("jax_enable_compilation_cache", False)
    jax.config.update("jax_include_full_tracebacks_in_locations", True)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    assert sharding_lib.keep_processes_on_one_executable() is None
    assert not jax.config.jax_include_full_tracebacks_in_locations


class _Device:
    def __init__(self, process_index):
        self.process_index = process_index


def test_a_mesh_whose_processes_share_batch_rows_is_refused():
    """The batch rows of each process's devices must be its own B/P rows: with the tensor axis
    across two processes both would hold all 4 rows (refused); data across them is fine."""
    a, b, c, d = _Device(0), _Device(0), _Device(1), _Device(1)
    split = {a: (slice(0, 2),), b: (slice(0, 2),), c: (slice(2, 4),), d: (slice(2, 4),)}
    sharding_lib.check_batch_split(split, 4)
    shared = {a: (slice(0, 2),), b: (slice(2, 4),), c: (slice(0, 2),), d: (slice(2, 4),)}
    with pytest.raises(ValueError, match=r"train.batch_size=4 cannot be split over the 2 "
                                         r"processes on this mesh: process 0 holds 4 batch rows, where each"):
        sharding_lib.check_batch_split(shared, 4)
    sharding_lib.check_batch_split({a: (slice(None),), b: (slice(None),)}, 4)  # one process
