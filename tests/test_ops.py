"""Unit-scaled ops: unit RMS of outputs and gradients at the shapes and tolerances of spec
§10.2, and their exact constants (spec §5, §10.4)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import SEED, assert_not_unit, assert_scale, assert_unit, rms, std, unit_backward
from umup_jax import ops


def normal(i, shape):
    return jax.random.normal(jax.random.key(SEED + 100 + i), shape, jnp.float32)


def _vjp(f, *args, seed=7):
    out, pullback = jax.vjp(f, *args)
    g = jax.random.normal(jax.random.key(seed), out.shape, jnp.float32).astype(out.dtype)
    return out, pullback(g)


# --- primitives -------------------------------------------------------------------------------


def test_scale_fwd_and_bwd_are_one_sided():
    x = normal(0, (64,))
    y, (gx,) = unit_backward(lambda t: ops.scale_fwd(t, 3.0), x)
    np.testing.assert_allclose(y, 3.0 * x, rtol=1e-7)
    _, (g_ref,) = unit_backward(lambda t: t, x)
    np.testing.assert_array_equal(gx, g_ref)  # gradient passes unchanged

    y, (gx,) = unit_backward(lambda t: ops.scale_bwd(t, 0.25), x)
    np.testing.assert_array_equal(y, x)
    np.testing.assert_allclose(gx, 0.25 * g_ref, rtol=1e-7)


def test_scales_must_be_static_python_floats():
    with pytest.raises(TypeError):
        ops.scale_fwd(jnp.ones(3), jnp.float32(2.0))


@pytest.mark.parametrize(
    "constraint, expected",
    [
        (None, (0.5, 0.125)),
        ("to_output_scale", (0.5, 0.5)),
        ("to_grad_input_scale", (0.125, 0.125)),
        ("gmean", (0.25, 0.25)),
        ("hmean", (0.2, 0.2)),
        ("amean", (0.3125, 0.3125)),
    ],
)
def test_constraints(constraint, expected):
    assert ops.apply_constraint(constraint, 0.5, 0.125) == pytest.approx(expected)


def test_unknown_constraint_raises():
    with pytest.raises(ValueError, match="constraint='bogus'"):
        ops.apply_constraint("bogus", 1.0, 2.0)


def test_logarithmic_interpolation_endpoints():
    assert ops.logarithmic_interpolation(0.0, 2.0, 8.0) == pytest.approx(2.0)
    assert ops.logarithmic_interpolation(1.0, 2.0, 8.0) == pytest.approx(8.0)
    assert ops.logarithmic_interpolation(0.5, 2.0, 8.0) == pytest.approx(4.0)


# --- linear (x 2^8 × 2^10, w 2^10 × 2^12; spec §10.2) --------------------------------------------


def _linear_case(constraint):
    x, w, b = normal(0, (2**8, 2**10)), normal(1, (2**10, 2**12)), jnp.zeros((2**12,))
    return unit_backward(lambda x, w, b: ops.linear(x, w, b, constraint=constraint), x, w, b)


def test_linear_unconstrained_is_unit_everywhere():
    y, (gx, gw, gb) = _linear_case(None)
    assert_unit(y, gx, gw, gb)


def test_linear_to_output_scale():
    y, (gx, gw, gb) = _linear_case("to_output_scale")
    assert_unit(y, gw, gb)
    assert_not_unit(gx)  # fan_in^-1/2 instead of fan_out^-1/2: ∂x std ≈ 2
    assert std(gx) == pytest.approx(2.0, rel=0.05)


def test_linear_gmean():
    y, (gx, _, _) = _linear_case("gmean")
    assert std(y) * std(gx) == pytest.approx(1.0, abs=0.1)


def test_linear_to_grad_input_scale():
    y, (gx, _, _) = _linear_case("to_grad_input_scale")
    assert_unit(gx)
    assert_not_unit(y)


def test_linear_readout():
    x, w, b = normal(0, (2**8, 2**10)), normal(1, (2**10, 2**12)), jnp.zeros((2**12,))
    y, (gx, gw, gb) = unit_backward(ops.linear_readout, x, w, b)
    assert_unit(gx, gw, gb)
    assert std(y) == pytest.approx(2**-5, rel=0.1)  # 1/√fan_in at init, not 1


def test_linear_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="fan_in"):
        ops.linear(jnp.ones((4, 8)), jnp.ones((16, 4)))


@pytest.mark.parametrize("scale", [1.0, 0.03125, 3.0])
def test_matmul_equals_autodiff_of_scaled_product(scale):
    """The plain rules' linear: value and both gradients of scale·(x @ w), 3-D x."""
    x, w = normal(0, (4, 32, 64)), normal(1, (64, 48))
    f = lambda a, b: ops.matmul(a, b, scale=scale)
    ref = lambda a, b: scale * jnp.matmul(a, b)
    y, (gx, gw) = _vjp(f, x, w)
    y_ref, (gx_ref, gw_ref) = _vjp(ref, x, w)
    for got, want in ((y, y_ref), (gx, gx_ref), (gw, gw_ref)):
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6 * float(jnp.abs(want).max()))
    with pytest.raises(ValueError, match="matmul of"):
        ops.matmul(x, w.T)


