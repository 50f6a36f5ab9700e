"""Independent search for u-μP against random search for μP at equal run counts
(u-μP paper Fig. 1a, spec §6.3).

u-μP: an LR line search with every α at 1, then a 1-D search per α at the best LR, then one
run combining the best values.  μP: random search over (η, σ_init, α_emb, α_attn, α_output,
η̂_emb), log2-uniform on the paper's ranges (spec §0.1), with as many runs as u-μP used.

    python experiments/independent_search.py [--steps=150] [--width=64]
        [--out=experiments/results/independent_search]

Writes ``OUT/best_vs_runs.csv`` (best validation loss so far against runs spent, for both)
and ``OUT/best_vs_runs.png``; each search's ``results.csv`` is under ``OUT/umup`` / ``OUT/mup``.
"""

import argparse
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from umup_jax import analysis  # noqa: E402
from umup_jax import config as config_lib  # noqa: E402
from umup_jax import sweep as sweep_lib  # noqa: E402

ALPHAS = [0.5, 2.0]  # each α's 1-D search around its default 1 (measured in the LR stage)


def base(parametrization: str, width: int, steps: int):
    cfg = config_lib.proxy_config(parametrization, (
        f"smoke,model.width={width},model.num_heads={max(width // 32, 1)},model.depth=2,"
        f"model.seq_len=64,train.batch_size=16,train.steps={steps},train.eval_batch_size=16,"
        f"train.eval_batches=8,optimizer.warmup_steps={steps // 6}"))
    if parametrization == "mup":
        cfg.model.hparams.base_width = width
    return cfg


def umup_spec() -> dict:
    return {
        "name": "umup_independent", "kind": "independent",
        "lr": {"values": [2.0**k for k in range(-2, 4)]},
        "hps": {f"model.hparams.{h}": ALPHAS for h in
                ("attn_mult", "ffn_act_mult", "residual_mult", "residual_attn_ratio",
                 "loss_softmax_mult")},
    }


def mup_spec(num_runs: int) -> dict:
    # The paper's μP ranges; σ_init is relative to our default 0.02.
    space = {
        "optimizer.learning_rate": {"log2_uniform": [-10, -6]},
        "model.hparams.emb_lr_mult": {"log2_uniform": [0, 8]},
        "model.hparams.init_std": {"log2_uniform": [-2, 2], "scale": 0.02},
        "model.hparams.emb_mult": {"log2_uniform": [-2, 2]},
        "model.hparams.attn_mult": {"log2_uniform": [-2, 2]},
        "model.hparams.output_mult": {"log2_uniform": [-2, 2]},
    }
    return {"name": "mup_random", "kind": "random", "space": space, "num_runs": num_runs,
            "seed": 0}


def best_so_far(rows: list[dict]) -> list[float]:
    losses = [analysis.run_loss(r) for r in rows]
    return list(np.minimum.accumulate(losses))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--out", default="experiments/results/independent_search")
    args = p.parse_args()
    out = pathlib.Path(args.out)
    u_spec = umup_spec()
    u_cfg = base("umup", args.width, args.steps)
    n_runs = sweep_lib.count_runs(u_spec, u_cfg)
    sweep_lib.run_sweep(u_cfg, u_spec, str(out / "umup"))
    sweep_lib.run_sweep(base("mup", args.width, args.steps), mup_spec(n_runs), str(out / "mup"))
    # Runs in the order they were spent (the CSV is appended as runs finish).
    u_rows = analysis.read_results(out / "umup" / "results.csv")
    m_rows = analysis.read_results(out / "mup" / "results.csv")
    u_best, m_best = best_so_far(u_rows), best_so_far(m_rows)
    table = [{"runs": i + 1, "umup_independent_best": u, "mup_random_best": m}
             for i, (u, m) in enumerate(zip(u_best, m_best))]
    analysis.write_csv(table, out / "best_vs_runs.csv")
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=120)
    ax.plot(range(1, len(u_best) + 1), u_best, "o-", ms=3, label="u-μP independent search")
    ax.plot(range(1, len(m_best) + 1), m_best, "s-", ms=3, label="μP random search")
    ax.set_xlabel("runs spent")
    ax.set_ylabel("best validation loss so far")
    ax.set_title(f"HP search at width {args.width}, {args.steps} steps")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "best_vs_runs.png")
    lr_stage = [r for r in u_rows if r["group"] == "lr"]
    print(f"{n_runs} runs each. u-μP: best after its LR search ({len(lr_stage)} runs) "
          f"{min(best_so_far(lr_stage)):.4f}, after all {u_best[-1]:.4f}; "
          f"μP random search: {m_best[-1]:.4f}")
    print(f"wrote {out / 'best_vs_runs.csv'} and {out / 'best_vs_runs.png'}")


if __name__ == "__main__":
    main()
