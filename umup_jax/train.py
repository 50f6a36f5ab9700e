"""``train_and_evaluate(config, workdir)``: the train loop of a run.

Order of work: validate the whole config (no compilation yet) → find the newest intact
checkpoint in ``workdir`` and check that it was made by the same run (:mod:`umup_jax.identity`:
a change to a run-defining key is refused before anything is touched; ``train.restart=True``
moves the old run aside instead) → validate the data, build the model, its metadata and the
optimizer → lay state and batches out with ``NamedSharding`` on a mesh of the devices → compile
the buffer-donating train step (and the stats and eval steps) ahead of time and check XLA's
memory plans against the devices' limit (:mod:`umup_jax.memory_plan`: a step that cannot fit
stops here, before any state is placed) → restore, and check that the checkpoint was trained on
the tokens the config's data holds now (their fingerprint,
:func:`umup_jax.data.token_fingerprint`, is stored in every checkpoint and in ``results.json``;
other tokens under the same config are refused like a config change) → train, evaluating,
logging, checkpointing → ``results.json``. A finished run rerun leaves its ``results.json`` as
it is.

A checkpoint is saved only if every parameter and optimizer moment is finite (one on-device
reduction), so "the last good checkpoint" never holds exploded weights.

The host never waits on the step it just dispatched: it reads step k−1's scalars (to log them
and to stop on a non-finite loss) while step k runs, and a background thread prepares batches.
SIGTERM/SIGINT make the loop save a checkpoint at the current step and return cleanly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import pathlib
import shutil
import signal
import time
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.core import meta as flax_meta
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from umup_jax import checkpoint as ckpt
from umup_jax import config as config_lib
from umup_jax import data as data_lib
from umup_jax import failures
from umup_jax import fp8 as fp8_lib
from umup_jax import identity as identity_lib
from umup_jax import layer_stack
from umup_jax import memory_plan
from umup_jax import metrics as metrics_lib
from umup_jax import ops
from umup_jax import processes
from umup_jax import sharding as sharding_lib
from umup_jax import throughput
from umup_jax.model import PROBES, Decoder, ModelConfig, fp8_probes, init_params
from umup_jax.optim import OptimizerConfig, make_optimizer, make_schedule

log = logging.getLogger(__name__)

NAN_POLICIES = ("stop", "ignore")


class NonFiniteLossError(RuntimeError):
    """The loss (or the state to be checkpointed) became NaN/Inf (``train.nan_policy='stop'``).

    ``data_fingerprint`` is the :func:`umup_jax.data.token_fingerprint` of the tokens the run
    diverged on (a sweep records it with the diverged row)."""

    def __init__(self, message: str, data_fingerprint: Optional[str] = None):
        super().__init__(message)
        self.data_fingerprint = data_fingerprint


# ---------------------------------------------------------------------------------------------
# Validation (before anything compiles)
# ---------------------------------------------------------------------------------------------


def _require(cond: bool, field: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ValueError(f"{field}={value!r} is invalid: it must be {allowed}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def validate_train(config: ml_collections.ConfigDict) -> None:
    t = config.train
    for field in ("steps", "batch_size", "eval_every", "eval_batches", "eval_batch_size",
                  "log_every", "metrics_every", "checkpoint_every", "keep_checkpoints",
                  "grad_accum_steps"):
        value = t[field]
        _require(_is_int(value) and value > 0, f"train.{field}", value, "an integer > 0")
    _require(t.nan_policy in NAN_POLICIES, "train.nan_policy", t.nan_policy, f"one of {NAN_POLICIES}")
    _require(isinstance(t.restart, bool), "train.restart", t.restart, "True or False")
    _require(isinstance(t.fsdp_gather_once, bool), "train.fsdp_gather_once",
             t.fsdp_gather_once, "True or False")
    _require(isinstance(t.fsdp_reduce_once, bool), "train.fsdp_reduce_once",
             t.fsdp_reduce_once, "True or False")
    # jax.random.key and grain's shuffle take seeds in [0, 2³²); others fail deep in a run.
    _require(_is_int(config.seed) and 0 <= config.seed < 2**32, "seed", config.seed,
             "an integer in [0, 2**32)")
    d = config.data
    _require(_is_int(d.shuffle_seed) and 0 <= d.shuffle_seed < 2**32, "data.shuffle_seed",
             d.shuffle_seed, "an integer in [0, 2**32)")
    _require(d.source in data_lib.SOURCES, "data.source", d.source, f"one of {data_lib.SOURCES}")
    _require(_is_int(d.vocab_size) and d.vocab_size > 0, "data.vocab_size", d.vocab_size,
             "an integer > 0")
    _require(_is_int(d.prefetch) and d.prefetch >= 0, "data.prefetch", d.prefetch, "an integer >= 0")


def model_config(config: ml_collections.ConfigDict, vocab_size: int) -> ModelConfig:
    m = config.model
    if m.vocab_size and m.vocab_size < vocab_size:
        raise ValueError(
            f"model.vocab_size={m.vocab_size} is invalid: the tokenizer has {vocab_size} tokens"
        )
    return ModelConfig(
        vocab_size=m.vocab_size or vocab_size, width=m.width, depth=m.depth,
        num_heads=m.num_heads, head_dim=m.head_dim or None, ffn_expansion=m.ffn_expansion,
        seq_len=m.seq_len, position=m.position, rope_theta=m.rope_theta,
        parametrization=m.parametrization, hparams=dict(m.hparams), dtype=m.dtype,
        residual_dtype=m.residual_dtype,
        norm_eps=m.norm_eps, fp8=fp8_policy(m), scan_layers=m.scan_layers, remat=m.remat,
        attention_impl=m.attention_impl, loss_chunks=m.loss_chunks,
    )


def fp8_policy(m: ml_collections.ConfigDict) -> Any:
    """``model.fp8`` (a preset) with the non-empty ``model.fp8_groups`` entries over it."""
    overrides = {g: mode for g, mode in dict(m.fp8_groups).items() if mode}
    if not overrides:
        return m.fp8
    return {**fp8_lib.resolve_policy(m.fp8), **overrides}


def optimizer_config(config: ml_collections.ConfigDict) -> OptimizerConfig:
    o = config.optimizer
    return OptimizerConfig(
        learning_rate=o.learning_rate, b1=o.b1, b2=o.b2, eps=o.eps,
        weight_decay=o.weight_decay, schedule=o.schedule, warmup_steps=o.warmup_steps,
        total_steps=config.train.steps, final_lr_fraction=o.final_lr_fraction,
    )


def _model_config_without_data(config: ml_collections.ConfigDict) -> ModelConfig:
    """The model config with a placeholder vocabulary where the tokenizer gives it."""
    return model_config(config, vocab_size=max(int(config.model.vocab_size or 0), 2))


def check_config(config: ml_collections.ConfigDict) -> None:
    """Everything that can be checked without data or devices: schema, train, model,
    optimizer and the data settings' form."""
    config_lib.check_schema(config)
    validate_train(config)
    _model_config_without_data(config)
    optimizer_config(config)
    data_lib.check_data_config(config.data)


