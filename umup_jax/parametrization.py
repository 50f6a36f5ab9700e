"""abc-parametrizations: SP, μP and u-μP as rules over declared parameter roles.

A parametrization gives every parameter three numbers from its *role* and its declared
fan-in/fan-out (u-μP paper §2.1, spec §2): the forward multiplier ``A``, the init std ``B``
and the Adam learning-rate multiplier ``C``, with

    W_t = A · w_t,    w_0 ~ N(0, B²),    w_{t+1} = w_t + η · C · Φ_t(∇L_0 … ∇L_t).

Each parameter is declared once, in the model, with a :class:`ParamMeta` box that carries its
role, fan-in, fan-out, the depth of the residual stack it lives in (``None`` outside it) and
its logical axis names.  Nothing downstream infers any of these from names or shapes.

The three rules (spec §2.2-§2.4; η is the optimizer's global learning rate):

=========  =============================  ==============================  ====================
role       SP                             μP (base width d₀, m = d/d₀)    u-μP
=========  =============================  ==============================  ====================
embedding  A=1, B=σ, C=1 (m with          A=α_emb, B=σ, C=η̂_emb           A=1, B=1, C=1/√d
           emb_lr_scaling)
hidden     A=1, B=σ, C=1                  A=1, B=σ/√m, C=1/m              A=1/√fan_in, B=1,
                                                                          C=1/√fan_in
output     A=1, B=σ, C=1                  A=α_out/m, B=σ, C=1             A=1/fan_in, B=1, C=1
bias       A=1, B=0, C=1                  A=1, B=0, C=1                   A=1, B=0, C=1
norm gain  A=1, B=1(const), C=1           same                            same
=========  =============================  ==============================  ====================

u-μP multiplies ``C`` by ``1/√L`` for every parameter inside the depth-scaled residual stack
(depth-μP, spec §3), with ``L`` the number of transformer layers.  In u-μP the multipliers
``A`` are not applied as plain multiplications: they are the forward scales of the unit-scaled
ops (:mod:`umup_jax.ops`), whose backward scales follow unit scaling instead.

abc-symmetry (spec §2.1): for Adam, training is invariant under ``A ← A·θ, B ← B/θ,
C ← C/θ``; :func:`abc_shift` applies it per role, which the tests use to check that the
optimizer and model read the same rule.
"""

from __future__ import annotations

import abc as _abc
import dataclasses
import math
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import struct
from flax.core import meta as flax_meta
import flax.linen as nn

from umup_jax import ops

# ---------------------------------------------------------------------------------------------
# Roles and the per-parameter metadata box
# ---------------------------------------------------------------------------------------------

EMBEDDING = "embedding"
HIDDEN = "hidden"
OUTPUT = "output"
BIAS = "bias"
NORM = "norm"
ROLES = (EMBEDDING, HIDDEN, OUTPUT, BIAS, NORM)

PARAMETRIZATIONS = ("sp", "mup", "umup")


class ParamMeta(nn.LogicallyPartitioned):
    """A Flax param box holding a parameter's u-μP metadata and its logical axis names.

    It is a :class:`flax.linen.LogicallyPartitioned`, so the sharding machinery reads
    ``names`` from the same box; the extra fields are static (not pytree leaves).

    Attributes:
      role: one of :data:`ROLES`.
      fan_in: the contraction size of the parameter's matmul (for an embedding table, by the
        u-μP convention of spec §2.4, ``d_model``).
      fan_out: the output size of the parameter's matmul (for an embedding, ``vocab``).
      depth: the number of layers ``L`` of the depth-scaled residual stack the parameter lives
        in, or ``None`` outside it.
    """

    role: str = struct.field(default=HIDDEN, pytree_node=False)
    fan_in: int = struct.field(default=1, pytree_node=False)
    fan_out: int = struct.field(default=1, pytree_node=False)
    depth: Optional[int] = struct.field(default=None, pytree_node=False)

    def describe(self) -> str:
        return (
            f"role={self.role}, fan_in={self.fan_in}, fan_out={self.fan_out}, "
            f"depth={self.depth}, names={self.names}"
        )


def _is_box(x: Any) -> bool:
    return isinstance(x, flax_meta.AxisMetadata)


