"""Hyperparameter sweeps declared as data, run in-process, one results row per run.

    python -m umup_jax.sweep --config=configs/umup_proxy.py:cpu --sweep=SWEEP --workdir=DIR

(``--config.a.b=value`` overrides, ``--nobatched``, ``--noprogress``; the flag conventions are
those of :mod:`umup_jax.cli`.)  ``--backend=ray`` runs the sweep's units of work as Ray tasks
on a local Ray or on a cluster (``--ray_address``, ``--gpus_per_task``, ``--cpus_per_task``;
:mod:`umup_jax.sweep_backends`); the results are the same rows as with the default
``--backend=local``.

``SWEEP`` is a ``.json`` file or a ``.py`` file with ``get_sweep()`` returning a dict:

* ``{"kind": "grid", "grid": {key: [values…], …}}``: the Cartesian product (e.g. width × LR);
  keys joined by ``+`` vary together (``{"model.width+model.num_heads": [[64, 2], [128, 4]]}``);
* ``{"kind": "independent", "lr": {"key": …, "values": […]}, "hps": {key: […], …}}``: the
  u-μP paper's independent search (§6.3 of the spec, paper Fig. 1a): (1) an LR line search
  with every other HP at its default; (2) at the best LR, a 1-D search per HP (its default is
  a candidate too, measured by stage 1, so it need not be listed); (3) one run
  combining each HP's best value (plus, with ``"recheck_lr": true``, an LR line search at the
  combined HPs);
* ``{"kind": "random", "space": {key: {"log2_uniform": [lo, hi], "scale": s} | {"choice":
  […]}}, "num_runs": N, "seed": S}``: random search (the paper's baseline for μP).

Common fields: ``name``, ``base`` ({key: value} overrides applied to every run), ``seeds``
(list, default ``[config.seed]``).  Keys are config paths such as ``model.width``,
``optimizer.learning_rate`` or ``model.hparams.attn_mult``; every key, and every value
against its key's type (``"abc"`` or ``64.0`` for ``model.width`` is refused), is checked
against the config before anything runs.

Results: ``DIR/results.csv``, one row per run (columns :data:`COLUMNS`; ``wall_time_s`` of a
run trained in a batched group is the group's wall time divided among its runs), written as
each run ends; ``DIR/sweep.json`` records the sweep, and a rerun with a different sweep in the same
workdir fails.  A rerun skips finished runs (by ``run_id``, a hash of the run's overrides), so a
killed sweep redoes only what is missing.  A run whose loss becomes NaN/Inf is recorded with
``diverged=1``; the sweep goes on.  A run that raises is recorded with its error (one line) in
the ``error`` column and its traceback in ``DIR/error.log``; the sweep goes on, the run runs
again on a rerun, and the command ends with one line counting the failed runs and exit status 1
(0 when every run finished, diverged ones included; library logging goes to
``DIR/run.log``).  ``sweep.json`` also records the hash of the base config's run-defining keys
(:func:`umup_jax.identity.identity_hash`): rerunning the sweep in the same workdir over another
base config (e.g. ``:cpu`` instead of the full proxy) is refused, so old rows and old per-run
checkpoints are never reused for another setting.  Each row also records the fingerprint of
the tokens its run trained on (:func:`umup_jax.data.token_fingerprint`): a rerun after the data
files changed under the same config is refused before any run starts, instead of mixing two
corpora in one sweep (:meth:`Runner.check_tokens`).

Runs that differ only in optimizer HPs (learning rate, weight decay) share shapes and compile
once: the **batched runner** trains them together as one ``jax.vmap``-ed computation (same data,
same init).  Model HPs (the α's, widths) are compile-time constants by design (every scale is a
Python float, spec §1.1), so runs that differ in them run one after another.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import hashlib
import importlib.util
import itertools
import json
import math
import os
import pathlib
import sys
import time
from typing import Any, Iterable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging

from umup_jax import cli
from umup_jax import config as config_lib
from umup_jax import data as data_lib
from umup_jax import failures
from umup_jax import identity as identity_lib
from umup_jax import parametrization as P
from umup_jax import sweep_backends as backends
from umup_jax import train as train_lib
from umup_jax.model import Decoder
from umup_jax.optim import make_optimizer

KINDS = ("grid", "independent", "random")
BATCHABLE = ("optimizer.learning_rate", "optimizer.weight_decay")
HP_COLUMNS = sorted({f"hp.{n}" for name in P.PARAMETRIZATIONS for n in P.hparam_names(name)
                     if n != "shift"})
COLUMNS = (["run_id", "sweep", "group", "parametrization", "width", "depth", "steps",
            "batch_size", "seq_len", "lr", "weight_decay"] + HP_COLUMNS +
           ["seed", "final_train_loss", "final_eval_loss", "diverged", "wall_time_s",
            "overrides", "error", "data_fingerprint"])


class SweepError(ValueError):
    """A sweep definition or workdir that cannot be run."""


# ---------------------------------------------------------------------------------------------
# Spec
# ---------------------------------------------------------------------------------------------


def load_sweep(path: str) -> dict:
    p = pathlib.Path(path)
    if not p.exists():
        raise SweepError(f"--sweep={path}: file not found")
    if p.suffix == ".json":
        try:
            spec = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise SweepError(f"--sweep={path}: not valid JSON: {e}") from None
        if not isinstance(spec, dict):
            raise SweepError(f"--sweep={path}: the file must hold a JSON object, "
                             f"not a {type(spec).__name__}")
    elif p.suffix == ".py":
        module_spec = importlib.util.spec_from_file_location(f"sweep_{p.stem}", p)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        spec = module.get_sweep()
    else:
        raise SweepError(f"--sweep={path}: use a .json file or a .py file with get_sweep()")
    spec.setdefault("name", p.stem)
    return spec


def _check_keys(config: ml_collections.ConfigDict, keys: Iterable[str], where: str) -> None:
    probe = copy.deepcopy(config)
    for key in keys:
        if key == "seed":
            continue
        try:
            config_lib.set_key(probe, key, None)
        except (ValueError, KeyError, AttributeError) as e:
            raise SweepError(f"sweep {where}: {e}") from None


def _check_values(config: ml_collections.ConfigDict, pairs: Iterable[tuple[str, Any]],
                  where: str) -> None:
    """Every value must be settable on its key (the config's fields are typed: a string or a
    float for an int field is refused), so a mistyped value fails here, before any run,
    rather than in every run of the sweep."""
    probe = copy.deepcopy(config)
    for key, value in pairs:
        try:  # config.set_key names the key, its type and the value
            config_lib.set_key(probe, key, value)
        except ValueError as e:
            raise SweepError(f"sweep {where}: {' '.join(str(e).split())}") from None


def validate(spec: dict, config: ml_collections.ConfigDict) -> None:
    kind = spec.get("kind", "grid")
    if kind not in KINDS:
        raise SweepError(f"sweep kind={kind!r} is invalid: allowed are {KINDS}")
    _check_keys(config, spec.get("base", {}), "base")
    _check_values(config, spec.get("base", {}).items(), "base")
    _check_values(config, [("seed", s) for s in spec.get("seeds") or []], "seeds")
    if kind == "grid":
        grid = spec.get("grid") or {}
        if not grid or any(not list(v) for v in grid.values()):
            raise SweepError(f"sweep {spec['name']!r}: the grid is empty ({grid!r})")
        _check_keys(config, [k for key in grid for k in _split_keys(key)], "grid")
        pairs = []
        for key, values in grid.items():
            parts = _split_keys(key)
            for value in values:
                if len(parts) == 1:
                    pairs.append((key, value))
                elif not isinstance(value, (list, tuple)) or len(value) != len(parts):
                    raise SweepError(f"sweep grid[{key!r}]: {value!r} must list "
                                     f"{len(parts)} values")
                else:
                    pairs.extend(zip(parts, value))
        _check_values(config, pairs, "grid")
    elif kind == "independent":
        lr = spec.get("lr") or {}
        if not lr.get("values"):
            raise SweepError(f"sweep {spec['name']!r}: independent search needs lr.values")
        lr_key = lr.get("key", "optimizer.learning_rate")
        _check_keys(config, [lr_key], "lr")
        _check_values(config, [(lr_key, v) for v in lr["values"]], "lr")
        if any(not list(v) for v in (spec.get("hps") or {}).values()):
            raise SweepError(f"sweep {spec['name']!r}: an HP has an empty list of values")
        _check_keys(config, spec.get("hps") or {}, "hps")
        _check_values(config, [(k, v) for k, vs in (spec.get("hps") or {}).items()
                               for v in vs], "hps")
    else:
        space = spec.get("space") or {}
        if not space or int(spec.get("num_runs", 0)) <= 0:
            raise SweepError(f"sweep {spec['name']!r}: random search needs space and num_runs > 0")
        _check_keys(config, space, "space")
        for key, dist in space.items():
            if not ("log2_uniform" in dist or "choice" in dist):
                raise SweepError(f"sweep space[{key!r}]={dist!r}: use log2_uniform or choice")
            samples = (dist["choice"] if "choice" in dist else
                       [float(dist.get("scale", 1.0) * 2.0 ** e) for e in dist["log2_uniform"]])
            _check_values(config, [(key, v) for v in samples], "space")


def run_id(overrides: dict) -> str:
    blob = json.dumps(overrides, sort_keys=True, default=float)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _with_seeds(spec, config, runs: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    seeds = spec.get("seeds") or [config.seed]
    out = []
    for group, ov in runs:
        for seed in seeds:
            out.append((group, {**spec.get("base", {}), **ov, "seed": seed}))
    return out


def _split_keys(key: str) -> list[str]:
    """``"model.width+model.num_heads"`` names keys that vary together (values are lists)."""
    return key.split("+")


def grid_runs(spec, config) -> list[tuple[str, dict]]:
    keys = list(spec["grid"])
    runs = []
    for values in itertools.product(*(spec["grid"][k] for k in keys)):
        ov = {}
        for key, value in zip(keys, values):
            parts = _split_keys(key)
            if len(parts) == 1:
                ov[key] = value
            else:
                if not isinstance(value, (list, tuple)) or len(value) != len(parts):
                    raise SweepError(f"sweep grid[{key!r}]: {value!r} must list {len(parts)} values")
                ov.update(zip(parts, value))
        runs.append(("grid", ov))
    return _with_seeds(spec, config, runs)


def random_runs(spec, config) -> list[tuple[str, dict]]:
    rng = np.random.default_rng(int(spec.get("seed", 0)))
    runs = []
    for _ in range(int(spec["num_runs"])):
        ov = {}
        for key, dist in spec["space"].items():
            if "choice" in dist:
                ov[key] = dist["choice"][int(rng.integers(len(dist["choice"])))]
            else:
                lo, hi = dist["log2_uniform"]
                ov[key] = float(dist.get("scale", 1.0) * 2.0 ** rng.uniform(lo, hi))
        runs.append(("random", ov))
    return _with_seeds(spec, config, runs)


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


# The columns of a row that its run's config determines (compared for a legacy sweep.json).
RUN_CONFIG_COLUMNS = (["parametrization", "width", "depth", "steps", "batch_size", "seq_len", "lr",
                       "weight_decay", "seed"] + HP_COLUMNS)


def _same_cell(recorded: str, value: Any) -> bool:
    if str(recorded) == str(value):
        return True
    try:
        return math.isclose(float(recorded), float(value), rel_tol=1e-9, abs_tol=0.0)
    except (TypeError, ValueError):
        return False


def _check_legacy_rows(spec, config, rows: list[dict], spec_file: pathlib.Path) -> None:
    """A ``sweep.json`` written before base-config identity does not say which base config its
    rows were trained with; what the rows record (shapes, steps, batch, LR, weight decay, seed,
    every HP) must be what the current base config gives for their overrides, else
    :class:`SweepError`.  Rows whose overrides no longer build a config are skipped (they
    failed, and run again)."""
    bad = []
    for row in rows:
        try:
            cfg = run_config(config, json.loads(row.get("overrides") or "{}"))
            expected = make_row(spec, row.get("group", ""), {}, cfg, None, 0.0)
        except Exception:  # an override the config refuses: a failed row, rerun anyway
            continue
        for key in RUN_CONFIG_COLUMNS:
            want = expected.get(key, "")
            if not _same_cell(row.get(key, ""), want) and not (row.get(key, "") == "" and
                                                              key.startswith("hp.")):
                bad.append((row["run_id"], key, row.get(key, ""), want))
    if bad:
        shown = "; ".join(f"run {rid}: {key} {old} vs {new}" for rid, key, old, new in bad[:6])
        raise SweepError(
            f"{spec_file} predates base-config identity, and {len({b[0] for b in bad})} of its "
            f"rows were trained with another base config than the current one ({shown}"
            f"{'; …' if len(bad) > 6 else ''}); use another --workdir"
        )


class ResultsStore:
    """``results.csv`` of a sweep and ``sweep.json``, the identity of what it holds: the sweep
    spec and the hash of the base config's run-defining keys (:mod:`umup_jax.identity`).  A
    workdir holding another sweep, or the same sweep over another base config, is refused."""

    def __init__(self, workdir: pathlib.Path, spec: dict, config: ml_collections.ConfigDict):
        self.workdir = workdir
        self.path = workdir / "results.csv"
        adopt = None  # the record to write for a sweep.json that predates base-config identity
        workdir.mkdir(parents=True, exist_ok=True)
        spec_file = workdir / "sweep.json"
        record = {"spec": spec, "base_config_identity": identity_lib.identity_hash(config),
                  "base_config": json.loads(config.to_json())}
        canon = lambda x: json.dumps(x, sort_keys=True, default=str)
        if spec_file.exists():
            previous = json.loads(spec_file.read_text())
            legacy = "spec" not in previous  # written before the base config was recorded
            old_spec = previous if legacy else previous["spec"]
            if canon(old_spec) != canon(spec):
                raise SweepError(
                    f"{workdir} holds results of a different sweep ({old_spec.get('name')!r}, "
                    f"see {spec_file}); use another --workdir"
                )
            if legacy:  # checked against the rows' recorded config columns below
                adopt = record
            elif previous["base_config_identity"] != record["base_config_identity"]:
                changes = identity_lib.diff(identity_lib.identity(previous["base_config"]),
                                            identity_lib.identity(config))
                shown = "; ".join(identity_lib.describe_change(*c) for c in changes[:8])
                more = f" (+{len(changes) - 8} more)" if len(changes) > 8 else ""
                raise SweepError(
                    f"{workdir} holds sweep {spec.get('name')!r} run over another base config "
                    f"(changed: {shown}{more}; see {spec_file}); use another --workdir"
                )
        elif self.path.exists():
            raise SweepError(f"{self.path} exists but {spec_file} does not: not this sweep's")
        else:
            spec_file.write_text(json.dumps(record, indent=2, sort_keys=True, default=str))
        self.rows: dict[str, dict] = {}
        if self.path.exists():
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                fields, rows = list(reader.fieldnames or []), list(reader)
            if fields != COLUMNS:
                # Written before runs could fail (no "error" column) or before a rule gained
                # an HP (a new hp.* column): rewrite it with the new columns, empty in the old
                # rows; anything else is not this version's.
                if "run_id" not in fields or not set(fields) < set(COLUMNS):
                    raise SweepError(f"{self.path} has other columns than this version writes")
                self._rewrite(rows)
            for row in rows:
                if row["sweep"] != spec["name"]:
                    raise SweepError(f"{self.path} has rows of sweep {row['sweep']!r}")
                self.rows[row["run_id"]] = {k: row.get(k, "") or "" for k in COLUMNS}
        else:
            self._rewrite([])
        if adopt is not None:
            _check_legacy_rows(spec, config, list(self.rows.values()), spec_file)
            print(f"note: {spec_file} predates base-config identity; its {len(self.rows)} "
                  "row(s) agree with the current base config on every config column they "
                  "record, so it is recorded as this sweep's base config", flush=True)
            spec_file.write_text(json.dumps(adopt, indent=2, sort_keys=True, default=str))

    def _rewrite(self, rows: list[dict]) -> None:
        tmp = self.path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows({k: row.get(k, "") for k in COLUMNS} for row in rows)
        os.replace(tmp, self.path)

    def done(self, rid: str) -> bool:
        """Finished: a row exists and the run did not fail (failed runs run again)."""
        return rid in self.rows and not self.rows[rid].get("error")

    def add(self, row: dict) -> None:
        """Appends ``row`` (a rerun of a failed run appends again; the last row wins)."""
        row = {k: row.get(k, "") for k in COLUMNS}
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=COLUMNS).writerow(row)
        self.rows[row["run_id"]] = row

    def get(self, rid: str) -> Optional[dict]:
        return self.rows.get(rid)


def _loss(row: dict) -> float:
    try:
        v = float(row["final_eval_loss"])
    except (TypeError, ValueError):
        return math.inf
    return v if math.isfinite(v) and str(row["diverged"]) in ("0", "False") else math.inf


def make_row(spec, group, overrides, cfg, results: Optional[dict], wall: float) -> dict:
    m = cfg.model
    row = {
        "run_id": run_id(overrides), "sweep": spec["name"], "group": group,
        "parametrization": m.parametrization, "width": m.width, "depth": m.depth,
        "steps": cfg.train.steps, "batch_size": cfg.train.batch_size, "seq_len": m.seq_len,
        "lr": cfg.optimizer.learning_rate, "weight_decay": cfg.optimizer.weight_decay,
        "seed": cfg.seed, "wall_time_s": round(wall, 3),
        "overrides": json.dumps(overrides, sort_keys=True, default=float),
    }
    for name, value in dict(m.hparams).items():
        row[f"hp.{name}"] = value
    train_loss = results.get("final_train_loss") if results else None
    eval_loss = results.get("final_eval_loss") if results else None
    finite = all(v is not None and math.isfinite(v) for v in (train_loss, eval_loss))
    row.update(final_train_loss=train_loss if train_loss is not None else "nan",
               final_eval_loss=eval_loss if eval_loss is not None else "nan",
               diverged=0 if finite else 1,
               data_fingerprint=(results or {}).get("data_fingerprint") or "")
    return row


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def run_config(base: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
    cfg = copy.deepcopy(base)
    for key, value in overrides.items():
        config_lib.set_key(cfg, key, value)
    cfg.train.progress = False
    cfg.train.checkpoint_every = cfg.train.steps  # one checkpoint, at the end
    cfg.train.metrics_every = cfg.train.steps + 1  # no per-tensor statistics in sweeps
    return cfg


def run_single(cfg, workdir: pathlib.Path) -> dict:
    """One run via train_and_evaluate; if its loss became non-finite, only the fingerprint of
    the tokens it diverged on (no losses: :func:`make_row` marks it diverged)."""
    try:
        results = train_lib.train_and_evaluate(cfg, str(workdir))
    except train_lib.NonFiniteLossError as e:
        print(f"  diverged: {e}", flush=True)
        return {"data_fingerprint": e.data_fingerprint}
    if results.get("interrupted"):  # not a result: stop the sweep, record no row
        raise KeyboardInterrupt(
            f"run {workdir} stopped by signal {results['signal']} at step {results['steps']} "
            f"of {cfg.train.steps} (checkpointed; rerun the sweep to resume it)")
    return results


def run_batched(cfg, lrs: list[float], wds: list[float]) -> list[dict]:
    """Trains len(lrs) runs that differ only in (η, λ) as one vmapped computation; returns
    per-run {final_train_loss, final_eval_loss} defined exactly as ``train_and_evaluate``'s:
    the last step's train loss and the mean loss over the validation batches at the end.

    ``train.grad_accum_steps`` is ignored here: each step takes the whole batch at once, which
    is the same update (accumulation only trades memory for time, see
    :func:`umup_jax.train.make_grad_fn`) with k times the activation memory."""
    run = train_lib.build_run(cfg, devices=jax.devices()[:1])  # validates cfg first
    boxed = jax.eval_shape(lambda k: {"params": run.model.init(
        k, jnp.zeros((1, run.model_cfg.seq_len), jnp.int32))["params"]}, jax.random.key(0))
    n = len(lrs)
    init = train_lib.make_init_fn(run)
    state0 = init(jax.random.key(cfg.seed))
    states = jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape), state0)
    model = run.model

    def one_step(state, batch, lr, wd):
        tx = make_optimizer(run.opt_cfg, boxed, run.model_cfg.rule, learning_rate=lr,
                            weight_decay=wd)
        loss, grads = jax.value_and_grad(lambda p: model.apply(
            p, batch["inputs"], batch["targets"], method=Decoder.loss))(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, loss

    step = jax.jit(jax.vmap(one_step, in_axes=(0, None, 0, 0)), donate_argnums=(0,))
    evaluate = jax.jit(jax.vmap(lambda p, b: model.apply(p, b["inputs"], b["targets"],
                                                         method=Decoder.loss),
                                in_axes=(0, None)))
    lr_arr = jnp.asarray(lrs, jnp.float32)
    wd_arr = jnp.asarray(wds, jnp.float32)
    it = iter(data_lib.train_dataset(run.tokens.train, run.model_cfg.seq_len,
                                     cfg.train.batch_size, cfg.data.shuffle_seed))
    losses = None
    for _ in range(cfg.train.steps):
        batch = {k: jnp.asarray(v) for k, v in next(it).items()}
        states, losses = step(states, batch, lr_arr, wd_arr)
    valid = data_lib.eval_batches(run.tokens.valid, run.model_cfg.seq_len,
                                  cfg.train.eval_batch_size, cfg.train.eval_batches)
    evals = np.mean([np.asarray(evaluate(states["params"], {k: jnp.asarray(v)
                                                            for k, v in b.items()}))
                     for b in valid], axis=0)
    train_losses = np.asarray(losses)
    return [{"final_train_loss": float(t), "final_eval_loss": float(e),
             "data_fingerprint": run.tokens.fingerprint}
            for t, e in zip(train_losses, evals)]


def _batch_key(overrides: dict) -> str:
    return json.dumps({k: v for k, v in overrides.items() if k not in BATCHABLE},
                      sort_keys=True, default=float)


@dataclasses.dataclass(frozen=True)
class UnitContext:
    """What every unit of a sweep needs besides its members (sent once to each worker)."""

    spec: dict
    config_json: str
    workdir: str


def execute_unit(unit: backends.Unit, context: UnitContext) -> list[dict]:
    """Trains one unit (a batched group, or one run) and returns its results rows.  A
    module-level function so that Ray workers import it by name."""
    base = ml_collections.ConfigDict(json.loads(context.config_json))
    t0 = time.time()
    cfgs = [run_config(base, ov) for _, ov in unit.members]
    if len(unit.members) > 1:
        results = run_batched(cfgs[0], [c.optimizer.learning_rate for c in cfgs],
                              [c.optimizer.weight_decay for c in cfgs])
        wall = (time.time() - t0) / len(unit.members)
        return [make_row(context.spec, g, ov, cfg, res, wall)
                for (g, ov), cfg, res in zip(unit.members, cfgs, results)]
    (g, ov), cfg = unit.members[0], cfgs[0]
    res = run_single(cfg, pathlib.Path(context.workdir) / "runs" / run_id(ov))
    return [make_row(context.spec, g, ov, cfg, res, time.time() - t0)]


def failed_rows(spec, config, unit: backends.Unit, exc: BaseException) -> list[dict]:
    """Rows for a unit that raised: its runs are recorded with the error (one line) and run
    again when the sweep is rerun.

    The run's columns come from its config where that config can be built; where building it
    is what raised (an override the config refuses), the row holds only what is known without
    it (run id, group, seed, overrides, error), so that recording a failure never raises the
    failure again in the driver."""
    error = failures.one_line(exc)
    rows = []
    for g, ov in unit.members:
        try:
            row = make_row(spec, g, ov, run_config(config, ov), None, 0.0)
        except Exception:  # the run's own config is what failed
            row = {"run_id": run_id(ov), "sweep": spec["name"], "group": g,
                   "seed": ov.get("seed", ""),
                   "overrides": json.dumps(ov, sort_keys=True, default=float)}
        row.update(diverged="", error=error)
        rows.append(row)
    return rows


class Runner:
    """Executes lists of runs on a backend, skipping finished ones, batching where shapes
    are shared; writes each unit's rows to ``results.csv`` as it arrives."""

    def __init__(self, spec, config, workdir: pathlib.Path, batched: bool = True,
                 progress: bool = True, total: Optional[int] = None, backend=None):
        self.spec, self.config, self.workdir = spec, config, workdir
        self.store = ResultsStore(workdir, spec, config)
        self.batched = batched
        self.backend = backend or backends.LocalBackend()
        self.context = UnitContext(spec, config.to_json(), str(workdir))
        self._fingerprints: dict[str, Optional[str]] = {}  # data identity → tokens now
        self.bar = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=f"sweep {spec['name']}", unit="run")

    def check_tokens(self, done: list[tuple[str, dict]]) -> None:
        """Refuses (:class:`SweepError`) to reuse finished runs that were trained on other
        tokens than their data config holds now (:func:`umup_jax.data.token_fingerprint`,
        recorded in ``results.csv``): data files changed under the same config would mix two
        corpora in one sweep.  Each distinct data config is loaded once, and only when some
        finished row has a fingerprint (rows from before fingerprints have none and are not
        compared).  Where the data cannot be loaded here (a Ray driver without the workers'
        data), it says so and goes on."""
        groups: dict[str, tuple[Any, list[tuple[str, str]]]] = {}
        for _, ov in done:
            stored = (self.store.get(run_id(ov)) or {}).get("data_fingerprint") or ""
            if not stored:
                continue
            cfg = run_config(self.config, ov)
            key = json.dumps(identity_lib.identity({"data": cfg.data.to_dict()}),
                             sort_keys=True, default=str)
            groups.setdefault(key, (cfg, []))[1].append((run_id(ov), stored))
        for key, (cfg, rows) in groups.items():
            if key not in self._fingerprints:
                try:
                    tokens = data_lib.load_tokens(cfg.data, cache_dir=cfg.data.cache_dir or None)
                    self._fingerprints[key] = tokens.fingerprint
                except data_lib.DataConfigError as e:
                    print(f"note: the data of the finished runs cannot be loaded here ({e}); "
                          "their tokens were not compared with the config's data", flush=True)
                    self._fingerprints[key] = None
            current = self._fingerprints[key]
            stale = sorted({rid for rid, fp in rows if current is not None and fp != current})
            if stale:
                shown = ", ".join(stale[:6]) + (f" (+{len(stale) - 6} more)" if len(stale) > 6
                                                else "")
                old = sorted({fp for rid, fp in rows if fp != current})
                raise SweepError(
                    f"{self.workdir} holds {len(stale)} finished run(s) trained on other tokens "
                    f"than the config's data gives now ({', '.join(old)} in {self.store.path} "
                    f"vs {current}; runs {shown}): the data files changed under the same "
                    "config. Restore the data or use another --workdir"
                )

    def run(self, runs: list[tuple[str, dict]]) -> list[dict]:
        todo = [(g, ov) for g, ov in runs if not self.store.done(run_id(ov))]
        self.check_tokens([(g, ov) for g, ov in runs if self.store.done(run_id(ov))])
        if self.bar is not None:
            self.bar.update(len(runs) - len(todo))
        groups: dict[str, list] = {}
        for g, ov in todo:
            key = _batch_key(ov) if self.batched else run_id(ov)
            groups.setdefault(key, []).append((g, ov))
        units = [backends.Unit(members) for members in groups.values()]
        for unit, outcome in self.backend.run(units, execute_unit, self.context):
            if isinstance(outcome, BaseException):
                # One line on the console; the traceback (for a Ray task, the worker's, in
                # the exception's notes) goes to WORKDIR/error.log.
                where = failures.write_traceback(outcome, self.workdir)
                print(f"  failed: {len(unit.members)} run(s) of group {unit.members[0][0]!r}: "
                      f"{failures.one_line(outcome)}"
                      + (f" (traceback in {where})" if where else ""), flush=True)
                outcome = failed_rows(self.spec, self.config, unit, outcome)
            for row in outcome:
                self.store.add(row)
            if self.bar is not None:
                self.bar.update(len(unit.members))
        return [self.store.get(run_id(ov)) for _, ov in runs]

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.backend.close()


