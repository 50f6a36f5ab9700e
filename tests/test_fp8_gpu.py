"""GPU: the compiled train step really runs FP8 GEMMs where the policy says FP8 and BF16
GEMMs where it says BF16, and cuDNN's fused attention when ``attention_impl='cudnn'``.

A cast to f8 and a ``cublas`` call in the HLO prove nothing (a saturating cast followed by an
upcast BF16 GEMM has both); these tests read each GEMM's custom-call target and operand types
and map it to its matmul group through the ``fp8_<group>`` op_name scopes
(:mod:`umup_jax.hlo_check`, unit-tested on CPU in ``tests/test_hlo_check.py``).

Two targets.  ``gpu`` (``-m gpu``): this host's CUDA GPU, run with ``JAX_PLATFORMS=cuda
python -m pytest -q -m gpu`` (``tests/conftest.py`` makes the platform default to the CPU).
``h100_aot`` (``-m gpu_aot``): the FP8 checks compiled ahead of time for an H100 by XLA's GPU
compiler on this CPU (:mod:`umup_jax.gpu_target`; needs the CUDA plugin on the path, see
BUILD.md), where nothing runs and nothing is autotuned.  Each skips with a reason where it
cannot run.

Which kernel runs an FP8 GEMM is XLA's choice: cuBLASLt's FP8 matmul
(``__cublas$lt$matmul$f8``) or a Triton GEMM fusion that reads the FP8 operands itself (XLA
0.11's default for small GEMMs, and wherever its autotuner finds Triton faster).  The policy
tests compile with ``xla_gpu_enable_triton_gemm=False`` and ask for the cuBLASLt FP8 call in
every FP8 group; the default-options test asks that every GEMM of an FP8 group take FP8
operands, by either kernel, as the trainer and the benchmark compile it."""

import os

import jax
import jax.numpy as jnp
import pytest
from flax.core import meta as flax_meta

from umup_jax import fp8, gpu_target, hlo_check, hlo_traffic
from umup_jax.model import Decoder, ModelConfig, abstract_params, init_params

ON_GPU = jax.default_backend() == "gpu"
NEEDS_GPU = pytest.mark.skipif(
    not ON_GPU, reason=f"needs a CUDA GPU, and JAX's backend is {jax.default_backend()!r} "
                       f"(JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS', '')!r}; tests/"
                       "conftest.py makes it 'cpu' unless set: JAX_PLATFORMS=cuda on a GPU "
                       "host); -m gpu_aot compiles the FP8 checks for an H100 on a CPU")
# XLA's option that keeps GEMMs out of Triton fusions: every GEMM goes to cuBLAS(Lt).
CUBLAS_ONLY = {"xla_gpu_enable_triton_gemm": False}

# Shapes the FP8 GEMM needs (every dimension a multiple of 16), heads of 64 for cuDNN.
SHAPES = dict(vocab_size=512, width=256, depth=2, num_heads=4, seq_len=128, dtype="bfloat16")


@pytest.fixture(params=[pytest.param("gpu", marks=[pytest.mark.gpu, NEEDS_GPU]),
                        pytest.param("h100_aot", marks=pytest.mark.gpu_aot)])
def target(request):
    """Where the FP8 checks compile: ``None`` for this host's GPU, else the sharding of an
    abstract H100 (skipped where JAX's CUDA plugin is not importable)."""
    if request.param == "gpu":
        return None
    try:
        return gpu_target.h100_sharding()
    except gpu_target.GpuTargetUnavailable as e:
        pytest.skip(str(e))


def compiled_hlo(fn, args, target=None, options=None) -> str:
    """The optimised HLO text of ``jax.jit(fn)`` on abstract ``args``, for this host's device
    (``target`` None) or ahead of time for ``target``'s."""
    if target is not None:
        args = gpu_target.abstract(args, target)
    return jax.jit(fn).lower(*args).compile(compiler_options=options).as_text()


