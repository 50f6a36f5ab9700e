"""experiments/bench_gpu.py without a GPU: it refuses with a message, and (``-m slow``) its
per-row code (our u-μP step and the plain Llama, timed through bench_overhead's Runner), its
table summary and its plot work on a tiny shape on this machine's CPU."""

import importlib.util
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import pytest

from umup_jax import gpu_target

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _experiment(name: str):
    """experiments/<name>.py loaded as a module."""
    sys.path.append(str(ROOT / "experiments"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _experiment("bench_gpu")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="this machine has a GPU")
def test_refuses_without_a_gpu(bench):
    with pytest.raises(SystemExit, match="needs a CUDA GPU, but JAX's backend here is 'cpu'"):
        bench.main([])


def test_fp8_gemm_columns_count_the_fp8_groups_gemms_by_kind(bench):
    """On this CPU, which upcasts FP8 operands before its dots, every GEMM of paper_large's
    FP8 groups (qkv, ffn_in, readout: forward and two backward matmuls each, ffn_in's two)
    is counted as upcast; a BF16 row counts none."""
    from flax.core import meta as flax_meta

    from umup_jax.model import Decoder, ModelConfig, abstract_params

    cfg = ModelConfig(vocab_size=32, width=16, depth=1, num_heads=1, seq_len=8,
                      dtype="bfloat16", fp8="paper_large")
    model = Decoder(cfg)
    params = flax_meta.unbox(abstract_params(model))
    tokens = jnp.zeros((2, 8), jnp.int32)
    hlo = jax.jit(jax.grad(lambda p: model.apply(p, tokens, tokens, method=Decoder.loss))
                  ).lower(params).compile().as_text()
    assert bench.fp8_gemm_kinds(hlo, cfg.fp8_policy) == {
        "fp8_gemms_cublaslt": 0, "fp8_gemms_triton": 0, "upcast_gemms": 3 + 6 + 3,
        "fp8_dots_elsewhere": 0}
    assert bench.fp8_gemm_kinds(hlo, {}) == {
        "fp8_gemms_cublaslt": 0, "fp8_gemms_triton": 0, "upcast_gemms": 0,
        "fp8_dots_elsewhere": 0}


def test_fp8_gemm_columns_on_gpu_hlo(bench):
    """On XLA:GPU HLO (synthetic, as test_hlo_check.py writes it): a cuBLASLt FP8 GEMM, an
    upcast cuBLAS GEMM, and a dot of f8 operands in a kernel that is neither cuBLASLt nor a
    Triton GEMM each land in their own column; a BF16 group's GEMMs in none."""
    from test_hlo_check import F8, LAYER, dot, gemm, module

    hlo = module(gemm("a", F8, "f8e4m3fn", "f8e4m3fn", f"{LAYER}/fp8_qkv"),
                 gemm("b", "__cublas$gemm", "bf16", "bf16", f"{LAYER}/fp8_qkv"),
                 dot("c", "f8e4m3fn", "f8e4m3fn", f"{LAYER}/fp8_ffn_down"),
                 gemm("d", "__cublas$gemm", "bf16", "bf16", f"{LAYER}/fp8_attn_out"))
    assert bench.fp8_gemm_kinds(hlo, {"qkv": "fp8", "ffn_down": "fp8", "attn_out": "bf16"}) == {
        "fp8_gemms_cublaslt": 1, "fp8_gemms_triton": 0, "upcast_gemms": 1,
        "fp8_dots_elsewhere": 1}


@pytest.mark.slow
def test_rows_summary_and_plot_on_a_tiny_shape(bench, monkeypatch, tmp_path):
    monkeypatch.setitem(bench.SHAPES, "proxy4096",
                        dict(width=64, depth=1, seq=32, batch=2, remat="full"))
    monkeypatch.setattr(bench, "VOCAB", 128)
    rows = []
    for model, fp8 in (("umup", "none"), ("plain", "none")):
        row = bench.run_row(dict(shape="proxy4096", model=model, fp8=fp8, attention="xla",
                                 scan=False), steps=2, warmup=1)
        assert row["error"] == "" and row["tokens_per_s"] > 0 and math.isfinite(row["loss"])
        assert row["step_ms_pipelined"] > 0
        assert (row["width"], row["heads"], row["remat"]) == (64, 1, "full")
        assert isinstance(row["step_memory_gib"], float) and row["step_memory_gib"] >= 0
        assert row["kernels"] > 0 and row["other_traffic_gib"] > 0
        assert (row["fp8_gemms_cublaslt"], row["fp8_gemms_triton"], row["upcast_gemms"]) == (
            0, 0, 0)  # BF16 rows
        rows.append(row)
    assert rows[0]["params"] == rows[1]["params"]  # the same shapes
    rows.append({**rows[0], "fp8": "paper_simple", "step_ms": rows[0]["step_ms"] / 1.5})
    if jax.default_backend() == "cpu":
        assert math.isnan(rows[0]["mfu"]) and rows[0]["peak_memory_gib"] == ""
    lines = bench.summary(rows)
    assert any(l.startswith("width 4096, xla attention: BF16 / FP8 paper_simple") for l in lines)
    assert any(l.startswith("proxy4096: ours / plain Llama step time =") for l in lines)
    bench.plot(rows, tmp_path / "bench_gpu.png")
    assert (tmp_path / "bench_gpu.png").stat().st_size > 0


def test_target_rows_run_first_and_calls_merge_into_one_table(bench, tmp_path):
    """Device time is scarce: the rows the targets read come first, and a second call's rows
    replace or join the first call's in bench_gpu.csv (types survive the CSV)."""
    rows = bench.rows_for(list(bench.SHAPES), scan=False)
    assert len(rows) == 5 * 7 and len({bench.key(r) for r in rows}) == 35
    assert [bench.key(r)[:4] for r in rows[:len(bench.FIRST)]] == list(bench.FIRST)
    measured = {**rows[0], "width": 4096, "depth": 4, "heads": 64, "seq": 256, "batch": 64,
                "remat": "none", "params": 123, "compile_s": 1.5, "step_ms": 10.25,
                "step_ms_min": 10.0, "tokens_per_s": 1.6e6, "mfu": 0.5, "peak_memory_gib": "",
                "loss": 10.4, "device": "NVIDIA H100 80GB HBM3", "error": ""}
    failed = {**rows[1], "error": "timeout: no result within 600 s (--row-timeout)"}
    table = tmp_path / "bench_gpu.csv"
    bench.write_rows(bench.merge([], [measured, failed]), table)
    back = bench.read_rows(table)
    assert [bench.key(r) for r in back] == [bench.key(measured), bench.key(failed)]
    assert {k: back[0][k] for k in measured} == measured
    fixed = {**measured, **{k: rows[1][k] for k in bench.KEY}, "step_ms": 7.0}
    later = {**measured, **{k: rows[-1][k] for k in bench.KEY}}
    merged = bench.merge(back, [fixed, later])
    assert len(merged) == 3 and [r["step_ms"] for r in merged if not r["error"]][:2] == [10.25, 7.0]
    assert not any(r.get("error") for r in merged)
    assert bench.read_rows(tmp_path / "none.csv") == []


def test_a_row_past_its_timeout_is_an_error_row(bench):
    import argparse

    row = dict(shape="proxy256", model="umup", fp8="none", attention="xla", scan=False)
    result = bench.run_in_subprocess(row, argparse.Namespace(steps=1, warmup=0,
                                                             row_timeout=0.01))
    assert result == {**row, "error": "timeout: no result within 0.01 s (--row-timeout)"}
    result = bench.run_in_subprocess(row, argparse.Namespace(steps=1, warmup=0, row_timeout=600),
                                     timeout=0.01)
    assert result == {**row, "error": "timeout: no result within 0.01 s (the end of --budget-s)"}


def test_budget_bounds_the_whole_call(bench, monkeypatch, tmp_path):
    """With --budget-s 300 and rows of 100 s (a fake clock): each row's timeout is what the
    budget has left, no row starts with less than --min-row-s left, and the rows measured are
    in the table."""
    clock, timeouts = [0.0], []

    def fake_row(row, args, timeout=None):
        timeouts.append(timeout)
        clock[0] += 100.0
        return {**row, "error": "fake"}

    monkeypatch.setattr(bench, "backend_in_a_child", lambda: ("gpu", "NVIDIA H100 80GB HBM3"))
    monkeypatch.setattr(bench, "require_gpu", lambda backend, devices: None)
    monkeypatch.setattr(bench, "time", type("Clock", (), {"time": staticmethod(lambda: clock[0])}))
    monkeypatch.setattr(bench, "run_in_subprocess", fake_row)
    monkeypatch.setattr(bench, "plot", lambda rows, path: None)
    bench.main(["--out", str(tmp_path), "--budget-s", "300", "--min-row-s", "90"])
    assert timeouts == [300.0, 200.0, 100.0]
    assert len(bench.read_rows(tmp_path / "bench_gpu.csv")) == 3
    timeouts.clear()
    clock[0] = 0.0
    bench.main(["--out", str(tmp_path), "--budget-s", "250", "--min-row-s", "90",
                "--row-timeout", "120"])
    assert timeouts == [120.0, 120.0]  # error rows run again; 50 s left is too little
    with pytest.raises(SystemExit):
        bench.main(["--out", str(tmp_path), "--budget-s", "-1"])


@pytest.fixture(scope="module")
def plan():
    return _experiment("gpu_plan")


@pytest.mark.skipif(gpu_target.cuda_plugin_on_path(),
                    reason="JAX's CUDA plugin is on the path here")
def test_plan_without_the_cuda_plugin_says_what_to_install(plan):
    with pytest.raises(SystemExit, match="jax-cuda13-plugin"):
        plan.main(["--shapes", "proxy256"])


def test_plan_rows_on_this_cpu(plan, monkeypatch, tmp_path):
    """gpu_plan.py's row code compiled for this CPU on a tiny shape: our step and the plain
    Llama's (same parameter count), each kernel's traffic counted, the memory plan, FLOP and
    bandwidth bounds from the formulas, the summary comparing them and the plot."""
    monkeypatch.setitem(plan.bench_gpu.SHAPES, "proxy256",
                        dict(width=64, depth=2, seq=32, batch=4, remat="none"))
    monkeypatch.setattr(plan.bench_gpu, "VOCAB", 512)
    rows = [plan.plan_row(dict(shape="proxy256", model=model, fp8=fp8, attention="xla",
                               scan=scan))
            for model, fp8, scan in (("umup", "none", False), ("umup", "paper_simple", True),
                                     ("plain", "none", False))]
    for row in rows:
        assert row["error"] == "" and row["fits_h100"] is True
        assert (row["width"], row["heads"], row["depth"]) == (64, 1, 2)
        assert row["kernels"] > row["gemm_kernels"] > 0
        assert row["gemm_traffic_gib"] > 0 and row["other_traffic_gib"] > 0
        assert row["step_memory_gib"] > row["temp_memory_gib"] >= 0
        assert row["other_ms_at_hbm"] == pytest.approx(
            row["other_traffic_gib"] * 2**30 / 3.35e12 * 1e3, rel=1e-3)
        assert set(row) >= set(plan.COLUMNS)
    assert rows[0]["params"] == rows[2]["params"]
    assert rows[0]["bf16_gemm_ms_at_peak"] == rows[2]["bf16_gemm_ms_at_peak"] > 0
    assert rows[1]["upcast_gemms"] > 0  # this CPU upcasts FP8 operands
    lines = plan.summary(rows)
    assert lines[0].startswith("proxy256: ours / plain Llama: non-GEMM traffic")
    assert lines[-1] == "every row fits the 59.3 GiB JAX's allocator takes of an H100's 79.1 GiB"
    plan.plot(rows, tmp_path / "gpu_plan.png")
    assert (tmp_path / "gpu_plan.png").stat().st_size > 0


@pytest.mark.gpu_aot
def test_plan_row_for_an_h100(plan, monkeypatch):
    """A row compiled for the abstract H100: FP8 GEMMs on f8 operands (Triton or cuBLASLt),
    none upcast."""
    try:
        sharding = gpu_target.h100_sharding()
    except gpu_target.GpuTargetUnavailable as e:
        pytest.skip(str(e))
    monkeypatch.setitem(plan.bench_gpu.SHAPES, "proxy256",
                        dict(width=256, depth=1, seq=128, batch=8, remat="none"))
    row = plan.plan_row(dict(shape="proxy256", model="umup", fp8="paper_simple",
                             attention="xla", scan=False), sharding)
    assert row["error"] == "" and row["upcast_gemms"] == 0
    assert row["fp8_gemms_cublaslt"] + row["fp8_gemms_triton"] > 0


@pytest.fixture(scope="module")
def plan_mesh():
    return _experiment("gpu_plan_mesh")


TINY_1B = dict(width=128, depth=2, seq=32, batch=8, remat="full")


def test_mesh_plan_row_on_this_cpu(plan_mesh, monkeypatch, tmp_path):
    """gpu_plan_mesh.py's row code (the trainer's step, sharded) on this CPU's one device
    and a tiny shape: no collectives, the memory plan, the GEMM bound from the formula, its
    table and plot; meshes that are not 8 devices are refused."""
    from umup_jax import throughput

    monkeypatch.setitem(plan_mesh.bench_gpu.SHAPES, "1b", TINY_1B)
    row = plan_mesh.plan_row("1b", "1x1x1", 2, "none", 8, jax.devices()[:1])
    assert row["error"] == "" and row["fits_h100"] is True
    assert row["collectives_in_loops"] == row["collectives_outside"] == 0
    assert row["wire_gib"] == row["all_reduce_gib"] == row["collective_ms_at_nvlink"] == 0
    assert row["step_memory_gib"] > row["temp_memory_gib"] > 0
    cfg = plan_mesh.row_config("1b", "1x1x1", 2, "none", 8)
    assert (cfg.model.width, cfg.model.depth, cfg.model.vocab_size) == (128, 2, 32000)
    assert cfg.model.loss_chunks == 1 and row["loss_chunks"] == 1
    chunked = plan_mesh.row_config("1b", "1x1x1", 2, "none", 8, loss_chunks=4)
    assert chunked.model.loss_chunks == 4
    flops = 8 * 32 * throughput.train_flops_per_token(
        plan_mesh.bench_gpu.row_config(dict(shape="1b", fp8="none", attention="xla",
                                            scan=False)))
    assert row["bf16_gemm_ms_at_peak"] == pytest.approx(flops / 989.4e12 * 1e3, rel=1e-3)
    plan_mesh.bench_gpu.write_rows([row], tmp_path / "plan.csv", plan_mesh.COLUMNS)
    assert (tmp_path / "plan.csv").read_text().splitlines()[0].split(",") == list(
        plan_mesh.COLUMNS)
    plan_mesh.plot([row], tmp_path / "plan.png")
    assert (tmp_path / "plan.png").stat().st_size > 0
    with pytest.raises(SystemExit):
        plan_mesh.main(["--meshes", "2x2x1", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        plan_mesh.main(["--loss-chunks", "0", "--out", str(tmp_path)])


@pytest.mark.gpu_aot
def test_mesh_plan_rows_for_8_h100s(plan_mesh, monkeypatch):
    """On 8 abstract H100s with 2 micro-batches: data parallelism all-reduces the fp32
    gradient once, outside the loop (2·7/8 of it sent per device); FSDP gathers weights and
    reduce-scatters gradients in every micro-batch, and with ``train.fsdp_gather_once``
    gathers them once, holding more, and with ``train.fsdp_reduce_once`` too reduce-scatters
    the whole fp32 gradient once, leaving no collective in the loop; with the chunked loss and no accumulation FSDP leaves
    no collective in the chunks' loop."""
    try:
        devices = gpu_target.h100_devices(8)
    except gpu_target.GpuTargetUnavailable as e:
        pytest.skip(str(e))
    monkeypatch.setitem(plan_mesh.bench_gpu.SHAPES, "1b", TINY_1B)
    dp = plan_mesh.plan_row("1b", "8x1x1", 2, "none", 16, devices)
    assert dp["error"] == "" and dp["collectives_in_loops"] == 0
    assert dp["all_reduce_gib"] == pytest.approx(dp["params"] * 4 / 2**30, rel=1e-3)
    assert dp["wire_gib"] == pytest.approx(dp["all_reduce_gib"] * 2 * 7 / 8, rel=1e-3)
    fsdp = plan_mesh.plan_row("1b", "1x8x1", 2, "none", 16, devices)
    assert fsdp["error"] == "" and fsdp["collectives_in_loops"] > 0
    assert fsdp["all_gather_gib"] > 0 and fsdp["reduce_scatter_gib"] > 0
    # train.fsdp_gather_once: the weights gathered once, before the loop, at more memory
    once = plan_mesh.plan_row("1b", "1x8x1", 2, "none", 16, devices, gather_once=True)
    assert once["error"] == "" and once["fsdp_gather_once"] is True
    assert once["all_gather_gib"] < fsdp["all_gather_gib"]
    assert 0 < once["collectives_in_loops"] < fsdp["collectives_in_loops"]
    assert once["step_memory_gib"] > fsdp["step_memory_gib"]
    # train.fsdp_reduce_once as well: nothing collective in the accumulation loop, and one
    # reduce-scatter of the whole fp32 gradient after it
    both = plan_mesh.plan_row("1b", "1x8x1", 2, "none", 16, devices, gather_once=True,
                              reduce_once=True)
    assert both["error"] == "" and both["fsdp_reduce_once"] is True
    assert both["collectives_in_loops"] == 0
    assert both["reduce_scatter_gib"] == pytest.approx(both["params"] * 4 / 2**30, rel=1e-3)
    # model.loss_chunks without accumulation under FSDP: nothing collective in the chunks' loop
    chunks = plan_mesh.plan_row("1b", "1x8x1", 1, "none", 16, devices, loss_chunks=4)
    assert chunks["error"] == "" and chunks["loss_chunks"] == 4
    assert chunks["collectives_in_loops"] == 0


def test_the_1b_preset_is_the_speed_tables_1b_model(bench):
    """``configs/*.py:1b`` trains the shape ``bench_gpu.py`` and ``gpu_plan_mesh.py`` measure
    (width, depth, sequence, remat, heads of 64), scanned, bf16, with the chunked loss: 1.07 B
    params in its blocks, 1,204,813,824 with the 32k embedding and readout."""
    from flax.core import meta as flax_meta

    from umup_jax import config as config_lib
    from umup_jax import train as train_lib
    from umup_jax.model import Decoder, abstract_params

    cfg = config_lib.proxy_config("umup", "1b")
    m, shape = cfg.model, bench.SHAPES["1b"]
    assert (m.width, m.depth, m.seq_len, m.remat) == (shape["width"], shape["depth"],
                                                      shape["seq"], shape["remat"])
    assert m.num_heads == m.width // bench.HEAD_DIM and m.head_dim == 0
    assert (m.scan_layers, m.loss_chunks, m.dtype, m.attention_impl) == (
        True, 8, "bfloat16", "auto")
    assert (cfg.train.batch_size, cfg.train.eval_batch_size, cfg.data.vocab_size) == (
        64, 64, 32000)
    params = flax_meta.unbox(abstract_params(Decoder(train_lib.model_config(cfg, 32000))))
    assert sum(x.size for x in jax.tree.leaves(params)) == 1_204_813_824
    # Later variants and overrides win: data first, the shape after.
    both = config_lib.proxy_config("umup", "wikitext103,1b,train.grad_accum_steps=8")
    assert (both.data.source, both.model.width, both.train.grad_accum_steps) == (
        "prepared", 2048, 8)


@pytest.mark.gpu_aot
def test_the_1b_preset_fits_8_h100s_and_one_h100_is_told_what_to_add(monkeypatch):
    """The trainer's own programs for the ``1b`` preset (the bundled corpus's bytes under its
    32k vocabulary; only shapes matter), compiled for one host of 8 abstract H100s (mesh
    8x1x1: 8 sequences per device) and checked against the 59.3 GiB JAX's allocator takes of
    each by default: they fit (measured on jax 0.10.2: train step 33.23 GiB, eval step 19.76
    GiB with the optimizer state).  On one H100 (64 sequences per step on it) the train step
    is refused, naming gradient accumulation (123.93 GiB); with 8 micro-batches both fit
    (35.92 and 19.76 GiB: the eval step goes in pieces of a micro-batch)."""
    from umup_jax import config as config_lib
    from umup_jax import memory_plan
    from umup_jax import train as train_lib

    try:
        devices = gpu_target.h100_devices(8)
    except gpu_target.GpuTargetUnavailable as e:
        pytest.skip(str(e))
    monkeypatch.setattr(memory_plan, "device_memory_limit",
                        lambda: gpu_target.H100_ALLOCATOR_BYTES)
    cfg = config_lib.proxy_config(
        "umup", "1b,data.tokenizer=bytes,model.vocab_size=32000,train.metrics_every=100000")
    steps = train_lib.compile_steps(train_lib.build_run(cfg, devices=list(devices)), cfg, 0)
    assert steps.stats is None  # no step logs statistics: not compiled
    gib = 2**30
    assert 25 * gib < steps.step_bytes < 45 * gib, steps.step_bytes / gib
    assert 10 * gib < steps.eval_bytes < steps.step_bytes, steps.eval_bytes / gib
    assert steps.limit == gpu_target.H100_ALLOCATOR_BYTES
    with pytest.raises(memory_plan.StepMemoryError,
                       match=r"the train step does not fit: XLA plans \d+\.\d\d GiB per device, "
                             r"the allocator allows 59\.33 GiB .* train\.grad_accum_steps=2"):
        train_lib.compile_steps(train_lib.build_run(cfg, devices=list(devices)[:1]), cfg, 0)
    config_lib.set_key(cfg, "train.grad_accum_steps", 8)
    one = train_lib.compile_steps(train_lib.build_run(cfg, devices=list(devices)[:1]), cfg, 0)
    assert one.step_bytes < one.limit and one.eval_bytes < one.limit
