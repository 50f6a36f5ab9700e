"""Compile time of the train step with ``model.scan_layers`` vs the unrolled Python loop.

A Python loop of L blocks hands XLA L copies of the block, so tracing, lowering and compiling
grow with L; ``nn.scan`` hands it one block inside a while loop.  For each layout this times,
in one process and interleaved (loop, scan, loop, scan, … for ``--rounds`` rounds), the
jitted train step (forward, backward, AdamW; ``umup_jax.train.make_train_step``'s math: the
model's loss, ``jax.value_and_grad``, ``umup_jax.make_optimizer``) of a u-μP decoder at
``--depth`` (default 32), split into trace + lower (``jax.jit(...).lower``) and XLA compile
(``.compile()``).  Each round builds fresh jitted functions, so nothing is reused from a cache.
Both layouts are measured for each ``--remat`` policy (the same policy on both sides).

Usage::

    python experiments/bench_compile.py [--depth 32 --width 256 --heads 4 --seq 256
                                         --batch 64 --remat none,full --rounds 2]

Target (issue 11): scan ≤ 1/4 of the unrolled loop's compile time at depth 32.  Runs on a CPU
(nothing executes; the shapes default to the paper's proxy, Table 5).  Without remat the
scanned backward pass carries every block's residuals through its while loop, which XLA's
buffer and copy passes pay for once per compile; with ``remat='full'`` it carries only the
blocks' inputs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import optax
from flax.core import meta as flax_meta

from umup_jax import Decoder, ModelConfig, OptimizerConfig, make_optimizer
from umup_jax.model import abstract_params


def step_fn(model, tx):
    def step(params, opt_state, tokens, targets):
        loss, grads = jax.value_and_grad(
            lambda p: model.apply(p, tokens, targets, method=Decoder.loss))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def time_compile(cfg: ModelConfig, batch: int) -> tuple[float, float]:
    """(trace + lower seconds, compile seconds) of a fresh jitted train step."""
    model = Decoder(cfg)
    boxed = abstract_params(model)
    tx = make_optimizer(OptimizerConfig(warmup_steps=10, total_steps=100), boxed, cfg.rule)
    params = flax_meta.unbox(boxed)
    opt_state = jax.eval_shape(tx.init, params)
    tokens = jax.ShapeDtypeStruct((batch, cfg.seq_len), jnp.int32)
    t0 = time.perf_counter()
    lowered = jax.jit(step_fn(model, tx), donate_argnums=(0, 1)).lower(
        params, opt_state, tokens, tokens)
    t1 = time.perf_counter()
    lowered.compile()
    return t1 - t0, time.perf_counter() - t1


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=32)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--remat", default="none,full",
                   help="comma-separated remat policies, each timed for both layouts")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--parametrization", default="umup", choices=("sp", "mup", "umup"))
    args = p.parse_args(argv)

    load_before = os.getloadavg()
    remats = [r.strip() for r in args.remat.split(",") if r.strip()]
    times: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for remat in remats:
        base = ModelConfig(vocab_size=32000, width=args.width, depth=args.depth,
                           num_heads=args.heads, seq_len=args.seq,
                           parametrization=args.parametrization, remat=remat)
        for r in range(args.rounds):
            order = ("loop", "scan") if r % 2 == 0 else ("scan", "loop")
            for layout in order:
                cfg = base.replace(scan_layers=layout == "scan")
                t = time_compile(cfg, args.batch)
                times.setdefault((remat, layout), []).append(t)
                print(f"remat={remat} round {r}: {layout:4s} trace+lower {t[0]:7.2f} s  "
                      f"compile {t[1]:7.2f} s  total {sum(t):7.2f} s", flush=True)
    load_after = os.getloadavg()

    def median_total(key):
        return statistics.median(a + b for a, b in times[key])

    print()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} CPUs); "
          f"{args.parametrization}, depth {args.depth}, width {args.width}, heads "
          f"{args.heads}, seq {args.seq}, batch {args.batch}; {args.rounds} rounds, interleaved")
    print(f"load average (1/5/15 min) before {load_before[0]:.1f}/{load_before[1]:.1f}/"
          f"{load_before[2]:.1f}, after {load_after[0]:.1f}/{load_after[1]:.1f}/"
          f"{load_after[2]:.1f}")
    ratios = {}
    for remat in remats:
        for layout in ("loop", "scan"):
            key = (remat, layout)
            lower = statistics.median(a for a, _ in times[key])
            comp = statistics.median(b for _, b in times[key])
            print(f"remat={remat:13s} {layout:4s}: trace+lower {lower:.2f} s + compile "
                  f"{comp:.2f} s = {median_total(key):.2f} s (median)")
        ratios[remat] = median_total((remat, "scan")) / median_total((remat, "loop"))
        print(f"remat={remat}: scan / loop compile time {ratios[remat]:.3f}  (target <= 0.25: "
              f"{'PASS' if ratios[remat] <= 0.25 else 'FAIL'})")
    return ratios


if __name__ == "__main__":
    main()
