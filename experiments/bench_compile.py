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
                                         --batch 64 --remat none,full --rounds 2
                                         --dtype float32 --fp8 none --out DIR]
    JAX_PLATFORMS=cpu PYTHONPATH=.cuda-plugin python experiments/bench_compile.py --target h100

Target (issue 11): scan ≤ 1/4 of the unrolled loop's compile time at depth 32.  Runs on a CPU
(nothing executes; the shapes default to the paper's proxy, Table 5).  Without remat the
scanned backward pass carries every block's residuals through its while loop, which XLA's
buffer and copy passes pay for once per compile; with ``remat='full'`` it carries only the
blocks' inputs.

By default the steps are compiled for this machine's first device: on a GPU host, the GPU,
autotuning included.  ``--target h100`` compiles the same steps with XLA's GPU compiler for an abstract H100
(:mod:`umup_jax.gpu_target`, JAX's CUDA plugin on the path; default dtype bf16): the GPU
pipeline and its code generation, on this machine's CPU, without what only a GPU does (no
GEMM autotuning, which XLA caches per distinct GEMM, so the 32 identical blocks of the loop
share it) and with XLA's attention (cuDNN's kernels are built while compiling, which needs
the library).  ``--out DIR`` writes ``bench_compile.csv``, one row per (target, remat,
layout) with the medians; the target column is ``cpu``, ``gpu`` or ``h100`` (ahead of time).
"""

from __future__ import annotations

import argparse
import csv
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

from umup_jax import Decoder, ModelConfig, OptimizerConfig, make_optimizer
from umup_jax.model import abstract_params


def step_fn(model, tx):
    def step(params, opt_state, tokens, targets):
        loss, grads = jax.value_and_grad(
            lambda p: model.apply(p, tokens, targets, method=Decoder.loss))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def time_compile(cfg: ModelConfig, batch: int, sharding=None) -> tuple[float, float]:
    """(trace + lower seconds, compile seconds) of a fresh jitted train step, placed on
    ``sharding`` (an abstract H100's, :func:`umup_jax.gpu_target.h100_sharding`) or, by
    default, on this machine's first device."""
    model = Decoder(cfg)
    boxed = abstract_params(model)
    tx = make_optimizer(OptimizerConfig(warmup_steps=10, total_steps=100), boxed, cfg.rule)
    params = flax_meta.unbox(boxed)
    opt_state = jax.eval_shape(tx.init, params)
    tokens = jax.ShapeDtypeStruct((batch, cfg.seq_len), jnp.int32)
    args = (params, opt_state, tokens, tokens)
    if sharding is not None:
        from umup_jax import gpu_target
        args = gpu_target.abstract(args, sharding)
    t0 = time.perf_counter()
    lowered = jax.jit(step_fn(model, tx), donate_argnums=(0, 1)).lower(*args)
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
    p.add_argument("--target", default="local", choices=("local", "h100"),
                   help="compile for this machine's first device (its CPU, or its GPU where "
                        "JAX has one: then with autotuning), or ahead of time for an H100 "
                        "(needs JAX's CUDA plugin on the path: BUILD.md, -m gpu_aot)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                   help="compute dtype (default: float32 on a CPU, else bfloat16)")
    p.add_argument("--fp8", default="none", help="FP8 policy (none, paper_simple, paper_large)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--out", default=None, help="directory for bench_compile.csv")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds={args.rounds} is invalid: it must be >= 1")
    platform = "h100" if args.target == "h100" else jax.devices()[0].platform
    dtype = args.dtype or ("float32" if platform == "cpu" else "bfloat16")
    sharding = None
    if args.target == "h100":
        from umup_jax import gpu_target
        try:
            sharding = gpu_target.h100_sharding()
        except gpu_target.GpuTargetUnavailable as e:
            sys.exit(f"bench_compile.py --target h100: {e}")

    load_before = os.getloadavg()
    remats = [r.strip() for r in args.remat.split(",") if r.strip()]
    times: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for remat in remats:
        # XLA's attention on either target: the plugin cannot build cuDNN's kernels here.
        base = ModelConfig(vocab_size=args.vocab, width=args.width, depth=args.depth,
                           num_heads=args.heads, seq_len=args.seq,
                           parametrization=args.parametrization, remat=remat, dtype=dtype,
                           fp8=args.fp8, attention_impl="xla")
        for r in range(args.rounds):
            order = ("loop", "scan") if r % 2 == 0 else ("scan", "loop")
            for layout in order:
                cfg = base.replace(scan_layers=layout == "scan")
                t = time_compile(cfg, args.batch, sharding)
                times.setdefault((remat, layout), []).append(t)
                print(f"remat={remat} round {r}: {layout:4s} trace+lower {t[0]:7.2f} s  "
                      f"compile {t[1]:7.2f} s  total {sum(t):7.2f} s", flush=True)
    load_after = os.getloadavg()

    def median_total(key):
        return statistics.median(a + b for a, b in times[key])

    print()
    target = ("an abstract H100 (XLA's GPU compiler, no autotuning)" if sharding is not None
              else f"this machine's first device, {jax.devices()[0].device_kind}")
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} CPUs), "
          f"compiling for {target}; {args.parametrization}, {dtype}, fp8 {args.fp8}, depth "
          f"{args.depth}, width {args.width}, heads {args.heads}, seq {args.seq}, batch "
          f"{args.batch}, vocab {args.vocab}; {args.rounds} rounds, interleaved")
    print(f"load average (1/5/15 min) before {load_before[0]:.1f}/{load_before[1]:.1f}/"
          f"{load_before[2]:.1f}, after {load_after[0]:.1f}/{load_after[1]:.1f}/"
          f"{load_after[2]:.1f}")
    ratios, rows = {}, []
    for remat in remats:
        for layout in ("loop", "scan"):
            key = (remat, layout)
            lower = statistics.median(a for a, _ in times[key])
            comp = statistics.median(b for _, b in times[key])
            print(f"remat={remat:13s} {layout:4s}: trace+lower {lower:.2f} s + compile "
                  f"{comp:.2f} s = {median_total(key):.2f} s (median)")
            rows.append({"target": platform, "dtype": dtype, "fp8": args.fp8,
                         "remat": remat, "layout": layout, "depth": args.depth,
                         "width": args.width, "rounds": args.rounds,
                         "trace_lower_s": round(lower, 3), "compile_s": round(comp, 3),
                         "total_s": round(median_total(key), 3)})
        ratios[remat] = median_total((remat, "scan")) / median_total((remat, "loop"))
        for row in rows[-2:]:
            row["scan_over_loop"] = round(ratios[remat], 4)
        print(f"remat={remat}: scan / loop compile time {ratios[remat]:.3f}  (target <= 0.25: "
              f"{'PASS' if ratios[remat] <= 0.25 else 'FAIL'})")
    if args.out:
        path = pathlib.Path(args.out) / "bench_compile.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {path}")
    return ratios


if __name__ == "__main__":
    main()
