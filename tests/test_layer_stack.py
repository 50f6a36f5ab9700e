"""Scanned and rematerialised layers (``model.scan_layers``, ``model.remat``): the same loss and
gradients as the Python loop of blocks, the same metadata, learning rates and shardings, FP8
probes and sown activations under scan, and the conversion of params and optimizer state
between the two layouts (:mod:`umup_jax.layer_stack`)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.core import meta as flax_meta

from conftest import SEED
from umup_jax import export as export_lib
from umup_jax import layer_stack
from umup_jax import parametrization as P
from umup_jax import sharding as sharding_lib
from umup_jax.model import Decoder, ModelConfig, abstract_params, fp8_probes
from umup_jax.optim import OptimizerConfig, lr_multipliers, make_optimizer

VOCAB, SEQ, BATCH = 64, 16, 4
HPARAMS = {
    "sp": {},
    "mup": {"attn_mult": 1.5, "output_mult": 0.7},
    # Non-default residual HPs: every layer's τ (and so its scanned weights) differs.
    "umup": {"residual_mult": 1.7, "residual_attn_ratio": 0.6, "attn_mult": 1.5},
}
is_meta = lambda x: isinstance(x, P.ParamMeta)  # noqa: E731


def config(parametrization="umup", **kw):
    kw.setdefault("depth", 2)
    return ModelConfig(vocab_size=VOCAB, width=32, num_heads=2, seq_len=SEQ,
                       parametrization=parametrization, hparams=HPARAMS[parametrization], **kw)


def batch():
    ids = jax.random.randint(jax.random.key(SEED), (BATCH, SEQ + 1), 0, VOCAB)
    return ids[:, :-1], ids[:, 1:]


def loss_and_grads(cfg, params):
    tokens, targets = batch()
    model = Decoder(cfg)
    return jax.jit(jax.value_and_grad(
        lambda p: model.apply(p, tokens, targets, method=Decoder.loss)))(params)


def looped_params(cfg, seed=SEED):
    """Params of the looped model drawn as its init draws them, N(0, B²) with the rule's B
    (numpy, to spare a compilation per test)."""
    rng = np.random.default_rng(seed)
    boxed = abstract_params(Decoder(cfg.replace(scan_layers=False, remat="none")))
    return jax.tree.map(
        lambda m: jnp.asarray(cfg.rule.abc(m).b * rng.normal(size=m.value.shape), jnp.float32),
        boxed, is_leaf=is_meta)


def rms_rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(a**2)))


def assert_same(ref, other, tol=1e-6):
    (l1, g1), (l2, g2) = ref, other
    assert abs(float(l1) - float(l2)) <= tol * abs(float(l1))
    assert jax.tree.structure(g1) == jax.tree.structure(g2)
    errs = {jax.tree_util.keystr(k): rms_rel(a, b) for (k, a), b in
            zip(jax.tree_util.tree_flatten_with_path(g1)[0], jax.tree.leaves(g2))}
    assert max(errs.values()) <= tol, errs


def check_variants(parametrization, variants):
    """Loss and every gradient of each (scan_layers, remat) variant equal the plain loop's
    ≤ 1e-6 (relative; measured ≤ 5e-7), on the same weights."""
    cfg = config(parametrization)
    params = looped_params(cfg)
    ref = loss_and_grads(cfg, params)
    for scan, remat in variants:
        c = cfg.replace(scan_layers=scan, remat=remat)
        loss, grads = loss_and_grads(c, layer_stack.stack_layers(params) if scan else params)
        if scan:
            assert "layers" in grads["params"] and "layer_0" not in grads["params"]
            grads = layer_stack.unstack_layers(grads)
        assert_same(ref, (loss, grads))


def test_scanned_and_rematerialised_umup_equals_the_loop():
    """u-μP with per-layer τ (non-default α_res, α_ratio): scanned, rematerialised, and both
    (every combination with ``-m slow``)."""
    check_variants("umup", [(True, "none"), (False, "dots_saveable"), (True, "full")])


@pytest.mark.parametrize("parametrization", ["sp", "mup"])
def test_scanned_and_rematerialised_sp_and_mup_equal_the_loop(parametrization):
    check_variants(parametrization, [(True, "full")])


@pytest.mark.slow
@pytest.mark.parametrize("parametrization", list(HPARAMS))
def test_every_layout_and_remat_policy_equals_the_loop(parametrization):
    check_variants(parametrization, [(scan, remat) for scan in (False, True)
                                     for remat in ("none", "full", "dots_saveable")
                                     if (scan, remat) != (False, "none")])


def test_remat_recomputes_in_the_backward_pass():
    """full keeps no matmul output, dots_saveable keeps them: fewer dots in the backward
    pass of the latter (counted in the jaxpr of the gradient)."""
    cfg = config("umup", depth=1)
    params = flax_meta.unbox(abstract_params(Decoder(cfg)))
    tokens, targets = batch()

    def dots(remat):
        model = Decoder(cfg.replace(remat=remat))
        jaxpr = jax.make_jaxpr(jax.grad(
            lambda p: model.apply(p, tokens, targets, method=Decoder.loss)))(params)
        return str(jaxpr).count("dot_general")

    assert dots("full") > dots("dots_saveable") >= dots("none")


@pytest.mark.parametrize("parametrization", list(HPARAMS))
def test_metadata_learning_rates_and_shardings_survive_stacking(parametrization):
    cfg = config(parametrization)
    loop_boxed = abstract_params(Decoder(cfg))
    scan_boxed = abstract_params(Decoder(cfg.replace(scan_layers=True)))
    loop_meta, scan_meta = P.param_metadata(loop_boxed), P.param_metadata(scan_boxed)
    # nn.scan keeps the ParamMeta box (role, fan-in, fan-out, depth) and adds the axis name.
    qkv = scan_meta["params"]["layers"]["attn_qkv"]
    assert isinstance(qkv, P.ParamMeta)
    assert (qkv.role, qkv.fan_in, qkv.fan_out, qkv.depth) == (P.HIDDEN, 32, 96, 2)
    assert qkv.names == ("layers", "embed", "qkv", "heads", "head_dim")
    stacked = layer_stack.stack_layers(loop_meta)
    assert jax.tree.structure(stacked, is_leaf=is_meta) == jax.tree.structure(scan_meta,
                                                                              is_leaf=is_meta)
    for a, b in zip(jax.tree.leaves(stacked, is_leaf=is_meta),
                    jax.tree.leaves(scan_meta, is_leaf=is_meta)):
        assert layer_stack._fields(a) == layer_stack._fields(b)
    unstacked = layer_stack.unstack_layers(scan_meta, depth=2)
    assert jax.tree.structure(unstacked, is_leaf=is_meta) == jax.tree.structure(
        loop_meta, is_leaf=is_meta)
    for a, b in zip(jax.tree.leaves(unstacked, is_leaf=is_meta),
                    jax.tree.leaves(loop_meta, is_leaf=is_meta)):
        assert layer_stack._fields(a) == layer_stack._fields(b)
    # The optimizer's learning-rate multipliers: the same number for every layer's parameter.
    loop_c = lr_multipliers(cfg.rule, loop_boxed)["params"]
    scan_c = lr_multipliers(cfg.rule, scan_boxed)["params"]
    for name, c in scan_c["layers"].items():
        assert all(loop_c[f"layer_{i}"][name] == c for i in range(2)), name
    assert (scan_c["embedding"], scan_c["readout"]) == (loop_c["embedding"], loop_c["readout"])
    # Shardings: the layers axis maps to no mesh axis, the other axes as in the loop.
    specs = sharding_lib.param_specs(scan_boxed)["params"]["layers"]
    loop_specs = sharding_lib.param_specs(loop_boxed)["params"]["layer_0"]
    for name, spec in specs.items():
        assert tuple(spec) == (None, *loop_specs[name]), name
    assert tuple(specs["attn_qkv"]) == (None, "fsdp", None, "tensor", None)


def random_like(tree, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: rng.normal(size=np.shape(a)).astype(np.float32), tree)


def test_one_adamw_step_is_the_same_in_both_layouts():
    cfg = config("umup")
    params = looped_params(cfg)
    grads = random_like(params)
    opt = OptimizerConfig(learning_rate=0.3, weight_decay=0.01, warmup_steps=0, total_steps=10)
    step = {}
    for scan in (False, True):
        tx = make_optimizer(opt, abstract_params(Decoder(cfg.replace(scan_layers=scan))),
                            cfg.rule)
        p, g = (params, grads) if not scan else (layer_stack.stack_layers(params),
                                                 layer_stack.stack_layers(grads))
        new = jax.jit(lambda p, g, tx=tx: optax.apply_updates(
            p, tx.update(g, tx.init(p), p)[0]))(p, g)
        step[scan] = new if not scan else layer_stack.unstack_layers(new)
    for a, b in zip(jax.tree.leaves(step[False]), jax.tree.leaves(step[True])):
        np.testing.assert_array_equal(a, b)


def test_train_state_converts_between_layouts():
    """Params and AdamW state of a looped run ↔ a scanned run's layout, losslessly; also the
    dicts and lists an orbax restore without a target returns."""
    cfg = config("umup")
    params = looped_params(cfg)
    tx = make_optimizer(OptimizerConfig(warmup_steps=0, total_steps=10),
                        abstract_params(Decoder(cfg)), cfg.rule)
    opt_state = tx.init(params)
    _, opt_state = tx.update(random_like(params), opt_state, params)
    state = {"params": params, "opt_state": opt_state, "step": jnp.int32(1)}
    stacked = layer_stack.stack_layers(state)
    scan_cfg = cfg.replace(scan_layers=True)
    scan_tx = make_optimizer(OptimizerConfig(warmup_steps=0, total_steps=10),
                             abstract_params(Decoder(scan_cfg)), cfg.rule)
    scan_params = flax_meta.unbox(abstract_params(Decoder(scan_cfg)))
    want = {"params": scan_params, "opt_state": jax.eval_shape(scan_tx.init, scan_params),
            "step": jax.ShapeDtypeStruct((), jnp.int32)}
    shapes = lambda t: jax.tree.map(lambda x: (tuple(np.shape(x)), np.dtype(x.dtype)), t)  # noqa: E731
    assert shapes(stacked) == shapes(want)  # same tree (NamedTuples included) and shapes
    mu = stacked["opt_state"][0].mu["params"]["layers"]["ffn_up"]
    np.testing.assert_array_equal(mu[1], opt_state[0].mu["params"]["layer_1"]["ffn_up"])
    back = layer_stack.unstack_layers(stacked)
    assert jax.tree.structure(back) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state)):
        np.testing.assert_array_equal(a, b)
    # The untyped form of a restore: NamedTuples as dicts, tuples as lists.
    raw = {"params": params, "opt_state": [
        {"count": 1, "mu": opt_state[0].mu, "nu": opt_state[0].nu}, {"count": 1}]}
    raw_stacked = layer_stack.stack_layers(raw)
    assert set(raw_stacked["opt_state"][0]["nu"]["params"]) == {"embedding", "readout", "layers"}
    with pytest.raises(ValueError, match="not layer_0"):
        layer_stack.stack_layers({"layer_0": 1, "layer_2": 2})
    with pytest.raises(ValueError, match="no leading layers axis of size 3"):
        layer_stack.unstack_layers({"layers": {"a": np.zeros((3, 2)), "b": np.zeros(())}},
                                   depth=3)


def test_stacking_orders_layers_by_number_past_ten():
    """A model of 11 layers or more (depth 16 in tests/test_model.py's bf16 check) has keys
    ``layer_10``… that sort before ``layer_2`` as strings: stacking takes them in numeric
    order (slice i of the stacked leaf is ``layer_i``), and unstacking gives the same tree."""
    tree = {"params": {"embedding": np.zeros((3,), np.float32),
                       **{f"layer_{i}": {"w": np.full((2,), i, np.float32)} for i in range(12)}}}
    stacked = layer_stack.stack_layers(tree)
    assert set(stacked["params"]) == {"embedding", "layers"}
    np.testing.assert_array_equal(stacked["params"]["layers"]["w"][:, 0], np.arange(12))
    back = layer_stack.unstack_layers(stacked)
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    for i in range(12):
        np.testing.assert_array_equal(back["params"][f"layer_{i}"]["w"], np.full((2,), i))


def test_fp8_probes_and_activations_under_scan():
    """The FP8 cast statistics and the sown activations of a scanned model are the loop's,
    stacked (per layer), so the metrics name them per layer either way."""
    cfg = config("umup", fp8={"ffn_in": "fp8", "readout": "fp8"})
    params = looped_params(cfg)
    tokens, targets = batch()
    out = {}
    for scan in (False, True):
        c = cfg.replace(scan_layers=scan)
        probes = fp8_probes(c)
        p = layer_stack.stack_layers(params) if scan else params

        def loss_fn(probe_vars, c=c, p=p):
            loss, mut = Decoder(c).apply({**p, "fp8_probe": probe_vars}, tokens, targets,
                                         method=Decoder.loss, mutable=["intermediates"])
            return loss, mut["intermediates"]

        probe_grads, acts = jax.jit(jax.grad(loss_fn, has_aux=True))(probes)
        if scan:
            assert probe_grads["layers"]["ffn_up"].shape == (2, 6)
            assert set(probe_grads["layers"]) == {"ffn_up", "ffn_gate"}
            assert acts["layers"]["output"][0].shape == (2, BATCH, SEQ, 32)
        out[scan] = layer_stack.unstack_layers((probe_grads, acts))
    assert jax.tree.structure(out[False]) == jax.tree.structure(out[True])
    for a, b in zip(jax.tree.leaves(out[False]), jax.tree.leaves(out[True])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert float(np.asarray(out[True][0]["layer_1"]["ffn_up"]).sum()) > 0  # it measured


def test_scanned_model_exports_like_the_loop():
    cfg = config("umup")
    loop = random_like(flax_meta.unbox(abstract_params(Decoder(cfg))))
    a, _ = export_lib.hf_tensors(cfg, loop)
    b, _ = export_lib.hf_tensors(cfg.replace(scan_layers=True), layer_stack.stack_layers(loop))
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_bad_remat_and_scan_values():
    with pytest.raises(ValueError, match=r"remat='ful' is invalid: allowed are \('none', "
                                         r"'full', 'dots_saveable'\)"):
        config(remat="ful")
    with pytest.raises(ValueError, match="scan_layers='yes' is invalid"):
        config(scan_layers="yes")
