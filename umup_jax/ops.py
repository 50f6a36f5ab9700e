"""Unit-scaled ops (u-μP paper §2, App. B; spec §1 and §5), as pure JAX.

Every op first computes its ideal scales from *static* shapes as Python floats, then applies
them with two primitives:

* ``scale_fwd(x, s)``: forward ``s·x``, backward passes the gradient through unchanged;
* ``scale_bwd(x, s)``: forward identity, backward ``s·g``.

Both are ``jax.custom_vjp`` identities with ``s`` a non-differentiable Python float, so no
scale is ever a traced value and nothing relies on ``stop_gradient`` arithmetic.  Ops that must
not change the gradient's ratio along a residual branch are *constrained* (spec §1.2): the
``to_output_scale`` constraint uses the forward scale for the input gradient as well.

Layouts follow Flax: a linear weight is ``(fan_in, fan_out)``; attention tensors are
``(batch, seq, heads, head_dim)``.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp

# ---------------------------------------------------------------------------------------------
# Primitives (spec §1.1, §1.2, §1.3)
# ---------------------------------------------------------------------------------------------


def times(x, scale: float):
    """``x·scale`` for a Python float ``scale``, with the scale exact in any precision.

    JAX casts a Python float to a bf16 (or fp16) array's dtype before multiplying, so
    ``x * 0.0360844`` on bf16 would scale by 0.0361328 (the scale itself rounded: up to 2⁻⁹,
    0.39%, off the formula's value, the same way at every element and step).  A low-precision
    ``x`` is therefore multiplied in fp32 and rounded once, as PyTorch (the authors'
    ``unit_scaling``) multiplies a bf16 tensor by a Python scalar in its fp32 "opmath"; XLA
    fuses the converts into the multiply.  fp32 and wider: ``x * scale`` itself."""
    if jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits < 32:
        return (x.astype(jnp.float32) * scale).astype(x.dtype)
    return x * scale


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _scale_fwd(x, scale: float):
    return times(x, scale)


def _scale_fwd_fwd(x, scale):
    return times(x, scale), None


def _scale_fwd_bwd(scale, _, g):
    return (g,)


_scale_fwd.defvjp(_scale_fwd_fwd, _scale_fwd_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _scale_bwd(x, scale: float):
    return x


def _scale_bwd_fwd(x, scale):
    return x, None


def _scale_bwd_bwd(scale, _, g):
    return (times(g, scale),)


_scale_bwd.defvjp(_scale_bwd_fwd, _scale_bwd_bwd)


def _static_scale(scale) -> float:
    if isinstance(scale, jax.Array) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a Python float from static shapes, got {type(scale)}")
    return float(scale)


def scale_fwd(x, scale: float):
    """Forward ``scale·x``; the backward pass returns the incoming gradient unchanged."""
    scale = _static_scale(scale)
    return x if scale == 1.0 else _scale_fwd(x, scale)


def scale_bwd(x, scale: float):
    """Forward identity; the backward pass returns ``scale·g``."""
    scale = _static_scale(scale)
    return x if scale == 1.0 else _scale_bwd(x, scale)


def logarithmic_interpolation(alpha: float, lower: float, upper: float) -> float:
    """Geometric interpolation exp(α·ln upper + (1−α)·ln lower): α=0 → lower, α=1 → upper."""
    return math.exp(alpha * math.log(upper) + (1.0 - alpha) * math.log(lower))


CONSTRAINTS = (None, "to_output_scale", "to_grad_input_scale", "to_left_grad_scale",
               "to_right_grad_scale", "gmean", "hmean", "amean")


def apply_constraint(constraint: Optional[str], *scales: float) -> tuple[float, ...]:
    """Maps an op's ideal (output, grad-input, …) scales to one shared value (spec §1.2).

    ``None``/``""`` leaves them unconstrained; ``to_output_scale`` (the u-μP default) uses the
    output scale for all; ``to_grad_input_scale`` the first gradient scale; for an op with two
    inputs, (output, left gradient, right gradient) such as :func:`umup_jax.extra_ops.matmul`,
    ``to_left_grad_scale`` and ``to_right_grad_scale`` the left's or the right's; ``gmean``,
    ``hmean``, ``amean`` their geometric, harmonic and arithmetic means.
    """
    if constraint is None or constraint == "":
        return tuple(scales)
    if constraint in ("to_left_grad_scale", "to_right_grad_scale") and len(scales) != 3:
        raise ValueError(f"constraint={constraint!r} needs an op with three scales (output, "
                         f"left gradient, right gradient), got {len(scales)}")
    if constraint == "to_output_scale":
        s = scales[0]
    elif constraint in ("to_grad_input_scale", "to_left_grad_scale"):
        s = scales[1]
    elif constraint == "to_right_grad_scale":
        s = scales[2]
    elif constraint == "gmean":
        s = math.prod(scales) ** (1.0 / len(scales))
    elif constraint == "hmean":
        s = len(scales) / sum(1.0 / x for x in scales)
    elif constraint == "amean":
        s = sum(scales) / len(scales)
    else:
        raise ValueError(f"constraint={constraint!r} is invalid: allowed are {CONSTRAINTS}")
    return tuple(s for _ in scales)


# ---------------------------------------------------------------------------------------------
# Linear layers (spec §5.1, §5.2)
# ---------------------------------------------------------------------------------------------


def linear(
    x,
    w,
    bias=None,
    constraint: Optional[str] = "to_output_scale",
    scale_power: tuple[float, float, float] = (0.5, 0.5, 0.5),
    dot=None,
    tokens: Optional[int] = None,
):
    """Unit-scaled ``y = (x·w + b)·fan_in^-p0`` with w of shape (fan_in, fan_out).

    Ideal scales: output ``fan_in^-p0``, input gradient ``fan_out^-p1``, weight and bias
    gradient ``B_tok^-p2`` with ``B_tok = x.size / fan_in`` (the tokens of this call), or
    ``B_tok = tokens`` when given: with gradient accumulation the train step passes the
    tokens of the whole optimizer step, so that the micro-batches' weight gradients sum to the
    full batch's (spec §11.3, Aleph Alpha's convention of global tokens per step).  The default
    ``to_output_scale`` constraint makes the input-gradient scale ``fan_in^-1/2`` too, which a
    residual branch needs (spec §1.2).  The bias sits inside the scaled product as in the
    authors' library.  ``dot(x, w)`` replaces the matmul (e.g. :func:`umup_jax.fp8.fp8_dot`);
    the scales stay outside it, so FP8 casts see unit-scale operands (spec §8).  Without
    ``dot`` the scales are folded into one custom-VJP matmul (:func:`_scaled_matmul`).
    """
    if w.ndim != 2:
        raise ValueError(f"linear weight must be (fan_in, fan_out), got shape {w.shape}")
    fan_in, fan_out = w.shape
    if x.shape[-1] != fan_in:
        raise ValueError(f"linear input last dim {x.shape[-1]} != weight fan_in {fan_in}")
    batch = x.size // fan_in if tokens is None else _token_count(tokens)
    out_scale = fan_in ** -scale_power[0]
    grad_in_scale = fan_out ** -scale_power[1]
    grad_w_scale = batch ** -scale_power[2]
    out_scale, grad_in_scale = apply_constraint(constraint, out_scale, grad_in_scale)
    if dot is None:
        # The plain matmul: one custom-VJP op applying each scale to its smaller operand.
        y = _scaled_matmul(x, w, out_scale, grad_in_scale, grad_w_scale)
        if bias is not None:
            y = y + scale_fwd(scale_bwd(bias, grad_w_scale), out_scale)
        return y
    x = scale_bwd(x, grad_in_scale)
    w = scale_bwd(w, grad_w_scale)
    y = dot(x, w)
    if bias is not None:
        y = y + scale_bwd(bias, grad_w_scale)
    return scale_fwd(y, out_scale)


def matmul(x, w, scale: float = 1.0):
    """``scale·(x @ w)`` for x of shape (…, fan_in) and w (fan_in, fan_out), with the
    gradients of that formula: ``scale·(g @ wᵀ)`` for x and ``scale·(xᵀ @ g)`` for w
    (:func:`_scaled_matmul` with the one scale in all three places).  The plain rules' (SP,
    μP) linear layers."""
    if w.ndim != 2 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"matmul of {x.shape} and {w.shape}: need (..., n) @ (n, m)")
    s = _static_scale(scale)
    return _scaled_matmul(x, w, s, s, s)


def _matmul_scaled(x, w, scale: float, out_size: int):
    """``scale·(x @ w)``, multiplying whichever of ``w`` and the output is smaller (the weight,
    for any layer that sees more tokens than its fan-in)."""
    if scale == 1.0:
        return jnp.matmul(x, w)
    if w.size <= out_size:
        return jnp.matmul(x, times(w, scale))
    return times(jnp.matmul(x, w), scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _scaled_matmul(x, w, out_scale: float, grad_in_scale: float, grad_w_scale: float):
    """``out_scale·(x @ w)`` whose backward is ``grad_in_scale·(g @ wᵀ)`` for x and
    ``grad_w_scale·(xᵀ @ g)`` for w: the values of ``scale_fwd``/``scale_bwd`` around a
    matmul, but every scale multiplies the smaller operand (normally the weight), so no
    activation-sized elementwise pass is added in either direction, and the weight gradient is
    one 2-D ``(tokens, fan_in)ᵀ @ (tokens, fan_out)`` product (no transposed copy of g)."""
    return _matmul_scaled(x, w, out_scale, x.size // w.shape[0] * w.shape[1])


def _scaled_matmul_fwd(x, w, out_scale, grad_in_scale, grad_w_scale):
    return _matmul_scaled(x, w, out_scale, x.size // w.shape[0] * w.shape[1]), (x, w)


def _scaled_matmul_bwd(out_scale, grad_in_scale, grad_w_scale, res, g):
    x, w = res
    dx = _matmul_scaled(g, w.T, grad_in_scale, x.size)
    dw = jnp.matmul(x.reshape(-1, x.shape[-1]).T, g.reshape(-1, g.shape[-1]))
    if grad_w_scale != 1.0:
        dw = times(dw, grad_w_scale)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_scaled_matmul.defvjp(_scaled_matmul_fwd, _scaled_matmul_bwd)


def linear_readout(x, w, bias=None, constraint: Optional[str] = None, dot=None,
                   tokens: Optional[int] = None):
    """The u-μP readout: forward ``1/fan_in`` (μP's output multiplier), input gradient
    ``1/√fan_out`` (unit scaling), weight gradient ``1/√B_tok``; unconstrained, which is legal
    after the last residual add (spec §5.2).  ``tokens`` as in :func:`linear`."""
    return linear(x, w, bias, constraint=constraint, scale_power=(1.0, 0.5, 0.5), dot=dot,
                  tokens=tokens)


def _token_count(tokens) -> int:
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0:
        raise TypeError(f"tokens must be a static Python int > 0, got {tokens!r}")
    return tokens


# ---------------------------------------------------------------------------------------------
# Embedding, normalisation, activations
# ---------------------------------------------------------------------------------------------


def embedding(table, ids, tokens: Optional[int] = None):
    """Gather rows of a (V, d) table; the table gradient is scaled by √(V/B_tok) (spec §5.3),
    with ``B_tok = ids.size`` or ``tokens`` when given (as in :func:`linear`)."""
    vocab = table.shape[0]
    batch = ids.size if tokens is None else _token_count(tokens)
    table = scale_bwd(table, (vocab / batch) ** 0.5)
    return jnp.take(table, ids, axis=0)


def rms_norm(x, eps: float = 1e-5, dtype=None):
    """Non-trainable RMSNorm ``y = x / d`` with ``d = √(mean(x²) + ε)`` over the last axis and
    the mean in fp32 (spec §5.5).  Scale-invariant already, so no scales in either pass.
    ``dtype``: the output's (default x's), e.g. an fp32 residual stream normalised into the
    bf16 input of the next matmul; the gradient has x's dtype.

    A custom VJP: the backward is ``∂x = (g − y·mean(g·y)) / d`` in fp32, from the output ``y``
    (the next matmul saves it anyway) and ``d`` (one value per token).  Autodiff of the
    formula would keep ``x``, ``x²``, ``d``, ``1/d`` and ``1/d²`` for the backward pass: two
    more activation-sized arrays per norm.
    """
    out = jnp.dtype(x.dtype if dtype is None else dtype)
    return _rms_norm(x, float(eps), jnp.dtype(x.dtype), out)


def _rms_norm_fwd_parts(x, eps, out_dtype):
    ms = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
    d = jnp.sqrt(ms + eps)
    return (x / d.astype(x.dtype)).astype(out_dtype), d


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _rms_norm(x, eps: float, in_dtype, out_dtype):
    return _rms_norm_fwd_parts(x, eps, out_dtype)[0]


def _rms_norm_fwd(x, eps, in_dtype, out_dtype):
    y, d = _rms_norm_fwd_parts(x, eps, out_dtype)
    return y, (y, d)


def _rms_norm_bwd(eps, in_dtype, out_dtype, res, g):
    y, d = res
    y32, g32 = y.astype(jnp.float32), g.astype(jnp.float32)
    dx = (g32 - y32 * jnp.mean(g32 * y32, axis=-1, keepdims=True)) / d
    return (dx.astype(in_dtype),)


_rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


def silu_glu_scale(mult: float = 1.0) -> float:
    """s(m) = logint(1/(1+1/m²), 2, √2); s(1) = 2^¾ (spec §5.6)."""
    return logarithmic_interpolation(1.0 / (1.0 + 1.0 / mult**2), 2.0, 2.0**0.5)


def silu_glu(x_in, x_gate, mult: float = 1.0):
    """Unit-scaled gated SiLU ``s(m) · x_in · x_gate · σ(m·x_gate)`` with m = α_ffn-act
    (spec §5.6): :func:`gated_silu` with the scale s(m) of :func:`silu_glu_scale`.

    One scale s(m) for the output and both input gradients (constrained by construction): the
    authors' ``scale_fwd(x_in·x_gate·σ(m·x_gate), s)`` with ``scale_bwd(·, s)`` on both inputs,
    whose gradients are exactly those of ``s·x_in·x_gate·σ(m·x_gate)``.
    """
    return gated_silu(x_in, x_gate, mult=mult, scale=silu_glu_scale(mult))


def gated_silu(x_in, x_gate, mult: float = 1.0, scale: float = 1.0):
    """``scale · x_in · a(x_gate)`` with ``a(z) = z·σ(m·z)``; SwiGLU's ``up · silu(gate)`` at
    ``mult = scale = 1`` (SP, μP).

    A custom VJP that saves only the two inputs and recomputes σ in the backward (fp32):
    ``∂x_in = scale·g·a(x_gate)``, ``∂x_gate = scale·g·x_in·a'(x_gate)`` with
    ``a'(z) = σ(mz)·(1 + m·z·(1 − σ(mz)))``.  Autodiff of the formula keeps five
    activation-sized arrays of the FFN's hidden width (both inputs, σ, the activation and the
    product); this keeps two, the largest saving per layer of any op.
    """
    return _gated_silu(x_in, x_gate, _static_scale(mult), _static_scale(scale))


def _gated_silu_value(x_in, x_gate, mult, scale):
    """In fp32, rounded to the inputs' dtype once (as the backward computes)."""
    dtype = jnp.result_type(x_in, x_gate)
    z, u = x_gate.astype(jnp.float32), x_in.astype(jnp.float32)
    act = jax.nn.silu(z) if mult == 1.0 else z * jax.nn.sigmoid(z * mult)
    y = u * act
    return (y if scale == 1.0 else y * scale).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _gated_silu(x_in, x_gate, mult: float, scale: float):
    return _gated_silu_value(x_in, x_gate, mult, scale)


