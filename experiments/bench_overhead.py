"""Step-time overhead of the u-μP decoder over a plain Flax Llama of identical shapes.

Times, in one process and interleaved (A, B, A, B, … for ``--rounds`` rounds of ``--steps``
steps each), the jitted train step (forward, backward, optimizer update; params and optimizer
state donated; ``block_until_ready`` after every step) of

  (A) ``umup_jax.Decoder`` with ``parametrization='umup'`` and ``umup_jax.make_optimizer``;
  (B) a plain Flax Linen Llama written below with ``nn.Dense``/``nn.Embed`` and plain jnp ops
      (standard parametrization), trained with ``optax.adamw``.

Both have the same shapes and math FLOPs: vocab 256, non-trainable RMSNorm, fused QKV
(d → 3d, no bias), RoPE (rotate-half, same tables), causal softmax attention with fp32 logits,
output projection, SwiGLU FFN with 4× expansion (up, gate, down; no bias), final RMSNorm,
untied readout, mean softmax cross-entropy in fp32, AdamW with a warm-up + cosine schedule.
The only differences are u-μP's static scale multiplies (op scales, residual τ weights, loss
scales) and the optimizer's per-parameter learning-rate constants.

Usage::

    python experiments/bench_overhead.py [--width 256 --depth 4 --seq 128 --batch 16
                                          --steps 8 --rounds 4 --dtype float32]

The repository root is appended to ``sys.path`` (after ``PYTHONPATH``), so a scratch copy of
the package can be benchmarked with ``PYTHONPATH=/tmp/scratch python experiments/…``.

``--plain-flat`` adds a third model, the same plain Llama with its Dense layers applied to
(batch·seq, d) activations: on XLA:CPU the weight gradient of a 3-D Dense costs a transposed
copy of the output gradient, which a 2-D product avoids, so this is the plain model with that
layout cost removed (same math).  Wall-clock times suffer when other processes share the
CPUs; the per-step process CPU time (all threads) is printed as a steadier second measure.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.core import meta as flax_meta

import umup_jax
from umup_jax import Decoder, ModelConfig, OptimizerConfig, init_params, make_optimizer

VOCAB = 256
NUM_HEADS = 4
FFN_EXPANSION = 4
ROPE_THETA = 10000.0
NORM_EPS = 1e-5
LEARNING_RATE = 1.0  # u-μP's default global η
BASELINE_LR = 1e-3  # any value: it does not change the plain step's cost
WARMUP_STEPS = 100
TOTAL_STEPS = 1000
FINAL_LR_FRACTION = 0.1
WEIGHT_DECAY = 2.0**-13
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# ---------------------------------------------------------------------------------------------
# (B) the plain Flax Llama (SP)
# ---------------------------------------------------------------------------------------------


def plain_rms_norm(x, eps: float = NORM_EPS):
    ms = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
    return x / jnp.sqrt(ms + eps).astype(x.dtype)


def plain_rope(x, theta: float = ROPE_THETA):
    """Rotate-half RoPE on (B, S, H, D), same tables as ``umup_jax.model.apply_rope``."""
    seq_len, head_dim = x.shape[1], x.shape[3]
    half = head_dim // 2
    inv_freq = theta ** (-np.arange(half, dtype=np.float64) / half)
    angles = np.arange(seq_len, dtype=np.float64)[:, None] * inv_freq[None, :]
    cos = jnp.asarray(np.cos(angles).astype(np.float32), x.dtype)[None, :, None, :]
    sin = jnp.asarray(np.sin(angles).astype(np.float32), x.dtype)[None, :, None, :]
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def plain_attention(q, k, v):
    """Causal softmax(q·kᵀ/√d_head)·v on (B, S, H, D); fp32 logits and softmax."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    logits = logits * (q.shape[-1] ** -0.5)
    s_q, s_k = q.shape[1], k.shape[1]
    mask = jnp.tril(jnp.ones((s_q, s_k), dtype=bool))
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


