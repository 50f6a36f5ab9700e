"""Transfer beyond width: does the optimal learning rate (and, for u-μP, each α) stay put when
depth, training steps, batch size or width change?  SP, SP + embedding LR, μP and u-μP on the
bundled corpus at CPU scale (the u-μP paper's §4 transfer claims, spec §6.4 and §9).

    python experiments/transfer_axes.py --axis=depth|steps|batch|width|hps [--values=…]
    python experiments/transfer_axes.py --axis=depth --small    # seconds: every file, tiny runs

The base scale is the width-transfer experiment's at width 64: 2 heads of 32, depth 2, byte
tokens, sequence 64, batch 16, 240 steps with a 40-step linear warm-up then cosine to 10%,
AdamW with independent weight decay 2⁻¹³; μP and SP + embedding LR use base width 32 (the
smallest width of the width axis), so SP + embedding LR's embedding LR is (width/32)× SP's.

Axes (one changes, everything else stays at the base scale):

* ``depth``: 1, 2, 4, 8 layers;
* ``steps``: ×1, ×2, ×4, ×8 the base 240 steps, with the warm-up kept at 40 steps and the
  cosine always ending at the same 10% of the peak (:func:`steps_schedule` is tested);
* ``batch``: 4, 8, 16, 32, 64 sequences per step (same number of steps, so more tokens);
* ``width``: 32, 64, 128, 256 (heads of 32, so 1 … 8 heads);
* ``hps``: u-μP only: each α (attn_mult, ffn_act_mult, residual_mult, residual_attn_ratio,
  loss_softmax_mult) on 2⁻², 2⁻¹, 2⁰, 2¹, 2² at widths 64, 128, 256, one at a time with the
  others at 1, at the learning rate that is optimal at that width (found first, on the
  half-octave grid).

For each rule and axis value the learning rates form a half-octave grid (2^(k/2)), first
±1.5 octaves around the rule's optimum at the base scale, then **extended until every optimum
is bracketed**: an optimum on the edge of its grid adds one octave (two half-octaves) on that
side, and the reference rows of Algorithm 1 (the largest axis value and the row of the global
minimum) get every other row's optimal LR so that the transfer error is defined; only the new
points run (``results.csv`` resume).  α grids are extended the same way, by octaves.  Runs
that differ only in the learning rate train as one vmapped computation (the batched runner).

Writes ``OUT/results.csv`` (one row per run, with a ``rule`` column: sp, sp_emb_lr, mup,
umup), ``OUT/optima.csv`` (optimal log2 LR, or log2 α, per rule/α and axis value, with an edge
flag), ``OUT/transfer.json`` (Algorithm 1 per rule/α with the axis as the fixed variable:
f* = the largest axis value and f* = the global argmin; wall time and load averages) and
``OUT/transfer_<axis>.png``.  ``OUT/<rule>/`` holds each rule's sweep (rerunning skips finished
runs; the per-run ``runs/`` checkpoints are not committed).  OUT defaults to
``experiments/results/transfer_<axis>``.

An axis value the model cannot take (depth 0, a batch the device mesh does not divide, steps
not longer than the warm-up, a width that is not a multiple of the head size) is refused
before any run starts, naming it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import sys
import time
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import jax
import ml_collections
import numpy as np

from umup_jax import analysis
from umup_jax import config as config_lib
from umup_jax import optim as optim_lib
from umup_jax import sharding as sharding_lib
from umup_jax import sweep as sweep_lib
from umup_jax import train as train_lib

AXES = ("depth", "steps", "batch", "width", "hps")
RULES = ("sp", "sp_emb_lr", "mup", "umup")
# The rule's log2 optimum at the base scale (width 64: the width-transfer experiment's), in
# half-octave units k (η = 2^(k/2)): the centre of every first grid.
LR_CENTRE_K = {"sp": -16, "sp_emb_lr": -16, "mup": -14, "umup": 0}
ALPHAS = ("attn_mult", "ffn_act_mult", "residual_mult", "residual_attn_ratio",
          "loss_softmax_mult")
LR_KEY = "optimizer.learning_rate"
K_BOUNDS = (-40, 16)  # η from 2⁻²⁰ to 2⁸: the grids never extend beyond
ALPHA_BOUNDS = (-6, 6)  # α from 2⁻⁶ to 2⁶
# The column of results.csv that holds each axis's value.
COLUMN = {"depth": "depth", "steps": "steps", "batch": "batch_size", "width": "width",
          "hps": "width"}


@dataclasses.dataclass(frozen=True)
class Scale:
    """The base scale every axis varies one thing of, and the search's settings."""

    width: int = 64
    head_dim: int = 32
    depth: int = 2
    seq_len: int = 64
    batch: int = 16
    steps: int = 240
    warmup: int = 40
    eval_batch: int = 16
    eval_batches: int = 8
    base_width: int = 32  # μP's base width; SP + embedding LR's too
    half_octaves: int = 3  # the first LR grid: centre ± this many half-octaves
    max_rounds: int = 8  # grid extensions at most (each runs only new points)
    values: Mapping[str, tuple] = dataclasses.field(default_factory=lambda: {
        "depth": (1, 2, 4, 8), "steps": (1, 2, 4, 8), "batch": (4, 8, 16, 32, 64),
        "width": (32, 64, 128, 256), "hps": (64, 128, 256)})
    alpha_exponents: tuple = (-2, -1, 0, 1, 2)  # log2 α


