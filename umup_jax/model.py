"""A Llama-style decoder in Flax Linen, parametrized by SP, μP or u-μP (spec §4.3, §5.16).

Architecture (u-μP paper Table 5): pre-norm blocks with non-trainable RMSNorm (no gains),
fused-QKV multi-head causal attention with RoPE (or none), SwiGLU FFN, untied embedding and
readout, no biases.  For u-μP each block is wired with the residual split/add of spec §4.1:

    (r, s) = split(x, τ_attn); r = Attn(RMSNorm(r)); x = add(r, s, τ_attn)
    (r, s) = split(x, τ_ffn);  r = FFN(RMSNorm(r));  x = add(r, s, τ_ffn)

with τ from :func:`umup_jax.parametrization.residual_taus`; SP and μP use ``x + f(x)``.

Every parameter is declared with a :class:`~umup_jax.parametrization.ParamMeta` box (role,
fan-in, fan-out, depth, logical axis names); the parametrization rule supplies the init and the
ops.  Activations are recorded with ``sow`` in the ``intermediates`` collection when it is
mutable (coordinate checks, tests, metrics).

Scale options (they compute the same function):

* ``scan_layers``: the L blocks are one ``nn.scan`` over a single :class:`Block` whose params
  are stacked on a leading ``layers`` axis (``params/layers/<name>`` of shape (L, …)), so the
  compile time does not grow with L.  ``nn.scan`` adds the logical axis name ``layers`` to each
  :class:`~umup_jax.parametrization.ParamMeta` box and keeps its role, fan-in, fan-out and
  depth, so the rule, the optimizer's learning rates and the shardings read the same metadata.
  u-μP's per-layer τ becomes a scanned array of residual weights
  (:func:`residual_weight_table`; :func:`umup_jax.ops.residual_split_weighted`).  Sown
  activations and FP8 probes are stacked the same way; :mod:`umup_jax.layer_stack` converts
  any such tree (params, optimizer state, activations) between the two layouts.
* ``remat``: ``none`` (default), ``full`` (each block keeps only its input and recomputes the
  rest in the backward pass) or ``dots_saveable`` (keeps the matmul outputs, recomputes the
  elementwise ops): ``nn.remat`` with ``jax.checkpoint_policies``.
* ``attention_impl``: ``xla | cudnn | auto``, the kernel of :func:`umup_jax.ops.attention_core`.
* ``loss_chunks``: c > 1 computes the readout and the loss (:meth:`Decoder.loss`) over c
  chunks of the sequence, one after another, each chunk's gradients computed with its loss
  (:mod:`umup_jax.loss_chunks`), so that only a (B, S/c, V) block of logits exists at a time
  instead of the full (B, S, V) fp32 logits, their softmax and their gradient (at the proxy's
  16384 tokens × 32000 vocabulary, 2 GiB each), with no recomputation.  Loss and gradients are
  the unchunked ones up to the order of summation; u-μP's readout weight-gradient scale uses
  the token count of the whole call (or ``grad_tokens``), not the chunk's.  Traced inside the
  trainer's :func:`~umup_jax.sharding.activation_mesh` on a mesh that splits the batch, its
  backward sums each batch replica's readout gradient apart and reduces them once, the
  readout weight gathered once (:func:`~umup_jax.sharding.batch_replicas`): no collective
  per chunk.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from umup_jax import fp8 as fp8_lib
from umup_jax import loss_chunks as loss_chunks_lib
from umup_jax import ops
from umup_jax import parametrization as P
from umup_jax import sharding as sharding_lib

POSITIONS = ("rope", "none")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
REMAT_POLICIES = ("none", "full", "dots_saveable")
LAYERS_AXIS = "layers"


def _frozen_pairs(mapping: Any) -> tuple:
    """``mapping`` (a dict or ``(key, value)`` pairs) as sorted pairs, nested mappings too.

    The config is a static argument of jitted functions, so it must hash: μP's ``shift``
    hparam, a ``{role: θ}`` dict, becomes ``(("role", θ), …)``, which the rule accepts as is."""
    pairs = mapping.items() if isinstance(mapping, Mapping) else mapping
    return tuple(sorted(
        (key, _frozen_pairs(value) if isinstance(value, Mapping) else value)
        for key, value in pairs))


def _positive_int(field: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{field}={value!r} is invalid: it must be an integer > 0")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and parametrization of the decoder.

    Attributes:
      vocab_size: V.  width: d_model.  depth: L, the number of transformer layers.
      num_heads: H (width must be divisible by it).  head_dim: defaults to width // H.
      ffn_expansion: the SwiGLU hidden size is ffn_expansion·width (u-μP library: 4).
      seq_len: the training sequence length S, the longest input; u-μP's attention scale
        uses this S for every call, whatever its length (spec §5.9).
      position: ``rope`` (default) or ``none`` (NoPE).  rope_theta: RoPE base.
      parametrization: ``sp | mup | umup``.  hparams: that rule's HPs (a mapping).
      dtype: compute dtype ``float32 | bfloat16``; params stay fp32.  The readout matmul
        runs in the compute dtype (as under torch autocast in the authors' library) and
        its logits are cast to fp32, where the softmax cross-entropy and the loss are.
        The embedding rows are gathered from the fp32 table and then cast, so that its
        gradient sums a token's cotangents in fp32 (:func:`embed_tokens`).
      residual_dtype: the residual stream's dtype, ``float32`` (default) or ``bfloat16``
        (only with ``dtype="bfloat16"``): the embedding rows, every residual add and its
        gradient, the scanned carry.  Each branch's RMSNorm takes the stream and returns the
        compute dtype, the matmuls' input; the branch's output is added to the stream in
        fp32 with the residual weights exact (u-μP's a, b as fp32, not rounded to the
        compute dtype).  ``float32`` is the authors' library under torch autocast, where
        the embedding and the adds are not autocast ops and a bf16 branch plus an fp32 skip
        is fp32; a bf16 stream rounds it at every add (logits error from fp32 at depth 16,
        width 64: 1.15% against 0.77%, tests/test_model.py), for half the stream's memory.
      norm_eps: RMSNorm ε.
      fp8: FP8 policy: a preset (``none | paper_simple | paper_large``) or a mapping from
        matmul groups (``qkv, attn_out, ffn_in, ffn_down, readout``) to modes
        (``bf16 | fp8 | fp8_e5m2_input | fp8_dynamic``); see :mod:`umup_jax.fp8`.
      scan_layers: stack the blocks under ``nn.scan`` (params under ``layers`` with a leading
        L axis) instead of a Python loop (``layer_0`` … ``layer_{L-1}``).
      remat: ``none | full | dots_saveable``, the rematerialisation policy of each block.
      attention_impl: ``xla | cudnn | auto``, the attention kernel
        (:func:`umup_jax.ops.resolve_attention_impl`).
      loss_chunks: c ≥ 1 dividing ``seq_len``: the readout and loss of :meth:`Decoder.loss`
        over c sequence chunks, one at a time (see the module docstring).
    """

    vocab_size: int = 256
    width: int = 256
    depth: int = 4
    num_heads: int = 4
    head_dim: Optional[int] = None
    ffn_expansion: float = 4
    seq_len: int = 256
    position: str = "rope"
    rope_theta: float = 10000.0
    parametrization: str = "umup"
    hparams: Any = ()
    dtype: str = "float32"
    residual_dtype: str = "float32"
    norm_eps: float = 1e-5
    fp8: Any = "none"
    scan_layers: bool = False
    remat: str = "none"
    attention_impl: str = "auto"
    loss_chunks: int = 1

    def __post_init__(self) -> None:
        policy = self.fp8 if isinstance(self.fp8, str) else tuple(sorted(dict(self.fp8).items()))
        object.__setattr__(self, "fp8", policy)
        fp8_lib.resolve_policy(policy if isinstance(policy, str) else dict(policy))
        object.__setattr__(self, "hparams", _frozen_pairs(self.hparams))
        for field in ("vocab_size", "width", "depth", "num_heads", "seq_len"):
            _positive_int(field, getattr(self, field))
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size={self.vocab_size} is invalid: it must be >= 2")
        if self.width % self.num_heads:
            raise ValueError(
                f"width={self.width} is invalid: it must be divisible by "
                f"num_heads={self.num_heads}"
            )
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.width // self.num_heads)
        _positive_int("head_dim", self.head_dim)
        if not (isinstance(self.ffn_expansion, (int, float)) and self.ffn_expansion > 0):
            raise ValueError(f"ffn_expansion={self.ffn_expansion!r} is invalid: it must be > 0")
        hidden = self.ffn_expansion * self.width
        if abs(hidden - round(hidden)) > 1e-9 or round(hidden) < 1:
            raise ValueError(
                f"ffn_expansion={self.ffn_expansion} is invalid: ffn_expansion·width "
                f"({hidden}) must be a positive integer"
            )
        if self.position not in POSITIONS:
            raise ValueError(f"position={self.position!r} is invalid: allowed are {POSITIONS}")
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} is invalid: RoPE needs an even head_dim")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta={self.rope_theta!r} is invalid: it must be > 0")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is invalid: allowed are {tuple(DTYPES)}")
        if self.residual_dtype not in DTYPES:
            raise ValueError(f"residual_dtype={self.residual_dtype!r} is invalid: allowed are "
                             f"{tuple(DTYPES)}")
        if self.residual_dtype == "bfloat16" and self.dtype != "bfloat16":
            raise ValueError(f"residual_dtype='bfloat16' with dtype={self.dtype!r} is refused: "
                             "a bfloat16 residual stream is for bfloat16 compute")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps={self.norm_eps!r} is invalid: it must be > 0")
        if not isinstance(self.scan_layers, bool):
            raise ValueError(f"scan_layers={self.scan_layers!r} is invalid: it must be True or "
                             "False")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r} is invalid: allowed are {REMAT_POLICIES}")
        if self.attention_impl not in ops.ATTENTION_IMPLS:
            raise ValueError(f"attention_impl={self.attention_impl!r} is invalid: allowed are "
                             f"{ops.ATTENTION_IMPLS}")
        _positive_int("loss_chunks", self.loss_chunks)
        if self.seq_len % self.loss_chunks:
            raise ValueError(f"loss_chunks={self.loss_chunks} is invalid: it must divide "
                             f"seq_len={self.seq_len}")
        if self.loss_chunks > 1 and self.fp8_policy["readout"] == "fp8_dynamic":
            raise ValueError(
                f"loss_chunks={self.loss_chunks} with the readout in fp8_dynamic is refused: "
                "its input scale is the RMS of the whole readout input, which a chunk does not "
                "see (use loss_chunks=1, or another FP8 mode for the readout)")
        self.rule  # validates parametrization and hparams
        if self.parametrization == "umup" and self.seq_len < 2:
            raise ValueError(
                f"seq_len={self.seq_len} is invalid for parametrization='umup': its causal "
                "attention scale 1/logint(α, √(ln S/S), 1) needs S >= 2 (spec §5.9)")
        if self.parametrization == "mup" and self.attn_dim != self.width:
            # μP's hidden rule (spec §2.3) is B = σ·√(base_fan_in/fan_in), C = base_fan_in/
            # fan_in, which the rule applies as m = width/base_width for every hidden weight.
            # The attention output's fan-in is num_heads·head_dim: with it ≠ width nothing says
            # how it scales with width (fixed heads of a fixed size do not), so the LR and init
            # of that weight would silently follow m.  u-μP's rule uses each fan-in itself.
            raise ValueError(
                f"head_dim={self.head_dim} with num_heads={self.num_heads} is refused for "
                f"parametrization='mup': num_heads·head_dim = {self.attn_dim} must equal "
                f"width={self.width}, because μP's hidden rule scales every hidden fan-in by "
                "width/base_width (leave head_dim unset, or use parametrization='umup', whose "
                "rule reads each weight's own fan-in)")

    @functools.cached_property
    def rule(self) -> P.Parametrization:
        return P.make_parametrization(self.parametrization, self.width, dict(self.hparams))

    @property
    def fp8_policy(self) -> dict[str, str]:
        return fp8_lib.resolve_policy(self.fp8 if isinstance(self.fp8, str) else dict(self.fp8))

    @property
    def ffn_hidden(self) -> int:
        return int(round(self.ffn_expansion * self.width))

    @property
    def attn_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def stream_dtype(self):
        """The residual stream's dtype (``residual_dtype``)."""
        return DTYPES[self.residual_dtype]

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def declare(
    module: nn.Module,
    name: str,
    shape: tuple[int, ...],
    *,
    role: str,
    fan_in: int,
    fan_out: int,
    names: tuple[Optional[str], ...],
    depth: Optional[int],
    rule: P.Parametrization,
):
    """Declares a parameter with its metadata box; returns (unboxed value, metadata)."""
    meta = P.ParamMeta(
        value=None, names=names, role=role, fan_in=fan_in, fan_out=fan_out, depth=depth
    )
    init = rule.initializer(meta)

    def boxed_init(key, shape):
        return meta.replace_boxed(init(key, shape, jnp.float32))

    return module.param(name, boxed_init, shape), meta