def _best(rows: list[dict], key: str, values: list, seeds: int) -> Any:
    """The value with the lowest final eval loss, averaged over seeds (rows are ordered value
    by value, seeds innermost); a diverged seed makes its value infinitely bad."""
    losses = np.asarray([_loss(r) for r in rows], dtype=float).reshape(len(values), seeds)
    mean = losses.mean(axis=1)
    if np.all(np.isinf(mean)):
        if any(r.get("error") for r in rows):
            raise SweepError(f"every run of the {key} search diverged or failed (see the "
                             "error column of results.csv); fix the failures, or widen or "
                             "lower its values")
        raise SweepError(f"every run of the {key} search diverged; widen or lower its values")
    return values[int(np.argmin(mean))]


def independent_search(spec, config, runner: Runner) -> dict:
    """The three stages of the independent search (spec §6.3); returns the chosen HPs."""
    lr_key = spec["lr"].get("key", "optimizer.learning_rate")
    lr_values = list(spec["lr"]["values"])
    seed_runs = lambda group, ovs: _with_seeds(spec, config, [(group, o) for o in ovs])
    nseeds = len(spec.get("seeds") or [1])
    stage1 = runner.run(seed_runs("lr", [{lr_key: v} for v in lr_values]))
    best_lr = _best(stage1, lr_key, lr_values, nseeds)
    chosen = {lr_key: best_lr}
    best_lr_rows = stage1[lr_values.index(best_lr) * nseeds:(lr_values.index(best_lr) + 1) * nseeds]
    hps = {key: list(values) for key, values in (spec.get("hps") or {}).items()}
    stage2 = [seed_runs(f"hp:{key}", [{lr_key: best_lr, key: v} for v in values])
              for key, values in hps.items()]
    all_rows = runner.run([r for runs in stage2 for r in runs])  # one stage: all at once
    offsets = np.cumsum([0] + [len(runs) for runs in stage2])
    for (key, values), lo, hi in zip(hps.items(), offsets[:-1], offsets[1:]):
        rows = all_rows[lo:hi]
        default = _config_value(config, spec.get("base", {}), key)
        if default not in values:  # the LR stage already measured the default at best_lr
            values, rows = values + [default], rows + best_lr_rows
        chosen[key] = _best(rows, key, values, nseeds)
    runner.run(seed_runs("combined", [dict(chosen)]))
    if spec.get("recheck_lr"):
        rows = runner.run(seed_runs("recheck_lr", [{**chosen, lr_key: v} for v in lr_values]))
        chosen[lr_key] = _best(rows, lr_key, lr_values, nseeds)
    (runner.workdir / "chosen.json").write_text(json.dumps(chosen, indent=2, default=float))
    return chosen