def test_plain_rule_linear_is_the_formula_with_bias():
    from umup_jax import parametrization as P
    rule = P.MuP(width=128, base_width=32)
    meta = P.ParamMeta(value=None, names=(None, None), role=P.OUTPUT, fan_in=64, fan_out=48)
    a = rule.forward_multiplier(meta)
    assert a != 1.0
    x, w, b = normal(0, (4, 8, 64)), normal(1, (64, 48)), normal(2, (48,))
    y, grads = _vjp(lambda *t: rule.linear(t[0], t[1], meta, bias=t[2]), x, w, b)
    y_ref, grads_ref = _vjp(lambda *t: (jnp.matmul(t[0], t[1]) + t[2]) * a, x, w, b)
    for got, want in zip((y, *grads), (y_ref, *grads_ref)):
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6 * float(jnp.abs(want).max()))


# --- embedding (B 16 × S 32, d 64, V 4096) ------------------------------------------------------


def test_embedding_output_and_table_gradient_unit():
    ids = jax.random.randint(jax.random.key(SEED), (2**4, 2**5), 0, 2**12)
    table = normal(0, (2**12, 2**6))
    y, (g_table,) = unit_backward(lambda t: ops.embedding(t, ids), table)
    assert_unit(y, g_table)


# --- rms_norm ----------------------------------------------------------------------------------


