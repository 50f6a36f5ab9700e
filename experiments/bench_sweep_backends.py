"""Sweep backends side by side: the same sweep with ``--backend=local`` (one run after
another in this process) and ``--backend=ray`` (a local Ray, tasks in parallel).

    python experiments/bench_sweep_backends.py [--runs=4] [--width=64] [--steps=60]
        [--cpus_per_task=1]

The sweep: u-μP at width ``--width`` (depth 2, seq 64, batch 16, byte tokens), ``--runs``
values of α_attn (model HPs are compile-time constants, so every run is its own unit; the LR
would be batched into one unit).  On CPU, Ray runs ⌊CPUs / cpus_per_task⌋ tasks at a time (2
on a 2-core machine); on a GPU host it runs one task per GPU (``--gpus_per_task``, default 1
there).  Both wall times include everything a user waits for (Ray's start, each task's fresh
worker process, compilation).  Prints both times, the ratio, runs/hour, and the largest loss
difference between the two results.csv files (each run is deterministic, so it should be 0).

The local leg trains in this (the driver) process, which lives on while the Ray tasks run.  By
default JAX would reserve 75% of the GPU's memory in it at its first GPU use and keep it, leaving
a Ray task on the same GPU a quarter; so this script sets ``XLA_PYTHON_CLIENT_PREALLOCATE=false``
before importing JAX (unless it is already set), and the driver holds only what its runs used.
Ray's local workers inherit the driver's environment, so both legs allocate on demand alike.
"""

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # before jax is imported

import argparse
import csv
import pathlib
import tempfile
import time

import jax

from umup_jax import config as config_lib
from umup_jax import sweep as sweep_lib


def rows(workdir: str) -> dict[str, dict]:
    with open(pathlib.Path(workdir) / "results.csv", newline="") as f:
        return {r["run_id"]: r for r in csv.DictReader(f)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", type=int, default=4)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--cpus_per_task", type=float, default=1.0)
    p.add_argument("--gpus_per_task", type=float, default=None)
    args = p.parse_args()
    cfg = config_lib.proxy_config(
        "umup", f"smoke,model.width={args.width},model.num_heads={max(args.width // 32, 1)},"
                f"model.depth=2,model.seq_len=64,train.batch_size=16,train.steps={args.steps},"
                f"train.eval_batch_size=16,train.eval_batches=4,"
                f"optimizer.warmup_steps={max(args.steps // 6, 1)}")
    spec = {"name": "bench", "kind": "grid",
            "grid": {"model.hparams.attn_mult": [2.0 ** (k - args.runs // 2)
                                                 for k in range(args.runs)]}}
    print(f"device {jax.devices()[0]}, jax {jax.__version__}, {os.cpu_count()} CPUs, "
          f"{args.runs} runs of {args.steps} steps at width {args.width}; "
          f"load average before {os.getloadavg()[0]:.2f}", flush=True)
    times, results = {}, {}
    for backend in ("local", "ray"):
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            sweep_lib.run_sweep(cfg, spec, d, progress=False, backend=backend,
                                cpus_per_task=args.cpus_per_task,
                                gpus_per_task=args.gpus_per_task)
            times[backend] = time.perf_counter() - t0
            results[backend] = rows(d)
        print(f"{backend:>6}: {times[backend]:7.1f} s  ({3600 * args.runs / times[backend]:6.1f} "
              f"runs/hour)  load average {os.getloadavg()[0]:.2f}", flush=True)
    diff = max(abs(float(results["local"][rid][k]) - float(results["ray"][rid][k]))
               for rid in results["local"] for k in ("final_train_loss", "final_eval_loss"))
    same_ids = sorted(results["local"]) == sorted(results["ray"])
    print(f"local / ray wall time = {times['local'] / times['ray']:.2f}x; same run ids: "
          f"{same_ids}; max |Δ loss| between backends: {diff:.2e}")


if __name__ == "__main__":
    main()