def _config_value(config, base: dict, key: str) -> Any:
    if key in base:
        return base[key]
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def count_runs(spec, config) -> int:
    kind = spec.get("kind", "grid")
    seeds = len(spec.get("seeds") or [1])
    if kind == "grid":
        return len(grid_runs(spec, config))
    if kind == "random":
        return int(spec["num_runs"]) * seeds
    n = len(spec["lr"]["values"]) + sum(len(v) for v in (spec.get("hps") or {}).values()) + 1
    if spec.get("recheck_lr"):
        n += len(spec["lr"]["values"])
    return n * seeds


def run_sweep(config: ml_collections.ConfigDict, spec: dict, workdir: str,
              batched: bool = True, progress: bool = True, backend: str = "local",
              ray_address: Optional[str] = None, gpus_per_task: Optional[float] = None,
              cpus_per_task: float = 1.0) -> list[dict]:
    """Validates the sweep against the config, runs what is missing on ``backend``
    (:mod:`umup_jax.sweep_backends`: ``local`` or ``ray``), returns all rows.

    The independent search keeps its stage order (stage 2 needs stage 1's best LR): stages
    run one after another, the runs of a stage in parallel where the backend allows."""
    spec = dict(spec)
    spec.setdefault("name", "sweep")
    spec.setdefault("kind", "grid")
    validate(spec, config)
    train_lib.check_config(config)
    # The workdir's identity is checked (ResultsStore) before any Ray cluster starts.
    runner = Runner(spec, config, pathlib.Path(workdir), batched=batched, progress=progress,
                    total=count_runs(spec, config))
    try:
        runner.backend = backends.make_backend(backend, ray_address, gpus_per_task,
                                               cpus_per_task)
        if spec["kind"] == "grid":
            runner.run(grid_runs(spec, config))
        elif spec["kind"] == "random":
            runner.run(random_runs(spec, config))
        else:
            independent_search(spec, config, runner)
    finally:
        runner.close()
    return list(runner.store.rows.values())


