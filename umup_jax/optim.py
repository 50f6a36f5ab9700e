"""AdamW with per-parameter abc learning rates and independent weight decay (spec §7).

For parameter p with LR multiplier c_p (from the parametrization rule and p's metadata), global
learning rate η, weight decay λ and schedule multiplier s_t, one step is

    m ← β₁m + (1−β₁)g;  v ← β₂v + (1−β₂)g²;  m̂ = m/(1−β₁ᵗ);  v̂ = v/(1−β₂ᵗ)
    Δp = −s_t · (η · c_p · m̂/(√v̂ + ε) + λ · p)

which is torch's AdamW with per-parameter lr_p = η·c_p and weight decay λ/lr_p, as the authors'
``unit_scaling.optim.AdamW(independent_weight_decay=True)`` builds it: the decay's size does not
depend on η or c_p but still follows the schedule (u-μP paper §4.1, Wortsman et al. 2024).

The schedule is the paper's (Table 5): linear warm-up to the peak over ``warmup_steps``, then a
cosine decay to ``final_lr_fraction`` (10%) of the peak at ``total_steps``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from umup_jax import parametrization as P

SCHEDULES = ("cosine", "constant")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW settings.

    Attributes:
      learning_rate: the global η (u-μP's default 1; the paper sweeps 2¹–2³ on its proxy).
      b1, b2, eps: Adam's β₁, β₂, ε (paper: 0.9, 0.999, 1e-8).
      weight_decay: λ, independent of η (paper: 2⁻¹³).
      schedule: ``cosine`` (warm-up then cosine to ``final_lr_fraction``) or ``constant``
        (warm-up then flat).
      warmup_steps: linear warm-up length (paper: 2000).
      total_steps: the step at which the cosine reaches its floor (paper: 8192).
      final_lr_fraction: the cosine floor as a fraction of the peak (paper: 0.1).
    """

    learning_rate: float = 1.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 2.0**-13
    schedule: str = "cosine"
    warmup_steps: int = 0
    total_steps: int = 1000
    final_lr_fraction: float = 0.1

    def __post_init__(self) -> None:
        def bad(field, allowed):
            value = getattr(self, field)
            return ValueError(f"{field}={value!r} is invalid: it must be {allowed}")

        if not _is_number(self.learning_rate) or not self.learning_rate > 0:
            raise bad("learning_rate", "a finite number > 0")
        for field in ("b1", "b2"):
            v = getattr(self, field)
            if not _is_number(v) or not 0 <= v < 1:
                raise bad(field, "in [0, 1)")
        if not _is_number(self.eps) or not self.eps > 0:
            raise bad("eps", "a finite number > 0")
        if not _is_number(self.weight_decay) or not self.weight_decay >= 0:
            raise bad("weight_decay", "a finite number >= 0")
        if self.schedule not in SCHEDULES:
            raise bad("schedule", f"one of {SCHEDULES}")
        if not _is_int(self.warmup_steps) or self.warmup_steps < 0:
            raise bad("warmup_steps", "an integer >= 0")
        if not _is_int(self.total_steps) or self.total_steps <= 0:
            raise bad("total_steps", "an integer > 0")
        if not _is_number(self.final_lr_fraction) or not 0 <= self.final_lr_fraction <= 1:
            raise bad("final_lr_fraction", "in [0, 1]")


