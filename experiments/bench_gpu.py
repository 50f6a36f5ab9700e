"""The GPU speed table: step time, tokens/s, MFU and peak memory of the u-μP train step.

Rows (issue 11):

* the paper's proxy shapes (Table 5): depth 4, heads of 64 (4 heads at width 256, width/64
  heads above), seq 256, batch 64, vocab 32000, at widths 256, 1024, 2048, 4096;
* a ~1B model: width 2048, depth 16 (32 heads of 64), seq 2048, batch 8, ``remat='full'``
  (1.07 B parameters in the blocks, 1.20 B with embedding and readout);

each under {BF16, FP8 ``paper_simple``, FP8 ``paper_large``} × {xla, cudnn} attention, all in
``model.dtype='bfloat16'`` (params and optimizer state fp32), and for every shape the plain
Flax Llama of ``experiments/bench_overhead.py`` (``PlainLlama``: ``nn.Dense``, SP, optax AdamW,
XLA attention; with ``nn.remat`` blocks for the ~1B model) against our u-μP step with BF16 and
XLA attention, the same math FLOPs.  Not quite the same bytes: ours keeps its residual stream in
fp32 (``model.residual_dtype``'s default, for the accuracy BUILD.md's "BF16 numerics" gives),
the plain Llama in bf16, so where ours/plain misses its target, a row of ours with
``residual_dtype='bfloat16'`` tells that part of the cost from the rest.

Each row runs in a fresh subprocess (``--row JSON``), so that its peak device memory
(``memory_stats()['peak_bytes_in_use']``, ``peak_memory_gib``, which includes what the GEMM
autotuner held while compiling) is its own and an out-of-memory row fails alone;
``step_memory_gib`` is the compiled step's own plan (arguments, outputs, temporaries).
``kernels`` and ``other_traffic_gib`` are the compiled step's kernel launches and the memory
traffic of its kernels other than GEMMs (:mod:`umup_jax.hlo_traffic`, as ``gpu_plan.py``
estimates them ahead of time: set against ``step_ms``, they say how far the step is from its
bandwidth bound).
``fp8_gemms_cublaslt``, ``fp8_gemms_triton`` and ``upcast_gemms`` say how the compiled step
runs the GEMMs of the FP8 groups (:mod:`umup_jax.hlo_check`): XLA's autotuner gives each GEMM
to cuBLASLt or to a Triton kernel, and an upcast GEMM is one that does not take the FP8
operands (0 for BF16 rows); ``fp8_dots_elsewhere`` counts the FP8 groups' dots of f8 operands
in any other kind of kernel (a cuDNN GEMM fusion, say), which neither column above holds.  A row
compiles the jitted train step (forward, backward, optimizer update, donated state), runs
``--warmup`` untimed steps, then ``--steps`` timed steps (``block_until_ready`` after each)
and reports the median (``step_ms``; the targets and MFU use it); then ``--steps`` more
dispatched back to back and waited for once, as the train loop runs them
(``step_ms_pipelined``: without a wait and a dispatch per step, which weigh most where steps
are shortest, at width 256).  MFU = tokens/s × model FLOPs per token (:mod:`umup_jax.throughput`:
6·N + causal attention) / the device's dense BF16 peak (FP8 rows too: their MFU is against the
BF16 peak, so FP8 can exceed what BF16 reaches).

Writes ``OUT/bench_gpu.csv`` (one row per configuration), ``OUT/bench_gpu.png`` (tokens/s and
MFU per width; step-time ratios) and prints the issue's targets:

* FP8 ``paper_simple`` / BF16 step time at width 4096 ≤ 1/1.3 (stretch 1/1.6);
* BF16 MFU ≥ 45% at width 4096 and for the ~1B model;
* our u-μP step / the plain Llama step, same shapes, ≤ 1.05.

Usage (on a CUDA GPU; ``pip install -e ".[cuda12]"``)::

    python experiments/bench_gpu.py [--out experiments/results/bench_gpu] [--steps 20]
        [--shapes proxy256,proxy1024,proxy2048,proxy4096,1b] [--scan] [--budget-s 500]
        [--min-row-s 90] [--rerun]

Device time is scarce, so the table fills over as many calls as it takes: rows that feed the
targets run first (width 4096 BF16 and FP8 ``paper_simple``, our step and the plain Llama,
then the ~1B model, then the rest of the table); a call with ``--budget-s`` ends within that
many seconds (below); and every call merges its rows into the existing
``bench_gpu.csv`` (keyed by shape, model, FP8 preset, attention and scan), skipping rows
already measured without error unless ``--rerun``.  The plot and the target lines are drawn
from the merged table.  A row that runs past ``--row-timeout`` is recorded as an error row.
``--budget-s`` bounds the whole call: no row starts with less than ``--min-row-s`` left, and a
row still running when the budget ends is stopped and recorded as a timeout error row (it runs
again on the next call), so the call ends, table, plot and summary written, within the budget
plus the few seconds those take.
The parent process never initialises CUDA (a child reports the backend), so it holds no GPU
memory while the rows run.

On a machine without a CUDA GPU it stops at once with a message and exit status 1.
"""