def check_devices(config: ml_collections.ConfigDict, devices: Sequence[Any],
                  model_cfg: Optional[ModelConfig] = None) -> Mesh:
    """What needs the devices but no data, before anything is compiled: the mesh, the batch
    over its data and fsdp axes, the micro-batches of gradient accumulation and the attention
    kernel.  Returns the mesh.  ``model_cfg`` defaults to the config's with a placeholder
    vocabulary (nothing checked here depends on it)."""
    if model_cfg is None:
        model_cfg = _model_config_without_data(config)
    mesh = sharding_lib.make_mesh(dict(config.mesh), list(devices))
    n_batch = sharding_lib.batch_divisor(mesh)
    for field in ("batch_size", "eval_batch_size"):
        value = config.train[field]
        if value % n_batch:
            raise ValueError(
                f"train.{field}={value} is not divisible by data × fsdp = "
                f"{mesh.shape['data']} × {mesh.shape['fsdp']} = {n_batch} (mesh {dict(mesh.shape)})"
            )
        sharding_lib.check_batch_split(
            sharding_lib.batch_sharding(mesh).devices_indices_map((value,)), value,
            f"train.{field}")
    accum = config.train.grad_accum_steps
    per_device = config.train.batch_size // n_batch
    if per_device % accum:
        allowed = [d for d in range(1, per_device + 1) if per_device % d == 0]
        where = (f"train.batch_size={per_device}" if n_batch == 1 else
                 f"the per-device batch {per_device} (train.batch_size="
                 f"{config.train.batch_size} over data × fsdp = {n_batch} devices: every "
                 "micro-batch must split evenly over the devices)")
        raise ValueError(f"train.grad_accum_steps={accum} does not divide {where}; "
                         f"use one of {allowed}")
    # The attention kernel: 'cudnn' where it cannot run fails here, before any compilation.
    platform, capability = ops.device_platform(list(devices))
    try:
        ops.resolve_attention_impl(model_cfg.attention_impl, model_cfg.compute_dtype,
                                   model_cfg.head_dim, platform, capability)
    except ValueError as e:
        raise ValueError(f"model.{e}") from None
    return mesh


# ---------------------------------------------------------------------------------------------
# The compiled step
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """Everything built for a run before training starts."""

    config: ml_collections.ConfigDict
    model_cfg: ModelConfig
    opt_cfg: OptimizerConfig
    model: Decoder
    tx: optax.GradientTransformation
    mesh: Mesh
    state_sharding: Any
    batch_sharding: NamedSharding
    abstract_state: Any
    tokens: data_lib.TokenData


def build_run(config: ml_collections.ConfigDict, devices=None) -> Run:
    check_config(config)
    cache = config.data.cache_dir or None
    tokens = data_lib.load_tokens(config.data, cache_dir=cache)
    model_cfg = model_config(config, tokens.vocab_size)
    opt_cfg = optimizer_config(config)
    devices = list(devices) if devices is not None else jax.devices()
    mesh = check_devices(config, devices, model_cfg)
    # Data checks that need only shapes: fail before any compilation.
    seq = model_cfg.seq_len
    for split, arr in (("train", tokens.train), ("valid", tokens.valid)):
        if data_lib.num_windows(arr, seq) < 1:
            raise ValueError(
                f"model.seq_len={seq} is longer than the {split} data ({len(arr)} tokens)"
            )
    if data_lib.num_windows(tokens.valid, seq) < config.train.eval_batch_size:
        raise ValueError(
            f"train.eval_batch_size={config.train.eval_batch_size} is larger than the "
            f"{data_lib.num_windows(tokens.valid, seq)} validation windows of model.seq_len={seq}"
        )
    model = Decoder(model_cfg)
    boxed = jax.eval_shape(functools.partial(init_params, model), jax.random.key(0))
    tx = make_optimizer(opt_cfg, boxed, model_cfg.rule)
    abstract_params = flax_meta.unbox(boxed)
    specs = sharding_lib.param_specs(boxed)
    sharding_lib.check_divisible(abstract_params, specs, mesh)
    abstract_state = {
        "params": abstract_params,
        "opt_state": jax.eval_shape(tx.init, abstract_params),
        "step": jax.ShapeDtypeStruct((), jnp.int32),
    }
    state_sharding = sharding_lib.state_shardings(tx, abstract_params, specs, mesh)
    abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state,
        state_sharding,
    )
    return Run(config, model_cfg, opt_cfg, model, tx, mesh, state_sharding,
               sharding_lib.batch_sharding(mesh), abstract_state, tokens)


def make_init_fn(run: Run):
    def init(key):
        params = flax_meta.unbox(init_params(run.model, key))
        return {"params": params, "opt_state": run.tx.init(params),
                "step": jnp.zeros((), jnp.int32)}

    return jax.jit(init, out_shardings=run.state_sharding)


def fp8_stats(probe_grads) -> dict[str, jax.Array]:
    """{'fp8/<layer>/<param>/<stat>': fraction} from the probes' gradients (stacked probes of
    scanned layers are named per layer, ``layer_<i>``, as a loop's)."""
    out = {}
    probe_grads = layer_stack.unstack_layers(probe_grads)
    for path, leaf in jax.tree_util.tree_flatten_with_path(probe_grads)[0]:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        for i, stat in enumerate(fp8_lib.STAT_NAMES):
            out[f"fp8/{name}/{stat}"] = leaf[i]
    return out