class PlainBlock(nn.Module):
    width: int
    num_heads: int
    ffn_hidden: int
    dtype: jnp.dtype
    flat: bool = False

    @nn.compact
    def __call__(self, x):
        b, s, d = x.shape
        h = self.num_heads
        hd = d // h

        def dense(n, name):
            layer = nn.Dense(
                n, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32, name=name
            )
            if not self.flat:
                return layer
            # (B·S, fan_in) @ (fan_in, n): autodiff then forms the weight gradient as one 2-D
            # product, which avoids XLA:CPU's transposed copies of the 3-D gradients.
            return lambda t: layer(t.reshape(-1, t.shape[-1])).reshape(*t.shape[:-1], n)
        # attention
        r = plain_rms_norm(x)
        qkv = dense(3 * d, "attn_qkv")(r).reshape(b, s, 3, h, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q, k = plain_rope(q), plain_rope(k)
        o = plain_attention(q, k, v).reshape(b, s, d)
        x = x + dense(d, "attn_out")(o)
        # SwiGLU FFN
        r = plain_rms_norm(x)
        up = dense(self.ffn_hidden, "ffn_up")(r)
        gate = dense(self.ffn_hidden, "ffn_gate")(r)
        x = x + dense(d, "ffn_down")(up * jax.nn.silu(gate))
        return x


class PlainLlama(nn.Module):
    """``remat=True`` wraps each block in ``nn.remat`` (keeps only its input; the GPU
    benchmark's ~1B model, compared against ours with ``model.remat='full'``)."""

    vocab_size: int
    width: int
    depth: int
    num_heads: int
    ffn_hidden: int
    dtype: jnp.dtype
    flat: bool = False
    remat: bool = False

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(
            self.vocab_size, self.width, dtype=self.dtype, param_dtype=jnp.float32,
            name="embedding",
        )(tokens)
        block = nn.remat(PlainBlock) if self.remat else PlainBlock
        for i in range(self.depth):
            x = block(
                self.width, self.num_heads, self.ffn_hidden, self.dtype, self.flat,
                name=f"layer_{i}",
            )(x)
        x = plain_rms_norm(x)
        logits = nn.Dense(
            self.vocab_size, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
            name="readout",
        )(x)
        return logits.astype(jnp.float32)

    def loss(self, tokens, targets):
        logits = self(tokens).reshape(-1, self.vocab_size)
        targets = targets.reshape(-1)
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
        return jnp.mean(lse - picked)


# ---------------------------------------------------------------------------------------------
# Train steps
# ---------------------------------------------------------------------------------------------


def make_train_step(model, optimizer):
    def loss_fn(params, tokens, targets):
        return model.apply({"params": params}, tokens, targets, method=type(model).loss)

    def step(params, opt_state, tokens, targets):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens, targets)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def build_umup(args, dtype_name):
    cfg = ModelConfig(
        vocab_size=VOCAB, width=args.width, depth=args.depth, num_heads=NUM_HEADS,
        ffn_expansion=FFN_EXPANSION, seq_len=args.seq, position="rope",
        rope_theta=ROPE_THETA, parametrization="umup", dtype=dtype_name, norm_eps=NORM_EPS,
    )
    model = Decoder(cfg)
    boxed = init_params(model, jax.random.key(0))["params"]
    opt = make_optimizer(
        OptimizerConfig(
            learning_rate=LEARNING_RATE, weight_decay=WEIGHT_DECAY, schedule="cosine",
            warmup_steps=WARMUP_STEPS, total_steps=TOTAL_STEPS,
            final_lr_fraction=FINAL_LR_FRACTION,
        ),
        boxed, cfg.rule,
    )
    params = flax_meta.unbox(boxed)
    return model, params, opt


def build_plain(args, dtype, flat=False):
    model = PlainLlama(
        vocab_size=VOCAB, width=args.width, depth=args.depth, num_heads=NUM_HEADS,
        ffn_hidden=FFN_EXPANSION * args.width, dtype=dtype, flat=flat,
    )
    params = model.init(jax.random.key(0), jnp.zeros((1, args.seq), jnp.int32))["params"]
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=BASELINE_LR, warmup_steps=WARMUP_STEPS,
        decay_steps=TOTAL_STEPS, end_value=FINAL_LR_FRACTION * BASELINE_LR,
    )
    opt = optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=WEIGHT_DECAY)
    return model, params, opt


