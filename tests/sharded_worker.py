"""Run by tests/test_sharding.py in a subprocess with 8 forced CPU devices; prints one JSON
object with what the tests assert (losses per mesh, shardings, bytes, reshard restore, errors).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded_worker.py OUTDIR
"""

import json
import sys

import jax
import numpy as np

from umup_jax import config as config_lib
from umup_jax import data as data_lib
from umup_jax import hlo_check
from umup_jax import hlo_traffic
from umup_jax import sharding as sharding_lib
from umup_jax import train as train_lib
from umup_jax.checkpoint import CheckpointStore
from umup_jax.model import Decoder

ARG = ("smoke,model.width=64,model.num_heads=2,model.depth=2,train.batch_size=8,"
       "train.eval_batch_size=8")
MESHES = {"1": None, "8x1x1": (8, 1, 1), "2x4x1": (2, 4, 1), "2x2x2": (2, 2, 2),
          "1x8x1": (1, 8, 1), "4x2x1": (4, 2, 1)}
# The meshes whose losses the tests compare; the others are checked for their shardings and
# bytes (and 4x2x1 as a restore target) from the initialised state (init and step share the state's shardings).
TRAINED = ("1", "8x1x1", "2x4x1", "2x2x2")


def config(mesh):
    cfg = config_lib.proxy_config("umup", ARG)
    if mesh is not None:
        cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = mesh
    return cfg


def devices(mesh):
    return jax.devices()[:1] if mesh is None else jax.devices()


def build(mesh):
    return train_lib.build_run(config(mesh), devices(mesh))


def batches(run, n, skip=0):
    it = iter(data_lib.train_dataset(run.tokens.train, run.model_cfg.seq_len,
                                     run.config.train.batch_size, 0))
    out = [next(it) for _ in range(skip + n)]
    return out[skip:]


def train(run, steps=3):
    state = train_lib.make_init_fn(run)(jax.random.key(0))
    step = train_lib.make_train_step(run, with_stats=False)
    losses = []
    for b in batches(run, steps):
        state, m = step(state, train_lib.to_global(run, b))
        losses.append(float(m["loss"]))
    return state, losses


def spec_tuple(spec):
    t = list(spec)
    while t and t[-1] is None:
        t.pop()
    return [a if isinstance(a, str) or a is None else list(a) for a in t]


def stream_specs(run, state, batch):
    """The shardings XLA gives the residual stream (after the embedding, after block 0, after
    the final norm) in a jitted forward pass traced as the trainer traces its steps."""
    def forward(params, inputs):
        with sharding_lib.activation_mesh(run.mesh):
            _, mut = run.model.apply(params, inputs, mutable=["intermediates"])
        inter = mut["intermediates"]
        return {"embedding": inter["embedding"][0], "block_output": inter["layer_0"]["output"][0],
                "final_norm": inter["final_norm"][0]}

    out = jax.jit(forward)(state["params"], batch["inputs"])
    return {k: spec_tuple(v.sharding.spec) for k, v in out.items()}


# A run whose activations have a size no weight has (the sequence, 48), for the collectives.
STREAM_ARG = ("smoke,model.width=128,model.num_heads=2,model.depth=2,model.seq_len=48,"
              "train.batch_size=16,train.eval_batch_size=8,mesh.data=2,mesh.fsdp=4,mesh.tensor=1")


def collectives(run):
    """[opcode, result type, op_name] of every collective in the compiled train step."""
    step = train_lib.make_train_step(run, with_stats=False)
    batch = {k: jax.ShapeDtypeStruct((run.config.train.batch_size, run.model_cfg.seq_len),
                                     np.int32, sharding=run.batch_sharding)
             for k in ("inputs", "targets")}
    hlo = step.lower(run.abstract_state, batch).compile().as_text()
    kinds = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
    return [[i.opcode.replace("-start", ""), i.result, i.op_name]
            for i in hlo_check.instructions(hlo) if i.opcode.replace("-start", "") in kinds]


