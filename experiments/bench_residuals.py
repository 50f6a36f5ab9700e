"""What the backward pass keeps, and costs: our custom-VJP ops against autodiff of the same
formulas.

Four ops decide most of a block's saved activations (all but the plain rules' matmul, which
decides SP's and μP's speed):

* ``ops.rms_norm``: autodiff of ``x/√(mean(x²)+ε)`` keeps x, x², √, 1/√ and 1/√²; the custom
  VJP keeps the output y (which the next matmul keeps anyway) and one value per token;
* ``ops.gated_silu`` (SwiGLU, and u-μP's ``silu_glu``): autodiff keeps both inputs, σ, the
  activation and the product, five arrays of the FFN's hidden width; the custom VJP keeps the
  two inputs and recomputes σ;
* the softmax inside the XLA attention: JAX's default rule keeps exp(logits), the
  probabilities and two row vectors; ``jax_softmax_custom_jvp`` (set around the call by
  ``ops.attention_core``) keeps the probabilities;
* ``ops.matmul``, the plain rules' (SP, μP) linear ``A·(x @ w)``: autodiff of a 3-D product
  transposes the (tokens × fan_out) gradient before the weight-gradient matmul; the custom VJP
  (u-μP's ``_scaled_matmul``) does one flat 2-D product.  u-μP's linears use it in every arm;
* ``ops.recompute_middle`` around the FFN's activation and down-projection: the plain
  composition keeps the activation h = up·a(gate) for the down-projection's weight gradient;
  the custom VJP recomputes h from up and gate, which the activation keeps anyway.

For each rule this builds the train step (forward, backward, AdamW) once per arm in one
process: as committed ("custom"), with only the FFN's activation kept ("keep_h",
``recompute_middle`` replaced by the plain composition), and with all five replaced by their
autodiff formulas ("autodiff"), each swapped in on the module ``umup_jax.ops`` for that arm
only, and reports, side by side:

* ``saved_MB_per_layer``: bytes of the arrays the loss's pullback closes over, depth L+1 minus
  depth L (exact, from shapes; nothing runs);
* ``temp_MB``: XLA's temporary buffers of the compiled train step
  (``compiled.memory_analysis().temp_size_in_bytes``): activations plus workspace, on this
  backend;
* ``step_ms``: median step time over ``--steps`` timed steps after one warm-up, arms
  interleaved per round;
* ``max_rel_grad_diff_vs_custom``: the largest relative difference of any gradient leaf from
  the custom arm's at the initial parameters (the ops compute the same function).

Usage::

    python experiments/bench_residuals.py [--rules sp,umup --width 256 --depth 4 --heads 4
        --seq 256 --batch 64 --steps 5 --rounds 2 --arms custom,keep_h,autodiff
        --out experiments/results/residuals]

Writes ``OUT/bench_residuals.csv`` and prints the table with the custom/<arm> ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import pathlib
import statistics
import sys
import time

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.core import meta as flax_meta

from umup_jax import Decoder, ModelConfig, OptimizerConfig, make_optimizer, ops

MB = 2**20


def autodiff_rms_norm(x, eps: float = 1e-5):
    ms = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
    return x / jnp.sqrt(ms + eps).astype(x.dtype)


def autodiff_gated_silu(x_in, x_gate, mult: float = 1.0, scale: float = 1.0):
    act = jax.nn.silu(x_gate) if mult == 1.0 else x_gate * jax.nn.sigmoid(x_gate * mult)
    y = x_in * act
    return y if scale == 1.0 else y * scale


def autodiff_matmul(x, w, scale: float = 1.0):
    y = jnp.matmul(x, w)
    return y if scale == 1.0 else y * scale


def composition(producer, consumer, inputs, params):
    return consumer(producer(*inputs), *params)


def default_softmax_rule():
    flag = getattr(jax, "softmax_custom_jvp", None)
    return flag(False) if flag is not None else contextlib.nullcontext()


# What each arm swaps in on ``umup_jax.ops``: "custom" is the code as committed, "keep_h" the
# same but for the FFN's activation kept as in a plain composition, "autodiff" all five ops.
ARMS = {
    "custom": {},
    "keep_h": {"recompute_middle": composition},
    "autodiff": {"rms_norm": autodiff_rms_norm, "gated_silu": autodiff_gated_silu,
                 "matmul": autodiff_matmul,
                 "_softmax_saving_probabilities": default_softmax_rule,
                 "recompute_middle": composition},
}


@contextlib.contextmanager
def arm(name: str):
    """Inside ``arm(name)`` the model runs with that arm's ops (:data:`ARMS`)."""
    swaps = ARMS[name]
    saved = {n: getattr(ops, n) for n in swaps}
    for n, f in swaps.items():
        setattr(ops, n, f)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(ops, n, f)


def model_config(args, rule: str, depth: int) -> ModelConfig:
    return ModelConfig(vocab_size=args.vocab, width=args.width, depth=depth,
                       num_heads=args.heads, seq_len=args.seq, parametrization=rule)


def saved_bytes(cfg: ModelConfig, batch: int) -> int:
    """Bytes of every array the loss's pullback closes over (parameters included)."""
    model = Decoder(cfg)
    tokens = jnp.zeros((batch, cfg.seq_len), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(0), tokens)

    def leaves(p):
        _, pullback = jax.vjp(lambda q: model.apply(q, tokens, tokens, method=Decoder.loss), p)
        return jax.tree_util.tree_leaves(pullback)

    return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.eval_shape(leaves, params))


