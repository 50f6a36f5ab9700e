"""Gradient accumulation (``train.grad_accum_steps = k``): the accumulated update is the full
batch's for SP, μP and u-μP, and a k that cannot split the batch fails before compilation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import xla_flags
from umup_jax import config as config_lib
from umup_jax import parametrization as P
from umup_jax import train as train_lib

BATCH, STEPS = 8, 5


def smoke(parametrization, **overrides):
    cfg = config_lib.proxy_config(parametrization, "smoke")
    values = {"train.batch_size": BATCH, "model.num_heads": 2,
              # Adam's first step is g/(|g| + ε): a gradient element that cancels to rounding
              # level (|g| ~ 1e-9 here, 1e-6 of the largest) takes an arbitrary direction
              # whichever summation order computed it.  ε = 1e-6 keeps those elements from
              # dominating the comparison (with 1e-8: SP 3.7e-5, u-μP 2.5e-5 absolute).
              "optimizer.eps": 1e-6, **overrides}
    if parametrization == "mup":  # at its base width: μP's 1/m LR multiplier is 1
        values["model.hparams.base_width"] = 32
    for key, value in values.items():
        config_lib.set_key(cfg, key, value)
    return cfg


def batches():
    rng = np.random.default_rng(0)
    out = []
    for _ in range(STEPS):
        ids = rng.integers(0, 256, (BATCH, 33)).astype(np.int32)
        out.append({"inputs": jnp.asarray(ids[:, :-1]), "targets": jnp.asarray(ids[:, 1:])})
    return out


def train(cfg, state=None):
    run = train_lib.build_run(cfg)
    if state is None:
        state = train_lib.make_init_fn(run)(jax.random.key(0))
    state0 = jax.tree.map(np.array, state)
    step = train_lib.make_train_step(run, with_stats=False)
    losses, grad_norms = [], []
    for batch in batches():
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
        grad_norms.append(float(metrics["grad_norm"]))
    return state0, jax.tree.map(np.asarray, state["params"]), losses, grad_norms


def check_accumulated_update(parametrization):
    """Params after 5 steps with k = 1 and k = 4 micro-batches within 1e-5 (per parameter:
    the RMS of the difference over the RMS of the parameter; measured ≤ 4e-7), the same
    losses, and the same gradient norm at the first step (1e-6): Adam hides a constant factor
    on a gradient from the params (up to ε), the norm shows it (u-μP's weight-gradient scales
    with the micro-batch's tokens would give √k, a plain mean loss not divided by k gives k)."""
    state0, full, full_losses, full_norms = train(smoke(parametrization))
    _, accum, accum_losses, accum_norms = train(
        smoke(parametrization, **{"train.grad_accum_steps": 4}),
        state=jax.tree.map(jnp.asarray, state0))
    np.testing.assert_allclose(accum_losses, full_losses, rtol=1e-6)
    assert accum_norms[0] == pytest.approx(full_norms[0], rel=1e-6)
    errors = {}
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(full)[0],
                            jax.tree.leaves(accum)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        errors[jax.tree_util.keystr(path)] = (np.sqrt(np.mean((a - b) ** 2))
                                             / np.sqrt(np.mean(a**2)))
    print(parametrization, f"max rms-rel param difference {max(errors.values()):.2e}")
    assert max(errors.values()) <= 1e-5, errors


def test_accumulated_update_equals_full_batch_umup():
    check_accumulated_update("umup")


@pytest.mark.slow
@pytest.mark.parametrize("parametrization", ["sp", "mup"])
def test_accumulated_update_equals_full_batch(parametrization):
    check_accumulated_update(parametrization)


@pytest.mark.parametrize("parametrization", ["sp", "mup", "umup"])
def test_accumulation_weight_turns_micro_batch_gradients_into_the_full_batch_gradient(parametrization):
    """The rule's ``grad_accumulation_weight(k)`` times the sum of the k micro-batches'
    gradients of its own loss is the full batch's gradient (≤ 1e-6 relative): 1/k for SP's
    and μP's plain mean, whose backward carries 1/N; 1 for u-μP's, whose mean is a forward
    scale only (spec §5.14), so its backward is a sum over tokens.  On a shared readout-like
    weight W (logits x·W), without a model: the fast check for the SP and μP weights, whose
    end-to-end accumulation tests are marked slow."""
    rule = P.make_parametrization(parametrization, width=32)
    k, rows, seq, d, vocab = 4, 8, 16, 32, 64
    x = jax.random.normal(jax.random.key(1), (rows, seq, d))
    w = jax.random.normal(jax.random.key(2), (d, vocab)) * d**-0.5
    t = jax.random.randint(jax.random.key(3), (rows, seq), 0, vocab)
    grad = jax.jit(jax.grad(lambda w, x, t: rule.loss(x @ w, t)))
    full = grad(w, x, t)
    micro = sum(grad(w, x[j::k], t[j::k]) for j in range(k))
    accumulated = rule.grad_accumulation_weight(k) * micro
    np.testing.assert_allclose(accumulated, full, rtol=1e-6,
                               atol=1e-6 * float(jnp.abs(full).max()))


@pytest.mark.slow
@pytest.mark.parametrize("parametrization", ["sp", "mup", "umup"])
def test_accumulated_gradients_equal_full_batch(parametrization):
    """The gradients of one step, k = 1 vs 2 vs 8: ≤ 1e-6 relative (RMS) per parameter, and
    the u-μP weight-gradient scales see the full batch's tokens."""
    grads = {}
    for k in (1, 2, 8):
        run = train_lib.build_run(smoke(parametrization, **{"train.grad_accum_steps": k}))
        state = train_lib.make_init_fn(run)(jax.random.key(0))
        (loss, _), (g, _) = jax.jit(train_lib.make_grad_fn(run, False))(state["params"],
                                                                         batches()[0])
        grads[k] = (float(loss), g)
    for k in (2, 8):
        assert grads[k][0] == pytest.approx(grads[1][0], rel=1e-6)
        for a, b in zip(jax.tree.leaves(grads[1][1]), jax.tree.leaves(grads[k][1])):
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            assert np.sqrt(np.mean((a - b) ** 2)) <= 1e-6 * np.sqrt(np.mean(a**2))


def test_micro_batches_take_every_kth_row():
    batch = {"inputs": jnp.arange(8 * 3).reshape(8, 3)}
    micro = train_lib.micro_batches(batch, 4)["inputs"]
    assert micro.shape == (4, 2, 3)
    np.testing.assert_array_equal(micro[1], batch["inputs"][jnp.array([1, 5])])


@pytest.mark.parametrize(
    "overrides, devices, match",
    [
        ({"train.grad_accum_steps": 3}, 1,
         r"^train.grad_accum_steps=3 does not divide train.batch_size=8; use one of "
         r"\[1, 2, 4, 8\]$"),
        ({"train.grad_accum_steps": 8}, 2,
         r"^train.grad_accum_steps=8 does not divide the per-device batch 4 "
         r"\(train.batch_size=8 over data × fsdp = 2 devices: every micro-batch must split "
         r"evenly over the devices\); use one of \[1, 2, 4\]$"),
        ({"train.grad_accum_steps": 0}, 1, "train.grad_accum_steps=0 is invalid"),
        ({"model.remat": "ful"}, 1, "remat='ful' is invalid: allowed are"),
        ({"model.attention_impl": "cudnn", "model.dtype": "bfloat16"}, 1,
         "model.attention_impl='cudnn' cannot run here: cuDNN attention needs a CUDA GPU"),
        ({"model.attention_impl": "cudnn", "model.dtype": "float32"}, 1,
         "model.attention_impl='cudnn' cannot run here"),
    ],
)
def test_bad_input_fails_before_compilation(monkeypatch, overrides, devices, match):
    if jax.default_backend() == "gpu" and "cudnn" in str(overrides):
        pytest.skip("this machine has a GPU")

    def no_compile(*a, **k):
        raise AssertionError("compilation started before the config was validated")

    monkeypatch.setattr(train_lib, "make_init_fn", no_compile)
    monkeypatch.setattr(train_lib, "make_train_step", no_compile)
    with pytest.raises(ValueError, match=match):
        train_lib.build_run(smoke("umup", **overrides), devices=[jax.devices()[0]] * devices)


@pytest.mark.slow
def test_accumulation_on_a_sharded_mesh_equals_one_device(tmp_path):
    """4 devices (data 2 × fsdp 2), k = 2, remat: the same losses and gradient norms as one
    device with the whole batch (measured ≤ 2e-7 relative)."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    arg = "smoke,train.steps=3,train.batch_size=8"
    runs = {"one": (arg, {}),
            "four": (arg + ",train.grad_accum_steps=2,model.remat=dots_saveable,mesh.data=2,"
                           "mesh.fsdp=2",
                     {"XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=4")})}
    rows = {}
    for name, (config_arg, env) in runs.items():
        subprocess.run([sys.executable, "-m", "umup_jax.main",
                        f"--config={root}/configs/umup_proxy.py:{config_arg}",
                        f"--workdir={tmp_path / name}"], cwd=root, check=True,
                       env={**os.environ, **env}, capture_output=True)
        rows[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").open()
                      if '"train"' in line]
    assert json.loads((tmp_path / "four" / "results.json").read_text())["devices"] == 4
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in rows["four"]],
                                   [r[key] for r in rows["one"]], rtol=1e-6)
