"""bench_gpu.py's rows compiled for an H100 on a machine without one: what each step holds and
moves, before any GPU time is spent.

Each row of the speed table (``experiments/bench_gpu.py``: the proxy shapes at widths 256 to
4096 and the ~1B model; BF16 and the FP8 presets; our u-μP step and the plain Flax Llama) is
built with abstract parameters (nothing initialised) and compiled by XLA's GPU pipeline for an
abstract H100 SXM 80GB (:mod:`umup_jax.gpu_target`; nothing runs, nothing is autotuned, so
XLA takes its defaults where it would time kernels).  Per row:

* ``step_memory_gib``: the compiled step's plan (arguments + outputs + temporaries − donated
  aliases; ``temp_memory_gib`` the temporaries alone), and ``fits_h100`` whether it is within
  the 59.3 GiB JAX's allocator takes of the device's 79.1 GiB by default (75%,
  ``XLA_PYTHON_CLIENT_MEM_FRACTION``; the limit the trainer checks, :mod:`umup_jax.memory_plan`);
* ``kernels``, ``gemm_kernels``, ``gemm_traffic_gib``, ``other_traffic_gib``: kernel launches
  per step and the bytes their operands and results take (:mod:`umup_jax.hlo_traffic`, an
  estimate from above);
* ``bf16_gemm_ms_at_peak``: model FLOPs per step (:func:`umup_jax.throughput.train_flops_per_token`)
  over the H100's dense BF16 peak, the least time its GEMMs take (FP8 GEMMs can take half);
  ``other_ms_at_hbm``: the non-GEMM traffic over HBM3's 3.35 TB/s, the least time the rest
  takes.  Neither is a measurement: ``bench_gpu.py`` measures;
* the FP8 GEMM columns of ``bench_gpu.py`` (which GEMMs of the FP8 groups take f8 operands,
  in cuBLASLt or Triton, with XLA's untuned defaults).

cuDNN attention rows are left out: cuDNN builds its kernels when XLA compiles them, which
needs the library and a GPU.

Writes ``OUT/gpu_plan.csv`` and ``OUT/gpu_plan.png`` and prints, per shape, our step against
the plain Llama's (traffic other than GEMMs, kernels, memory).

Usage (the plugin of the installed JAX on the path, BUILD.md "Tests")::

    JAX_PLATFORMS=cpu PYTHONPATH=.cuda-plugin python experiments/gpu_plan.py
        [--out experiments/results/gpu_plan] [--shapes proxy256,…,1b]
        [--scan (our model with model.scan_layers; default out …/gpu_plan_scan)]
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
from umup_jax.gpu_target import (H100_ALLOCATOR_BYTES, H100_DEVICE_KIND,  # noqa: E402
                                 H100_MEMORY_BYTES)

H100_HBM_BYTES_PER_S = 3.35e12
COLUMNS = ("shape", "model", "fp8", "attention", "width", "depth", "heads", "seq", "batch",
           "remat", "scan", "params", "compile_s", "step_memory_gib", "temp_memory_gib",
           "fits_h100", "kernels", "gemm_kernels", "gemm_traffic_gib", "other_traffic_gib",
           "bf16_gemm_ms_at_peak", "other_ms_at_hbm", "fp8_gemms_cublaslt", "fp8_gemms_triton",
           "upcast_gemms", "fp8_dots_elsewhere", "error")
GIB = 2.0**30
_sig = bench_gpu.four_digits


def plan_row(row: dict, sharding=None) -> dict:
    """One row compiled for ``sharding``'s device (default: this process's default device,
    which is how the tests run it on the CPU)."""
    import jax
    import jax.numpy as jnp

    import bench_overhead as plain_lib
    from umup_jax import gpu_target, hlo_traffic, memory_plan, throughput

    shape = bench_gpu.SHAPES[row["shape"]]
    cfg, model, params, opt = bench_gpu.build_row(row, abstract=True)
    opt_state = jax.eval_shape(opt.init, params)
    tokens = jax.ShapeDtypeStruct((shape["batch"], shape["seq"]), jnp.int32)
    args = (params, opt_state, tokens, tokens)
    if sharding is not None:
        args = gpu_target.abstract(args, sharding)
    step = plain_lib.make_train_step(model, opt)
    t0 = time.perf_counter()
    compiled = step.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    text = compiled.as_text()
    traffic = hlo_traffic.traffic(text)
    step_bytes = memory_plan.compiled_step_bytes(compiled)
    temp = compiled.memory_analysis().temp_size_in_bytes
    flops = throughput.train_flops_per_token(cfg) * shape["batch"] * shape["seq"]
    peak = throughput.peak_flops(H100_DEVICE_KIND, "bfloat16")
    gemms = bench_gpu.fp8_gemm_kinds(text, cfg.fp8_policy if row["model"] == "umup" else {})
    return {
        **row, "width": cfg.width, "depth": cfg.depth, "heads": cfg.num_heads,
        "seq": shape["seq"], "batch": shape["batch"], "remat": shape["remat"],
        "params": sum(x.size for x in jax.tree.leaves(params)),
        "compile_s": round(compile_s, 1),
        "step_memory_gib": _sig(step_bytes / GIB),
        "temp_memory_gib": _sig(temp / GIB),
        "fits_h100": step_bytes <= H100_ALLOCATOR_BYTES,
        "kernels": traffic["total"]["kernels"], "gemm_kernels": traffic["gemm"]["kernels"],
        "gemm_traffic_gib": _sig(traffic["gemm"]["bytes"] / GIB),
        "other_traffic_gib": _sig(traffic["other"]["bytes"] / GIB),
        "bf16_gemm_ms_at_peak": _sig(flops / peak * 1e3),
        "other_ms_at_hbm": _sig(traffic["other"]["bytes"] / H100_HBM_BYTES_PER_S * 1e3),
        **gemms, "error": "",
    }


def summary(rows: list[dict]) -> list[str]:
    out = []
    for shape in bench_gpu.SHAPES:
        ours = bench_gpu.find(rows, shape=shape, model="umup", fp8="none")
        plain = bench_gpu.find(rows, shape=shape, model="plain")
        if ours and plain:
            out.append(
                f"{shape}: ours / plain Llama: non-GEMM traffic {ours['other_traffic_gib']:.2f}"
                f" / {plain['other_traffic_gib']:.2f} GiB = "
                f"{ours['other_traffic_gib'] / plain['other_traffic_gib']:.3f}, kernels "
                f"{ours['kernels']} / {plain['kernels']}, step memory "
                f"{ours['step_memory_gib']:.2f} / {plain['step_memory_gib']:.2f} GiB; "
                f"bounds {ours['bf16_gemm_ms_at_peak']:.2f} ms (GEMMs at peak) + "
                f"{ours['other_ms_at_hbm']:.2f} / {plain['other_ms_at_hbm']:.2f} ms (rest at "
                "HBM bandwidth)")
    too_big = [r for r in rows if not r.get("error") and not r["fits_h100"]]
    out.append("every row fits the 59.3 GiB JAX's allocator takes of an H100's 79.1 GiB"
               if not too_big else "do not fit an H100's 59.3 GiB: " + ", ".join(
                   f"{r['shape']} {r['model']} {r['fp8']} ({r['step_memory_gib']} GiB)"
                   for r in too_big))
    failed = [r for r in rows if r.get("error")]
    if failed:
        out.append(f"{len(failed)} rows failed to compile: " + "; ".join(
            f"{r['shape']} {r['model']} {r['fp8']}: {r['error']}" for r in failed))
    return out


def plot(rows: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [("umup", "none"), ("umup", "paper_simple"), ("umup", "paper_large"),
             ("plain", "none")]
    shapes = [s for s in bench_gpu.SHAPES if any(r["shape"] == s for r in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(kinds)
    for j, (model, fp8) in enumerate(kinds):
        found = [bench_gpu.find(rows, shape=s, model=model, fp8=fp8) for s in shapes]
        xs = [i + j * width for i, r in enumerate(found) if r]
        label = "plain Llama (bf16)" if model == "plain" else f"u-μP {fp8}"
        axes[0].bar(xs, [r["other_traffic_gib"] for r in found if r], width, label=label)
        axes[1].bar(xs, [r["step_memory_gib"] for r in found if r], width, label=label)
    for ax, label in zip(axes, ("traffic of kernels other than GEMMs per step (GiB)",
                                "compiled step memory (GiB)")):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))], shapes)
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.grid(alpha=0.3, axis="y")
    axes[1].axhline(H100_MEMORY_BYTES / GIB, color="k", ls=":", label="H100 memory")
    axes[1].axhline(H100_ALLOCATOR_BYTES / GIB, color="k", ls="--",
                    label="JAX's allocator by default (75%)")
    axes[1].legend(fontsize=7)
    scanned = any(r.get("scan") for r in rows)
    fig.suptitle("bench_gpu.py's rows compiled for an H100 ahead of time (XLA attention"
                 + (", our blocks scanned)" if scanned else ")"))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None,
                   help="default experiments/results/gpu_plan (gpu_plan_scan with --scan)")
    p.add_argument("--shapes", default=",".join(bench_gpu.SHAPES),
                   help=f"comma-separated subset of {list(bench_gpu.SHAPES)}")
    p.add_argument("--scan", action="store_true", help="our model with model.scan_layers")
    args = p.parse_args(argv)
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = sorted(set(shapes) - set(bench_gpu.SHAPES))
    if unknown:
        p.error(f"--shapes {unknown} are unknown: choose from {list(bench_gpu.SHAPES)}")
    from umup_jax import gpu_target

    try:
        sharding = gpu_target.h100_sharding()
    except gpu_target.GpuTargetUnavailable as e:
        sys.exit(f"gpu_plan.py: {e}")
    out = pathlib.Path(args.out or ROOT / "experiments" / "results" /
                       ("gpu_plan_scan" if args.scan else "gpu_plan"))
    out.mkdir(parents=True, exist_ok=True)
    todo = [r for r in bench_gpu.rows_for(shapes, args.scan) if r["attention"] == "xla"]
    order = {s: i for i, s in enumerate(bench_gpu.SHAPES)}
    todo.sort(key=lambda r: order[r["shape"]])
    rows = []
    t0 = time.time()
    for i, row in enumerate(todo):
        try:
            result = plan_row(row, sharding)
        except Exception as e:  # noqa: BLE001 - a row that does not compile is a result
            result = {**row, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        rows.append(result)
        bench_gpu.write_rows(rows, out / "gpu_plan.csv", COLUMNS)  # after each row
        print(f"[{i + 1}/{len(todo)}] {row['shape']:9s} {row['model']:5s} {row['fp8']:12s} "
              + (f"compile {result['compile_s']:5.1f} s  memory {result['step_memory_gib']:7.2f}"
                 f" GiB  kernels {result['kernels']:5d}  traffic GEMM "
                 f"{result['gemm_traffic_gib']:8.2f} + other {result['other_traffic_gib']:8.2f}"
                 " GiB" if not result["error"] else result["error"]), flush=True)
    print(f"\n{len(rows)} rows in {time.time() - t0:.0f} s: {out / 'gpu_plan.csv'}")
    for line in summary(rows):
        print(line)
    plot(rows, out / "gpu_plan.png")
    print(f"plot: {out / 'gpu_plan.png'}")


if __name__ == "__main__":
    main()