PARAM_GROUPS = {"attn_qkv": "qkv", "attn_out": "attn_out", "ffn_up": "ffn_in",
                "ffn_gate": "ffn_in", "ffn_down": "ffn_down", "readout": "readout"}
PROBES = "fp8_probe"


def linear_for(module: nn.Module, cfg: "ModelConfig", name: str, linear, *args, **kwargs):
    """``linear(*args, dot=…, **kwargs)`` for parameter ``name`` under the FP8 policy, inside a
    named scope (``fp8_<group>``) so the lowered HLO shows which group each matmul belongs to.
    A ``bf16`` group passes ``dot=None`` (the rule's own, fused matmul); an FP8 group passes
    :func:`umup_jax.fp8.fp8_dot`, which reports its cast statistics if the ``fp8_probe``
    collection holds a probe for ``name``."""
    with jax.named_scope(f"fp8_{PARAM_GROUPS[name]}"):
        return linear(*args, dot=dot_for(cfg, name, probe_for(module, name)), **kwargs)


def probe_for(module: nn.Module, name: str):
    """The FP8 probe of parameter ``name`` in ``module``'s ``fp8_probe`` collection, or
    ``None``."""
    return module.get_variable(PROBES, name) if module.has_variable(PROBES, name) else None


def dot_for(cfg: "ModelConfig", name: str, probe=None):
    """The ``dot`` of parameter ``name``'s matmul under the FP8 policy: ``None`` for a
    ``bf16`` group, else :func:`umup_jax.fp8.fp8_dot` in the group's mode with ``probe``."""
    mode = cfg.fp8_policy[PARAM_GROUPS[name]]
    return None if mode == "bf16" else functools.partial(fp8_lib.fp8_dot, mode=mode, probe=probe)


