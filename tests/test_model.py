"""The decoder at init across widths (u-μP unit scale, μP/SP width drift), abc-symmetry in
training, metadata declarations and config validation."""

import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.core import meta as flax_meta

from conftest import SEED, rms
from umup_jax import parametrization as P
from umup_jax.model import Decoder, ModelConfig, abstract_params, embed_tokens, init_params
from umup_jax.optim import OptimizerConfig, learning_rate_table, make_optimizer

WIDTHS = (64, 128, 256, 512)
VOCAB, SEQ, BATCH = 256, 64, 8


def config(width, parametrization="umup", **kw):
    kw.setdefault("depth", 2)
    kw.setdefault("num_heads", max(1, width // 64))
    return ModelConfig(vocab_size=VOCAB, width=width, seq_len=SEQ,
                       parametrization=parametrization, **kw)


def batch(key=SEED):
    ids = jax.random.randint(jax.random.key(key), (BATCH, SEQ + 1), 0, VOCAB)
    return ids[:, :-1], ids[:, 1:]


def _loss_at_init(width, parametrization):
    """(params at init, params -> (loss, intermediates)) for one width, on ``batch()``."""
    model = Decoder(config(width, parametrization))
    params = flax_meta.unbox(init_params(model, jax.random.key(SEED)))
    tokens, targets = batch()

    def loss_fn(p):
        loss, state = model.apply(p, tokens, targets, method=Decoder.loss,
                                  mutable=["intermediates"])
        return loss, state["intermediates"]

    return params, loss_fn


def _rms_by_path(tree):
    return {jax.tree_util.keystr(k): rms(v) for k, v in
            jax.tree_util.tree_flatten_with_path(tree)[0]}


@functools.lru_cache(maxsize=None)
def init_stats(width, parametrization):
    """(loss, intermediates RMS, grad RMS per param) at init for one width."""
    params, loss_fn = _loss_at_init(width, parametrization)
    (loss, inter), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    return float(loss), _rms_by_path(inter), _rms_by_path(grads)


@functools.lru_cache(maxsize=None)
def init_activations(width, parametrization):
    """Intermediates RMS of the forward pass at init for one width: ``init_stats``'s second
    entry without the backward pass (half the compile), for the drift test's SP and μP."""
    if parametrization == "umup":  # already computed, with gradients, by the unit-scale test
        return init_stats(width, parametrization)[1]
    params, loss_fn = _loss_at_init(width, parametrization)
    return _rms_by_path(jax.jit(lambda p: loss_fn(p)[1])(params))


def _select(acts, name):
    return [v for k, v in acts.items() if f"'{name}'" in k]


@pytest.mark.parametrize("width", WIDTHS)
def test_umup_unit_scale_at_init(width):
    loss, acts, grads = init_stats(width, "umup")
    assert abs(loss / math.log(VOCAB) - 1) < 0.02, loss
    for name in ("embedding", "ffn_norm", "final_norm", "ffn_branch"):
        values = _select(acts, name)
        assert values, name
        for v in values:
            assert abs(v - 1) <= 0.1, f"{name} RMS {v:.3f} at width {width}"
    for path, g in grads.items():
        assert 0.4 <= g <= 2.5, f"grad RMS of {path} = {g:.3f} at width {width}"
    # The readout's μP forward multiplier 1/fan_in gives logits RMS 1/√width at init.
    (logits,) = _select(acts, "logits")
    assert logits == pytest.approx(width**-0.5, rel=0.1)


def test_width_drift_directions():
    """u-μP branch scale is flat in width; SP's grows (fixed σ_init, fan_in terms add up);
    μP's logits shrink as 1/width·√width (its 1/m output multiplier)."""
    def branch(p):
        return [np.mean(_select(init_activations(w, p), "ffn_branch")) for w in WIDTHS]

    def logits(p):
        return [_select(init_activations(w, p), "logits")[0] for w in WIDTHS]

    umup, sp = branch("umup"), branch("sp")
    assert max(umup) / min(umup) < 1.1
    assert all(b > a * 1.5 for a, b in zip(sp, sp[1:])), sp  # grows ~2× per doubling
    mup_logits = logits("mup")
    assert all(b < a for a, b in zip(mup_logits, mup_logits[1:])), mup_logits
    mup = branch("mup")
    assert max(mup) / min(mup) < 1.5  # μP hidden activations stay put


def test_umup_parameters_are_unit_at_init():
    model = Decoder(config(128))
    params = flax_meta.unbox(init_params(model, jax.random.key(SEED)))
    for path, w in jax.tree_util.tree_flatten_with_path(params)[0]:
        assert rms(w) == pytest.approx(1.0, abs=0.02), jax.tree_util.keystr(path)


def test_every_parameter_declares_metadata():
    model = Decoder(config(128, depth=3))
    metas = P.param_metadata(abstract_params(model))["params"]
    assert metas["embedding"].role == P.EMBEDDING and metas["embedding"].fan_in == 128
    assert metas["readout"].role == P.OUTPUT and metas["readout"].fan_out == VOCAB
    assert metas["embedding"].depth is None and metas["readout"].depth is None
    layer = metas["layer_2"]
    assert {k: (m.role, m.fan_in, m.fan_out, m.depth) for k, m in layer.items()} == {
        "attn_qkv": (P.HIDDEN, 128, 384, 3),
        "attn_out": (P.HIDDEN, 128, 128, 3),
        "ffn_up": (P.HIDDEN, 128, 512, 3),
        "ffn_gate": (P.HIDDEN, 128, 512, 3),
        "ffn_down": (P.HIDDEN, 512, 128, 3),
    }
    assert layer["attn_qkv"].names == ("embed", "qkv", "heads", "head_dim")


def test_attention_out_metadata_and_lr_use_its_own_fan_in():
    """With an explicit head_dim, num_heads·head_dim ≠ width (u-μP and SP accept it): the
    attention output's fan-in is H·D_h and the QKV's fan-out 3·H·D_h, whatever the width, so
    u-μP's learning rate of ``attn_out`` is (H·D_h)^-½·L^-½ (spec §2.4, §3), not width's.
    (Its forward scale reads the weight's shape, so only the metadata carries this.)"""
    cfg = config(128, depth=4, num_heads=2, head_dim=16)
    boxed = abstract_params(Decoder(cfg))
    layer = P.param_metadata(boxed)["params"]["layer_3"]
    assert (layer["attn_out"].fan_in, layer["attn_out"].fan_out) == (32, 128)
    assert (layer["attn_qkv"].fan_in, layer["attn_qkv"].fan_out) == (128, 96)
    table = {path: c for path, _, _, _, c, _ in learning_rate_table(cfg.rule, boxed, 1.0)}
    assert table["['params']['layer_3']['attn_out']"] == pytest.approx(32**-0.5 / 2)
    assert table["['params']['layer_3']['attn_qkv']"] == pytest.approx(128**-0.5 / 2)


def _train_losses(cfg, steps=5, opt=None):
    model = Decoder(cfg)
    boxed = init_params(model, jax.random.key(SEED))
    params = flax_meta.unbox(boxed)
    opt = opt or OptimizerConfig(learning_rate=2e-2, weight_decay=1e-3, warmup_steps=2,
                                 total_steps=steps)
    tx = make_optimizer(opt, boxed, cfg.rule)
    state = tx.init(params)

    @jax.jit
    def step(params, state, tokens, targets):
        loss, grads = jax.value_and_grad(
            lambda p: model.apply(p, tokens, targets, method=Decoder.loss))(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for i in range(steps):
        params, state, loss = step(params, state, *batch(SEED + i))
        losses.append(float(loss))
    return np.array(losses)


def test_abc_symmetry_mup_trains_identically():
    shift = {P.EMBEDDING: 2.0, P.HIDDEN: 4.0, P.OUTPUT: 0.5}
    base = config(128, "mup", hparams={"base_width": 64, "init_std": 0.5})
    shifted = config(128, "mup", hparams={"base_width": 64, "init_std": 0.5, "shift": shift})
    a, b = _train_losses(base), _train_losses(shifted)
    assert a[-1] < a[0] - 0.05  # it actually trains
    np.testing.assert_allclose(b, a, rtol=1e-5)
    # A θ that is not an abc-symmetry (forward multiplier only) does change training.
    broken = _train_losses(config(128, "mup", hparams={"base_width": 64, "init_std": 1.0}))
    assert np.max(np.abs(broken / a - 1)) > 1e-3


def test_abc_symmetry_sp_emb_lr_trains_identically():
    emb_lr = {"init_std": 0.1, "emb_lr_scaling": True, "base_width": 32}
    # abc-symmetry holds for Adam up to its ε (spec §2.1); SP's gradients are small enough
    # for ε = 1e-8 to show at 1e-5, so ε is 1e-12 here.  θ's are powers of 2 (exact).
    opt = OptimizerConfig(learning_rate=2e-2, weight_decay=1e-3, warmup_steps=2, total_steps=5,
                          eps=1e-12)
    shift = {P.EMBEDDING: 2.0, P.HIDDEN: 4.0, P.OUTPUT: 0.5}
    base = config(128, "sp", hparams=emb_lr)
    model = Decoder(base)
    table = {path: c for path, _, _, _, c, _ in
             learning_rate_table(base.rule, abstract_params(model), 1.0)}
    assert table["['params']['embedding']"] == 4.0  # width / base_width reaches the optimizer
    assert table["['params']['layer_0']['attn_qkv']"] == 1.0
    a = _train_losses(base, opt=opt)
    b = _train_losses(config(128, "sp", hparams={**emb_lr, "shift": shift}), opt=opt)
    assert a[-1] < a[0] - 0.05  # it actually trains
    np.testing.assert_allclose(b, a, rtol=1e-5)
    # The embedding's LR factor changes training (it is not plain SP).
    plain = _train_losses(config(128, "sp", hparams={"init_std": 0.1}), opt=opt)
    assert np.max(np.abs(plain / a - 1)) > 1e-3


def test_abc_symmetry_umup():
    shift = {P.HIDDEN: 3.0, P.OUTPUT: 0.25}
    opt = OptimizerConfig(learning_rate=0.5, weight_decay=1e-3, warmup_steps=2, total_steps=5)
    a = _train_losses(config(64), opt=opt)
    b = _train_losses(config(64, hparams={"shift": shift}), opt=opt)
    np.testing.assert_allclose(b, a, rtol=1e-5)


def test_config_with_a_shift_dict_hashes_and_init_compiles_once():
    """μP's ``shift`` is a ``{role: θ}`` dict; the config freezes it so that the model can be a
    static jit argument: equal configs hash alike, and a second init reuses the compile."""
    shift = {P.HIDDEN: 4.0, P.EMBEDDING: 2.0}
    a = config(64, "mup", hparams={"base_width": 32, "shift": shift})
    b = config(64, "mup", hparams={"shift": dict(reversed(shift.items())), "base_width": 32})
    assert a == b and hash(Decoder(a)) == hash(Decoder(b))
    assert dict(a.rule.shift) == shift  # the rule still reads the θ's
    assert a != config(64, "mup", hparams={"base_width": 32, "shift": {P.HIDDEN: 4.0}})
    init_params(Decoder(a), jax.random.key(0))
    assert _compiles(lambda: init_params(Decoder(b), jax.random.key(1))) == 0
    assert _compiles(lambda: init_params(Decoder(b), jax.random.key(1), batch_size=2)) >= 1


def _compiles(fn) -> int:
    """How many programs JAX compiles while ``fn()`` runs (from ``jax.log_compiles``)."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        with jax.log_compiles():
            fn()
    finally:
        logger.removeHandler(handler)
    return sum("Compiling" in r.getMessage() for r in records)


def test_bfloat16_compute_close_to_float32():
    f32, _, _ = init_stats(128, "umup")
    model = Decoder(config(128, dtype="bfloat16"))
    params = flax_meta.unbox(init_params(model, jax.random.key(SEED)))
    loss = jax.jit(functools.partial(model.apply, method=Decoder.loss))(params, *batch())
    assert loss.dtype == jnp.float32
    assert float(loss) == pytest.approx(f32, rel=5e-3)


@pytest.mark.parametrize("parametrization", ["sp", "mup", "umup"])
def test_bfloat16_embedding_gradient_of_a_frequent_token_sums_in_fp32(parametrization):
    """A token making 90% of 4096 tokens: its row of the embedding gradient sums ~3700
    cotangents.  Gathered from the fp32 table and cast after (``embed_tokens``), the sum runs
    in fp32, and the bf16 model's row is within 2% of the fp32 model's (measured 0.26% SP,
    0.54% u-μP); gathered from a bf16 copy of the table, the scatter-add ran in bf16 and the
    row was off by 83% (SP) and 64% (u-μP)."""
    ids = jax.random.randint(jax.random.key(SEED), (64, 65), 0, VOCAB)
    ids = jnp.where(jax.random.uniform(jax.random.key(SEED + 1), ids.shape) < 0.9, 5, ids)
    grads = {}
    for dtype in ("float32", "bfloat16"):
        model = Decoder(ModelConfig(vocab_size=VOCAB, width=64, seq_len=SEQ, depth=1,
                                    num_heads=1, parametrization=parametrization, dtype=dtype))
        params = flax_meta.unbox(init_params(model, jax.random.key(SEED)))
        loss = lambda p: model.apply(p, ids[:, :-1], ids[:, 1:], method=Decoder.loss)  # noqa
        grads[dtype] = jax.jit(jax.grad(loss))(params)["params"]["embedding"]
    assert grads["bfloat16"].dtype == jnp.float32
    row16, row32 = (np.asarray(grads[d][5], np.float64) for d in ("bfloat16", "float32"))
    assert np.abs(row16 - row32).max() <= 2e-2 * np.abs(row32).max()


def test_bfloat16_residual_stream_is_fp32_by_default():
    """In bf16 compute the residual stream (embedding rows, every add, the block outputs) is
    fp32 unless ``residual_dtype='bfloat16'``, looped and scanned, and the fp32 stream is
    closer to the fp32 model: logits RMS error at depth 16, width 64, u-μP, measured 0.75% vs
    1.14% scanned (0.73% vs 1.09% looped, the same model unrolled: four times the compile)."""
    ids = jax.random.randint(jax.random.key(SEED), (8, SEQ), 0, VOCAB)
    out = {}
    for depth, scan in ((2, False), (16, True)):
        for dtype, stream in (("float32", "float32"), ("bfloat16", "float32"),
                              ("bfloat16", "bfloat16")):
            model = Decoder(ModelConfig(vocab_size=VOCAB, width=64, seq_len=SEQ, depth=depth,
                                        num_heads=1, dtype=dtype, residual_dtype=stream,
                                        scan_layers=scan))
            params = flax_meta.unbox(init_params(model, jax.random.key(SEED)))
            logits, state = jax.jit(lambda p: model.apply(p, ids, mutable=["intermediates"]))(
                params)
            inter = state["intermediates"]
            block = inter["layers"] if scan else inter["layer_1"]
            assert inter["embedding"][0].dtype == jnp.dtype(stream)
            assert block["output"][0].dtype == jnp.dtype(stream)
            assert block["ffn_norm"][0].dtype == jnp.dtype(dtype)  # matmul input
            out[(depth, dtype, stream)] = np.asarray(logits, np.float64)
    ref = out[(16, "float32", "float32")]
    err = {k: rms(v - ref) / rms(ref) for k, v in out.items() if k[:2] == (16, "bfloat16")}
    assert err[(16, "bfloat16", "float32")] <= 0.8 * err[(16, "bfloat16", "bfloat16")], err


def test_bfloat16_stream_needs_bfloat16_compute():
    with pytest.raises(ValueError, match="residual_dtype='bfloat16' with dtype='float32'"):
        ModelConfig(residual_dtype="bfloat16")
    with pytest.raises(ValueError, match="residual_dtype='float16' is invalid"):
        ModelConfig(dtype="bfloat16", residual_dtype="float16")


def test_embed_tokens_casts_after_the_gather():
    """The same bf16 rows as a lookup in a bf16 copy of the table; the table's gradient is fp32
    and equals the fp32 lookup's for bf16 cotangents (bit for bit: the cast is exact)."""
    cfg = config(64, dtype="bfloat16")
    meta = P.param_metadata(abstract_params(Decoder(cfg)))["params"]["embedding"]
    table = jax.random.normal(jax.random.key(SEED), (VOCAB, 64))
    ids = jnp.zeros((64, 64), jnp.int32).at[:, ::8].set(3)
    rows, pull = jax.vjp(lambda t: embed_tokens(cfg.rule, t, ids, meta, jnp.bfloat16), table)
    assert rows.dtype == jnp.bfloat16
    assert np.array_equal(rows, cfg.rule.embed(table.astype(jnp.bfloat16), ids, meta))
    cot = (1 + 0.1 * jax.random.normal(jax.random.key(SEED + 1), rows.shape)).astype(rows.dtype)
    _, pull32 = jax.vjp(lambda t: embed_tokens(cfg.rule, t, ids, meta, jnp.float32), table)
    (g16,), (g32,) = pull(cot), pull32(cot.astype(jnp.float32))
    assert g16.dtype == jnp.float32 and np.array_equal(g16, g32)


def test_rope_changes_output_only_through_position():
    cfg = config(64, position="rope")
    model = Decoder(cfg)
    params = flax_meta.unbox(init_params(model, jax.random.key(SEED)))
    tokens, _ = batch()
    nope = Decoder(cfg.replace(position="none"))
    a, b = jax.jit(model.apply)(params, tokens), jax.jit(nope.apply)(params, tokens)
    np.testing.assert_allclose(a[:, 0], b[:, 0], rtol=1e-5)  # position 0: no rotation
    assert not np.allclose(a[:, 5:], b[:, 5:], rtol=1e-3)


@pytest.mark.parametrize("parametrization", ["umup", "sp"])
def test_prefix_outputs_do_not_change_when_the_sequence_is_extended(parametrization):
    """Causal attention + RoPE + an attention scale from the *training* S (spec §5.9): the
    logits of a length-S/2 prefix equal the first S/2 positions of the full-length run.  With
    the scale taken from each call's length instead, u-μP's prefix logits move by ~1e-1."""
    cfg = config(64, parametrization, position="rope", num_heads=2)
    model = Decoder(cfg)
    params = flax_meta.unbox(init_params(model, jax.random.key(SEED)))
    tokens, _ = batch()
    full = jax.jit(model.apply)(params, tokens)
    prefix = jax.jit(model.apply)(params, tokens[:, : SEQ // 2])
    assert prefix.shape == (BATCH, SEQ // 2, VOCAB)
    np.testing.assert_allclose(prefix, full[:, : SEQ // 2], rtol=0, atol=2e-6)
    # A prefix of the targets gives the mean loss over those positions (Decoder.loss).
    _, targets = batch()
    loss = jax.jit(functools.partial(model.apply, method=Decoder.loss))(
        params, tokens[:, : SEQ // 2], targets[:, : SEQ // 2])
    expected = cfg.rule.loss(full[:, : SEQ // 2], targets[:, : SEQ // 2])
    np.testing.assert_allclose(loss, expected, rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(width=100, num_heads=3), "width=100 is invalid: it must be divisible by num_heads=3"),
        (dict(width=0), "width=0 is invalid"),
        (dict(depth=-1), "depth=-1 is invalid"),
        (dict(num_heads=0), "num_heads=0 is invalid"),
        (dict(vocab_size=0), "vocab_size=0 is invalid"),
        (dict(seq_len=0), "seq_len=0 is invalid"),
        (dict(parametrization="ntk"), "parametrization='ntk' is invalid"),
        (dict(hparams={"attn_mult": -2.0}), "attn_mult=-2.0 is invalid"),
        (dict(hparams={"attn_mult": float("inf")}), "attn_mult=inf is invalid: it must be a finite"),
        (dict(hparams={"loss_softmax_mult": 0}), "loss_softmax_mult=0 is invalid"),
        (dict(position="alibi"), "position='alibi' is invalid"),
        (dict(dtype="float16"), "dtype='float16' is invalid"),
        (dict(ffn_expansion=0.3), "ffn_expansion=0.3 is invalid"),
        (dict(seq_len=1), r"seq_len=1 is invalid for parametrization='umup'.*S >= 2"),
        (dict(parametrization="mup", head_dim=16),
         r"head_dim=16 with num_heads=2 is refused for parametrization='mup': "
         r"num_heads·head_dim = 32 must equal width=64"),
    ],
)
def test_bad_model_config_raises(kwargs, match):
    base = dict(vocab_size=256, width=64, depth=2, num_heads=2, seq_len=16)
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ModelConfig(**base)


def test_mup_accepts_an_explicit_head_dim_that_spans_the_width():
    """μP's refusal is only for num_heads·head_dim ≠ width; SP and u-μP take any head_dim
    (u-μP's hidden rule reads each weight's own fan-in, 1/√(H·D_h) for the attention output)."""
    base = dict(vocab_size=256, width=64, depth=2, num_heads=2, seq_len=16)
    assert ModelConfig(**base, parametrization="mup", head_dim=32).attn_dim == 64
    for rule in ("sp", "umup"):
        assert ModelConfig(**base, parametrization=rule, head_dim=16).attn_dim == 32


def test_too_long_sequence_raises():
    model = Decoder(config(64))
    params = flax_meta.unbox(init_params(model, jax.random.key(SEED)))
    with pytest.raises(ValueError, match="sequence length 65 > seq_len=64"):
        model.apply(params, jnp.zeros((1, SEQ + 1), jnp.int32))


def test_table5_parameter_counts_need_the_paper_ffn_variant():
    """Table 5 (spec §0.1): 19.5 M parameters at width 256, 1.07 B at 4096 (vocab 32000, depth
    4, heads of 64, untied).  The default proxy's 4·width SwiGLU (the authors' library's) has
    more; ``paper_ffn``'s 2.6640625·width has exactly Table 5's counts, rounded as it rounds."""
    from umup_jax import config as config_lib
    from umup_jax import train as train_lib

    def count(arg, width):
        cfg = config_lib.proxy_config("umup", arg)
        cfg.model.width, cfg.model.num_heads = width, width // 64
        params = flax_meta.unbox(abstract_params(Decoder(train_lib.model_config(cfg, 32000))))
        return sum(x.size for x in jax.tree.leaves(params))

    assert count(None, 256) == 20_578_304 and count(None, 4096) == 1_335_885_824
    paper_256, paper_4096 = count("paper_ffn", 256), count("paper_ffn", 4096)
    assert (paper_256, paper_4096) == (19_527_680, 1_066_926_080)
    assert (round(paper_256 / 1e6, 1), round(paper_4096 / 1e9, 2)) == (19.5, 1.07)
    # A width whose hidden size would not be whole is refused with the reason.
    with pytest.raises(ValueError, match=r"ffn_expansion·width \(170.5\) must be a positive"):
        count("paper_ffn", 64)
