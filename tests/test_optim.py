"""The optimizer: per-role learning rates (spec §10.2 table), closed-form AdamW steps with
independent weight decay, the schedule, and bad input."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.core import meta as flax_meta

from conftest import SEED
from umup_jax import parametrization as P
from umup_jax.optim import (
    OptimizerConfig,
    learning_rate_table,
    lr_multipliers,
    make_optimizer,
    make_schedule,
)


def boxed(role, shape, fan_in, fan_out, depth=None, seed=0):
    value = jax.random.normal(jax.random.key(SEED + seed), shape, jnp.float32)
    return P.ParamMeta(value=value, names=(None,) * len(shape), role=role, fan_in=fan_in,
                       fan_out=fan_out, depth=depth)


def reference_model():
    """The authors' optimizer test model (spec §10.2): Embedding(2^8, 2^4) → 3 hidden
    Linear(2^4, 2^4, bias) in a depth-3 stack → Readout(2^4 → 2^10); plus a norm gain."""
    tree = {"embedding": boxed(P.EMBEDDING, (256, 16), 16, 256, seed=1)}
    for i in range(3):
        tree[f"hidden_{i}"] = {
            "kernel": boxed(P.HIDDEN, (16, 16), 16, 16, depth=3, seed=10 + i),
            "bias": boxed(P.BIAS, (16,), 16, 16, depth=3, seed=20 + i),
        }
    tree["readout"] = boxed(P.OUTPUT, (16, 1024), 16, 1024, seed=2)
    tree["norm"] = boxed(P.NORM, (16,), 16, 16, seed=3)
    return {"params": tree}


def test_reference_lr_table():
    rule = P.UMuP()
    mults = lr_multipliers(rule, reference_model())["params"]
    lr = 0.1
    assert lr * mults["embedding"] == pytest.approx(0.1 / 4)
    for i in range(3):
        assert lr * mults[f"hidden_{i}"]["kernel"] == pytest.approx(0.1 / 4 / math.sqrt(3))
        assert lr * mults[f"hidden_{i}"]["bias"] == pytest.approx(0.1 / math.sqrt(3))
    assert lr * mults["readout"] == pytest.approx(0.1)
    assert lr * mults["norm"] == pytest.approx(0.1)
    # A parameter with mup_scaling_depth = 5 and fan_in 64 at base LR 0.02: 0.02/8/√5.
    deep = {"w": boxed(P.HIDDEN, (64, 3), 64, 3, depth=5)}
    assert 0.02 * lr_multipliers(rule, deep)["w"] == pytest.approx(0.02 / 8 / math.sqrt(5))
    rows = learning_rate_table(rule, reference_model(), lr)
    assert len(rows) == 9 and rows[0][0].startswith("['params']")


def _one_step(tree, opt_cfg, rule, grads):
    params = flax_meta.unbox(tree)
    tx = make_optimizer(opt_cfg, tree, rule)
    updates, _ = tx.update(grads, tx.init(params), params)
    return params, optax.apply_updates(params, updates)


def test_one_step_per_role_equals_hand_computed_update():
    tree = reference_model()
    rule = P.UMuP()
    eta, lam, eps = 0.1, 1e-3, 1e-8
    cfg = OptimizerConfig(learning_rate=eta, weight_decay=lam, eps=eps, schedule="constant")
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(7), p.shape) * 1e-2,
                         flax_meta.unbox(tree))
    params, new = _one_step(tree, cfg, rule, grads)
    c = {"embedding": 1 / 4, "readout": 1.0, "norm": 1.0}
    for i in range(3):
        c[f"hidden_{i}"] = {"kernel": 1 / 4 / math.sqrt(3), "bias": 1 / math.sqrt(3)}
    # First Adam step: m̂ = g, v̂ = g², so the direction is g/(|g| + ε).  Compare the step
    # Δp itself (float64 reference): float32 rounding of 1 − β₂ in Adam's bias correction
    # bounds the agreement at ~1e-5 relative.
    expected = jax.tree.map(
        lambda p, g, cp: eta * cp * np.float64(g) / (np.abs(np.float64(g)) + eps)
        + lam * np.float64(p),
        params["params"], grads["params"], c,
    )
    for path, e in jax.tree_util.tree_flatten_with_path(expected)[0]:
        got_new, got_old = new["params"], params["params"]
        for k in path:
            got_new, got_old = got_new[k.key], got_old[k.key]
        np.testing.assert_allclose(np.float64(got_old) - np.float64(got_new), e, rtol=2e-5,
                                   atol=2e-7, err_msg=jax.tree_util.keystr(path))


def numpy_adamw(params, grads_per_step, lrs, lam, b1, b2, eps, schedule):
    """torch.optim.AdamW with per-parameter lr_p and weight_decay λ/lr_p (the authors'
    independent decay), in float64."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, grads in enumerate(grads_per_step, start=1):
        s = schedule[t - 1]
        for k in p:
            lr = lrs[k] * s
            wd = lam / lrs[k]
            g = np.asarray(grads[k], np.float64)
            p[k] = p[k] * (1 - lr * wd)
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            mhat, vhat = m[k] / (1 - b1**t), v[k] / (1 - b2**t)
            p[k] = p[k] - lr * mhat / (np.sqrt(vhat) + eps)
    return p


