"""Sweeps: spec expansion and validation, batched vs separate runs, resume, divergence,
independent and random search, the CLI."""

import csv
import json
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from umup_jax import config as config_lib
from umup_jax import sweep as sweep_lib
from umup_jax import train as train_lib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def base(arg="smoke,train.steps=3"):
    return config_lib.proxy_config("umup", arg)


def rows_of(workdir):
    with open(pathlib.Path(workdir) / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_grid_expansion_and_stable_ids():
    spec = {"name": "g", "kind": "grid", "base": {"train.steps": 2},
            "grid": {"model.width": [32, 64], "optimizer.learning_rate": [0.5, 1.0, 2.0]},
            "seeds": [0, 1]}
    runs = sweep_lib.grid_runs(spec, base())
    assert len(runs) == 12
    ids = {sweep_lib.run_id(ov) for _, ov in runs}
    assert len(ids) == 12
    assert runs[0][1] == {"train.steps": 2, "model.width": 32,
                          "optimizer.learning_rate": 0.5, "seed": 0}
    assert sweep_lib.run_id(dict(reversed(list(runs[0][1].items())))) == \
        sweep_lib.run_id(runs[0][1])
    assert sweep_lib.count_runs(spec, base()) == 12


@pytest.mark.parametrize("spec, match", [
    ({"grid": {"model.widht": [32]}}, "config key 'model.widht' is unknown"),
    ({"grid": {}}, "the grid is empty"),
    ({"grid": {"model.width": []}}, "the grid is empty"),
    ({"kind": "bayes", "grid": {"model.width": [32]}}, "kind='bayes' is invalid"),
    ({"kind": "independent", "lr": {"values": []}}, "needs lr.values"),
    ({"kind": "random", "space": {"optimizer.learning_rate": {"uniform": [0, 1]}},
      "num_runs": 2}, "use log2_uniform or choice"),
    ({"grid": {"model.hparams.init_std": [0.1]}}, "hparams of 'umup'"),
    # A value of the wrong type for its key: refused before any run, not raised by each run.
    ({"grid": {"model.width": ["abc"]}},
     r"^sweep grid: config key 'model.width' expects an integer \(it is 32\), got 'abc'$"),
    ({"grid": {"model.width+model.num_heads": [[64, "2"]]}},
     r"config key 'model.num_heads' expects an integer \(it is 1\), got '2'"),
    ({"kind": "random", "space": {"model.depth": {"log2_uniform": [0, 2]}}, "num_runs": 2},
     r"sweep space: config key 'model.depth' expects an integer \(it is 1\), got 1.0"),
    ({"grid": {"model.width": [32]}, "seeds": [0.5]},
     r"sweep seeds: config key 'seed' expects an integer \(it is 0\), got 0.5"),
])
def test_bad_sweeps_raise_before_running(tmp_path, spec, match):
    spec = {"name": "bad", **spec}
    with pytest.raises(ValueError, match=match):
        sweep_lib.run_sweep(base(), spec, str(tmp_path), progress=False)
    assert not (tmp_path / "runs").exists()


def test_batched_runs_equal_separate_runs(tmp_path):
    cfg = base("smoke,train.steps=20")
    lrs = [0.25, 1.0, 4.0]
    batched = sweep_lib.run_batched(cfg, lrs, [cfg.optimizer.weight_decay] * 3)
    for lr, b in zip(lrs, batched):
        c = sweep_lib.run_config(cfg, {"optimizer.learning_rate": lr})
        single = train_lib.train_and_evaluate(c, str(tmp_path / f"lr{lr}"))
        for key in ("final_train_loss", "final_eval_loss"):
            assert b[key] == pytest.approx(single[key], rel=1e-5), (lr, key)
    assert len({round(b["final_train_loss"], 4) for b in batched}) == 3  # LRs matter


def test_sweep_resume_runs_only_what_is_missing(tmp_path, monkeypatch):
    spec = {"name": "resume", "grid": {"model.width": [16, 32, 48]}}
    calls = []
    real = sweep_lib.run_single

    def flaky(cfg, workdir):
        calls.append(cfg.model.width)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the sweep is killed during its second run
        return real(cfg, workdir)

    monkeypatch.setattr(sweep_lib, "run_single", flaky)
    with pytest.raises(KeyboardInterrupt):
        sweep_lib.run_sweep(base(), spec, str(tmp_path), progress=False)
    assert [r["width"] for r in rows_of(tmp_path)] == ["16"]
    calls.clear()
    monkeypatch.setattr(sweep_lib, "run_single", real)
    monkeypatch.setattr(sweep_lib, "run_single", lambda c, w: calls.append(c.model.width)
                        or real(c, w))
    rows = sweep_lib.run_sweep(base(), spec, str(tmp_path), progress=False)
    assert calls == [32, 48] and len(rows) == 3
    assert sorted(r["width"] for r in rows_of(tmp_path)) == ["16", "32", "48"]


def test_a_run_stopped_by_a_signal_stops_the_sweep_and_is_not_recorded(tmp_path, monkeypatch):
    """train_and_evaluate returns normally after SIGINT/SIGTERM (it checkpointed), with
    ``interrupted``: that is no result, so the sweep stops there and records no row for it,
    and a rerun trains it (from its checkpoint) instead of skipping it as finished."""
    spec = {"name": "signal", "grid": {"model.width": [16, 32]}}
    real = train_lib.train_and_evaluate

    def stopped_at_width_32(cfg, workdir):
        results = real(cfg, workdir)
        if cfg.model.width == 32:
            results.update(interrupted=True, signal=2)
        return results

    monkeypatch.setattr(train_lib, "train_and_evaluate", stopped_at_width_32)
    with pytest.raises(KeyboardInterrupt, match="stopped by signal 2 at step 3 of 3"):
        sweep_lib.run_sweep(base(), spec, str(tmp_path), batched=False, progress=False)
    assert [r["width"] for r in rows_of(tmp_path)] == ["16"]
    monkeypatch.setattr(train_lib, "train_and_evaluate", real)
    rows = sweep_lib.run_sweep(base(), spec, str(tmp_path), batched=False, progress=False)
    assert sorted(r["width"] for r in rows_of(tmp_path)) == ["16", "32"] and len(rows) == 2


def test_results_of_a_different_sweep_are_refused(tmp_path):
    sweep_lib.run_sweep(base(), {"name": "a", "grid": {"model.width": [16]}}, str(tmp_path),
                        progress=False)
    with pytest.raises(ValueError, match="holds results of a different sweep"):
        sweep_lib.run_sweep(base(), {"name": "b", "grid": {"model.width": [16]}},
                            str(tmp_path), progress=False)


def test_results_written_before_a_new_hp_column_resume(tmp_path):
    """A results.csv from before a rule gained an HP (SP's emb_lr_scaling) is rewritten with
    the new columns, its runs kept; a file with foreign columns is still refused."""
    spec = {"name": "old", "grid": {"model.width": [16]}}
    sweep_lib.run_sweep(base(), spec, str(tmp_path), progress=False)
    old_rows = rows_of(tmp_path)
    old_columns = [c for c in sweep_lib.COLUMNS if c != "hp.emb_lr_scaling"]
    with open(tmp_path / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=old_columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(old_rows)
    rows = sweep_lib.run_sweep(base(), spec, str(tmp_path), progress=False)  # nothing reruns
    assert [r["run_id"] for r in rows] == [old_rows[0]["run_id"]]
    assert list(rows_of(tmp_path)[0]) == sweep_lib.COLUMNS
    assert rows_of(tmp_path)[0]["final_eval_loss"] == old_rows[0]["final_eval_loss"]
    with open(tmp_path / "results.csv", "w", newline="") as f:
        csv.writer(f).writerow(["run_id", "something_else"])
    with pytest.raises(ValueError, match="has other columns than this version writes"):
        sweep_lib.run_sweep(base(), spec, str(tmp_path), progress=False)


def test_diverged_runs_are_recorded_and_the_sweep_goes_on(tmp_path):
    spec = {"name": "div", "grid": {"optimizer.learning_rate": [1e30, 1.0]},
            "base": {"optimizer.warmup_steps": 0}}
    rows = {float(r["lr"]): r for r in sweep_lib.run_sweep(
        base(), spec, str(tmp_path), batched=False, progress=False)}
    assert rows[1e30]["diverged"] in (1, "1") and math.isnan(float(rows[1e30]["final_eval_loss"]))
    assert rows[1.0]["diverged"] in (0, "0") and math.isfinite(float(rows[1.0]["final_eval_loss"]))
    # The diverged run records the tokens it diverged on, so a rerun can compare them too.
    assert rows[1e30]["data_fingerprint"] == rows[1.0]["data_fingerprint"] != ""
    # The batched runner records the same divergence.
    b = sweep_lib.run_batched(sweep_lib.run_config(base(), spec["base"]), [1e30, 1.0],
                              [0.0, 0.0])
    assert not math.isfinite(b[0]["final_eval_loss"]) and math.isfinite(b[1]["final_eval_loss"])


def test_a_run_whose_config_cannot_be_built_is_recorded_and_the_sweep_goes_on(tmp_path):
    """``validate`` refuses a mistyped value before any run, but the runner records whatever a
    unit raises: here the run's own config is what raises (in the unit, and again if the
    driver rebuilt it to fill the row), and the failure is still one row, not an abort."""
    spec = {"name": "bad", "kind": "grid", "grid": {"model.width": ["abc", 32]}}
    runs = [("grid", {"model.width": w, "seed": 0}) for w in ("abc", 32)]
    runner = sweep_lib.Runner(spec, base(), tmp_path, progress=False)  # validate bypassed
    try:
        bad, good = runner.run(runs)
    finally:
        runner.close()
    assert bad["run_id"] == sweep_lib.run_id(runs[0][1])
    assert json.loads(bad["overrides"]) == runs[0][1] and bad["diverged"] == ""
    assert bad["error"] == ("config key 'model.width' expects an integer (it is 32), "
                            "got 'abc'")
    assert good["error"] == "" and math.isfinite(good["final_eval_loss"])
    on_disk = {r["run_id"]: r for r in rows_of(tmp_path)}
    assert on_disk[bad["run_id"]]["error"] == bad["error"] and "\n" not in bad["error"]
    assert on_disk[good["run_id"]]["diverged"] == "0"
    assert "Traceback" in (tmp_path / "error.log").read_text()  # the details, off the console


def test_missing_ray_gives_a_clear_message(monkeypatch):
    """Runs without the ray extra (the Ray tests are skipped there): import ray fails."""
    from umup_jax import sweep_backends as backends

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray → ImportError
    with pytest.raises(backends.BackendError, match=r"pip install -e '\.\[ray\]'"):
        backends.make_backend("ray")


def test_independent_search_stages(tmp_path):
    spec = {"name": "ind", "kind": "independent",
            "lr": {"values": [0.5, 2.0]},
            "hps": {"model.hparams.attn_mult": [0.5, 2.0]}}
    rows = sweep_lib.run_sweep(base(), spec, str(tmp_path), progress=False)
    groups = [r["group"] for r in rows_of(tmp_path)]
    assert groups.count("lr") == 2 and groups.count("hp:model.hparams.attn_mult") == 2
    # Stage 3 may coincide with a run already made (then it is not run twice).
    assert groups.count("combined") <= 1
    assert len(rows) in (4, 5) and sweep_lib.count_runs(spec, base()) == 5
    chosen = json.loads((tmp_path / "chosen.json").read_text())
    assert set(chosen) == {"optimizer.learning_rate", "model.hparams.attn_mult"}
    lr_rows = [r for r in rows_of(tmp_path) if r["group"] == "lr"]
    best = min(lr_rows, key=lambda r: float(r["final_eval_loss"]))
    assert chosen["optimizer.learning_rate"] == float(best["lr"])
    # The default α = 1 competes too: stage 1 measured it at the best LR.
    cands = {float(r["hp.attn_mult"]): float(r["final_eval_loss"]) for r in rows_of(tmp_path)
             if r["group"] == "hp:model.hparams.attn_mult"}
    cands[1.0] = float(best["final_eval_loss"])
    assert chosen["model.hparams.attn_mult"] == min(cands, key=cands.get)
    combined = {"optimizer.learning_rate": chosen["optimizer.learning_rate"],
                "model.hparams.attn_mult": chosen["model.hparams.attn_mult"], "seed": 0}
    same = [r for r in rows_of(tmp_path)
            if float(r["lr"]) == combined["optimizer.learning_rate"]
            and float(r["hp.attn_mult"]) == combined["model.hparams.attn_mult"]]
    assert same, "the combined configuration was never trained"
    assert (tmp_path / "results.csv").read_text().count(sweep_lib.run_id(combined)) <= 1


def test_random_search_samples_log2_uniform():
    spec = {"name": "rnd", "kind": "random", "num_runs": 50, "seed": 3,
            "space": {"optimizer.learning_rate": {"log2_uniform": [-10, -6]},
                      "model.hparams.init_std": {"log2_uniform": [-2, 2], "scale": 0.02},
                      "model.depth": {"choice": [1, 2]}}}
    runs = sweep_lib.random_runs(spec, config_lib.proxy_config("mup", "smoke"))
    lrs = np.log2([ov["optimizer.learning_rate"] for _, ov in runs])
    assert len(runs) == 50 and lrs.min() >= -10 and lrs.max() <= -6 and np.ptp(lrs) > 2
    stds = [ov["model.hparams.init_std"] for _, ov in runs]
    assert min(stds) >= 0.005 and max(stds) <= 0.08
    assert runs == sweep_lib.random_runs(spec, config_lib.proxy_config("mup", "smoke"))


def sweep_cli(tmp_path, spec, *extra):
    sweep_file = tmp_path / "s.json"
    sweep_file.write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "umup_jax.sweep",
           f"--config={ROOT / 'configs' / 'umup_proxy.py'}:smoke", "--config.train.steps=2",
           *extra, f"--sweep={sweep_file}", f"--workdir={tmp_path / 'w'}", "--noprogress"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_cli_runs_a_sweep_file(tmp_path):
    """A diverged run is a result, not a failure: the command still exits 0."""
    proc = sweep_cli(tmp_path, {"name": "cli", "grid": {"optimizer.learning_rate": [1e30, 1.0]}},
                     "--config.optimizer.warmup_steps=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = rows_of(tmp_path / "w")
    assert len(rows) == 2 and list(rows[0]) == sweep_lib.COLUMNS
    assert {r["steps"] for r in rows} == {"2"}  # the --config.train.steps override
    assert sorted(r["diverged"] for r in rows) == ["0", "1"]
    assert "2 runs in" in proc.stdout and "error" not in proc.stderr
    assert (tmp_path / "w" / "run.log").exists()  # library logging, off the console


def test_cli_failed_runs_end_with_one_line_and_status_1(tmp_path):
    """num_heads=3 does not divide width 32: that run raises, the other finishes, and the
    command ends with one line counting the failure, pointing at the error column."""
    proc = sweep_cli(tmp_path, {"name": "f", "grid": {"model.num_heads": [1, 3]}})
    assert proc.returncode == 1, proc.stderr[-3000:]
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    workdir = tmp_path / "w"
    assert err == [f"python -m umup_jax.sweep: error: 1 of 2 runs failed; their errors are in "
                   f"the error column of {workdir / 'results.csv'} (tracebacks in "
                   f"{workdir / 'error.log'}); fix them and rerun the same command, which runs "
                   "only the failed and missing runs"], proc.stderr[-3000:]
    (failed,) = [line for line in proc.stdout.splitlines() if "failed:" in line]
    assert "width=32 is invalid: it must be divisible by num_heads=3" in failed
    rows = {json.loads(r["overrides"])["model.num_heads"]: r for r in rows_of(workdir)}
    assert rows[1]["error"] == "" and rows[1]["diverged"] == "0"
    assert rows[3]["error"] == "width=32 is invalid: it must be divisible by num_heads=3"
    assert "Traceback" in (workdir / "error.log").read_text()
    assert (workdir / "run.log").exists()


def test_rerun_after_the_data_files_changed_is_refused(tmp_path):
    """Finished rows record their tokens' fingerprint; a rerun over edited files is refused
    before anything runs, instead of mixing two corpora in one sweep."""
    (tmp_path / "train.txt").write_text("the quick brown fox jumps over the lazy dog. " * 300)
    (tmp_path / "valid.txt").write_text("over the lazy fox the dog jumps quickly. " * 40)
    cfg = base(f"smoke,train.steps=3,data.source=text,data.cache_dir={tmp_path / 'cache'}")
    cfg.data.train_files = [str(tmp_path / "train.txt")]
    cfg.data.valid_files = [str(tmp_path / "valid.txt")]
    tokens = sweep_lib.data_lib.load_tokens(cfg.data, cache_dir=cfg.data.cache_dir)
    singles = {"name": "singles", "grid": {"model.width": [16, 32]}}
    batched = {"name": "batched", "grid": {"optimizer.learning_rate": [1.0, 0.5]}}
    for spec in (singles, batched):  # one run at a time (results.json), and vmapped
        sweep_lib.run_sweep(cfg, spec, str(tmp_path / spec["name"]), progress=False)
        assert [r["data_fingerprint"] for r in rows_of(tmp_path / spec["name"])] == \
            [tokens.fingerprint] * 2
    # Unchanged data: the rerun reuses every row.
    again = sweep_lib.run_sweep(cfg, singles, str(tmp_path / "singles"), progress=False)
    assert [r["data_fingerprint"] for r in again] == [tokens.fingerprint] * 2
    (tmp_path / "train.txt").write_text("Of Man's first disobedience, and the fruit. " * 300)
    for spec in (singles, batched):
        before = (tmp_path / spec["name"] / "results.csv").read_bytes()
        with pytest.raises(sweep_lib.SweepError,
                           match=rf"holds 2 finished run\(s\) trained on other tokens .*"
                                 rf"{tokens.fingerprint} in .* the data files changed"):
            sweep_lib.run_sweep(cfg, spec, str(tmp_path / spec["name"]), progress=False)
        assert (tmp_path / spec["name"] / "results.csv").read_bytes() == before