def fp8_probes(cfg: "ModelConfig") -> dict:
    """zeros(6) for every linear under an FP8 mode, in the ``fp8_probe`` collection layout;
    the gradient of the loss w.r.t. them is their cast statistics (:data:`fp8.STAT_NAMES`).
    With ``scan_layers`` the blocks' probes are stacked: ``layers/<name>`` of shape (L, 6)."""
    policy = cfg.fp8_policy
    zeros = lambda *lead: jnp.zeros((*lead, len(fp8_lib.STAT_NAMES)), jnp.float32)
    names = [n for n in ("attn_qkv", "attn_out", "ffn_up", "ffn_gate", "ffn_down")
             if policy[PARAM_GROUPS[n]] != "bf16"]
    out: dict = {}
    if names and cfg.scan_layers:
        out[LAYERS_AXIS] = {n: zeros(cfg.depth) for n in names}
    elif names:
        for i in range(cfg.depth):
            out[f"layer_{i}"] = {n: zeros() for n in names}
    if policy["readout"] != "bf16":
        out["readout"] = zeros()
    return out


def embed_tokens(rule, table, ids, meta, dtype, grad_tokens: Optional[int] = None):
    """The rule's embedding lookup (spec §5.3 for u-μP) on the stored table, then the rows cast
    to ``dtype`` (the residual stream's).  Gathering first and casting after gives the same
    values as gathering from a cast table, but the backward then casts each token's cotangent
    to the table's fp32 before the scatter-add that sums the cotangents of every occurrence of
    a token: a frequent token's row adds thousands of them, and in bf16 that sum keeps 8
    significant bits.  As under torch autocast in the authors' library, where the embedding
    runs in the weight's fp32."""
    return rule.embed(table, ids, meta, tokens=grad_tokens).astype(dtype)