def _is_number(x: Any) -> bool:
    """A finite Python number (an inf η or ε would only show as a NaN loss at step 1)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def make_schedule(config: OptimizerConfig) -> Callable[[Any], Any]:
    """s_t for step t = 0, 1, …: (t+1)/W during warm-up, then (cosine) f + (1−f)·½(1+cos πq)
    with q = (t−W)/(T−W) clipped to [0, 1], or (constant) 1.  A run no longer than its warm-up
    only ever sees the warm-up ramp."""
    warmup, total, floor = config.warmup_steps, config.total_steps, config.final_lr_fraction
    cosine = config.schedule == "cosine"

    def schedule(count):
        t = jnp.asarray(count, jnp.float32)
        warm = (t + 1.0) / warmup if warmup else jnp.float32(1.0)
        if cosine:
            q = jnp.clip((t - warmup) / max(total - warmup, 1), 0.0, 1.0)
            decay = floor + (1.0 - floor) * 0.5 * (1.0 + jnp.cos(math.pi * q))
        else:
            decay = jnp.float32(1.0)
        return jnp.where(t < warmup, warm, decay)

    return schedule


def lr_multipliers(rule: P.Parametrization, boxed_params: Any) -> Any:
    """The tree of Python-float C_p (from each parameter's declared metadata)."""
    metas = P.param_metadata(boxed_params)
    return jax.tree.map(
        rule.lr_multiplier, metas, is_leaf=lambda x: isinstance(x, P.ParamMeta)
    )


class ScaleByParametrizationState(NamedTuple):
    count: jax.Array


def scale_by_parametrization(
    multipliers: Any,
    learning_rate: float,
    weight_decay: float,
    schedule: Callable[[Any], Any],
) -> optax.GradientTransformation:
    """Turns Adam directions into ``−s_t·(η·c_p·u + λ·p)`` per parameter.

    ``multipliers`` is a tree of Python floats c_p with the params' structure; they are
    constants of the compiled step, never optimizer state.
    """

    def init_fn(params):
        del params
        return ScaleByParametrizationState(count=jnp.zeros([], jnp.int32))

    # A Python 0 drops the decay term at trace time; a traced λ (batched sweeps) keeps it.
    decay = not (isinstance(weight_decay, (int, float)) and weight_decay == 0)

    def update_fn(updates, state, params=None):
        if decay and params is None:
            raise ValueError("weight_decay > 0 needs params passed to the optimizer update")
        s = schedule(state.count)

        def one(u, c, p=None):
            step = (learning_rate * c) * u
            if decay:
                step = step + weight_decay * p
            return (-s * step).astype(u.dtype)

        if params is None:
            new = jax.tree.map(one, updates, multipliers)
        else:
            new = jax.tree.map(one, updates, multipliers, params)
        return new, ScaleByParametrizationState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(
    config: OptimizerConfig,
    boxed_params: Any,
    rule: P.Parametrization,
    learning_rate: Any = None,
    weight_decay: Any = None,
) -> optax.GradientTransformation:
    """AdamW with the rule's per-parameter LRs for the declared (boxed) params.

    ``boxed_params`` may be the real init output or its ``jax.eval_shape``; a parameter that
    lacks :class:`~umup_jax.parametrization.ParamMeta` raises ``ValueError`` naming its path.
    The returned transformation is applied to *unboxed* params and grads.  ``learning_rate``
    and ``weight_decay`` optionally replace the config's η and λ with (possibly traced) values,
    which the batched sweep runner vmaps over.
    """
    if not isinstance(config, OptimizerConfig):
        raise ValueError(f"config must be an OptimizerConfig, got {type(config).__name__}")
    multipliers = lr_multipliers(rule, boxed_params)
    return optax.chain(
        optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps),
        scale_by_parametrization(
            multipliers,
            config.learning_rate if learning_rate is None else learning_rate,
            config.weight_decay if weight_decay is None else weight_decay,
            make_schedule(config),
        ),
    )


def learning_rate_table(rule: P.Parametrization, boxed_params: Any, learning_rate: float):
    """Rows (path, role, fan_in, depth, c_p, η·c_p) for inspection and logs."""
    metas = P.param_metadata(boxed_params)
    rows = []
    for path, m in jax.tree_util.tree_flatten_with_path(
        metas, is_leaf=lambda x: isinstance(x, P.ParamMeta)
    )[0]:
        c = rule.lr_multiplier(m)
        rows.append((jax.tree_util.keystr(path), m.role, m.fan_in, m.depth, c, learning_rate * c))
    return rows