def param_metadata(boxed_params: Any) -> Any:
    """Returns the tree of :class:`ParamMeta` (values dropped) for a boxed param tree.

    ``boxed_params`` is what ``model.init`` (or ``jax.eval_shape(model.init, …)``) returns,
    or any subtree of it; the result has the same structure as the unboxed params.  Raises
    ``ValueError`` naming the path of any leaf not declared with a :class:`ParamMeta`.
    """

    def check(path, leaf):
        if not isinstance(leaf, ParamMeta):
            raise ValueError(
                f"parameter {jax.tree_util.keystr(path)} has no u-μP metadata "
                f"(got {type(leaf).__name__}); every parameter must be declared with "
                "umup_jax.parametrization.ParamMeta (role, fan_in, fan_out, depth)"
            )
        return leaf.replace_boxed(None)

    return jax.tree_util.tree_map_with_path(check, boxed_params, is_leaf=_is_box)


# ---------------------------------------------------------------------------------------------
# The residual τ rule (spec §4.2; unit_scaling.core.functional.transformer_residual_scaling_rule)
# ---------------------------------------------------------------------------------------------


def residual_taus(
    num_layers: int, residual_mult: float = 1.0, residual_attn_ratio: float = 1.0
) -> list[float]:
    """τ_i for the 2L residual branches of a transformer (even i attention, odd i FFN).

    With α_ffn = α_res·√(2/(1+α_ratio²)), α_attn = α_ratio·α_ffn, n_attn(i) = ⌊(i+1)/2⌋ and
    n_ffn(i) = ⌊i/2⌋ (u-μP paper App. G, spec §4.2):

        τ_i = α_i / √(L + n_attn(i)·α_attn² + n_ffn(i)·α_ffn²).

    The embedding enters the stream with weight L, each attention branch with α_attn² and each
    FFN branch with α_ffn², so the final stream is unit-variance with those proportions.
    """
    _check_positive_int("num_layers", num_layers)
    _check_positive("residual_mult", residual_mult)
    _check_positive("residual_attn_ratio", residual_attn_ratio)
    alpha_ffn = residual_mult * math.sqrt(2.0 / (1.0 + residual_attn_ratio**2))
    alpha_attn = residual_attn_ratio * alpha_ffn
    taus = []
    for i in range(2 * num_layers):
        n_attn, n_ffn = (i + 1) // 2, i // 2
        alpha = alpha_attn if i % 2 == 0 else alpha_ffn
        taus.append(alpha / math.sqrt(num_layers + n_attn * alpha_attn**2 + n_ffn * alpha_ffn**2))
    return taus


def residual_weights(tau: float) -> tuple[float, float]:
    """(branch weight a, skip weight b) = (τ/√(1+τ²), 1/√(1+τ²)); a² + b² = 1 (spec §4.1)."""
    denom = math.sqrt(1.0 + tau * tau)
    return tau / denom, 1.0 / denom


# ---------------------------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------------------------


def _check_positive(field: str, value: Any) -> None:
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0
            or not math.isfinite(value)):
        raise ValueError(f"{field}={value!r} is invalid: it must be a finite number > 0")


