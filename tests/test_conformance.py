"""Conformance of our u-μP decoder with the authors' library (``unit_scaling`` 0.3.5, torch).

The reference is ``unit_scaling.TransformerDecoder`` (NoPE, fused-QKV MHSA, 4x SwiGLU MLP,
non-trainable RMSNorm, untied embedding and readout; spec §5.16) and
``unit_scaling.optim.AdamW(independent_weight_decay=True)`` (spec §7).  Both sides run in
float32 on the same weights and tokens; we compare the loss, the logits, every parameter's
unit-scaled gradient and the parameters after one AdamW step.

Our side goes through the model's own loss, ``Decoder.loss`` (→ the rule's ``loss`` →
``ops.cross_entropy`` with α_loss-softmax), on inputs of length S and their next tokens as
targets.  The library's side is its logits on the same inputs and ``U.cross_entropy(…,
mult=α_loss-softmax)`` on the same targets: the rule of ``TransformerDecoder.loss`` (asserted
bit for bit with mult = 1, on the library's own convention of S inputs predicting S − 1
targets), which takes no mult itself.

Three cases:

* ``default``: all α = 1, against ``TransformerDecoder``;
* ``residual``: α_residual = 2, α_residual-attn-ratio = 0.5, against ``TransformerDecoder``
  built with ``transformer_residual_scaling_rule(2, 0.5)``;
* ``mults``: α_attn, α_ffn-act, α_loss-softmax ≠ 1.  ``TransformerDecoder`` exposes no mults,
  so the reference forward is rebuilt from the library's own modules (their weights and taus)
  and ``unit_scaling.functional`` ops with ``mult``, mirroring ``TransformerLayer.forward``,
  ``MHSA.forward`` and ``MLP.forward``; it is first checked against ``TransformerDecoder``
  itself with all mults = 1.

The optimizer step is compared on identical gradients (the library's, fed to our optimizer):
Adam's first step is g/(|g|+ε), so an element whose gradient is ~0 can flip sign between two
correct fp32 backward passes and move by 2·η·c_p; the end-to-end step (our own gradients) is
printed but not asserted.  Gradients themselves are asserted separately.

Both sides run the model on (B, S) tokens, so the attention scale uses S on both.  The
library has no RoPE (its demo is NoPE); ``tests/test_rope.py`` checks ours against a closed
form and against Hugging Face Llama's.

Layouts: torch ``Linear`` weights are (out, in), our kernels (in, out).  The library's fused
QKV output is rearranged ``"b s (z h d) -> z b h s d"``, so our (d, 3, H, Dh) kernel is
``w.T.reshape(d, 3, H, Dh)``; its attention output is merged ``"b h s d -> b s (h d)"``, so our
(H, Dh, d) kernel is ``w.T.reshape(H, Dh, d)``.  The embedding table is (V, d) on both sides.

Run with ``-s`` to see the measured errors.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the conformance test needs torch (extra 'reference')")
uu = pytest.importorskip(
    "unit_scaling", reason="the conformance test needs unit_scaling==0.3.5 (extra 'reference')"
)

import einops  # noqa: E402  (a dependency of unit_scaling)
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
import unit_scaling.functional as U  # noqa: E402
import unit_scaling.optim  # noqa: E402
from unit_scaling.core.functional import transformer_residual_scaling_rule  # noqa: E402

from umup_jax.model import Decoder, ModelConfig, init_params  # noqa: E402
from umup_jax.optim import OptimizerConfig, make_optimizer  # noqa: E402

WIDTH, VOCAB, LAYERS, HEADS = 64, 256, 2, 4
BATCH, SEQ = 4, 32
HEAD_DIM = WIDTH // HEADS
SEED = 1472
LR, WEIGHT_DECAY = 0.05, 0.1

LOSS_RTOL = 1e-5  # |Δloss| / |loss|
LOGITS_RTOL = 1e-5  # max|Δlogits| / max|logits|
GRAD_RTOL = 1e-4  # rms(Δgrad) / rms(grad), per parameter
STEP_RTOL = 1e-5  # max|Δparam| / max|param| after one AdamW step, per parameter
UPDATE_RTOL = 1e-4  # rms(Δupdate) / rms(update), update = param after step − param before

CASES = {
    "default": {},
    "residual": {"residual_mult": 2.0, "residual_attn_ratio": 0.5},
    "mults": {"attn_mult": 2.0, "ffn_act_mult": 1.5, "loss_softmax_mult": 0.5},
}


# ---------------------------------------------------------------------------------------------
# The torch reference
# ---------------------------------------------------------------------------------------------


def _torch_model(hparams: dict) -> torch.nn.Module:
    torch.manual_seed(SEED)
    kwargs = {}
    if "residual_mult" in hparams or "residual_attn_ratio" in hparams:
        kwargs["residual_scaling"] = transformer_residual_scaling_rule(
            residual_mult=hparams.get("residual_mult", 1.0),
            residual_attn_ratio=hparams.get("residual_attn_ratio", 1.0),
        )
    model = uu.TransformerDecoder(WIDTH, VOCAB, LAYERS, HEADS, **kwargs)
    model.eval()  # dropout_p = 0 anyway
    return model


def _torch_logits_with_mults(model, ids, attn_mult=1.0, ffn_act_mult=1.0):
    """TransformerDecoder's forward rebuilt from its modules' weights and ``U`` ops, with the
    mults TransformerDecoder does not expose (TransformerLayer/MHSA/MLP.forward, spec §5.16)."""
    x = U.embedding(ids, model.embedding.weight)
    for layer in model.layers:
        # Attention half: MHSA linears use the default constraint ("to_output_scale").
        r, skip = U.residual_split(x, tau=layer.mhsa_tau)
        r = layer.mhsa_norm(r)
        qkv = U.linear(r, layer.mhsa.linear_qkv.weight, None)
        q, k, v = einops.rearrange(qkv, "b s (z h d) -> z b h s d", h=HEADS, z=3)
        o = U.scaled_dot_product_attention(q, k, v, is_causal=True, mult=attn_mult)
        o = einops.rearrange(o, "b h s d -> b s (h d)")
        o = U.linear(o, layer.mhsa.linear_o.weight, None)
        x = U.residual_add(o, skip, tau=layer.mhsa_tau)
        # MLP half: MLP linears use constraint=None.
        r, skip = U.residual_split(x, tau=layer.mlp_tau)
        r = layer.mlp_norm(r)
        mlp = layer.mlp
        up = U.linear(r, mlp.linear_1.weight, None, constraint=None)
        gate = U.linear(r, mlp.linear_gate.weight, None, constraint=None)
        z = U.silu_glu(up, gate, mult=ffn_act_mult)
        o = U.linear(z, mlp.linear_2.weight, None, constraint=None)
        x = U.residual_add(o, skip, tau=layer.mlp_tau)
    x = model.final_norm(x)
    return U.linear_readout(x, model.projection.weight, None)


def _torch_loss(logits, targets, loss_softmax_mult=1.0):
    """The library's loss rule (``TransformerDecoder.loss``: float logits, flattened, mean
    ``U.cross_entropy``) with α_loss-softmax, for logits (B, S, V) and targets (B, S)."""
    return U.cross_entropy(
        logits.float().flatten(end_dim=-2), targets.flatten(), mult=loss_softmax_mult
    )


def _torch_named_params(model) -> dict:
    """Our param paths → the library's parameters."""
    named = {
        ("embedding",): model.embedding.weight,
        ("readout",): model.projection.weight,
    }
    for i, layer in enumerate(model.layers):
        named[(f"layer_{i}", "attn_qkv")] = layer.mhsa.linear_qkv.weight
        named[(f"layer_{i}", "attn_out")] = layer.mhsa.linear_o.weight
        named[(f"layer_{i}", "ffn_up")] = layer.mlp.linear_1.weight
        named[(f"layer_{i}", "ffn_gate")] = layer.mlp.linear_gate.weight
        named[(f"layer_{i}", "ffn_down")] = layer.mlp.linear_2.weight
    assert len(named) == len(list(model.parameters()))
    return named


