"""experiments/transfer_axes.py: grids that bracket every optimum, the steps axis's schedule,
refusals of axis values the model cannot take, and the small mode end to end."""

import importlib.util
import json
import math
import pathlib
import sys

import numpy as np
import pytest

from umup_jax import analysis
from umup_jax import sweep as sweep_lib

ROOT = pathlib.Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("transfer_axes",
                                               ROOT / "experiments" / "transfer_axes.py")
T = sys.modules.setdefault("transfer_axes", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(T)

OUTPUTS = ("results.csv", "optima.csv", "transfer.json")


# --- grids that bracket every optimum ----------------------------------------------------------


def test_an_optimum_on_an_edge_adds_an_octave_on_that_side():
    curves = {1: {0: 3.0, 1: 2.0, 2: 1.0}, 2: {0: 1.0, 1: 2.0, 2: 3.0}, 4: {0: 2, 1: 1, 2: 2}}
    assert T.plan_extension(curves, step=2, bounds=(-10, 10)) == {1: {3, 4}, 2: {-2, -1}}
    # Diverged everywhere: go down.  Bounds are never crossed.
    inf = math.inf
    assert T.plan_extension({1: {0: inf, 1: math.nan}}, 2, (-10, 10)) == {1: {-2, -1}}
    assert T.plan_extension({1: {0: 1.0, 1: 2.0}}, 2, (-1, 10)) == {1: {-1}}
    assert T.plan_extension({1: {0: 1.0, 1: 2.0}}, 2, (0, 10)) == {}


def test_bracketed_optima_then_fill_the_reference_rows():
    # Every optimum is inside its grid; the largest value (8) lacks row 1's optimum (k=5), and
    # the global minimum is row 2's, which lacks row 8's optimum (k=1).
    curves = {1: {4: 2.0, 5: 1.5, 6: 2.0},
              2: {2: 1.3, 3: 1.0, 4: 1.2, 5: 1.4},
              8: {0: 1.4, 1: 1.1, 2: 1.2, 3: 1.3, 4: 1.5}}
    assert T.plan_extension(curves, step=2, bounds=(-10, 10)) == {8: {5}, 2: {1}}
    curves[8][5], curves[2][1] = 1.6, 1.5
    assert T.plan_extension(curves, step=2, bounds=(-10, 10)) == {}


class FakeRunner:
    """Runner stand-in: the loss of a run is a parabola in log2 η whose minimum moves with the
    axis value; records which runs were asked for (and skips finished ones, like the real one)."""

    def __init__(self, optimum_of):
        self.optimum_of = optimum_of
        self.config = T.rule_config("umup", T.FULL)
        self.store = type("S", (), {"rows": {}})()
        self.executed = []

    def run(self, runs):
        out = []
        for group, ov in runs:
            rid = sweep_lib.run_id(ov)
            if rid not in self.store.rows:
                self.executed.append(ov)
                x = math.log2(ov[T.LR_KEY]) - self.optimum_of(ov["model.depth"])
                self.store.rows[rid] = {"group": group, "final_eval_loss": 3.0 + x * x,
                                        "diverged": 0}
            out.append(self.store.rows[rid])
        return out


def test_lr_sweep_extends_until_every_optimum_is_bracketed_running_only_new_points():
    optimum = {1: 2.5, 2: 0.0, 8: -3.0}  # log2 η*: the first grid is −1.5 … 1.5
    runner = FakeRunner(lambda depth: optimum[depth])
    rows = T.lr_sweep(runner, "depth", "umup", [1, 2, 8], T.FULL, log=lambda _: None)
    ids = [sweep_lib.run_id(ov) for ov in runner.executed]
    assert len(ids) == len(set(ids)) == len(rows)  # nothing ran twice
    grids = {d: sorted(T.k_of(ov[T.LR_KEY]) for ov in runner.executed
                       if ov["model.depth"] == d) for d in optimum}
    for d, ks in grids.items():
        best = 2 * optimum[d]
        assert min(ks) < best < max(ks), (d, ks)  # bracketed
    # The reference (depth 8) has depth 1's and depth 2's optima: Algorithm 1 is defined.
    assert {5, 0} <= set(grids[8])
    assert grids[2] == list(range(-3, 4))  # never extended: bracketed from the start


# --- the steps axis ------------------------------------------------------------------------------


def test_steps_axis_keeps_the_warmup_and_the_final_lr_fraction():
    scale = T.FULL
    schedules = {m: T.steps_schedule(m, "sp", scale) for m in scale.values["steps"]}
    warm = np.arange(scale.warmup)
    ramps = [np.asarray([float(s(t)) for t in warm]) for s in schedules.values()]
    for ramp in ramps:  # the same linear warm-up, reaching the peak at its last step
        np.testing.assert_allclose(ramp, (warm + 1) / scale.warmup, rtol=1e-6)
    for m, s in schedules.items():
        steps = T.steps_of(m, scale)
        cfg = sweep_lib.run_config(T.rule_config("sp", scale),
                                   T.axis_overrides("steps", m, scale))
        assert cfg.train.steps == steps == m * 240
        assert cfg.optimizer.warmup_steps == scale.warmup == 40
        assert float(s(steps)) == pytest.approx(0.1, abs=1e-7)  # ends at 10% of the peak
        assert float(s(steps - 1)) == pytest.approx(0.1, abs=1e-3)  # the last update's
        assert float(s(scale.warmup)) == pytest.approx(1.0)
        mid = scale.warmup + (steps - scale.warmup) // 2
        assert float(s(mid)) == pytest.approx(0.55, abs=0.01)  # half-way through the cosine


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("axis, values, devices, match", [
    ("depth", [1, 0, 2], 1, "depth 0 is invalid: the model needs at least 1 layer"),
    ("batch", [4, 6, 8], 4, r"batch 6 is invalid: it must be a positive multiple of the mesh's "
                            r"data × fsdp = 4 × 1 = 4"),
    ("steps", [1, 0.125], 1, r"steps multiple 0.125 is invalid: 30 steps are not longer than "
                             r"the warm-up of 40 steps"),
    ("steps", [1, 1.001], 1, "is not a whole number of steps"),
    ("width", [64, 48], 1, "width 48 is invalid: it must be a positive multiple of the head "
                           "size 32"),
    ("hps", [0], 1, "width 0 is invalid"),
    ("depth", [], 1, "--values is empty"),
])
def test_axis_values_the_model_cannot_take_are_refused(axis, values, devices, match):
    with pytest.raises(ValueError, match=match):
        T.check_axis_values(axis, values, T.FULL, num_devices=devices)


def test_the_cli_refuses_before_any_run(tmp_path, capsys):
    out = tmp_path / "out"
    for args, match in ((["--axis=depth", "--values=1,0"], "depth 0 is invalid"),
                        (["--axis=steps", "--values=1,0.1"], "steps multiple 0.1 is invalid"),
                        (["--axis=depth", "--rules=sp,xp"], r"--rules: \['xp'\] invalid")):
        with pytest.raises(SystemExit) as e:
            T.main(args + [f"--out={out}"])
        assert e.value.code == 2
        assert match.replace("\\", "") in capsys.readouterr().err.replace("\\", "")
    assert not out.exists()


# --- small mode end to end -----------------------------------------------------------------------


def _check_outputs(out: pathlib.Path, axis: str, rules):
    for name in OUTPUTS + (f"transfer_{axis}.png",):
        assert (out / name).stat().st_size > 0, name
    rows = analysis.read_results(out / "results.csv")
    assert {r["rule"] for r in rows} == set(rules)
    transfer = json.loads((out / "transfer.json").read_text())
    assert transfer["_meta"]["axis"] == axis and transfer["_meta"]["runs"] == len(rows)
    assert transfer["_meta"]["wall_time_s_this_invocation"] > 0
    optima = analysis.read_results(out / "optima.csv")
    return rows, transfer, optima


def test_small_mode_writes_every_file_and_reruns_nothing(tmp_path):
    out = tmp_path / "depth"
    T.run("depth", out, T.SMALL, rules=["umup"], progress=False, verbose=False)
    rows, transfer, optima = _check_outputs(out, "depth", ["umup"])
    assert sorted({r["depth"] for r in rows}) == [1, 2]
    assert {o["depth"] for o in optima} == {1, 2}
    assert math.isfinite(transfer["umup"]["transfer_error_largest"])
    assert (out / "transfer_depth.png").stat().st_size > 10_000
    before = (out / "umup" / "results.csv").read_text()
    T.run("depth", out, T.SMALL, rules=["umup"], progress=False, verbose=False)
    assert (out / "umup" / "results.csv").read_text() == before  # resumed: no new run


@pytest.mark.slow
@pytest.mark.parametrize("axis", T.AXES)
def test_small_mode_every_axis_every_rule(tmp_path, axis):
    out = tmp_path / axis
    T.main([f"--axis={axis}", "--small", "--no-progress", f"--out={out}"])
    rules = ["umup"] if axis == "hps" else list(T.RULES)
    rows, transfer, optima = _check_outputs(out, axis, rules)
    if axis == "hps":
        assert set(T.ALPHAS) <= set(transfer) and {o["hp"] for o in optima} >= set(T.ALPHAS)
    else:
        assert set(rules) == set(transfer) - {"_meta"}
