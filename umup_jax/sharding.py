"""Device mesh, logical-axis rules and shardings; multi-host initialisation.

The mesh has three axes, ``('data', 'fsdp', 'tensor')``:

* ``data``: pure data parallelism (parameters replicated);
* ``fsdp``: data parallelism with parameters and optimizer state sharded (ZeRO-3 style); XLA
  all-gathers a weight where it is used and reduce-scatters its gradient;
* ``tensor``: tensor (model) parallelism, splitting attention heads and the FFN hidden units.

The batch splits over ``data × fsdp``, and so do the activations: while the trainer traces a
step inside :func:`activation_mesh`, the model pins its residual stream to that split
(:func:`constrain_batch`: after the embedding, after each block, after the final norm).
Without it XLA's sharding propagation gave the stream the embedding table's split (the width
over ``fsdp``), which turned FSDP into tensor parallelism over the stream: an all-reduce in
every RMSNorm and all-to-alls of activations: 72 MiB of collectives per step and device
instead of 27 (8 devices, mesh (2, 4, 1), width 256, depth 2, 16 × 128 tokens; BUILD.md).
Each parameter's sharding comes from the logical axis
names it declared in its :class:`~umup_jax.parametrization.ParamMeta` box, through
:data:`DEFAULT_RULES`; nothing is inferred from shapes.  The u-μP metadata (role, fan-in,
depth) also comes from the model definition, never from a checkpoint, so the per-parameter
learning rates are the same after any reshard or restore.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
from typing import Any, Iterator, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from umup_jax import parametrization as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis name → mesh axis (None: replicated along it).
DEFAULT_RULES: dict[str, Optional[str]] = {
    "embed": "fsdp",      # d_model: FSDP shards every weight along it
    "heads": "tensor",    # attention heads: tensor parallel
    "mlp": "tensor",      # FFN hidden units: tensor parallel
    "vocab": "tensor",    # embedding rows / readout columns: vocab parallel
    "qkv": None,
    "head_dim": None,
    "layers": None,       # the stacked-layers axis of scanned blocks: never sharded
}


_ACTIVATION_MESH: contextvars.ContextVar[Optional[NamedSharding]] = contextvars.ContextVar(
    "umup_jax_activation_mesh", default=None)


@contextlib.contextmanager
def activation_mesh(mesh: Mesh, batch_axes: Sequence[str] = BATCH_AXES) -> Iterator[None]:
    """Code traced inside this block has :func:`constrain_batch` split activations' batch
    axis over ``batch_axes`` of ``mesh`` (a one-device mesh changes nothing).  Inside a
    ``jax.vmap(…, spmd_axis_name=…)`` over batch replicas (the trainer's
    :func:`umup_jax.train.make_grad_fn`), the batch axes it does not map: ``('fsdp',)`` under
    a vmap over ``data``, none under one over data × fsdp; vmap puts the mapped axes on the
    axis it maps."""
    sharding = NamedSharding(mesh, PartitionSpec(tuple(batch_axes)))
    token = _ACTIVATION_MESH.set(sharding if mesh.size > 1 else None)
    try:
        yield
    finally:
        _ACTIVATION_MESH.reset(token)


def constrain_batch(x: jax.Array) -> jax.Array:
    """``x`` (batch first) split over ``data × fsdp`` on its batch axis and replicated along
    the rest (the ``tensor`` axis included: tensor parallelism splits heads and FFN units
    inside a block, not the stream), with the mesh of the enclosing :func:`activation_mesh`;
    unchanged outside one: the split :func:`batch_sharding` gives the batch itself.  Its
    gradient is constrained alike."""
    sharding = _ACTIVATION_MESH.get()
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def batch_replicas() -> Optional[tuple[Mesh, tuple[str, ...]]]:
    """``(mesh, axes)`` where the enclosing :func:`activation_mesh` splits the batch over
    mesh axes of more than one device (``axes``, those of its batch axes, in mesh order), so
    that code traced there can compute the n = ∏ sizes batch replicas' partial sums apart
    (``jax.vmap(…, spmd_axis_name=axes)`` over an (n, B/n, …) view of the batch) and reduce
    them once, rather than let XLA reduce a partial sum wherever one meets a replicated or
    FSDP-sharded value (:mod:`umup_jax.loss_chunks`); ``None`` otherwise.  Inside the
    trainer's own vmap over replicas only the axes it does not map are left (``('fsdp',)``
    or none)."""
    sharding = _ACTIVATION_MESH.get()
    if sharding is None:
        return None
    spec = sharding.spec[0]
    spec = spec if isinstance(spec, tuple) else (spec,)
    axes = tuple(a for a in spec if a is not None and sharding.mesh.shape[a] > 1)
    return (sharding.mesh, axes) if axes else None


def without_axes(sharding: NamedSharding, axes: Sequence[str]) -> NamedSharding:
    """``sharding`` replicated along the mesh ``axes`` and split as before along the others:
    FSDP's weight gathered (``axes=('fsdp',)``), its tensor-parallel split kept."""
    def drop(entry):
        if isinstance(entry, tuple):
            return tuple(a for a in entry if a not in axes) or None
        return None if entry in axes else entry
    return NamedSharding(sharding.mesh, PartitionSpec(*(drop(e) for e in sharding.spec)))


