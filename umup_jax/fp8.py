"""FP8 matmuls: E4M3 forward, E5M2 gradients, through XLA's fp8 ``dot_general`` (spec §8).

The u-μP paper (§4.4, Fig. 1c) trains with a plain, *un-scaled* saturating cast of every
linear layer's matmul inputs: activations and weights to E4M3, gradients to E5M2.  This works
because u-μP keeps its multipliers outside the matmul (``scale_bwd`` before, ``scale_fwd`` after,
see :func:`umup_jax.ops.linear`), so all three operands are unit-RMS at init.

:func:`fp8_dot` is ``x @ w`` with a ``jax.custom_vjp``:

* forward: ``x8 = sat_cast(x, E4M3)``, ``w8 = sat_cast(w, E4M3)``,
  ``y = dot(x8, w8)`` accumulated in fp32 (``preferred_element_type``), returned in x's dtype;
* backward: ``g8 = sat_cast(g, E5M2)``, ``dx = g8·w8ᵀ``, ``dw = x8ᵀ·g8`` (E5M2 only ever
  paired with E4M3, as FP8 GEMM hardware requires).

``sat_cast`` clips to ±max of the format before the cast (448 for ``float8_e4m3fn``, 57344 for
``float8_e5m2``): a plain cast of an out-of-range value gives NaN.

Modes per matmul group (:data:`GROUPS`):

* ``bf16``: no FP8 (the matmul runs in the model's compute dtype);
* ``fp8``: the scheme above;
* ``fp8_e5m2_input``: the forward input ``x`` in E5M2 for its range (what the authors' earlier
  scheme did for the two critical layers, spec §8); its weight-gradient matmul pairs that E5M2
  ``x`` with the gradient in E4M3.  That scheme also kept every other group's gradients in
  E4M3; no policy here reproduces it whole, the ``fp8`` groups' gradients being E5M2;
* ``fp8_dynamic``: divide ``x`` by its current RMS (fp32, just before the cast) and multiply
  the result back (the paper's user guide, App. D).

Presets (:data:`PRESETS`): ``none``; ``paper_simple`` (every linear in FP8, un-scaled, the
paper's small-scale result); ``paper_large`` (the attention out-projection and FFN
down-projection inputs, whose RMS grows during long runs, kept in **BF16**; the rest FP8).  BF16
is the default for those two because it is the scheme the authors used for their 1B-7B FP8
runs (slides p.26, Aleph Alpha's configs) and it costs no extra reduction per step; dynamic
rescaling is available per group.

Telemetry: with a ``probe`` (a zeros(6) array that is differentiated), the custom VJP returns,
as the probe's "gradient", the fractions of values that saturate (|v| > max) and that
underflow to zero (v ≠ 0, cast(v) = 0) for x, w and g: ``[x_sat, x_under, w_sat, w_under,
g_sat, g_under]``.  g's are those of its lossiest cast: E5M2 in ``fp8`` and ``fp8_dynamic``;
E4M3 in ``fp8_e5m2_input``, where g is cast to E5M2 for ``dx`` and to E4M3 for ``dw``.  The
E4M3 cast saturates (|v| > 448) and underflows (|v| ≤ 2⁻¹⁰) every value the E5M2 cast does
(|v| > 57344, |v| ≤ 2⁻¹⁷) and more, so its fractions bound what either matmul lost.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp

E4M3 = jnp.float8_e4m3fn
E5M2 = jnp.float8_e5m2
MODES = ("bf16", "fp8", "fp8_e5m2_input", "fp8_dynamic")
GROUPS = ("qkv", "attn_out", "ffn_in", "ffn_down", "readout")
PRESETS = {
    "none": {g: "bf16" for g in GROUPS},
    "paper_simple": {g: "fp8" for g in GROUPS},
    "paper_large": {**{g: "fp8" for g in GROUPS}, "attn_out": "bf16", "ffn_down": "bf16"},
}
STAT_NAMES = ("x_saturated", "x_underflow", "w_saturated", "w_underflow",
              "g_saturated", "g_underflow")


def fp8_max(dtype) -> float:
    return float(jnp.finfo(dtype).max)


def saturating_cast(x, dtype):
    """Clip to ±max(dtype), then cast (round to nearest even)."""
    m = fp8_max(dtype)
    return jnp.clip(x, -m, m).astype(dtype)


def underflow_bound(dtype) -> float:
    """Half the format's smallest subnormal (2⁻¹⁰ for E4M3, 2⁻¹⁷ for E5M2): the cast rounds
    to nearest even, so exactly the non-zero |v| ≤ this bound become zero."""
    return float(jnp.finfo(dtype).smallest_subnormal) / 2


def cast_stats(x, dtype) -> tuple[jax.Array, jax.Array]:
    """(fraction saturating, fraction of non-zeros that underflow to zero) of casting x.

    Both are read from |x| against the format's bounds, not by casting x to FP8 and back: on
    a GPU, XLA folds a chain of float converts (``SimplifyFPConversions``, under its default
    ``xla_allow_excess_precision``), f32 → f8 → f32 included, so ``cast(x) == 0`` would
    compare the unrounded x and never find an underflow (seen in the H100 program compiled
    ahead of time on a CPU with jax 0.11.2's CUDA plugin).  On a CPU, which keeps the round
    trip, the two agree on every value (``tests/test_fp8.py``)."""
    a = jnp.abs(x.astype(jnp.float32))
    saturated = jnp.mean((a > fp8_max(dtype)).astype(jnp.float32))
    under = jnp.logical_and(a != 0, a <= underflow_bound(dtype))
    return saturated, jnp.mean(under.astype(jnp.float32))


def resolve_policy(policy: Any) -> dict[str, str]:
    """A preset name or a {group: mode} mapping (missing groups: bf16) → {group: mode}."""
    if isinstance(policy, str):
        if policy not in PRESETS:
            raise ValueError(f"fp8={policy!r} is invalid: presets are {tuple(PRESETS)} "
                             f"(or a mapping from {GROUPS} to {MODES})")
        return dict(PRESETS[policy])
    policy = dict(policy)
    unknown = sorted(set(policy) - set(GROUPS))
    if unknown:
        raise ValueError(f"fp8 groups {unknown} are invalid: allowed are {GROUPS}")
    for group, mode in policy.items():
        if mode not in MODES:
            raise ValueError(f"fp8[{group!r}]={mode!r} is invalid: allowed are {MODES}")
    return {g: policy.get(g, "bf16") for g in GROUPS}


# ---------------------------------------------------------------------------------------------
# The fp8 dot with its custom VJP
# ---------------------------------------------------------------------------------------------


def _dot(a, b, out_dtype):
    """a (..., K) · b (K, N) with fp32 accumulation, result in out_dtype."""
    y = jax.lax.dot_general(a, b, (((a.ndim - 1,), (0,)), ((), ())),
                            preferred_element_type=jnp.float32)
    return y.astype(out_dtype)


def _dot_t(g, b, out_dtype):
    """g (..., N) · bᵀ for b (K, N) → (..., K)."""
    y = jax.lax.dot_general(g, b, (((g.ndim - 1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32)
    return y.astype(out_dtype)


def _dot_w(x, g, out_dtype):
    """xᵀ · g over all leading dims: x (..., K), g (..., N) → (K, N)."""
    x2 = x.reshape(-1, x.shape[-1])
    g2 = g.reshape(-1, g.shape[-1])
    y = jax.lax.dot_general(x2, g2, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return y.astype(out_dtype)


def _input_scale(x):
    return jax.lax.stop_gradient(jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32)))) + 1e-30)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fp8_dot(x, w, probe, mode: str, telemetry: bool):
    y, _ = _fp8_dot_fwd(x, w, probe, mode, telemetry)
    return y


def _fp8_dot_fwd(x, w, probe, mode, telemetry):
    x_dtype = E5M2 if mode == "fp8_e5m2_input" else E4M3
    scale = _input_scale(x) if mode == "fp8_dynamic" else None
    x_in = x if scale is None else (x.astype(jnp.float32) / scale)
    x8 = saturating_cast(x_in, x_dtype)
    w8 = saturating_cast(w, E4M3)
    y = _dot(x8, w8, jnp.float32)
    if scale is not None:
        y = y * scale
    stats = None
    if telemetry:
        stats = (*cast_stats(x_in, x_dtype), *cast_stats(w, E4M3))
    # Zero-size arrays carry the primal dtypes through the residuals.
    dtypes = (jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))
    return y.astype(x.dtype), (x8, w8, scale, stats, dtypes)


def _fp8_dot_bwd(mode, telemetry, res, g):
    x8, w8, scale, stats, (x_like, w_like) = res
    x_dtype, w_dtype = x_like.dtype, w_like.dtype
    g8 = saturating_cast(g, E5M2)
    dx = _dot_t(g8, w8, x_dtype)
    # E5M2 pairs only with E4M3: an E5M2 forward input meets the gradient in E4M3.
    g_w_dtype = E4M3 if mode == "fp8_e5m2_input" else E5M2
    g_for_w = saturating_cast(g, E4M3) if g_w_dtype == E4M3 else g8
    dw = _dot_w(x8, g_for_w, jnp.float32)
    if scale is not None:
        dw = dw * scale
    dw = dw.astype(w_dtype)
    if telemetry:
        # The lossier of g's casts (the module docstring): E4M3 where dw takes it.
        dprobe = jnp.stack([*stats, *cast_stats(g, g_w_dtype)]).astype(jnp.float32)
    else:
        dprobe = jnp.zeros((len(STAT_NAMES),), jnp.float32)
    return dx, dw, dprobe


_fp8_dot.defvjp(_fp8_dot_fwd, _fp8_dot_bwd)


def fp8_dot(x, w, mode: str = "fp8", probe: Optional[jax.Array] = None):
    """``x @ w`` (w of shape (K, N)) under FP8 ``mode`` (see the module docstring).

    ``probe``: an optional zeros(6) array; differentiating the loss w.r.t. it yields the cast
    statistics :data:`STAT_NAMES` of this matmul (forward and backward casts).
    """
    if mode not in MODES:
        raise ValueError(f"fp8 mode={mode!r} is invalid: allowed are {MODES}")
    if mode == "bf16":
        return jnp.matmul(x, w.astype(x.dtype))
    telemetry = probe is not None
    if probe is None:
        probe = jnp.zeros((len(STAT_NAMES),), jnp.float32)
    return _fp8_dot(x, w, probe, mode, telemetry)


def _quantized(x, dtype):
    """x rounded to FP8 and returned in fp32.  The optimisation barrier keeps XLA from folding
    the f32 → f8 → f32 chain of converts, which it does on a GPU (see :func:`cast_stats`)."""
    return jax.lax.optimization_barrier(saturating_cast(x, dtype)).astype(jnp.float32)


def fake_quant_dot(x, w, mode: str = "fp8"):
    """Reference: cast to FP8 and back, then an fp32 dot (what the fp8 GEMM must equal)."""
    x_dtype = E5M2 if mode == "fp8_e5m2_input" else E4M3
    scale = _input_scale(x) if mode == "fp8_dynamic" else 1.0
    xq = _quantized(x.astype(jnp.float32) / scale, x_dtype)
    wq = _quantized(w, E4M3)
    y = jnp.matmul(xq, wq, precision=jax.lax.Precision.HIGHEST) * scale
    return y.astype(x.dtype)


def make_dot(mode: str, probe: Optional[jax.Array] = None):
    """A ``dot(x, w)`` for :func:`umup_jax.ops.linear` under ``mode``."""
    return functools.partial(fp8_dot, mode=mode, probe=probe)