FULL = Scale()
# Seconds per axis: every file is written, nothing is meant to be read into.
SMALL = Scale(width=32, depth=1, seq_len=32, batch=4, steps=12, warmup=2, eval_batch=4,
              eval_batches=2, base_width=32, half_octaves=1, max_rounds=1,
              values={"depth": (1, 2), "steps": (1, 2), "batch": (2, 4), "width": (32, 64),
                      "hps": (32, 64)},
              alpha_exponents=(-1, 0, 1))


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------


def rule_config(rule: str, scale: Scale) -> ml_collections.ConfigDict:
    """The base-scale config of ``rule`` (sp, sp_emb_lr, mup, umup)."""
    parametrization = "sp" if rule == "sp_emb_lr" else rule
    arg = (f"smoke,model.width={scale.width},model.num_heads={scale.width // scale.head_dim},"
           f"model.depth={scale.depth},model.seq_len={scale.seq_len},"
           f"train.batch_size={scale.batch},train.steps={scale.steps},"
           f"train.eval_batch_size={scale.eval_batch},train.eval_batches={scale.eval_batches},"
           f"train.eval_every=1000000000,train.log_every=50,"  # evaluate at the end only
           f"optimizer.warmup_steps={scale.warmup}")
    cfg = config_lib.proxy_config(parametrization, arg)
    if rule == "mup":
        cfg.model.hparams.base_width = scale.base_width
    if rule == "sp_emb_lr":
        cfg.model.hparams.emb_lr_scaling = True
        cfg.model.hparams.base_width = scale.base_width
    return cfg