def test_rms_norm_unit_and_scale_invariant():
    x = 7.0 * normal(0, (2**8, 2**10))
    y, (gx,) = unit_backward(ops.rms_norm, x)
    assert_unit(y)
    # ∂x of a normalisation scales as 1/‖x‖: for unit-scale inputs it is unit.
    _, (gx1,) = unit_backward(ops.rms_norm, x / 7.0)
    assert_unit(gx1)
    np.testing.assert_allclose(gx, gx1 / 7.0, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(rms(y[0]), 1.0, rtol=1e-4)


def _autodiff_rms_norm(x, eps=1e-5):
    """The formula the custom VJP replaces, differentiated by JAX."""
    ms = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
    return x / jnp.sqrt(ms + eps).astype(x.dtype)


@pytest.mark.parametrize("eps", [1e-5, 1e-2])
def test_rms_norm_custom_vjp_equals_autodiff(eps):
    # Varied row scales, so the projection term y·mean(g·y) matters.
    x = normal(0, (64, 256)) * jnp.exp(normal(1, (64, 1)))
    y, (gx,) = _vjp(lambda t: ops.rms_norm(t, eps), x)
    y_ref, (gx_ref,) = _vjp(lambda t: _autodiff_rms_norm(t, eps), x)
    np.testing.assert_array_equal(y, y_ref)  # the forward is unchanged, bit for bit
    np.testing.assert_allclose(gx, gx_ref, rtol=1e-6, atol=1e-6 * float(jnp.abs(gx_ref).max()))


def test_rms_norm_bf16_gradient_close_to_fp32():
    x = normal(0, (64, 256))
    _, (g32,) = _vjp(ops.rms_norm, x)
    y16, (g16,) = _vjp(ops.rms_norm, x.astype(jnp.bfloat16))
    assert y16.dtype == g16.dtype == jnp.bfloat16
    np.testing.assert_allclose(g16.astype(jnp.float32), g32, rtol=0, atol=2e-2)


def _saved(f, *args):
    """(shape, dtype) of every array the pullback of f closes over (what JAX keeps for the
    backward pass, inputs and scalar constants included), scalars left out."""
    _, pullback = jax.vjp(f, *args)
    return sorted((tuple(a.shape), str(a.dtype)) for a in jax.tree_util.tree_leaves(pullback)
                  if a.ndim)


def test_rms_norm_keeps_only_its_output_and_one_value_per_token():
    x = normal(0, (8, 16, 32))
    assert _saved(ops.rms_norm, x) == [((8, 16, 1), "float32"), ((8, 16, 32), "float32")]
    # Autodiff of the same formula keeps two more (8, 16, 32) arrays and three (8, 16, 1).
    full = [s for s, _ in _saved(_autodiff_rms_norm, x)]
    assert full.count((8, 16, 32)) >= 2 and len(full) >= 4


# --- silu_glu ----------------------------------------------------------------------------------


def test_silu_glu_scale_constants():
    assert ops.silu_glu_scale(1.0) == pytest.approx(2**0.75, abs=1e-12)
    assert ops.silu_glu_scale(1.0) == pytest.approx(1.6818, abs=1e-4)
    assert ops.silu_glu_scale(0.5) == pytest.approx(1.8661, abs=1e-4)
    assert ops.silu_glu_scale(2.0) == pytest.approx(1.5157, abs=1e-4)


@pytest.mark.parametrize("mult", [0.25, 1.0, 4.0])
def test_silu_glu_unit(mult):
    x_in, x_gate = normal(0, (2**8, 2**10)), normal(1, (2**8, 2**10))
    y, (g_in, g_gate) = unit_backward(lambda a, b: ops.silu_glu(a, b, mult=mult), x_in, x_gate)
    assert_unit(y, g_in, g_gate)


def test_silu_glu_formula():
    a, g = normal(0, (16,)), normal(1, (16,))
    s = ops.silu_glu_scale(3.0)
    expected = s * a * g * jax.nn.sigmoid(3.0 * g)
    np.testing.assert_allclose(ops.silu_glu(a, g, mult=3.0), expected, rtol=1e-6)


def _autodiff_gated_silu(a, g, mult, scale):
    return scale * a * g * jax.nn.sigmoid(mult * g)


@pytest.mark.parametrize("mult, scale", [(1.0, 1.0), (1.0, 2**0.75), (0.25, 1.3), (4.0, 0.7)])
def test_gated_silu_custom_vjp_equals_autodiff(mult, scale):
    a, g = 2.0 * normal(0, (64, 512)), 3.0 * normal(1, (64, 512))  # σ's tails included
    y, (ga, gg) = _vjp(lambda u, v: ops.gated_silu(u, v, mult=mult, scale=scale), a, g)
    y_ref, (ga_ref, gg_ref) = _vjp(lambda u, v: _autodiff_gated_silu(u, v, mult, scale), a, g)
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
    for got, ref in ((ga, ga_ref), (gg, gg_ref)):
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6 * float(jnp.abs(ref).max()))


def test_silu_glu_is_gated_silu_with_its_scale_and_sp_forward_unchanged():
    a, g = normal(0, (32, 64)), normal(1, (32, 64))
    np.testing.assert_array_equal(
        ops.silu_glu(a, g, mult=0.5), ops.gated_silu(a, g, mult=0.5, scale=ops.silu_glu_scale(0.5)))
    # SP's and μP's SwiGLU: the forward is up·silu(gate), bit for bit.
    np.testing.assert_array_equal(ops.gated_silu(a, g), a * jax.nn.silu(g))
    with pytest.raises(TypeError):
        ops.gated_silu(a, g, scale=jnp.float32(2.0))


