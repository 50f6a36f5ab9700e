"""Metrics: per-tensor RMS statistics and a writer to JSONL and TensorBoard event files.

Only process 0 writes.  ``metrics.jsonl`` gets one JSON object per line, ``{"step": …, "kind":
"train" | "eval" | "stats" | "config_change" | "resume", …}``; the same scalars go to TensorBoard
under ``kind/name``.  ``train`` and ``stats`` rows are numbered by the step's index (the step
from the state after ``step`` steps), ``eval`` rows by the steps done before the evaluation.

A run resumed from a checkpoint older than its last logged step (after a ``kill -9``, or past a
damaged newest checkpoint) redoes the steps after the checkpoint.  The rows the first attempt
logged for them stay in the file (nothing is deleted), after them the resumed run writes a
``{"step": s, "kind": "resume"}`` row, s being the checkpoint's step, and :func:`read_metrics`
drops the rows before it that the resumed run supersedes: ``train`` and ``stats`` rows of steps
≥ s and ``eval`` rows after s (the evaluation at s measured the checkpointed state).
TensorBoard gets the same view: the resumed run's event file starts with a purge at step s
(TensorBoard hides the earlier files' events at steps ≥ s) and repeats the evaluation at s.
"""

from __future__ import annotations

import json
import math
import pathlib
import time
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp


def tree_rms(tree: Any, prefix: str) -> dict[str, jax.Array]:
    """{'prefix/path/to/leaf': RMS} for every array leaf (fp32 accumulation).  The tuple
    index that Flax's ``sow`` adds to each recorded activation is dropped from the name."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if path and isinstance(path[-1], jax.tree_util.SequenceKey) and path[-1].idx == 0:
            path = path[:-1]
        name = "/".join(_key_name(k) for k in path)
        x = jnp.asarray(leaf, jnp.float32)
        out[f"{prefix}/{name}"] = jnp.sqrt(jnp.mean(jnp.square(x)))
    return out


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf
    return value


NON_FINITE_NAMES = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float, inside dicts, lists and tuples too, written as
    the string ``"nan"``, ``"inf"`` or ``"-inf"``, as ``metrics.jsonl`` writes them: strict
    JSON has no NaN or Infinity literal (``json.dumps`` would write ``NaN``, which
    ``JSON.parse``, ``jq`` and most non-Python readers refuse).  ``float(s)`` reads them back."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return _clean(value)


def revive_non_finite(row: Mapping[str, Any]) -> dict:
    """``row`` (a dict read from JSON) with its top-level ``"nan"``/``"inf"``/``"-inf"``
    strings made floats again: the inverse of :func:`json_safe` for a flat record such as
    ``results.json`` (nested values, e.g. its ``config``, are left as they were written)."""
    return {k: NON_FINITE_NAMES[v] if isinstance(v, str) and v in NON_FINITE_NAMES else v
            for k, v in row.items()}


def _ends_mid_line(path: pathlib.Path) -> bool:
    """Whether the non-empty file ``path`` does not end with a newline."""
    with open(path, "rb") as f:
        if f.seek(0, 2) == 0:
            return False
        f.seek(-1, 2)
        return f.read(1) != b"\n"


# Rows numbered by a step's index, which a run resumed from checkpoint s redoes from s on.
STEP_INDEXED_KINDS = ("train", "stats")


class MetricsWriter:
    """Appends rows to ``workdir/metrics.jsonl`` and TensorBoard event files; ``resumed_at``:
    the checkpoint step a resumed run starts from (module docstring)."""

    def __init__(self, workdir: pathlib.Path, enabled: bool = True,
                 resumed_at: Optional[int] = None):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        workdir.mkdir(parents=True, exist_ok=True)
        path = workdir / "metrics.jsonl"
        kept_evals = ([r for r in read_metrics(path, "eval") if r["step"] == resumed_at]
                      if resumed_at is not None and path.exists() else [])
        self._jsonl = open(path, "a", encoding="utf-8")
        if _ends_mid_line(path):  # a killed run's last row, cut short: end it, so that the
            self._jsonl.write("\n")  # first row appended on resume is a line of its own
            self._jsonl.flush()
        if resumed_at is not None:
            self._jsonl.write(json.dumps({"step": int(resumed_at), "kind": "resume"}) + "\n")
            self._jsonl.flush()
        try:
            from tensorboardX import SummaryWriter

            # tensorboardX names the file by the second it was opened and opens it "wb": a
            # run resumed within the same second would truncate the first one's events.
            self._tb = SummaryWriter(logdir=str(workdir / "tensorboard"),
                                     purge_step=resumed_at,
                                     filename_suffix=f".{time.time_ns() % 10**9:09d}")
        except ImportError:  # pragma: no cover - tensorboardX is a dependency
            self._tb = None
        for row in kept_evals:  # the purge hid it: the evaluation at the checkpoint's step
            self._scalars(resumed_at, "eval", row)

    def write(self, step: int, kind: str, values: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), "kind": kind}
        row.update({k: _clean(float(v)) if _is_number(v) else v for k, v in values.items()})
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        self._scalars(step, kind, values)

    def _scalars(self, step: int, kind: str, values: Mapping[str, Any]) -> None:
        if self._tb is not None:
            for k, v in values.items():
                if k not in ("step", "kind") and _is_number(v) and math.isfinite(float(v)):
                    self._tb.add_scalar(f"{kind}/{k}", float(v), int(step))

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None


def _is_number(v: Any) -> bool:
    try:
        float(v)
        return not isinstance(v, (str, bool))
    except (TypeError, ValueError):
        return False


def read_metrics(path: pathlib.Path | str, kind: str = "train") -> list[dict]:
    """Rows of ``kind`` from a metrics.jsonl, without those a resumed run superseded (module
    docstring); ``train``, ``eval`` and ``stats`` rows one per step (the last row wins: in a
    file written before ``resume`` rows, a resumed run's repeated steps), sorted by step,
    other kinds (``config_change``) every row in file order."""
    rows: list[dict] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a killed run
                continue
            if row.get("kind") == "resume":
                at = row["step"]
                rows = [r for r in rows if r["step"] < at
                        or (r["step"] == at and kind not in STEP_INDEXED_KINDS)]
            elif row.get("kind") == kind:
                rows.append(row)
    if kind not in (*STEP_INDEXED_KINDS, "eval"):
        return rows
    by_step = {r["step"]: r for r in rows}
    return [by_step[s] for s in sorted(by_step)]
