"""FP8 (paper_simple) vs BF16 train-step time on a GPU: widths 1024, 2048, 4096, depth 4,
seq 1024, u-μP, bf16 compute, in one process, interleaved.

    python experiments/bench_fp8.py [--widths=1024,2048,4096] [--batch=8] [--rounds=5]

Prints the device, the median step time of each precision per width, and fp8 speed-up
(goal ≥ 1.3× at width 4096 on an H100).  Each step is the full jitted train step (forward,
backward, AdamW update, donated state) on a fixed random batch.  On a CPU the FP8 dot is
emulated by an upcast, so only a GPU run says anything about speed; use small --widths there
to check that the script works.
"""

import argparse
import statistics
import time

import jax
import optax
from flax.core import meta as flax_meta

from umup_jax.model import Decoder, ModelConfig, init_params
from umup_jax.optim import OptimizerConfig, make_optimizer


def make_step(width: int, depth: int, seq: int, fp8: str, vocab: int):
    cfg = ModelConfig(vocab_size=vocab, width=width, depth=depth, num_heads=width // 128,
                      seq_len=seq, dtype="bfloat16", fp8=fp8)
    model = Decoder(cfg)
    boxed = init_params(model, jax.random.key(0))
    params = flax_meta.unbox(boxed)
    tx = make_optimizer(OptimizerConfig(warmup_steps=10, total_steps=1000), boxed, cfg.rule)
    state = (params, tx.init(params))

    def step(state, tokens):
        params, opt = state
        loss, grads = jax.value_and_grad(lambda p: model.apply(
            p, tokens[:, :-1], tokens[:, 1:], method=Decoder.loss))(params)
        updates, opt = tx.update(grads, opt, params)
        return (optax.apply_updates(params, updates), opt), loss

    return jax.jit(step, donate_argnums=(0,)), state


def time_steps(step, state, tokens, n: int):
    state, loss = step(state, tokens)
    loss.block_until_ready()
    t0 = time.perf_counter()
    for _ in range(n):
        state, loss = step(state, tokens)
    loss.block_until_ready()
    return (time.perf_counter() - t0) / n, state


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--widths", default="1024,2048,4096")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    print(f"device: {jax.devices()[0].device_kind} ({jax.devices()[0].platform}), "
          f"jax {jax.__version__}")
    print(f"{'width':>6} {'bf16 ms':>9} {'fp8 ms':>9} {'fp8 speed-up':>13}")
    for width in (int(w) for w in args.widths.split(",")):
        tokens = jax.random.randint(jax.random.key(1), (args.batch, args.seq + 1), 0, args.vocab)
        runs = {name: make_step(width, args.depth, args.seq, preset, args.vocab)
                for name, preset in (("bf16", "none"), ("fp8", "paper_simple"))}
        states = {k: v[1] for k, v in runs.items()}
        times = {k: [] for k in runs}
        for _ in range(args.rounds):
            for name, (step, _) in runs.items():
                t, states[name] = time_steps(step, states[name], tokens, args.steps)
                times[name].append(t)
        b, f = statistics.median(times["bf16"]), statistics.median(times["fp8"])
        print(f"{width:>6} {1e3 * b:>9.2f} {1e3 * f:>9.2f} {b / f:>12.2f}x", flush=True)


if __name__ == "__main__":
    main()
