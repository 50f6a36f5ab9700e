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


def _events(logdir):
    """Every TensorBoard event in ``logdir``'s event files, file by file (TFRecord framing:
    length, its CRC, the record, its CRC)."""
    import struct

    from tensorboardX.proto import event_pb2

    files = sorted(logdir.iterdir())  # events.out.tfevents.<second>.<host>.<nanosecond>
    out = []
    for path in files:
        data, i, events = path.read_bytes(), 0, []
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[i + 12:i + 12 + n])
            events.append(event)
            i += 12 + n + 4
        out.append(events)
    return out


def test_a_run_resumed_from_an_older_checkpoint_supersedes_the_rows_it_redoes(tmp_path):
    """Killed after step 7 with its newest checkpoint at step 5: the resumed run redoes steps
    5 on.  The first attempt's rows stay in the file, but readers see the train and stats
    rows of steps < 5 and the evaluation at 5 from it, and everything after from the resumed
    run; a second resume from step 3 supersedes the rows of both after it.  TensorBoard's
    event file of each resumed run starts with a purge at its step and repeats the
    evaluation there."""
    path = tmp_path / "metrics.jsonl"
    writer = MetricsWriter(tmp_path)  # the first attempt: evaluations at 0 and 5, stats 0, 5
    writer.write(0, "eval", {"loss": 9.0})
    for step in range(8):
        writer.write(step, "train", {"loss": 10.0 + step})
        if step % 5 == 0:
            writer.write(step, "stats", {"rms": 100.0 + step})
        if (step + 1) % 5 == 0:
            writer.write(step + 1, "eval", {"loss": 8.0})
    writer.close()

    writer = MetricsWriter(tmp_path, resumed_at=5)  # the resumed run: steps 5, 6
    writer.write(5, "config_change", {"key": "train.steps", "old": 8, "new": 20})
    for step in (5, 6):
        writer.write(step, "train", {"loss": 20.0 + step})
    writer.write(5, "stats", {"rms": 200.0})
    writer.close()

    def losses(kind="train", field="loss"):
        return {r["step"]: r[field] for r in read_metrics(path, kind)}

    assert losses() == {0: 10.0, 1: 11.0, 2: 12.0, 3: 13.0, 4: 14.0, 5: 25.0, 6: 26.0}
    assert losses("eval") == {0: 9.0, 5: 8.0}
    assert losses("stats", "rms") == {0: 100.0, 5: 200.0}
    assert [r["key"] for r in read_metrics(path, "config_change")] == ["train.steps"]
    assert len(path.read_text().splitlines()) == 1 + 8 + 2 + 1 + 1 + 1 + 2 + 1  # nothing lost

    writer = MetricsWriter(tmp_path, resumed_at=3)  # again, from an older checkpoint still
    writer.write(3, "train", {"loss": 33.0})
    writer.close()
    assert losses() == {0: 10.0, 1: 11.0, 2: 12.0, 3: 33.0}
    assert losses("eval") == {0: 9.0} and losses("stats", "rms") == {0: 100.0}
    assert read_metrics(path, "config_change") == []  # the superseded run's own change

    first, second, third = _events(tmp_path / "tensorboard")
    assert not any(e.HasField("session_log") for e in first)
    for events, at, first_scalar in ((second, 5, (5, "eval/loss", 8.0)),  # 5's, again
                                     (third, 3, (3, "train/loss", 33.0))):  # none at 3
        purges = [i for i, e in enumerate(events) if e.HasField("session_log")]
        assert len(purges) == 1 and events[purges[0]].step == at
        assert events[purges[0]].session_log.status == events[purges[0]].session_log.START
        scalars = [(i, (e.step, v.tag, v.simple_value))
                   for i, e in enumerate(events) for v in e.summary.value]
        assert scalars[0][0] > purges[0] and scalars[0][1] == first_scalar


def test_rows_at_the_resume_step_are_superseded_even_before_the_resumed_run_logs_them(tmp_path):
    """A ``resume`` row at s drops the earlier train and stats rows of steps >= s (module
    docstring), not only those the resumed run writes again: killed right after resuming
    from step 2 (or logging less often), the first attempt's step-2 row is gone all the same.
    The evaluation at s stays (it measured the checkpointed state)."""
    path = tmp_path / "metrics.jsonl"
    writer = MetricsWriter(tmp_path)
    for step in range(4):
        writer.write(step, "train", {"loss": 10.0 + step})
        writer.write(step, "stats", {"rms": 1.0})
    writer.write(2, "eval", {"loss": 9.0})
    writer.close()
    MetricsWriter(tmp_path, resumed_at=2).close()  # killed before its first step
    assert [r["step"] for r in read_metrics(path, "train")] == [0, 1]
    assert [r["step"] for r in read_metrics(path, "stats")] == [0, 1]
    assert [r["step"] for r in read_metrics(path, "eval")] == [2]


def test_without_resume_rows_the_last_row_of_a_step_wins(tmp_path):
    """A file written before ``resume`` rows existed holds a resumed run's repeated steps
    after the first attempt's: the last row of each step is the one read."""
    path = tmp_path / "metrics.jsonl"
    rows = [(0, 1.0), (1, 2.0), (2, 3.0), (1, 20.0), (2, 30.0)]
    path.write_text("".join(json.dumps({"step": s, "kind": "train", "loss": v}) + "\n"
                            for s, v in rows))
    assert [(r["step"], r["loss"]) for r in read_metrics(path, "train")] == [
        (0, 1.0), (1, 20.0), (2, 30.0)]