def rope_tables(seq_len: int, head_dim: int, theta: float):
    """cos/sin tables (S, head_dim/2) as numpy constants (static shapes)."""
    half = head_dim // 2
    inv_freq = theta ** (-np.arange(half, dtype=np.float64) / half)
    angles = np.arange(seq_len, dtype=np.float64)[:, None] * inv_freq[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x, theta: float):
    """Rotary position embedding on (B, S, H, D) (rotate-half form); a rotation, so RMS is
    unchanged and u-μP applies no scale (spec §5.10)."""
    seq_len, head_dim = x.shape[1], x.shape[3]
    cos, sin = rope_tables(seq_len, head_dim, theta)
    cos = jnp.asarray(cos, x.dtype)[None, :, None, :]
    sin = jnp.asarray(sin, x.dtype)[None, :, None, :]
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def residual(x, branch, tau: Optional[float] = None, weights=None):
    """x + f(x) (no τ, no weights), or u-μP's split → f → add (spec §4.1) with branch weight
    τ as a Python float, or with ``weights``, the traced row (a, b, b − 1) of a scanned layer
    (the same arithmetic, :func:`umup_jax.ops.residual_split_weighted`).  The result has x's
    dtype, the stream's, whatever the branch returns."""
    if weights is not None:
        r, s = ops.residual_split_weighted(x, weights)
        return ops.residual_add_weighted(branch(r), s, weights)
    if tau is None:
        return x + branch(x).astype(x.dtype)
    r, s = ops.residual_split(x, tau)
    return ops.residual_add(branch(r), s, tau)


