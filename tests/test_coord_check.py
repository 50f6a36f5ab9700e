"""The width coordinate check (spec §10.4): the CLI end to end, the CSV's shape, and the
direction of the result — u-μP's activations are flat in width, SP's drift.

Both runs go through the CLI (``:smoke``: depth 1, head dim 32, seq 32, batch 4, bytes) at
widths 32, 64, 128 with k = 2 steps, in two subprocesses at once (compilation dominates and is
single-threaded, so the two share the 2 cores), with XLA's CPU backend optimizations off,
which halves the compile time and leaves these numbers unchanged."""

import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from conftest import xla_flags
from umup_jax import config as config_lib
from umup_jax import coord_check as cc

ROOT = pathlib.Path(__file__).resolve().parent.parent
WIDTHS = (32, 64, 128)
STEPS = 2
ACTIVATIONS = {"embedding", "layer_0/attn_branch", "layer_0/ffn_norm", "layer_0/ffn_branch",
               "layer_0/output", "final_norm", "logits"}
PARAMS = {"embedding", "readout", "layer_0/attn_qkv", "layer_0/attn_out", "layer_0/ffn_up",
          "layer_0/ffn_gate", "layer_0/ffn_down"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{parametrization: (out dir, rows, stdout)} for u-μP and SP, run by the CLI."""
    procs = {}
    env = dict(os.environ)
    env["XLA_FLAGS"] = xla_flags("--xla_backend_optimization_level=0")
    for par in ("umup", "sp"):
        out = tmp_path_factory.mktemp(f"cc_{par}")
        cmd = [sys.executable, "-m", "umup_jax.coord_check",
               f"--config={ROOT / 'configs' / f'{par}_proxy.py'}:smoke",
               f"--widths={','.join(map(str, WIDTHS))}", f"--steps={STEPS}", f"--out={out}"]
        procs[par] = (out, subprocess.Popen(cmd, cwd=ROOT, env=env, text=True,
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    result = {}
    for par, (out, proc) in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
        result[par] = (out, cc.read_csv(out / "coord_check.csv"), stdout)
    return result


def per_tensor_ratio(rows, kind, step, name):
    """RMS at the largest width over RMS at the smallest."""
    by_w = {r["width"]: r["rms"] for r in rows
            if r["kind"] == kind and r["step"] == step and r["name"] == name}
    return by_w[max(WIDTHS)] / by_w[min(WIDTHS)]


def test_cli_writes_csv_png_and_summary(runs):
    for par, (out, rows, stdout) in runs.items():
        png = (out / "coord_check.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000, par
        header = (out / "coord_check.csv").read_text().splitlines()[0]
        assert header.split(",") == list(cc.CSV_FIELDS)
        assert f"{par}: flatness over widths [32, 64, 128]" in stdout
        for kind in cc.KINDS:
            assert f"  {kind}" in stdout


def test_csv_has_every_width_step_kind_tensor_once(runs):
    for par, (_, rows, _) in runs.items():
        names = {"activation": ACTIVATIONS, "gradient": PARAMS, "update": PARAMS}
        expected = {(w, s, k, n) for w in WIDTHS for s in range(STEPS + 1)
                    for k in cc.KINDS for n in names[k]}
        keys = [(r["width"], r["step"], r["kind"], r["name"]) for r in rows]
        assert len(keys) == len(set(keys)) == len(expected) == 3 * 3 * 3 * 7
        assert set(keys) == expected
        assert {r["parametrization"] for r in rows} == {par}
        assert all(math.isfinite(r["rms"]) and r["rms"] > 0 for r in rows)


def test_umup_is_flat_and_sp_drifts(runs):
    """Margins measured over seeds 0-2 (32 → 128): median activation spread at init u-μP
    1.00, SP 1.38-1.53; after 2 steps u-μP 1.10-1.18, SP 4.96-6.71.  Per tensor at init
    (RMS₁₂₈/RMS₃₂): u-μP attention/FFN branches 0.91-1.06, SP 3.6-4.1 (attention, ∝ width)
    and 8.2-8.9 (FFN, ∝ width^1.5)."""
    flat = {par: cc.flatness(rows) for par, (_, rows, _) in runs.items()}
    u0, s0 = flat["umup"][("activation", 0)]["ratio"], flat["sp"][("activation", 0)]["ratio"]
    uk, sk = (flat["umup"][("activation", STEPS)]["ratio"],
              flat["sp"][("activation", STEPS)]["ratio"])
    assert u0 < 1.1 and s0 > 1.25 and s0 > 1.2 * u0, (u0, s0)
    assert uk < 1.5 and sk > 3.0 and sk > 2.0 * uk, (uk, sk)

    umup, sp = runs["umup"][1], runs["sp"][1]
    for name in ("layer_0/attn_branch", "layer_0/ffn_branch"):
        u = per_tensor_ratio(umup, "activation", 0, name)
        s = per_tensor_ratio(sp, "activation", 0, name)
        assert 0.8 < u < 1.25, (name, u)
        assert s > 3.0, (name, s)
    # By design u-μP's logits start at RMS 1/√width (readout multiplier 1/fan_in): 0.5.
    assert 0.4 < per_tensor_ratio(umup, "activation", 0, "logits") < 0.6
    # u-μP gradients are unit-scaled at init: flat within 20%.
    assert flat["umup"][("gradient", 0)]["ratio"] < 1.2


def test_bad_arguments_fail_before_any_work():
    cfg = config_lib.proxy_config("umup", "smoke")  # head dim 32
    with pytest.raises(ValueError, match="multiple of the config's head size 32"):
        cc.coord_check(cfg, [32, 48], 1)
    with pytest.raises(ValueError, match="steps"):
        cc.coord_check(cfg, [32], -1)
    with pytest.raises(ValueError, match="widths is empty"):
        cc.coord_check(cfg, [], 1)


def test_flatness_and_layer_average_on_known_rows():
    rows = [{"parametrization": "x", "width": w, "step": 0, "kind": "activation",
             "name": f"layer_{i}/a", "rms": float(w) ** 0.5 * (i + 1)}
            for w in (64, 256) for i in range(2)]
    flat = cc.flatness(rows)[("activation", 0)]
    assert flat["ratio"] == pytest.approx(2.0) and flat["slope"] == pytest.approx(0.5)
    avg = cc.layer_averaged(rows)[("activation", 0)]["a"]
    assert avg[64] == pytest.approx(8 * np.sqrt(2))  # geometric mean of 8 and 16


def test_median_curve_and_after_training_curves_on_known_rows():
    """The flatness curve is the median over tensors (robust to one outlier tensor), not the
    mean; after training, ``layer_i/x`` rows merge by geometric mean over layers and
    ``'median (all)'`` is the median over every tensor, per axis value."""
    rows = [{"parametrization": "x", "width": w, "step": 0, "kind": "activation",
             "name": name, "rms": rms}
            for w in (64, 128) for name, rms in (("a", 1.0), ("b", 2.0), ("c", 30.0 * w))]
    assert cc.median_curve(rows, "activation", 0) == {64: 2.0, 128: 2.0}
    assert cc.flatness(rows)[("activation", 0)]["ratio"] == pytest.approx(1.0)
    after = [{"axis": "width", "width": 64, "depth": 2, "kind": "weight",
              "name": f"layer_{i}/w", "rms": rms} for i, rms in enumerate((2.0, 8.0, 32.0))]
    after.append({"axis": "depth", "width": 64, "depth": 4, "kind": "weight",
                  "name": "layer_0/w", "rms": 99.0})  # another axis: left out
    curves = cc.after_curves(after, "width", "weight")
    assert curves["w"] == {64: pytest.approx(8.0)}  # (2·8·32)^(1/3)
    assert curves["median (all)"] == {64: 8.0}


# --- after training (--after_training) ---------------------------------------------------------


def test_after_training_rows_csv_and_png(tmp_path):
    """One step at η = 10⁻⁶ leaves the stored weights at their init: RMS 1 under u-μP (unit
    init), σ_init = 0.02 under SP; every weight and activation of each width/depth point is
    recorded once, and the CSV round-trips."""
    expected_weights = {"umup": 1.0, "sp": 0.02}
    for par, target in expected_weights.items():
        cfg = config_lib.proxy_config(par, "smoke,train.steps=1,optimizer.learning_rate=1e-6,"
                                           "optimizer.warmup_steps=0")
        depths = [2] if par == "umup" else []
        rows = cc.after_training(cfg, widths=[64], depths=depths)
        points = {(r["axis"], r["width"], r["depth"]) for r in rows}
        assert points == {("width", 64, 1)} | {("depth", 32, d) for d in depths}
        for axis, depth in (("width", 1), ("depth", 2))[:1 + len(depths)]:
            names = {(r["kind"], r["name"]) for r in rows if r["axis"] == axis}
            layers = [f"layer_{i}/" for i in range(depth)]
            assert {n for k, n in names if k == "weight"} == {"embedding", "readout"} | {
                p + t for p in layers for t in ("attn_qkv", "attn_out", "ffn_up", "ffn_gate",
                                                "ffn_down")}
            assert {n for k, n in names if k == "activation"} == {
                "embedding", "final_norm", "logits"} | {
                p + t for p in layers for t in ("attn_branch", "ffn_norm", "ffn_branch",
                                                "output")}
        for r in rows:
            assert math.isfinite(r["rms"]) and r["rms"] > 0 and r["steps"] == 1
            if r["kind"] == "weight":
                # N(0, B²) samples of ≥ 1024 entries: RMS within 10% of B.
                assert r["rms"] == pytest.approx(target, rel=0.1), (par, r["name"])
        cc.write_after_csv(rows, tmp_path / f"{par}.csv")
        assert cc.read_after_csv(tmp_path / f"{par}.csv") == rows
        if par == "umup":
            png = cc.plot_after(rows, tmp_path / "after.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "weight     vs width [64]" in cc.after_summary(rows)


def test_after_training_trains_the_config_own_point_once(monkeypatch):
    """The config's own width and depth lie on both axes: one training, rows under each.
    (A stand-in for the training, whose measurements name the point and the call: the real
    one is the test above's.)"""
    calls = []

    def counted(config, tokens, mcfg, probe, seed):
        calls.append((mcfg.width, mcfg.depth))
        stats = {kind: {"embedding": float(mcfg.width + mcfg.depth / 10 + len(calls) / 100)}
                 for kind in cc.AFTER_KINDS}
        return stats, float(len(calls))

    monkeypatch.setattr(cc, "train_and_measure", counted)
    cfg = config_lib.proxy_config("umup", "smoke,train.steps=1,optimizer.warmup_steps=0")
    rows = cc.after_training(cfg, widths=[32, 64], depths=[1, 2])
    assert calls == [(32, 1), (64, 1), (32, 2)]
    own = {a: {(r["kind"], r["name"]): (r["rms"], r["final_train_loss"]) for r in rows
               if r["axis"] == a and (r["width"], r["depth"]) == (32, 1)}
           for a in ("width", "depth")}
    assert own["width"] == own["depth"] == {(k, "embedding"): (32.11, 1.0)
                                             for k in cc.AFTER_KINDS}
    assert {(r["axis"], r["width"], r["depth"], r["final_train_loss"]) for r in rows} == {
        ("width", 32, 1, 1.0), ("width", 64, 1, 2.0), ("depth", 32, 1, 1.0),
        ("depth", 32, 2, 3.0)}


def test_after_training_refuses_bad_widths_and_depths_before_any_work(tmp_path):
    cfg = config_lib.proxy_config("umup", "smoke")
    with pytest.raises(ValueError, match="depth=0 is invalid"):
        cc.after_training(cfg, [32], [0])
    with pytest.raises(ValueError, match="width=48 is invalid"):
        cc.after_training(cfg, [48], [1])
    cases = (("--depths=2,0", "depth=0 is invalid"), ("--widths=32,40", "width=40 is invalid"),
             ("--depths=a", "--depths=a: give comma-separated integers"))
    procs = [(match, subprocess.Popen(
        [sys.executable, "-m", "umup_jax.coord_check",
         f"--config={ROOT / 'configs' / 'umup_proxy.py'}:smoke", "--after_training", extra,
         f"--out={tmp_path / 'out'}"], cwd=ROOT, text=True, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)) for extra, match in cases]
    for match, proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2 and match in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_a_failure_while_running_is_one_line_with_the_traceback_in_out(tmp_path):
    """Past the argument checks (a missing training file is found only when data loads): one
    ``error:`` line naming the file, exit status 1, the traceback in OUT/error.log and
    library logging in OUT/run.log."""
    missing = tmp_path / "missing.txt"
    proc = subprocess.run(
        [sys.executable, "-m", "umup_jax.coord_check",
         f"--config={ROOT / 'configs' / 'umup_proxy.py'}:smoke,data.source=text,"
         f"data.train_files={missing},data.valid_files={tmp_path / 'valid.txt'}",
         "--widths=32", "--steps=0", f"--out={tmp_path / 'out'}"],
        cwd=ROOT, text=True, capture_output=True, timeout=120)
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert err == [f"python -m umup_jax.coord_check: error: data.train_files: no file matches "
                   f"'{missing}' (traceback in {tmp_path / 'out' / 'error.log'})"]
    assert "Traceback" in (tmp_path / "out" / "error.log").read_text()
    assert (tmp_path / "out" / "run.log").exists()