class Runner:
    """Holds one model's jitted step and its (donated, threaded) state."""

    def __init__(self, name, model, params, opt, tokens, targets):
        self.name = name
        self.step = make_train_step(model, opt)
        self.params = params
        self.opt_state = opt.init(params)
        self.tokens, self.targets = tokens, targets
        self.times: list[float] = []  # wall-clock seconds per step
        self.cpu_times: list[float] = []  # process CPU seconds per step (all threads)
        self.num_params = sum(x.size for x in jax.tree.leaves(params))
        t0 = time.perf_counter()
        self.compiled = self.step.lower(params, self.opt_state, tokens, targets).compile()
        self.compile_s = time.perf_counter() - t0

    def run(self, n, record=True):
        for _ in range(n):
            c0, t0 = time.process_time(), time.perf_counter()
            loss = self._step()
            jax.block_until_ready((self.params, self.opt_state, loss))
            if record:
                self.times.append(time.perf_counter() - t0)
                self.cpu_times.append(time.process_time() - c0)
        return float(loss)

    def run_pipelined(self, n) -> float:
        """Seconds per step of ``n`` steps dispatched back to back and waited for once at the
        end, as the train loop runs them (the host dispatches step t+1 while the device runs
        step t); :meth:`run` waits after every step, so each of its times also holds one
        dispatch and one wait."""
        t0 = time.perf_counter()
        for _ in range(n):
            loss = self._step()
        jax.block_until_ready((self.params, self.opt_state, loss))
        return (time.perf_counter() - t0) / n

    def _step(self):
        """Dispatches one step, threading the donated state; returns its loss (not waited)."""
        self.params, self.opt_state, loss = self.compiled(
            self.params, self.opt_state, self.tokens, self.targets
        )
        return loss


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=8, help="timed steps per model per round")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    p.add_argument(
        "--plain-flat", action="store_true",
        help="also time a third model: the plain Llama with its Dense layers applied to "
        "(batch·seq, d) activations (2-D weight gradients; same math)",
    )
    args = p.parse_args(argv)

    dtype = DTYPES[args.dtype]
    load_before = os.getloadavg()[0]
    rng = np.random.default_rng(0)
    data = rng.integers(0, VOCAB, size=(args.batch, args.seq + 1), dtype=np.int32)
    tokens, targets = jnp.asarray(data[:, :-1]), jnp.asarray(data[:, 1:])

    runners = [
        Runner("ours (u-μP)", *build_umup(args, args.dtype), tokens, targets),
        Runner("plain (SP)", *build_plain(args, dtype), tokens, targets),
    ]
    if args.plain_flat:
        runners.append(
            Runner("plain-flat", *build_plain(args, dtype, flat=True), tokens, targets)
        )
    for r in runners:
        r.run(args.warmup, record=False)

    round_medians = {r.name: [] for r in runners}
    for i in range(args.rounds):
        order = runners if i % 2 == 0 else runners[::-1]  # A,B then B,A: no fixed position
        for r in order:
            n0 = len(r.times)
            r.last_loss = r.run(args.steps)
            round_medians[r.name].append(statistics.median(r.times[n0:]))

    ours, plain = runners[:2]
    med = {r.name: statistics.median(r.times) * 1e3 for r in runners}
    cpu = {r.name: statistics.median(r.cpu_times) * 1e3 for r in runners}
    ratio = med[ours.name] / med[plain.name]
    cpu_ratio = cpu[ours.name] / cpu[plain.name]
    per_round = [a / b for a, b in zip(round_medians[ours.name], round_medians[plain.name])]
    dev = jax.devices()[0]

    print()
    print(f"jax {jax.__version__}, flax {flax.__version__}, optax {optax.__version__}, "
          f"umup_jax {umup_jax.__version__} ({os.path.dirname(umup_jax.__file__)})")
    print(f"device: {dev.platform} / {dev.device_kind} x{jax.device_count()} "
          f"({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs)")
    print(f"shapes: vocab={VOCAB} width={args.width} depth={args.depth} heads={NUM_HEADS} "
          f"ffn={FFN_EXPANSION}x seq={args.seq} batch={args.batch} dtype={args.dtype}; "
          f"{args.rounds} rounds x {args.steps} steps, interleaved")
    load_after = os.getloadavg()[0]
    # This process itself keeps about os.cpu_count() threads busy while it runs.
    busy = load_before > 1.0 or load_after > (os.cpu_count() or 1) + 1.0
    print(f"1-min load average before/after: {load_before:.1f}/{load_after:.1f}"
          + ("  (other processes compete for the CPUs: trust the CPU-time ratio more)"
             if busy else ""))
    print()
    print(f"{'model':<14}{'params':>11}{'compile s':>11}{'median ms':>11}"
          f"{'min ms':>9}{'max ms':>9}{'cpu ms':>9}{'loss':>9}")
    for r in runners:
        print(f"{r.name:<14}{r.num_params:>11,}{r.compile_s:>11.1f}{med[r.name]:>11.2f}"
              f"{min(r.times) * 1e3:>9.2f}{max(r.times) * 1e3:>9.2f}{cpu[r.name]:>9.1f}"
              f"{r.last_loss:>9.3f}")
    print()
    print(f"ratio ours/plain (median step time): {ratio:.3f}   "
          f"(per-round: {', '.join(f'{x:.3f}' for x in per_round)})")
    print(f"ratio ours/plain (median CPU time per step, less sensitive to other load): "
          f"{cpu_ratio:.3f}")
    if len(runners) > 2:
        flat = runners[2]
        print(f"ratio ours/plain-flat (median step time): {med[ours.name] / med[flat.name]:.3f}"
              f"   (CPU time: {cpu[ours.name] / cpu[flat.name]:.3f})")
    print(f"target ours/plain <= 1.05: {'PASS' if ratio <= 1.05 else 'FAIL'}")
    return ratio


if __name__ == "__main__":
    main()
