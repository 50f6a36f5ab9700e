"""Throughput metrics: the model-FLOPs formula on a hand-counted model, the accelerator peak
table, MFU, and the train loop writing tokens/s, MFU (and peak memory where reported) with
scanned, rematerialised, accumulated steps; which of the new keys may change on resume."""

import json
import math

import jax
import pytest
from flax.core import meta as flax_meta

from umup_jax import config as config_lib
from umup_jax import identity
from umup_jax import throughput
from umup_jax import train as train_lib
from umup_jax.metrics import read_metrics
from umup_jax.model import Decoder, ModelConfig, abstract_params


def test_model_flops_hand_counted():
    """V=10, d=4, L=1, H=2, D_h=2, f=8, S=3.

    Matmul params N: QKV 4·3·2·2 = 48, attention out 2·2·4 = 16, up + gate + down 3·4·8 = 96,
    readout 4·10 = 40: N = 200 (the 10·4 embedding table is a gather, not counted).
    Attention, causal: per sequence and head the S(S+1)/2 = 6 kept query-key pairs cost
    2·D_h = 4 FLOPs in each of q·kᵀ and p·v, 48 forward; × 2 heads × 3 (fwd + bwd) = 288 per
    sequence of 3 tokens = 96 per token.  Per token: 6·200 + 96 = 1296."""
    cfg = ModelConfig(vocab_size=10, width=4, depth=1, num_heads=2, ffn_expansion=2,
                      seq_len=3, position="none")
    assert throughput.matmul_params(cfg) == 200
    assert throughput.attention_flops_per_token(cfg) == 96
    assert throughput.train_flops_per_token(cfg) == 1296
    # N is every parameter but the embedding table, counted from the model itself.
    for c in (cfg, ModelConfig(vocab_size=50, width=64, depth=3, num_heads=4, seq_len=16)):
        params = flax_meta.unbox(abstract_params(Decoder(c)))["params"]
        total = sum(x.size for x in jax.tree.leaves(params))
        assert throughput.matmul_params(c) == total - params["embedding"].size


@pytest.mark.parametrize("kind, dtype, tflops", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989.4),
    ("NVIDIA H100 80GB HBM3", "float32", 494.7),  # TF32 dense: half the BF16 peak
    ("NVIDIA H100 80GB HBM3", "float8", 1978.9),
    ("NVIDIA H100 PCIe", "float32", 378.0),
    ("NVIDIA H100 PCIe", "bfloat16", 756.0),
    ("NVIDIA H100 NVL", "bfloat16", 835.0),
    ("NVIDIA H200", "bfloat16", 989.4),
    ("NVIDIA GH200 480GB", "bfloat16", 989.4),
    ("NVIDIA B200", "bfloat16", 2250.0),
    ("NVIDIA B200", "float8", 4500.0),
    ("NVIDIA GB200", "bfloat16", 2500.0),  # not the B200 row its name contains
    ("NVIDIA A100-SXM4-80GB", "bfloat16", 312.0),
    ("NVIDIA A100-SXM4-80GB", "float32", 156.0),  # TF32, XLA's default fp32 matmul precision
    ("NVIDIA L4", "bfloat16", 121.0),
    ("NVIDIA L40S", "bfloat16", 362.05),
    ("NVIDIA L40", "bfloat16", 181.05),  # not the L4 row its name begins with
    ("NVIDIA L40", "float8", 362.0),
])
def test_peak_table(kind, dtype, tflops):
    assert throughput.peak_flops(kind, dtype) == pytest.approx(tflops * 1e12)


def test_unknown_peaks_are_nan():
    assert math.isnan(throughput.peak_flops("cpu", "float32"))
    assert math.isnan(throughput.peak_flops("NVIDIA A100-SXM4-40GB", "float8"))  # no FP8
    assert math.isnan(throughput.mfu(1e6, 1296.0, float("nan"), 1))
    # 8 H100s at 1.5 M tokens/s of a 1296-FLOP/token model:
    assert throughput.mfu(1.5e6, 1296.0, 989.4e12, 8) == pytest.approx(1.5e6 * 1296 /
                                                                        (8 * 989.4e12))


def test_train_reports_throughput_with_scan_remat_and_accumulation(tmp_path):
    cfg = config_lib.proxy_config("umup", "smoke")
    for key, value in {"model.depth": 2, "model.scan_layers": True, "model.remat": "full",
                       "train.grad_accum_steps": 2, "train.steps": 4,
                       "train.metrics_every": 2, "train.checkpoint_every": 4}.items():
        config_lib.set_key(cfg, key, value)
    results = train_lib.train_and_evaluate(cfg, str(tmp_path))
    model_cfg = train_lib.model_config(cfg, 256)
    assert results["model_flops_per_token"] == throughput.train_flops_per_token(model_cfg)
    assert results["device_kind"] == jax.devices()[0].device_kind
    rows = read_metrics(tmp_path / "metrics.jsonl", "train")
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    # Steps 0 and 1 are the first calls of the stats step and the plain one: not timed.
    assert [r["tokens_per_s"] for r in rows[:2]] == ["nan", "nan"]
    assert all(r["tokens_per_s"] > 0 for r in rows[2:])
    stats = read_metrics(tmp_path / "metrics.jsonl", "stats")[0]
    assert "activations/layer_1/ffn_branch" in stats and "params/layer_0/attn_qkv" in stats
    saved = json.loads((tmp_path / "results.json").read_text(),  # strict JSON: no NaN literal
                       parse_constant=lambda c: pytest.fail(f"results.json holds {c}"))
    if jax.default_backend() == "cpu":  # no peak for a CPU, no memory statistics
        assert all(r["mfu"] == "nan" for r in rows) and saved["mfu"] == "nan"
        assert math.isnan(results["mfu"]) and saved["peak_flops_per_device"] == "nan"
        assert "peak_memory_bytes" not in saved and "peak_memory_bytes" not in rows[0]
        # Rerun, the finished run returns its results as they were: "nan" read back a float.
        again = train_lib.train_and_evaluate(cfg, str(tmp_path))
        assert math.isnan(again["mfu"]) and again["final_eval_loss"] == saved["final_eval_loss"]
    else:
        assert 0 < saved["mfu"] < 1 and saved["peak_memory_bytes"] > 0
    # The checkpoint layout is run-defining: resuming it unscanned is refused, untouched.
    config_lib.set_key(cfg, "model.scan_layers", False)
    with pytest.raises(identity.RunMismatchError, match="model.scan_layers: True → False"):
        train_lib.train_and_evaluate(cfg, str(tmp_path))


