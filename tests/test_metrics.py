"""metrics.jsonl across a kill: a row cut short does not swallow the next one written; non-finite
numbers written as strict JSON and read back."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from umup_jax.metrics import MetricsWriter, json_safe, read_metrics, revive_non_finite


def test_a_row_cut_short_by_a_kill_does_not_swallow_the_resumed_runs_first_row(tmp_path):
    writer = MetricsWriter(tmp_path)
    writer.write(0, "train", {"loss": 5.0})
    writer.write(1, "train", {"loss": 4.0})
    writer.close()
    path = tmp_path / "metrics.jsonl"
    text = path.read_text()
    path.write_text(text[:-7])  # the kill: the step-1 row half written, no newline
    writer = MetricsWriter(tmp_path)  # the resumed run
    writer.write(1, "config_change", {"key": "train.log_every", "old": 1, "new": 2})
    writer.write(1, "train", {"loss": 4.0})
    writer.close()
    assert [r["step"] for r in read_metrics(path, "train")] == [0, 1]
    assert read_metrics(path, "config_change")[0]["key"] == "train.log_every"
    lines = path.read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[-1])["loss"] == 4.0


def test_an_intact_file_gets_no_blank_line(tmp_path):
    for step, loss in enumerate((5.0, 4.0)):
        writer = MetricsWriter(tmp_path)
        writer.write(step, "train", {"loss": loss})
        writer.close()
    assert (tmp_path / "metrics.jsonl").read_text().count("\n\n") == 0
    assert [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [5.0, 4.0]


def test_non_finite_numbers_are_strict_json_strings_and_come_back_as_floats():
    record = {"mfu": float("nan"), "loss": float("inf"), "low": -math.inf, "x": np.float64("nan"),
              "ok": 1.5, "steps": 3, "name": "cpu", "none": None, "flag": True,
              "config": {"lr": float("nan"), "widths": [64, float("inf")], "pair": (1.0, -math.inf)}}
    text = json.dumps(json_safe(record), allow_nan=False)  # raises on any NaN/Infinity left
    back = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in {text}"))
    assert back["mfu"] == "nan" and back["loss"] == "inf" and back["low"] == "-inf"
    assert back["config"] == {"lr": "nan", "widths": [64, "inf"], "pair": [1.0, "-inf"]}
    revived = revive_non_finite(back)
    assert math.isnan(revived["mfu"]) and math.isnan(revived["x"])
    assert revived["loss"] == math.inf and revived["low"] == -math.inf
    assert {k: revived[k] for k in ("ok", "steps", "name", "none", "flag")} == {
        "ok": 1.5, "steps": 3, "name": "cpu", "none": None, "flag": True}
    assert revived["config"] == back["config"]  # nested values stay as written
    assert json_safe(record)["ok"] is record["ok"] and json_safe([1, 2]) == [1, 2]