from __future__ import annotations

import argparse
import csv
import json
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))
sys.path.append(str(ROOT / "experiments"))

VOCAB = 32000
SHAPES = {
    "proxy256": dict(width=256, depth=4, seq=256, batch=64, remat="none"),
    "proxy1024": dict(width=1024, depth=4, seq=256, batch=64, remat="none"),
    "proxy2048": dict(width=2048, depth=4, seq=256, batch=64, remat="none"),
    "proxy4096": dict(width=4096, depth=4, seq=256, batch=64, remat="none"),
    "1b": dict(width=2048, depth=16, seq=2048, batch=8, remat="full"),
}
FP8 = ("none", "paper_simple", "paper_large")
ATTENTION = ("xla", "cudnn")
HEAD_DIM = 64
COLUMNS = ("shape", "model", "fp8", "attention", "width", "depth", "heads", "seq", "batch",
           "remat", "scan", "params", "compile_s", "step_ms", "step_ms_min",
           "step_ms_pipelined", "tokens_per_s", "mfu", "peak_memory_gib", "step_memory_gib",
           "fp8_gemms_cublaslt", "fp8_gemms_triton", "upcast_gemms", "fp8_dots_elsewhere",
           "kernels", "other_traffic_gib", "loss", "device", "error")


def four_digits(x: float) -> float:
    """``x`` to 4 significant digits (table cells of GiB or ms from MiB to TiB)."""
    return float(f"{x:.4g}")


def require_gpu(backend: str, devices: str) -> None:
    if backend != "gpu":
        sys.exit(f"bench_gpu.py needs a CUDA GPU, but JAX's backend here is {backend!r} "
                 f"(devices: {devices}); on a GPU host install the CUDA build "
                 '(pip install -e ".[cuda12]", see BUILD.md) and run it there')


def backend_in_this_process() -> tuple[str, str]:
    import jax

    return jax.default_backend(), str(jax.devices())


def backend_in_a_child() -> tuple[str, str]:
    """JAX's backend and devices as a fresh process sees them, so that the parent never
    creates a CUDA client (which would hold most of the GPU's memory while the rows run)."""
    code = "import jax; print(jax.default_backend()); print(jax.devices())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or len(lines) < 2:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        sys.exit(f"bench_gpu.py could not start JAX in a child process: {tail}")
    return lines[-2], lines[-1]


# ---------------------------------------------------------------------------------------------
# One row (in its own process)
# ---------------------------------------------------------------------------------------------


def row_config(row: dict):
    """Our u-μP model's ``ModelConfig`` for a row (BF16 compute, the row's FP8 preset,
    attention kernel and layer layout; the shape's remat)."""
    from umup_jax import ModelConfig

    shape = SHAPES[row["shape"]]
    return ModelConfig(
        vocab_size=VOCAB, width=shape["width"], depth=shape["depth"],
        num_heads=shape["width"] // HEAD_DIM, ffn_expansion=4, seq_len=shape["seq"],
        parametrization="umup", dtype="bfloat16", fp8=row["fp8"],
        attention_impl=row["attention"], remat=shape["remat"], scan_layers=row["scan"],
    )