def gathered_over(mesh: Mesh, names: Sequence[Optional[str]], axes: Sequence[str],
                  rules: Mapping[str, Optional[str]] = DEFAULT_RULES) -> NamedSharding:
    """The sharding of a parameter with logical ``names`` (``rules``) with the mesh ``axes``
    replicated (:func:`without_axes`)."""
    return without_axes(NamedSharding(mesh, logical_to_spec(names, rules)), axes)


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, int, int]:
    """Resolves ``{'data': d, 'fsdp': f, 'tensor': t}`` (one of them may be -1, "the rest")."""
    values = [int(sizes.get(a, 1)) for a in AXES]
    unknown = [a for a, v in zip(AXES, values) if v == -1]
    for a, v in zip(AXES, values):
        if v == 0 or v < -1:
            raise ValueError(f"mesh.{a}={v} is invalid: it must be a positive size or -1")
    if len(unknown) > 1:
        raise ValueError(f"mesh axes {unknown} are all -1: at most one axis may be -1")
    known = math.prod(v for v in values if v != -1)
    if unknown:
        if num_devices % known:
            raise ValueError(
                f"mesh {dict(zip(AXES, values))} does not fit {num_devices} devices: "
                f"{num_devices} is not divisible by {known}"
            )
        values = [num_devices // known if v == -1 else v for v in values]
    if math.prod(values) != num_devices:
        raise ValueError(
            f"mesh {dict(zip(AXES, values))} has {math.prod(values)} devices but "
            f"{num_devices} are available"
        )
    return tuple(values)  # type: ignore[return-value]


def make_mesh(sizes: Mapping[str, int], devices: Optional[Sequence] = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(sizes, len(devices))
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), AXES)


def logical_to_spec(names: Sequence[Optional[str]], rules: Mapping[str, Optional[str]]
                    ) -> PartitionSpec:
    axes = []
    for n in names:
        axis = rules.get(n) if n is not None else None
        if axis is not None and axis in axes:
            axis = None  # a mesh axis can shard only one dimension
        axes.append(axis)
    return PartitionSpec(*axes)


def param_specs(boxed_params: Any, rules: Mapping[str, Optional[str]] = DEFAULT_RULES) -> Any:
    """PartitionSpec per parameter from its declared logical names."""
    metas = P.param_metadata(boxed_params)
    return jax.tree.map(lambda m: logical_to_spec(m.names, rules), metas,
                        is_leaf=lambda x: isinstance(x, P.ParamMeta))