# ---------------------------------------------------------------------------------------------
# Command line (conventions of umup_jax.cli)
# ---------------------------------------------------------------------------------------------

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The flags of ``python -m umup_jax.sweep`` (defined only when it runs)."""
    cli.define_config_flag(FLAGS)
    flags.DEFINE_string("sweep", None, "The sweep: a .json file, or a .py file with get_sweep().")
    flags.DEFINE_string("workdir", None, "Sweep directory: results.csv, sweep.json, runs/.")
    flags.DEFINE_boolean("batched", True, "Train runs that differ only in learning rate / "
                         "weight decay as one vmapped computation (--nobatched: one by one).")
    flags.DEFINE_boolean("progress", True, "Show a progress bar over runs.")
    flags.DEFINE_enum("backend", "local", list(backends.BACKENDS),
                      "Where units of work run: local (one after another in this process) or "
                      "ray (Ray tasks in parallel; pip install -e '.[ray]').")
    flags.DEFINE_string("ray_address", None, "With --backend=ray: the cluster to join "
                        "(host:port, ray://host:port or auto); default RAY_ADDRESS, else a "
                        "local Ray started in this process.")
    flags.DEFINE_float("gpus_per_task", None, "With --backend=ray: GPUs per task (default 1 "
                       "when the cluster has GPUs, else 0).")
    flags.DEFINE_float("cpus_per_task", 1.0, "With --backend=ray: CPUs per task.")
    flags.mark_flags_as_required(["config", "sweep", "workdir"])


def _ray_logs_to_run_log() -> None:
    """Ray logs through its own stderr handler, set up when it is imported; hand its records
    to the root logger instead, which :func:`umup_jax.failures.log_to_workdir` sends to
    ``WORKDIR/run.log``, so that the console holds this command's lines only."""
    import logging as std_logging

    try:
        import ray  # noqa: F401  (sets up the "ray" logger)
    except ImportError:
        return  # RayBackend says how to install it
    ray_logger = std_logging.getLogger("ray")
    for handler in list(ray_logger.handlers):
        ray_logger.removeHandler(handler)
    ray_logger.propagate = True