def residual_weight_table(cfg: "ModelConfig") -> Optional[np.ndarray]:
    """u-μP's residual weights per layer for a scanned stack: an (L, 2, 3) fp32 array
    holding (a, b, b − 1) of the attention (``[:, 0]``) and FFN (``[:, 1]``)
    branch of each layer (:func:`umup_jax.ops.residual_weight_row` of τ_2i, τ_2i+1); ``None``
    for the plain ``x + f(x)`` residual of SP and μP."""
    taus = cfg.rule.residual_taus(cfg.depth)
    if taus is None:
        return None
    rows = np.asarray([ops.residual_weight_row(t) for t in taus], np.float64)
    return rows.reshape(cfg.depth, 2, 3).astype(np.float32)


class Block(nn.Module):
    """One pre-norm transformer layer: attention then SwiGLU FFN.

    Attributes:
      config: the model.
      index: the layer's index i (its τ_2i, τ_2i+1 come from the rule), or ``None`` in a
        scanned stack, where the residual weights come in as the scanned input.
      scanned: the call returns ``(x, None)`` (the carry and output of ``nn.scan``).
      grad_tokens: the token count of u-μP's weight-gradient scales (``None``: each call's).
    """

    config: ModelConfig
    index: Optional[int] = None
    scanned: bool = False
    grad_tokens: Optional[int] = None

    @nn.compact
    def __call__(self, x, residual_weights=None):
        cfg = self.config
        rule = cfg.rule
        dt = cfg.compute_dtype
        d, h, hd, f, L = cfg.width, cfg.num_heads, cfg.head_dim, cfg.ffn_hidden, cfg.depth
        tokens = self.grad_tokens
        hidden = functools.partial(declare, self, role=P.HIDDEN, depth=L, rule=rule)
        w_qkv, m_qkv = hidden(
            "attn_qkv", (d, 3, h, hd), fan_in=d, fan_out=3 * h * hd,
            names=("embed", "qkv", "heads", "head_dim"),
        )
        w_o, m_o = hidden(
            "attn_out", (h, hd, d), fan_in=h * hd, fan_out=d,
            names=("heads", "head_dim", "embed"),
        )
        w_up, m_up = hidden("ffn_up", (d, f), fan_in=d, fan_out=f, names=("embed", "mlp"))
        w_gate, m_gate = hidden("ffn_gate", (d, f), fan_in=d, fan_out=f, names=("embed", "mlp"))
        w_down, m_down = hidden("ffn_down", (f, d), fan_in=f, fan_out=d, names=("mlp", "embed"))
        taus = rule.residual_taus(L)
        tau_attn = tau_ffn = w_attn = w_ffn = None
        if residual_weights is not None:
            w_attn, w_ffn = residual_weights[0], residual_weights[1]
        elif taus is not None:
            if self.index is None:
                raise ValueError("a u-μP Block needs its layer index or its residual weights")
            tau_attn, tau_ffn = taus[2 * self.index : 2 * self.index + 2]

        def attention(r):
            b, s, _ = r.shape
            r = ops.rms_norm(r, cfg.norm_eps, dtype=dt)
            qkv = linear_for(self, cfg, "attn_qkv", rule.linear,
                             r, w_qkv.astype(dt).reshape(d, 3 * h * hd), m_qkv, tokens=tokens)
            qkv = qkv.reshape(b, s, 3, h, hd)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
            if cfg.position == "rope":
                q, k = apply_rope(q, cfg.rope_theta), apply_rope(k, cfg.rope_theta)
            o = rule.attention(q, k, v, causal=True, seq_len=cfg.seq_len,
                               impl=cfg.attention_impl)
            o = linear_for(self, cfg, "attn_out", rule.linear,
                           o.reshape(b, s, h * hd), w_o.astype(dt).reshape(h * hd, d), m_o,
                           tokens=tokens)
            self.sow("intermediates", "attn_branch", o)
            return o

        def ffn(r):
            r = ops.rms_norm(r, cfg.norm_eps, dtype=dt)
            self.sow("intermediates", "ffn_norm", r)
            # Unconstrained, as uu.MLP: the up/gate and down mismatches cancel (spec §1.2).
            up = linear_for(self, cfg, "ffn_up", rule.linear,
                            r, w_up.astype(dt), m_up, constrained=False, tokens=tokens)
            gate = linear_for(self, cfg, "ffn_gate", rule.linear,
                              r, w_gate.astype(dt), m_gate, constrained=False, tokens=tokens)
            # down(a(up, gate)) with a recomputed in the backward: the block keeps up and gate
            # (for the activation's gradient) but not a, one (B, S, F) array fewer.
            def down(a, w, probe):
                with jax.named_scope(f"fp8_{PARAM_GROUPS['ffn_down']}"):
                    return rule.linear(a, w, m_down, constrained=False, tokens=tokens,
                                       dot=dot_for(cfg, "ffn_down", probe))

            o = ops.recompute_middle(rule.ffn_activation, down, (up, gate),
                                     (w_down.astype(dt), probe_for(self, "ffn_down")))
            self.sow("intermediates", "ffn_branch", o)
            return o

        x = residual(x, attention, tau_attn, w_attn)
        x = residual(x, ffn, tau_ffn, w_ffn)
        x = sharding_lib.constrain_batch(x)
        self.sow("intermediates", "output", x)
        return (x, None) if self.scanned else x