def _global_norm(tree) -> jax.Array:
    """√(Σ g²) over every leaf, in fp32 (of u-μP's unit-scaled gradients)."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


@jax.jit
def state_is_finite(state) -> jax.Array:
    """True iff every floating-point leaf of ``state`` (params, Adam moments) is finite."""
    leaves = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def micro_batches(batch: dict, k: int, mesh: Optional[Mesh] = None) -> dict:
    """(B, …) arrays → (k, B/k, …): micro-batch j holds rows j, j+k, j+2k, …, so that with the
    batch sharded over the data axes every micro-batch keeps an equal share on every device
    (each device's B/n rows split into k micro-batches of B/(n·k))."""
    def split(x):
        x = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
        if mesh is not None:
            spec = PartitionSpec(None, sharding_lib.BATCH_AXES)
            x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
        return x

    return jax.tree.map(split, batch)


def accumulation_replica_axes(run: Run) -> tuple[str, ...]:
    """The mesh axes over whose replicas :func:`make_grad_fn` keeps separate running sums of
    the gradient through the accumulation loop, reducing them once per step: ``('data',)``
    where :func:`splits_over_data_replicas`; with ``train.fsdp_reduce_once`` (FSDP and
    accumulation) ``fsdp`` too, each device then summing its own rows' whole gradient
    (:func:`reduces_gradients_once`); ``()`` otherwise."""
    axes = ("data",) if splits_over_data_replicas(run) else ()
    return axes + (("fsdp",) if reduces_gradients_once(run) else ())


def reduces_gradients_once(run: Run) -> bool:
    """``train.fsdp_reduce_once`` where it changes anything: FSDP (``mesh.fsdp`` > 1) with
    ``train.grad_accum_steps`` > 1.  Each device then sums its rows' gradients through the
    accumulation loop unreduced, a whole fp32 gradient (split only over ``tensor``), and the
    step reduce-scatters it over ``fsdp`` once, instead of once per micro-batch (ZeRO-3's
    own); with ``train.fsdp_gather_once`` as well this is ZeRO-1's schedule: one all-gather
    and one reduce-scatter of the params per step."""
    return run.config.train.fsdp_reduce_once and _fsdp_with_accumulation(run)


def splits_over_data_replicas(run: Run) -> bool:
    """Whether :func:`make_grad_fn` computes each data replica's gradient apart (a vmap over
    the mesh's ``data`` axis) and all-reduces their sum once per step: on a mesh with
    ``data`` > 1 and ``train.grad_accum_steps`` > 1.  Otherwise XLA, which sees replicated
    parameters and a batch split over the replicas, all-reduces each micro-batch's gradient
    inside the accumulation loop: k all-reduces per step (on the CPU and, compiled for 8
    H100s, in XLA's GPU pipeline too)."""
    return run.mesh.shape["data"] > 1 and run.config.train.grad_accum_steps > 1


def make_grad_fn(run: Run, with_stats: bool):
    """``fn(params, batch) → ((loss, activation RMS), (grads, FP8 probe grads))`` of one
    optimizer step, unjitted; activations and probes only ``with_stats``.

    With ``train.grad_accum_steps = k > 1`` the batch is split into k micro-batches
    (:func:`micro_batches`) whose gradients a ``lax.scan`` sums in fp32, so that the result is
    the full batch's: the model is built with ``grad_tokens`` = the step's tokens (u-μP's
    weight-gradient scales then match the full batch's, spec §11.3) and the sum is weighted by
    the rule's :meth:`~umup_jax.parametrization.Parametrization.grad_accumulation_weight` (1/k
    for a plain mean loss, 1 for u-μP's).  The loss is the micro-batches' mean, activation RMS
    the root of their mean square, FP8 statistics their mean.

    Where :func:`splits_over_data_replicas`, each micro-batch is further split into its n
    data replicas' rows, whose gradients ``jax.vmap(…, spmd_axis_name='data')`` computes
    apart (each replica its own, the rows it holds) and the loop sums per replica, a running
    (n, …) sum split over ``data``; one sum over the replicas after the loop is the step's
    only all-reduce of the gradient.  That is accumulation over k·n equal pieces, so the
    weight is the rule's for k·n, and the result the full batch's as above.  An
    ``fp8_dynamic`` cast then scales by the RMS of its replica's rows of the micro-batch (as
    it does by the micro-batch's with accumulation alone).  With ``train.fsdp_reduce_once``
    the replicas are data × fsdp (:func:`accumulation_replica_axes`): each device sums its own
    rows' whole gradient, and the sum after the loop reduce-scatters over ``fsdp`` and then
    all-reduces each shard over ``data`` (:func:`_reduce_fsdp_then_data`).
    """
    k = run.config.train.grad_accum_steps
    replica_axes = accumulation_replica_axes(run)
    split = bool(replica_axes)
    n = math.prod(run.mesh.shape[a] for a in replica_axes)
    inner_axes = tuple(a for a in sharding_lib.BATCH_AXES if a not in replica_axes)
    # The params' shardings without fsdp: train.fsdp_gather_once gathers them so before the
    # loop, and train.fsdp_reduce_once keeps its running sums (one per fsdp replica) so.
    without_fsdp = jax.tree.map(lambda sh: sharding_lib.without_axes(sh, ("fsdp",)),
                                run.state_sharding["params"])
    gathered = without_fsdp if gathers_weights_once(run) else None
    carried = without_fsdp if "fsdp" in replica_axes else run.state_sharding["params"]
    step_tokens = run.config.train.batch_size * run.model_cfg.seq_len
    model = run.model if k == 1 else Decoder(run.model_cfg, grad_tokens=step_tokens)
    weight = run.model_cfg.rule.grad_accumulation_weight(k * n)
    probes = fp8_probes(run.model_cfg) if with_stats else {}

    def loss_fn(params, probe_vars, batch):
        variables = dict(params)
        if probe_vars:
            variables[PROBES] = probe_vars
        if with_stats:
            loss, mut = model.apply(variables, batch["inputs"], batch["targets"],
                                    method=Decoder.loss, mutable=["intermediates"])
            acts = metrics_lib.tree_rms(layer_stack.unstack_layers(mut["intermediates"]),
                                        "activations")
            return loss, acts
        return model.apply(variables, batch["inputs"], batch["targets"],
                           method=Decoder.loss), {}

    grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)

    def per_replica(params, micro):
        """The gradients of each replica's rows of ``micro``, stacked (n, …) over the
        replica axes (``data``, and ``fsdp`` with ``train.fsdp_reduce_once``): no reduction."""
        def one(rows):
            with sharding_lib.activation_mesh(run.mesh, batch_axes=inner_axes):
                return grad_fn(params, probes, rows)

        rows = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
            x.reshape(n, x.shape[0] // n, *x.shape[1:]),
            NamedSharding(run.mesh, PartitionSpec(replica_axes, inner_axes or None))), micro)
        return jax.vmap(one, spmd_axis_name=replica_axes)(rows)

    def stacked_zeros(tree, shardings=None):
        """(n, …) zeros of ``tree``'s leaves, split over the replica axes and then as
        ``shardings`` (default: replicated)."""
        def zeros(x, sh=None):
            spec = PartitionSpec(replica_axes, *(sh.spec if sh is not None else ()))
            return jax.lax.with_sharding_constraint(
                jnp.zeros((n, *x.shape), x.dtype), NamedSharding(run.mesh, spec))
        return jax.tree.map(zeros, tree) if shardings is None else jax.tree.map(
            zeros, tree, shardings)

    def accumulate(params, batch):
        def body(carry, micro):
            if split:  # loss (n,), every leaf (n, …): nothing summed over the replicas
                (loss, acts), (grads, probe_grads) = per_replica(params, micro)
            else:
                (loss, acts), (grads, probe_grads) = grad_fn(params, probes, micro)
            acc_loss, acc_grads, acc_probes = carry
            carry = (acc_loss + loss, jax.tree.map(jnp.add, acc_grads, grads),
                     jax.tree.map(jnp.add, acc_probes, probe_grads))
            return carry, jax.tree.map(jnp.square, acts)

        if split:
            zeros = (stacked_zeros(jnp.zeros((), jnp.float32)),
                     stacked_zeros(params, carried),
                     stacked_zeros(probes))
        else:
            zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params),
                     jax.tree.map(jnp.zeros_like, probes))
        (loss, grads, probe_grads), act_ms = jax.lax.scan(
            body, zeros, micro_batches(batch, k, run.mesh))
        if split:  # the step's one reduction of the gradient
            if len(replica_axes) == 2:  # over fsdp into the params' split, then over data
                grads = jax.tree.map(_reduce_fsdp_then_data, grads,
                                     run.state_sharding["params"])
            loss, grads, probe_grads = jax.tree.map(
                lambda g: jnp.sum(g, axis=0), (loss, grads, probe_grads))
        grads = jax.tree.map(lambda g: g * weight, grads)
        acts = jax.tree.map(lambda ms: jnp.sqrt(jnp.mean(ms)), act_ms)
        return (loss / (k * n), acts), (grads, jax.tree.map(lambda p: p / (k * n), probe_grads))

    def loss_and_grads(params, batch):
        if k == 1:
            return grad_fn(params, probes, batch)
        if gathered is not None:  # one all-gather per weight, before the loop
            params = jax.lax.with_sharding_constraint(params, gathered)
        return accumulate(params, batch)

    return loss_and_grads


