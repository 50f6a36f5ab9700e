"""Plots a run's train and eval loss from its metrics.jsonl.

    python experiments/plot_run.py --workdir=DIR [--out=DIR/loss.png] [--title=...]
"""

import argparse
import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from umup_jax.metrics import read_metrics  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", default=None)
    p.add_argument("--title", default=None)
    args = p.parse_args()
    workdir = pathlib.Path(args.workdir)
    for name in ("metrics.jsonl", "results.json"):
        if not (workdir / name).is_file():
            p.error(f"--workdir={args.workdir} has no {name}: give the directory of a run "
                    "(python -m umup_jax.main --workdir=DIR) that has finished or stopped")
    train = read_metrics(workdir / "metrics.jsonl", "train")
    evals = read_metrics(workdir / "metrics.jsonl", "eval")
    results = json.loads((workdir / "results.json").read_text())
    cfg = results["config"]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1, label="train (per step)")
    ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    m = cfg["model"]
    ax.set_title(args.title or (
        f"{m['parametrization']} width {m['width']} depth {m['depth']}, "
        f"{results['tokens_seen']:,} tokens, {results['wall_time_s']:.0f} s"))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = pathlib.Path(args.out) if args.out else workdir / "loss.png"
    fig.savefig(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