# Gradient accumulation over data replicas (train.make_grad_fn's vmap over `data`): each
# variant's one-step loss, activation RMS and gradients against one device without
# accumulation, for (model arg, mesh + accumulation arg, parametrization, with_stats).
ACCUM_ARG = ("smoke,model.width=64,model.num_heads=2,model.depth=2,train.batch_size=16,"
             "train.eval_batch_size=8")
ACCUM_VARIANTS = {
    "umup_8x1x1_k2": ("", ",mesh.data=8,train.grad_accum_steps=2", "umup", True),
    "umup_2x2x2_k2_scan_remat_chunks": (
        ",model.scan_layers=True,model.remat=full,model.loss_chunks=2",
        ",mesh.data=2,mesh.fsdp=2,mesh.tensor=2,train.grad_accum_steps=2", "umup", True),
    "sp_4x2x1_k2": ("", ",mesh.data=4,mesh.fsdp=2,train.grad_accum_steps=2", "sp", False),
    "umup_2x4x1_k2_gather_once": (
        "", ",mesh.data=2,mesh.fsdp=4,train.grad_accum_steps=2,train.fsdp_gather_once=True",
        "umup", False),
    "umup_2x4x1_k2_gather_reduce_once": (
        "", ",mesh.data=2,mesh.fsdp=4,train.grad_accum_steps=2,train.fsdp_gather_once=True"
        ",train.fsdp_reduce_once=True", "umup", True),
    "sp_2x2x2_k2_reduce_once_scan_chunks": (
        ",model.scan_layers=True,model.loss_chunks=2",
        ",mesh.data=2,mesh.fsdp=2,mesh.tensor=2,train.grad_accum_steps=2"
        ",train.fsdp_reduce_once=True", "sp", False),
}


def one_step_grads(parametrization, arg, devices, with_stats, params):
    """One jitted loss-and-gradients call of config ``arg`` on ``devices`` at the host
    ``params``, placed on the run's shardings (initialisation gives the same values on every
    mesh, so one init program serves every mesh of a model)."""
    run = train_lib.build_run(config_lib.proxy_config(parametrization, arg), devices)
    params = jax.device_put(params, run.state_sharding["params"])
    ids = np.random.default_rng(0).integers(0, 256, (16, 33)).astype(np.int32)
    batch = train_lib.to_global(run, {"inputs": ids[:, :32], "targets": ids[:, 1:]})
    (loss, acts), (grads, probe_grads) = jax.jit(train_lib.make_grad_fn(run, with_stats))(
        params, batch)
    return (bool(train_lib.accumulation_replica_axes(run)),
            jax.device_get((loss, acts, grads, probe_grads)))


# The chunked loss without accumulation on meshes that split the batch (its backward sums each
# batch replica's readout gradient apart, loss_chunks.py): the same comparison with one device.
# FP8 with statistics: the FP8 probes' gradients (cast statistics) are compared too.
CHUNK_VARIANTS = {
    "umup_8x1x1_chunks4_fp8": (",model.loss_chunks=4,model.fp8=paper_simple", ",mesh.data=8",
                               "umup", True),
    "umup_2x4x1_chunks4": (",model.loss_chunks=4", ",mesh.data=2,mesh.fsdp=4", "umup", True),
    "sp_2x2x2_chunks2_scan": (",model.loss_chunks=2,model.scan_layers=True",
                              ",mesh.data=2,mesh.fsdp=2,mesh.tensor=2", "sp", False),
}


def accumulation_over_replicas(variants=ACCUM_VARIANTS):
    """{variant: {"split": vmapped over the replicas, "max_rel": the largest RMS difference
    over RMS of loss, activation RMS, gradients and FP8 probe gradients, "leaves": how
    many}}."""
    out, refs, inits = {}, {}, {}
    for name, (model_arg, mesh_arg, parametrization, stats) in variants.items():
        model = (parametrization, model_arg)  # variants that share one model's parameters
        if model not in inits:
            run = train_lib.build_run(config_lib.proxy_config(parametrization,
                                                              ACCUM_ARG + model_arg),
                                      jax.devices()[:1])
            inits[model] = jax.device_get(train_lib.make_init_fn(run)(jax.random.key(0))["params"])
        key = (parametrization, model_arg, stats)  # variants that share one device's step
        if key not in refs:
            refs[key] = one_step_grads(parametrization, ACCUM_ARG + model_arg,
                                       jax.devices()[:1], stats, inits[model])[1]
        ref = refs[key]
        split, got = one_step_grads(parametrization, ACCUM_ARG + model_arg + mesh_arg,
                                    jax.devices(), stats, inits[model])
        assert jax.tree.structure(ref) == jax.tree.structure(got), name
        rel = [float(np.sqrt(np.mean((np.float64(a) - b) ** 2)) / np.sqrt(np.mean(
            np.float64(a) ** 2))) for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got))]
        out[name] = {"split": split, "max_rel": max(rel), "leaves": len(rel)}
    return out


