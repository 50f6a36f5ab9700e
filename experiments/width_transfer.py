"""Width transfer of the learning rate: SP, μP and u-μP on the bundled corpus at CPU scale
(the u-μP paper's Fig. 1b, spec §9).

For each parametrization: an LR grid in octaves × widths 32, 64, 128, 256 (8×; head_dim 32,
so heads grow with width; depth 2), byte tokens, seq 64, batch 16, warm-up then cosine to 10%.
Every (parametrization, width) trains its 8 learning rates as one vmapped computation.

    python experiments/width_transfer.py [--steps=240] [--out=experiments/results/width_transfer]
    python experiments/width_transfer.py --small   # a 2-minute version (the notebook's rerun)
    python experiments/width_transfer.py --verify  # 3 runs against the committed table
    python experiments/width_transfer.py --backend=ray [--ray_address=HOST:PORT]
        [--gpus_per_task=1]   # each (parametrization, width) group a Ray task (BUILD.md)

``--backend``, ``--ray_address`` and ``--gpus_per_task`` are passed to
:func:`umup_jax.sweep.run_sweep` as ``python -m umup_jax.sweep`` passes its flags of the same
names: with ``ray`` the 4 width groups of each parametrization run in parallel (one task per GPU
by default; the parametrizations one after another, each sweep starting its own local Ray unless
``--ray_address`` names a cluster), with the same rows as ``local``.

Writes ``OUT/results.csv`` (one row per run), ``OUT/optima.csv`` (optimal log2 LR per width,
with an edge flag), ``OUT/transfer.json`` (transfer error per parametrization, Algorithm 1 with
width as the fixed HP: both f* = global argmin and f* = the largest width) and
``OUT/width_transfer.png``.  Rerunning skips finished runs.
"""

import argparse
import json
import pathlib
import time
from typing import Optional

import numpy as np

from umup_jax import analysis
from umup_jax import config as config_lib
from umup_jax import sweep as sweep_lib
from umup_jax import sweep_backends as backends

WIDTHS = [32, 64, 128, 256]
HEAD_DIM = 32
LR_GRIDS = {  # log2 learning rates, octaves
    "umup": list(range(-3, 5)),
    "mup": list(range(-11, -3)),
    "sp": list(range(-11, -3)),
}
SMALL = {"widths": [16, 32, 64, 128], "steps": 60, "lrs": 5}


def base_config(parametrization: str, steps: int, base_width: int):
    arg = (f"smoke,model.depth=2,model.seq_len=64,train.batch_size=16,train.steps={steps},"
           f"train.eval_batch_size=16,train.eval_batches=8,optimizer.warmup_steps={steps // 6}")
    cfg = config_lib.proxy_config(parametrization, arg)
    if parametrization == "mup":
        cfg.model.hparams.base_width = base_width  # μP's weights match SP's at the smallest width
    return cfg