def _gated_silu_fwd(x_in, x_gate, mult, scale):
    return _gated_silu_value(x_in, x_gate, mult, scale), (x_in, x_gate)


def _gated_silu_bwd(mult, scale, res, g):
    x_in, x_gate = res
    z, u, g32 = x_gate.astype(jnp.float32), x_in.astype(jnp.float32), g.astype(jnp.float32)
    sig = jax.nn.sigmoid(mult * z)
    gs = g32 * scale
    d_in = gs * (z * sig)
    d_gate = gs * u * (sig * (1.0 + mult * z * (1.0 - sig)))
    return d_in.astype(x_in.dtype), d_gate.astype(x_gate.dtype)


_gated_silu.defvjp(_gated_silu_fwd, _gated_silu_bwd)


def recompute_middle(producer, consumer, inputs: tuple, params: tuple):
    """``consumer(producer(*inputs), *params)`` whose backward recomputes the middle value
    ``h = producer(*inputs)`` from ``inputs`` instead of keeping it.

    The FFN's down-projection keeps its input ``h = up·a(gate)`` (B, S, F) for its weight
    gradient ``hᵀ·g``, while the gated SiLU before it keeps ``up`` and ``gate``, from which
    ``h`` is one elementwise pass: composed this way the block keeps two (B, S, F) arrays
    instead of three (under an FP8 down-projection, which keeps h's FP8 cast, not h, the cast
    is what is no longer kept).
    Both functions' own VJPs run unchanged: the backward is ``jax.vjp`` of ``producer`` at
    ``inputs`` and of ``consumer`` at ``(h, *params)``, so their scales, casts and probe
    statistics are those of the uncomposed call; the consumer's forward output that
    ``jax.vjp`` re-evaluates is unused and XLA removes it.  ``producer`` and ``consumer``
    must close over no traced value (pass arrays through ``inputs`` and ``params``; a
    ``None`` in ``params`` gets a ``None`` cotangent)."""
    return _recompute_middle(producer, consumer, tuple(inputs), tuple(params))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _recompute_middle(producer, consumer, inputs, params):
    return consumer(producer(*inputs), *params)