def test_gated_silu_keeps_only_its_two_inputs():
    a, g = normal(0, (8, 64)), normal(1, (8, 64))
    f = lambda u, v: ops.silu_glu(u, v, mult=2.0)
    assert _saved(f, a, g) == [((8, 64), "float32")] * 2
    full = [s for s, _ in _saved(lambda u, v: _autodiff_gated_silu(u, v, 2.0, 1.5), a, g)]
    assert full.count((8, 64)) >= 4


def _silu_glu_half(up, gate):
    return ops.silu_glu(up, gate, mult=0.5)


def _unit_linear_times(h, w, p):
    # u-μP's unconstrained linear (its own custom VJP), and a traced factor that needs a
    # gradient of its own, as an FP8 probe does.
    return ops.linear(h, w, constraint=None, tokens=h.shape[0]) * (1.0 + p)


def test_recompute_middle_equals_the_composition_bit_for_bit():
    up, gate, w = normal(0, (16, 96)), 2.0 * normal(1, (16, 96)), normal(2, (96, 24))
    probe = jnp.float32(0.25)
    fused = lambda u, v, w, p: ops.recompute_middle(
        _silu_glu_half, _unit_linear_times, (u, v), (w, p))
    plain = lambda u, v, w, p: _unit_linear_times(_silu_glu_half(u, v), w, p)
    y, grads = _vjp(fused, up, gate, w, probe)
    y_ref, grads_ref = _vjp(plain, up, gate, w, probe)
    assert len(grads) == 4
    np.testing.assert_array_equal(y, y_ref)
    for got, ref in zip(grads, grads_ref):
        np.testing.assert_array_equal(got, ref)


def test_recompute_middle_keeps_the_inputs_not_the_middle_value():
    up, gate, w = normal(0, (8, 64)), normal(1, (8, 64)), normal(2, (64, 16))
    act = lambda a, b: ops.silu_glu(a, b, mult=2.0)
    down = lambda h, w, probe: ops.linear(h, w, constraint=None)
    fused = lambda u, v, w: ops.recompute_middle(act, down, (u, v), (w, None))
    plain = lambda u, v, w: down(act(u, v), w, None)
    # Both keep up, gate and the weight; the plain composition also keeps h = act(up, gate).
    assert _saved(fused, up, gate, w) == [((8, 64), "float32")] * 2 + [((64, 16), "float32")]
    assert _saved(plain, up, gate, w).count(((8, 64), "float32")) == 3
    # A None among the params gets a None cotangent; the others match the composition.
    _, pullback = jax.vjp(lambda u, v, w: ops.recompute_middle(act, down, (u, v), (w, None)),
                          up, gate, w)
    g = normal(3, (8, 16))
    for got, ref in zip(pullback(g), jax.vjp(plain, up, gate, w)[1](g)):
        np.testing.assert_array_equal(got, ref)


# --- attention ---------------------------------------------------------------------------------


def test_attention_scale_constants():
    assert ops.attention_scale(64, 64, 1.0, causal=True) == pytest.approx(3.90204, abs=1e-5)
    assert ops.attention_scale(256, 64, 1.0, causal=True) == pytest.approx(6.744, abs=1e-3)
    assert ops.attention_scale(256, 64, 4.0, causal=True) == pytest.approx(6.070, abs=1e-3)
    assert ops.attention_scale(1024, 128, 1.0, causal=True) == pytest.approx(12.095, abs=1e-3)
    assert ops.attention_scale(256, 64, 1.0, causal=False) == pytest.approx(15.83, abs=1e-2)


def test_attention_scale_refuses_a_causal_sequence_of_one():
    """At S = 1 the causal flat-attention std √(ln S/S) is 0: a clear error, not math's
    'domain error'.  Non-causal S = 1 (ℓ = 1) is finite."""
    with pytest.raises(ValueError, match=r"seq_len=1 is invalid .* S >= 2"):
        ops.attention_scale(1, 64, 1.0, causal=True)
    assert math.isfinite(ops.attention_scale(1, 64, 1.0, causal=False))
    assert math.isfinite(ops.attention_scale(2, 64, 1.0, causal=True))


