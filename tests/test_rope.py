"""RoPE (spec §5.10) against an independent closed form and against Hugging Face Llama.

The layout is Llama's rotate-half (``transformers``' ``rotate_half`` /
``apply_rotary_pos_emb``): at position p, dimensions i and i + D/2 form a pair rotated by the
angle p·ω_i with ω_i = θ^(−2i/D):

    x'_i       = x_i·cos(p·ω_i) − x_{i+D/2}·sin(p·ω_i)
    x'_{i+D/2} = x_{i+D/2}·cos(p·ω_i) + x_i·sin(p·ω_i)

so q'·k' at positions (m, n) is Σ_i (q_i k_i + q_{i+D/2} k_{i+D/2})·cos((m−n)ω_i)
+ (q_i k_{i+D/2} − q_{i+D/2} k_i)·sin((m−n)ω_i): a function of the offset m − n only.
"""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from umup_jax.model import apply_rope

D, S = 16, 512
THETAS = (10000.0, 500000.0)
POSITIONS = (0, 1, 2, 5, 17, 100, 511)


def closed_form(x, p: int, theta: float) -> np.ndarray:
    """``x`` (D,) rotated to position ``p``, pair by pair, in float64 (the formula above)."""
    d, h = len(x), len(x) // 2
    out = np.empty(d)
    for i in range(h):
        angle = p * theta ** (-2.0 * i / d)
        c, s = math.cos(angle), math.sin(angle)
        out[i] = x[i] * c - x[i + h] * s
        out[i + h] = x[i + h] * c + x[i] * s
    return out


def ours_at_every_position(x, theta: float) -> np.ndarray:
    """(S, D): our ``apply_rope`` of the vector ``x`` placed at every position 0 … S−1."""
    xs = jnp.broadcast_to(jnp.asarray(x, jnp.float32), (1, S, 1, len(x)))
    return np.asarray(apply_rope(xs, theta), np.float64)[0, :, 0]


def test_unit_vectors_by_hand():
    """D = 4, θ = 100: ω = (1, 0.1).  e₀ at p goes to (cos p, 0, sin p, 0) and e₁ to
    (0, cos 0.1p, 0, sin 0.1p); e₂ (the partner of e₀) to (−sin p, 0, cos p, 0)."""
    for p in (0, 1, 3, 10, 250):
        e0, e1, e2 = (ours_at_every_position(np.eye(4)[i], 100.0)[p] for i in range(3))
        np.testing.assert_allclose(e0, [math.cos(p), 0, math.sin(p), 0], atol=1e-6)
        np.testing.assert_allclose(e1, [0, math.cos(0.1 * p), 0, math.sin(0.1 * p)], atol=1e-6)
        np.testing.assert_allclose(e2, [-math.sin(p), 0, math.cos(p), 0], atol=1e-6)


@pytest.mark.parametrize("theta", THETAS)
def test_rotation_of_a_known_vector(theta):
    x = np.arange(1.0, D + 1.0)
    ours = ours_at_every_position(x, theta)
    for p in POSITIONS:
        np.testing.assert_allclose(ours[p], closed_form(x, p, theta), rtol=0, atol=1e-5,
                                   err_msg=f"position {p}")
    np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), np.linalg.norm(x), rtol=1e-6)
    np.testing.assert_array_equal(ours[0], x)  # position 0: no rotation


@pytest.mark.parametrize("theta", THETAS)
def test_qk_depends_only_on_the_relative_offset(theta):
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=D), rng.normal(size=D)
    rq, rk = ours_at_every_position(q, theta), ours_at_every_position(k, theta)
    h = D // 2
    omega = theta ** (-2.0 * np.arange(h) / D)
    expected = {}
    for offset in (0, 1, 3, 40, -7):
        phi = offset * omega
        expected[offset] = float(np.sum((q[:h] * k[:h] + q[h:] * k[h:]) * np.cos(phi)
                                        + (q[:h] * k[h:] - q[h:] * k[:h]) * np.sin(phi)))
        for m in (max(offset, 0) + j for j in (0, 5, 200, 400)):
            np.testing.assert_allclose(rq[m] @ rk[m - offset], expected[offset], rtol=0,
                                       atol=1e-4, err_msg=f"m={m}, offset={offset}")
    values = sorted(expected.values())
    assert min(np.diff(values)) > 1e-3, expected  # 10× the tolerance: offsets told apart


@pytest.mark.parametrize("theta", THETAS)
def test_matches_hugging_face_llama(theta):
    torch = pytest.importorskip("torch", reason="the Hugging Face comparison needs torch")
    llama = pytest.importorskip("transformers.models.llama.modeling_llama",
                                reason="the Hugging Face comparison needs transformers")
    from transformers import LlamaConfig

    batch, heads = 2, 3
    rng = np.random.default_rng(1)
    q, k = (rng.normal(size=(batch, S, heads, D)).astype(np.float32) for _ in range(2))
    config = LlamaConfig(hidden_size=heads * D, num_attention_heads=heads, head_dim=D,
                         rope_theta=theta, max_position_embeddings=S)
    rotary = llama.LlamaRotaryEmbedding(config)
    # Hugging Face's layout is (B, H, S, D); ours (B, S, H, D).
    tq, tk = (torch.from_numpy(x).transpose(1, 2) for x in (q, k))
    positions = torch.arange(S)[None].expand(batch, S)
    cos, sin = rotary(tq, positions)
    hq, hk = llama.apply_rotary_pos_emb(tq, tk, cos, sin)
    for ours, theirs in ((apply_rope(jnp.asarray(q), theta), hq),
                         (apply_rope(jnp.asarray(k), theta), hk)):
        # HF forms the angles p·ω in fp32 (error ~ p·2⁻²⁴ rad at p ≤ 511); ours in float64.
        np.testing.assert_allclose(np.asarray(ours), theirs.transpose(1, 2).numpy(),
                                   rtol=0, atol=2e-4)
