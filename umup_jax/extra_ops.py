"""The authors' other unit-scaled ops (``unit_scaling.functional`` 0.3.5), for architectures
other than our Llama decoder: a matrix product of two activations (spec §5.4), standalone SiLU
and GELU for non-gated FFNs (§5.7), softmax (§5.8), dropout (§5.13), LayerNorm and RMSNorm with
a gain and bias (§5.5) and the MSE loss (§5.15).  The decoder uses none of them; the ops it
uses are in :mod:`umup_jax.ops`, whose primitives these are built from.

As there, every scale is a Python float from static shapes.  An elementwise op with ideal
output scale ``s_y`` and input-gradient scale ``s_x`` is ``scale_fwd(f(scale_bwd(x, s_x)),
s_y)`` after the constraint (``scale_elementwise``, spec §1.5); the default
``to_output_scale`` uses ``s_y`` for both, which a residual branch needs (spec §1.2).
Every formula below is the authors' (``tests/test_extra_ops.py`` compares each op with
``unit_scaling`` in float64).  Softmax, the norms and the MSE loss compute in fp32 and return
the input's dtype, as under torch autocast.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from umup_jax import ops


def _positive_mult(mult) -> float:
    mult = ops._static_scale(mult)
    if not mult > 0.0:
        raise ValueError(f"mult={mult} is invalid: it must be > 0")
    return mult


def _elementwise(f, x, out_scale: float, grad_scale: float, constraint: Optional[str]):
    """``scale_elementwise`` (spec §1.5): ``scale_fwd(f(scale_bwd(x, s_x)), s_y)`` with the
    constraint applied to ``(s_y, s_x)`` first."""
    out_scale, grad_scale = ops.apply_constraint(constraint, out_scale, grad_scale)
    return ops.scale_fwd(f(ops.scale_bwd(x, grad_scale)), out_scale)


def matmul(left, right, constraint: Optional[str] = "to_output_scale"):
    """Unit-scaled ``left @ right`` for left (…, m, k) and right (…, k, n) (spec §5.4).

    Ideal scales: output ``k^-½``, left gradient ``n^-½``, right gradient ``m^-½``; the default
    ``to_output_scale`` makes all three ``k^-½``; ``to_left_grad_scale`` and
    ``to_right_grad_scale`` choose one gradient's, ``None`` keeps all three."""
    if left.ndim < 2 or right.ndim < 2 or left.shape[-1] != right.shape[-2]:
        raise ValueError(f"matmul of {left.shape} and {right.shape}: need (..., m, k) @ "
                         "(..., k, n)")
    m, k = left.shape[-2:]
    n = right.shape[-1]
    out_scale, left_scale, right_scale = ops.apply_constraint(
        constraint, k**-0.5, n**-0.5, m**-0.5)
    out = jnp.matmul(ops.scale_bwd(left, left_scale), ops.scale_bwd(right, right_scale))
    return ops.scale_fwd(out, out_scale)


# Output std of swish and GELU over unit-normal input, in the one-hot (large mult) limit.
_ACTIVATION_UPPER = math.sqrt(2.0 / (1.0 - 1.0 / math.pi))


def silu_scales(mult: float = 1.0) -> tuple[float, float]:
    """(output, input-gradient) scales of :func:`silu` (spec §5.7):
    ``logint(1/(1 + ¼/m²), 2, √(2/(1−1/π)))`` and ``logint(1/(1 + 1/m²), 2, √2)``;
    1.7668 and 1.6818 at m = 1."""
    mult = _positive_mult(mult)
    out = ops.logarithmic_interpolation(1.0 / (1.0 + 0.25 / mult**2), 2.0, _ACTIVATION_UPPER)
    grad = ops.logarithmic_interpolation(1.0 / (1.0 + 1.0 / mult**2), 2.0, math.sqrt(2.0))
    return out, grad


def silu(x, mult: float = 1.0, constraint: Optional[str] = "to_output_scale"):
    """Unit-scaled SiLU with temperature m = ``mult``: ``x·σ(m·x)`` (= silu(m·x)/m), scales
    :func:`silu_scales`."""
    out, grad = silu_scales(mult)
    return _elementwise(lambda t: t * jax.nn.sigmoid(t * mult), x, out, grad, constraint)


def gelu_scales(mult: float = 1.0) -> tuple[float, float]:
    """(output, input-gradient) scales of :func:`gelu` (spec §5.7):
    ``logint(1/(1 + ¼/m²), 2, √(2/(1−1/π)))`` and ``logint(1/(1 + ¼/m²), 2, √2)``;
    1.7668 and 1.5157 at m = 1."""
    mult = _positive_mult(mult)
    alpha = 1.0 / (1.0 + 0.25 / mult**2)
    return (ops.logarithmic_interpolation(alpha, 2.0, _ACTIVATION_UPPER),
            ops.logarithmic_interpolation(alpha, 2.0, math.sqrt(2.0)))


def gelu(x, mult: float = 1.0, constraint: Optional[str] = "to_output_scale",
         approximate: bool = False):
    """Unit-scaled GELU with temperature m = ``mult``: ``gelu(m·x)/m``, scales
    :func:`gelu_scales`.  The exact (erf) GELU by default, as torch's ``F.gelu``;
    ``approximate=True`` gives the tanh form (torch's ``approximate="tanh"``)."""
    out, grad = gelu_scales(mult)

    def f(t):
        if mult == 1.0:
            return jax.nn.gelu(t, approximate=approximate)
        return jax.nn.gelu(t * mult, approximate=approximate) / mult

    return _elementwise(f, x, out, grad, constraint)


