"""The authors' other unit-scaled ops (``umup_jax.extra_ops``): equal to ``unit_scaling`` 0.3.5's
functional ops in float64 (forward and every input gradient), unit RMS of outputs and gradients
as the authors' tests assert them (spec §10.2), the constants of spec §5.7, and bad input."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import SEED, assert_not_unit, assert_unit, rms, unit_backward
from umup_jax import extra_ops as X
from umup_jax import ops

torch = pytest.importorskip("torch", reason="the reference needs torch (extra 'reference')")
U = pytest.importorskip("unit_scaling.functional",
                        reason="the reference needs unit_scaling==0.3.5 (extra 'reference')")


def normal(i, shape):
    return jax.random.normal(jax.random.key(SEED + 200 + i), shape, jnp.float32)


def _compare(ours, theirs, *inputs, rtol=2e-5):
    """Our op (float32 JAX) and the authors' (float64 torch) on the same inputs and the same
    random cotangent: output and every input gradient within ``rtol`` of the reference's RMS."""
    y, pull = jax.vjp(ours, *inputs)
    cot = np.asarray(normal(99, y.shape), np.float64)
    grads = pull(jnp.asarray(cot, y.dtype))
    t_in = [torch.tensor(np.asarray(a, np.float64), requires_grad=True) for a in inputs]
    t_y = theirs(*t_in)
    t_y.backward(torch.tensor(cot))
    for name, a, b in [("output", y, t_y.detach())] + [
            (f"grad {i}", g, t.grad) for i, (g, t) in enumerate(zip(grads, t_in))]:
        b = b.numpy()
        err = np.sqrt(np.mean(np.square(np.asarray(a, np.float64) - b)))
        assert err <= rtol * max(rms(b), 1e-30), f"{name}: rms error {err:.3g}, ref rms {rms(b):.3g}"


# --- against unit_scaling ---------------------------------------------------------------------


@pytest.mark.parametrize("constraint", [None, "to_output_scale", "to_left_grad_scale",
                                        "to_right_grad_scale", "gmean"])
def test_matmul_matches_unit_scaling(constraint):
    left, right = normal(0, (3, 16, 32)), normal(1, (3, 32, 24))
    _compare(lambda a, b: X.matmul(a, b, constraint=constraint),
             lambda a, b: U.matmul(a, b, constraint=constraint), left, right)


@pytest.mark.parametrize("mult", [0.25, 1.0, 4.0])
@pytest.mark.parametrize("constraint", [None, "to_output_scale", "to_grad_input_scale"])
def test_silu_and_gelu_match_unit_scaling(mult, constraint):
    x = normal(0, (8, 64))
    _compare(lambda t: X.silu(t, mult=mult, constraint=constraint),
             lambda t: U.silu(t, mult=mult, constraint=constraint), x)
    for approximate, name in ((False, "none"), (True, "tanh")):
        _compare(lambda t: X.gelu(t, mult=mult, constraint=constraint, approximate=approximate),
                 lambda t: U.gelu(t, mult=mult, constraint=constraint, approximate=name), x)


@pytest.mark.parametrize("mult", [0.25, 1.0, 4.0])
@pytest.mark.parametrize("axis", [-1, 1])
def test_softmax_matches_unit_scaling(mult, axis):
    x = normal(0, (4, 48, 32))
    for constraint in (None, "to_output_scale"):
        _compare(lambda t: X.softmax(t, axis=axis, mult=mult, constraint=constraint),
                 lambda t: U.softmax(t, dim=axis, mult=mult, constraint=constraint), x)


def test_norms_and_mse_match_unit_scaling():
    x = 3.0 + 2.0 * normal(0, (4, 8, 32))
    w, b = 1.0 + 0.1 * normal(1, (32,)), 0.1 * normal(2, (32,))
    _compare(lambda t, w, b: X.layer_norm(t, w, b),
             lambda t, w, b: U.layer_norm(t, (32,), w, b), x, w, b)
    _compare(lambda t: X.layer_norm(t), lambda t: U.layer_norm(t, (32,)), x)
    w2, b2 = 1.0 + 0.1 * normal(3, (8, 32)), 0.1 * normal(4, (8, 32))
    _compare(lambda t, w, b: X.layer_norm(t, w, b, normalized_ndim=2),
             lambda t, w, b: U.layer_norm(t, (8, 32), w, b), x, w2, b2)
    _compare(lambda t, w: X.rms_norm(t, w), lambda t, w: U.rms_norm(t, (32,), w), x, w)
    _compare(lambda t: X.rms_norm(t), lambda t: U.rms_norm(t, (32,)), x)
    target = normal(5, x.shape)
    for reduction in ("mean", "sum"):
        _compare(lambda a, t: X.mse_loss(a, t, reduction),
                 lambda a, t: U.mse_loss(a, t, reduction=reduction), x, target)


def test_dropout_in_evaluation_matches_unit_scaling():
    x = normal(0, (16, 32))
    _compare(lambda t: X.dropout(t, 0.3, deterministic=True),
             lambda t: U.dropout(t, 0.3, training=False), x)