def build_row(row: dict, abstract: bool = False):
    """(config, model, params, optimizer) of a row: our u-μP decoder with its optimizer, or
    the plain Flax Llama (``model='plain'``: SP, BF16, XLA attention) with optax AdamW.
    ``abstract``: params as ``jax.ShapeDtypeStruct``s (nothing initialised, for compiling
    ahead of time)."""
    import jax
    import jax.numpy as jnp
    from flax.core import meta as flax_meta

    import bench_overhead as plain_lib
    from umup_jax import Decoder, OptimizerConfig, make_optimizer
    from umup_jax.model import init_params

    cfg = row_config(row)
    shape = SHAPES[row["shape"]]
    if row["model"] == "umup":
        model = Decoder(cfg)
        init = lambda: init_params(model, jax.random.key(0))  # noqa: E731
        # bench_overhead's Runner applies {"params": params}: the inner tree, as there.
        boxed = (jax.eval_shape(init) if abstract else init())["params"]
        opt = make_optimizer(OptimizerConfig(warmup_steps=100, total_steps=1000),
                             boxed, cfg.rule)
        return cfg, model, flax_meta.unbox(boxed), opt
    import optax

    model = plain_lib.PlainLlama(vocab_size=VOCAB, width=cfg.width, depth=cfg.depth,
                                 num_heads=cfg.num_heads, ffn_hidden=4 * cfg.width,
                                 dtype=jnp.bfloat16, remat=shape["remat"] != "none")
    init = lambda k: model.init(k, jnp.zeros((1, cfg.seq_len), jnp.int32))["params"]  # noqa: E731
    params = (jax.eval_shape(init, jax.random.key(0)) if abstract
              else jax.jit(init)(jax.random.key(0)))
    opt = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 1e-3, 100, 1000, 1e-4),
                      b1=0.9, b2=0.999, eps=1e-8, weight_decay=2.0**-13)
    return cfg, model, params, opt