def test_attention_non_causal_matches_reference_test():
    # Authors' test: shape (2^8, 2^6, 2^6) = (batch, seq, head_dim), non-causal.
    q, k, v = (normal(i, (2**8, 2**6, 1, 2**6)) for i in range(3))
    f = lambda q, k, v: ops.scaled_dot_product_attention(q, k, v, causal=False)
    y, (gq, gk, gv) = unit_backward(f, q, k, v)
    assert_unit(y, gv)
    assert_scale(gq, gk, target=64**-0.5)


@pytest.mark.parametrize("mult", [1.0, 4.0])
def test_causal_attention_output_unit(mult):
    q, k, v = (normal(i, (4, 256, 4, 64)) for i in range(3))
    y, (gq, gk, gv) = unit_backward(
        lambda q, k, v: ops.scaled_dot_product_attention(q, k, v, mult=mult, causal=True), q, k, v
    )
    assert_unit(y, gv)
    # q and k gradients sit below 1 (≈0.11 at m=1, ≈0.43 at m=4): the softmax Jacobian is
    # small for near-flat attention, as in the authors' non-causal test.
    assert std(gq) < 0.5 and std(gk) < 0.5


def test_causal_attention_is_causal():
    q, k, v = (normal(i, (1, 16, 2, 8)) for i in range(3))
    out = ops.scaled_dot_product_attention(q, k, v)
    v2 = v.at[:, 10:].set(100.0)
    out2 = ops.scaled_dot_product_attention(q, k, v2)
    np.testing.assert_allclose(out[:, :10], out2[:, :10], rtol=1e-6)
    assert not np.allclose(out[:, 10:], out2[:, 10:])


