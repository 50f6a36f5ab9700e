"""Input-pipeline overhead: steps/s of the full train loop vs the jitted step alone.

Same config (default ``configs/umup_proxy.py:cpu``), one process, alternating rounds:

* **loop**: ``train_and_evaluate`` itself (grain pipeline on its background thread, host
  transfer, metric reads one step behind, progress bookkeeping); its steady-state rate is read
  from the ``tokens_per_s`` it logs every ``log_every`` steps (the first row, step 0's, has
  none: the train loop leaves each step function's first call, which compiles it, untimed).
  Eval, stats and checkpoint intervals are pushed past the run so that what is measured is
  the per-step path.
* **bare**: the same jitted step (same ``build_run``, same shardings, donated state) looping
  over batches made beforehand and already on the device.

    python experiments/bench_input_pipeline.py [--config=configs/umup_proxy.py:cpu] [--steps=120]

Prints both rates and their ratio (goal ≥ 0.95).
"""

import argparse
import json
import pathlib
import statistics
import tempfile
import time

import jax

from umup_jax import config as config_lib
from umup_jax import data as data_lib
from umup_jax import train as train_lib
from umup_jax.metrics import read_metrics


def loop_rate(config, steps: int) -> float:
    cfg = config.copy_and_resolve_references()
    cfg.train.steps = steps
    cfg.train.eval_every = cfg.train.checkpoint_every = cfg.train.metrics_every = 10**9
    cfg.train.progress = False
    with tempfile.TemporaryDirectory() as d:
        train_lib.train_and_evaluate(cfg, d)
        rows = read_metrics(pathlib.Path(d) / "metrics.jsonl", "train")
    tokens_per_step = cfg.train.batch_size * cfg.model.seq_len
    # Step 0's row has no timed step ("nan": its steps are the step functions' first calls).
    rates = [r["tokens_per_s"] / tokens_per_step for r in rows
             if isinstance(r["tokens_per_s"], (int, float))]
    return statistics.median(rates)


def bare_rate(config, steps: int) -> float:
    run = train_lib.build_run(config)
    state = train_lib.make_init_fn(run)(jax.random.key(0))
    step = train_lib.make_train_step(run, with_stats=False)
    it = iter(data_lib.train_dataset(run.tokens.train, run.model_cfg.seq_len,
                                     config.train.batch_size, config.data.shuffle_seed))
    batches = [train_lib.to_global(run, next(it)) for _ in range(16)]
    for i in range(3):  # compile and warm up
        state, m = step(state, batches[i])
    jax.block_until_ready(m)
    times = []
    for chunk in range(max(steps // 10, 1)):
        t0 = time.perf_counter()
        for i in range(10):
            state, m = step(state, batches[(chunk * 10 + i) % len(batches)])
        jax.block_until_ready(m)
        times.append((time.perf_counter() - t0) / 10)
    return 1.0 / statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="configs/umup_proxy.py:cpu")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    config = config_lib.load_config_file(args.config)
    loop, bare = [], []
    for r in range(args.rounds):
        loop.append(loop_rate(config, args.steps))
        bare.append(bare_rate(config, args.steps))
        print(f"round {r}: loop {loop[-1]:.3f} steps/s, bare step {bare[-1]:.3f} steps/s",
              flush=True)
    lm, bm = statistics.median(loop), statistics.median(bare)
    print(json.dumps({"config": args.config, "device": str(jax.devices()[0]),
                      "jax": jax.__version__, "loop_steps_per_s": round(lm, 4),
                      "bare_steps_per_s": round(bm, 4), "ratio": round(lm / bm, 4)}))
    print(f"full loop / jitted step alone = {lm / bm:.3f}  (goal >= 0.95)")


if __name__ == "__main__":
    main()
