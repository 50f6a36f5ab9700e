"""abc rules, the residual τ rule (spec §4.2) and input validation of parametrizations."""

import math

import jax
import numpy as np
import pytest

from umup_jax import parametrization as P


def meta(role, fan_in=256, fan_out=256, depth=None):
    return P.ParamMeta(value=None, names=(None, None), role=role, fan_in=fan_in,
                       fan_out=fan_out, depth=depth)


# --- τ rule ----------------------------------------------------------------------------------


def test_tau_values_at_defaults_l4():
    expected = [0.5, 0.4472, 0.4082, 0.3780, 0.3536, 0.3333, 0.3162, 0.3015]
    np.testing.assert_allclose(P.residual_taus(4), expected, atol=1e-4)
    # Closed form at defaults: τ_i = 1/√(L+i).
    np.testing.assert_allclose(P.residual_taus(4), [1 / math.sqrt(4 + i) for i in range(8)])


def _final_scales(taus):
    """Final weight of the embedding and of each branch in the output stream."""
    scales = np.ones(len(taus) + 1)
    for n, tau in enumerate(taus):
        scales[n + 1] *= tau
        scales[: n + 2] /= math.sqrt(1 + tau**2)
    return scales


@pytest.mark.parametrize(
    "residual_mult, attn_ratio, branches",
    [(1.0, 1.0, 4), (0.5, 1.0, 4), (1.0, 2.0, 4), (0.5, 1 / 3, 6)],
)
def test_tau_rule_properties(residual_mult, attn_ratio, branches):
    taus = P.residual_taus(branches // 2, residual_mult, attn_ratio)
    scales = _final_scales(taus)
    emb, attn, ffn = scales[0], scales[1::2], scales[2::2]
    assert np.sum(scales**2) == pytest.approx(1.0, abs=1e-12)
    s_attn, s_ffn = np.sqrt(np.sum(attn**2)), np.sqrt(np.sum(ffn**2))
    assert math.sqrt((s_attn**2 + s_ffn**2) / 2) / emb == pytest.approx(residual_mult)
    assert s_attn / s_ffn == pytest.approx(attn_ratio)
    np.testing.assert_allclose(attn, attn[0])
    np.testing.assert_allclose(ffn, ffn[0])


def test_embedding_keeps_a_third_at_defaults():
    b = [P.residual_weights(t)[1] for t in P.residual_taus(4)]
    assert math.prod(b) ** 2 == pytest.approx(1 / 3)


def test_residual_weights_are_unit_norm():
    a, b = P.residual_weights(0.7)
    assert a * a + b * b == pytest.approx(1.0)
    assert a / b == pytest.approx(0.7)


# --- abc tables ------------------------------------------------------------------------------


def test_umup_table():
    rule = P.UMuP()
    assert rule.abc(meta(P.EMBEDDING, fan_in=64, fan_out=1000)) == P.ABC(1.0, 1.0, 1 / 8)
    assert rule.abc(meta(P.HIDDEN, fan_in=256, depth=4)) == P.ABC(1 / 16, 1.0, 1 / 16 / 2)
    assert rule.abc(meta(P.HIDDEN, fan_in=256)) == P.ABC(1 / 16, 1.0, 1 / 16)
    assert rule.abc(meta(P.OUTPUT, fan_in=256)) == P.ABC(1 / 256, 1.0, 1.0)
    assert rule.abc(meta(P.BIAS, depth=9)) == P.ABC(1.0, 0.0, 1 / 3)
    assert rule.abc(meta(P.NORM)) == P.ABC(1.0, 1.0, 1.0)


def test_mup_table_relative_to_base_width():
    rule = P.make_parametrization(
        "mup", width=1024, hparams=dict(base_width=256, init_std=0.5, emb_mult=2.0,
                                        output_mult=3.0, emb_lr_mult=4.0))
    assert rule.width_mult == 4
    assert rule.abc(meta(P.EMBEDDING)) == P.ABC(2.0, 0.5, 4.0)
    assert rule.abc(meta(P.HIDDEN, fan_in=4096)) == P.ABC(1.0, 0.25, 0.25)
    assert rule.abc(meta(P.OUTPUT, fan_in=1024)) == P.ABC(0.75, 0.5, 1.0)
    assert rule.attention_logit_scale(64) == pytest.approx(1 / 64)
    base = P.make_parametrization("mup", width=256, hparams=dict(init_std=0.5))
    sp = P.SP(init_std=0.5)
    # At the base width μP's weights are SP's (its multipliers here all 1) ...
    for role in (P.EMBEDDING, P.HIDDEN, P.OUTPUT):
        assert base.abc(meta(role)) == sp.abc(meta(role))
    # ... but its attention logits are not: α_attn/d_head against SP's 1/√d_head.
    assert base.attention_logit_scale(64) == pytest.approx(1 / 64)
    assert sp.attention_logit_scale(64) == pytest.approx(1 / 8)


def test_sp_table():
    rule = P.SP(init_std=0.02)
    for role in (P.EMBEDDING, P.HIDDEN, P.OUTPUT):
        assert rule.abc(meta(role, fan_in=999, depth=3)) == P.ABC(1.0, 0.02, 1.0)
    assert rule.attention_logit_scale(64) == pytest.approx(1 / 8)


def test_sp_emb_lr_scaling_table():
    """SP + embedding LR (Kalra & Barkeshli 2026): only the embedding's C changes, to
    width/base_width; hand-computed at width 256, base width 32 (factor 8)."""
    rule = P.make_parametrization("sp", width=256, hparams=dict(
        init_std=0.02, emb_lr_scaling=True, base_width=32))
    assert rule.abc(meta(P.EMBEDDING, fan_in=256, fan_out=1000)) == P.ABC(1.0, 0.02, 8.0)
    assert rule.abc(meta(P.HIDDEN, fan_in=1024, depth=3)) == P.ABC(1.0, 0.02, 1.0)
    assert rule.abc(meta(P.OUTPUT, fan_in=256)) == P.ABC(1.0, 0.02, 1.0)
    assert rule.abc(meta(P.BIAS)) == P.ABC(1.0, 0.0, 1.0)
    assert rule.abc(meta(P.NORM)) == P.ABC(1.0, 1.0, 1.0)
    assert rule.attention_logit_scale(64) == pytest.approx(1 / 8)
    # base_width = 1: the factor is the width itself; at the base width it is 1.
    assert P.make_parametrization("sp", 48, dict(emb_lr_scaling=True, base_width=1)).abc(
        meta(P.EMBEDDING)).c == 48.0
    assert P.make_parametrization("sp", 32, dict(emb_lr_scaling=True, base_width=32)).abc(
        meta(P.EMBEDDING)).c == 1.0
    # Off (the default): plain SP at any width, whatever the base width.
    off = P.make_parametrization("sp", width=256, hparams=dict(base_width=32))
    assert off.abc(meta(P.EMBEDDING)) == P.ABC(1.0, 0.02, 1.0)
    assert P.make_parametrization("sp", width=256) == P.SP(width=256)


def test_sp_emb_lr_matches_mup_ratio_and_keeps_the_embedding_lr_fixed():
    """The embedding-to-hidden LR ratio equals μP's (η̂_emb = 1) at every width, and with SP's
    tuned η ∝ base_width/width the embedding's own LR η·C stays at its base-width value."""
    base, eta0 = 32, 2.0**-7
    for width in (32, 64, 128, 256, 1024):
        sp = P.make_parametrization("sp", width, dict(emb_lr_scaling=True, base_width=base))
        mup = P.make_parametrization("mup", width, dict(base_width=base))
        ratio = lambda r: r.abc(meta(P.EMBEDDING)).c / r.abc(meta(P.HIDDEN, fan_in=width)).c
        assert ratio(sp) == pytest.approx(ratio(mup)) == pytest.approx(width / base)
        eta = eta0 * base / width  # SP's measured optimum: halves with each doubling
        assert eta * sp.lr_multiplier(meta(P.EMBEDDING)) == pytest.approx(eta0)
        assert eta * sp.lr_multiplier(meta(P.HIDDEN)) == pytest.approx(eta)


def test_abc_shift():
    shifted = P.abc_shift(P.ABC(1.0, 2.0, 3.0), 4.0)
    assert shifted == P.ABC(4.0, 0.5, 0.75)
    rule = P.MuP(shift={P.HIDDEN: 2.0})
    assert rule.abc(meta(P.HIDDEN)) == P.abc_shift(P.MuP().abc(meta(P.HIDDEN)), 2.0)
    assert rule.abc(meta(P.OUTPUT)) == P.MuP().abc(meta(P.OUTPUT))


# --- metadata --------------------------------------------------------------------------------


def test_param_metadata_rejects_undeclared_leaves():
    boxed = {"params": {"a": meta(P.HIDDEN).replace_boxed(np.zeros(3)), "b": np.zeros(3)}}
    with pytest.raises(ValueError, match=r"\['b'\].*no u-μP metadata"):
        P.param_metadata(boxed)


def test_param_metadata_keeps_fields():
    boxed = {"params": {"w": meta(P.OUTPUT, 7, 9, 2).replace_boxed(np.zeros((7, 9)))}}
    (m,) = jax.tree.leaves(P.param_metadata(boxed), is_leaf=lambda x: isinstance(x, P.ParamMeta))
    assert (m.role, m.fan_in, m.fan_out, m.depth, m.value) == (P.OUTPUT, 7, 9, 2, None)


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, hparams, match",
    [
        ("bogus", {}, "parametrization='bogus' is invalid"),
        ("umup", {"init_std": 1.0}, r"\['init_std'\] are invalid"),
        ("umup", {"attn_mult": 0.0}, "attn_mult=0.0 is invalid"),
        ("umup", {"residual_mult": -1.0}, "residual_mult=-1.0 is invalid"),
        ("mup", {"base_width": 0}, "base_width=0 is invalid"),
        ("sp", {"init_std": -0.1}, "init_std=-0.1 is invalid"),
        ("sp", {"emb_lr_scaling": 1}, "emb_lr_scaling=1 is invalid: it must be True or False"),
        ("sp", {"emb_lr_scaling": True, "base_width": 0}, "base_width=0 is invalid"),
        ("sp", {"width": 64}, r"\['width'\] are invalid"),
        ("umup", {"shift": {"weights": 2.0}}, "shift role 'weights' is invalid"),
    ],
)
def test_bad_hparams_raise_naming_the_field(name, hparams, match):
    with pytest.raises(ValueError, match=match):
        P.make_parametrization(name, width=64, hparams=hparams)


def test_bad_role_raises():
    with pytest.raises(ValueError, match="role='weight' is invalid"):
        P.UMuP().abc(meta("weight"))


def test_tau_rule_rejects_bad_input():
    with pytest.raises(ValueError, match="num_layers=0"):
        P.residual_taus(0)
    with pytest.raises(ValueError, match="residual_attn_ratio=0"):
        P.residual_taus(2, 1.0, 0)