def softmax_scales(size: int, mult: float = 1.0) -> tuple[float, float]:
    """(output, input-gradient) scales of :func:`softmax` over ``size`` entries (spec §5.8):
    ``logint(α, n, √n)`` and ``logint(α, n/m, √(n/m))`` with ``α = 1/(1 + 4/m²)``, between
    the flat (α → 0) and the one-hot (α → 1) limit."""
    mult = _positive_mult(mult)
    alpha = 1.0 / (1.0 + 4.0 / mult**2)
    return (ops.logarithmic_interpolation(alpha, size, size**0.5),
            ops.logarithmic_interpolation(alpha, size / mult, (size / mult) ** 0.5))


def softmax(x, axis: int = -1, mult: float = 1.0,
            constraint: Optional[str] = "to_output_scale"):
    """Unit-scaled ``softmax(m·x)`` along ``axis`` (fp32 inside), scales
    :func:`softmax_scales` of that axis' size.  The fit is rough at m = 1; the authors test
    m = ¼."""
    out, grad = softmax_scales(x.shape[axis], mult)

    def f(t):
        return jax.nn.softmax(t.astype(jnp.float32) * mult, axis=axis).astype(t.dtype)

    return _elementwise(f, x, out, grad, constraint)


def dropout(x, rate: float, key=None, deterministic: bool = False):
    """Unit-scaled dropout (spec §5.13): the usual ``mask·x/(1−p)`` with the forward and the
    gradient scaled by ``√(1−p)`` (unconstrained), so both stay unit: ``mask·x/√(1−p)``.
    ``deterministic`` (evaluation) gives ``x·√(1−p)``, the training output's expectation, as
    the authors' op with ``training=False``.  ``key`` is a ``jax.random`` key (needed unless
    deterministic or ``rate`` is 0)."""
    rate = ops._static_scale(rate)
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate={rate} is invalid: it must be in [0, 1)")
    scale = (1.0 - rate) ** 0.5

    def f(t):
        if deterministic or rate == 0.0:
            return t
        if key is None:
            raise ValueError("dropout needs a jax.random key unless deterministic")
        keep = jax.random.bernoulli(key, 1.0 - rate, t.shape)
        return jnp.where(keep, t / (1.0 - rate), jnp.zeros((), t.dtype))

    return _elementwise(f, x, scale, scale, None)


def _affine_grad_scale(x, normalized_ndim: int) -> float:
    """``√(prod(normalized_shape)/numel)`` = ``B_tok^-½``: the gain's and bias's gradient sums
    over every token, so this makes it unit (spec §5.5)."""
    return (math.prod(x.shape[x.ndim - normalized_ndim:]) / x.size) ** 0.5


def _check_affine(x, normalized_ndim: int, **params) -> None:
    if not 1 <= normalized_ndim <= x.ndim:
        raise ValueError(f"normalized_ndim={normalized_ndim} is invalid for input of shape "
                         f"{x.shape}")
    shape = x.shape[x.ndim - normalized_ndim:]
    for name, p in params.items():
        if p is not None and p.shape != shape:
            raise ValueError(f"{name} of shape {p.shape} != the normalized shape {shape}")


def layer_norm(x, weight=None, bias=None, eps: float = 1e-5, normalized_ndim: int = 1):
    """Unit-scaled LayerNorm over the last ``normalized_ndim`` axes (spec §5.5):
    ``(x − mean)/√(var + ε)·weight + bias`` (biased variance, fp32 inside), no scales on x in
    either pass (already unit); the gradients of ``weight`` and ``bias`` (shaped like the
    normalized axes) are scaled by ``√(prod(normalized_shape)/numel)``."""
    _check_affine(x, normalized_ndim, weight=weight, bias=bias)
    axes = tuple(range(x.ndim - normalized_ndim, x.ndim))
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=axes, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    s = _affine_grad_scale(x, normalized_ndim)
    if weight is not None:
        y = y * ops.scale_bwd(weight, s)
    if bias is not None:
        y = y + ops.scale_bwd(bias, s)
    return y.astype(x.dtype)


def rms_norm(x, weight=None, eps: float = 1e-5):
    """Unit-scaled RMSNorm over the last axis with an optional gain (spec §5.5):
    :func:`umup_jax.ops.rms_norm` (``x/√(mean(x²) + ε)``, no scales) times ``weight``, whose
    gradient is scaled by ``√(d/numel)`` = ``B_tok^-½``."""
    _check_affine(x, 1, weight=weight)
    y = ops.rms_norm(x, eps)
    if weight is None:
        return y
    return (y * ops.scale_bwd(weight, _affine_grad_scale(x, 1))).astype(x.dtype)


def mse_loss(x, target, reduction: str = "mean"):
    """Unit-scaled MSE (spec §5.15): both inputs' gradients scaled by ``8^-½``, the loss the
    sum of squared differences (fp32), forward-scaled by ``1/numel`` for ``mean`` (so it
    equals the ordinary mean) while the gradient is not divided by it."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r} is invalid: allowed are ('mean', 'sum')")
    if x.shape != target.shape:
        raise ValueError(f"mse_loss needs input and target of one shape, got {x.shape} and "
                         f"{target.shape}")
    s = 8.0**-0.5
    diff = ops.scale_bwd(x, s).astype(jnp.float32) - ops.scale_bwd(target, s).astype(
        jnp.float32)
    loss = jnp.sum(jnp.square(diff))
    return ops.scale_fwd(loss, 1.0 / x.size) if reduction == "mean" else loss
