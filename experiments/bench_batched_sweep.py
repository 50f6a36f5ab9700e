"""Speed-up of the batched (vmapped) sweep runner over sequential runs: 8 learning rates at
widths 64 and 256, in one process.

    python experiments/bench_batched_sweep.py [--widths=64,256] [--lrs=8] [--steps=30]

Both sides train the same runs (same data, same init, u-μP, depth 2, seq 64, batch 16, byte
tokens) for ``--steps`` steps and evaluate once at the end; wall time includes compilation,
as in a real sweep.  Sequential = ``train_and_evaluate`` per LR (what a plain loop over configs
costs); batched = one ``run_batched`` call.  Prints both times and the ratio, with the device.
"""

import argparse
import tempfile
import time

import jax

from umup_jax import config as config_lib
from umup_jax import sweep as sweep_lib
from umup_jax import train as train_lib


def config(width: int, steps: int):
    return config_lib.proxy_config(
        "umup",
        f"smoke,model.width={width},model.num_heads={max(width // 32, 1)},model.depth=2,"
        f"model.seq_len=64,train.batch_size=16,train.steps={steps},train.eval_batch_size=16,"
        f"train.eval_batches=4,optimizer.warmup_steps={max(steps // 6, 1)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--widths", default="64,256")
    p.add_argument("--lrs", type=int, default=8)
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args()
    lrs = [2.0 ** (k - args.lrs // 2) for k in range(args.lrs)]
    print(f"device {jax.devices()[0]}, jax {jax.__version__}, {args.lrs} LRs, {args.steps} steps")
    print(f"{'width':>6} {'sequential s':>13} {'batched s':>10} {'speed-up':>9}")
    for width in (int(w) for w in args.widths.split(",")):
        cfg = config(width, args.steps)
        t0 = time.perf_counter()
        for lr in lrs:
            run_cfg = sweep_lib.run_config(cfg, {"optimizer.learning_rate": lr})
            with tempfile.TemporaryDirectory() as d:
                train_lib.train_and_evaluate(run_cfg, d)
        sequential = time.perf_counter() - t0
        t0 = time.perf_counter()
        sweep_lib.run_batched(sweep_lib.run_config(cfg, {}), lrs,
                              [cfg.optimizer.weight_decay] * len(lrs))
        batched = time.perf_counter() - t0
        print(f"{width:>6} {sequential:>13.1f} {batched:>10.1f} {sequential / batched:>8.2f}x",
              flush=True)


if __name__ == "__main__":
    main()