def run(out: pathlib.Path, steps: int, widths: list[int], n_lrs: int, progress: bool = True,
        backend: str = "local", ray_address: Optional[str] = None,
        gpus_per_task: Optional[float] = None):
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    all_rows = []
    for parametrization, grid in LR_GRIDS.items():
        if n_lrs < len(grid):  # the centre of the grid
            start = (len(grid) - n_lrs) // 2
            grid = grid[start:start + n_lrs]
        spec = {
            "name": f"width_transfer_{parametrization}",
            "kind": "grid",
            "grid": {
                "model.width+model.num_heads": [[w, max(w // HEAD_DIM, 1)] for w in widths],
                "optimizer.learning_rate": [2.0**k for k in grid],
            },
        }
        cfg = base_config(parametrization, steps, widths[0])
        rows = sweep_lib.run_sweep(cfg, spec, str(out / parametrization), progress=progress,
                                   backend=backend, ray_address=ray_address,
                                   gpus_per_task=gpus_per_task)
        all_rows.extend(rows)
    analysis.write_csv(all_rows, out / "results.csv", columns=sweep_lib.COLUMNS)
    rows = analysis.read_results(out / "results.csv")
    optima = analysis.optimum_per_group(rows, ["parametrization", "width"])
    analysis.write_csv(optima, out / "optima.csv")
    transfer = {}
    for p in LR_GRIDS:
        sel = analysis.select(rows, {"parametrization": p})
        if not sel:
            continue
        widths_, lrs_, table = analysis.loss_table(sel, "width", "lr")
        te_global = analysis.transfer_error(table, widths_, lrs_)
        te_largest = analysis.transfer_error(table, widths_, lrs_, reference=max(widths_))
        transfer[p] = {
            "transfer_error_global_argmin": te_global.err,
            "transfer_error_largest_width": te_largest.err,
            "optimal_log2_lr": {str(w): float(np.log2(t)) if t is not None else None
                                for w, t in zip(widths_, te_largest.t_opt)},
            "optimum_on_grid_edge": {str(w): bool(e) for w, e in zip(widths_, te_largest.on_edge)},
        }
    wall = time.time() - t0
    transfer["_meta"] = {"steps": steps, "widths": widths, "wall_time_s_this_invocation": wall,
                         "backend": backend}
    (out / "transfer.json").write_text(json.dumps(transfer, indent=2))
    analysis.plot_loss_vs_lr(rows, out / "width_transfer.png", reference="largest",
                             title=f"LR transfer across width ({steps} steps, depth 2, "
                                   "bundled corpus, byte tokens)")
    for p, t in transfer.items():
        if p.startswith("_"):
            continue
        print(f"{p:5s} transfer error (f* = largest width) {t['transfer_error_largest_width']:.4f}"
              f"  optimal log2 LR per width {t['optimal_log2_lr']}"
              f"  edge {t['optimum_on_grid_edge']}")
    print(f"wall time {wall / 60:.1f} min; wrote {out}")


def verify(out: pathlib.Path, width: int = 128, rtol: float = 1e-5) -> list[dict]:
    """Retrains, in a temporary directory, each parametrization's run at the smallest learning
    rate of its grid at ``width`` (one run each, separately, not vmapped) and compares its final
    train and validation losses with the rows in ``OUT/<parametrization>/results.csv``: a check
    that this install reproduces committed results in minutes instead of the sweep's 40.

    The smallest LR because training there is not chaotic: measured on the committed table
    (240 steps, width 128), its runs and the optima of u-μP and SP reproduce to ≤ 2e-7
    relative, while at the high-LR edge (u-μP η = 16, SP η = 2⁻⁴) and at μP's optimum
    (η = 2⁻⁶) a change of summation order alone (``model.loss_chunks=2``, the same function)
    moves the validation loss by 2%, 1% and 3e-4.  Returns one dict per run; ``ok`` is whether
    both losses agree within ``rtol``."""
    import tempfile

    from umup_jax import train as train_lib

    checked = []
    for parametrization in LR_GRIDS:
        path = out / parametrization / "results.csv"
        if not path.exists():
            continue
        rows = [r for r in analysis.read_results(path)
                if not r.get("error") and not r["diverged"]]
        at_width = [r for r in rows if r["width"] == width]
        if not at_width:
            raise SystemExit(f"{path} has no run at width {width} (widths: "
                             f"{sorted({r['width'] for r in rows})}); pass --verify_width")
        row = min(at_width, key=lambda r: r["lr"])
        cfg = sweep_lib.run_config(
            base_config(parametrization, int(row["steps"]), min(r["width"] for r in rows)),
            json.loads(row["overrides"]))
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.time()
            new = train_lib.train_and_evaluate(cfg, tmp)
        result = {"parametrization": parametrization, "width": width, "lr": row["lr"],
                  "wall_s": round(time.time() - t0, 1)}
        ok = True
        for key in ("final_train_loss", "final_eval_loss"):
            rel = abs(new[key] - row[key]) / abs(row[key])
            result.update({f"{key}_committed": row[key], f"{key}_now": new[key],
                           f"{key}_rel": rel})
            ok = ok and rel <= rtol
        result["ok"] = ok
        checked.append(result)
        print(f"{parametrization:5s} width {width} η {row['lr']:.4g}: eval loss "
              f"{row['final_eval_loss']:.6f} in {path}, {new['final_eval_loss']:.6f} now "
              f"(rel {result['final_eval_loss_rel']:.1e}; train "
              f"{result['final_train_loss_rel']:.1e}) {'ok' if ok else f'DIFFERS (> {rtol:g})'}"
              f" [{result['wall_s']:.0f} s]", flush=True)
    if not checked:
        raise SystemExit(f"{out} holds no <parametrization>/results.csv to verify")
    return checked


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=240)
    p.add_argument("--out", default="experiments/results/width_transfer")
    p.add_argument("--small", action="store_true", help="tiny widths and steps (minutes)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--backend", choices=backends.BACKENDS, default="local",
                   help="where the sweep's units run: local (one after another in this "
                        "process) or ray (Ray tasks in parallel; pip install -e '.[ray]')")
    p.add_argument("--ray_address", default=None,
                   help="with --backend=ray: the cluster to join (host:port, ray://host:port "
                        "or auto); default RAY_ADDRESS, else a local Ray in this process")
    p.add_argument("--gpus_per_task", type=float, default=None,
                   help="with --backend=ray: GPUs per task (default 1 when the cluster has "
                        "GPUs, else 0)")
    p.add_argument("--verify", action="store_true",
                   help="retrain one run per parametrization (its smallest LR at "
                        "--verify_width) and compare with the results in --out; exit 1 if "
                        "they differ by more than --verify_rtol")
    p.add_argument("--verify_width", type=int, default=128)
    p.add_argument("--verify_rtol", type=float, default=1e-5)
    args = p.parse_args()
    if args.verify:
        checked = verify(pathlib.Path(args.out), args.verify_width, args.verify_rtol)
        raise SystemExit(0 if all(c["ok"] for c in checked) else 1)
    on = dict(backend=args.backend, ray_address=args.ray_address,
              gpus_per_task=args.gpus_per_task)
    if args.small:
        run(pathlib.Path(args.out), SMALL["steps"], SMALL["widths"], SMALL["lrs"],
            not args.no_progress, **on)
    else:
        run(pathlib.Path(args.out), args.steps, WIDTHS, 8, not args.no_progress, **on)


if __name__ == "__main__":
    main()
