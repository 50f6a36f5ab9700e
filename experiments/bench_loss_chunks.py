"""What ``model.loss_chunks`` saves and costs: the train step (forward, backward, AdamW) of one
model with the readout and loss over c = 1, 2, 4, … sequence chunks, side by side in one
process.

For each c it reports:

* ``temp_MiB``: XLA's temporary buffers of the compiled step
  (``compiled.memory_analysis().temp_size_in_bytes``): activations plus workspace, where the
  (B, S, V) fp32 logits, their softmax and gradient dominate at c = 1;
* ``logits_MiB``: the size of one chunk's fp32 logits, B·(S/c)·V·4 bytes;
* ``step_ms``: median step time over ``--steps`` timed steps after a warm-up, the arms
  interleaved round by round so that machine load affects them alike;
* ``loss``: the first step's loss (equal across c up to the order of summation);
* ``temp_ratio`` and ``time_ratio``: against c = 1.

Usage::

    python experiments/bench_loss_chunks.py [--rule umup --vocab 32000 --width 256 --depth 2
        --heads 4 --seq 256 --batch 16 --chunks 1,2,4,8,16 --steps 5 --rounds 3
        --dtype float32 --out experiments/results/loss_chunks]

Writes ``OUT/bench_loss_chunks.csv`` and prints the table.  On a GPU it measures the same with
the device's allocator (run it with ``--dtype bfloat16``).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import pathlib
import statistics
import sys
import time

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import optax
from flax.core import meta as flax_meta

from umup_jax import Decoder, ModelConfig, OptimizerConfig, init_params, make_optimizer

MiB = 2**20
COLUMNS = ["rule", "vocab", "width", "depth", "seq", "batch", "dtype", "backend", "chunks",
           "logits_MiB", "temp_MiB", "step_ms", "loss", "temp_ratio", "time_ratio"]


class Step:
    """The jitted, compiled train step of ``cfg`` with its state."""

    def __init__(self, cfg: ModelConfig, batch: int):
        model = Decoder(cfg)
        key = jax.random.key(0)
        self.tokens = jax.random.randint(key, (batch, cfg.seq_len), 0, cfg.vocab_size)
        self.targets = jnp.roll(self.tokens, -1, axis=1)
        boxed = init_params(model, key)
        tx = make_optimizer(OptimizerConfig(warmup_steps=2, total_steps=100), boxed, cfg.rule)
        self.params = flax_meta.unbox(boxed)
        self.opt_state = tx.init(self.params)

        def step(params, opt_state, tokens, targets):
            loss, grads = jax.value_and_grad(lambda p: model.apply(
                p, tokens, targets, method=Decoder.loss))(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        self.compiled = jax.jit(step).lower(self.params, self.opt_state, self.tokens,
                                            self.targets).compile()
        self.temp_bytes = self.compiled.memory_analysis().temp_size_in_bytes
        self.loss = float(self.run_once())

    def run_once(self):
        _, _, loss = self.compiled(self.params, self.opt_state, self.tokens, self.targets)
        return jax.block_until_ready(loss)

    def time_ms(self, steps: int) -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            self.run_once()
        return (time.perf_counter() - t0) / steps * 1e3


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rule", default="umup", choices=("sp", "mup", "umup"))
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--chunks", default="1,2,4,8,16")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--out", default="experiments/results/loss_chunks")
    args = p.parse_args(argv)
    try:
        chunks = [int(c) for c in args.chunks.split(",")]
    except ValueError:
        p.error(f"--chunks={args.chunks!r}: give comma-separated integers, e.g. 1,2,4,8")
    if 1 not in chunks:
        p.error("--chunks must include 1 (the ratios are against it)")
    base = ModelConfig(vocab_size=args.vocab, width=args.width, depth=args.depth,
                       num_heads=args.heads, seq_len=args.seq, parametrization=args.rule,
                       dtype=args.dtype)
    steps = {}
    for c in chunks:
        try:
            cfg = dataclasses.replace(base, loss_chunks=c)
        except ValueError as e:
            p.error(str(e))
        print(f"compiling c={c} …", flush=True)
        steps[c] = Step(cfg, args.batch)
    times = {c: [] for c in chunks}
    for r in range(args.rounds):
        for c in chunks:
            times[c].append(steps[c].time_ms(args.steps))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"c={c} {times[c][-1]:.1f} ms" for c in chunks), flush=True)
    rows = []
    for c in chunks:
        ms = statistics.median(times[c])
        rows.append({
            "rule": args.rule, "vocab": args.vocab, "width": args.width, "depth": args.depth,
            "seq": args.seq, "batch": args.batch, "dtype": args.dtype,
            "backend": jax.default_backend(), "chunks": c,
            "logits_MiB": round(args.batch * args.seq // c * args.vocab * 4 / MiB, 2),
            "temp_MiB": round(steps[c].temp_bytes / MiB, 2), "step_ms": round(ms, 2),
            "loss": round(steps[c].loss, 6),
            "temp_ratio": round(steps[c].temp_bytes / steps[1].temp_bytes, 3),
            "time_ratio": round(ms / statistics.median(times[1]), 3),
        })
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "bench_loss_chunks.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    print(f"\n{'chunks':>6} {'logits MiB':>10} {'temp MiB':>9} {'step ms':>8} {'loss':>9} "
          f"{'temp/c=1':>8} {'time/c=1':>8}")
    for r in rows:
        print(f"{r['chunks']:>6} {r['logits_MiB']:>10.1f} {r['temp_MiB']:>9.1f} "
              f"{r['step_ms']:>8.1f} {r['loss']:>9.5f} {r['temp_ratio']:>8.3f} "
              f"{r['time_ratio']:>8.3f}")
    print(f"wrote {out / 'bench_loss_chunks.csv'}")
    return rows


if __name__ == "__main__":
    main()
