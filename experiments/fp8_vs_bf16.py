"""u-μP vs μP trained in BF16 and in FP8 (``paper_simple``: every linear's inputs cast to
E4M3, gradients to E5M2, un-scaled) on the bundled corpus at CPU scale (u-μP paper §4.4).

    python experiments/fp8_vs_bf16.py [--steps=400] [--out=experiments/results/fp8_vs_bf16]

Writes ``OUT/fp8_vs_bf16.csv`` (final train/eval loss, mean saturation and underflow fractions
of the forward (x, w) and backward (g) casts), ``OUT/fp8_vs_bf16.png`` (loss curves) and each
run's ``metrics.jsonl``/``results.json`` under ``OUT/runs/``.  Compute dtype bf16 for all four.
"""

import argparse
import csv
import pathlib
import shutil
import tempfile

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from umup_jax import config as config_lib  # noqa: E402
from umup_jax import train as train_lib  # noqa: E402
from umup_jax.metrics import read_metrics  # noqa: E402

RUNS = [("umup", "none"), ("umup", "paper_simple"), ("mup", "none"), ("mup", "paper_simple")]
# The learning rates the committed results were made with (u-μP: 2^1.5, inside the paper's
# range; μP: the centre of its range), pinned so the table reproduces whatever the config
# defaults become.
LEARNING_RATES = {"umup": 2.0**1.5, "mup": 2.0**-8}


def run_config(parametrization: str, preset: str, steps: int):
    cfg = config_lib.proxy_config(parametrization, "cpu")
    cfg.train.steps = steps
    cfg.train.eval_every = max(steps // 4, 1)
    cfg.train.metrics_every = max(steps // 8, 1)
    cfg.train.checkpoint_every = steps
    cfg.train.log_every = 1
    cfg.train.progress = False
    cfg.optimizer.warmup_steps = max(steps // 6, 1)
    cfg.model.dtype = "bfloat16"
    cfg.model.fp8 = preset
    cfg.optimizer.learning_rate = LEARNING_RATES[parametrization]
    if parametrization == "mup":
        cfg.model.hparams.base_width = cfg.model.width  # m = 1: SP's weights, μP's 1/d_head attention
    return cfg


def cast_summary(stats_rows):
    def mean(suffix):
        vals = [v for row in stats_rows for k, v in row.items()
                if k.startswith("fp8/") and k.endswith(suffix)]
        return float(np.mean(vals)) if vals else float("nan")

    return {f"{w}_{s}": mean(f"/{w}_{s}") for w in ("x", "w", "g")
            for s in ("saturated", "underflow")}


def plot(out: pathlib.Path, curves: dict) -> None:
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    styles = {"umup_bf16": ("C0", "-"), "umup_fp8": ("C0", "--"),
              "mup_bf16": ("C3", "-"), "mup_fp8": ("C3", "--")}
    for name, (x, y) in curves.items():
        color, ls = styles[name]
        k = max(1, min(10, len(y) // 20))  # smooth over ~5% of the logged points
        smooth = np.convolve(y, np.ones(k) / k, mode="valid")
        ax.plot(x[len(x) - len(smooth):], smooth, color=color, ls=ls,
                label=name.replace("umup", "u-μP").replace("mup", "μP").replace("_", " "))
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (smoothed)")
    ax.set_title("FP8 (paper_simple, un-scaled casts) vs BF16, width 128, depth 2")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "fp8_vs_bf16.png")


def curves_from_runs(out: pathlib.Path) -> dict:
    curves = {}
    for parametrization, preset in RUNS:
        name = f"{parametrization}_{'fp8' if preset != 'none' else 'bf16'}"
        train = read_metrics(out / "runs" / name / "metrics.jsonl", "train")
        curves[name] = ([r["step"] for r in train], [r["loss"] for r in train])
    return curves


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--out", default="experiments/results/fp8_vs_bf16")
    p.add_argument("--plot-only", action="store_true", help="redraw the PNG from OUT/runs")
    args = p.parse_args()
    out = pathlib.Path(args.out)
    if args.plot_only:
        plot(out, curves_from_runs(out))
        return
    (out / "runs").mkdir(parents=True, exist_ok=True)
    rows, curves = [], {}
    for parametrization, preset in RUNS:
        name = f"{parametrization}_{'fp8' if preset != 'none' else 'bf16'}"
        print(f"== {name}", flush=True)
        cfg = run_config(parametrization, preset, args.steps)
        with tempfile.TemporaryDirectory() as workdir:
            results = train_lib.train_and_evaluate(cfg, workdir)
            run_dir = out / "runs" / name
            run_dir.mkdir(parents=True, exist_ok=True)
            for f in ("metrics.jsonl", "results.json"):
                shutil.copy(pathlib.Path(workdir) / f, run_dir / f)
        train = read_metrics(run_dir / "metrics.jsonl", "train")
        curves[name] = ([r["step"] for r in train], [r["loss"] for r in train])
        # In the BF16 runs the same casts are not applied, so there is nothing to count.
        casts = cast_summary(read_metrics(run_dir / "metrics.jsonl", "stats"))
        rows.append({"run": name, "parametrization": parametrization, "fp8": preset,
                     "lr": cfg.optimizer.learning_rate, "steps": args.steps,
                     "final_train_loss": results["final_train_loss"],
                     "final_eval_loss": results["final_eval_loss"],
                     "wall_time_s": round(results["wall_time_s"], 1), **casts})
    with open(out / "fp8_vs_bf16.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(out, curves)
    for r in rows:
        print(f"{r['run']:10s} train {r['final_train_loss']:.4f} eval {r['final_eval_loss']:.4f} "
              f"x_under {r['x_underflow']:.4f} w_under {r['w_underflow']:.4f} "
              f"g_under {r['g_underflow']:.4f}")
    print(f"wrote {out / 'fp8_vs_bf16.csv'} and {out / 'fp8_vs_bf16.png'}")


if __name__ == "__main__":
    main()