def _check_positive_int(field: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{field}={value!r} is invalid: it must be an integer > 0")


# ---------------------------------------------------------------------------------------------
# abc rules
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ABC:
    """Forward multiplier A, init std B, Adam LR multiplier C of one parameter."""

    a: float
    b: float
    c: float


def abc_shift(abc: ABC, theta: float) -> ABC:
    """The abc-symmetry of Adam (spec §2.1): (A·θ, B/θ, C/θ) trains identically."""
    _check_positive("theta", theta)
    return ABC(abc.a * theta, abc.b / theta, abc.c / theta)


def depth_lr_factor(meta: ParamMeta) -> float:
    """1/√L inside the depth-scaled stack, 1 outside (depth-μP, spec §3)."""
    return 1.0 if meta.depth is None else meta.depth**-0.5


@dataclasses.dataclass(frozen=True)
class Parametrization(metaclass=_abc.ABCMeta):
    """Base class: a rule from :class:`ParamMeta` to :class:`ABC`, plus the ops it implies.

    ``shift`` maps roles to abc-symmetry factors θ (default none); the model and optimizer both
    read the shifted rule, so any θ leaves Adam training unchanged.
    """

    shift: tuple[tuple[str, float], ...] = ()

    name = "base"
    unit_scaled = False

    def __post_init__(self) -> None:
        shift = self.shift
        if isinstance(shift, Mapping):
            shift = tuple(sorted(shift.items()))
        object.__setattr__(self, "shift", tuple(shift))
        for role, theta in self.shift:
            if role not in ROLES:
                raise ValueError(f"shift role {role!r} is invalid: allowed roles are {ROLES}")
            _check_positive(f"shift[{role}]", theta)
        for f in dataclasses.fields(self):
            if f.name != "shift" and f.type in ("float", float):
                _check_positive(f.name, getattr(self, f.name))
            if f.name != "shift" and f.type in ("int", int):
                _check_positive_int(f.name, getattr(self, f.name))
            if f.type in ("bool", bool) and not isinstance(getattr(self, f.name), bool):
                raise ValueError(f"{f.name}={getattr(self, f.name)!r} is invalid: it must be "
                                 "True or False")

    # -- the rule --------------------------------------------------------------------------
    @_abc.abstractmethod
    def base_abc(self, meta: ParamMeta) -> ABC:
        """The rule's (A, B, C) for ``meta`` before any abc-symmetry shift."""

    def abc(self, meta: ParamMeta) -> ABC:
        if meta.role not in ROLES:
            raise ValueError(f"role={meta.role!r} is invalid: allowed roles are {ROLES}")
        abc = self.base_abc(meta)
        theta = dict(self.shift).get(meta.role)
        return abc if theta is None else abc_shift(abc, theta)

    def lr_multiplier(self, meta: ParamMeta) -> float:
        """C of the parameter (the optimizer multiplies it by the global η)."""
        return self.abc(meta).c

    def initializer(self, meta: ParamMeta) -> Callable:
        """N(0, B²) for weights; zeros for biases; ones for norm gains (B is their value)."""
        if meta.role == BIAS:
            return nn.initializers.zeros
        if meta.role == NORM:
            return nn.initializers.ones
        std = self.abc(meta).b
        return nn.initializers.normal(stddev=std)

    def forward_multiplier(self, meta: ParamMeta) -> float:
        return self.abc(meta).a

    # -- ops used by the model (plain versions; u-μP overrides) ---------------------------
    def linear(self, x, w, meta: ParamMeta, bias=None, constrained: bool = True, dot=None,
               tokens: Optional[int] = None):
        """(x @ w + b)·A (w of shape (fan_in, fan_out)), with the gradients of that formula;
        ``dot`` replaces the matmul (FP8).  ``tokens`` is the token count of u-μP's
        weight-gradient scale (the plain rules have none).

        Without ``dot`` the product is :func:`umup_jax.ops.matmul`: the same value and
        gradients as autodiff of ``(x @ w)·A``, with A applied to the smaller operand and the
        weight gradient one flat 2-D product (autodiff of a 3-D ``x @ w`` transposes the
        gradient first, which on a CPU made SP's train step 2.1× slower at the proxy's shapes:
        ``experiments/bench_residuals.py``)."""
        a = self.forward_multiplier(meta)
        if dot is None:
            y = ops.matmul(x, w, scale=a)
            if bias is not None:
                y = y + (bias if a == 1.0 else bias * a)
            return y
        y = dot(x, w)
        if bias is not None:
            y = y + bias
        return y if a == 1.0 else y * a

    def readout(self, x, w, meta: ParamMeta, dot=None, tokens: Optional[int] = None):
        return self.linear(x, w, meta, dot=dot)

    def embed(self, table, ids, meta: ParamMeta, tokens: Optional[int] = None):
        y = jnp.take(table, ids, axis=0)
        a = self.forward_multiplier(meta)
        return y if a == 1.0 else y * a

    def attention_logit_scale(self, head_dim: int) -> float:
        return head_dim**-0.5

    def attention(self, q, k, v, causal: bool = True, seq_len: Optional[int] = None,
                  impl: str = "xla"):
        """Attention on (B, S, H, D); ``seq_len`` is the model's training S (u-μP's output
        scale is computed from it; plain attention has no such scale); ``impl`` the kernel
        (``xla | cudnn | auto``, :func:`umup_jax.ops.attention_core`)."""
        return ops.dot_product_attention(
            q, k, v, logit_scale=self.attention_logit_scale(q.shape[-1]), causal=causal,
            impl=impl,
        )

    def ffn_activation(self, up, gate):
        # up · silu(gate), whose custom VJP keeps only up and gate for the backward.
        return ops.gated_silu(up, gate)

    def residual_taus(self, num_layers: int) -> Optional[list[float]]:
        """τ per residual branch, or ``None`` for the plain ``x + f(x)`` residual."""
        return None

    def loss(self, logits, targets):
        """The mean cross-entropy: ``loss_from_sum(loss_sum(logits, targets), N)``."""
        return self.loss_from_sum(self.loss_sum(logits, targets), targets.size)

    def loss_sum(self, logits, targets):
        """Σ over tokens of the cross-entropy, with the backward of :meth:`loss` per logit up
        to its 1/N: summed over chunks of tokens and passed to :meth:`loss_from_sum`, it is
        :meth:`loss` of all of them (``model.loss_chunks``)."""
        return ops.plain_cross_entropy(logits, targets, reduction="sum")

    def loss_from_sum(self, total, num_tokens: int):
        """The mean loss from :meth:`loss_sum` over ``num_tokens`` tokens: ``total / N`` (the
        gradient too is divided by N)."""
        return total / num_tokens

    def grad_accumulation_weight(self, num_micro_batches: int) -> float:
        """w such that w·Σ_j ∇L_j over k equal micro-batches is the full batch's gradient ∇L.

        A plain mean loss divides its backward by the token count N, so each micro-batch's
        gradient carries 1/(N/k) and w = 1/k.  (u-μP's loss does not: see :class:`UMuP`.)
        """
        return 1.0 / num_micro_batches

    # -- forward multipliers inside the ops (read by export to fold them into weights) ------
    def attention_output_scale(self, seq_len: int, head_dim: int) -> float:
        """The factor :meth:`attention` applies to softmax(…)·v at training length S."""
        return 1.0

    def ffn_activation_mults(self) -> tuple[float, float]:
        """(m, s) with ``ffn_activation(up, gate) = s·up·gate·σ(m·gate)``."""
        return 1.0, 1.0

    def loss_logit_mult(self) -> float:
        """The factor :meth:`loss` applies to the logits before its softmax."""
        return 1.0


@dataclasses.dataclass(frozen=True)
class SP(Parametrization):
    """Standard parametrization (spec §2.2): A=1, B=σ_init, C=1 (one global η); 1/√d_head.

    With ``emb_lr_scaling`` the embedding's Adam LR grows with width (off by default, so SP
    is unchanged):

        C_emb = width / base_width        (every other C stays 1)

    This is the "SP + embedding LR" baseline of Kalra & Barkeshli, *Quantifying
    Hyperparameter Transfer and the Importance of Embedding Layer Learning Rate*
    (arXiv:2605.21486, 2026), who find that most of μP's advantage over SP under AdamW comes
    from the embedding's learning rate, and that raising it by a factor of width closes much of
    the gap.  Why width/base_width: an Adam update moves every entry of a weight by about η·C
    whatever its gradient's size.  For a hidden weight that update reaches the output summed
    over fan_in ∝ width aligned inputs, so the η that SP tunes shrinks ∝ 1/width (we measured
    its optimum halving with each doubling of width).  The embedding's input is a one-hot
    token, so its update reaches the output unsummed and its best LR does not depend on
    width: μP gives it C_emb = 1 while the hidden weights get C = base_width/width (spec §2.3).
    SP's one global η, tuned ∝ base_width/width for the hidden weights, therefore starves the
    embedding by that same factor; multiplying the embedding's C by width/base_width gives it
    the LR η·width/base_width, which stays at its base-width value as η shrinks, and makes the
    embedding-to-hidden LR ratio equal to μP's (with η̂_emb = 1) at every width.  With
    base_width = 1 the ratio is the width itself, TP-V's μP table without base shapes.

    Attributes:
      width: the model's width d (set from the model config).
      init_std: σ_init, the std of every weight.
      emb_lr_scaling: multiply the embedding's C by width/base_width.
      base_width: d₀, the width at which the embedding's C is 1 (μP's base width, to match
        μP's LR ratio).
    """

    width: int = 256
    init_std: float = 0.02
    emb_lr_scaling: bool = False
    base_width: int = 256

    name = "sp"

    @property
    def emb_lr_factor(self) -> float:
        """The embedding's C: width/base_width with ``emb_lr_scaling``, else 1."""
        return self.width / self.base_width if self.emb_lr_scaling else 1.0

    def base_abc(self, meta: ParamMeta) -> ABC:
        b = 0.0 if meta.role == BIAS else (1.0 if meta.role == NORM else self.init_std)
        c = self.emb_lr_factor if meta.role == EMBEDDING else 1.0
        return ABC(1.0, b, c)


@dataclasses.dataclass(frozen=True)
class MuP(Parametrization):
    """μP for Adam with base shapes (Tensor Programs V; u-μP paper §2.3, spec §2.3).

    With width multiplier m = width/base_width (every hidden fan-in grows ∝ width, which
    ``ModelConfig`` enforces for μP by requiring num_heads·head_dim = width):
    embedding A=α_emb, B=σ_init, C=η̂_emb; hidden A=1, B=σ_init·√(1/m), C=1/m; output
    A=α_output/m, B=σ_init, C=1; attention logits α_attn/d_head.  At the base width (m = 1)
    every weight's (A, B, C) is SP's times μP's multipliers, but μP is still not SP there: its
    attention logits are scaled by α_attn/d_head where SP uses 1/√d_head, so with d_head = 64
    and α_attn = 1 they are 8× smaller than SP's.

    Attributes:
      width: the model's width d (set from the model config).
      base_width: d₀, the width at which μP's weights match SP's (m = 1).
      init_std: σ_init (SP's weight std at the base width).
      emb_mult: α_emb.  attn_mult: α_attn.  output_mult: α_output.  emb_lr_mult: η̂_emb.
    """

    width: int = 256
    base_width: int = 256
    init_std: float = 0.02
    emb_mult: float = 1.0
    attn_mult: float = 1.0
    output_mult: float = 1.0
    emb_lr_mult: float = 1.0

    name = "mup"

    @property
    def width_mult(self) -> float:
        return self.width / self.base_width

    def base_abc(self, meta: ParamMeta) -> ABC:
        m = self.width_mult
        if meta.role == EMBEDDING:
            return ABC(self.emb_mult, self.init_std, self.emb_lr_mult)
        if meta.role == HIDDEN:
            return ABC(1.0, self.init_std * m**-0.5, 1.0 / m)
        if meta.role == OUTPUT:
            return ABC(self.output_mult / m, self.init_std, 1.0)
        return ABC(1.0, 0.0 if meta.role == BIAS else 1.0, 1.0)

    def attention_logit_scale(self, head_dim: int) -> float:
        return self.attn_mult / head_dim


@dataclasses.dataclass(frozen=True)
class UMuP(Parametrization):
    """u-μP (spec §2.4, §5, §6.1): unit-scaled ops, unit init, no base shapes.

    A: embedding 1, hidden 1/√fan_in, output 1/fan_in (applied as unit-scaled op scales).
    B: 1 for every weight.  C: embedding 1/√d_model, hidden 1/√fan_in, output 1, bias/norm 1;
    times 1/√L inside the residual stack.

    Attributes (all default 1, spec §6.1):
      attn_mult: α_attn, logits (α_attn/d_head)·q·kᵀ.
      ffn_act_mult: α_ffn-act, the SwiGLU temperature σ(α·gate).
      residual_mult: α_res, the branches' contribution relative to the embedding.
      residual_attn_ratio: α_res-attn-ratio, attention relative to FFN contribution.
      loss_softmax_mult: α_loss-softmax, the temperature of the loss softmax.
    """

    attn_mult: float = 1.0
    ffn_act_mult: float = 1.0
    residual_mult: float = 1.0
    residual_attn_ratio: float = 1.0
    loss_softmax_mult: float = 1.0

    name = "umup"
    unit_scaled = True

    def base_abc(self, meta: ParamMeta) -> ABC:
        d = depth_lr_factor(meta)
        if meta.role == EMBEDDING:
            return ABC(1.0, 1.0, meta.fan_in**-0.5)
        if meta.role == HIDDEN:
            return ABC(meta.fan_in**-0.5, 1.0, d * meta.fan_in**-0.5)
        if meta.role == OUTPUT:
            return ABC(1.0 / meta.fan_in, 1.0, d)
        return ABC(1.0, 0.0 if meta.role == BIAS else 1.0, d)

    def _shifted(self, w, meta: ParamMeta):
        theta = dict(self.shift).get(meta.role)
        return w if theta is None else w * theta

    def linear(self, x, w, meta: ParamMeta, bias=None, constrained: bool = True, dot=None,
               tokens: Optional[int] = None):
        constraint = "to_output_scale" if constrained else None
        return ops.linear(x, self._shifted(w, meta), bias, constraint=constraint, dot=dot,
                          tokens=tokens)

    def readout(self, x, w, meta: ParamMeta, dot=None, tokens: Optional[int] = None):
        return ops.linear_readout(x, self._shifted(w, meta), dot=dot, tokens=tokens)

    def embed(self, table, ids, meta: ParamMeta, tokens: Optional[int] = None):
        return ops.embedding(self._shifted(table, meta), ids, tokens=tokens)

    def attention(self, q, k, v, causal: bool = True, seq_len: Optional[int] = None,
                  impl: str = "xla"):
        return ops.scaled_dot_product_attention(q, k, v, mult=self.attn_mult, causal=causal,
                                                seq_len=seq_len, impl=impl)

    def ffn_activation(self, up, gate):
        return ops.silu_glu(up, gate, mult=self.ffn_act_mult)

    def residual_taus(self, num_layers: int) -> list[float]:
        return residual_taus(num_layers, self.residual_mult, self.residual_attn_ratio)

    def loss_sum(self, logits, targets):
        return ops.cross_entropy(logits, targets, mult=self.loss_softmax_mult, reduction="sum")

    def loss_from_sum(self, total, num_tokens: int):
        """``scale_fwd(total, 1/N)``: the mean in the forward pass only (spec §5.14)."""
        return ops.scale_fwd(total, 1.0 / num_tokens)

    def grad_accumulation_weight(self, num_micro_batches: int) -> float:
        """1: u-μP's mean loss scales only its forward by 1/N (spec §5.14), so its backward,
        and every gradient, is a sum over tokens; with the full step's token count in the
        weight-gradient scales (``tokens=`` of the ops) the micro-batch gradients simply add
        up to the full batch's."""
        return 1.0

    def attention_logit_scale(self, head_dim: int) -> float:
        return self.attn_mult / head_dim

    def attention_output_scale(self, seq_len: int, head_dim: int) -> float:
        return ops.attention_scale(seq_len, head_dim, self.attn_mult, causal=True)

    def ffn_activation_mults(self) -> tuple[float, float]:
        return self.ffn_act_mult, ops.silu_glu_scale(self.ffn_act_mult)

    def loss_logit_mult(self) -> float:
        return self.loss_softmax_mult


_CLASSES = {"sp": SP, "mup": MuP, "umup": UMuP}


def make_parametrization(
    name: str, width: int, hparams: Optional[Mapping[str, Any]] = None
) -> Parametrization:
    """Builds the rule ``name`` (``sp | mup | umup``) for a model of the given width.

    ``hparams`` holds the rule's HPs (see :class:`SP`, :class:`MuP`, :class:`UMuP`);
    an unknown key or a value ≤ 0 raises ``ValueError`` naming it.
    """
    if name not in _CLASSES:
        raise ValueError(f"parametrization={name!r} is invalid: allowed are {PARAMETRIZATIONS}")
    cls = _CLASSES[name]
    hparams = dict(hparams or {})
    allowed = sorted(f.name for f in dataclasses.fields(cls) if f.name != "width")
    unknown = sorted(set(hparams) - set(allowed))
    if unknown:
        raise ValueError(
            f"hparams {unknown} are invalid for parametrization={name!r}: allowed are {allowed}"
        )
    if any(f.name == "width" for f in dataclasses.fields(cls)):  # rules with a width rule
        hparams["width"] = width
    return cls(**hparams)


def hparam_names(name: str) -> Sequence[str]:
    """The HP fields of parametrization ``name`` (for configs and sweeps)."""
    if name not in _CLASSES:
        raise ValueError(f"parametrization={name!r} is invalid: allowed are {PARAMETRIZATIONS}")
    return tuple(f.name for f in dataclasses.fields(_CLASSES[name]) if f.name != "width")