def main() -> None:
    """Exit status 0 when every run finished (diverged runs included: divergence is a result),
    2 for bad input (:mod:`umup_jax.cli`), 1 when the sweep itself failed or any run failed;
    a failure ends with one ``python -m umup_jax.sweep: error: …`` line, its traceback in
    ``WORKDIR/error.log`` and library logging in ``WORKDIR/run.log`` (:mod:`umup_jax.failures`)."""
    config = FLAGS.config
    with cli.usage_errors():
        train_lib.check_config(config)
        spec = load_sweep(FLAGS.sweep)
        validate(spec, config)
    workdir = pathlib.Path(FLAGS.workdir)
    failures.log_to_workdir(workdir, logging.get_absl_logger().getEffectiveLevel())
    if FLAGS.backend == "ray":
        _ray_logs_to_run_log()
    with failures.exit_on_failure(workdir):
        with cli.usage_errors():  # a workdir of another sweep, a bad --ray_address: exit 2
            rows = run_sweep(config, spec, FLAGS.workdir, batched=FLAGS.batched,
                             progress=FLAGS.progress, backend=FLAGS.backend,
                             ray_address=FLAGS.ray_address, gpus_per_task=FLAGS.gpus_per_task,
                             cpus_per_task=FLAGS.cpus_per_task)
    results = workdir / "results.csv"
    print(f"{len(rows)} runs in {results}", flush=True)
    failed = sum(1 for r in rows if r.get("error"))
    if failed:
        print(f"{cli.program_name()}: error: {failed} of {len(rows)} runs failed; their errors "
              f"are in the error column of {results} (tracebacks in "
              f"{workdir / failures.ERROR_LOG}); fix them and rerun the same command, which "
              "runs only the failed and missing runs", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    define_flags()
    entry, parse = cli.app_main(main, FLAGS)
    app.run(entry, flags_parser=parse)