def compiled_step_hlo(cfg: ModelConfig, batch: int = 8, target=None, options=None) -> str:
    """The optimised HLO of the loss gradient (forward and backward) of ``cfg``'s model."""
    model = Decoder(cfg)
    params = flax_meta.unbox(abstract_params(model))
    tokens = jax.ShapeDtypeStruct((batch, cfg.seq_len), jnp.int32)
    return compiled_hlo(jax.grad(lambda p, t: model.apply(p, t, t, method=Decoder.loss)),
                        (params, tokens), target, options)


POLICIES = {
    "paper_simple": "paper_simple",
    "paper_large": "paper_large",
    "mixed": {"qkv": "fp8", "attn_out": "fp8_e5m2_input", "ffn_in": "fp8",
              "ffn_down": "fp8_dynamic", "readout": "bf16"},
    "none": "none",
}


# In the order they run: the cuDNN tests, the lone fp8_dot, the eight policy × scan compiles,
# the two under XLA's defaults, and the trainer's steps (two compiles each) last: where a short
# GPU slot interrupts the run (experiments/gpu_checks.sh), the log's --durations says what ran.


@pytest.mark.gpu
@NEEDS_GPU
@pytest.mark.parametrize("parametrization", ["umup", "sp"])
def test_cudnn_attention_is_the_fused_kernel(parametrization):
    cfg = ModelConfig(**SHAPES, parametrization=parametrization, attention_impl="cudnn")
    calls = hlo_check.cudnn_attention_calls(compiled_step_hlo(cfg))
    assert calls["forward"] >= 1 and calls["backward"] >= 1, calls
    auto = hlo_check.cudnn_attention_calls(compiled_step_hlo(cfg.replace(attention_impl="auto")))
    assert auto == calls  # bf16, heads of 64: auto picks cuDNN
    xla = hlo_check.cudnn_attention_calls(compiled_step_hlo(cfg.replace(attention_impl="xla")))
    assert xla == {"forward": 0, "backward": 0}


@pytest.mark.gpu
@NEEDS_GPU
def test_cudnn_attention_matches_xla():
    """Same loss and gradients as the XLA kernel, to bf16 precision."""
    cfg = ModelConfig(**SHAPES, attention_impl="cudnn")
    tokens = jax.random.randint(jax.random.key(0), (4, cfg.seq_len), 0, cfg.vocab_size)
    params = flax_meta.unbox(init_params(Decoder(cfg), jax.random.key(1)))
    out = {}
    for impl in ("cudnn", "xla"):
        model = Decoder(cfg.replace(attention_impl=impl))
        out[impl] = jax.jit(jax.value_and_grad(
            lambda p: model.apply(p, tokens, tokens, method=Decoder.loss)))(params)
    assert float(out["cudnn"][0]) == pytest.approx(float(out["xla"][0]), rel=2e-2)
    for a, b in zip(jax.tree.leaves(out["cudnn"][1]), jax.tree.leaves(out["xla"][1])):
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
        assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) < 5e-2


def test_fp8_dot_alone_is_an_fp8_gemm_forward_and_backward(target):
    # Random operands and a random cotangent: with ones, XLA may simplify a dot whose operand
    # is a broadcast constant, and the test would fail for a reason that is not FP8.
    kx, kw, kr = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (256, 512), jnp.bfloat16)
    w = jax.random.normal(kw, (512, 256), jnp.bfloat16)
    r = jax.random.normal(kr, (256, 256), jnp.float32)
    loss = lambda x, w, r: (fp8.fp8_dot(x, w).astype(jnp.float32) * r).sum()  # noqa: E731
    hlo = compiled_hlo(jax.grad(loss, argnums=(0, 1)), (x, w, r), target, CUBLAS_ONLY)
    gemms = hlo_check.custom_calls(hlo, "__cublas$")
    # dx and dw (the loss is linear in the forward product, which the gradient never needs).
    assert len(gemms) == 2 and all(hlo_check.is_fp8_gemm(g) for g in gemms), gemms
    # dx = g8·w8ᵀ (E5M2 × E4M3) and dw = x8ᵀ·g8 (E4M3 × E5M2): both take an E5M2 operand.
    assert sum("f8e5m2" in g.operand_types for g in gemms) >= 2, gemms


