"""The attention kernel switch (``model.attention_impl = xla | cudnn | auto``): which kernel is
chosen where, the ``xla`` path through ``jax.nn.dot_product_attention`` equals the attention we
had (an einsum–fp32 softmax–einsum, kept here as the reference) for SP, μP and u-μP, and
``cudnn`` where it cannot run fails before anything compiles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import SEED
from umup_jax import ops
from umup_jax import parametrization as P
from umup_jax.model import Decoder, ModelConfig


def reference_attention(q, k, v, logit_scale, causal=True):
    """The attention of umup_jax before the kernel switch (verbatim): fp32 logits and softmax,
    probabilities cast to v's dtype."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    logits = logits * logit_scale
    if causal:
        s_q, s_k = q.shape[1], k.shape[1]
        mask = jnp.tril(jnp.ones((s_q, s_k), dtype=bool))
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def reference_rule_attention(rule, q, k, v, seq_len):
    scale = rule.attention_logit_scale(q.shape[-1])
    if not rule.unit_scaled:
        return reference_attention(q, k, v, scale)
    s = ops.attention_scale(seq_len, v.shape[-1], rule.attn_mult, causal=True)
    q, k, v = (ops.scale_bwd(t, s) for t in (q, k, v))
    return ops.scale_fwd(reference_attention(q, k, v, scale), s)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(a)))


RULES = {
    "sp": P.SP(),
    "mup": P.MuP(width=64, base_width=32, attn_mult=1.7),
    "umup": P.UMuP(attn_mult=2.5),
}


@pytest.mark.parametrize("name, dtype", [("sp", jnp.float32), ("mup", jnp.float32),
                                         ("umup", jnp.float32), ("umup", jnp.bfloat16)])
def test_xla_path_equals_previous_attention(name, dtype):
    """Forward and the q, k, v gradients ≤ 1e-6 relative (measured: 0 forward, ≤ 2e-7 for the
    gradients in fp32; bit-identical in bf16, where jax's xla path uses the BF16_BF16_F32 dot
    algorithm for q·kᵀ, i.e. fp32 logits as before)."""
    rule = RULES[name]
    keys = jax.random.split(jax.random.key(SEED), 4)
    shape = (2, 16, 2, 8)
    q, k, v, g = (2.0 * jax.random.normal(kk, shape, jnp.float32) for kk in keys)
    q, k, v, g = (t.astype(dtype) for t in (q, k, v, g))
    ours = lambda q, k, v: rule.attention(q, k, v, causal=True, seq_len=32, impl="xla")  # noqa: E731
    ref = lambda q, k, v: reference_rule_attention(rule, q, k, v, seq_len=32)  # noqa: E731

    def value_and_vjp(f):
        def run(q, k, v, g):
            y, vjp = jax.vjp(f, q, k, v)
            return (y, *vjp(g))
        return jax.jit(run)(q, k, v, g)  # compiled, as in the model

    got, want = value_and_vjp(ours), value_and_vjp(ref)
    assert got[0].dtype == dtype
    for a, b, what in zip(want, got, ("out", "dq", "dk", "dv")):
        assert _rel(a, b) <= 1e-6, (what, _rel(a, b))


def test_every_attention_goes_through_the_one_kernel(monkeypatch):
    """SP/μP's and u-μP's attention both call ops.attention_core with the rule's logit scale."""
    calls = []
    real = ops.attention_core

    def spy(q, k, v, logit_scale, causal=True, impl="xla"):
        calls.append((logit_scale, causal, impl))
        return real(q, k, v, logit_scale, causal, impl)

    monkeypatch.setattr(ops, "attention_core", spy)
    q = jnp.ones((1, 4, 1, 8))
    for rule in RULES.values():
        rule.attention(q, q, q, causal=True, seq_len=4, impl="auto")
    assert calls == [(8**-0.5, True, "auto"), (1.7 / 8, True, "auto"), (2.5 / 8, True, "auto")]