def _reduce_fsdp_then_data(g: jax.Array, param: NamedSharding) -> jax.Array:
    """``g`` (n_data·n_fsdp, …), one running sum per (data, fsdp) replica, summed over its
    fsdp replicas into the param's split: (n_data, …) split over ``data`` and as ``param``.
    One reduce-scatter over ``fsdp``; the sum over ``data`` that follows all-reduces only
    each device's shard.  Summed over both at once, XLA all-reduced the whole gradient over
    all devices."""
    mesh = param.mesh
    n_data, n_fsdp = mesh.shape["data"], mesh.shape["fsdp"]
    g = g.reshape(n_data, n_fsdp, *g.shape[1:])
    return jax.lax.with_sharding_constraint(
        jnp.sum(g, axis=1), NamedSharding(mesh, PartitionSpec("data", *param.spec)))


def _fsdp_with_accumulation(run: Run) -> bool:
    """Whether the FSDP accumulation options apply: ``mesh.fsdp`` > 1 and
    ``train.grad_accum_steps`` > 1."""
    return run.mesh.shape["fsdp"] > 1 and run.config.train.grad_accum_steps > 1


def gathers_weights_once(run: Run) -> bool:
    """``train.fsdp_gather_once`` where it changes anything: FSDP (``mesh.fsdp`` > 1) with
    ``train.grad_accum_steps`` > 1.  XLA then all-gathers each FSDP-sharded weight once per
    step, before the accumulation loop, instead of in every micro-batch (ZeRO-3 keeps only
    the shard between uses; here each device holds its replica's whole fp32 params through
    the step).  The per-micro-batch reduce-scatters of the gradient stay.  Compiled for 8
    H100s, the ~1B model on mesh 1x8x1 with k = 4: 27.75 → 11.46 GiB sent per device and
    step for 9.28 → 15.04 GiB of memory (``experiments/gpu_plan_mesh.py``)."""
    return run.config.train.fsdp_gather_once and _fsdp_with_accumulation(run)


# The batch key of each process's stop vote (see :func:`stop_votes`).
STOP_VOTES = "stop_votes"


def stop_votes(signum: Optional[int], rows: int) -> np.ndarray:
    """This process's vote to stop, sent with its rows of the batch: ``rows`` copies of the
    signal it has received (0 for none).  The train step returns their maximum over all
    processes as ``metrics["stop"]``, so every process reads the same value with the step's
    loss and stops at the same step.  A process stopping on its own would enter the
    checkpoint's collectives while the others enter the next step's, and all would hang."""
    return np.full((rows,), signum or 0, np.int32)


def make_train_step(run: Run, with_stats: bool):
    """state, batch → (new state, metrics); with_stats adds per-tensor RMS of params, grads,
    updates and activations (and FP8 cast statistics).  The gradients are
    :func:`make_grad_fn`'s (gradient accumulation included).  A batch that carries
    :data:`STOP_VOTES` (:func:`stop_votes`) gets their maximum back as ``metrics["stop"]``."""
    tx = run.tx
    schedule = make_schedule(run.opt_cfg)
    eta = run.opt_cfg.learning_rate
    loss_and_grads = make_grad_fn(run, with_stats)

    def step_fn(state, batch):
        batch = dict(batch)
        votes = batch.pop(STOP_VOTES, None)
        with sharding_lib.activation_mesh(run.mesh):  # activations split like the batch
            (loss, acts), (grads, probe_grads) = loss_and_grads(state["params"], batch)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {
            "loss": loss,
            "grad_norm": _global_norm(grads),
            "lr": eta * schedule(state["step"]),
        }
        if votes is not None:  # the largest signal any process had when it sent this step
            metrics["stop"] = jnp.max(votes)
        if with_stats:
            unstacked = lambda t: layer_stack.unstack_layers(t["params"])  # noqa: E731
            metrics["stats"] = {
                **metrics_lib.tree_rms(unstacked(state["params"]), "params"),
                **metrics_lib.tree_rms(unstacked(grads), "grads"),
                **metrics_lib.tree_rms(unstacked(updates), "updates"),
                **acts,
                **fp8_stats(probe_grads),
            }
        new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
        return new_state, metrics

    replicated = NamedSharding(run.mesh, PartitionSpec())
    return jax.jit(
        step_fn,
        in_shardings=(run.state_sharding, run.batch_sharding),
        out_shardings=(run.state_sharding, replicated),
        donate_argnums=(0,),
    )