@pytest.mark.parametrize("parametrization", ["umup", "mup", "sp"])
def test_several_steps_match_torch_style_adamw(parametrization):
    tree = {
        "emb": boxed(P.EMBEDDING, (32, 8), 8, 32, seed=1),
        "w": boxed(P.HIDDEN, (8, 24), 8, 24, depth=2, seed=2),
        "out": boxed(P.OUTPUT, (8, 32), 8, 32, seed=3),
    }
    rule = P.make_parametrization(parametrization, width=8, hparams=(
        {"base_width": 4, "emb_lr_mult": 2.0} if parametrization == "mup" else {}))
    cfg = OptimizerConfig(learning_rate=0.3, weight_decay=0.05, b1=0.8, b2=0.95, eps=1e-6,
                          warmup_steps=2, total_steps=6)
    tx = make_optimizer(cfg, tree, rule)
    params = flax_meta.unbox(tree)
    state = tx.init(params)
    grads_seq = [
        {k: np.asarray(jax.random.normal(jax.random.key(100 + 10 * t + i), x.shape))
         for i, (k, x) in enumerate(sorted(params.items()))}
        for t in range(6)
    ]
    for g in grads_seq:
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
    sched = [float(make_schedule(cfg)(t)) for t in range(6)]
    lrs = {k: 0.3 * c for k, c in lr_multipliers(rule, tree).items()}
    expected = numpy_adamw(flax_meta.unbox(tree), grads_seq, lrs, 0.05, 0.8, 0.95, 1e-6, sched)
    for k in params:
        np.testing.assert_allclose(params[k], expected[k], rtol=2e-5, atol=1e-6, err_msg=k)


