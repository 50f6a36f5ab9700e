"""The training system: main end to end, exact resume after kill -9, SIGTERM, NaN stop, bad
configs failing before compilation, corrupted checkpoints, 1 vs 4 devices."""

import hashlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import xla_flags
from umup_jax import config as config_lib
from umup_jax import data as data_lib
from umup_jax import train as train_lib
from umup_jax.checkpoint import NoUsableCheckpointError
from umup_jax.metrics import read_metrics

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "umup_proxy.py"


def main_cmd(workdir, arg):
    return [sys.executable, "-m", "umup_jax.main", f"--config={CONFIG}:{arg}",
            f"--workdir={workdir}"]


def run_main(workdir, arg, env=None, timeout=300):
    env = {**os.environ, **(env or {})}
    proc = subprocess.run(main_cmd(workdir, arg), cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(pathlib.Path(workdir) / "metrics.jsonl")}


def smoke(**overrides):
    cfg = config_lib.proxy_config("umup", "smoke")
    for key, value in overrides.items():
        config_lib.set_key(cfg, key.replace("__", "."), value)
    return cfg


def test_main_smoke_end_to_end(tmp_path):
    proc = run_main(tmp_path, "smoke")
    assert "done: step 6" in proc.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["steps"] == 6 and results["tokens_seen"] == 6 * 4 * 32
    assert np.isfinite(results["final_train_loss"]) and np.isfinite(results["final_eval_loss"])
    assert results["config"]["model"]["width"] == 32 and not results["interrupted"]
    kinds = [json.loads(line)["kind"] for line in (tmp_path / "metrics.jsonl").open()]
    assert kinds.count("train") == 6 and kinds.count("eval") == 3 and kinds.count("stats") == 2
    stats = next(json.loads(l) for l in (tmp_path / "metrics.jsonl").open() if '"stats"' in l)
    for prefix in ("params/", "grads/", "updates/", "activations/"):
        assert any(k.startswith(prefix) for k in stats), prefix
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["3", "6"]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    # Rerunning a finished run trains nothing more and leaves its results as they were.
    before = (tmp_path / "results.json").read_bytes()
    again = run_main(tmp_path, "smoke")
    assert "is finished (step 6 of 6)" in again.stdout
    assert (tmp_path / "results.json").read_bytes() == before