def _recompute_middle_fwd(producer, consumer, inputs, params):
    return consumer(producer(*inputs), *params), (inputs, params)


def _recompute_middle_bwd(producer, consumer, res, g):
    inputs, params = res
    # Without the barrier XLA's CSE merges the recomputed h with the forward's, keeping it.
    inputs = jax.lax.optimization_barrier(inputs)
    h, producer_vjp = jax.vjp(producer, *inputs)
    _, consumer_vjp = jax.vjp(consumer, h, *params)
    dh, *dparams = consumer_vjp(g)
    return tuple(producer_vjp(dh)), tuple(dparams)


_recompute_middle.defvjp(_recompute_middle_fwd, _recompute_middle_bwd)


# ---------------------------------------------------------------------------------------------
# Attention (spec §5.9)
# ---------------------------------------------------------------------------------------------


ATTENTION_IMPLS = ("xla", "cudnn", "auto")
CUDNN_DTYPES = ("bfloat16", "float16")


def cudnn_attention_unsupported(dtype, head_dim: int, platform: str,
                                compute_capability: Optional[str] = None) -> Optional[str]:
    """Why cuDNN's fused (flash) attention cannot run here, or ``None`` if it can.

    The conditions are those ``jax.nn.dot_product_attention(implementation='cudnn')`` checks
    (jax/_src/cudnn/fused_attention_stablehlo.py): a CUDA GPU of compute capability ≥ 8.0
    (Ampere), q/k/v in bf16 or fp16, and a head dim that is a multiple of 8 and at most 128
    (256 from Hopper, compute capability 9.0, on).  ``platform`` is the JAX platform of the
    devices (``cpu``, ``gpu``, ``tpu``); ``compute_capability`` is the CUDA device's
    (``"9.0"``), ``None`` where the device has none (not a CUDA GPU).
    """
    name = jnp.dtype(dtype).name
    if platform != "gpu" or compute_capability is None:
        return (f"cuDNN attention needs a CUDA GPU, but the JAX devices are {platform!r}"
                + ("" if platform != "gpu" else " without a CUDA compute capability"))
    major_minor = tuple(int(p) for p in str(compute_capability).split(".")[:2])
    if major_minor < (8, 0):
        return (f"cuDNN flash attention needs compute capability >= 8.0 (Ampere), the GPU has "
                f"{compute_capability}")
    if name not in CUDNN_DTYPES:
        return (f"cuDNN attention runs on bf16/fp16 inputs, but the attention inputs are {name} "
                "(model.dtype='bfloat16' makes them bf16)")
    head_max = 256 if major_minor >= (9, 0) else 128
    if head_dim % 8 or head_dim > head_max:
        return (f"cuDNN attention needs a head dim that is a multiple of 8 and <= {head_max} on "
                f"compute capability {compute_capability}, got head_dim={head_dim}")
    return None