def test_remat_attention_kernel_and_accumulation_may_change_on_resume():
    old = json.loads(config_lib.proxy_config("umup", "smoke").to_json())
    new = json.loads(config_lib.proxy_config(
        "umup", "smoke,model.remat=full,model.attention_impl=xla,train.grad_accum_steps=2,"
                "model.scan_layers=True").to_json())
    refused, allowed = identity.resume_diff(old, new)
    assert [k for k, _, _ in allowed] == ["model.attention_impl", "model.remat",
                                          "train.grad_accum_steps"]
    assert [k for k, _, _ in refused] == ["model.scan_layers"]


def test_evaluation_and_checkpoints_are_outside_the_throughput_interval(tmp_path, monkeypatch):
    """tokens/s measures training steps: an evaluation (made to take 2 s here) or a checkpoint
    between two logged steps does not count in the interval's time."""
    import time

    evaluate = train_lib.evaluate

    def slow_evaluate(*args):
        time.sleep(2.0)
        return evaluate(*args)

    monkeypatch.setattr(train_lib, "evaluate", slow_evaluate)
    cfg = config_lib.proxy_config("umup", "smoke")
    for key, value in {"train.steps": 6, "train.log_every": 2, "train.eval_every": 2,
                       "train.checkpoint_every": 2}.items():
        config_lib.set_key(cfg, key, value)
    train_lib.train_and_evaluate(cfg, str(tmp_path))
    rows = read_metrics(tmp_path / "metrics.jsonl", "train")
    tokens_per_step = cfg.train.batch_size * cfg.model.seq_len
    # Logged at steps 0, 2, 4, 5; evaluations after steps 1 and 3 fall in the intervals that
    # end at steps 2 and 4 (steps 1-2 and 3-4).
    logged = [r for r in rows if r["step"] in (2, 4)]
    assert len(logged) == 2
    for r in logged:
        seconds = 2 * tokens_per_step / r["tokens_per_s"]  # two steps per logged interval
        assert seconds < 1.0, (r, seconds)


def test_compiling_is_outside_the_throughput_interval(tmp_path, monkeypatch):
    """The steps are compiled before the loop, and the first call of each step function
    loads and warms its program (on a GPU; it traced and compiled it too before the steps
    were compiled ahead, 2026-12-07), in process and on every resume.  Made to take 2 s here
    (a sleep before the real call), it does not count in the logged tokens/s, and neither
    does that step: the call returns once the step has run, and the step is left out of its
    interval.  Before, step 0's row counted step 0 but not its time, which was spent under
    the first call of the plain step: 16,300 tokens/s here for a step of 128 tokens that took
    over 0.3 s (under 430 tokens/s).  Every later call takes 0.3 s (a sleep after it): the
    rows' intervals hold all of them, and no first call."""
    import time

    compile_train_step = train_lib.compile_train_step
    step_s = 0.3

    def slow_to_compile(run, with_stats, batch_size):
        step = compile_train_step(run, with_stats, batch_size)
        first = [True]

        def call(*args):
            if first[0]:
                first[0] = False
                time.sleep(2.0)
            out = step(*args)
            time.sleep(step_s)
            return out

        return call

    monkeypatch.setattr(train_lib, "compile_train_step", slow_to_compile)
    cfg = config_lib.proxy_config("umup", "smoke")
    for key, value in {"train.steps": 6, "train.log_every": 2, "train.metrics_every": 2,
                       "train.checkpoint_every": 6}.items():
        config_lib.set_key(cfg, key, value)
    results = train_lib.train_and_evaluate(cfg, str(tmp_path))
    rows = {r["step"]: r for r in read_metrics(tmp_path / "metrics.jsonl", "train")}
    tokens_per_step = cfg.train.batch_size * cfg.model.seq_len
    # The stats step (steps 0, 2, 4) and the plain one (1, 3, 5) are first called at steps 0
    # and 1: step 0's row (read after step 1 ran) has no step it timed, the next rows count
    # step 2, steps 3-4, and step 5.
    assert rows[0]["tokens_per_s"] == "nan" and rows[0]["mfu"] == "nan"
    seconds = {step: steps_in_interval * tokens_per_step / rows[step]["tokens_per_s"]
               for step, steps_in_interval in ((2, 1), (4, 2), (5, 1))}
    # A call's sleep falls in the interval it is made in (steps 2-3 in step 2's row, 4-5 in
    # step 4's): each row under 2 s, the four sleeps all counted.
    assert max(seconds.values()) < 1.5 and sum(seconds.values()) >= 4 * step_s, seconds
    # results.json: tokens/s over the rows' four timed steps, not the last row's one.
    assert results["timed_steps"] == 4
    assert results["tokens_per_s"] == pytest.approx(4 * tokens_per_step / sum(seconds.values()),
                                                    rel=1e-9)
    assert results["eval_step"] == 6 and not results["interrupted"]
    assert results["signal"] is None