@pytest.mark.parametrize("name", list(POLICIES))
@pytest.mark.parametrize("scan", [False, True])
def test_fp8_groups_run_fp8_gemms_and_bf16_groups_do_not(name, scan, target):
    """With GEMMs kept out of Triton, every FP8 group's GEMMs are cuBLASLt FP8 calls and no
    BF16 group has one."""
    cfg = ModelConfig(**SHAPES, fp8=POLICIES[name], scan_layers=scan, attention_impl="xla")
    hlo = compiled_step_hlo(cfg, target=target, options=CUBLAS_ONLY)
    found = hlo_check.gemms_by_group(hlo)
    problems = hlo_check.fp8_policy_problems(hlo, cfg.fp8_policy)
    assert not problems, f"{problems}; GEMMs found: {hlo_check.describe(found)}"


@pytest.mark.parametrize("name", ["paper_simple", "paper_large"])
def test_fp8_groups_take_fp8_operands_under_xla_defaults(name, target):
    """As the trainer and the benchmark compile it (XLA's default options, Triton GEMMs
    allowed): every GEMM of an FP8 group takes FP8 operands, in cuBLASLt or in a Triton GEMM
    fusion, none is upcast, and no BF16 group has one."""
    cfg = ModelConfig(**SHAPES, fp8=POLICIES[name], attention_impl="xla")
    hlo = compiled_step_hlo(cfg, target=target)
    found = hlo_check.gemms_by_group(hlo)
    problems = hlo_check.fp8_policy_problems(hlo, cfg.fp8_policy, triton_counts=True)
    assert not problems, f"{problems}; GEMMs found: {hlo_check.describe(found)}"


@pytest.mark.parametrize("extras", [
    "",
    ",model.scan_layers=True,model.remat=full,train.grad_accum_steps=2,model.loss_chunks=2",
], ids=["plain", "scan_remat_accum_chunks"])
def test_trainer_steps_compile_with_fp8_gemms(extras, target):
    """The trainer's own jitted steps (``umup_jax.train``: loss, gradients, AdamW, metrics;
    the stats step with every RMS and the FP8 cast statistics), built for one device of the
    target and compiled with XLA's defaults, bf16 with ``paper_simple``: every GEMM of the FP8
    groups takes f8 operands; also with scanned, rematerialised layers, gradient accumulation
    and the chunked loss."""
    train_lib = pytest.importorskip("umup_jax.train")  # grain and ml_collections
    config_lib = pytest.importorskip("umup_jax.config")
    devices = jax.devices()[:1] if target is None else list(target.mesh.devices.flat)
    cfg = config_lib.proxy_config(
        "umup", "smoke,model.dtype=bfloat16,model.fp8=paper_simple,model.attention_impl=xla,"
        "model.width=256,model.num_heads=4,model.seq_len=128,train.batch_size=8" + extras)
    run = train_lib.build_run(cfg, devices=devices)
    batch = {k: jax.ShapeDtypeStruct((8, 128), jnp.int32, sharding=run.batch_sharding)
             for k in ("inputs", "targets")}
    for with_stats in (False, True):
        compiled = train_lib.make_train_step(run, with_stats).lower(
            run.abstract_state, batch).compile()
        hlo = compiled.as_text()
        problems = hlo_check.fp8_policy_problems(hlo, run.model_cfg.fp8_policy,
                                                 triton_counts=True)
        assert not problems, (with_stats, problems,
                              hlo_check.describe(hlo_check.gemms_by_group(hlo)))


