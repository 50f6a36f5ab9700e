"""The readout and loss over sequence chunks, fused with their backward (``model.loss_chunks``).

At the proxy's shapes the (B, S, V) fp32 logits, their softmax and their gradient are most of
a train step's temporary memory (16384 tokens × 32000 vocabulary: 2 GiB each).
:func:`chunked_readout_loss` never holds them whole: the sequence is cut into c chunks and a
``lax.scan`` goes through them one at a time.  When the loss is differentiated, each chunk's
gradients (w.r.t. its readout input, the readout weight and an FP8 probe) are computed right
after its loss, inside the same scan step, by ``jax.vjp`` of exactly the function the unchunked
model computes (the rule's readout and :meth:`~umup_jax.parametrization.Parametrization.loss_sum`
made a mean by :meth:`~umup_jax.parametrization.Parametrization.loss_from_sum`, custom VJPs,
unit scales and FP8 casts included); the backward pass then only scales them by the incoming
cotangent.  So a chunk's logits live for one scan step, and the readout's three matmuls
(forward, input gradient, weight gradient) run once each, as without chunks: no
recomputation (the idea of fused linear cross-entropy kernels).

Because ``loss_from_sum`` is linear, the sum over chunks of ``loss_from_sum(chunk's sum)`` is
the mean loss, and each chunk's vjp at cotangent 1 is its exact share of the gradient: the same
per-logit gradient (u-μP: (softmax(m·z) − onehot)·V/√(V−1); SP/μP: the same over N) and the
same readout backward scales (u-μP's weight-gradient scale uses the whole call's token count,
which the caller passes to the readout).  Loss and gradients equal the unchunked ones up to the
order of summation.  An FP8 readout's cast statistics (its probe's gradient) are the mean of
the chunks' fractions, which for equal chunks are the whole call's.

Under data parallelism each chunk's readout weight gradient (and loss) is a partial sum over
each replica's batch rows.  Summed into a replicated carry, XLA all-reduces it inside the
scan, once per chunk (8 forced CPU devices, mesh (8, 1, 1), c = 4: four (f32[], D×V)
all-reduces in the loop body besides the step's gradient all-reduce; XLA's GPU pipeline,
compiled for 8 H100s, keeps them in the loop too: its ``WhileLoopAllReduceCodeMotion`` does
not move them).  Under FSDP it is worse: the readout weight, split over ``fsdp``, is
all-gathered in every chunk and each chunk's gradient reduce-scattered.  So where the
trainer's :func:`~umup_jax.sharding.activation_mesh` splits the batch over mesh axes
(n > 1 batch replicas over ``data`` and ``fsdp``,
:func:`~umup_jax.sharding.batch_replicas`), the backward's scan keeps one running sum per
replica: each chunk is viewed as (n, B/n, S/c, D), a ``jax.vmap(…, spmd_axis_name=axes)``
computes each replica's vjp, the readout weight is gathered over those axes once, before
the scan (its tensor-parallel split kept), and the (n, D, V) fp32 carry is split over the
axes, one whole D×V per device.  The replicas' fp32 sums are added once after the scan
(then cast to the readout weight's dtype, as without replicas), so the step reduces the
readout gradient once instead of c times: for data parallelism 4·D·V bytes where XLA's
GPU pipeline had sent c·2·D·V in bf16 compute, fewer from c = 3 on, and no rounding to
bf16 before the replicas' sum.  Under FSDP each device holds the gathered weight and a
whole fp32 D×V through the scan where it held 1/fsdp of them (at the ~1B model's 2048 ×
32000, 375 MiB instead of 47 MiB on 8 devices; its step's plan moved by −0.35 to +0.18 GiB).
A tensor-parallel vocabulary still reduces each chunk's logsumexp over ``tensor`` in the
loop: that is the loss's own.

A custom VJP has no forward-mode rule: ``jax.jvp`` through the chunked loss fails (nothing in
umup-jax uses forward mode; with ``loss_chunks=1`` the model is plain autodiff again).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def chunked_readout_loss(x, w, targets, probe: Optional[jax.Array], *, chunks: int,
                         readout: Callable, loss_sum: Callable, loss_from_sum: Callable,
                         replicas: Optional[tuple[Mesh, Sequence[str]]] = None,
                         gathered_w: Optional[NamedSharding] = None):
    """(mean loss, RMS of the logits) of ``loss_from_sum(Σ_c loss_sum(readout(x_c, w, p), t_c),
    B·S)`` over ``chunks`` equal chunks of the sequence axis of ``x`` (B, S, D) and
    ``targets`` (B, S).

    ``readout(x_c, w, probe)`` gives a chunk's logits (``probe`` is ``None`` when ``probe`` is);
    ``loss_sum(logits, targets)`` and ``loss_from_sum(total, num_tokens)`` are the rule's.  The
    RMS (a scalar, no gradient) is what the activation metrics read of the logits.

    ``replicas``: ``(mesh, axes)`` of a batch split over those mesh axes
    (:func:`umup_jax.sharding.batch_replicas`): the backward then sums each batch replica's
    readout gradient apart and adds them once, with ``w`` constrained to ``gathered_w``
    (its sharding without those axes: FSDP's weight gathered once, before the scan) where
    given (module docstring).  The batch must divide into the replicas.
    """
    b, s, d = x.shape
    if s % chunks or targets.shape != (b, s):
        raise ValueError(f"loss_chunks={chunks} needs targets of shape {(b, s)} and a sequence "
                         f"length divisible by {chunks}; got targets {targets.shape}, length {s}")
    n = b * s
    has_probe = probe is not None
    p0 = probe if has_probe else jnp.zeros((0,), jnp.float32)

    def split(a):  # (B, S, …) → (c, B, S/c, …): each chunk keeps the batch axis (and sharding)
        return jnp.swapaxes(a.reshape(b, chunks, s // chunks, *a.shape[2:]), 0, 1)

    def unsplit(a):
        return jnp.swapaxes(a, 0, 1).reshape(b, s, *a.shape[3:])

    def chunk_loss(xc, w, tc, p):
        logits = readout(xc, w, p if has_probe else None).astype(jnp.float32)
        mean_square = jax.lax.stop_gradient(jnp.mean(jnp.square(logits)))
        return loss_from_sum(loss_sum(logits, tc), n), mean_square

    @jax.custom_vjp
    def fused(x, w, targets, p):
        def body(total, inputs):
            xc, tc = inputs
            loss, mean_square = chunk_loss(xc, w, tc, p)
            return total + loss, mean_square

        total, mean_squares = jax.lax.scan(body, jnp.zeros((), jnp.float32),
                                           (split(x), split(targets)))
        return total, jnp.sqrt(jnp.mean(mean_squares))

    axes = tuple(replicas[1]) if replicas is not None else ()
    n_rep = math.prod(replicas[0].shape[a] for a in axes) if axes else 1
    if b % n_rep:
        raise ValueError(f"a batch of {b} rows does not split into {n_rep} replicas over "
                         f"the mesh axes {axes}")

    def by_replica(a):  # (c, B, …) → (c, n, B/n, …), the n replicas' rows over `axes`
        a = a.reshape(chunks, n_rep, b // n_rep, *a.shape[2:])
        spec = PartitionSpec(None, axes)
        return jax.lax.with_sharding_constraint(a, NamedSharding(replicas[0], spec))

    def chunk_grads(xc, w, tc, p):
        """A chunk's (loss, mean square, (dx, dw, dprobe)) at cotangent 1."""
        (loss, mean_square), vjp = jax.vjp(lambda xc_, w_, p_: chunk_loss(xc_, w_, tc, p_),
                                           xc, w, p)
        return loss, mean_square, vjp((jnp.ones_like(loss), jnp.zeros_like(mean_square)))

    def fused_fwd(x, w, targets, p):
        if n_rep > 1:  # every value below has a leading (n,) replica axis, split over axes
            grads = jax.vmap(chunk_grads, in_axes=(0, None, 0, None), spmd_axis_name=axes)
            xs = (by_replica(split(x)), by_replica(split(targets)))
            if gathered_w is not None:  # gathered once here, not in every chunk
                w = jax.lax.with_sharding_constraint(w, gathered_w)
            mesh = replicas[0]
            keep = PartitionSpec.UNCONSTRAINED
            lead = lambda shape, dtype: jax.lax.with_sharding_constraint(  # noqa: E731
                jnp.zeros((n_rep, *shape), dtype),
                NamedSharding(mesh, PartitionSpec(axes, *([keep] * len(shape)))))
        else:
            grads, xs = chunk_grads, (split(x), split(targets))
            lead = jnp.zeros  # noqa: E731

        def body(carry, inputs):
            total, dw, dp = carry
            xc, tc = inputs
            loss, mean_square, (dxc, dwc, dpc) = grads(xc, w, tc, p)
            carry = (total + loss, dw + dwc.astype(jnp.float32), dp + dpc)
            return carry, (dxc, mean_square)

        init = (lead((), jnp.float32), lead(w.shape, jnp.float32), lead(p.shape, p.dtype))
        (total, dw, dp), (dx, mean_squares) = jax.lax.scan(body, init, xs)
        if n_rep > 1:  # the replicas' sums, added once: the readout gradient's one all-reduce
            total, dw, dp = jnp.sum(total, 0), jnp.sum(dw, 0), jnp.mean(dp, 0)
            dx = dx.reshape(chunks, b, *dx.shape[3:])
        out = (total, jnp.sqrt(jnp.mean(mean_squares)))
        return out, (unsplit(dx), dw.astype(w.dtype), dp / chunks)

    def fused_bwd(res, cotangents):
        dx, dw, dp = res
        g = cotangents[0]  # the RMS output carries no gradient
        # The probe's gradient is its statistics, whatever the cotangent (as fp8.fp8_dot's).
        return (g.astype(dx.dtype) * dx, g.astype(dw.dtype) * dw, None, dp)

    fused.defvjp(fused_fwd, fused_bwd)
    return fused(x, w, targets, p0)
