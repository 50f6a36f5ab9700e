"""experiments/bench_compile.py (scan vs the unrolled loop's compile time, issue 11's
target) on a tiny shape: its table, and ``--target h100`` compiled ahead of time."""

import csv
import importlib.util
import sys
from pathlib import Path

import pytest

from umup_jax import gpu_target

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--depth", "2", "--width", "32", "--heads", "2", "--seq", "16", "--batch", "2",
        "--vocab", "64", "--rounds", "1"]


@pytest.fixture(scope="module")
def bench():
    sys.path.append(str(ROOT / "experiments"))
    spec = importlib.util.spec_from_file_location("bench_compile",
                                                  ROOT / "experiments" / "bench_compile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(path: Path) -> list[dict]:
    with open(path / "bench_compile.csv") as f:
        return list(csv.DictReader(f))


def _check_table(rows, ratios, target, dtype, remats):
    assert [(r["remat"], r["layout"]) for r in rows] == [
        (remat, layout) for remat in remats for layout in ("loop", "scan")]
    for row in rows:
        assert (row["target"], row["dtype"], row["depth"]) == (target, dtype, "2")
        assert float(row["total_s"]) == pytest.approx(
            float(row["trace_lower_s"]) + float(row["compile_s"]), abs=2e-3)
        assert float(row["compile_s"]) > 0
    for remat in remats:
        loop, scan = (next(r for r in rows if (r["remat"], r["layout"]) == (remat, layout))
                      for layout in ("loop", "scan"))
        assert ratios[remat] == pytest.approx(float(scan["total_s"]) / float(loop["total_s"]),
                                              rel=5e-3)
        assert float(scan["scan_over_loop"]) == float(loop["scan_over_loop"]) == pytest.approx(
            ratios[remat], abs=1e-4)


def test_cpu_table(bench, tmp_path, capsys):
    """One round per layout and remat policy: the medians' table (trace + lower and XLA
    compile seconds, their sum, scan / loop per policy) and the printed verdict."""
    ratios = bench.main(TINY + ["--out", str(tmp_path)])
    _check_table(_rows(tmp_path), ratios, "cpu", "float32", ["none", "full"])
    out = capsys.readouterr().out
    assert "compiling for this machine's first device, cpu;" in out
    assert "remat=none: scan / loop compile time" in out and "(target <= 0.25:" in out


def test_bad_arguments_are_refused(bench):
    with pytest.raises(SystemExit):
        bench.main(TINY + ["--rounds", "0"])
    with pytest.raises(SystemExit):
        bench.main(TINY + ["--target", "tpu"])


@pytest.mark.skipif(gpu_target.cuda_plugin_on_path(),
                    reason="JAX's CUDA plugin is on the path here")
def test_h100_target_without_the_plugin_says_what_to_install(bench):
    with pytest.raises(SystemExit, match="jax-cuda13-plugin"):
        bench.main(TINY + ["--target", "h100"])


@pytest.mark.gpu_aot
def test_h100_table(bench, tmp_path):
    """``--target h100``: the same steps compiled by XLA's GPU compiler for an abstract H100,
    in bf16 by default."""

    try:
        gpu_target.h100_sharding()
    except gpu_target.GpuTargetUnavailable as e:
        pytest.skip(str(e))
    ratios = bench.main(TINY + ["--target", "h100", "--remat", "none", "--out", str(tmp_path)])
    _check_table(_rows(tmp_path), ratios, "h100", "bfloat16", ["none"])
