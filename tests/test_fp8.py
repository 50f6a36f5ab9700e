"""FP8: exactness against fake quantization, saturation, policies in the lowered HLO,
scan/jit/grad, training parity with BF16 and the μP vs u-μP underflow direction."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta as flax_meta

from conftest import SEED
from umup_jax import config as config_lib
from umup_jax import data as data_lib
from umup_jax import fp8
from umup_jax import train as train_lib
from umup_jax.metrics import read_metrics
from umup_jax.model import Decoder, ModelConfig, init_params


def normal(i, shape, scale=1.0):
    return scale * jax.random.normal(jax.random.key(SEED + i), shape, jnp.float32)


def q(x, dtype):
    return fp8.saturating_cast(x, dtype).astype(jnp.float32)


@pytest.mark.parametrize("mode", ["fp8", "fp8_e5m2_input"])
def test_fp8_dot_equals_fake_quant_forward_and_gradients(mode):
    x, w, g = normal(0, (4, 16, 64)), normal(1, (64, 48)), normal(2, (4, 16, 48))
    y, vjp = jax.vjp(lambda x, w: fp8.fp8_dot(x, w, mode), x, w)
    dx, dw = vjp(g)
    x_dtype = fp8.E5M2 if mode == "fp8_e5m2_input" else fp8.E4M3
    g_w_dtype = fp8.E4M3 if mode == "fp8_e5m2_input" else fp8.E5M2
    hi = jax.lax.Precision.HIGHEST
    np.testing.assert_array_equal(y, fp8.fake_quant_dot(x, w, mode))
    np.testing.assert_array_equal(
        dx, jnp.matmul(q(g, fp8.E5M2), q(w, fp8.E4M3).T, precision=hi))
    # Same contraction layout as the fp8 weight-gradient GEMM (rows of x and g contracted).
    dw_ref = jax.lax.dot_general(q(x, x_dtype).reshape(-1, 64), q(g, g_w_dtype).reshape(-1, 48),
                                 (((0,), (0,)), ((), ())), precision=hi)
    np.testing.assert_array_equal(dw, dw_ref)


def test_fp8_dynamic_rescales_the_input():
    x, w = normal(0, (32, 64), scale=1000.0), normal(1, (64, 16))
    y = fp8.fp8_dot(x, w, "fp8_dynamic")
    np.testing.assert_allclose(y, fp8.fake_quant_dot(x, w, "fp8_dynamic"), rtol=1e-6)
    np.testing.assert_allclose(y, x @ w, rtol=0.1, atol=0.05 * float(jnp.abs(x @ w).max()))
    assert bool(jnp.all(jnp.isfinite(fp8.fp8_dot(x, w, "fp8"))))


def test_fp8_dynamic_gradients_equal_fake_quant():
    """``fp8_dynamic`` (spec §8, the paper's App. D) computes y = s·(q(x/s) @ q(w)) with
    s = RMS(x) in fp32, so its gradients are ∂x = q(g, E5M2) @ q(w, E4M3)ᵀ and
    ∂w = s·q(x/s, E4M3)ᵀ @ q(g, E5M2): equal to those products (fp32, ≤ 1e-6 relative), and
    within FP8 error of the unquantized ∂w = xᵀg on an input of RMS 1000, which the plain
    E4M3 cast would saturate."""
    x, w, g = normal(0, (4, 16, 64), scale=1000.0), normal(1, (64, 48)), normal(2, (4, 16, 48))
    _, vjp = jax.vjp(lambda x, w: fp8.fp8_dot(x, w, "fp8_dynamic"), x, w)
    dx, dw = vjp(g)
    s = jnp.sqrt(jnp.mean(jnp.square(x))) + 1e-30
    hi = jax.lax.Precision.HIGHEST
    np.testing.assert_allclose(dx, jnp.matmul(q(g, fp8.E5M2), q(w, fp8.E4M3).T, precision=hi),
                               rtol=1e-6, atol=0)
    dw_ref = s * jax.lax.dot_general(q(x / s, fp8.E4M3).reshape(-1, 64),
                                     q(g, fp8.E5M2).reshape(-1, 48),
                                     (((0,), (0,)), ((), ())), precision=hi)
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-6, atol=1e-6 * float(jnp.abs(dw_ref).max()))
    exact = x.reshape(-1, 64).T @ g.reshape(-1, 48)
    np.testing.assert_allclose(dw, exact, rtol=0, atol=0.1 * float(jnp.abs(exact).max()))


def test_saturation_is_finite_never_nan():
    big = jnp.array([1e3, -1e6, 1e9, 3.0], jnp.float32)
    assert np.isnan(np.asarray(big.astype(fp8.E4M3).astype(jnp.float32)[0]))  # why we clip
    np.testing.assert_array_equal(q(big, fp8.E4M3), [448.0, -448.0, 448.0, 3.0])
    np.testing.assert_array_equal(q(jnp.array([1e6]), fp8.E5M2), [57344.0])
    x = jnp.full((2, 8), 1e4)
    w = jnp.ones((8, 4))
    y, vjp = jax.vjp(lambda x, w: fp8.fp8_dot(x, w), x, w)
    dx, dw = vjp(jnp.full((2, 4), 1e7))
    for t in (y, dx, dw):
        assert bool(jnp.all(jnp.isfinite(t)))
    np.testing.assert_array_equal(y, 448.0 * 8)


def test_telemetry_counts_saturation_and_underflow():
    x = jnp.concatenate([jnp.full((10, 8), 1e3), jnp.full((10, 8), 1e-9), jnp.ones((80, 8))])
    w = jnp.ones((8, 4))
    g = jnp.full((100, 4), 1e-9)
    probe = jnp.zeros((6,))
    _, vjp = jax.vjp(lambda x, w, p: fp8.fp8_dot(x, w, "fp8", probe=p), x, w, probe)
    stats = dict(zip(fp8.STAT_NAMES, np.asarray(vjp(g)[2])))
    assert stats["x_saturated"] == pytest.approx(0.1) and stats["x_underflow"] == pytest.approx(0.1)
    assert stats["w_saturated"] == 0 and stats["w_underflow"] == 0
    assert stats["g_underflow"] == pytest.approx(1.0)


@pytest.mark.parametrize("dtype", [fp8.E4M3, fp8.E5M2])
@pytest.mark.parametrize("x_dtype", [jnp.float32, jnp.bfloat16])
def test_underflow_is_read_from_bounds_and_equals_the_cast(dtype, x_dtype):
    """``cast_stats`` counts as underflow the non-zero |v| ≤ half the smallest subnormal (it
    must not cast to FP8 and back, which XLA folds away on a GPU).  On this CPU, which keeps
    the round trip, that is exactly the set of values the saturating cast sends to zero: on
    2⁻²⁴ … 2² log-spaced (both signs, zeros, the saturation range) and on each bound and its
    float32 neighbours."""
    bound = fp8.underflow_bound(dtype)
    assert bound == float(jnp.finfo(dtype).smallest_subnormal) / 2
    grid = np.geomspace(2.0**-24, 4.0, 200_001)
    edges = [np.nextafter(np.float32(b), np.float32(d))
             for b in (bound, 2 * bound, 3 * bound, fp8.fp8_max(dtype))
             for d in (0.0, np.inf)] + [bound, 2 * bound, 3 * bound, 0.0, 1e6]
    v = np.concatenate([grid, -grid, np.asarray(edges, np.float64)])
    x = jnp.asarray(v, jnp.float32).astype(x_dtype)
    xf = np.asarray(x.astype(jnp.float32))
    cast = np.asarray(jax.jit(lambda x: q(x.astype(jnp.float32), dtype))(x))
    expected = (xf != 0) & (cast == 0)
    assert 0.1 < expected.mean() < 0.9  # both outcomes on the grid
    rule = (np.abs(xf) <= bound) & (xf != 0)
    np.testing.assert_array_equal(rule, expected)
    sat, under = jax.jit(lambda x: fp8.cast_stats(x, dtype))(x)
    assert float(under) == pytest.approx(expected.mean(), abs=1e-7)
    assert "f8" not in str(jax.make_jaxpr(lambda x: fp8.cast_stats(x, dtype))(x))  # no cast
    assert float(sat) == pytest.approx(np.mean(np.abs(xf) > fp8.fp8_max(dtype)), abs=1e-7)


def test_gradient_telemetry_is_the_cast_the_weight_gradient_matmul_takes():
    """In ``fp8_e5m2_input`` the weight-gradient matmul takes g in E4M3 (E5M2 pairs only with
    E4M3), which underflows far more than the E5M2 cast of ``dx``: at gradient RMS 0.01 about
    8% of g flushes to zero (|g| ≤ 2⁻¹⁰) against 0.06% in E5M2 (|g| ≤ 2⁻¹⁷).  The reported
    fractions are those of E4M3 there and of E5M2 in ``fp8``; each equals a count in numpy."""
    x, w = normal(0, (512, 16)), normal(1, (16, 64))
    g = 0.01 * normal(2, (512, 64))
    gf = np.abs(np.asarray(g, np.float64))
    under = {"fp8": np.mean(gf <= 2.0**-17), "fp8_e5m2_input": np.mean(gf <= 2.0**-10)}
    big = jnp.concatenate([g[:, :60], jnp.full((512, 4), 1000.0)], axis=1)  # > 448, < 57344
    for mode in ("fp8", "fp8_e5m2_input"):
        stats = []
        for grad in (g, big):
            _, vjp = jax.vjp(lambda x, w, p: fp8.fp8_dot(x, w, mode, probe=p), x, w,
                             jnp.zeros((6,)))
            stats.append(dict(zip(fp8.STAT_NAMES, np.asarray(vjp(grad)[2]))))
        assert stats[0]["g_underflow"] == pytest.approx(under[mode], abs=1e-7), mode
        assert stats[0]["g_saturated"] == 0
        # 1000 saturates E4M3 (the dw cast of fp8_e5m2_input), not E5M2.
        assert stats[1]["g_saturated"] == pytest.approx(
            4 / 64 if mode == "fp8_e5m2_input" else 0.0), mode
    assert under["fp8_e5m2_input"] > 0.07 and under["fp8"] < 0.002


def test_fp8_dot_under_scan_jit_and_grad():
    ws = normal(0, (3, 32, 32), scale=32**-0.5)
    x = normal(1, (8, 32))

    def stack(ws, x, dot):
        return jax.lax.scan(lambda h, w: (jnp.tanh(dot(h, w)), None), x, ws)[0].sum()

    g8 = jax.jit(jax.grad(lambda ws: stack(ws, x, fp8.fp8_dot)))(ws)
    g_ref = jax.grad(lambda ws: stack(ws, x, jnp.matmul))(ws)
    assert g8.shape == ws.shape and bool(jnp.all(jnp.isfinite(g8)))
    cos = float(jnp.sum(g8 * g_ref) / (jnp.linalg.norm(g8) * jnp.linalg.norm(g_ref)))
    assert cos > 0.95  # FP8 noise, same direction


@pytest.mark.parametrize("policy", [
    "paper_simple", "paper_large", {"qkv": "fp8", "ffn_down": "fp8_e5m2_input"},
    {"attn_out": "fp8_dynamic", "readout": "fp8"},
])
def test_policies_select_exactly_their_groups_in_hlo(policy):
    cfg = ModelConfig(vocab_size=64, width=32, depth=2, num_heads=1, seq_len=8, fp8=policy)
    model = Decoder(cfg)
    params = flax_meta.unbox(init_params(model, jax.random.key(0)))
    toks = jnp.zeros((2, 8), jnp.int32)
    loss = lambda p: model.apply(p, toks, toks, method=Decoder.loss)
    for fn in (loss, jax.grad(loss)):
        text = jax.jit(fn).lower(params).as_text(debug_info=True)
        locs = dict(re.findall(r"^(#loc\d+) = loc\((.*)\)$", text, re.M))
        seen: dict[str, set] = {}
        for line in text.splitlines():
            if "stablehlo.dot_general" not in line:
                continue
            ref = re.search(r"loc\((#loc\d+)\)", line)
            group = re.search(r"fp8_(qkv|attn_out|ffn_in|ffn_down|readout)",
                              locs.get(ref.group(1), "") if ref else "")
            if group is None:
                assert "f8E" not in line  # attention's own matmuls stay out of FP8
                continue
            seen.setdefault(group.group(1), set()).add("f8E" in line)
        resolved = cfg.fp8_policy
        assert set(seen) == set(fp8.GROUPS)
        for g in fp8.GROUPS:
            expect = resolved[g] != "bf16"
            assert seen[g] == {expect}, (g, resolved[g], seen[g])


def test_bad_policy_raises():
    with pytest.raises(ValueError, match="fp8='fast' is invalid"):
        fp8.resolve_policy("fast")
    with pytest.raises(ValueError, match=r"fp8 groups \['lm_head'\] are invalid"):
        fp8.resolve_policy({"lm_head": "fp8"})
    with pytest.raises(ValueError, match=r"fp8\['qkv'\]='e4m3' is invalid"):
        ModelConfig(fp8={"qkv": "e4m3"})


def _config(parametrization, fp8_preset, steps=50, seed=0):
    arg = (f"smoke,seed={seed},model.width=64,model.depth=2,model.num_heads=1,model.seq_len=64,"
           f"model.dtype=bfloat16,train.batch_size=8,train.steps={steps},"
           f"train.metrics_every=10,train.eval_every={steps},train.checkpoint_every={steps},"
           f"optimizer.warmup_steps=10,model.fp8={fp8_preset}")
    if parametrization == "umup":
        arg += ",optimizer.learning_rate=2.8284271247461903"  # 2^1.5: a brisk but stable η
    cfg = config_lib.proxy_config(parametrization, arg)
    if parametrization == "mup":
        cfg.model.hparams.base_width = 64
    return cfg


def _train(tmp_path, name, parametrization, fp8_preset, steps=50, seed=0):
    """The trainer's run: (results, train rows, stats rows)."""
    cfg = _config(parametrization, fp8_preset, steps, seed)
    results = train_lib.train_and_evaluate(cfg, str(tmp_path / name))
    rows = read_metrics(tmp_path / name / "metrics.jsonl", "train")
    stats = read_metrics(tmp_path / name / "metrics.jsonl", "stats")
    return results, rows, stats


def _losses_by_seed(parametrization, fp8_preset, seeds, steps=50) -> dict[int, list[float]]:
    """{seed: the loss of each step} of the trainer's runs of ``_config`` with those init
    seeds, built from the trainer's own pieces (its run, init, step and data order) and
    compiled once for all seeds: no evaluation, checkpoints or logs, which cost seconds per
    run here."""
    cfg = _config(parametrization, fp8_preset, steps)
    run = train_lib.build_run(cfg)
    init = train_lib.make_init_fn(run)
    step = train_lib.make_train_step(run, with_stats=False)
    data = iter(data_lib.train_dataset(run.tokens.train, run.model_cfg.seq_len,
                                       cfg.train.batch_size, cfg.data.shuffle_seed))
    batches = [train_lib.to_global(run, next(data)) for _ in range(steps)]
    out = {}
    for seed in seeds:
        state, losses = init(jax.random.key(seed)), []
        for batch in batches:
            state, metrics = step(state, batch)
            losses.append(metrics["loss"])
        out[seed] = [float(x) for x in jax.device_get(losses)]
    return out


def _underflow(stats):
    vals = [v for row in stats for k, v in row.items() if k.endswith("_underflow")]
    return float(np.mean(vals))


def test_umup_trains_in_fp8_like_bf16_and_mup_underflows_more(tmp_path):
    # One seed's FP8 and BF16 runs differ by up to ±2.1% after 50 steps on jax 0.10.2 (seeds
    # 0-2, shuffle seeds 0-2, measured 2026-12-06; BF16 alone spans 5.5% across them) and by
    # up to 4.2% on jax 0.12.1, so the comparison is over twelve init seeds: their mean ratio
    # within 1.5% and each within 5%. Three seeds were too few: a change of the loss's
    # backward by one rounding moved seeds 0-2's mean from 1.0065 to 1.0169 (2026-12-07, jax
    # 0.10.2); seeds 0-7 then gave 0.990-1.029, mean 1.0077, and seeds 0-5 a mean of 1.0082.
    # Through the trainer's own step (_losses_by_seed) twelve seeds take ~20 s, both compiles
    # included (six seeds as full trainer runs took 92 s), and the mean's seed noise is ~0.4%
    # instead of ~0.6%: seeds 0-11 gave 0.982-1.036, mean 1.0080, on jax 0.10.2 and
    # 0.987-1.031, mean 1.0078, on 0.12.1 (2026-12-07). The trainer's FP8 run of seed 0,
    # which also gives the cast statistics, must log the very same losses as
    # _losses_by_seed's.
    seeds = range(12)
    bf16 = _losses_by_seed("umup", "none", seeds)
    fp8_losses = _losses_by_seed("umup", "paper_simple", seeds)
    _, fp8_rows, u_stats = _train(tmp_path, "u_fp8", "umup", "paper_simple", seed=0)
    assert [r["loss"] for r in fp8_rows] == fp8_losses[0]
    last = lambda losses: float(np.mean(losses[-5:]))
    ratios = []
    for seed in seeds:
        print(f"\nu-μP 50 steps, seed {seed}: bf16 {last(bf16[seed]):.4f}, "
              f"fp8 paper_simple {last(fp8_losses[seed]):.4f}")
        assert last(bf16[seed]) < bf16[seed][0] - 1.0  # it learned something
        ratios.append(last(fp8_losses[seed]) / last(bf16[seed]))
    assert all(abs(r - 1) < 0.05 for r in ratios), ratios
    assert abs(float(np.mean(ratios)) - 1) < 0.015, ratios
    _, _, m_stats = _train(tmp_path, "m_fp8", "mup", "paper_simple", steps=11)
    print(f"mean underflow fraction: μP {_underflow(m_stats):.4g}, u-μP {_underflow(u_stats):.4g}")
    assert _underflow(m_stats) > 2 * _underflow(u_stats), (_underflow(m_stats), _underflow(u_stats))