def _remat_policy(name: str):
    return {"full": None, "dots_saveable": jax.checkpoint_policies.dots_saveable}[name]


def block_stack(cfg: ModelConfig, grad_tokens: Optional[int] = None):
    """``fn(x) → x`` applying the L blocks as ``cfg`` says (loop or scan, remat policy); call
    it inside a compact module (the blocks become its children ``layer_i`` or ``layers``)."""
    block = Block
    if cfg.remat != "none":
        # Under scan, CSE across iterations is impossible anyway; outside it must be prevented.
        block = nn.remat(block, policy=_remat_policy(cfg.remat),
                         prevent_cse=not cfg.scan_layers)
    if not cfg.scan_layers:
        def loop(x):
            for i in range(cfg.depth):
                x = block(cfg, i, grad_tokens=grad_tokens, name=f"layer_{i}")(x)
            return x

        return loop
    stack = nn.scan(
        block,
        # Params, sown activations and FP8 probes: one slice per layer on a leading axis.
        variable_axes={"params": 0, "intermediates": 0, PROBES: 0},
        split_rngs={"params": True},
        in_axes=0,
        length=cfg.depth,
        metadata_params={nn.PARTITION_NAME: LAYERS_AXIS},
    )
    table = residual_weight_table(cfg)

    def scanned(x):
        weights = None if table is None else jnp.asarray(table)
        x, _ = stack(cfg, None, True, grad_tokens, name=LAYERS_AXIS)(x, weights)
        return x

    return scanned