def run_row(row: dict, steps: int, warmup: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import bench_overhead as plain_lib
    from umup_jax import hlo_traffic, memory_plan, throughput

    shape = SHAPES[row["shape"]]
    cfg, model, params, opt = build_row(row)
    seq, batch = cfg.seq_len, shape["batch"]
    rng = np.random.default_rng(0)
    data = rng.integers(0, VOCAB, size=(batch, seq + 1), dtype=np.int32)
    tokens, targets = jnp.asarray(data[:, :-1]), jnp.asarray(data[:, 1:])
    runner = plain_lib.Runner(row["model"], model, params, opt, tokens, targets)
    loss = runner.run(warmup, record=False)
    loss = runner.run(steps)
    step_s = statistics.median(runner.times)
    pipelined_s = runner.run_pipelined(steps)
    tokens_per_s = batch * seq / step_s
    device = jax.devices()[0]
    peak = throughput.peak_flops(device.device_kind, "bfloat16")
    memory = throughput.peak_memory_bytes([device])  # the process's high-water mark
    # the step alone; the peak above also holds what the GEMM autotuner allocated
    step_memory = memory_plan.compiled_step_bytes(runner.compiled)
    hlo = runner.compiled.as_text()
    gemms = fp8_gemm_kinds(hlo, cfg.fp8_policy if row["model"] == "umup" else {})
    traffic = hlo_traffic.traffic(hlo)
    return {
        **row, "width": cfg.width, "depth": cfg.depth, "heads": cfg.num_heads, "seq": seq,
        "batch": batch,
        "remat": shape["remat"], "params": runner.num_params,
        "compile_s": round(runner.compile_s, 2), "step_ms": round(step_s * 1e3, 3),
        "step_ms_min": round(min(runner.times) * 1e3, 3),
        "step_ms_pipelined": round(pipelined_s * 1e3, 3),
        "tokens_per_s": round(tokens_per_s, 1),
        "mfu": round(throughput.mfu(tokens_per_s, throughput.train_flops_per_token(cfg),
                                    peak, 1), 4),
        "peak_memory_gib": round(memory / 2**30, 3) if memory is not None else "",
        "step_memory_gib": round(step_memory / 2**30, 3) if step_memory is not None else "",
        **gemms, "kernels": traffic["total"]["kernels"],
        "other_traffic_gib": four_digits(traffic["other"]["bytes"] / 2**30),
        "loss": round(loss, 4), "device": device.device_kind, "error": "",
    }


def fp8_gemm_kinds(hlo_text: str, policy: dict) -> dict:
    """How the compiled step runs the GEMMs of the policy's FP8 groups (``umup_jax.hlo_check``):
    cuBLASLt FP8 calls, Triton GEMM fusions of FP8 operands (XLA's autotuner picks per GEMM),
    GEMMs of other operands (upcast: the cast happened, the FP8 GEMM did not), and dots of f8
    operands in kernels of any other kind (``fp8_dots_elsewhere``: neither cuBLASLt nor Triton,
    e.g. a cuDNN GEMM fusion; counted so that no FP8-group GEMM goes unreported).  All 0 for a
    BF16 row."""
    from umup_jax import hlo_check

    found = hlo_check.gemms_by_group(hlo_text)
    fp8_groups = [g for g, mode in policy.items() if mode != "bf16"]
    total = lambda kind: sum(found.get(g, {}).get(kind, 0) for g in fp8_groups)  # noqa: E731
    return {"fp8_gemms_cublaslt": total("fp8"), "fp8_gemms_triton": total("fp8_triton"),
            "upcast_gemms": total("other"), "fp8_dots_elsewhere": total("f8_dot")}


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------


# The rows the targets read, in the order they run (before the rest of the table):
# (shape, model, fp8, attention).
FIRST = (
    ("proxy4096", "umup", "none", "xla"), ("proxy4096", "umup", "paper_simple", "xla"),
    ("proxy4096", "plain", "none", "xla"), ("proxy4096", "umup", "none", "cudnn"),
    ("proxy4096", "umup", "paper_simple", "cudnn"), ("1b", "umup", "none", "cudnn"),
    ("1b", "umup", "none", "xla"), ("1b", "plain", "none", "xla"),
)
KEY = ("shape", "model", "fp8", "attention", "scan")


def key(row: dict) -> tuple:
    """A row's identity in the table."""
    return tuple(row[k] for k in KEY)


def rows_for(shapes: list[str], scan: bool) -> list[dict]:
    """Every row of ``shapes``, those in :data:`FIRST` first (in its order), then the rest in
    table order (shape by shape: each FP8 preset × attention, then the plain Llama)."""
    rows = []
    for shape in shapes:
        for fp8 in FP8:
            for attention in ATTENTION:
                rows.append(dict(shape=shape, model="umup", fp8=fp8, attention=attention,
                                 scan=scan))
        rows.append(dict(shape=shape, model="plain", fp8="none", attention="xla", scan=False))
    first = {f: i for i, f in enumerate(FIRST)}
    order = lambda ir: (first.get(key(ir[1])[:4], len(first)), ir[0])  # noqa: E731
    return [r for _, r in sorted(enumerate(rows), key=order)]


_INTS = ("width", "depth", "heads", "seq", "batch", "params", "fp8_gemms_cublaslt",
         "fp8_gemms_triton", "upcast_gemms", "fp8_dots_elsewhere", "kernels")
_FLOATS = ("compile_s", "step_ms", "step_ms_min", "step_ms_pipelined", "tokens_per_s", "mfu",
           "peak_memory_gib", "step_memory_gib", "other_traffic_gib", "loss")


def read_rows(path: pathlib.Path) -> list[dict]:
    """The rows of an existing ``bench_gpu.csv`` with their types back (numbers, ``scan``
    as a bool, empty cells as ``""``); ``[]`` when there is none."""
    if not path.exists():
        return []
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            row = dict(r)
            row["scan"] = r.get("scan") == "True"
            for k in _INTS + _FLOATS:
                if row.get(k) not in (None, ""):
                    row[k] = int(row[k]) if k in _INTS else float(row[k])
            rows.append(row)
    return rows


def merge(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` with each row of ``new`` replacing the row of the same :func:`key` (or added),
    in table order of shapes then the order rows first appeared."""
    merged = {key(r): r for r in old}
    for r in new:
        merged[key(r)] = r
    shapes = list(SHAPES)
    return sorted(merged.values(), key=lambda r: shapes.index(r["shape"])
                  if r["shape"] in shapes else len(shapes))


def write_rows(rows: list[dict], path: pathlib.Path, columns: tuple = COLUMNS) -> None:
    """``rows`` as a CSV of ``columns`` (other keys ignored), replacing ``path`` whole."""
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)  # a crash mid-write never leaves half a table


def run_in_subprocess(row: dict, args, timeout: float | None = None) -> dict:
    """One row in a fresh process, stopped after ``timeout`` seconds (default
    ``args.row_timeout``; less where the call's ``--budget-s`` ends sooner)."""
    cmd = [sys.executable, __file__, "--row", json.dumps(row), "--steps", str(args.steps),
           "--warmup", str(args.warmup)]
    limit = args.row_timeout if timeout is None else min(timeout, args.row_timeout)
    why = "--row-timeout" if limit == args.row_timeout else "the end of --budget-s"
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return {**row, "error": f"timeout: no result within {limit:g} s ({why})"}
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    return {**row, "error": f"exit {proc.returncode}: {tail[:300]}"}


def find(rows, **match):
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()) and not r.get("error"):
            return r
    return None


def summary(rows: list[dict]) -> list[str]:
    out = []
    for attention in ATTENTION:
        bf16 = find(rows, shape="proxy4096", model="umup", fp8="none", attention=attention)
        fp8 = find(rows, shape="proxy4096", model="umup", fp8="paper_simple",
                   attention=attention)
        if bf16 and fp8:
            speedup = bf16["step_ms"] / fp8["step_ms"]
            out.append(f"width 4096, {attention} attention: BF16 / FP8 paper_simple step time "
                       f"= {speedup:.2f}x (target >= 1.3x, stretch 1.6x: "
                       f"{'PASS' if speedup >= 1.3 else 'FAIL'})")
    for shape in ("proxy4096", "1b"):
        best = max((r for r in rows if r["shape"] == shape and r["model"] == "umup"
                    and r["fp8"] == "none" and not r.get("error")),
                   key=lambda r: r["mfu"], default=None)
        if best:
            out.append(f"{shape}: BF16 MFU {best['mfu']:.1%} ({best['attention']} attention; "
                       f"target >= 45%: {'PASS' if best['mfu'] >= 0.45 else 'FAIL'})")
    for shape in SHAPES:
        # The plain Llama is unscanned: compare the unscanned u-μP row where there is one.
        ours = (find(rows, shape=shape, model="umup", fp8="none", attention="xla", scan=False)
                or find(rows, shape=shape, model="umup", fp8="none", attention="xla"))
        plain = find(rows, shape=shape, model="plain")
        if ours and plain:
            ratio = ours["step_ms"] / plain["step_ms"]
            out.append(f"{shape}: ours / plain Llama step time = {ratio:.3f} (target <= 1.05: "
                       f"{'PASS' if ratio <= 1.05 else 'FAIL'})")
    return out


def plot(rows: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    proxy = [s for s in SHAPES if s.startswith("proxy")]
    for fp8 in FP8:
        for attention in ATTENTION:
            pts = [find(rows, shape=s, model="umup", fp8=fp8, attention=attention)
                   for s in proxy]
            xs = [p["width"] for p in pts if p]
            style = "-" if attention == "cudnn" else "--"
            axes[0].plot(xs, [p["tokens_per_s"] for p in pts if p], style, marker="o",
                         label=f"{fp8}, {attention}")
            axes[1].plot(xs, [p["mfu"] for p in pts if p], style, marker="o",
                         label=f"{fp8}, {attention}")
    pts = [find(rows, shape=s, model="plain") for s in proxy]
    axes[0].plot([p["width"] for p in pts if p], [p["tokens_per_s"] for p in pts if p], ":",
                 color="k", marker="x", label="plain Llama (bf16, xla)")
    for ax, label in zip(axes, ("tokens/s", "MFU (vs BF16 peak)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("width (depth 4, seq 256, batch 64)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[1].legend(fontsize=7)
    device = next((r["device"] for r in rows if r.get("device")), "?")
    fig.suptitle(f"u-μP train step on {device}: FP8 presets × attention kernels")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "experiments" / "results" / "bench_gpu"))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--shapes", default=",".join(SHAPES),
                   help=f"comma-separated subset of {list(SHAPES)}")
    p.add_argument("--scan", action="store_true", help="our model with model.scan_layers")
    p.add_argument("--row-timeout", type=int, default=600,
                   help="seconds one row (compile + steps) may take before it is an error row")
    p.add_argument("--budget-s", type=float, default=0,
                   help="end the call within this many seconds (0: no limit): no row starts "
                        "with less than --min-row-s left, a row running at the end is stopped "
                        "(a timeout error row); the rest run on the next call")
    p.add_argument("--min-row-s", type=float, default=90,
                   help="with --budget-s: the least time left in which a row is started")
    p.add_argument("--rerun", action="store_true",
                   help="run rows again that bench_gpu.csv already holds without error")
    p.add_argument("--row", help=argparse.SUPPRESS)  # internal: one row, JSON in and out
    args = p.parse_args(argv)
    if args.row:
        require_gpu(*backend_in_this_process())
        print(json.dumps(run_row(json.loads(args.row), args.steps, args.warmup)), flush=True)
        return
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = sorted(set(shapes) - set(SHAPES))
    if unknown:
        p.error(f"--shapes {unknown} are unknown: choose from {list(SHAPES)}")
    if args.budget_s < 0 or args.min_row_s < 0 or args.row_timeout <= 0:
        p.error("--budget-s and --min-row-s must be >= 0 and --row-timeout > 0")
    require_gpu(*backend_in_a_child())
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = out / "bench_gpu.csv"
    rows = read_rows(table)
    done = {key(r) for r in rows if not r.get("error")}
    todo = [r for r in rows_for(shapes, args.scan) if args.rerun or key(r) not in done]
    print(f"{len(todo)} rows to run ({len(done)} already in {table}"
          f"{'; --rerun' if args.rerun else ''})", flush=True)
    t0 = time.time()
    ran = 0
    for i, row in enumerate(todo):
        timeout = None
        if args.budget_s:
            left = args.budget_s - (time.time() - t0)
            if left < args.min_row_s:
                print(f"--budget-s={args.budget_s:g}: {max(left, 0):.0f} s left, less than "
                      f"--min-row-s={args.min_row_s:g}; {len(todo) - i} rows left for the next "
                      "call", flush=True)
                break
            timeout = min(float(args.row_timeout), left)
        result = run_in_subprocess(row, args, timeout)
        ran += 1
        rows = merge(rows, [result])
        write_rows(rows, table)  # after each row: a crash loses nothing measured
        print(f"[{i + 1}/{len(todo)}] {row['shape']:9s} {row['model']:5s} {row['fp8']:12s} "
              f"{row['attention']:5s} " + (f"step {result['step_ms']:9.2f} ms "
                                          f"({result['step_ms_pipelined']:.2f} pipelined)  "
                                          f"{result['tokens_per_s']:12,.0f} tok/s  "
                                          f"MFU {result['mfu']:.1%}  "
                                          f"peak {result['peak_memory_gib']} GiB"
                                          if not result.get("error") else result["error"]),
              flush=True)
    print(f"\n{ran} rows in {time.time() - t0:.0f} s; {len(rows)} in {table}")
    for line in summary(rows):
        print(line)
    if rows:  # after the summary: a plotting failure loses no target line
        plot(rows, out / "bench_gpu.png")
        print(f"plot: {out / 'bench_gpu.png'}")


if __name__ == "__main__":
    main()