def step_collectives(arg, rows, patches=()):
    """The collectives of the compiled u-μP train step of config ``arg`` on all 8 devices at
    ``rows`` sequences (:func:`umup_jax.hlo_traffic.collectives`) and the params' fp32 and
    the readout's bytes; ``patches``: (module, name, value) set while the step is traced."""
    run = train_lib.build_run(config_lib.proxy_config("umup", arg), jax.devices())
    saved = [(module, name, getattr(module, name)) for module, name, _ in patches]
    for module, name, value in patches:
        setattr(module, name, value)
    try:
        step = train_lib.make_train_step(run, with_stats=False)
        batch = {k: jax.ShapeDtypeStruct((rows, 32), np.int32, sharding=run.batch_sharding)
                 for k in ("inputs", "targets")}
        hlo = step.lower(run.abstract_state, batch).compile().as_text()
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
    out = hlo_traffic.collectives(hlo)
    assert out.pop("unknown_trip_counts") == 0
    params = run.abstract_state["params"]
    out["param_bytes"] = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    out["readout_bytes"] = params["params"]["readout"].size * 4
    return out


def accumulation_collectives(split):
    """Mesh 8x1x1 with 4 micro-batches and the chunked loss; ``split=False`` forces the plain
    accumulation loop, as before the vmap."""
    return step_collectives(
        ACCUM_ARG.replace("batch_size=16", "batch_size=32")
        + ",model.loss_chunks=2,mesh.data=8,train.grad_accum_steps=4", 32,
        () if split else [(train_lib, "splits_over_data_replicas", lambda run: False)])


def chunked_loss_collectives(mesh_arg, per_replica):
    """``model.loss_chunks=4`` without accumulation on the mesh of ``mesh_arg``;
    ``per_replica=False`` takes away the chunked loss's per-replica sums
    (``sharding.batch_replicas``), as before them."""
    return step_collectives(
        ACCUM_ARG + ",model.loss_chunks=4" + mesh_arg, 16,
        () if per_replica else [(sharding_lib, "batch_replicas", lambda: None)])


def fsdp_once_collectives(reduce_once):
    """Mesh 2x4x1 with 4 micro-batches and ``train.fsdp_gather_once``, with or without
    ``train.fsdp_reduce_once``."""
    return step_collectives(
        ACCUM_ARG.replace("batch_size=16", "batch_size=32")
        + ",mesh.data=2,mesh.fsdp=4,train.grad_accum_steps=4,train.fsdp_gather_once=True"
        + f",train.fsdp_reduce_once={reduce_once}", 32)