def batch_spec(run: Run, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch a train step takes, abstract: ``inputs`` and ``targets`` (int32
    token windows) and the rows' :data:`STOP_VOTES`, all split like :func:`to_global`'s."""
    tokens = jax.ShapeDtypeStruct((batch_size, run.model_cfg.seq_len), jnp.int32,
                                  sharding=run.batch_sharding)
    votes = jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=run.batch_sharding)
    return {"inputs": tokens, "targets": tokens, STOP_VOTES: votes}


def compile_train_step(run: Run, with_stats: bool, batch_size: int):
    """:func:`make_train_step` compiled ahead of time for ``run``'s state and a global batch
    of ``batch_size`` rows: a ``jax.stages.Compiled``, called like the jitted step, whose
    memory plan is known before it first runs (:mod:`umup_jax.memory_plan`)."""
    return make_train_step(run, with_stats).lower(
        run.abstract_state, batch_spec(run, batch_size)).compile()


def stats_step_used(start: int, steps_total: int, metrics_every: int) -> bool:
    """Whether a step of ``range(start, steps_total)`` logs statistics, as the loop decides:
    ``metrics_every <= steps_total`` and some step in the range a multiple of it."""
    if metrics_every > steps_total:
        return False
    first = -(-start // metrics_every) * metrics_every
    return first < steps_total


class CompiledSteps(NamedTuple):
    """The loop's programs compiled ahead (:func:`compile_steps`) and their memory plans."""
    train: Any
    stats: Optional[Any]  # None where no step of the run logs statistics
    eval: Any
    step_bytes: Optional[int]  # XLA's per-device plan of the larger train step
    eval_bytes: Optional[int]  # the eval step's plan + the optimizer state it leaves resident
    limit: Optional[int]  # the allocator's, None where unknown (the CPU)


def compile_steps(run: Run, config: ml_collections.ConfigDict, start: int) -> CompiledSteps:
    """The loop's programs compiled before the first step, their plans checked against the
    allocator's limit: a program over it raises :class:`memory_plan.StepMemoryError` naming
    what would shrink it, before any state is placed on the devices.  The stats step is
    compiled only where a step from ``start`` logs statistics (:func:`stats_step_used`)."""
    tcfg = config.train
    limit = memory_plan.device_memory_limit()
    train_step = compile_train_step(run, False, tcfg.batch_size)
    step_bytes = memory_plan.compiled_step_bytes(train_step)
    memory_plan.check_fits(step_bytes, limit, config)  # before compiling anything else
    stats_step = None
    if stats_step_used(start, tcfg.steps, tcfg.metrics_every):
        stats_step = compile_train_step(run, True, tcfg.batch_size)
        stats_bytes = memory_plan.compiled_step_bytes(stats_step)
        step_bytes = None if None in (step_bytes, stats_bytes) else max(step_bytes,
                                                                         stats_bytes)
        memory_plan.check_fits(step_bytes, limit, config)
    params = run.abstract_state["params"]
    eval_spec = {k: v for k, v in batch_spec(run, tcfg.eval_batch_size).items()
                 if k != STOP_VOTES}
    eval_step = make_eval_step(run).lower(params, eval_spec).compile()
    eval_bytes = memory_plan.compiled_step_bytes(eval_step)
    if eval_bytes is not None:  # the optimizer state stays on the devices while it runs
        eval_bytes += sharding_lib.shard_bytes(
            {k: v for k, v in run.abstract_state.items() if k != "params"})
    memory_plan.check_fits(eval_bytes, limit, config, program="eval step")
    return CompiledSteps(train_step, stats_step, eval_step, step_bytes, eval_bytes, limit)


def make_eval_step(run: Run):
    """params, batch → the batch's mean loss, computed in :func:`memory_plan.eval_pieces`
    pieces (rows j, j+k, … as :func:`micro_batches`; every piece has as many tokens, so the
    mean of their mean losses is the batch's)."""
    model = run.model
    k = memory_plan.eval_pieces(run.config)

    def piece_loss(params, piece):
        return model.apply(params, piece["inputs"], piece["targets"], method=Decoder.loss)

    def eval_fn(params, batch):
        with sharding_lib.activation_mesh(run.mesh):
            if k == 1:
                return piece_loss(params, batch)
            losses = jax.lax.map(functools.partial(piece_loss, params),
                                 micro_batches(batch, k, run.mesh))
            return jnp.mean(losses)

    return jax.jit(eval_fn, in_shardings=(run.state_sharding["params"], run.batch_sharding))


def to_global(run: Run, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's rows → one global array per key, sharded over the data axis."""
    return {
        k: jax.make_array_from_process_local_data(run.batch_sharding, np.asarray(v))
        for k, v in batch.items()
    }


# ---------------------------------------------------------------------------------------------
# Helpers of the loop
# ---------------------------------------------------------------------------------------------


class _StopFlag:
    """Set by SIGTERM/SIGINT; the loop checkpoints and returns at the next step boundary (with
    several processes, once the flag's vote has come back with a step: :func:`stop_votes`)."""

    def __init__(self):
        self.signal: Optional[int] = None

    def __call__(self, signum, frame):
        self.signal = signum

    @contextlib.contextmanager
    def installed(self):
        previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                previous[sig] = signal.signal(sig, self)
            except ValueError:  # not in the main thread: leave handlers alone
                pass
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _progress(config, start: int, total: int):
    if not config.train.progress or jax.process_index() != 0:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)


def _call_to_completion(step_fn, state, batch):
    """``step_fn(state, batch)``, returned once the devices have finished it.

    The first call of a step function loads its program onto the devices and warms it (and
    compiles it, where it was not compiled ahead); tokens/s leaves that call out of its
    interval, and its step is not counted.  Returned at dispatch, the step would run
    under the next call, which is not timed either when it is the other step function's
    first: step 0's row, counting step 0, read 296,000 tokens/s where the run trained at
    12,000-17,000 (the README's :cpu run, jax 0.12.1 on 2 cores)."""
    return jax.block_until_ready(step_fn(state, batch))


def evaluate(run: Run, eval_step, params, batches) -> dict[str, float]:
    losses = [eval_step(params, to_global(run, b)) for b in batches]
    loss = float(np.mean([float(x) for x in losses]))
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}


def _count_params(abstract_state) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(abstract_state["params"])))


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


RUN_FILES = ("checkpoints", "metrics.jsonl", "tensorboard", "results.json", "run.log",
             "error.log", "tokenizer.json")


def archive_run(workdir: pathlib.Path) -> Optional[pathlib.Path]:
    """Moves a previous run's files (:data:`RUN_FILES`) to ``workdir/previous/<time>/``;
    returns that folder, or ``None`` if there was nothing to move.  Nothing is deleted."""
    present = [workdir / name for name in RUN_FILES if (workdir / name).exists()]
    if not present:
        return None
    target = workdir / "previous" / time.strftime("%Y%m%d-%H%M%S")
    n = 1
    while target.exists():
        target = target.with_name(f"{target.name.split('.')[0]}.{n}")
        n += 1
    target.mkdir(parents=True)
    for path in present:
        if path.name == "run.log":  # the current run already logs here: keep a copy
            shutil.copy2(path, target / path.name)
            path.write_text("")
        else:
            shutil.move(str(path), str(target / path.name))
    return target


def check_resume(config_dict: dict, stored: dict, step: int, workdir: pathlib.Path,
                 parametrization: str) -> list[tuple[str, Any, Any]]:
    """Refuses (``identity.RunMismatchError``) to resume checkpoint ``step`` made by
    ``stored`` under the new config if a run-defining key changed; returns the allowed
    changes otherwise."""
    defaults = json.loads(config_lib.base_config(parametrization).to_json())
    refused, allowed = identity_lib.resume_diff(stored, config_dict, defaults)
    if refused:
        changes = "; ".join(identity_lib.describe_change(*c) for c in refused)
        raise identity_lib.RunMismatchError(
            f"{workdir} holds a different run (checkpoint step {step}); changed: {changes}. "
            "The run's checkpoints, metrics and results were not touched. To train this "
            "config, use a new --workdir, or pass "
            "--config.train.restart=True to move the old run to "
            f"{workdir / 'previous'}/<time>/ and start from step 0"
        )
    return allowed


def check_tokens(stored: Optional[str], current: str, step: int, workdir: pathlib.Path,
                 description: str) -> None:
    """Refuses (``identity.RunMismatchError``) to resume checkpoint ``step`` if it was trained
    on other tokens than the config's data holds now (:func:`umup_jax.data.token_fingerprint`):
    the same config keys can name changed files (a re-run ``prepare_data``, edited text, a
    replaced ``.bin``).  ``stored`` is ``None`` for a checkpoint written before fingerprints
    were stored; that one resumes unchecked."""
    if stored is None or stored == current:
        return
    raise identity_lib.RunMismatchError(
        f"{workdir} holds a run trained on other tokens (checkpoint step {step}: token "
        f"fingerprint {stored}; the config's data, {description}, now gives {current}): the "
        "data files changed under the same config. The run's checkpoints, metrics and "
        "results were not touched. Restore the data, use "
        "a new --workdir, or pass --config.train.restart=True to move the old run to "
        f"{workdir / 'previous'}/<time>/ and start from step 0"
    )