def test_default_config_is_the_papers_adamw():
    """The defaults are the paper's AdamW (Table 5, spec §0.1 and §7): β₁ = 0.9, β₂ = 0.999,
    ε = 1e-8, independent weight decay λ = 2⁻¹³, cosine to 10% of the peak.  Checked as
    behaviour too: four steps of ``OptimizerConfig()`` (only η and the schedule set) equal the
    float64 torch-style AdamW with those constants, on gradients of RMS ~1e-5 whose size
    changes from step to step, where ε shows and β₂ does from the second step on (Adam's
    first step is g/(|g| + ε) whatever β₁ and β₂ are).  The total change of each parameter
    agrees to 1e-4 (RMS relative; measured 7.5e-6, float32 against float64), where
    β₂ = 0.99 gives 1e-3, λ = 0 2e-3 and ε = 1e-6 0.16."""
    cfg = OptimizerConfig(learning_rate=0.3, schedule="constant")
    assert (cfg.b1, cfg.b2, cfg.eps, cfg.weight_decay, cfg.final_lr_fraction) == (
        0.9, 0.999, 1e-8, 2.0**-13, 0.1)
    tree = {
        "emb": boxed(P.EMBEDDING, (32, 8), 8, 32, seed=1),
        "w": boxed(P.HIDDEN, (8, 24), 8, 24, depth=2, seed=2),
        "out": boxed(P.OUTPUT, (8, 32), 8, 32, seed=3),
    }
    rule = P.UMuP()
    tx = make_optimizer(cfg, tree, rule)
    params = flax_meta.unbox(tree)
    state = tx.init(params)
    sizes = (1e-5, 4e-5, 0.5e-5, 2e-5)
    grads_seq = [
        {k: size * np.asarray(jax.random.normal(jax.random.key(200 + 10 * t + i), x.shape))
         for i, (k, x) in enumerate(sorted(params.items()))}
        for t, size in enumerate(sizes)
    ]
    for g in grads_seq:
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
    lrs = {k: 0.3 * c for k, c in lr_multipliers(rule, tree).items()}
    start = flax_meta.unbox(tree)
    expected = numpy_adamw(start, grads_seq, lrs, 2.0**-13, 0.9, 0.999, 1e-8, [1.0] * len(sizes))
    for k in params:
        ours = np.float64(params[k]) - np.float64(start[k])
        want = expected[k] - np.float64(start[k])
        err = np.sqrt(np.mean((ours - want) ** 2)) / np.sqrt(np.mean(want**2))
        assert err <= 1e-4, (k, err)


def test_weight_decay_is_independent_of_learning_rate():
    tree = {"w": boxed(P.HIDDEN, (16, 16), 16, 16)}
    zeros = {"w": jnp.zeros((16, 16))}
    outs = []
    for eta in (1e-3, 10.0):
        cfg = OptimizerConfig(learning_rate=eta, weight_decay=0.01, schedule="constant")
        _, new = _one_step(tree, cfg, P.UMuP(), zeros)
        outs.append(new["w"])
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-7)
    np.testing.assert_allclose(outs[0], flax_meta.unbox(tree)["w"] * (1 - 0.01), rtol=1e-6)


def test_schedule_warmup_then_cosine_to_ten_percent():
    s = make_schedule(OptimizerConfig(warmup_steps=4, total_steps=14))
    values = [float(s(t)) for t in range(20)]
    np.testing.assert_allclose(values[:4], [0.25, 0.5, 0.75, 1.0], rtol=1e-6)
    assert values[4] == pytest.approx(1.0)
    assert values[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert values[14] == pytest.approx(0.1) and values[19] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[3:], values[4:]))
    flat = make_schedule(OptimizerConfig(schedule="constant", warmup_steps=2))
    assert [float(flat(t)) for t in range(4)] == [0.5, 1.0, 1.0, 1.0]


def test_parameter_without_metadata_raises():
    tree = {"params": {"w": boxed(P.HIDDEN, (4, 4), 4, 4), "plain": jnp.zeros((4,))}}
    with pytest.raises(ValueError, match=r"\['params'\]\['plain'\] has no u-μP metadata"):
        make_optimizer(OptimizerConfig(), tree, P.UMuP())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(learning_rate=0.0), "learning_rate=0.0 is invalid"),
        (dict(learning_rate=-1.0), "learning_rate=-1.0 is invalid"),
        (dict(learning_rate=float("inf")), "learning_rate=inf is invalid: it must be a finite"),
        (dict(eps=float("inf")), "eps=inf is invalid"),
        (dict(weight_decay=float("nan")), "weight_decay=nan is invalid"),
        (dict(b1=1.0), "b1=1.0 is invalid"),
        (dict(b2=-0.1), "b2=-0.1 is invalid"),
        (dict(eps=0.0), "eps=0.0 is invalid"),
        (dict(weight_decay=-1e-3), "weight_decay=-0.001 is invalid"),
        (dict(schedule="linear"), "schedule='linear' is invalid"),
        (dict(warmup_steps=-1), "warmup_steps=-1 is invalid"),
        (dict(total_steps=0), "total_steps=0 is invalid"),
        (dict(final_lr_fraction=1.5), "final_lr_fraction=1.5 is invalid"),
    ],
)
def test_bad_optimizer_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OptimizerConfig(**kwargs)