def main(outdir):
    result = {"losses": {}, "sharding_ok": {}, "bytes": {}}
    states = {}
    for name, mesh in MESHES.items():
        run = build(mesh)
        if name in TRAINED:
            state, result["losses"][name] = train(run)
        else:
            state = train_lib.make_init_fn(run)(jax.random.key(0))
        states[name] = (run, state)
        boxed = jax.eval_shape(lambda k: {"params": Decoder(run.model_cfg).init(
            k, np.zeros((1, run.model_cfg.seq_len), np.int32))["params"]}, jax.random.key(0))
        expected = sharding_lib.param_specs(boxed)
        got = jax.tree.map(lambda x: x.sharding.spec, state["params"])
        flat_e = jax.tree_util.tree_flatten_with_path(
            expected, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0]
        flat_g = dict((jax.tree_util.keystr(p), s) for p, s in jax.tree_util.tree_flatten_with_path(
            got, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0])
        result["sharding_ok"][name] = {
            jax.tree_util.keystr(p): [spec_tuple(s), spec_tuple(flat_g[jax.tree_util.keystr(p)])]
            for p, s in flat_e}
        result["bytes"][name] = sharding_lib.per_device_bytes(
            {"params": state["params"], "opt_state": state["opt_state"]})

    # Save on 2x4x1 after 3 steps; restore on 4x2x1 and on 1 device.
    run_a, state_a = states["2x4x1"]
    store = CheckpointStore(f"{outdir}/ckpt", keep=2)
    store.save(3, state_a, {"next_index": 3}, {})
    nxt = batches(run_a, 1, skip=3)[0]
    step_a = train_lib.make_train_step(run_a, with_stats=False)
    ref_params = jax.device_get(state_a["params"])
    new_a, m_a = step_a(state_a, train_lib.to_global(run_a, nxt))
    after_a = jax.device_get(new_a["params"])
    result["restore"] = {"2x4x1": float(m_a["loss"])}
    result["stream_specs"] = stream_specs(run_a, new_a, train_lib.to_global(run_a, nxt))
    result["collectives"] = collectives(train_lib.build_run(
        config_lib.proxy_config("umup", STREAM_ARG), jax.devices()))
    for name in ("4x2x1", "1"):
        run_b = states[name][0]
        step_no, restored, data_state = CheckpointStore(f"{outdir}/ckpt", keep=2).restore_latest(
            run_b.abstract_state)
        same = all(np.array_equal(a, b) for a, b in zip(
            jax.tree.leaves(ref_params), jax.tree.leaves(jax.device_get(restored["params"]))))
        shard_ok = all(x.sharding == s for x, s in zip(
            jax.tree.leaves(restored), jax.tree.leaves(run_b.state_sharding)))
        new_b, m_b = train_lib.make_train_step(run_b, with_stats=False)(
            restored, train_lib.to_global(run_b, nxt))
        result["restore"][name] = float(m_b["loss"])
        # The update after the restore (per-parameter LRs rebuilt from the model definition,
        # Adam moments from the checkpoint) equals the one on the original mesh.
        result["restore"][name + "_update_max_rel"] = max(
            float(np.max(np.abs(a - b)) / (np.max(np.abs(a)) + 1e-30))
            for a, b in zip(jax.tree.leaves(after_a), jax.tree.leaves(jax.device_get(new_b["params"]))))
        result["restore"][name + "_params_equal"] = same
        result["restore"][name + "_sharding_ok"] = shard_ok
        result["restore"][name + "_data_state"] = data_state

    # FP8 (paper_simple) under FSDP × data × tensor sharding: same losses as one device.
    fp8_cfg = {}
    for name, mesh in (("1", None), ("2x2x2", (2, 2, 2))):
        cfg = config(mesh)
        cfg.model.fp8 = "paper_simple"
        _, fp8_cfg[name] = train(train_lib.build_run(cfg, devices(mesh)))
    result["fp8_losses"] = fp8_cfg

    errors = {}
    for label, mesh, extra in [
        ("mesh_size", (3, 1, 1), None),
        ("indivisible_dim", (1, 1, 8), None),
        ("batch", (1, 8, 1), 4),
    ]:
        cfg = config(mesh)
        if extra:
            cfg.train.batch_size = extra
        try:
            train_lib.build_run(cfg, jax.devices())
            errors[label] = None
        except ValueError as e:
            errors[label] = str(e)
    result["errors"] = errors
    result["accum"] = accumulation_over_replicas()
    result["accum_collectives"] = {"split": accumulation_collectives(True),
                                   "plain": accumulation_collectives(False)}
    result["fsdp_once_collectives"] = {"gather": fsdp_once_collectives(False),
                                       "gather_reduce": fsdp_once_collectives(True)}
    result["chunks"] = accumulation_over_replicas(CHUNK_VARIANTS)
    result["chunks_collectives"] = {
        f"{mesh}_{label}": chunked_loss_collectives(arg, label == "per_replica")
        for mesh, arg in (("8x1x1", ",mesh.data=8"), ("2x4x1", ",mesh.data=2,mesh.fsdp=4"))
        for label in ("per_replica", "plain")}
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