@pytest.mark.gpu
@NEEDS_GPU
def test_the_trainer_trains_on_this_gpu_within_its_memory_plan(tmp_path, capsys):
    """``train_and_evaluate`` end to end on this GPU (bf16, ``paper_simple``, the bundled
    corpus's bytes, 6 steps): its steps compiled ahead, XLA's plan checked against the
    allocator's reported limit (:mod:`umup_jax.memory_plan`) and within it, a finite loss, and
    the throughput and memory columns that only a GPU fills (MFU against this device's peak,
    the allocator's peak)."""
    train_lib = pytest.importorskip("umup_jax.train")  # grain and ml_collections
    config_lib = pytest.importorskip("umup_jax.config")
    cfg = config_lib.proxy_config(
        "umup", "smoke,model.dtype=bfloat16,model.fp8=paper_simple,model.width=256,"
        "model.num_heads=4,model.seq_len=128,train.batch_size=16,train.eval_batch_size=16")
    results = train_lib.train_and_evaluate(cfg, str(tmp_path))
    out = capsys.readouterr().out
    limit, plan = results["device_memory_limit_bytes"], results["step_memory_bytes"]
    print(f"plan {plan} B, limit {limit} B, peak {results.get('peak_memory_bytes')} B, "
          f"mfu {results['mfu']}, device {results['device_kind']}")
    assert limit is not None and plan is not None and 0 < plan <= limit, (plan, limit)
    assert f"({limit / 2**30:.2f} GiB allowed: " in out, out
    assert results["steps"] == 6 and jnp.isfinite(results["final_train_loss"])
    assert results.get("peak_memory_bytes", 0) > 0
    if "H100" in results["device_kind"] or "H200" in results["device_kind"]:
        assert 0 < results["mfu"] < 1, results["mfu"]


def _eight_h100_step(extra: str):
    """(train module, run, ``step_hlo()``) of the trainer's step for one host of 8 abstract
    H100s: mesh 8x1x1, bf16 with ``paper_simple``, XLA attention, width 256, 32 × 128 tokens,
    config ``extra`` on top; ``step_hlo()`` compiles it, GEMMs kept out of Triton, and gives
    the HLO text (the run's module-level functions are looked up when it is called)."""
    train_lib = pytest.importorskip("umup_jax.train")  # grain and ml_collections
    config_lib = pytest.importorskip("umup_jax.config")
    try:
        devices = gpu_target.h100_devices(8)
    except gpu_target.GpuTargetUnavailable as e:
        pytest.skip(str(e))
    cfg = config_lib.proxy_config(
        "umup", "smoke,model.dtype=bfloat16,model.fp8=paper_simple,model.attention_impl=xla,"
        "model.width=256,model.num_heads=4,model.seq_len=128,train.batch_size=32,"
        "train.eval_batch_size=8,mesh.data=8" + extra)
    run = train_lib.build_run(cfg, devices=list(devices))
    batch = {k: jax.ShapeDtypeStruct((32, 128), jnp.int32, sharding=run.batch_sharding)
             for k in ("inputs", "targets")}

    def step_hlo():
        return train_lib.make_train_step(run, False).lower(run.abstract_state, batch).compile(
            compiler_options=CUBLAS_ONLY).as_text()

    return train_lib, run, step_hlo


def _fp8_gemms_and_the_gradients_all_reduce(hlo: str, run) -> dict:
    """Asserts that every FP8 group's GEMMs in ``hlo`` are cuBLASLt FP8 calls and that its
    only collectives are all-reduces, none inside a loop, together carrying the params'
    fp32 bytes (and the loss); gives their counts (``hlo_traffic.collectives``)."""
    problems = hlo_check.fp8_policy_problems(hlo, run.model_cfg.fp8_policy)
    assert not problems, (problems, hlo_check.describe(hlo_check.gemms_by_group(hlo)))
    found = hlo_traffic.collectives(hlo)
    assert set(found) == {"all-reduce", "unknown_trip_counts"}, found
    reduced = found["all-reduce"]
    param_bytes = sum(x.size * 4 for x in jax.tree.leaves(run.abstract_state["params"]))
    assert reduced["in_loops"] == 0, found
    assert param_bytes <= reduced["bytes"] <= param_bytes + 1024, (found, param_bytes)
    return reduced


