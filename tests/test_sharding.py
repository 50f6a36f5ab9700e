"""Sharded training on forced CPU devices (subprocesses): mesh shapes agree with 1 device,
parameter shardings follow the logical rules, FSDP memory, reshard on restore, two processes
with jax.distributed, and errors before compilation."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import xla_flags
from umup_jax import sharding as sharding_lib
from umup_jax.metrics import read_metrics

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    env = {**os.environ, "XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=8")}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "sharded_worker.py"), str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.mark.parametrize("mesh", ["8x1x1", "2x4x1", "2x2x2"])
def test_meshes_match_one_device(worker, mesh):
    np.testing.assert_allclose(worker["losses"][mesh], worker["losses"]["1"], rtol=1e-4)


@pytest.mark.parametrize("mesh", ["1", "8x1x1", "2x4x1", "2x2x2", "1x8x1"])
def test_parameter_shardings_follow_the_rules(worker, mesh):
    specs = worker["sharding_ok"][mesh]
    assert specs["['params']['layer_0']['ffn_up']"][0] == ["fsdp", "tensor"]
    assert specs["['params']['layer_1']['attn_qkv']"][0] == ["fsdp", None, "tensor"]
    for path, (expected, got) in specs.items():
        assert expected == got, (mesh, path)


def test_fsdp_over_8_devices_holds_at_most_a_sixth(worker):
    b = worker["bytes"]["1x8x1"]
    print(f"\nparams+optimizer state: {b['total']} bytes unsharded, "
          f"{b['max_per_device']} per device under FSDP over 8")
    assert b["max_per_device"] * 6 <= b["total"]
    assert worker["bytes"]["1"]["max_per_device"] == b["total"]


def test_save_on_2x4_restore_on_4x2_and_one_device(worker):
    r = worker["restore"]
    for name in ("4x2x1", "1"):
        assert r[f"{name}_params_equal"] and r[f"{name}_sharding_ok"]
        assert r[f"{name}_data_state"] == {"next_index": 3}
        np.testing.assert_allclose(r[name], r["2x4x1"], rtol=1e-6)
        assert r[f"{name}_update_max_rel"] < 1e-5  # same per-parameter LRs after the reshard


def test_fp8_trains_under_sharding(worker):
    losses = worker["fp8_losses"]
    assert all(np.isfinite(losses["2x2x2"]))
    np.testing.assert_allclose(losses["2x2x2"], losses["1"], rtol=1e-3)


def test_bad_meshes_fail_before_compilation_naming_sizes(worker):
    e = worker["errors"]
    assert "has 3 devices but 8 are available" in e["mesh_size"]
    assert "dimension 2 is not divisible by mesh axis 'tensor' of size 8" in e["indivisible_dim"]
    assert "train.batch_size=4 is not divisible by data × fsdp = 1 × 8 = 8" in e["batch"]


def test_mesh_shape_resolution():
    assert sharding_lib.mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == (4, 2, 1)
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        sharding_lib.mesh_shape({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(ValueError, match="8 is not divisible by 3"):
        sharding_lib.mesh_shape({"data": -1, "fsdp": 3}, 8)
    with pytest.raises(ValueError, match="mesh.tensor=0 is invalid"):
        sharding_lib.mesh_shape({"tensor": 0}, 8)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_single_process(tmp_path):
    arg = "smoke,train.steps=3,train.batch_size=8,train.eval_batch_size=8"
    cmd = lambda wd: [sys.executable, "-m", "umup_jax.main",
                      f"--config={ROOT / 'configs' / 'umup_proxy.py'}:{arg}", f"--workdir={wd}"]
    single = subprocess.run(cmd(tmp_path / "single"), cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    port = _free_port()
    procs = []
    for pid in range(2):
        env = {**os.environ, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
               "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(pid)}
        procs.append(subprocess.Popen(cmd(tmp_path / "multi"), cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "2 process(es)" in outs[0][0]
    a = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "single" / "metrics.jsonl")}
    b = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "multi" / "metrics.jsonl")}
    assert sorted(a) == sorted(b) == [0, 1, 2]
    np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=1e-5)
    results = json.loads((tmp_path / "multi" / "results.json").read_text())
    assert results["devices"] == 2 and results["mesh"]["data"] == 2