def test_dropout_is_the_mask_over_root_keep_in_both_passes():
    x, key = normal(0, (64, 64)), jax.random.key(SEED)
    keep = np.asarray(jax.random.bernoulli(key, 0.7, x.shape))
    y, pull = jax.vjp(lambda t: X.dropout(t, 0.3, key), x)
    cot = normal(1, x.shape)
    (gx,) = pull(cot)
    np.testing.assert_allclose(y, np.where(keep, x / math.sqrt(0.7), 0.0), rtol=1e-6)
    np.testing.assert_allclose(gx, np.where(keep, cot / math.sqrt(0.7), 0.0), rtol=1e-6)
    assert 0.65 < keep.mean() < 0.75
    np.testing.assert_array_equal(X.dropout(x, 0.0), x)  # no key needed at rate 0


# --- unit scale (spec §10.2) ------------------------------------------------------------------


def _matmul_case(constraint):
    left, right = normal(0, (2**8, 2**10)), normal(1, (2**10, 2**12))
    return unit_backward(lambda a, b: X.matmul(a, b, constraint=constraint), left, right)


def test_matmul_unit_scale_per_constraint():
    y, (gl, gr) = _matmul_case(None)
    assert_unit(y, gl, gr)
    y, (gl, gr) = _matmul_case("to_output_scale")
    assert_unit(y)
    assert_not_unit(gl, gr)
    y, (gl, gr) = _matmul_case("to_left_grad_scale")
    assert_unit(gl)
    assert_not_unit(y, gr)
    y, (gl, gr) = _matmul_case("to_right_grad_scale")
    assert_unit(gr)
    assert_not_unit(y, gl)


@pytest.mark.parametrize("mult", [0.25, 1.0, 4.0])
@pytest.mark.parametrize("op", [X.silu, X.gelu])
def test_activations_unit_unconstrained_and_on_the_chosen_side(op, mult):
    x = normal(0, (2**16,))
    y, (gx,) = unit_backward(lambda t: op(t, mult=mult, constraint=None), x)
    assert_unit(y, gx)
    y, _ = unit_backward(lambda t: op(t, mult=mult, constraint="to_output_scale"), x)
    assert_unit(y)
    _, (gx,) = unit_backward(lambda t: op(t, mult=mult, constraint="to_grad_input_scale"), x)
    assert_unit(gx)


def test_activation_scale_constants():
    assert X.silu_scales(1.0) == pytest.approx((1.7668, 2**0.75), abs=1e-4)
    assert X.gelu_scales(1.0) == pytest.approx((1.7668, 1.5157), abs=1e-4)
    assert X.gelu_scales(1.0)[1] == pytest.approx(ops.silu_glu_scale(2.0), rel=1e-12)


def test_softmax_unit_at_quarter_mult():
    x = normal(0, (16, 4096))
    y, (gx,) = unit_backward(lambda t: X.softmax(t, mult=0.25, constraint=None), x)
    assert_unit(y, gx, stat=rms)
    np.testing.assert_allclose(np.sum(np.asarray(y, np.float64), axis=-1),
                               X.softmax_scales(4096, 0.25)[0], rtol=1e-5)


@pytest.mark.parametrize("rate", [0.01, 0.1, 0.5, 0.9, 0.99])
def test_dropout_unit(rate):
    y, (gx,) = unit_backward(lambda t: X.dropout(t, rate, jax.random.key(3)),
                             normal(0, (2**18,)))
    assert_unit(y, gx)


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_norms_with_gain_and_bias_unit(norm):
    x = normal(0, (2**10, 2**8))  # unit input (a norm's input gradient is g/σ of its input)
    w, b = jnp.ones((2**8,)), jnp.zeros((2**8,))
    if norm == "layer":
        y, (gx, gw, gb) = unit_backward(lambda t, w, b: X.layer_norm(t, w, b), x, w, b)
        assert_unit(y, gx, gw, gb)
    else:
        y, (gx, gw) = unit_backward(lambda t, w: X.rms_norm(t, w), x, w)
        assert_unit(y, gx, gw)


# --- bad input --------------------------------------------------------------------------------


def test_bad_input_is_refused():
    x = jnp.ones((4, 8))
    with pytest.raises(ValueError, match=r"matmul of \(4, 8\) and \(4, 8\)"):
        X.matmul(x, x)
    with pytest.raises(ValueError, match="mult=0.0 is invalid"):
        X.silu(x, mult=0.0)
    with pytest.raises(ValueError, match="rate=1.0 is invalid"):
        X.dropout(x, 1.0, jax.random.key(0))
    with pytest.raises(ValueError, match="needs a jax.random key"):
        X.dropout(x, 0.5)
    with pytest.raises(ValueError, match=r"weight of shape \(4,\) != the normalized shape"):
        X.layer_norm(x, jnp.ones((4,)))
    with pytest.raises(ValueError, match="one shape"):
        X.mse_loss(x, jnp.ones((4, 4)))
    with pytest.raises(ValueError, match="three scales"):
        ops.apply_constraint("to_left_grad_scale", 1.0, 2.0)
    assert ops.apply_constraint("to_right_grad_scale", 1.0, 2.0, 3.0) == (3.0, 3.0, 3.0)
    with pytest.raises(TypeError):
        X.softmax(x, mult=jnp.float32(1.0))
