"""What a decoder block keeps for its backward pass: the FFN's gated activation
h = up·a(gate) is recomputed (``ops.recompute_middle``), never kept, and recomputing it changes
no value or gradient, FP8 probe statistics included."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta as flax_meta

from umup_jax import ops
from umup_jax.model import Decoder, ModelConfig, abstract_params, fp8_probes

BATCH, SEQ = 4, 32


def composed(producer, consumer, inputs, params):
    """``ops.recompute_middle``'s value as a plain composition, which keeps h."""
    return consumer(producer(*inputs), *params)


def config(**kw):
    kw.setdefault("parametrization", "umup")
    kw.setdefault("depth", 2)
    return ModelConfig(vocab_size=128, width=32, num_heads=2, seq_len=SEQ, **kw)


def tokens():
    return jax.random.randint(jax.random.key(3), (BATCH, SEQ), 0, 128)


def saved_shapes(cfg):
    """Counter of (shape, dtype) of the arrays the loss's pullback closes over."""
    model = Decoder(cfg)
    t = tokens()
    params = jax.eval_shape(model.init, jax.random.key(0), t)

    def leaves(p):
        _, pullback = jax.vjp(lambda q: model.apply(q, t, t, method=Decoder.loss), p)
        return jax.tree_util.tree_leaves(pullback)

    return collections.Counter((tuple(a.shape), str(a.dtype))
                               for a in jax.eval_shape(leaves, params))


@pytest.mark.parametrize("scan", [False, True])
def test_each_block_keeps_two_ffn_hidden_arrays(scan, monkeypatch):
    cfg = config(scan_layers=scan)
    f = cfg.ffn_hidden
    hidden = ((cfg.depth, BATCH, SEQ, f) if scan else (BATCH, SEQ, f), "float32")
    per_block = 1 if scan else cfg.depth  # a scan keeps one stacked array per residual
    assert saved_shapes(cfg)[hidden] == 2 * per_block  # up and gate
    monkeypatch.setattr(ops, "recompute_middle", composed)
    assert saved_shapes(cfg)[hidden] == 3 * per_block  # and h


def test_an_fp8_down_projection_no_longer_keeps_the_cast_of_h(monkeypatch):
    cfg = config(depth=1, fp8="paper_simple", dtype="bfloat16")
    shape = (BATCH, SEQ, cfg.ffn_hidden)
    fused = saved_shapes(cfg)
    monkeypatch.setattr(ops, "recompute_middle", composed)
    plain = saved_shapes(cfg)
    assert fused[(shape, "bfloat16")] == plain[(shape, "bfloat16")] == 2  # up and gate
    assert plain[(shape, "float8_e4m3fn")] == 1 and fused[(shape, "float8_e4m3fn")] == 0


def _loss_and_grads(cfg, tok):
    model = Decoder(cfg)
    params = flax_meta.unbox(model.init(jax.random.key(0), tok[:1]))
    probes = fp8_probes(cfg)

    def loss(p, pr):
        return model.apply({**p, "fp8_probe": pr} if pr else p, tok, tok, method=Decoder.loss)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, probes)


@pytest.mark.parametrize("parametrization, fp8, scan", [
    ("sp", "none", False), ("mup", "none", False), ("umup", "none", False),
    ("sp", "paper_simple", False), ("umup", "paper_simple", False),
    ("umup", "paper_large", True), ("umup", "none", True),
])
def test_recomputing_the_ffn_activation_changes_no_gradient(parametrization, fp8, scan,
                                                            monkeypatch):
    cfg = config(parametrization=parametrization, fp8=fp8, scan_layers=scan)
    tok = tokens()
    loss, grads = _loss_and_grads(cfg, tok)
    monkeypatch.setattr(ops, "recompute_middle", composed)
    loss_ref, grads_ref = _loss_and_grads(cfg, tok)
    assert float(loss) == float(loss_ref)
    got, ref = jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_ref)
    assert len(got) == len(ref)
    if fp8 != "none":  # the probes' gradients (the FP8 cast statistics) are among them
        assert jax.tree_util.tree_leaves(grads[1])
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("scan", [False, True])
def test_compiled_step_frees_the_ffn_activation(scan, monkeypatch):
    """XLA's temporary memory drops by h's bytes in every block: the saving grows by at least
    0.9·h per block from depth 4 to depth 8.  In the unrolled model this needs the
    optimisation barrier in the backward: without it XLA's CSE merges the recomputed h with
    the forward's and keeps it after all.  The slope, not the saving at one depth: XLA 0.12
    gives the scanned loop body about 1.75·h of extra temporaries once (saving 2.25·h at
    depth 4, 6.25·h at depth 8), where 0.10 saves exactly L·h."""
    h_bytes = BATCH * SEQ * config().ffn_hidden * 4
    tok = jax.ShapeDtypeStruct((BATCH, SEQ), jnp.int32)

    def temp_bytes(depth):
        model = Decoder(config(depth=depth, scan_layers=scan))
        params = flax_meta.unbox(abstract_params(model))
        grad = jax.grad(lambda p, t: model.apply(p, t, t, method=Decoder.loss))
        return jax.jit(grad).lower(params, tok).compile().memory_analysis().temp_size_in_bytes

    fused = {d: temp_bytes(d) for d in (4, 8)}
    monkeypatch.setattr(ops, "recompute_middle", composed)
    kept = {d: temp_bytes(d) for d in (4, 8)}
    saved = {d: kept[d] - fused[d] for d in (4, 8)}
    assert saved[4] > 0 and saved[8] - saved[4] >= 0.9 * 4 * h_bytes, (saved, h_bytes)