def check_divisible(abstract_params: Any, specs: Any, mesh: Mesh) -> None:
    """Every sharded dimension must divide by its mesh axis size (fail before compiling)."""
    def check(path, leaf, spec):
        for dim, axis in zip(leaf.shape, spec):
            if axis is None:
                continue
            size = mesh.shape[axis]
            if dim % size:
                raise ValueError(
                    f"parameter {jax.tree_util.keystr(path)} of shape {leaf.shape}: dimension "
                    f"{dim} is not divisible by mesh axis {axis!r} of size {size}"
                )
        return None

    jax.tree_util.tree_map_with_path(check, abstract_params, specs,
                                     is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def check_batch_split(index_map, batch_size: int, field: str = "train.batch_size",
                      process_of=lambda device: device.process_index) -> None:
    """Refuses a mesh on which the processes do not hold disjoint, equal shares of the batch.

    Each process reads its own 1/P of every global batch (``data.train_dataset``) and places
    it on its devices, so the batch rows of one process's devices (``index_map``: device →
    index of a (B,) array, ``NamedSharding.devices_indices_map``) must be B/P rows that no
    other process's devices hold.  A ``mesh.tensor`` (or other replicated axis) that spans
    processes breaks that: two processes would fill the same rows with different data, and
    the run would train on an inconsistent batch of B/2 rows, silently."""
    rows: dict = {}
    for device, index in index_map.items():
        rows.setdefault(process_of(device), set()).update(range(*index[0].indices(batch_size)))
    if len(rows) < 2:
        return
    share = batch_size // len(rows)
    seen: set = set()
    for process, held in sorted(rows.items()):
        if len(held) != share or held & seen:
            raise ValueError(
                f"{field}={batch_size} cannot be split over the {len(rows)} processes on this "
                f"mesh: process {process} holds {len(held)} batch rows"
                + (" that another process holds too" if held & seen else "")
                + f", where each must hold its own {share}; the "
                "batch axes (data × fsdp) must separate the processes, e.g. keep mesh.tensor "
                "within a process's devices")
        seen |= held


def batch_divisor(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def state_shardings(tx, abstract_params: Any, specs: Any, mesh: Mesh) -> Any:
    """Shardings of {'params', 'opt_state', 'step'}: optimizer moments follow their params."""
    import optax

    param_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                            is_leaf=lambda x: isinstance(x, PartitionSpec))
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    opt_sh = optax.tree_map_params(
        tx, lambda _, sh: sh, abstract_opt, param_sh,
        transform_non_params=lambda _: replicated,
    )
    return {"params": param_sh, "opt_state": opt_sh, "step": replicated}


def per_device_bytes(tree: Any) -> dict[str, int]:
    """Bytes each device holds of the arrays in ``tree`` (max over devices) and in total."""
    per_device: dict = {}
    total = 0
    for leaf in jax.tree.leaves(tree):
        total += leaf.size * leaf.dtype.itemsize
        for shard in leaf.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + (
                shard.data.size * shard.data.dtype.itemsize)
    return {"max_per_device": max(per_device.values()) if per_device else 0, "total": total}


def shard_bytes(tree: Any) -> int:
    """Bytes one device holds of ``tree``'s arrays or ``jax.ShapeDtypeStruct``s by each leaf's
    sharding (its shard shape; a leaf without one whole), before anything is placed:
    :func:`per_device_bytes` for a plan."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        shape = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
        total += math.prod(shape) * leaf.dtype.itemsize
    return total


def _coordinator_address(cfg: Mapping[str, Any]) -> str:
    return cfg.get("coordinator_address") or os.environ.get("JAX_COORDINATOR_ADDRESS", "")


def distributed_requested(cfg: Mapping[str, Any]) -> bool:
    """Whether :func:`initialize_distributed` will start ``jax.distributed`` (a coordinator
    address in the config's ``distributed`` or ``JAX_COORDINATOR_ADDRESS``): until it has,
    this process must not touch JAX's devices."""
    return bool(_coordinator_address(cfg))


def initialize_distributed(cfg: Mapping[str, Any]) -> bool:
    """``jax.distributed.initialize`` from the config (``coordinator_address``,
    ``num_processes``, ``process_id``) or, where those are unset, the environment variables
    ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``.  Returns whether it
    initialised.  On CPU it selects gloo collectives (needed across processes)."""
    address = _coordinator_address(cfg)
    if not address:
        return False
    num = int(cfg.get("num_processes") or os.environ.get("JAX_NUM_PROCESSES", "0") or 0)
    pid_raw = cfg.get("process_id")
    pid = int(pid_raw if pid_raw is not None and pid_raw >= 0
              else os.environ.get("JAX_PROCESS_ID", "-1"))
    if num <= 0 or pid < 0:
        raise ValueError(
            f"distributed: coordinator_address={address!r} needs num_processes (got {num}) and "
            f"process_id (got {pid}) from the config or JAX_NUM_PROCESSES / JAX_PROCESS_ID"
        )
    if pid >= num:
        raise ValueError(f"distributed.process_id={pid} is invalid: num_processes={num}")
    is_initialized = getattr(jax.distributed, "is_initialized", lambda: False)
    if is_initialized():
        return True
    # Cross-process collectives on the CPU backend need gloo; GPU/TPU backends ignore this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid)
    return True


def processes_need_identical_programs(process_count: int, platform: str) -> bool:
    """Whether the run must keep every process's compiled programs identical, down to their
    metadata: several processes on the CPU.

    Measured with two CPU processes (gloo collectives) on jax 0.12.1: when two processes'
    executables of one program differ at all, even in the source-location metadata only,
    their first collective never completes and both wait in it for good; jax 0.10.2 runs
    them.  Two things make them differ without any difference in the computation:

    * **the Python call stack** that traced the program, which JAX records in the HLO
      (``jax_include_full_tracebacks_in_locations``): processes started through different
      entry points (``python -m umup_jax.main`` in one, a script calling it in the other)
      hang (a test's pass-through wrapper around the train step in one process is enough);
      with only the innermost frame recorded, they train;
    * **the persistent compilation cache** (:func:`keep_processes_on_one_executable`).

    GPU hosts are not covered: whether NCCL collectives care is unmeasured."""
    return process_count > 1 and platform == "cpu"


def keep_processes_on_one_executable() -> Optional[str]:
    """Where :func:`processes_need_identical_programs`: records only the innermost Python
    frame in compiled programs' locations and turns JAX's persistent compilation cache off
    for this run, returning a note saying so (None where nothing was turned off).  Call it
    after ``jax.distributed`` is initialised and before the run traces anything.

    The cache would hand the processes different executables of one program: each process's
    cache key hashes its own view of the topology (JAX's "accelerator config"), and only
    process 0 writes entries.  Measured with two CPU processes on jax 0.10.2 and 0.12.1: in a
    run after the first, process 0 finds all of its programs in the cache and process 1
    none, so process 0 runs the executables it loaded while process 1 runs the ones it
    compiled, which hangs on jax 0.12.1.  The cache cannot save wall time there either: the
    first step's collective waits for the slowest process's compile."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    count = jax.process_count()
    if not processes_need_identical_programs(count, jax.default_backend()):
        return None
    jax.config.update("jax_include_full_tracebacks_in_locations", False)
    cache_dir = jax.config.jax_compilation_cache_dir
    if not (cache_dir and jax.config.jax_enable_compilation_cache):
        return None
    jax.config.update("jax_enable_compilation_cache", False)
    cc.reset_cache()  # JAX decides once per process whether to use the cache: decide again
    return (f"the persistent compilation cache ({cache_dir}) is off for this run: with "
            f"{count} processes on the CPU only process 0 would find its entries, and a "
            f"process running a cached program beside one that compiled it afresh can wait "
            f"forever in their first collective (jax 0.12)")