def _archive_and_reopen(store: ckpt.CheckpointStore, workdir: pathlib.Path, keep: int,
                        is_main: bool) -> ckpt.CheckpointStore:
    """``train.restart=True`` over a different run: moves it aside (process 0; the others
    wait, and a failure to move it is raised in all) and returns a fresh, empty checkpoint
    store."""
    store.close()
    moved = processes.from_main("moving the previous run aside",
                                lambda: str(archive_run(workdir) or ""), processes.current())
    if is_main:
        print(f"train.restart=True: moved the previous run to {moved}; starting from "
              "step 0", flush=True)
    return ckpt.CheckpointStore(workdir / "checkpoints", keep=keep, writer=is_main)


def _check_finished_tokens(config: ml_collections.ConfigDict, store: ckpt.CheckpointStore,
                           step: int, previous: dict, workdir: pathlib.Path,
                           is_main: bool) -> None:
    """Before a finished run's results are returned unchanged: :func:`check_tokens` of its
    last checkpoint's token fingerprint (else the one ``results.json`` records) against the
    tokens the config's data gives now.  Data that can no longer be read (moved, deleted, a
    Hugging Face dataset no longer prepared in the cache, which is not prepared again for
    this) does not make the finished results wrong: they are returned with a note saying the
    tokens were not compared, as are those of a run that predates fingerprints."""
    stored = store.token_fingerprint(step) or previous.get("data_fingerprint")
    if stored is None:
        if is_main:
            print(f"note: the finished run in {workdir} predates token fingerprints, so its "
                  "tokens could not be compared with the config's data", flush=True)
        return
    try:
        tokens = data_lib.load_tokens(config.data, cache_dir=config.data.cache_dir or None,
                                      prepare=False)  # never prepare a corpus just to compare
    except Exception as e:  # noqa: BLE001 - any failure to read it: say so, keep the results
        if is_main:
            print(f"note: the config's data could not be read ({type(e).__name__}: {e}), so "
                  f"the finished run's tokens were not compared with it", flush=True)
        return
    check_tokens(stored, tokens.fingerprint, step, workdir, tokens.description)


def _read_results(workdir: pathlib.Path) -> Optional[dict]:
    try:
        results = json.loads((workdir / "results.json").read_text())
    except (OSError, ValueError):
        return None
    return metrics_lib.revive_non_finite(results) if isinstance(results, dict) else None