def _to_ours(path: tuple, w: np.ndarray) -> np.ndarray:
    """A library tensor (param or grad) in our layout for the param at ``path``."""
    name = path[-1]
    if name == "embedding":
        return w  # (V, d) on both sides
    if name == "attn_qkv":
        return w.T.reshape(WIDTH, 3, HEADS, HEAD_DIM)
    if name == "attn_out":
        return w.T.reshape(HEADS, HEAD_DIM, WIDTH)
    return w.T  # readout, ffn_up, ffn_gate, ffn_down


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _keys(path) -> tuple:
    """A jax key path into ``{'params': …}`` as our param path (without 'params')."""
    assert path[0].key == "params"
    return tuple(k.key for k in path[1:])


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _rms(x) -> float:
    return float(np.sqrt(np.mean(np.square(np.asarray(x, np.float64)))))


def _max_rel(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


def _rms_rel(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return _rms(ours - theirs) / _rms(theirs)


# ---------------------------------------------------------------------------------------------
# The test
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_conformance_with_unit_scaling(case):
    hparams = CASES[case]
    mults = {
        "attn_mult": hparams.get("attn_mult", 1.0),
        "ffn_act_mult": hparams.get("ffn_act_mult", 1.0),
    }
    loss_mult = hparams.get("loss_softmax_mult", 1.0)

    # ---- reference: loss, logits, grads, one AdamW step ---------------------------------
    tmodel = _torch_model(hparams)
    seq_t = torch.randint(0, VOCAB, (BATCH, SEQ + 1),
                          generator=torch.Generator().manual_seed(SEED))
    ids_t, targets_t = seq_t[:, :-1], seq_t[:, 1:]  # inputs (B, S) and next tokens (B, S)
    named = _torch_named_params(tmodel)
    init = {path: p.detach().numpy().copy() for path, p in named.items()}

    # The reference loss rule is the library's own: TransformerDecoder.loss(ids) predicts
    # ids[:, 1:] from the logits of ids[:, :-1] positions, exactly.
    with torch.no_grad():
        lib_logits = tmodel(ids_t)
        lib_loss = tmodel.loss(ids_t)
        torch.testing.assert_close(_torch_loss(lib_logits[:, :-1], ids_t[:, 1:]), lib_loss,
                                   rtol=0, atol=0)
        if case == "mults":
            # The hand-built reference must be the library's forward when all mults are 1.
            torch.testing.assert_close(_torch_logits_with_mults(tmodel, ids_t), lib_logits,
                                       rtol=0, atol=0)
    if case == "mults":
        t_logits = _torch_logits_with_mults(tmodel, ids_t, **mults)
    else:
        t_logits = tmodel(ids_t)
    t_loss = _torch_loss(t_logits, targets_t, loss_mult)
    if loss_mult != 1.0:  # α_loss-softmax moves the loss ≥ 100× the tolerance (measured 160×)
        with torch.no_grad():
            unscaled = float(_torch_loss(t_logits, targets_t, 1.0))
        scaled = float(t_loss.detach())
        assert abs(unscaled - scaled) > 100 * LOSS_RTOL * abs(scaled)
    t_loss.backward()
    t_grads = {path: p.grad.detach().numpy().copy() for path, p in named.items()}
    t_logits = t_logits.detach().numpy()
    t_loss = float(t_loss.detach())

    topt = unit_scaling.optim.AdamW(
        tmodel.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, independent_weight_decay=True
    )
    topt.step()
    t_stepped = {path: p.detach().numpy().copy() for path, p in named.items()}

    # ---- ours ---------------------------------------------------------------------------
    cfg = ModelConfig(
        vocab_size=VOCAB, width=WIDTH, depth=LAYERS, num_heads=HEADS, ffn_expansion=4,
        seq_len=SEQ, position="none", parametrization="umup", hparams=hparams,
        dtype="float32",
    )
    model = Decoder(cfg)
    ids = jnp.asarray(ids_t.numpy(), jnp.int32)
    targets = jnp.asarray(targets_t.numpy(), jnp.int32)
    # Only the structure and metadata are needed: the values come from the library's model.
    boxed = jax.eval_shape(model.init, jax.random.key(0), ids)
    shapes = jax.tree.map(lambda x: tuple(x.shape), nn.meta.unbox(boxed))

    params = jax.tree_util.tree_map_with_path(
        lambda path, _: jnp.asarray(_to_ours(_keys(path), init[_keys(path)]), jnp.float32),
        shapes,
        is_leaf=lambda x: isinstance(x, tuple),
    )
    assert jax.tree.map(jnp.shape, params) == shapes

    def loss_fn(p):  # the model's own loss: Decoder.loss → rule.loss → α_loss-softmax
        return model.apply(p, ids, targets, method=Decoder.loss)

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    logits = jax.jit(model.apply)(params, ids)

    opt = make_optimizer(
        OptimizerConfig(
            learning_rate=LR, weight_decay=WEIGHT_DECAY, schedule="constant",
            warmup_steps=0, total_steps=10,
        ),
        boxed["params"],
        cfg.rule,
    )

    @jax.jit
    def adamw_step(p, g):
        updates, _ = opt.update(g["params"], opt.init(p["params"]), p["params"])
        return {"params": optax.apply_updates(p["params"], updates)}

    # The optimizer is checked on the library's own gradients: Adam's first step is
    # g/(|g|+ε), so an element whose gradient is ~0 (|g| ≲ the fp32 noise of the backward pass)
    # can flip sign between two correct implementations and move by up to 2·η·c_p.
    lib_grads = jax.tree_util.tree_map_with_path(
        lambda path, _: jnp.asarray(_to_ours(_keys(path), t_grads[_keys(path)])), shapes,
        is_leaf=lambda x: isinstance(x, tuple),
    )
    stepped = adamw_step(params, lib_grads)
    stepped_e2e = adamw_step(params, grads)  # reported only (see above)

    # ---- compare --------------------------------------------------------------------------
    loss_err = abs(float(loss) - t_loss) / abs(t_loss)
    logits_err = _max_rel(logits, t_logits)
    grad_errs, step_errs, update_errs, e2e_errs = {}, {}, {}, {}
    for path in named:
        ours_g = np.asarray(_get(grads["params"], path))
        theirs_g = _to_ours(path, t_grads[path])
        grad_errs[path] = _rms_rel(ours_g, theirs_g)
        ours_p = np.asarray(_get(stepped["params"], path))
        theirs_p = _to_ours(path, t_stepped[path])
        step_errs[path] = _max_rel(ours_p, theirs_p)
        before = _to_ours(path, init[path]).astype(np.float64)
        update_errs[path] = _rms_rel(ours_p - before, theirs_p - before)
        e2e_errs[path] = _max_rel(np.asarray(_get(stepped_e2e["params"], path)), theirs_p)

    name = lambda p: "/".join(p)  # noqa: E731
    print(
        f"\n[{case}] loss ours={float(loss):.6f} theirs={t_loss:.6f} rel={loss_err:.2e}; "
        f"logits max-rel={logits_err:.2e}; "
        f"grad rms-rel max={max(grad_errs.values()):.2e} "
        f"({name(max(grad_errs, key=grad_errs.get))}); "
        f"param-after-step max-rel max={max(step_errs.values()):.2e} "
        f"({name(max(step_errs, key=step_errs.get))}); "
        f"update rms-rel max={max(update_errs.values()):.2e}; "
        f"(not asserted) param-after-step on our own grads max-rel max="
        f"{max(e2e_errs.values()):.2e}"
    )
    for path in named:
        print(
            f"    {name(path):22s} grad rms-rel {grad_errs[path]:.2e}  "
            f"param max-rel {step_errs[path]:.2e}  update rms-rel {update_errs[path]:.2e}  "
            f"(own-grad param max-rel {e2e_errs[path]:.2e})"
        )

    assert math.isfinite(t_loss) and math.isfinite(float(loss))
    assert loss_err <= LOSS_RTOL, f"loss: ours {float(loss)} vs library {t_loss}"
    assert logits_err <= LOGITS_RTOL, f"logits max-rel error {logits_err:.2e}"
    bad = {name(p): e for p, e in grad_errs.items() if not e <= GRAD_RTOL}
    assert not bad, f"gradients differ from the library's (rms-rel error): {bad}"
    bad = {name(p): e for p, e in step_errs.items() if not e <= STEP_RTOL}
    assert not bad, f"params after one AdamW step differ from the library's: {bad}"
    bad = {name(p): e for p, e in update_errs.items() if not e <= UPDATE_RTOL}
    assert not bad, f"AdamW updates differ from the library's (rms-rel error): {bad}"


def test_conformance_with_scanned_layers():
    """The ``residual`` case (per-layer τ) with ``scan_layers=True`` and ``remat='full'``:
    loss, logits and every gradient against the library, as above (the stacked params are
    the loop's, through :func:`umup_jax.layer_stack.stack_layers`)."""
    from umup_jax import layer_stack

    hparams = CASES["residual"]
    tmodel = _torch_model(hparams)
    seq_t = torch.randint(0, VOCAB, (BATCH, SEQ + 1),
                          generator=torch.Generator().manual_seed(SEED))
    ids_t, targets_t = seq_t[:, :-1], seq_t[:, 1:]
    named = _torch_named_params(tmodel)
    t_logits = tmodel(ids_t)
    t_loss = _torch_loss(t_logits, targets_t)
    t_loss.backward()
    t_loss = float(t_loss.detach())

    cfg = ModelConfig(
        vocab_size=VOCAB, width=WIDTH, depth=LAYERS, num_heads=HEADS, ffn_expansion=4,
        seq_len=SEQ, position="none", parametrization="umup", hparams=hparams,
        dtype="float32", scan_layers=True, remat="full",
    )
    ids = jnp.asarray(ids_t.numpy(), jnp.int32)
    targets = jnp.asarray(targets_t.numpy(), jnp.int32)
    loop_shapes = jax.tree.map(lambda x: tuple(x.shape), nn.meta.unbox(jax.eval_shape(
        Decoder(cfg.replace(scan_layers=False)).init, jax.random.key(0), ids)))
    loop_params = jax.tree_util.tree_map_with_path(
        lambda path, _: jnp.asarray(_to_ours(_keys(path),
                                             named[_keys(path)].detach().numpy())),
        loop_shapes, is_leaf=lambda x: isinstance(x, tuple))
    params = layer_stack.stack_layers(loop_params)
    model = Decoder(cfg)
    loss, grads = jax.jit(jax.value_and_grad(
        lambda p: model.apply(p, ids, targets, method=Decoder.loss)))(params)
    logits = jax.jit(model.apply)(params, ids)
    grads = layer_stack.unstack_layers(grads)

    assert abs(float(loss) - t_loss) <= LOSS_RTOL * abs(t_loss)
    assert _max_rel(logits, t_logits.detach().numpy()) <= LOGITS_RTOL
    errs = {path: _rms_rel(np.asarray(_get(grads["params"], path)),
                           _to_ours(path, p.grad.detach().numpy()))
            for path, p in named.items()}
    print(f"\n[scan] loss rel {abs(float(loss) - t_loss) / abs(t_loss):.2e}, "
          f"grad rms-rel max {max(errs.values()):.2e}")
    bad = {"/".join(p): e for p, e in errs.items() if not e <= GRAD_RTOL}
    assert not bad, f"gradients differ from the library's (rms-rel error): {bad}"


# ---------------------------------------------------------------------------------------------
# Every HP off its default at once, with RoPE, a head dim not width/heads, and the model's
# other execution paths, against the library's functional ops in float64
# ---------------------------------------------------------------------------------------------

ALL_HPARAMS = {"attn_mult": 2.0, "ffn_act_mult": 0.5, "residual_mult": 1.7,
               "residual_attn_ratio": 0.4, "loss_softmax_mult": 1.5}
ALL_V, ALL_D, ALL_H, ALL_HD, ALL_EXP, ALL_S, ALL_B = 128, 32, 2, 8, 2, 16, 3


def _rope_reference(x, theta=10000.0):
    """Rotate-half RoPE on (B, H, S, D), frequencies θ^(−i/(D/2)) (spec §5.10)."""
    seq, half = x.shape[-2], x.shape[-1] // 2
    inv = theta ** (-torch.arange(half, dtype=torch.float64) / half)
    ang = torch.arange(seq, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cos(ang), torch.sin(ang)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def _reference_loss_all_hparams(w, ids, targets, depth, train_seq):
    """The decoder of spec §5.16 from ``unit_scaling.functional`` ops, with every α of
    ``ALL_HPARAMS``, RoPE after the QKV projection, and the attention's output scale taken at
    the *training* length ``train_seq`` whatever the call's length (spec §5.9)."""
    from unit_scaling.core.functional import logarithmic_interpolation
    from unit_scaling.scale import scale_bwd, scale_fwd

    hp = ALL_HPARAMS
    rule = transformer_residual_scaling_rule(hp["residual_mult"], hp["residual_attn_ratio"])
    s_attn = 1.0 / logarithmic_interpolation(
        alpha=1.0 / (1.0 + 4.0 * ALL_HD / hp["attn_mult"] ** 2),
        lower=(math.log(train_seq) / train_seq) ** 0.5, upper=1.0)
    x = U.embedding(ids, w["embedding"])
    for i in range(depth):
        tau = rule(2 * i, 2 * depth)
        r, skip = U.residual_split(x, tau=tau)
        r = U.rms_norm(r, (ALL_D,), eps=1e-5)
        qkv = U.linear(r, w[f"qkv{i}"], None)
        q, k, v = einops.rearrange(qkv, "b s (z h d) -> z b h s d", h=ALL_H, z=3)
        q, k = _rope_reference(q), _rope_reference(k)
        q, k, v = (scale_bwd(t, s_attn) for t in (q, k, v))
        o = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=hp["attn_mult"] / ALL_HD)
        o = einops.rearrange(scale_fwd(o, s_attn), "b h s d -> b s (h d)")
        x = U.residual_add(U.linear(o, w[f"o{i}"], None), skip, tau=tau)
        tau = rule(2 * i + 1, 2 * depth)
        r, skip = U.residual_split(x, tau=tau)
        r = U.rms_norm(r, (ALL_D,), eps=1e-5)
        up = U.linear(r, w[f"up{i}"], None, constraint=None)
        gate = U.linear(r, w[f"gate{i}"], None, constraint=None)
        z = U.silu_glu(up, gate, mult=hp["ffn_act_mult"])
        x = U.residual_add(U.linear(z, w[f"down{i}"], None, constraint=None), skip, tau=tau)
    logits = U.linear_readout(U.rms_norm(x, (ALL_D,), eps=1e-5), w["readout"], None)
    return U.cross_entropy(logits.flatten(end_dim=-2), targets.flatten(),
                           mult=hp["loss_softmax_mult"])


def _reference_layout(params, depth) -> dict:
    """Our params (or gradients), looped or stacked, as float64 torch (out, in) weights."""
    p = params["params"]
    out = {"embedding": np.asarray(p["embedding"]), "readout": np.asarray(p["readout"]).T}
    for i in range(depth):
        layer = ({k: np.asarray(v)[i] for k, v in p["layers"].items()} if "layers" in p else
                 {k: np.asarray(v) for k, v in p[f"layer_{i}"].items()})
        out[f"qkv{i}"] = layer["attn_qkv"].reshape(ALL_D, -1).T
        out[f"o{i}"] = layer["attn_out"].reshape(-1, ALL_D).T
        for ours, theirs in (("ffn_up", "up"), ("ffn_gate", "gate"), ("ffn_down", "down")):
            out[f"{theirs}{i}"] = layer[ours].T
    return {k: torch.tensor(v.astype(np.float64), requires_grad=True) for k, v in out.items()}


@pytest.mark.parametrize("depth, variant", [
    (1, "loop"), (3, "loop"), (3, "scan"), (3, "loss_chunks"), (3, "shorter_call"),
])
def test_conformance_all_hparams_rope_and_paths(depth, variant):
    """Loss and every gradient of our u-μP decoder with all five α's ≠ 1 (α_attn,
    α_ffn-act, α_loss-softmax *and* the residual α's together, which the cases above never
    combine), RoPE, heads of 8 in width 32 (H·D_h ≠ width), FFN expansion 2, against a float64
    reference from the library's functional ops: looped and scanned, with ``loss_chunks=4``,
    and called on S/2 tokens (the attention scale still at the training S)."""
    cfg = ModelConfig(vocab_size=ALL_V, width=ALL_D, depth=depth, num_heads=ALL_H,
                      head_dim=ALL_HD, ffn_expansion=ALL_EXP, seq_len=ALL_S, position="rope",
                      parametrization="umup", hparams=ALL_HPARAMS, dtype="float32",
                      scan_layers=variant == "scan",
                      loss_chunks=4 if variant == "loss_chunks" else 1)
    seq = ALL_S // 2 if variant == "shorter_call" else ALL_S
    rng = np.random.default_rng(SEED)
    ids, targets = (rng.integers(0, ALL_V, (ALL_B, seq)) for _ in range(2))
    model = Decoder(cfg)
    params = nn.meta.unbox(init_params(model, jax.random.key(SEED)))
    with jax.default_matmul_precision("highest"):
        loss, grads = jax.jit(jax.value_and_grad(lambda p: model.apply(
            p, jnp.asarray(ids), jnp.asarray(targets), method=Decoder.loss)))(params)

    weights = _reference_layout(params, depth)
    t_loss = _reference_loss_all_hparams(weights, torch.tensor(ids), torch.tensor(targets),
                                         depth, train_seq=ALL_S)
    t_loss.backward()
    t_loss = float(t_loss.detach())
    ours = _reference_layout(grads, depth)
    errs = {k: _rms_rel(ours[k].detach().numpy(), w.grad.numpy()) for k, w in weights.items()}
    loss_err = abs(float(loss) - t_loss) / abs(t_loss)
    print(f"\n[all α, {variant}, L={depth}] loss rel {loss_err:.1e}, grad rms-rel max "
          f"{max(errs.values()):.1e}")
    assert loss_err <= LOSS_RTOL
    bad = {k: e for k, e in errs.items() if not e <= GRAD_RTOL}
    assert not bad, f"gradients differ from the reference (rms-rel error): {bad}"