def axis_overrides(axis: str, value: Any, scale: Scale) -> dict:
    """The config overrides that put the base scale at ``value`` of ``axis`` (for ``steps``
    the value is a multiple of the base steps; warm-up and final LR fraction stay)."""
    if axis == "depth":
        return {"model.depth": int(value)}
    if axis == "steps":
        return {"train.steps": steps_of(value, scale)}
    if axis == "batch":
        return {"train.batch_size": int(value)}
    if axis in ("width", "hps"):
        return {"model.width": int(value), "model.num_heads": int(value) // scale.head_dim}
    raise ValueError(f"--axis={axis!r} is invalid: allowed are {AXES}")


def steps_of(multiple: Any, scale: Scale) -> int:
    return int(round(float(multiple) * scale.steps))


def steps_schedule(multiple: Any, rule: str = "umup", scale: Scale = FULL) -> Callable:
    """The LR schedule multiplier s_t of the steps axis at ``multiple`` × the base steps, as
    the optimizer builds it from the run's config."""
    cfg = sweep_lib.run_config(rule_config(rule, scale), axis_overrides("steps", multiple, scale))
    return optim_lib.make_schedule(train_lib.optimizer_config(cfg))


def check_axis_values(axis: str, values: Sequence, scale: Scale,
                      num_devices: Optional[int] = None) -> None:
    """Refuses an axis value the model cannot take, naming it (before anything runs):
    depth < 1, a batch the data × fsdp mesh axes do not divide, steps not longer than the
    warm-up, a width that is not a positive multiple of the head size."""
    if axis not in AXES:
        raise ValueError(f"--axis={axis!r} is invalid: allowed are {AXES}")
    if not values:
        raise ValueError(f"--values is empty: give the {axis} values to try")
    num_devices = jax.device_count() if num_devices is None else num_devices
    mesh = dict(rule_config("umup", scale).mesh)
    data, fsdp, _ = sharding_lib.mesh_shape(mesh, num_devices)
    for v in values:
        if axis == "steps":
            if not _is_number(v) or not v > 0:
                raise ValueError(f"steps multiple {v!r} is invalid: it must be a number > 0")
            steps = float(v) * scale.steps
            if not float(steps).is_integer():
                raise ValueError(f"steps multiple {v!r} is invalid: {v} × {scale.steps} base "
                                 f"steps = {steps} is not a whole number of steps")
            if steps <= scale.warmup:
                raise ValueError(
                    f"steps multiple {v!r} is invalid: {int(steps)} steps are not longer than "
                    f"the warm-up of {scale.warmup} steps, which the steps axis keeps constant")
            continue
        if not _is_int(v):
            raise ValueError(f"{axis} {v!r} is invalid: it must be an integer")
        if axis == "depth" and v < 1:
            raise ValueError(f"depth {v} is invalid: the model needs at least 1 layer")
        if axis == "batch" and (v < 1 or v % (data * fsdp)):
            raise ValueError(
                f"batch {v} is invalid: it must be a positive multiple of the mesh's data × fsdp "
                f"= {data} × {fsdp} = {data * fsdp} ({num_devices} device(s), mesh {mesh})")
        if axis in ("width", "hps") and (v < scale.head_dim or v % scale.head_dim):
            raise ValueError(f"width {v} is invalid: it must be a positive multiple of the head "
                             f"size {scale.head_dim}")


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def check_configs(axis: str, values: Sequence, rules: Sequence[str], scale: Scale) -> None:
    """Every run's config passes the training checks (model, optimizer, schedule) before any
    run starts."""
    check_axis_values(axis, values, scale)
    unknown = sorted(set(rules) - set(RULES))
    if unknown or not rules:
        raise ValueError(f"--rules: {unknown or 'none'} invalid: choose from {list(RULES)}")
    for rule in rules:
        base = rule_config(rule, scale)
        for v in values:
            cfg = sweep_lib.run_config(base, axis_overrides(axis, v, scale))
            try:
                train_lib.check_config(cfg)
            except ValueError as e:
                raise ValueError(f"{axis} {v} ({rule}): {e}") from None


# ---------------------------------------------------------------------------------------------
# Grids that bracket every optimum
# ---------------------------------------------------------------------------------------------


def lr_of(k: int) -> float:
    """η = 2^(k/2): k counts half-octaves."""
    return 2.0 ** (k / 2)


def k_of(lr: float) -> int:
    return int(round(2 * math.log2(float(lr))))


def _best(curve: Mapping[int, float]) -> Optional[int]:
    """argmin over finite losses (the lowest grid point on ties); None if all diverged."""
    finite = sorted((k, y) for k, y in curve.items() if math.isfinite(y))
    return min(finite, key=lambda kv: kv[1])[0] if finite else None


def plan_extension(curves: Mapping[Any, Mapping[int, float]], step: int,
                   bounds: tuple[int, int]) -> dict[Any, set[int]]:
    """The grid points to add so that every optimum is bracketed and Algorithm 1 is defined.

    ``curves[f]`` maps grid points (integers: half-octaves of η, or octaves of α) to the final
    loss at fixed value f (+inf or NaN: diverged).  Returned: ``{f: {new points}}``, empty
    when nothing is missing.  In order:

    1. an optimum on the lowest (highest) point of its grid adds ``step`` points below
       (above) it; a curve that diverged everywhere adds ``step`` points below its lowest;
    2. once every optimum is bracketed, the reference rows of Algorithm 1 (the largest f and
       the row holding the global minimum) get every other row's optimum, so that
       L(f*, t_f) exists.

    Points outside ``bounds`` are never added.
    """
    lo_bound, hi_bound = bounds
    need: dict[Any, set[int]] = {}

    def add(f, points):
        points = {p for p in points if lo_bound <= p <= hi_bound and p not in curves[f]}
        if points:
            need.setdefault(f, set()).update(points)

    for f, curve in curves.items():
        if not curve:
            continue
        lo, hi, best = min(curve), max(curve), _best(curve)
        if best is None or best == lo:
            add(f, range(lo - step, lo))
        elif best == hi:
            add(f, range(hi + 1, hi + step + 1))
    if need:
        return need
    optima = {f: _best(c) for f, c in curves.items()}
    finite = [(c[optima[f]], f) for f, c in curves.items() if optima[f] is not None]
    if not finite:
        return need
    refs = {max(curves, key=analysis.sort_key), min(finite, key=lambda yf: yf[0])[1]}
    for ref in refs:
        add(ref, {t for f, t in optima.items() if f != ref and t is not None})
    return need


def _curves(rows: Iterable[Mapping], key_of_row: Callable, point_of_row: Callable
            ) -> dict[Any, dict[int, float]]:
    curves: dict[Any, dict[int, float]] = {}
    for r in rows:
        curves.setdefault(key_of_row(r), {})[point_of_row(r)] = analysis.run_loss(r)
    return curves


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def _load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def _runner(axis: str, rule: str, values: Sequence, scale: Scale, out: pathlib.Path,
            progress: bool) -> sweep_lib.Runner:
    cfg = rule_config(rule, scale)
    if axis == "hps":
        grid = {"model.width+model.num_heads": [[w, w // scale.head_dim] for w in values],
                "alphas": list(ALPHAS), "alpha_exponents": list(scale.alpha_exponents)}
    else:
        grid = {"axis": axis, "values": list(values)}
    spec = {"name": f"transfer_{axis}_{rule}", "kind": "grid", "scale": dataclasses.asdict(scale),
            "grid": grid, "lr": "half-octave grid around the rule's optimum, extended until "
                                "every optimum is bracketed (experiments/transfer_axes.py)"}
    return sweep_lib.Runner(spec, cfg, out / rule, batched=True, progress=progress)


def lr_sweep(runner: sweep_lib.Runner, axis: str, rule: str, values: Sequence, scale: Scale,
             log: Callable[[str], None]) -> list[dict]:
    """The half-octave LR grid × ``values`` of ``axis`` for one rule, extended until every
    optimum is bracketed; returns the rows of every LR run."""
    centre, h = LR_CENTRE_K[rule], scale.half_octaves
    grids = {v: set(range(centre - h, centre + h + 1)) for v in values}
    seed = runner.config.seed
    for round_ in range(scale.max_rounds + 1):
        runs = [("lr", {**axis_overrides(axis, v, scale), LR_KEY: lr_of(k), "seed": seed})
                for v in values for k in sorted(grids[v])]
        t0 = time.time()
        rows = runner.run(runs)
        curves = {v: {} for v in values}
        for (_, ov), row in zip(runs, rows):
            v = next(v for v in values if _matches(axis_overrides(axis, v, scale), ov))
            curves[v][k_of(ov[LR_KEY])] = analysis.run_loss(row)
        optima = {v: _best(c) for v, c in curves.items()}
        log(f"  {rule:9s} round {round_}: {len(runs)} LR points, optimal log2 η "
            + ", ".join(f"{axis} {v}: {'-' if k is None else k / 2:g}" for v, k in optima.items())
            + f" ({time.time() - t0:.0f}s, {_load()})")
        need = plan_extension(curves, step=2, bounds=K_BOUNDS)
        if not need:
            break
        if round_ == scale.max_rounds:
            log(f"  {rule}: stopped after {scale.max_rounds} extensions; still missing log2 η "
                + str({v: sorted(k / 2 for k in ks) for v, ks in need.items()}))
            break
        for v, ks in need.items():
            grids[v] |= ks
    return [r for r in runner.store.rows.values() if r["group"] == "lr"]


def _matches(sub: Mapping, ov: Mapping) -> bool:
    return all(ov.get(k) == v for k, v in sub.items())


def alpha_sweep(runner: sweep_lib.Runner, widths: Sequence[int], best_lr: Mapping[int, float],
                scale: Scale, log: Callable[[str], None]) -> list[dict]:
    """Each α on its octave grid at each width (at that width's optimal η), the others at 1;
    α = 1 is the LR sweep's run at that η.  Extended until every optimum is bracketed."""
    seed = runner.config.seed
    grids = {(a, w): {j for j in scale.alpha_exponents if j != 0} for a in ALPHAS
             for w in widths}
    default_rows = {w: _row_at(runner, {**axis_overrides("hps", w, scale),
                                        LR_KEY: best_lr[w], "seed": seed}) for w in widths}
    for round_ in range(scale.max_rounds + 1):
        runs = [(f"hp:{a}", {**axis_overrides("hps", w, scale), LR_KEY: best_lr[w],
                             f"model.hparams.{a}": 2.0**j, "seed": seed})
                for (a, w), js in grids.items() for j in sorted(js)]
        t0 = time.time()
        rows = runner.run(runs)
        need_all = {}
        for a in ALPHAS:
            curves = {w: {0: analysis.run_loss(default_rows[w])} for w in widths}
            for (g, ov), row in zip(runs, rows):
                if g == f"hp:{a}":
                    curves[ov["model.width"]][int(round(math.log2(ov[f"model.hparams.{a}"])))] = \
                        analysis.run_loss(row)
            for w, js in plan_extension(curves, step=1, bounds=ALPHA_BOUNDS).items():
                need_all[(a, w)] = js
        log(f"  umup α round {round_}: {len(runs)} runs ({time.time() - t0:.0f}s, {_load()})")
        if not need_all:
            break
        if round_ == scale.max_rounds:
            log(f"  α: stopped after {scale.max_rounds} extensions; still missing {need_all}")
            break
        for key, js in need_all.items():
            grids[key] |= js
    return list(runner.store.rows.values())


def _row_at(runner: sweep_lib.Runner, overrides: dict) -> dict:
    row = runner.store.get(sweep_lib.run_id(overrides))
    if row is None:
        raise RuntimeError(f"no run with {overrides} in {runner.workdir}")
    return row


def run(axis: str, out: pathlib.Path, scale: Scale = FULL, values: Optional[Sequence] = None,
        rules: Sequence[str] = RULES, progress: bool = True, verbose: bool = True) -> dict:
    """Runs (what is missing of) one axis and writes every output; returns transfer.json's
    content."""
    values = list(scale.values[axis] if values is None else values)
    rules = ["umup"] if axis == "hps" else list(rules)
    check_configs(axis, values, rules, scale)  # before any data or compilation
    log = print if verbose else (lambda *_: None)
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start, load_start = time.time(), os.getloadavg()
    log(f"transfer along {axis}: values {values}, rules {rules}; {_load()}")
    all_rows = []
    for rule in rules:
        runner = _runner(axis, rule, values, scale, out, progress)
        try:
            lr_rows = lr_sweep(runner, "width" if axis == "hps" else axis, rule, values, scale,
                               log)
            if axis == "hps":
                best = {w: lr_of(_best(c)) for w, c in _curves(
                    lr_rows, lambda r: int(r["width"]), lambda r: k_of(r["lr"])).items()}
                log(f"  umup: α sweeps at η = " + ", ".join(
                    f"2^{math.log2(lr):g} (width {w})" for w, lr in best.items()))
                alpha_sweep(runner, values, best, scale, log)
        finally:
            runner.close()
        all_rows.extend({"rule": rule, **r} for r in runner.store.rows.values())
    analysis.write_csv(all_rows, out / "results.csv", columns=["rule"] + list(sweep_lib.COLUMNS))
    rows = analysis.read_results(out / "results.csv")
    wall = time.time() - t_start
    meta = {"axis": axis, "values": values, "rules": rules, "scale": dataclasses.asdict(scale),
            "runs": len(rows), "wall_time_s_this_invocation": round(wall, 1),
            "run_wall_time_s_sum": round(float(sum(r["wall_time_s"] for r in rows)), 1),
            "load_average_start": [round(x, 2) for x in load_start],
            "load_average_end": [round(x, 2) for x in os.getloadavg()]}
    transfer = write_outputs(axis, rows, out, meta)
    log(summary(axis, transfer))
    log(f"wall time {wall / 60:.1f} min; {_load()}; wrote {out}")
    return transfer


# ---------------------------------------------------------------------------------------------
# Analysis and outputs (also used by the notebook, from the committed CSVs)
# ---------------------------------------------------------------------------------------------


def lr_rows(rows: Sequence[Mapping]) -> list[dict]:
    """The learning-rate runs (for ``hps``: its per-width LR search)."""
    return [dict(r) for r in rows if r.get("group") == "lr"]


def alpha_rows(rows: Sequence[Mapping]) -> list[dict]:
    """``hps`` runs as ``{panel: α name, x: α value, width, …}``: each α's own runs plus, as its
    α = 1 point, the LR search's run at the η the α runs used."""
    out = []
    at_lr = {(r["width"], r["lr"]) for r in rows if str(r.get("group", "")).startswith("hp:")}
    for a in ALPHAS:
        for r in rows:
            g = r.get("group")
            if g == f"hp:{a}" or (g == "lr" and (r["width"], r["lr"]) in at_lr):
                out.append({**r, "panel": a, "x": r[f"hp.{a}"]})
    return out


def optima_table(axis: str, rows: Sequence[Mapping]) -> list[dict]:
    """optima.csv: the best LR per rule and axis value (for ``hps`` also the best α per α and
    width), with the edge flag of :func:`umup_jax.analysis.optimum_per_group`."""
    col = COLUMN[axis]
    table = [{"search": "lr", "hp": "", **o} for o in analysis.optimum_per_group(
        lr_rows(rows), ["rule", col], x_key="lr")]
    if axis == "hps":
        table += [{"search": "alpha", "rule": "umup", "hp": o.pop("panel"), **o}
                  for o in analysis.optimum_per_group(alpha_rows(rows), ["panel", col],
                                                      x_key="x")]
    return table


def transfer_errors(axis: str, rows: Sequence[Mapping]) -> dict:
    """Algorithm 1 per rule (per α for ``hps``) with the axis value fixed and η (α)
    transferred: f* = the largest axis value (the target) and f* = the global argmin."""
    col = COLUMN[axis]
    if axis == "hps":
        groups = {a: (alpha_rows(rows), {"panel": a}, "x") for a in ALPHAS}
        groups["lr (umup)"] = (lr_rows(rows), {"rule": "umup"}, "lr")
    else:
        groups = {rule: (lr_rows(rows), {"rule": rule}, "lr") for rule in RULES}
    out = {}
    for name, (sel_rows, where, x) in groups.items():
        sel = analysis.select(sel_rows, where)
        if not sel:
            continue
        fixed, xs, table = analysis.loss_table(sel, col, x)
        largest = analysis.transfer_error(table, fixed, xs, reference=max(fixed))
        glob = analysis.transfer_error(table, fixed, xs)
        out[name] = {
            "reference_largest": max(fixed),
            "transfer_error_largest": largest.err,
            "transfer_error_global_argmin": glob.err,
            "global_argmin": glob.f_star,
            f"optimal_log2_{'lr' if x == 'lr' else 'alpha'}": {
                str(f): None if t is None else math.log2(t) for f, t in zip(fixed, largest.t_opt)},
            "best_loss": {str(f): float(np.nanmin(np.where(np.isfinite(row), row, np.nan)))
                          if np.isfinite(row).any() else None for f, row in zip(fixed, table)},
            "excess_at_largest": {str(f): e for f, e in zip(fixed, largest.excess)},
            "optimum_on_grid_edge": {str(f): bool(e) for f, e in zip(fixed, largest.on_edge)},
        }
    return out


def plot(axis: str, rows: Sequence[Mapping], png, title: Optional[str] = None) -> dict:
    """The paper-style figure: loss against log2 η (for ``hps``: log2 α), one panel per rule
    (per α), one line per axis value, optima starred, Algorithm 1's error in each title."""
    col = COLUMN[axis]
    if axis == "hps":
        widths = sorted({r["width"] for r in alpha_rows(rows)})
        return analysis.plot_loss_vs_lr(
            alpha_rows(rows), png, x_key="x", line_key=col, panel_key="panel",
            reference="largest", x_label="log2(α)",
            title=title or f"u-μP: each α at widths {', '.join(map(str, widths))} "
                           "(the others at 1, at each width's optimal η)")
    return analysis.plot_loss_vs_lr(lr_rows(rows), png, line_key=col, panel_key="rule",
                                    reference="largest", title=title)


def default_title(axis: str, meta: Mapping) -> str:
    s = meta["scale"]
    what = {"depth": "depth", "steps": f"training steps (×{s['steps']}, warm-up "
                                       f"{s['warmup']}, cosine to 10%)",
            "batch": "batch size", "width": "width"}[axis]
    return (f"LR transfer across {what}; base: width {s['width']}, depth {s['depth']}, "
            f"seq {s['seq_len']}, batch {s['batch']}, {s['steps']} steps, byte tokens")


def write_outputs(axis: str, rows: Sequence[Mapping], out: pathlib.Path, meta: dict) -> dict:
    analysis.write_csv(optima_table(axis, rows), out / "optima.csv", columns=[
        "search", "rule", "hp", COLUMN[axis], "best_x", "log2_x", "best_loss", "on_edge",
        "x_min", "x_max", "n_x", "n_diverged"])
    transfer = transfer_errors(axis, rows)
    plot(axis, rows, out / f"transfer_{axis}.png",
         title=None if axis == "hps" else default_title(axis, meta))
    transfer["_meta"] = meta
    (out / "transfer.json").write_text(json.dumps(transfer, indent=2, default=float))
    return transfer


def summary(axis: str, transfer: Mapping) -> str:
    lines = []
    for name, t in transfer.items():
        if name.startswith("_"):
            continue
        opt = t.get("optimal_log2_lr") or t.get("optimal_log2_alpha")
        edge = [f for f, e in t["optimum_on_grid_edge"].items() if e]
        lines.append(
            f"{name:18s} transfer error (f* = {COLUMN[axis]} {t['reference_largest']}) "
            f"{t['transfer_error_largest']:.4f}, (f* = global argmin) "
            f"{t['transfer_error_global_argmin']:.4f}; optimal log2 per {COLUMN[axis]}: "
            + ", ".join(f"{f}: {'-' if v is None else f'{v:g}'}" for f, v in opt.items())
            + (f"; ON GRID EDGE at {edge}" if edge else ""))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def parse_values(text: Optional[str], axis: str) -> Optional[list]:
    if text is None:
        return None
    values = []
    for token in text.split(","):
        token = token.strip()
        if not token:
            continue
        try:
            value = float(token) if axis == "steps" else int(token)
        except ValueError:
            raise ValueError(f"--values={text!r}: {token!r} is not a number") from None
        values.append(int(value) if float(value).is_integer() else value)
    return values


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python experiments/transfer_axes.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--axis", required=True, choices=AXES)
    p.add_argument("--values", default=None,
                   help="comma-separated axis values (steps: multiples of the base steps)")
    p.add_argument("--out", default=None, help="default experiments/results/transfer_<axis>")
    p.add_argument("--rules", default=",".join(RULES), help="comma-separated subset of "
                   f"{','.join(RULES)} (hps: umup only)")
    p.add_argument("--small", action="store_true", help="tiny runs, every file (seconds)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    scale = SMALL if args.small else FULL
    out = pathlib.Path(args.out or f"experiments/results/transfer_{args.axis}")
    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    try:
        values = parse_values(args.values, args.axis)
        check_configs(args.axis, scale.values[args.axis] if values is None else values,
                      ["umup"] if args.axis == "hps" else rules, scale)
    except ValueError as e:
        p.error(str(e))
    run(args.axis, out, scale, values, rules, progress=not args.no_progress)


if __name__ == "__main__":
    sys.exit(main())
