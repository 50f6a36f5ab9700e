"""experiments/width_transfer.py --verify: one retrained run per parametrization reproduces the
sweep's rows (batched there, separate here), and a changed row is reported."""

import csv
import importlib.util
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("width_transfer",
                                               ROOT / "experiments" / "width_transfer.py")
W = sys.modules.setdefault("width_transfer", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(W)


def test_verify_reproduces_the_sweep_and_reports_a_changed_row(tmp_path, monkeypatch):
    monkeypatch.setattr(W, "LR_GRIDS", {"umup": [-1, 0]})
    W.run(tmp_path, steps=12, widths=[16, 32], n_lrs=2, progress=False)
    (checked,) = W.verify(tmp_path, width=32)
    assert checked["parametrization"] == "umup" and checked["lr"] == 0.5 and checked["ok"]
    assert checked["final_eval_loss_rel"] <= 1e-5 and checked["final_train_loss_rel"] <= 1e-5
    # The committed row's validation loss 1% off: reported, not ok.
    path = tmp_path / "umup" / "results.csv"
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)
    for row in rows:
        if row["width"] == "32" and float(row["lr"]) == 0.5:
            row["final_eval_loss"] = repr(float(row["final_eval_loss"]) * 1.01)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    (changed,) = W.verify(tmp_path, width=32)
    assert not changed["ok"] and changed["final_eval_loss_rel"] == pytest.approx(0.01 / 1.01,
                                                                                 rel=1e-3)
    with pytest.raises(SystemExit, match=r"has no run at width 64 \(widths: \[16, 32\]\)"):
        W.verify(tmp_path, width=64)