class Decoder(nn.Module):
    """The decoder: tokens (B, S) int → logits (B, S, V) fp32.

    ``grad_tokens``: the token count u-μP's weight-gradient scales use (``None``: the tokens of
    the call).  A train step with gradient accumulation sets it to the tokens of the whole
    optimizer step, so that its micro-batch gradients add up to the full batch's.
    """

    config: ModelConfig
    grad_tokens: Optional[int] = None

    @nn.compact
    def __call__(self, tokens, targets=None):
        """Logits (B, S, V) fp32; with ``targets`` the loss of :meth:`loss` instead."""
        cfg = self.config
        rule = cfg.rule
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be (batch, seq), got shape {tokens.shape}")
        if tokens.shape[1] > cfg.seq_len:
            raise ValueError(f"sequence length {tokens.shape[1]} > seq_len={cfg.seq_len}")
        d, v = cfg.width, cfg.vocab_size
        table, m_emb = declare(
            self, "embedding", (v, d), role=P.EMBEDDING, fan_in=d, fan_out=v,
            names=("vocab", "embed"), depth=None, rule=rule,
        )
        w_out, m_out = declare(
            self, "readout", (d, v), role=P.OUTPUT, fan_in=d, fan_out=v,
            names=("embed", "vocab"), depth=None, rule=rule,
        )
        # Under a mesh (sharding.activation_mesh), the stream is split over the batch: see
        # umup_jax.sharding.constrain_batch.
        x = embed_tokens(rule, table, tokens, m_emb, cfg.stream_dtype, self.grad_tokens)
        x = sharding_lib.constrain_batch(x)
        self.sow("intermediates", "embedding", x)
        x = block_stack(cfg, self.grad_tokens)(x)
        x = sharding_lib.constrain_batch(ops.rms_norm(x, cfg.norm_eps, dtype=cfg.compute_dtype))
        self.sow("intermediates", "final_norm", x)
        w_out = w_out.astype(cfg.compute_dtype)
        if targets is not None and cfg.loss_chunks > 1:
            return self._chunked_loss(x, w_out, m_out, targets)
        logits = linear_for(self, cfg, "readout", rule.readout, x, w_out, m_out,
                            tokens=self.grad_tokens).astype(jnp.float32)
        self.sow("intermediates", "logits", logits)
        return logits if targets is None else rule.loss(logits, targets)

    def _chunked_loss(self, x, w_out, m_out, targets):
        """:meth:`loss` over ``loss_chunks`` sequence chunks, readout and loss fused with their
        backward (:func:`umup_jax.loss_chunks.chunked_readout_loss`).  The sown ``logits`` is
        their RMS as a scalar (what the metrics read of it), not the logits."""
        cfg, rule = self.config, self.config.rule
        b, s = targets.shape
        tokens = self.grad_tokens if self.grad_tokens is not None else b * s
        probe = self.get_variable(PROBES, "readout") if self.has_variable(PROBES, "readout") \
            else None

        def readout(xc, w, pc):
            with jax.named_scope(f"fp8_{PARAM_GROUPS['readout']}"):
                return rule.readout(xc, w, m_out, dot=dot_for(cfg, "readout", pc),
                                    tokens=tokens)

        replicas = sharding_lib.batch_replicas()
        loss, logits_rms = loss_chunks_lib.chunked_readout_loss(
            x, w_out, targets, probe, chunks=cfg.loss_chunks, readout=readout,
            loss_sum=rule.loss_sum, loss_from_sum=rule.loss_from_sum, replicas=replicas,
            gathered_w=None if replicas is None else sharding_lib.gathered_over(
                replicas[0], ("embed", "vocab"), replicas[1]))
        self.sow("intermediates", "logits", logits_rms)
        return loss

    def loss(self, tokens, targets):
        """The parametrization's mean cross-entropy of next-token ``targets`` (fp32)."""
        return self(tokens, targets)


def init_params(model: Decoder, key, batch_size: int = 1):
    """Boxed params (``{'params': …}`` with :class:`ParamMeta` leaves) for ``model``.

    Jitted: flax's ``init`` runs the whole forward pass to create the params, and XLA drops it
    because only the params leave; run eagerly it executes op by op, compiling each op (the
    tests' width-64 decoder on 2 CPU cores, first call: 4.2-4.7 s eager, 2.8 s jitted with its
    compile).  One compile per model and batch size: the model is a static argument, which
    :class:`ModelConfig` makes hashable by freezing its mappings."""
    return _init_params_cached(model, key, batch_size)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init_params_cached(model: Decoder, key, batch_size: int):
    tokens = jnp.zeros((batch_size, model.config.seq_len), jnp.int32)
    return {"params": model.init(key, tokens)["params"]}


def abstract_params(model: Decoder):
    """The boxed param tree as shapes only (no compute): ``jax.eval_shape`` of init."""
    return jax.eval_shape(functools.partial(init_params, model), jax.random.key(0))