def device_platform(devices=None) -> tuple[str, Optional[str]]:
    """(platform, CUDA compute capability or ``None``) of the first of ``devices`` (default:
    ``jax.devices()``)."""
    device = (list(devices) if devices is not None else jax.devices())[0]
    capability = getattr(device, "compute_capability", None) if device.platform == "gpu" else None
    return device.platform, (str(capability) if capability else None)


def resolve_attention_impl(impl: str, dtype, head_dim: int, platform: Optional[str] = None,
                           compute_capability: Optional[str] = None) -> str:
    """The attention kernel ``xla`` or ``cudnn`` for the requested ``impl``:

    * ``xla``: always XLA's einsum-softmax-einsum (:func:`attention_core`);
    * ``cudnn``: cuDNN's fused kernel, or ``ValueError`` saying why it cannot run here
      (:func:`cudnn_attention_unsupported`: not a CUDA GPU, fp32 inputs, a head dim it lacks);
    * ``auto``: ``cudnn`` where it can run, else ``xla``.

    ``platform``/``compute_capability`` default to those of ``jax.devices()[0]``.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl={impl!r} is invalid: allowed are {ATTENTION_IMPLS}")
    if impl == "xla":
        return "xla"
    if platform is None:
        platform, compute_capability = device_platform()
    why = cudnn_attention_unsupported(dtype, head_dim, platform, compute_capability)
    if why is None:
        return "cudnn"
    if impl == "cudnn":
        raise ValueError(f"attention_impl='cudnn' cannot run here: {why}; use "
                         "attention_impl='xla' or 'auto'")
    return "xla"


def attention_core(q, k, v, logit_scale: float, causal: bool = True, impl: str = "xla"):
    """softmax(logit_scale·q·kᵀ [+ causal mask])·v on (B, S, H, D) tensors: the one kernel
    behind every attention op, ``jax.nn.dot_product_attention(q, k, v, scale=logit_scale,
    is_causal=causal, implementation=…)``.

    ``impl`` is resolved by :func:`resolve_attention_impl` (``xla``, ``cudnn`` or ``auto``).
    ``logit_scale`` is a Python float that the kernel applies in both passes.  Numerics of the
    ``xla`` implementation (read in jax 0.10's ``jax/_src/nn/functions.py``): the logits q·kᵀ
    are computed with fp32 output (bf16 inputs use the ``BF16_BF16_F32`` dot algorithm: bf16
    products, fp32 accumulation), scaled and masked in fp32, the softmax is fp32, and the
    probabilities are cast to v's dtype for the probabilities·v product, whose output has v's
    dtype: the same numerics as the einsum attention this replaced (tests/test_attention_impl.py:
    equal to ≤ 2e-7 in fp32, bit-identical in bf16).  cuDNN's flash kernel also accumulates in
    fp32 and never materialises the S×S matrix.
    """
    if q.ndim != 4:
        raise ValueError(f"attention inputs must be (batch, seq, heads, head_dim), got {q.shape}")
    impl = resolve_attention_impl(impl, q.dtype, q.shape[-1])
    with _softmax_saving_probabilities():
        return jax.nn.dot_product_attention(q, k, v, scale=_static_scale(logit_scale),
                                            is_causal=causal, implementation=impl)


def _softmax_saving_probabilities():
    """The context in which ``jax.nn.softmax`` differentiates as ``p·(ġ − Σ p·ġ)`` from its
    output p alone (JAX's opt-in ``jax_softmax_custom_jvp``; default off in jax ≤ 0.12).
    Without it the XLA attention's backward keeps exp(logits), the probabilities, the row
    sums and their inverse squares: one S×S array and two row vectors per head more than
    needed.  A JAX without the flag is taken to have made that rule the only one (it is an
    upgrade flag); tests/test_attention_impl.py checks what the backward keeps on whichever
    JAX runs it."""
    flag = getattr(jax, "softmax_custom_jvp", None)
    return flag(True) if flag is not None else contextlib.nullcontext()


def dot_product_attention(q, k, v, logit_scale: float, causal: bool = True, impl: str = "xla"):
    """Plain attention (SP, μP): :func:`attention_core` with the rule's logit scale."""
    return attention_core(q, k, v, logit_scale, causal=causal, impl=impl)


def attention_scale(seq_len: int, head_dim: int, mult: float = 1.0, causal: bool = True) -> float:
    """The unit-scaled attention output scale (spec §5.9):

        s = 1 / logint(α = 1/(1 + 4·d_head/m²), ℓ, 1),   ℓ = √(ln S/S) causal, √(1/S) not.

    ℓ is the output std of flat attention over unit values; 1 that of one-hot attention.
    s = 3.90204 at S=64, d_head=64, m=1, causal.  Causal attention needs S ≥ 2: at S = 1
    ℓ = 0 and the interpolation (ℓ^α) is 0, so the scale would be infinite.
    """
    if causal and seq_len < 2:
        raise ValueError(f"seq_len={seq_len} is invalid for the unit-scaled causal attention: "
                         "it needs S >= 2 (its flat-attention std √(ln S/S) is 0 at S = 1)")
    lower = ((math.log(seq_len) if causal else 1.0) / seq_len) ** 0.5
    return 1.0 / logarithmic_interpolation(1.0 / (1.0 + 4.0 * head_dim / mult**2), lower, 1.0)


def scaled_dot_product_attention(q, k, v, mult: float = 1.0, causal: bool = True,
                                 seq_len: Optional[int] = None, impl: str = "xla"):
    """Unit-scaled attention with logits (α_attn/d_head)·q·kᵀ; the scale s of
    :func:`attention_scale` is applied to the output (forward) and to the q, k, v gradients.

    The scales are Python floats applied outside the kernel (``scale_bwd`` on q, k, v,
    ``scale_fwd`` on the output; spec §11.5); the kernel is :func:`attention_core` with
    ``scale = α_attn/d_head`` and implementation ``impl`` (``xla | cudnn | auto``).
    ``seq_len`` is the S of that scale, a static int.  A model passes its *training* length
    (spec §5.9: "use the training S for the constant"), so that a shorter call (evaluation,
    sampling, a prefix) computes the same function; ``None`` takes the call's own length.
    """
    head_dim = v.shape[-1]
    s = attention_scale(v.shape[-3] if seq_len is None else seq_len, head_dim, mult, causal)
    q, k, v = (scale_bwd(t, s) for t in (q, k, v))
    out = attention_core(q, k, v, logit_scale=mult / head_dim, causal=causal, impl=impl)
    return scale_fwd(out, s)


# ---------------------------------------------------------------------------------------------
# Residuals and adds (spec §4.1, §5.12)
# ---------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _residual_split(x, a: float, b: float):
    return x, x


def _residual_split_fwd(x, a, b):
    return (x, x), None


def _residual_split_bwd(a, b, _, g):
    g_branch, g_skip = g
    # = a·g_branch + b·g_skip, written so that the incoming residual-stream gradient g_skip
    # feeds the add directly, as in a plain residual.  Behind a standalone multiply-by-constant
    # XLA (CPU) fuses the whole chain of stream gradients into every consumer instead of
    # materialising it once per layer: O(L²) recomputation in the backward pass.  In fp32,
    # so that a and b − 1 are not rounded to a bf16 stream's dtype.
    out = g_skip.dtype
    g_branch, g_skip = g_branch.astype(jnp.float32), g_skip.astype(jnp.float32)
    return ((g_skip + (g_branch * a + g_skip * (b - 1.0))).astype(out),)


_residual_split.defvjp(_residual_split_fwd, _residual_split_bwd)


def residual_split(x, tau: float):
    """(branch, skip) = (scale_bwd(x, a), scale_bwd(x, b)), a = τ/√(1+τ²), b = 1/√(1+τ²)."""
    denom = math.sqrt(1.0 + tau * tau)
    return _residual_split(x, tau / denom, 1.0 / denom)


def residual_add(branch, skip, tau: float):
    """scale_fwd(branch, a) + scale_fwd(skip, b); gradients pass into both unscaled.  Computed
    in fp32 and returned in the skip's dtype (the residual stream's): a bf16 ``branch`` adds to
    an fp32 stream as under torch autocast, and a and b are never rounded to bf16 (b = 0.99478
    would become 0.99609, against the backward's exact b)."""
    denom = math.sqrt(1.0 + tau * tau)
    out = scale_fwd(branch.astype(jnp.float32), tau / denom) + scale_fwd(
        skip.astype(jnp.float32), 1.0 / denom)
    return out.astype(skip.dtype)


# Traced-weight variants, for layers stacked under ``lax.scan`` (``model.scan_layers``): each
# layer's τ differs, so its weights arrive as a scanned array row instead of Python floats.


def residual_weight_row(tau: float) -> tuple[float, float, float]:
    """(a, b, b − 1) of :func:`residual_split`/:func:`residual_add` for τ, in float64: the
    row that :func:`residual_split_weighted`/:func:`residual_add_weighted` take as an array."""
    denom = math.sqrt(1.0 + tau * tau)
    b = 1.0 / denom
    return tau / denom, b, b - 1.0


@jax.custom_vjp
def _residual_split_weighted(x, w):
    return x, x


def _residual_split_weighted_fwd(x, w):
    return (x, x), w


def _residual_split_weighted_bwd(w, g):
    g_branch, g_skip = g
    out = g_skip.dtype
    g_branch, g_skip = g_branch.astype(jnp.float32), g_skip.astype(jnp.float32)
    w = w.astype(jnp.float32)
    # The same expression as _residual_split_bwd, with (a, b − 1) read from the row.
    return (g_skip + (g_branch * w[0] + g_skip * w[2])).astype(out), jnp.zeros_like(w)


_residual_split_weighted.defvjp(_residual_split_weighted_fwd, _residual_split_weighted_bwd)


def residual_split_weighted(x, w):
    """:func:`residual_split` with the weights as a traced row ``w = (a, b, b − 1)`` (fp32, from
    :func:`residual_weight_row`); the same arithmetic, so the same values."""
    return _residual_split_weighted(x, w)


@jax.custom_vjp
def _residual_add_weighted(branch, skip, w):
    return branch * w[0] + skip * w[1]


def _residual_add_weighted_fwd(branch, skip, w):
    return _residual_add_weighted(branch, skip, w), w


def _residual_add_weighted_bwd(w, g):
    return g, g, jnp.zeros_like(w)


_residual_add_weighted.defvjp(_residual_add_weighted_fwd, _residual_add_weighted_bwd)


def residual_add_weighted(branch, skip, w):
    """:func:`residual_add` with the weights as a traced row ``w = (a, b, b − 1)``: forward
    ``a·branch + b·skip`` in fp32, in the skip's dtype; gradients pass into both unscaled."""
    f32 = jnp.float32
    out = _residual_add_weighted(branch.astype(f32), skip.astype(f32), w.astype(f32))
    return out.astype(skip.dtype)


def add(x, y, constraint: Optional[str] = "to_output_scale"):
    """Unit-scaled plain add: output 2^-½ (1 if an operand is a scalar); each operand's
    gradient ideally (broadcast factor)^-½; adding a Python number is unscaled."""
    if isinstance(x, (int, float)) or isinstance(y, (int, float)):
        return x + y
    out_shape = jnp.broadcast_shapes(jnp.shape(x), jnp.shape(y))
    out_size = math.prod(out_shape)
    x_grad = (out_size / max(jnp.size(x), 1)) ** -0.5
    y_grad = (out_size / max(jnp.size(y), 1)) ** -0.5
    out_scale = 1.0 if (jnp.size(x) == 1 or jnp.size(y) == 1) else 2.0**-0.5
    out_scale, x_grad, y_grad = apply_constraint(constraint, out_scale, x_grad, y_grad)
    return scale_fwd(scale_bwd(x, x_grad) + scale_bwd(y, y_grad), out_scale)


# ---------------------------------------------------------------------------------------------
# Loss (spec §5.14)
# ---------------------------------------------------------------------------------------------


@jax.custom_vjp
def _sum_cross_entropy(logits, targets):
    """Σ_i (logsumexp(z_i) − z_i[t_i]) over the rows of ``logits`` (N, V), fp32.

    Its VJP is the closed form g·(softmax(z) − onehot(t)), one elementwise pass over the
    logits that XLA fuses with the scales around it and the cast back to the compute dtype.
    Autodiff of the same expression builds the one-hot by scattering into an (N, V) fp32 array
    of zeros (``take_along_axis``'s transpose) and adds it to the softmax in separate passes:
    in the BF16 train step compiled for an H100 at the proxy's shapes (16,384 tokens,
    V = 32,000), that made the kernels other than GEMMs move 7.8 GiB more per step (17.5
    against 9.7 GiB at width 256; BUILD.md, "The loss's backward")."""
    return _sum_cross_entropy_fwd(logits, targets)[0]


def _sum_cross_entropy_fwd(logits, targets):
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return jnp.sum(lse - picked), (logits, lse, targets)


def _sum_cross_entropy_bwd(res, g):
    logits, lse, targets = res
    classes = jax.lax.broadcasted_iota(targets.dtype, logits.shape, 1)
    onehot = (classes == targets[:, None]).astype(logits.dtype)
    return g * (jnp.exp(logits - lse[:, None]) - onehot), None


_sum_cross_entropy.defvjp(_sum_cross_entropy_fwd, _sum_cross_entropy_bwd)


def _flatten_logits(logits, targets):
    vocab = logits.shape[-1]
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {logits.shape} and targets {targets.shape} do not match")
    return logits.reshape(-1, vocab).astype(jnp.float32), targets.reshape(-1)


def cross_entropy(logits, targets, mult: float = 1.0, reduction: str = "mean"):
    """Unit-scaled softmax cross-entropy with α_loss-softmax = ``mult``, in fp32.

    logits ← scale_bwd(logits, V/√(V−1)); logits ← scale_fwd(logits, m); the loss is the sum
    over tokens, forward-scaled by 1/N for ``mean`` (so it equals the ordinary mean CE) while
    the gradient w.r.t. each raw logit is (softmax(m·z) − onehot)·V/√(V−1), not divided by N.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r} is invalid: allowed are ('mean', 'sum')")
    logits, targets = _flatten_logits(logits, targets)
    n, vocab = logits.shape
    logits = scale_bwd(logits, vocab / math.sqrt(vocab - 1))
    logits = scale_fwd(logits, mult)
    loss = _sum_cross_entropy(logits, targets)
    return scale_fwd(loss, 1.0 / n) if reduction == "mean" else loss


def plain_cross_entropy(logits, targets, reduction: str = "mean"):
    """Ordinary softmax cross-entropy in fp32 (SP and μP): the mean over tokens, or with
    ``reduction="sum"`` the sum."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r} is invalid: allowed are ('mean', 'sum')")
    logits, targets = _flatten_logits(logits, targets)
    total = _sum_cross_entropy(logits, targets)
    return total / targets.shape[0] if reduction == "mean" else total
