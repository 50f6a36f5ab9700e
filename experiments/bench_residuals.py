"""What the backward pass keeps, and costs: our custom-VJP ops against autodiff of the same
formulas.

Three ops decide most of a block's saved activations, and a fourth SP's and μP's speed:

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
  (u-μP's ``_scaled_matmul``) does one flat 2-D product.  u-μP's linears use it in both arms.

For each rule this builds the train step (forward, backward, AdamW) twice in one process, once
as committed ("custom") and once with the three replaced by their autodiff formulas
("autodiff", swapped in on the module ``umup_jax.ops`` for that arm only), and reports, side by
side:

* ``saved_MB_per_layer``: bytes of the arrays the loss's pullback closes over, depth L+1 minus
  depth L (exact, from shapes; nothing runs);
* ``temp_MB``: XLA's temporary buffers of the compiled train step
  (``compiled.memory_analysis().temp_size_in_bytes``): activations plus workspace, on this
  backend;
* ``step_ms``: median step time over ``--steps`` timed steps after one warm-up, arms
  interleaved per round;
* ``max_rel_grad_diff``: the largest relative difference of any gradient leaf between the two
  arms at the initial parameters (the ops compute the same function).

Usage::

    python experiments/bench_residuals.py [--rules sp,umup --width 256 --depth 4 --heads 4
        --seq 256 --batch 64 --steps 5 --rounds 2 --out experiments/results/residuals]

Writes ``OUT/bench_residuals.csv`` and prints the table with the custom/autodiff ratios.
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


def default_softmax_rule():
    flag = getattr(jax, "softmax_custom_jvp", None)
    return flag(False) if flag is not None else contextlib.nullcontext()


@contextlib.contextmanager
def arm(name: str):
    """Inside ``arm('autodiff')`` the model runs the four ops as plain autodiff formulas."""
    if name == "custom":
        yield
        return
    names = ("rms_norm", "gated_silu", "matmul", "_softmax_saving_probabilities")
    saved = {n: getattr(ops, n) for n in names}
    for n, f in zip(names, (autodiff_rms_norm, autodiff_gated_silu, autodiff_matmul,
                            default_softmax_rule)):
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
    p.add_argument("--out", default="experiments/results/residuals")
    args = p.parse_args(argv)
    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    load_before = os.getloadavg()

    rows = []
    for rule in rules:
        per_layer = {}
        for name in ("custom", "autodiff"):
            with arm(name):
                per_layer[name] = (saved_bytes(model_config(args, rule, args.depth + 1), args.batch)
                                   - saved_bytes(model_config(args, rule, args.depth), args.batch))
        steps = {name: Step(model_config(args, rule, args.depth), args.batch, name)
                 for name in ("custom", "autodiff")}
        grad_diff = max_rel_diff(steps["custom"].grads, steps["autodiff"].grads)
        for s in steps.values():
            s.run(1, timed=False)
        for r in range(args.rounds):
            for name in (("custom", "autodiff") if r % 2 == 0 else ("autodiff", "custom")):
                steps[name].run(args.steps, timed=True)
        for name, s in steps.items():
            rows.append({
                "rule": rule, "arm": name, "width": args.width, "depth": args.depth,
                "seq": args.seq, "batch": args.batch,
                "saved_MB_per_layer": round(per_layer[name] / MB, 2),
                "temp_MB": round(s.temp_bytes / MB, 1),
                "step_ms": round(1e3 * statistics.median(s.times), 1),
                "max_rel_grad_diff": f"{grad_diff:.2e}",
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
        c, a = (next(r for r in rows if r["rule"] == rule and r["arm"] == n)
                for n in ("custom", "autodiff"))
        print(f"{rule}: custom/autodiff  saved per layer {c['saved_MB_per_layer'] / a['saved_MB_per_layer']:.3f}"
              f"  XLA temp {c['temp_MB'] / a['temp_MB']:.3f}  step time "
              f"{c['step_ms'] / a['step_ms']:.3f}  (max relative gradient difference "
              f"{c['max_rel_grad_diff']})")
    print(f"wrote {out / 'bench_residuals.csv'}")
    return rows


if __name__ == "__main__":
    main()
