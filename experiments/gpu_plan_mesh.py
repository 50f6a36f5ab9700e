"""The trainer's step for one host of 8 H100s, compiled ahead of time on a machine without
one: per-device memory and what each mesh and gradient accumulation costs in collectives.

``experiments/gpu_plan.py`` plans the speed table's one-GPU rows; this plans a sharded run
(``umup_jax.train``'s own jitted step: forward, backward, AdamW, donated state) of the ~1B
model (width 2048, depth 16, heads of 64, seq 2048, vocab 32000, ``remat=full``, BF16, XLA
attention) on the abstract 8-GPU host of :func:`umup_jax.gpu_target.h100_devices` for each
``mesh`` (data × fsdp × tensor) and ``train.grad_accum_steps`` (FSDP meshes with accumulation also with
``train.fsdp_gather_once``, and with it and ``train.fsdp_reduce_once``), at a global batch of 64
sequences (131,072 tokens).  Nothing runs and nothing is autotuned.  Per row:

* ``step_memory_gib``: the compiled step's plan on one device (arguments + outputs +
  temporaries − donated aliases), ``fits_h100`` whether it is within
  the 59.3 GiB JAX's allocator takes of an H100 by default (75% of 79.1 GiB);
* ``<kind>_gib``: each collective's operand bytes per step and device
  (:func:`umup_jax.hlo_traffic.collectives`), ``collectives_in_loops`` / ``_outside`` their
  launches, ``wire_gib`` what each device sends (ring algorithms, by group size);
* bounds, not step times: ``bf16_gemm_ms_at_peak`` (model FLOPs over 8 devices at the dense
  BF16 peak), ``other_ms_at_hbm`` (the device's non-GEMM traffic at 3.35 TB/s) and
  ``collective_ms_at_nvlink`` (the wire bytes at NVLink 4's 450 GB/s per direction; XLA
  overlaps collectives with compute where it can).

Writes ``OUT/gpu_plan_mesh.csv`` and ``OUT/gpu_plan_mesh.png``.

Usage (the CUDA plugin of the installed JAX on the path, BUILD.md "Tests")::

    JAX_PLATFORMS=cpu PYTHONPATH=.cuda-plugin python experiments/gpu_plan_mesh.py
        [--out experiments/results/gpu_plan_mesh] [--meshes 8x1x1,1x8x1,2x4x1]
        [--accum 1,4] [--fp8 none] [--loss-chunks 1]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))
sys.path.append(str(ROOT / "experiments"))

import bench_gpu  # noqa: E402
from gpu_plan import GIB, H100_HBM_BYTES_PER_S  # noqa: E402
from umup_jax import hlo_traffic  # noqa: E402

NVLINK_BYTES_PER_S = 450e9  # H100 SXM, NVLink 4: 18 links of 25 GB/s each way
BATCH = 64  # global batch of the plan: 64 × 2048 tokens
KINDS = hlo_traffic.COLLECTIVES
COLUMNS = ("shape", "mesh", "grad_accum_steps", "fsdp_gather_once", "fsdp_reduce_once",
           "loss_chunks", "fp8", "batch",
           "seq", "params", "compile_s",
           "step_memory_gib", "temp_memory_gib", "fits_h100",
           *(k.replace("-", "_") + "_gib" for k in KINDS), "collectives_in_loops",
           "collectives_outside", "wire_gib", "bf16_gemm_ms_at_peak", "other_ms_at_hbm",
           "collective_ms_at_nvlink", "error")
_sig = bench_gpu.four_digits


def row_config(shape: str, mesh: str, accum: int, fp8: str, batch: int,
               gather_once: bool = False, loss_chunks: int = 1, reduce_once: bool = False):
    """The trainer's config of a row: ``shape`` of :data:`bench_gpu.SHAPES`, ``mesh``
    ``"DxFxT"``, ``model.loss_chunks``, on the bundled corpus's tokens (only their shapes
    matter here)."""
    from umup_jax import config as config_lib

    s = bench_gpu.SHAPES[shape]
    data, fsdp, tensor = (int(x) for x in mesh.split("x"))
    return config_lib.proxy_config("umup", ",".join([
        "smoke", f"model.width={s['width']}", f"model.depth={s['depth']}",
        f"model.num_heads={s['width'] // bench_gpu.HEAD_DIM}", f"model.seq_len={s['seq']}",
        f"model.vocab_size={bench_gpu.VOCAB}", "model.dtype=bfloat16",
        "model.attention_impl=xla", f"model.remat={s['remat']}", f"model.fp8={fp8}",
        f"train.batch_size={batch}", f"train.eval_batch_size={data * fsdp}",
        f"train.grad_accum_steps={accum}", f"train.fsdp_gather_once={gather_once}",
        f"train.fsdp_reduce_once={reduce_once}", f"model.loss_chunks={loss_chunks}",
        f"mesh.data={data}", f"mesh.fsdp={fsdp}",
        f"mesh.tensor={tensor}"]))


def plan_row(shape: str, mesh: str, accum: int, fp8: str, batch: int, devices,
             gather_once: bool = False, loss_chunks: int = 1,
             reduce_once: bool = False) -> dict:
    """One row compiled for ``devices`` (8 abstract H100s; on this CPU in the tests)."""
    import jax
    import jax.numpy as jnp

    from umup_jax import memory_plan, throughput
    from umup_jax import train as train_lib
    from umup_jax.gpu_target import H100_ALLOCATOR_BYTES, H100_DEVICE_KIND

    cfg = row_config(shape, mesh, accum, fp8, batch, gather_once, loss_chunks, reduce_once)
    run = train_lib.build_run(cfg, devices=list(devices))
    seq = run.model_cfg.seq_len
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=run.batch_sharding)
    t0 = time.perf_counter()
    compiled = train_lib.make_train_step(run, with_stats=False).lower(
        run.abstract_state, {"inputs": tokens, "targets": tokens}).compile()
    compile_s = time.perf_counter() - t0
    text = compiled.as_text()
    found = hlo_traffic.collectives(text)
    other = hlo_traffic.traffic(text)["other"]["bytes"]
    step_bytes = memory_plan.compiled_step_bytes(compiled)
    flops = throughput.train_flops_per_token(run.model_cfg) * batch * seq / len(devices)
    wire = sum(found.get(k, {}).get("wire_bytes", 0.0) for k in KINDS)
    return {
        "shape": shape, "mesh": mesh, "grad_accum_steps": accum,
        "fsdp_gather_once": gather_once, "fsdp_reduce_once": reduce_once,
        "loss_chunks": loss_chunks, "fp8": fp8,
        "batch": batch, "seq": seq,
        "params": sum(x.size for x in jax.tree.leaves(run.abstract_state["params"])),
        "compile_s": round(compile_s, 1),
        "step_memory_gib": _sig(step_bytes / GIB),
        "temp_memory_gib": _sig(compiled.memory_analysis().temp_size_in_bytes / GIB),
        "fits_h100": step_bytes <= H100_ALLOCATOR_BYTES,
        **{k.replace("-", "_") + "_gib": _sig(found.get(k, {}).get("bytes", 0.0) / GIB)
           for k in KINDS},
        "collectives_in_loops": sum(found.get(k, {}).get("in_loops", 0) for k in KINDS),
        "collectives_outside": sum(found.get(k, {}).get("outside", 0) for k in KINDS),
        "wire_gib": _sig(wire / GIB),
        "bf16_gemm_ms_at_peak": _sig(flops / throughput.peak_flops(H100_DEVICE_KIND,
                                                                   "bfloat16") * 1e3),
        "other_ms_at_hbm": _sig(other / H100_HBM_BYTES_PER_S * 1e3),
        "collective_ms_at_nvlink": _sig(wire / NVLINK_BYTES_PER_S * 1e3),
        "error": "",
    }


def plot(rows: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if not r["error"]]
    labels = [f"{r['mesh']}\nk={r['grad_accum_steps']}"
              + ("\ngather once" if r["fsdp_gather_once"] else "")
              + ("\nreduce once" if r.get("fsdp_reduce_once") else "") for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    bottom = [0.0] * len(rows)
    for kind in KINDS:
        col = kind.replace("-", "_") + "_gib"
        values = [r[col] for r in rows]
        if any(values):
            axes[0].bar(labels, values, bottom=bottom, label=kind)
            bottom = [b + v for b, v in zip(bottom, values)]
    axes[0].set_ylabel("collective operand bytes per step and device (GiB)")
    axes[0].legend(fontsize=8)
    axes[1].bar(labels, [r["step_memory_gib"] for r in rows], color="tab:gray")
    axes[1].set_ylabel("compiled step memory per device (GiB)")
    for ax in axes:
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"the trainer's step of the ~1B model on 8 H100s, compiled ahead of time "
                 f"(global batch {rows[0]['batch'] if rows else BATCH} × 2048, BF16, remat)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "experiments" / "results" / "gpu_plan_mesh"))
    p.add_argument("--meshes", default="8x1x1,1x8x1,2x4x1",
                   help="comma-separated data x fsdp x tensor, 8 devices each")
    p.add_argument("--accum", default="1,4", help="comma-separated train.grad_accum_steps")
    p.add_argument("--fp8", default="none", choices=bench_gpu.FP8)
    p.add_argument("--batch", type=int, default=BATCH, help="global batch (sequences)")
    p.add_argument("--loss-chunks", type=int, default=1,
                   help="model.loss_chunks of every row (a divisor of the sequence, 2048)")
    args = p.parse_args(argv)
    if args.loss_chunks < 1:
        p.error(f"--loss-chunks={args.loss_chunks} is invalid: it must be >= 1")
    meshes = [m.strip() for m in args.meshes.split(",") if m.strip()]
    for m in meshes:
        parts = m.split("x")
        if len(parts) != 3 or not all(x.isdigit() and int(x) > 0 for x in parts):
            p.error(f"--meshes {m!r} is not DATAxFSDPxTENSOR (e.g. 2x4x1)")
        if int(parts[0]) * int(parts[1]) * int(parts[2]) != 8:
            p.error(f"--meshes {m!r} does not have 8 devices")
    try:
        accums = [int(k) for k in args.accum.split(",") if k.strip()]
    except ValueError:
        p.error(f"--accum {args.accum!r} is not a comma-separated list of integers")
    from umup_jax import gpu_target

    try:
        devices = gpu_target.h100_devices(8)
    except gpu_target.GpuTargetUnavailable as e:
        sys.exit(f"gpu_plan_mesh.py: {e}")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, t0 = [], time.time()
    # FSDP meshes with accumulation also with train.fsdp_gather_once, and with it and
    # train.fsdp_reduce_once.
    todo = [(m, k, once, reduce) for m in meshes for k in accums
            for once, reduce in (((False, False), (True, False), (True, True))
                                 if int(m.split("x")[1]) > 1 and k > 1 else ((False, False),))]
    for i, (mesh, accum, once, reduce) in enumerate(todo):
        try:
            row = plan_row("1b", mesh, accum, args.fp8, args.batch, devices, once,
                           args.loss_chunks, reduce)
        except Exception as e:  # noqa: BLE001 - a row that does not build is a result
            row = {"shape": "1b", "mesh": mesh, "grad_accum_steps": accum,
                   "fsdp_gather_once": once, "fsdp_reduce_once": reduce,
                   "loss_chunks": args.loss_chunks,
                   "fp8": args.fp8, "batch": args.batch,
                   "error": f"{type(e).__name__}: {str(e)[:300]}"}
        rows.append(row)
        bench_gpu.write_rows(rows, out / "gpu_plan_mesh.csv", COLUMNS)  # after each row
        print(f"[{i + 1}/{len(todo)}] mesh {mesh} k={accum}"
              + (" gather once" if once else "") + (" reduce once" if reduce else "")
              + (f" loss_chunks={args.loss_chunks}" if args.loss_chunks > 1 else "") + ": " + (
            f"compile {row['compile_s']:5.1f} s  memory {row['step_memory_gib']:6.2f} GiB  "
            f"collectives {row['collectives_in_loops']} in loops + "
            f"{row['collectives_outside']} outside, wire {row['wire_gib']:.2f} GiB = "
            f"{row['collective_ms_at_nvlink']:.1f} ms at NVLink; GEMMs at peak "
            f"{row['bf16_gemm_ms_at_peak']:.1f} ms" if not row["error"] else row["error"]),
            flush=True)
    print(f"\n{len(rows)} rows in {time.time() - t0:.0f} s: {out / 'gpu_plan_mesh.csv'}")
    plot(rows, out / "gpu_plan_mesh.png")
    print(f"plot: {out / 'gpu_plan_mesh.png'}")


if __name__ == "__main__":
    main()