class Step:
    """The jitted train step of one rule in one arm, with its state."""

    def __init__(self, cfg: ModelConfig, batch: int, name: str):
        self.name = name
        self.model = Decoder(cfg)
        key = jax.random.key(0)
        self.tokens = jax.random.randint(key, (batch, cfg.seq_len), 0, cfg.vocab_size)
        self.targets = jnp.roll(self.tokens, -1, axis=1)
        boxed = self.model.init(key, self.tokens)
        self.tx = make_optimizer(OptimizerConfig(warmup_steps=2, total_steps=100), boxed,
                                 cfg.rule)
        self.params = flax_meta.unbox(boxed)
        self.opt_state = self.tx.init(self.params)
        with arm(name):
            lowered = jax.jit(self._step).lower(self.params, self.opt_state, self.tokens,
                                                self.targets)
            self.compiled = lowered.compile()
            self.grads = jax.jit(jax.grad(self._loss))(self.params, self.tokens, self.targets)
        self.temp_bytes = self.compiled.memory_analysis().temp_size_in_bytes
        self.times: list[float] = []

    def _loss(self, params, tokens, targets):
        return self.model.apply(params, tokens, targets, method=Decoder.loss)

    def _step(self, params, opt_state, tokens, targets):
        loss, grads = jax.value_and_grad(self._loss)(params, tokens, targets)
        updates, opt_state = self.tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def run(self, steps: int, timed: bool):
        for _ in range(steps):
            t0 = time.perf_counter()
            self.params, self.opt_state, loss = self.compiled(
                self.params, self.opt_state, self.tokens, self.targets)
            jax.block_until_ready(loss)
            if timed:
                self.times.append(time.perf_counter() - t0)


def max_rel_diff(a, b) -> float:
    diffs = jax.tree_util.tree_map(
        lambda x, y: float(jnp.max(jnp.abs(x - y)) / jnp.maximum(jnp.max(jnp.abs(y)), 1e-30)),
        a, b)
    return max(jax.tree_util.tree_leaves(diffs))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rules", default="sp,umup")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--arms", default="custom,keep_h,autodiff",
                   help=f"comma-separated, from {', '.join(ARMS)}; 'custom' is required")
    p.add_argument("--out", default="experiments/results/residuals")
    args = p.parse_args(argv)
    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown or "custom" not in arms:
        p.error(f"--arms {args.arms!r}: need 'custom' and names from {', '.join(ARMS)}")
    load_before = os.getloadavg()

    rows = []
    for rule in rules:
        per_layer = {}
        for name in arms:
            with arm(name):
                per_layer[name] = (saved_bytes(model_config(args, rule, args.depth + 1), args.batch)
                                   - saved_bytes(model_config(args, rule, args.depth), args.batch))
        steps = {name: Step(model_config(args, rule, args.depth), args.batch, name)
                 for name in arms}
        grad_diff = {name: max_rel_diff(s.grads, steps["custom"].grads)
                     for name, s in steps.items()}
        for s in steps.values():
            s.run(1, timed=False)
        for r in range(args.rounds):
            for name in (arms if r % 2 == 0 else arms[::-1]):
                steps[name].run(args.steps, timed=True)
        for name, s in steps.items():
            rows.append({
                "rule": rule, "arm": name, "width": args.width, "depth": args.depth,
                "seq": args.seq, "batch": args.batch,
                "saved_MB_per_layer": round(per_layer[name] / MB, 2),
                "temp_MB": round(s.temp_bytes / MB, 1),
                "step_ms": round(1e3 * statistics.median(s.times), 1),
                "max_rel_grad_diff_vs_custom": f"{grad_diff[name]:.2e}",
            })
            print(f"{rule:5s} {name:8s} saved/layer {rows[-1]['saved_MB_per_layer']:8.2f} MB  "
                  f"XLA temp {rows[-1]['temp_MB']:8.1f} MB  step {rows[-1]['step_ms']:8.1f} ms",
                  flush=True)
    load_after = os.getloadavg()

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "bench_residuals.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)

    print()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} CPUs); width "
          f"{args.width}, depth {args.depth}, heads {args.heads}, seq {args.seq}, batch "
          f"{args.batch}, vocab {args.vocab}, fp32; {args.rounds} rounds × {args.steps} steps")
    print(f"load average (1 min) before {load_before[0]:.1f}, after {load_after[0]:.1f}")
    for rule in rules:
        row = {r["arm"]: r for r in rows if r["rule"] == rule}
        c = row["custom"]
        for name in arms[1:]:
            o = row[name]
            print(f"{rule}: custom/{name}  saved per layer "
                  f"{c['saved_MB_per_layer'] / o['saved_MB_per_layer']:.3f}  XLA temp "
                  f"{c['temp_MB'] / o['temp_MB']:.3f}  step time {c['step_ms'] / o['step_ms']:.3f}"
                  f"  (max relative gradient difference {o['max_rel_grad_diff_vs_custom']})")
    print(f"wrote {out / 'bench_residuals.csv'}")
    return rows


if __name__ == "__main__":
    main()