@pytest.mark.gpu_aot
def test_data_parallel_accumulation_on_8_h100s_all_reduces_once_in_fp8(monkeypatch):
    """The trainer's step for one host of 8 H100s (compiled ahead of time, mesh 8x1x1, the
    default ``mesh.data=-1``), bf16 with ``paper_simple``, 4 micro-batches and the chunked
    loss: the gradient is all-reduced once per step, outside every loop, and in fp32 (one
    set of the params' bytes), every FP8 group's GEMMs are cuBLASLt FP8 calls; the plain
    accumulation loop, as XLA's GPU pipeline partitions it, all-reduced inside the loop
    (per micro-batch, and per chunk the readout's gradient)."""
    train_lib, run, step_hlo = _eight_h100_step(
        ",train.grad_accum_steps=4,model.loss_chunks=2")
    assert train_lib.splits_over_data_replicas(run)
    reduced = _fp8_gemms_and_the_gradients_all_reduce(step_hlo(), run)
    assert reduced["outside"] >= 1, reduced

    monkeypatch.setattr(train_lib, "splits_over_data_replicas", lambda run: False)
    plain = hlo_traffic.collectives(step_hlo())
    assert plain["all-reduce"]["in_loops"] >= 4, plain


@pytest.mark.gpu_aot
def test_chunked_loss_on_8_h100s_all_reduces_the_readout_gradient_once(monkeypatch):
    """The trainer's step for one host of 8 H100s (compiled ahead of time, mesh 8x1x1), bf16
    with ``paper_simple``, ``model.loss_chunks=4`` and no accumulation: the chunked loss's
    backward sums each data replica's readout gradient apart (``loss_chunks.py``), so no
    all-reduce is left in the chunks' loop and the step all-reduces the gradient once (the
    params' fp32 bytes), every FP8 group's GEMMs cuBLASLt FP8 calls; summed into a replicated
    carry, XLA's GPU pipeline all-reduced each chunk's readout gradient inside the loop
    (4 all-reduces, 3 readout gradients more: measured 5.25 vs 4.50 MiB).  Under FSDP
    (mesh 2x4x1) no collective is left in the loop either."""
    from umup_jax import sharding as sharding_lib

    _, run, step_hlo = _eight_h100_step(",model.loss_chunks=4")
    reduced = _fp8_gemms_and_the_gradients_all_reduce(step_hlo(), run)
    assert reduced["outside"] == 1, reduced
    params = run.abstract_state["params"]
    param_bytes = sum(x.size * 4 for x in jax.tree.leaves(params))
    readout_bytes = params["params"]["readout"].size * 4

    _, _, fsdp_hlo = _eight_h100_step(",model.loss_chunks=4,mesh.data=2,mesh.fsdp=4")
    fsdp = fsdp_hlo()

    monkeypatch.setattr(sharding_lib, "batch_replicas", lambda: None)
    plain = hlo_traffic.collectives(step_hlo())["all-reduce"]
    assert plain["in_loops"] == 4, plain
    assert plain["bytes"] >= param_bytes + 3 * readout_bytes, plain

    # FSDP (mesh 2x4x1): no collective in the chunks' loop, where an FSDP-sharded carry
    # gathered the readout weight and reduced its gradient in every chunk.
    def in_loops(hlo):
        found = hlo_traffic.collectives(hlo)
        return sum(v["in_loops"] for v in found.values() if isinstance(v, dict))

    assert not hlo_check.fp8_policy_problems(fsdp, run.model_cfg.fp8_policy)
    assert in_loops(fsdp) == 0
    assert in_loops(fsdp_hlo()) >= 4
