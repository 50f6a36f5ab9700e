"""``model.loss_chunks``: the readout and loss over sequence chunks give the unchunked loss,
gradients, activation RMS and FP8 statistics, hold less memory, and bad values fail before
compilation."""

import dataclasses

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from umup_jax import config as config_lib
from umup_jax import identity
from umup_jax import loss_chunks as loss_chunks_lib
from umup_jax import parametrization as P
from umup_jax import train as train_lib
from umup_jax.model import Decoder, ModelConfig, init_params

BATCH, SEQ = 4, 32


def smoke(parametrization, **overrides):
    cfg = config_lib.proxy_config(parametrization, "smoke")
    values = {"train.batch_size": BATCH, "model.seq_len": SEQ, "model.num_heads": 2}
    if parametrization == "umup":  # a non-default α_loss-softmax: its scale is in the chunks
        values["model.hparams.loss_softmax_mult"] = 0.5
    for key, value in {**values, **overrides}.items():
        config_lib.set_key(cfg, key, value)
    return cfg


def batch():
    ids = np.random.default_rng(0).integers(0, 256, (BATCH, SEQ + 1)).astype(np.int32)
    return {"inputs": jnp.asarray(ids[:, :-1]), "targets": jnp.asarray(ids[:, 1:])}


def rel_rms(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sqrt(np.mean((a - b) ** 2)) / max(np.sqrt(np.mean(a**2)), 1e-30))


def one_step(cfg):
    """(loss, activation RMS, grads, FP8 probe grads) of one step with statistics."""
    run = train_lib.build_run(cfg)
    params = train_lib.make_init_fn(run)(jax.random.key(0))["params"]
    (loss, acts), (grads, probes) = jax.jit(train_lib.make_grad_fn(run, True))(params, batch())
    return float(loss), jax.tree.map(np.asarray, (acts, grads, probes))


@pytest.mark.parametrize("parametrization,overrides", [
    ("sp", {}),
    ("mup", {"model.hparams.base_width": 16}),
    ("umup", {}),
    # the readout in FP8 (with cast statistics) and 2 accumulated micro-batches: the chunks
    # use the step's token count and split the probe
    ("umup", {"model.fp8_groups.readout": "fp8", "train.grad_accum_steps": 2}),
])
def test_chunked_loss_equals_the_whole_loss(parametrization, overrides):
    """Loss ≤ 1e-6 relative; every gradient, activation RMS and FP8 statistic ≤ 1e-6 (RMS
    relative) with 4 chunks against 1."""
    whole = one_step(smoke(parametrization, **overrides))
    chunked = one_step(smoke(parametrization, **{**overrides, "model.loss_chunks": 4}))
    assert chunked[0] == pytest.approx(whole[0], rel=1e-6)
    (acts1, grads1, probes1), (acts4, grads4, probes4) = whole[1], chunked[1]
    assert set(acts1) == set(acts4) and "activations/logits" in acts1
    for name in acts1:
        assert rel_rms(acts1[name], acts4[name]) <= 1e-6, name
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(grads1)[0]]
    for path, a, b in zip(paths, jax.tree.leaves(grads1), jax.tree.leaves(grads4)):
        assert rel_rms(a, b) <= 1e-6, path
    assert jax.tree.structure(probes1) == jax.tree.structure(probes4)
    for a, b in zip(jax.tree.leaves(probes1), jax.tree.leaves(probes4)):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)
    if "model.fp8_groups.readout" in overrides:  # the statistics are there, and fractions
        stats = np.asarray(probes1["readout"])
        assert stats.shape == (6,) and np.all((stats >= 0) & (stats <= 1)) and stats.any()


@pytest.mark.parametrize("parametrization", ["sp", "umup"])
def test_bfloat16_chunks_differ_less_than_bfloat16_itself(parametrization):
    """In bf16 compute the chunked program rounds bf16 intermediates differently (per-chunk
    weight-gradient products; XLA's excess precision differs between the two programs): every
    gradient's difference from the unchunked bf16 one is below the unchunked bf16 gradient's
    own difference from fp32 (measured: at most 0.68% vs 1.02%)."""
    base = ModelConfig(vocab_size=300, width=32, depth=1, num_heads=2, seq_len=32,
                       parametrization=parametrization)
    params = flax.core.meta.unbox(init_params(Decoder(base), jax.random.key(0)))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 300, (4, 33)))
    grads = {}
    for name, cfg in (("fp32", base), ("bf16", dataclasses.replace(base, dtype="bfloat16")),
                      ("chunked", dataclasses.replace(base, dtype="bfloat16", loss_chunks=4))):
        model = Decoder(cfg)
        grads[name] = jax.tree.leaves(jax.jit(jax.grad(lambda p: model.apply(
            p, ids[:, :-1], ids[:, 1:], method=Decoder.loss)))(params))
    for exact, bf16, chunked in zip(grads["fp32"], grads["bf16"], grads["chunked"]):
        assert rel_rms(bf16, chunked) < rel_rms(exact, bf16)