def test_attention_logits_use_mult_over_head_dim():
    q, k, v = (normal(i, (1, 8, 1, 16)) for i in range(3))
    m = 2.0
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) * m / 16
    logits = np.where(np.tril(np.ones((8, 8), bool)), logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    expected = np.einsum("bhqk,bkhd->bqhd", p, v) * ops.attention_scale(8, 16, m, True)
    out = ops.scaled_dot_product_attention(q, k, v, mult=m)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_attention_scale_uses_the_given_seq_len():
    """seq_len (the model's training S) replaces the call's length in the scale, forward and
    backward; None keeps the call's length."""
    q, k, v = (normal(i, (1, 8, 2, 16)) for i in range(3))
    ratio = ops.attention_scale(64, 16) / ops.attention_scale(8, 16)
    f = lambda seq_len: lambda q, k, v: ops.scaled_dot_product_attention(q, k, v, seq_len=seq_len)
    np.testing.assert_allclose(f(64)(q, k, v), f(None)(q, k, v) * ratio, rtol=1e-6)
    np.testing.assert_allclose(f(8)(q, k, v), f(None)(q, k, v), rtol=0)
    w = normal(3, (1, 8, 2, 16))
    grads = lambda n: jax.grad(lambda *a: jnp.sum(f(n)(*a) * w), argnums=(0, 1, 2))(q, k, v)
    for ours, base in zip(grads(64), grads(None)):  # scale_bwd on q, k, v: the same s
        np.testing.assert_allclose(ours, base * ratio, rtol=1e-5, atol=1e-7)


# --- residual split/add, plain add ---------------------------------------------------------------


@pytest.mark.parametrize("tau", [0.2, 1.0, 3.0])
def test_residual_split_linear_add_unit(tau):
    x, w = normal(0, (2**10, 2**8)), normal(1, (2**8, 2**8))

    def f(x):
        r, s = ops.residual_split(x, tau)
        r = ops.linear(r, w)
        return ops.residual_add(r, s, tau), r, s

    (out, r, s), vjp = jax.vjp(f, x)
    gout = normal(5, out.shape)
    (gx,) = vjp((gout, jnp.zeros_like(r), jnp.zeros_like(s)))
    assert_unit(out, r, s, gx)
    # ∂residual and ∂skip: gradients arriving at the branch and skip are the upstream one.
    _, vjp_add = jax.vjp(lambda r, s: ops.residual_add(r, s, tau), r, s)
    g_r, g_s = vjp_add(gout)
    np.testing.assert_array_equal(g_r, gout)
    np.testing.assert_array_equal(g_s, gout)
    assert_unit(g_r, g_s)


def test_residual_split_gradient_is_weighted_sum():
    """∂x = a·g_branch + b·g_skip, a = τ/√(1+τ²) on the branch's cotangent and b = 1/√(1+τ²)
    on the skip's (spec §4.1). Distinct cotangents: with one g for both, a and b swapped give
    the same (a+b)·g, and unit RMS cannot tell them apart either (a² + b² = 1 both ways)."""
    x = normal(0, (128,))
    g_branch, g_skip = normal(1, (128,)), normal(2, (128,))
    tau = 0.5
    a, b = tau / math.sqrt(1 + tau**2), 1 / math.sqrt(1 + tau**2)
    _, vjp = jax.vjp(lambda x: ops.residual_split(x, tau), x)
    (gx,) = vjp((g_branch, g_skip))
    np.testing.assert_allclose(gx, a * g_branch + b * g_skip, rtol=1e-6, atol=1e-7)
    (gx,) = vjp((g_branch, g_branch))
    np.testing.assert_allclose(gx, (a + b) * g_branch, rtol=1e-6)


def test_residual_add_is_exact_fp32_arithmetic_in_the_streams_dtype():
    """The add runs in fp32 with a and b exact and returns the skip's (the stream's) dtype: in
    a bf16 stream one rounding of a·branch + b·skip, not a and b rounded to bf16 (b = 0.99478
    becomes 0.99609); a bf16 branch on an fp32 stream gives fp32.  The scanned layers'
    weighted add gives the same bits."""
    tau = 0.1025
    a, b = ops.residual_weight_row(tau)[:2]
    branch = normal(0, (64, 32)).astype(jnp.bfloat16)
    skip = normal(1, (64, 32))
    exact = (np.asarray(branch, np.float64) * a + np.asarray(skip.astype(jnp.bfloat16),
                                                             np.float64) * b)
    for stream in (jnp.bfloat16, jnp.float32):
        s = skip.astype(stream)
        y = ops.residual_add(branch, s, tau)
        assert y.dtype == stream
        w = jnp.asarray(ops.residual_weight_row(tau), jnp.float32)
        np.testing.assert_array_equal(ops.residual_add_weighted(branch, s, w), y)
        if stream == jnp.bfloat16:
            np.testing.assert_array_equal(y, exact.astype(np.float32).astype(jnp.bfloat16))
    rounded = branch * jnp.bfloat16(a) + skip.astype(jnp.bfloat16) * jnp.bfloat16(b)
    assert not np.array_equal(rounded, ops.residual_add(branch, skip.astype(jnp.bfloat16), tau))
    # The gradients: unscaled into both, each in its operand's dtype.
    _, pull = jax.vjp(lambda r, s: ops.residual_add(r, s, tau), branch, skip)
    g_branch, g_skip = pull(jnp.ones((64, 32), jnp.float32))
    assert g_branch.dtype == jnp.bfloat16 and g_skip.dtype == jnp.float32
    assert np.all(np.asarray(g_branch, np.float32) == 1.0) and np.all(g_skip == 1.0)


def test_add_unit_and_scalar_cases():
    x, y = normal(0, (2**10, 2**6)), normal(1, (2**10, 2**6))
    out, (gx, gy) = unit_backward(ops.add, x, y)
    assert_unit(out)
    np.testing.assert_allclose(out, (x + y) * 2**-0.5, rtol=1e-6)
    # to_output_scale: both gradients get 2^-1/2 too.
    assert std(gx) == pytest.approx(2**-0.5, abs=0.05)
    out_b, _ = unit_backward(ops.add, x, normal(2, (2**6,)))  # broadcast still unit
    assert_unit(out_b)
    np.testing.assert_array_equal(ops.add(x, 1.0), x + 1.0)  # a Python constant is unscaled


def test_add_unconstrained_broadcast_gradient():
    x, b = normal(0, (2**10, 2**6)), normal(1, (2**6,))
    _, (gx, gb) = unit_backward(lambda x, b: ops.add(x, b, constraint=None), x, b)
    assert_unit(gx, gb)


# --- cross-entropy (V 256, N 4096) ----------------------------------------------------------------


def test_cross_entropy_constant():
    assert 256 / math.sqrt(255) == pytest.approx(16.0313, abs=1e-4)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_matches_plain_and_has_unit_gradient(reduction):
    logits = normal(0, (2**12, 2**8))
    labels = jax.random.randint(jax.random.key(SEED), (2**12,), 0, 2**8)
    loss, grad = jax.value_and_grad(
        lambda z: ops.cross_entropy(z, labels, reduction=reduction)
    )(logits)
    plain = ops.plain_cross_entropy(logits, labels)
    expected = plain if reduction == "mean" else plain * 2**12
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    assert_unit(grad)


def test_cross_entropy_gradient_formula_with_mult():
    V, N, m = 256, 64, 0.5
    z = normal(0, (N, V))
    t = jax.random.randint(jax.random.key(SEED), (N,), 0, V)
    g = jax.grad(lambda z: ops.cross_entropy(z, t, mult=m))(z)
    expected = (jax.nn.softmax(m * z, axis=-1) - jax.nn.one_hot(t, V)) * V / math.sqrt(V - 1)
    np.testing.assert_allclose(g, expected, rtol=1e-5, atol=1e-7)  # not divided by N
    loss = ops.cross_entropy(z, t, mult=m)
    np.testing.assert_allclose(loss, ops.plain_cross_entropy(m * z, t), rtol=1e-6)


def _autodiff_sum_cross_entropy(z, t):
    """The loss's expression left to autodiff: the reference for its closed-form VJP."""
    return jnp.sum(jax.nn.logsumexp(z, -1) - jnp.take_along_axis(z, t[:, None], -1)[:, 0])


def _autodiff_cross_entropy(z, t, mult):
    """``ops.cross_entropy`` (mean) with the sum of cross-entropies left to autodiff."""
    V = z.shape[-1]
    flat = z.reshape(-1, V).astype(jnp.float32)
    flat = ops.scale_fwd(ops.scale_bwd(flat, V / math.sqrt(V - 1)), mult)
    return ops.scale_fwd(_autodiff_sum_cross_entropy(flat, t.reshape(-1)), 1 / flat.shape[0])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cross_entropy_backward_equals_autodiff_and_scatters_nothing(dtype):
    """The closed-form VJP g·(softmax − onehot) equals autodiff of the same expression (fp32:
    ≤ 1e-6 of the largest gradient, measured 8e-8; bf16 logits: the gradient differs by at
    most one bf16 step on ≤ 0.1% of its entries, measured 0.003%), for u-μP's loss
    (α_loss-softmax 0.5) and the plain one, on (B, S, V) logits; its program builds no
    one-hot by scatter, and u-μP's needs no more temporary memory than autodiff's (measured
    on this CPU: 16 KiB vs 16 MiB in fp32 on jax 0.10.2 and 0.12.1; 16 vs 32 MiB in bf16 on
    0.10.2, 16 vs 16 MiB on 0.12.1, whose compiler simplifies autodiff's scatter itself)."""
    z = normal(0, (4, 512, 2048)).astype(dtype)
    t = jax.random.randint(jax.random.key(SEED), (4, 512), 0, 2048)
    pairs = [(lambda z: ops.cross_entropy(z, t, mult=0.5),
              lambda z: _autodiff_cross_entropy(z, t, 0.5)),
             (lambda z: ops.plain_cross_entropy(z, t, reduction="sum"),
              lambda z: _autodiff_sum_cross_entropy(z.reshape(-1, 2048).astype(jnp.float32),
                                                    t.reshape(-1)))]
    for i, (ours, reference) in enumerate(pairs):
        np.testing.assert_allclose(jax.jit(ours)(z), jax.jit(reference)(z), rtol=1e-6)
        grad, grad_ref = jax.jit(jax.grad(ours))(z), jax.jit(jax.grad(reference))(z)
        assert grad.dtype == grad_ref.dtype == z.dtype
        grad, grad_ref = np.float32(grad), np.float32(grad_ref)
        err = np.abs(grad - grad_ref)
        if dtype == "float32":
            assert err.max() <= 1e-6 * np.abs(grad_ref).max()
        else:
            assert np.all(err <= np.abs(grad_ref) * 2**-7)  # one bf16 step at most
            assert np.mean(err > 0) <= 1e-3
        primitives = str(jax.make_jaxpr(jax.grad(ours))(z))
        assert "scatter" not in primitives
        assert "scatter" in str(jax.make_jaxpr(jax.grad(reference))(z))  # the check can fail

        def temp(fn):
            compiled = jax.jit(jax.grad(fn)).lower(z).compile()
            return compiled.memory_analysis().temp_size_in_bytes

        if i == 0:  # u-μP's loss; the plain sum's autodiff needs little in fp32 too
            assert temp(ours) <= temp(reference)


def test_cross_entropy_rejects_bad_input():
    with pytest.raises(ValueError, match="reduction"):
        ops.cross_entropy(jnp.zeros((2, 4)), jnp.zeros((2,), jnp.int32), reduction="max")
    with pytest.raises(ValueError, match="do not match"):
        ops.cross_entropy(jnp.zeros((2, 4)), jnp.zeros((3,), jnp.int32))


def test_ops_work_under_jit_and_bfloat16():
    x = normal(0, (32, 64)).astype(jnp.bfloat16)
    w = normal(1, (64, 64)).astype(jnp.bfloat16)
    y = jax.jit(lambda x, w: ops.linear(x, w))(x, w)
    assert y.dtype == jnp.bfloat16
    g = jax.jit(jax.grad(lambda w: ops.linear(x, w).astype(jnp.float32).sum()))(w)
    assert g.dtype == jnp.bfloat16


@pytest.mark.parametrize("scale", [1 / math.sqrt(3), ops.silu_glu_scale(1.0)])
def test_bf16_ops_scale_by_the_exact_constant_as_torch_does(scale):
    """A Python-float scale on bf16 values is applied as PyTorch (the authors'
    ``unit_scaling``) applies it, multiplying in fp32 and rounding once: bit for bit equal to
    ``torch_bf16_tensor * scale``.  JAX's plain ``x * scale`` first rounds the scale to bf16
    (1/√3 → 0.578125, +0.134%; s(1) = 1.68179 → 1.6796875, −0.125%), so its outputs are off
    by that much on average."""
    torch = pytest.importorskip("torch")
    x = jax.random.normal(jax.random.key(0), (256, 256), jnp.float32).astype(jnp.bfloat16)
    x32 = np.asarray(x, np.float32)

    def torch_times(v32, s):  # PyTorch's bf16 result, as float32
        return (torch.from_numpy(v32).to(torch.bfloat16) * s).float().numpy()

    want = torch_times(x32, scale)
    plain = np.asarray(x * scale, np.float32)
    assert abs(float(np.mean(plain[x32 != 0] / (x32[x32 != 0] * scale) - 1))) > 1e-3

    def same(got, expected):
        np.testing.assert_array_equal(np.asarray(got, np.float32), expected)

    same(ops.scale_fwd(x, scale), want)
    same(jax.vjp(lambda t: ops.scale_bwd(t, scale), x)[1](x)[0], want)
    # the plain rules' matmul, its scale on the weight (x below) and on the output (x above)
    eye = jnp.eye(256, dtype=jnp.bfloat16)
    same(ops.matmul(eye, x, scale), want)
    same(ops.matmul(eye[:8], x, scale), want[:8])
    same(jax.vjp(lambda w: ops.matmul(eye, w, scale), x)[1](x)[0], want)
    # gated SiLU with σ(m·z) = 1: scale·x_in·z, one rounding of the fp32 value
    z = jnp.full_like(x, 32.0)
    same(ops.gated_silu(x, z, scale=scale), torch_times(x32 * 32.0, scale))