@pytest.mark.parametrize(
    "impl, dtype, head_dim, platform, capability, expected",
    [
        ("xla", jnp.bfloat16, 64, "gpu", "9.0", "xla"),
        ("auto", jnp.bfloat16, 64, "gpu", "9.0", "cudnn"),
        ("auto", jnp.float16, 128, "gpu", "8.0", "cudnn"),
        ("auto", jnp.float32, 64, "gpu", "9.0", "xla"),  # fp32: no cuDNN
        ("auto", jnp.bfloat16, 64, "cpu", None, "xla"),
        ("auto", jnp.bfloat16, 64, "tpu", None, "xla"),
        ("auto", jnp.bfloat16, 64, "gpu", "7.5", "xla"),  # pre-Ampere
        ("auto", jnp.bfloat16, 60, "gpu", "9.0", "xla"),  # not a multiple of 8
        ("auto", jnp.bfloat16, 192, "gpu", "8.0", "xla"),  # > 128 before Hopper
        ("auto", jnp.bfloat16, 192, "gpu", "9.0", "cudnn"),  # ≤ 256 from Hopper on
        ("auto", jnp.bfloat16, 264, "gpu", "9.0", "xla"),
        ("cudnn", jnp.bfloat16, 64, "gpu", "9.0", "cudnn"),
    ],
)
def test_kernel_selection(impl, dtype, head_dim, platform, capability, expected):
    assert ops.resolve_attention_impl(impl, dtype, head_dim, platform, capability) == expected


@pytest.mark.parametrize(
    "dtype, head_dim, platform, capability, match",
    [
        (jnp.bfloat16, 64, "cpu", None, "needs a CUDA GPU, but the JAX devices are 'cpu'"),
        (jnp.float32, 64, "gpu", "9.0", "bf16/fp16 inputs, but the attention inputs are float32"),
        (jnp.bfloat16, 60, "gpu", "9.0", "multiple of 8 and <= 256 .* head_dim=60"),
        (jnp.bfloat16, 64, "gpu", "7.0", "compute capability >= 8.0"),
    ],
)
def test_cudnn_where_it_cannot_run_says_why(dtype, head_dim, platform, capability, match):
    with pytest.raises(ValueError, match="attention_impl='cudnn' cannot run here: .*" + match):
        ops.resolve_attention_impl("cudnn", dtype, head_dim, platform, capability)


def test_attention_impl_typo_and_cudnn_on_this_machine():
    with pytest.raises(ValueError, match=r"attention_impl='flash' is invalid: allowed are "
                                         r"\('xla', 'cudnn', 'auto'\)"):
        ModelConfig(attention_impl="flash")
    if jax.default_backend() == "gpu":
        pytest.skip("this machine has a GPU")
    cfg = ModelConfig(vocab_size=16, width=16, depth=1, num_heads=2, seq_len=8,
                      dtype="bfloat16", attention_impl="cudnn")
    with pytest.raises(ValueError, match="needs a CUDA GPU"):  # at trace time, not compile
        jax.eval_shape(Decoder(cfg).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    jax.eval_shape(Decoder(cfg.replace(attention_impl="auto")).init, jax.random.key(0),
                   jnp.zeros((1, 8), jnp.int32))  # auto falls back to xla here


def test_xla_attention_backward_keeps_one_probability_matrix():
    """The softmax inside the XLA attention differentiates from its output alone
    (``ops._softmax_saving_probabilities``): of the S×S arrays the backward keeps, one is the
    probabilities and one the causal mask's fill, where JAX's default rule adds exp(logits)
    (and two row vectors)."""
    b, s, h, d = 2, 16, 4, 8
    q = jax.random.normal(jax.random.key(0), (b, s, h, d))

    def square_leaves(f):
        _, pullback = jax.vjp(f, q)
        return [a for a in jax.tree_util.tree_leaves(pullback)
                if a.shape[-2:] == (s, s) and jnp.issubdtype(a.dtype, jnp.floating)]

    ours = square_leaves(lambda t: ops.attention_core(t, 1.5 * t, 2.0 * t, 0.125))
    assert len(ours) <= 2, [a.shape for a in ours]
    if hasattr(jax, "softmax_custom_jvp"):
        with jax.softmax_custom_jvp(False):
            plain = square_leaves(lambda t: jax.nn.dot_product_attention(
                t, 1.5 * t, 2.0 * t, scale=0.125, is_causal=True, implementation="xla"))
        assert len(plain) > len(ours)