def test_config_flag_overrides(tmp_path):
    proc = subprocess.run(
        main_cmd(tmp_path, "smoke") + ["--config.train.steps=2", "--config.model.width=16"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["steps"] == 2 and results["config"]["model"]["width"] == 16


KILL_ARG = ("smoke,train.steps=60,train.checkpoint_every=10,model.width=64,model.seq_len=64,"
            "train.batch_size=8")


def test_kill9_resume_is_bit_exact(tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    run_main(reference, KILL_ARG)
    proc = subprocess.Popen(main_cmd(killed, KILL_ARG), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (killed / "checkpoints" / "10").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before checkpoint 10"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "results.json").exists(), "the kill landed after the run finished"
    run_main(killed, KILL_ARG)
    ref, res = losses(reference), losses(killed)
    assert sorted(ref) == sorted(res) == list(range(60))
    assert [res[s] for s in range(60)] == [ref[s] for s in range(60)]  # bit for bit
    # The rows the killed attempt logged after its last checkpoint are superseded by the
    # resumed run's (metrics.py): evaluations (every 3 steps) and statistics read as the
    # uninterrupted run's, none twice.
    rows = [json.loads(l) for l in (killed / "metrics.jsonl").read_text().splitlines()
            if l.endswith("}")]
    resumed = [r["step"] for r in rows if r["kind"] == "resume"]
    assert len(resumed) == 1 and resumed[0] % 10 == 0 and resumed[0] >= 10
    for kind in ("eval", "stats"):
        got = read_metrics(killed / "metrics.jsonl", kind)
        assert got == read_metrics(reference / "metrics.jsonl", kind) and got, kind


def test_sigterm_saves_a_checkpoint_and_exits_143(tmp_path):
    arg = KILL_ARG.replace("train.steps=60", "train.steps=100000")
    proc = subprocess.Popen(main_cmd(tmp_path, arg), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (tmp_path / "checkpoints" / "10").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    # Not a finished run: 128 + SIGTERM, the status a scheduler restarts.
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["interrupted"] and 10 <= results["steps"] < 100000
    assert results["signal"] == signal.SIGTERM
    assert results["eval_step"] is not None and results["eval_step"] <= results["steps"]
    assert (tmp_path / "checkpoints" / str(results["steps"])).exists()
    assert f"saved checkpoint at step {results['steps']}" in out
    # The last line says the run was interrupted, and its eval loss names its step when it
    # is not the last step's.
    done = [line for line in out.splitlines() if line.startswith(("done: ", "interrupted: "))]
    assert len(done) == 1 and done[0].startswith(f"interrupted: step {results['steps']},"), (
        out[-2000:])
    assert done[0].endswith("; rerun the same command to resume")
    named = f") at step {results['eval_step']}, " in done[0]
    assert named == (results["eval_step"] != results["steps"]), done


def test_a_signal_at_the_last_step_leaves_a_finished_run(tmp_path, monkeypatch):
    """A signal (set here before the first step) stops a 3-step run after step 1 as
    interrupted; a 1-step run it stops after its last step is finished, not interrupted, so
    main exits 0 and a sweep records it (else every rerun would find it 'interrupted')."""

    class SignalledAtOnce(train_lib._StopFlag):
        def __init__(self):
            super().__init__()
            self.signal = signal.SIGTERM

    monkeypatch.setattr(train_lib, "_StopFlag", SignalledAtOnce)
    stopped = train_lib.train_and_evaluate(smoke(train__steps=3), str(tmp_path / "three"))
    assert stopped["interrupted"] and stopped["signal"] == signal.SIGTERM
    assert stopped["steps"] == 1 and stopped["eval_step"] == 0
    done = train_lib.train_and_evaluate(smoke(train__steps=1), str(tmp_path / "one"))
    assert not done["interrupted"] and done["signal"] is None and done["steps"] == 1
    assert done["eval_step"] == 1


def test_stop_votes_come_back_as_their_maximum_and_change_nothing_else():
    """The stop votes that ride with the batch (how several processes agree on the step to stop
    after) come back as their maximum, and the step's state and metrics are bit-identical to a
    step without them."""
    import jax

    run = train_lib.build_run(smoke())
    step = train_lib.make_train_step(run, with_stats=False)
    init = train_lib.make_init_fn(run)
    batch = next(iter(data_lib.train_dataset(run.tokens.train, 32, 4, 0)))
    votes = np.array([0, 0, signal.SIGTERM, signal.SIGINT], np.int32)
    assert np.array_equal(train_lib.stop_votes(None, 3), [0, 0, 0])
    assert np.array_equal(train_lib.stop_votes(signal.SIGINT, 2), [2, 2])
    plain, m_plain = step(init(jax.random.key(0)), train_lib.to_global(run, batch))
    voted, m_voted = step(init(jax.random.key(0)), train_lib.to_global(
        run, {**batch, train_lib.STOP_VOTES: votes}))
    assert int(m_voted["stop"]) == signal.SIGTERM and "stop" not in m_plain
    for a, b in zip(jax.tree.leaves((plain, m_plain)), jax.tree.leaves((voted, {
            k: v for k, v in m_voted.items() if k != "stop"}))):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_nan_loss_stops_naming_step_and_checkpoint(tmp_path):
    cfg = smoke(optimizer__learning_rate=1e30, optimizer__warmup_steps=0,
                train__checkpoint_every=1)
    with pytest.raises(train_lib.NonFiniteLossError) as info:
        train_lib.train_and_evaluate(cfg, str(tmp_path))
    msg = str(info.value)
    assert "non-finite loss" in msg and "at step 1" in msg
    assert "last good checkpoint is step 1" in msg
    assert not (tmp_path / "checkpoints" / "2").exists()  # nothing saved past the NaN


def test_nan_policy_ignore_runs_to_the_end(tmp_path):
    cfg = smoke(optimizer__learning_rate=1e30, optimizer__warmup_steps=0, train__steps=3,
                train__nan_policy="ignore")
    results = train_lib.train_and_evaluate(cfg, str(tmp_path))
    assert results["steps"] == 3 and not np.isfinite(results["final_train_loss"])


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(train__steps=0), "train.steps=0 is invalid"),
        (dict(train__batch_size=-4), "train.batch_size=-4 is invalid"),
        (dict(model__seq_len=10**7), "model.seq_len=10000000 is longer than the train data"),
        (dict(data__source="text", data__train_files=["/no/such/file.txt"]),
         "data.train_files: no file matches"),
        (dict(data__data_dir="/no/such/dir"), "data.data_dir"),
        (dict(model__width=30, model__num_heads=4), "width=30 is invalid"),
        (dict(model__parametrization="ntk"), "parametrization='ntk' is invalid"),
        (dict(optimizer__learning_rate=-1.0), "learning_rate=-1.0 is invalid"),
        (dict(train__nan_policy="retry"), "train.nan_policy='retry' is invalid"),
        (dict(optimizer__learning_rate=float("inf")), "learning_rate=inf is invalid"),
        (dict(seed=2**64), r"seed=18446744073709551616 is invalid: .*\[0, 2\*\*32\)"),
        (dict(data__shuffle_seed=-1), r"data.shuffle_seed=-1 is invalid"),
    ],
)
def test_bad_config_fails_before_compilation(tmp_path, monkeypatch, overrides, match):
    def no_compile(*a, **k):
        raise AssertionError("compilation started before the config was validated")

    monkeypatch.setattr(train_lib, "make_init_fn", no_compile)
    monkeypatch.setattr(train_lib, "make_train_step", no_compile)
    cfg = smoke()
    for key, value in overrides.items():
        config_lib.set_key(cfg, key.replace("__", "."), value)
    with pytest.raises(ValueError, match=match):
        train_lib.train_and_evaluate(cfg, str(tmp_path))


def test_batch_not_divisible_by_devices_fails_before_compilation():
    import jax

    cfg = smoke(train__batch_size=3)
    with pytest.raises(ValueError,
                       match=r"train.batch_size=3 is not divisible by data × fsdp = 2 × 1 = 2"):
        train_lib.build_run(cfg, devices=[jax.devices()[0]] * 2)


def test_unknown_config_key_is_rejected():
    with pytest.raises(ValueError, match="config key 'train.stepz' is unknown"):
        config_lib.proxy_config("umup", "smoke,train.stepz=3")
    with pytest.raises(ValueError, match="hparams of 'umup'"):
        config_lib.proxy_config("umup", "model.hparams.init_std=0.1")
    cfg = config_lib.proxy_config("umup", "smoke")
    cfg.train.extra = 1
    with pytest.raises(ValueError, match="config key 'train.extra' is unknown"):
        train_lib.check_config(cfg)


def _tree_digest(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def test_corrupted_latest_checkpoint_falls_back_to_previous(tmp_path, capsys):
    train_lib.train_and_evaluate(smoke(), str(tmp_path))  # checkpoints 3 and 6
    good = _tree_digest(tmp_path / "checkpoints" / "3")
    first_losses = losses(tmp_path)
    for f in (tmp_path / "checkpoints" / "6" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # truncate every file
    results = train_lib.train_and_evaluate(smoke(), str(tmp_path))
    out = capsys.readouterr().out
    assert "checkpoint step 6 is damaged" in out and "resumed from checkpoint step 3" in out
    assert "bytes," in out  # names the file whose size no longer matches its manifest
    assert results["steps"] == 6
    assert _tree_digest(tmp_path / "checkpoints" / "3") == good  # untouched
    assert len(list((tmp_path / "checkpoints" / "corrupt").iterdir())) == 1  # kept aside
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [
        "3", "6"]
    # The re-trained steps 3-5 equal the first run's (same data, same state), bit for bit.
    by_step: dict = {}
    for row in (json.loads(line) for line in (tmp_path / "metrics.jsonl").open()):
        if row["kind"] == "train":
            by_step.setdefault(row["step"], []).append(row["loss"])
    assert [len(by_step[s]) for s in range(6)] == [1, 1, 1, 2, 2, 2]
    assert [by_step[s][1] for s in (3, 4, 5)] == [first_losses[s] for s in (3, 4, 5)]


def test_no_readable_checkpoint_fails_clearly(tmp_path):
    train_lib.train_and_evaluate(smoke(), str(tmp_path))
    for f in (tmp_path / "checkpoints").rglob("_METADATA"):
        f.write_text("{not json")
    with pytest.raises(NoUsableCheckpointError, match=r"no checkpoint .* could be restored \(damaged: steps \[3, 6\]"):
        train_lib.train_and_evaluate(smoke(), str(tmp_path))


def test_one_device_and_four_devices_agree(tmp_path):
    arg = "smoke,train.steps=3"
    run_main(tmp_path / "one", arg)
    run_main(tmp_path / "four", arg,
             env={"XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=4")})
    four = json.loads((tmp_path / "four" / "results.json").read_text())
    assert four["devices"] == 4
    a, b = losses(tmp_path / "one"), losses(tmp_path / "four")
    assert sorted(a) == sorted(b) == [0, 1, 2]
    np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=1e-5)