def _last_train_loss(workdir: pathlib.Path, step: int) -> Optional[float]:
    """The train loss logged for ``step`` in metrics.jsonl, if any."""
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return None
    rows = [r for r in metrics_lib.read_metrics(path, "train") if r["step"] == step]
    return float(rows[-1]["loss"]) if rows else None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains (or resumes) the run ``config`` in ``workdir``; returns the results dict that is
    also written to ``workdir/results.json``.

    With several processes the stop handler (SIGTERM, SIGINT) is installed as soon as
    ``jax.distributed`` is: from then on JAX's own preemption notifier would swallow a
    SIGTERM, and the run would not stop; a signal before the first step stops the run after
    it (:func:`stop_votes`).  One process installs it around the training loop only, so that
    Ctrl-C still interrupts a long data preparation at once."""
    check_config(config)
    failures.shutdown_wait_s()  # a bad UMUP_JAX_SHUTDOWN_WAIT_S is refused before any work
    sharding_lib.initialize_distributed(dict(config.distributed))
    cache_note = sharding_lib.keep_processes_on_one_executable()
    if cache_note and jax.process_index() == 0:
        print(f"note: {cache_note}", flush=True)
    stop = _StopFlag()
    processes.check_agree("the run config", identity_lib.identity_hash(config)
                          + json.dumps(dict(config.mesh), sort_keys=True), processes.current())
    early = stop.installed() if jax.process_count() > 1 else contextlib.nullcontext()
    with early:
        return _train_and_evaluate(config, workdir, stop)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                        stop: "_StopFlag") -> dict[str, Any]:
    t_start = time.time()
    workdir_path = pathlib.Path(workdir).expanduser().resolve()
    tcfg = config.train
    is_main = jax.process_index() == 0
    group = processes.current()  # a step that may fail in one process alone fails in all
    config_dict = json.loads(config.to_json())
    steps_total = tcfg.steps

    # Which run does the workdir hold?  Decided before any data is read or anything compiles.
    store = ckpt.CheckpointStore(workdir_path / "checkpoints", keep=tcfg.keep_checkpoints,
                                 writer=is_main)
    found = store.newest_intact()
    allowed: list = []
    if found is not None:
        try:
            allowed = check_resume(config_dict, found[1], found[0], workdir_path,
                                   config.model.parametrization)
            if tcfg.restart and is_main:
                print(f"train.restart=True: the checkpoints in {workdir_path} were made by "
                      "this same run; resuming it", flush=True)
        except identity_lib.RunMismatchError:
            if not tcfg.restart:
                store.close()
                raise
            store = _archive_and_reopen(store, workdir_path, tcfg.keep_checkpoints, is_main)
            found = None
    if found is not None and found[0] >= steps_total:
        previous = _read_results(workdir_path)
        if previous is not None and previous.get("steps") == found[0]:
            try:  # a finished run's results stand only for the tokens it trained on
                processes.together(
                    "comparing the finished run's tokens with the data",
                    lambda: _check_finished_tokens(config, store, found[0], previous,
                                                   workdir_path, is_main),
                    group, shared=(identity_lib.RunMismatchError,))
            except identity_lib.RunMismatchError:
                if not tcfg.restart:
                    store.close()
                    raise
                store = _archive_and_reopen(store, workdir_path, tcfg.keep_checkpoints,
                                            is_main)
                found = None
            else:
                store.close()
                if is_main:
                    print(f"the run in {workdir_path} is finished (step {found[0]} of "
                          f"{steps_total}); results unchanged in "
                          f"{workdir_path / 'results.json'}", flush=True)
                # Finished, even if its results were written when a signal stopped it at
                # what is now its last step (train.steps lowered since).
                return dict(previous, interrupted=False, signal=None)

    try:
        run = processes.together("loading the data and building the model",
                                 lambda: build_run(config), group)
        tokens_fingerprint = run.tokens.fingerprint
        # Only process 0's fingerprint is stored: a host with other data would go unnoticed.
        processes.check_agree("the training data (the tokens' fingerprint)",
                              str(tokens_fingerprint), group)
    except BaseException:
        store.close()
        raise
    tokens_per_step = tcfg.batch_size * run.model_cfg.seq_len
    epochs = data_lib.epochs_covered(run.tokens.train, run.model_cfg.seq_len, tcfg.batch_size,
                                     steps_total)
    if is_main:
        print(
            f"umup-jax: {run.model_cfg.parametrization} model, width {run.model_cfg.width}, "
            f"depth {run.model_cfg.depth}, {_count_params(run.abstract_state):,} params, "
            f"vocab {run.model_cfg.vocab_size}; data {run.tokens.description}: "
            f"{len(run.tokens.train):,} train / {len(run.tokens.valid):,} valid tokens; "
            f"{steps_total} steps × {tokens_per_step:,} tokens = {epochs:.2f} epochs; "
            f"{len(jax.devices())} device(s) in {jax.process_count()} process(es), "
            f"mesh {dict(run.mesh.shape)}",
            flush=True,
        )
        if epochs > 1.0:
            msg = (f"the run covers {epochs:.2f} epochs of the training data (> 1); u-μP's "
                   "HP transfer assumes the under-fitting (single-epoch) regime")
            log.warning(msg)
            print(f"WARNING: {msg}", flush=True)

    # Compile the steps before any state is placed on the devices: a step that cannot fit
    # stops here, with XLA's plan and what would shrink it.
    t_compile = time.time()
    try:
        steps = processes.together(
            "compiling the train, stats and eval steps",
            lambda: compile_steps(run, config, found[0] if found is not None else 0), group)
    except BaseException:
        store.close()
        raise
    train_step, stats_step, eval_step = steps.train, steps.stats, steps.eval
    if is_main:
        plan = (memory_plan.describe(steps.step_bytes, steps.limit)
                if steps.step_bytes is not None else "no memory plan from this backend")
        names = "train, stats and eval" if stats_step else "train and eval"
        print(f"compiled the {names} steps in {time.time() - t_compile:.1f} s; {plan}",
              flush=True)

    # Restore the newest intact checkpoint (an older one if its arrays turn out damaged).
    restored = None
    while found is not None:
        restored = store.restore(found[0], run.abstract_state)
        if restored is not None:
            break
        found = store.newest_intact()
        if found is not None:
            allowed = check_resume(config_dict, found[1], found[0], workdir_path,
                                   config.model.parametrization)
    if restored is not None:  # the same config; are they the same tokens?
        stored_tokens = store.token_fingerprint(found[0])
        try:
            check_tokens(stored_tokens, tokens_fingerprint, found[0], workdir_path,
                         run.tokens.description)
        except identity_lib.RunMismatchError:
            if not tcfg.restart:
                store.close()
                raise
            store = _archive_and_reopen(store, workdir_path, tcfg.keep_checkpoints, is_main)
            restored, found, allowed = None, None, []
        if stored_tokens is None and is_main:
            print(f"note: checkpoint step {found[0]} predates token fingerprints, so its "
                  "tokens could not be compared with the config's data", flush=True)
    def write_tokenizer():
        workdir_path.mkdir(parents=True, exist_ok=True)
        if is_main and isinstance(run.tokens.tokenizer, data_lib.HFTokenizer):
            run.tokens.tokenizer.save(workdir_path / "tokenizer.json")  # for sample, export

    try:
        processes.together("writing tokenizer.json", write_tokenizer, group)
    except BaseException:
        store.close()
        raise
    pipeline = data_lib.train_dataset(
        run.tokens.train, run.model_cfg.seq_len, tcfg.batch_size, config.data.shuffle_seed,
        jax.process_index(), jax.process_count(),
    )
    iterator = iter(pipeline)
    if restored is None:
        state = make_init_fn(run)(jax.random.key(config.seed))
        start = 0
    else:
        state, data_state = restored
        start = found[0]
        iterator.set_state(data_state)
        if is_main:
            print(f"resumed from checkpoint step {start} in {store.directory}", flush=True)
            for key, old, new in allowed:
                note = ""
                if key == "train.steps" and config.optimizer.schedule == "cosine":
                    note = " (the cosine decay now ends at the new total)"
                print(f"config change on resume: {key}: {old!r} → {new!r}{note}", flush=True)
    last_good_ckpt = start if restored is not None else None

    valid_batches = data_lib.eval_batches(
        run.tokens.valid, run.model_cfg.seq_len, tcfg.eval_batch_size, tcfg.eval_batches,
        jax.process_index(), jax.process_count(),
    )
    writer = metrics_lib.MetricsWriter(workdir_path, enabled=is_main,
                                       resumed_at=start if restored is not None else None)
    for key, old, new in allowed:
        writer.write(start, "config_change", {"key": key, "old": old, "new": new})
    prefetch = data_lib.Prefetcher(iterator, depth=max(config.data.prefetch, 1))
    bar = _progress(config, start, steps_total)

    last_train_loss: Optional[float] = None
    last_eval: Optional[dict] = None
    last_eval_step: Optional[int] = None
    # (step, device metrics, timed) not yet read; a first call's step is not timed
    pending: Optional[tuple[int, Any, bool]] = None
    interval_t0, interval_steps = time.time(), 0
    timed_steps, timed_s = 0, 0.0  # every logged interval's steps and seconds, for results
    # MFU: model FLOPs per token over the devices' peak for the compute dtype (nan if unknown).
    flops_per_token = throughput.train_flops_per_token(run.model_cfg)
    device_kind = throughput.device_kind()
    peak_flops = throughput.peak_flops(device_kind, run.model_cfg.dtype)

    def paused(fn, *args):
        """Runs ``fn`` outside the throughput interval: tokens/s and MFU measure training steps
        (and the input pipeline feeding them), not evaluation or checkpoint writes."""
        nonlocal interval_t0
        t0 = time.time()
        try:
            return fn(*args)
        finally:
            interval_t0 += time.time() - t0

    def where_good() -> str:
        return (f"the last good checkpoint is step {last_good_ckpt} in {store.directory}"
                if last_good_ckpt is not None else "no checkpoint was saved yet")

    def rates(steps: int, seconds: float) -> tuple[float, float]:
        """(tokens/s, MFU) of ``steps`` timed steps in ``seconds``; nan for none."""
        if not steps:
            return float("nan"), float("nan")
        tokens_per_s = steps * tokens_per_step / max(seconds, 1e-9)
        return tokens_per_s, throughput.mfu(tokens_per_s, flops_per_token, peak_flops,
                                            len(jax.devices()))

    def finish_step(step: int, metrics: Any, timed: bool) -> None:
        """Reads step ``step``'s scalars on the host: NaN check, stop votes, logs, progress."""
        nonlocal last_train_loss, interval_t0, interval_steps, stop_agreed, timed_steps, timed_s
        host = jax.device_get(metrics)
        stop_agreed = max(stop_agreed, int(host.get("stop", 0)))
        loss = float(host["loss"])
        if not math.isfinite(loss) and tcfg.nan_policy == "stop":
            raise NonFiniteLossError(
                f"non-finite loss ({loss}) at step {step}; stopping (train.nan_policy='stop'); "
                f"{where_good()}", data_fingerprint=tokens_fingerprint
            )
        last_train_loss = loss
        interval_steps += int(timed)
        if step % tcfg.log_every == 0 or step == steps_total - 1:
            # nan where the interval holds only first calls (step 0's row): nothing was timed
            now = time.time()
            tokens_per_s, mfu = rates(interval_steps, now - interval_t0)
            if interval_steps:
                timed_steps, timed_s = timed_steps + interval_steps, timed_s + now - interval_t0
                interval_t0, interval_steps = now, 0
            row = {"loss": loss, "grad_norm": float(host["grad_norm"]), "lr": float(host["lr"]),
                   "tokens_per_s": tokens_per_s, "mfu": mfu,
                   "tokens": (step + 1) * tokens_per_step}
            memory = throughput.peak_memory_bytes()
            if memory is not None:
                row["peak_memory_bytes"] = memory
            writer.write(step, "train", row)
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.4f}",
                                tok_s=f"{tokens_per_s:,.0f}" if math.isfinite(tokens_per_s)
                                else "n/a",
                                mfu=f"{mfu:.1%}" if math.isfinite(mfu) else "n/a",
                                refresh=False)
        if "stats" in host:
            writer.write(step, "stats", {k: float(v) for k, v in host["stats"].items()})

    def save(step_done: int, data_state: dict) -> bool:
        """Checkpoints the state after ``step_done`` steps, if it is finite; whether it did."""
        nonlocal last_good_ckpt
        if not bool(state_is_finite(state)):
            msg = (f"the parameters or optimizer state are not finite after step {step_done}; "
                   "not saved as a checkpoint")
            if tcfg.nan_policy == "stop":
                raise NonFiniteLossError(f"{msg}; stopping (train.nan_policy='stop'); "
                                         f"{where_good()}", data_fingerprint=tokens_fingerprint)
            log.warning(msg)
            if is_main:
                print(f"WARNING: {msg}", flush=True)
            return False
        if store.save(step_done, state, data_state, config_dict, tokens_fingerprint):
            last_good_ckpt = step_done
        return last_good_ckpt == step_done

    # The largest signal any process had sent with a step whose metrics were read: the same
    # number in every process after the same steps.  One process decides alone.
    stop_agreed = 0
    multi_process = jax.process_count() > 1
    interrupted: Optional[int] = None  # the signal that stopped the run early
    called: set = set()  # the step functions called in this process
    # A process that fails inside the loop tells the others, which are waiting in a step's
    # collective that it will never join; they stop within seconds, naming it.
    watch = processes.FailureWatch(group, failures.stop_for_failed_process(workdir_path))
    try:
        with stop.installed(), watch:
            if start == 0:  # the starting point of the eval curve
                last_eval = paused(evaluate, run, eval_step, state["params"], valid_batches)
                last_eval_step = 0
                writer.write(0, "eval", last_eval)
            data_state, batch = prefetch.next()
            for step in range(start, steps_total):
                with_stats = tcfg.metrics_every <= steps_total and step % tcfg.metrics_every == 0
                if with_stats and stats_step is None:  # resumed from an older checkpoint than
                    # the newest, which needed no statistics
                    stats_step = paused(compile_train_step, run, True, tcfg.batch_size)
                step_fn = stats_step if with_stats else train_step
                voted = {**batch, STOP_VOTES: stop_votes(stop.signal, len(batch["inputs"]))}
                timed = step_fn in called
                if timed:
                    state, metrics = step_fn(state, to_global(run, voted))
                else:  # loading and warming a program are not training throughput: the
                    # first call runs to completion outside the interval, and its step is not
                    # counted
                    state, metrics = paused(_call_to_completion, step_fn, state,
                                            to_global(run, voted))
                    called.add(step_fn)
                if pending is not None:
                    finish_step(*pending)
                pending = (step, metrics, timed)
                data_state, batch = prefetch.next()  # state/batch of step + 1
                if bar is not None:
                    bar.update(1)
                done = step + 1
                if done % tcfg.eval_every == 0 or done == steps_total:
                    finish_step(*pending)
                    pending = None
                    last_eval = paused(evaluate, run, eval_step, state["params"],
                                       valid_batches)
                    last_eval_step = done
                    writer.write(done, "eval", last_eval)
                # Read once: a signal may land at any moment.  Several processes stop on
                # the votes of the steps already read (one or two steps after the signal), so
                # that all of them save and leave after the same step.
                signalled = (stop_agreed or None) if multi_process else stop.signal
                saved = None
                if done % tcfg.checkpoint_every == 0 or done == steps_total or signalled:
                    if pending is not None:
                        finish_step(*pending)  # never checkpoint past a non-finite loss
                        pending = None
                    saved = paused(save, done, data_state)
                if signalled:
                    interrupted = signalled if done < steps_total else None  # else finished
                    if is_main:
                        what = (f"saved checkpoint at step {done}" if saved else
                                f"not saved at step {done}; {where_good()}")
                        print(f"\nsignal {signalled}: {what}; exiting", flush=True)
                    break
            if pending is not None:
                finish_step(*pending)
                pending = None
            final_step = int(jax.device_get(state["step"]))
            if last_eval is None:  # a finished run whose results.json was lost: re-evaluate
                last_eval = evaluate(run, eval_step, state["params"], valid_batches)
                last_eval_step = final_step
            if last_train_loss is None and final_step > 0:
                last_train_loss = _last_train_loss(workdir_path, final_step - 1)
    finally:
        prefetch.close()
        if bar is not None:
            bar.close()
        writer.close()
        store.close()

    run_tokens_per_s, run_mfu = rates(timed_steps, timed_s)
    results = {
        "final_train_loss": last_train_loss,
        "final_eval_loss": last_eval["loss"],
        "final_eval_perplexity": last_eval["perplexity"],
        "eval_step": last_eval_step,  # the step of final_eval_*: < steps if interrupted
        "steps": final_step,
        "tokens_seen": final_step * tokens_per_step,
        "epochs": final_step * tcfg.batch_size / max(
            data_lib.num_windows(run.tokens.train, run.model_cfg.seq_len), 1),
        "wall_time_s": time.time() - t_start,
        # Over every logged interval of this process's run (since its start or resume), not
        # the last interval's alone: 10 steps on 2 CPU cores range over −16% to +19% of the mean.
        "tokens_per_s": run_tokens_per_s,
        "mfu": run_mfu,
        "timed_steps": timed_steps,
        "model_flops_per_token": flops_per_token,
        "device_kind": device_kind,
        "peak_flops_per_device": peak_flops,
        "interrupted": interrupted is not None,
        "signal": interrupted,
        "num_params": _count_params(run.abstract_state),
        "data_fingerprint": tokens_fingerprint,
        "devices": len(jax.devices()),
        "mesh": dict(run.mesh.shape),
        "state_bytes": sharding_lib.per_device_bytes(state),
        # XLA's plan for one train step on one device (memory_plan), and the allocator's limit
        "step_memory_bytes": steps.step_bytes,
        "eval_memory_bytes": steps.eval_bytes,
        "device_memory_limit_bytes": steps.limit,
        "config": config_dict,
    }
    memory = throughput.peak_memory_bytes()
    if memory is not None:  # the backend reports it (GPU, TPU); the CPU backend does not
        results["peak_memory_bytes"] = memory
    if is_main:
        tmp = workdir_path / "results.json.tmp"
        tmp.write_text(json.dumps(metrics_lib.json_safe(results), indent=2, default=str,
                                  allow_nan=False))  # strict JSON: a CPU's MFU is "nan"
        tmp.replace(workdir_path / "results.json")
        ev = results["final_eval_loss"]
        # A run a signal stopped says so first: it is not done, a rerun resumes it.
        print(("interrupted" if results.get("interrupted") else "done") + f": step {final_step}"
              + (f", train loss {last_train_loss:.4f}" if last_train_loss is not None else "")
              + (f", eval loss {ev:.4f} (ppl {results['final_eval_perplexity']:.2f})"
                 + (f" at step {last_eval_step}" if last_eval_step != final_step else "")
                 if ev is not None else "")
              + f", {results['wall_time_s']:.1f}s; results in {workdir_path / 'results.json'}"
              + ("; rerun the same command to resume" if results.get("interrupted") else ""),
              flush=True)
    return results