def test_trained_params_agree():
    """Three AdamW steps: params with 8 chunks within 1e-5 (RMS relative) of 1 chunk."""
    out = {}
    for c in (1, 8):
        run = train_lib.build_run(smoke("umup", **{"model.loss_chunks": c}))
        state = train_lib.make_init_fn(run)(jax.random.key(0))
        step = train_lib.make_train_step(run, with_stats=False)
        losses = []
        for _ in range(3):
            state, metrics = step(state, batch())
            losses.append(float(metrics["loss"]))
        out[c] = losses, jax.tree.map(np.asarray, state["params"])
    np.testing.assert_allclose(out[8][0], out[1][0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(out[1][1]), jax.tree.leaves(out[8][1])):
        assert rel_rms(a, b) <= 1e-5


def test_chunked_backward_scales_with_the_cotangent():
    """The fused chunks compute each chunk's gradients at cotangent 1 in the forward pass; the
    backward must multiply them by the cotangent it receives: ∇(c·L) = c·∇L, equal to the
    unchunked loss's (a caller that weights, sums or rescales the loss, e.g. an auxiliary
    term or a loss scale, gets c times the gradients), for u-μP's loss (its mean a forward
    scale only) and SP's plain mean."""
    b, s, d, v = 2, 16, 8, 32
    x = jax.random.normal(jax.random.key(0), (b, s, d))
    w = jax.random.normal(jax.random.key(1), (d, v))
    t = jax.random.randint(jax.random.key(2), (b, s), 0, v)
    readout = lambda xc, w, p: xc @ w  # noqa: E731
    for rule in (P.UMuP(), P.SP()):
        def chunked(x, w, rule=rule):
            return loss_chunks_lib.chunked_readout_loss(
                x, w, t, None, chunks=4, readout=readout, loss_sum=rule.loss_sum,
                loss_from_sum=rule.loss_from_sum)[0]

        def whole(x, w, rule=rule):
            return rule.loss(x @ w, t)

        for c in (1.0, 3.0):
            got = jax.grad(lambda x, w: c * chunked(x, w), argnums=(0, 1))(x, w)
            want = jax.grad(lambda x, w: c * whole(x, w), argnums=(0, 1))(x, w)
            for a, e in zip(got, want):
                np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6 * float(jnp.abs(e).max()))


def test_chunks_hold_a_fraction_of_the_logits_memory():
    """XLA's temporary buffers of loss-and-gradient at V = 8192 (logits 8×128×8192 fp32 =
    32 MiB): 8 chunks need less than a third of 1 chunk's (measured 70 → 15 MiB)."""
    base = ModelConfig(vocab_size=8192, width=32, depth=1, num_heads=2, seq_len=128)
    params = flax.core.meta.unbox(init_params(Decoder(base), jax.random.key(0)))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 8192, (8, 129)))
    temp = {}
    for c in (1, 8):
        model = Decoder(dataclasses.replace(base, loss_chunks=c))
        fn = jax.value_and_grad(lambda p: model.apply(p, ids[:, :-1], ids[:, 1:],
                                                      method=Decoder.loss))
        temp[c] = jax.jit(fn).lower(params).compile().memory_analysis().temp_size_in_bytes
    print(f"temp bytes: 1 chunk {temp[1] / 2**20:.1f} MiB, 8 chunks {temp[8] / 2**20:.1f} MiB")
    assert temp[8] * 3 < temp[1]


def test_logits_without_targets_are_unchanged():
    """``model(tokens)`` (sampling, export) still returns the full logits."""
    base = ModelConfig(vocab_size=64, width=32, depth=1, num_heads=2, seq_len=16)
    params = flax.core.meta.unbox(init_params(Decoder(base), jax.random.key(0)))
    ids = jnp.arange(32).reshape(2, 16) % 64
    whole = jax.jit(Decoder(base).apply)(params, ids)
    chunked = jax.jit(Decoder(dataclasses.replace(base, loss_chunks=4)).apply)(params, ids)
    assert chunked.shape == (2, 16, 64)
    np.testing.assert_array_equal(chunked, whole)


@pytest.mark.parametrize("overrides,match", [
    ({"model.loss_chunks": 0}, r"loss_chunks=0 is invalid: it must be an integer > 0"),
    ({"model.loss_chunks": 3}, r"loss_chunks=3 is invalid: it must divide seq_len=32"),
    ({"model.loss_chunks": 2, "model.fp8_groups.readout": "fp8_dynamic"},
     r"loss_chunks=2 with the readout in fp8_dynamic is refused"),
])
def test_bad_loss_chunks_fail_before_compilation(monkeypatch, overrides, match):
    monkeypatch.setattr(jax, "jit", lambda *a, **k: pytest.fail("compiled"))
    with pytest.raises(ValueError, match=match):
        train_lib.check_config(smoke("umup", **overrides))


def test_loss_chunks_may_change_when_a_run_resumes():
    assert identity.is_execution_key("model.loss_chunks")
    a, b = smoke("umup"), smoke("umup", **{"model.loss_chunks": 4})
    assert identity.identity_hash(a) == identity.identity_hash(b)


def test_bench_script_writes_its_table(tmp_path):
    """``experiments/bench_loss_chunks.py`` on a tiny shape: one row per c, equal losses, and
    less temporary memory with more chunks."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "experiments" / "bench_loss_chunks.py"
    spec = importlib.util.spec_from_file_location("bench_loss_chunks", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--vocab", "1024", "--width", "32", "--depth", "1", "--heads", "2",
                       "--seq", "64", "--batch", "4", "--chunks", "1,4", "--steps", "1",
                       "--rounds", "1", "--out", str(tmp_path)])
    assert [r["chunks"] for r in rows] == [1, 4]
    assert rows[1]["loss"] == pytest.approx(rows[0]["loss"], rel=1e-5)
    assert rows[0]["temp_ratio"] == 1.0 and rows[1]["temp_ratio"] < 0.6
    assert (tmp_path / "bench_loss_chunks.csv").read_text().startswith("rule,vocab,width")
    with pytest.raises(SystemExit):
        bench.main(["--seq", "64", "--chunks", "1,3", "--out", str(tmp_path)])
