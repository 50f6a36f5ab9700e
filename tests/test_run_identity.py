"""No run silently trains on the wrong thing (issue 9): config changes on resume, the token
cache key, finished reruns, sweep identity, train/valid overlap, finite checkpoints, damaged vs
mismatched checkpoints, one-line failures."""

import hashlib
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from umup_jax import checkpoint as ckpt
from umup_jax import config as config_lib
from umup_jax import data as data_lib
from umup_jax import identity
from umup_jax import sweep as sweep_lib
from umup_jax import train as train_lib
from umup_jax.metrics import json_safe

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "umup_proxy.py"


def smoke(**overrides):
    cfg = config_lib.proxy_config("umup", "smoke")
    for key, value in overrides.items():
        config_lib.set_key(cfg, key.replace("__", "."), value)
    return cfg


def digest(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def rows(workdir, kind):
    out = []
    for line in (pathlib.Path(workdir) / "metrics.jsonl").open():
        row = json.loads(line)
        if row["kind"] == kind:
            out.append(row)
    return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished :smoke run (checkpoints 3 and 6) to copy from."""
    workdir = tmp_path_factory.mktemp("finished")
    train_lib.train_and_evaluate(smoke(), str(workdir))
    return workdir


def copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------------------------
# Run identity on resume
# ---------------------------------------------------------------------------------------------


def test_identity_rules():
    a = smoke()
    b = smoke(train__progress=True, train__eval_every=1, mesh__data=2, data__cache_dir="/x")
    assert identity.identity_hash(a) == identity.identity_hash(b)
    refused, allowed = identity.resume_diff(json.loads(a.to_json()), json.loads(b.to_json()))
    assert refused == [] and {k for k, _, _ in allowed} == {
        "train.progress", "train.eval_every", "mesh.data", "data.cache_dir"}
    c = smoke(train__steps=12)
    assert identity.identity_hash(a) != identity.identity_hash(c)
    refused, allowed = identity.resume_diff(json.loads(a.to_json()), json.loads(c.to_json()))
    assert refused == [] and allowed == [("train.steps", 6, 12)]
    refused, _ = identity.resume_diff(json.loads(c.to_json()), json.loads(a.to_json()))
    assert refused == [("train.steps", 12, 6)]  # steps may only grow
    # A key the old config did not have counts as unchanged while it holds its default.
    old = json.loads(a.to_json())
    del old["train"]["restart"]
    assert identity.diff(old, json.loads(a.to_json()), json.loads(a.to_json())) == []


def test_width_change_is_refused_and_touches_nothing(finished, tmp_path, capsys):
    workdir = copy_run(finished, tmp_path / "run")
    before = digest(workdir)
    with pytest.raises(identity.RunMismatchError) as info:
        train_lib.train_and_evaluate(smoke(model__width=64, model__num_heads=2), str(workdir))
    msg = str(info.value)
    assert "model.width: 32 → 64" in msg and "model.num_heads: 1 → 2" in msg
    assert "--workdir" in msg and "train.restart=True" in msg
    assert digest(workdir) == before  # nothing moved, nothing written
    assert not (workdir / "checkpoints" / "corrupt").exists()
    # The original command finds its run intact: finished, results unchanged.
    results_before = (workdir / "results.json").read_bytes()
    again = train_lib.train_and_evaluate(smoke(), str(workdir))
    assert again["steps"] == 6 and (workdir / "results.json").read_bytes() == results_before
    # ... and its checkpoints still restore: the original config, trained on, resumes at 6.
    capsys.readouterr()
    more = train_lib.train_and_evaluate(smoke(train__steps=9), str(workdir))
    assert "resumed from checkpoint step 6" in capsys.readouterr().out
    assert more["steps"] == 9 and not (workdir / "checkpoints" / "corrupt").exists()


def test_learning_rate_change_is_refused(finished, tmp_path):
    workdir = copy_run(finished, tmp_path / "run")
    with pytest.raises(identity.RunMismatchError, match=r"optimizer.learning_rate: 1.0 → 0.5"):
        train_lib.train_and_evaluate(smoke(optimizer__learning_rate=0.5), str(workdir))


def test_more_steps_resume_and_the_change_is_recorded(finished, tmp_path, capsys):
    workdir = copy_run(finished, tmp_path / "run")
    results = train_lib.train_and_evaluate(smoke(train__steps=9, train__eval_every=9),
                                           str(workdir))
    out = capsys.readouterr().out
    assert "resumed from checkpoint step 6" in out
    assert "config change on resume: train.steps: 6 → 9" in out
    assert results["steps"] == 9 and results["final_eval_loss"] is not None
    changes = {r["key"]: (r["old"], r["new"]) for r in rows(workdir, "config_change")}
    assert changes == {"train.steps": (6, 9), "train.eval_every": (3, 9)}
    assert sorted(r["step"] for r in rows(workdir, "train"))[-3:] == [6, 7, 8]


def test_restart_keeps_the_old_run_aside(finished, tmp_path):
    workdir = copy_run(finished, tmp_path / "run")
    old_ckpts = digest(workdir / "checkpoints")
    results = train_lib.train_and_evaluate(
        smoke(model__width=64, model__num_heads=2, train__restart=True), str(workdir))
    assert results["steps"] == 6 and results["config"]["model"]["width"] == 64
    previous = list((workdir / "previous").iterdir())
    assert len(previous) == 1
    assert digest(previous[0] / "checkpoints") == old_ckpts  # kept, byte for byte
    assert (previous[0] / "results.json").exists() and (previous[0] / "metrics.jsonl").exists()
    assert rows(workdir, "train")[0]["step"] == 0  # the new run's metrics start afresh


def test_finished_run_rerun_keeps_results(finished, tmp_path, capsys):
    workdir = copy_run(finished, tmp_path / "run")
    before = (workdir / "results.json").read_bytes()
    results = train_lib.train_and_evaluate(smoke(), str(workdir))
    assert "is finished (step 6 of 6)" in capsys.readouterr().out
    assert (workdir / "results.json").read_bytes() == before
    assert json_safe(results) == json.loads(before)  # the file's "nan": float NaN returned
    assert jax.default_backend() != "cpu" or math.isnan(results["mfu"])  # a float again
    # Without results.json the finished run re-evaluates instead of writing nulls.
    (workdir / "results.json").unlink()
    redone = train_lib.train_and_evaluate(smoke(), str(workdir))
    assert redone["final_eval_loss"] == pytest.approx(json.loads(before)["final_eval_loss"])
    assert redone["final_train_loss"] == pytest.approx(json.loads(before)["final_train_loss"])


# ---------------------------------------------------------------------------------------------
# The tokens a run trains on: the same config keys can name changed files
# ---------------------------------------------------------------------------------------------


def test_token_fingerprint_sees_every_token_and_not_the_dtype(monkeypatch):
    rng = np.random.default_rng(0)
    train = rng.integers(0, 50000, 10_000).astype(np.uint16)
    valid = rng.integers(0, 50000, 1_000).astype(np.uint16)
    fp = data_lib.token_fingerprint(train, valid, 50000)
    assert len(fp) == 16 and fp == data_lib.token_fingerprint(train, valid, 50000)
    # The ids count, not how they are stored: a uint16 .bin and int32 ids agree.
    assert fp == data_lib.token_fingerprint(train.astype(np.int32), valid.astype(np.uint32),
                                            50000)
    for i in (0, 4321, 9999):  # one changed token anywhere in a small split
        edited = train.copy()
        edited[i] ^= 1
        assert data_lib.token_fingerprint(edited, valid, 50000) != fp
    assert data_lib.token_fingerprint(valid, train, 50000) != fp  # splits swapped
    assert data_lib.token_fingerprint(train[:-1], valid, 50000) != fp  # one token shorter
    assert data_lib.token_fingerprint(train, valid, 50001) != fp  # another vocabulary
    # A split longer than FINGERPRINT_FULL_TOKENS is read in evenly spaced blocks.
    monkeypatch.setattr(data_lib, "FINGERPRINT_FULL_TOKENS", 1000)
    monkeypatch.setattr(data_lib, "FINGERPRINT_BLOCKS", 8)
    monkeypatch.setattr(data_lib, "FINGERPRINT_BLOCK_TOKENS", 100)
    sampled = data_lib.token_fingerprint(train, valid, 50000)
    starts = np.linspace(0, train.size - 100, 8).astype(int)  # blocks [s, s + 100)
    for i in (0, int(starts[3]) + 50, train.size - 1):  # first, inside a block, last
        edited = train.copy()
        edited[i] ^= 1
        assert data_lib.token_fingerprint(edited, valid, 50000) != sampled
    gap = int(starts[1]) + 200  # between blocks 1 and 2: the documented blind spot
    assert not any(s <= gap < s + 100 for s in starts)
    edited = train.copy()
    edited[gap] ^= 1
    assert data_lib.token_fingerprint(edited, valid, 50000) == sampled
    assert data_lib.token_fingerprint(train[1:], valid, 50000) != sampled  # exact length


def test_check_tokens_rules(tmp_path):
    train_lib.check_tokens("ab12", "ab12", 3, tmp_path, "text / bytes")
    train_lib.check_tokens(None, "ab12", 3, tmp_path, "text / bytes")  # an older checkpoint
    with pytest.raises(identity.RunMismatchError,
                       match=r"other tokens \(checkpoint step 3: token fingerprint ab12; the "
                             r"config's data, text / bytes, now gives cd34\)"):
        train_lib.check_tokens("ab12", "cd34", 3, tmp_path, "text / bytes")


def _text_run(tmp_path, **overrides):
    data = tmp_path / "data"
    if not data.exists():
        data.mkdir()
        (data / "train.txt").write_text(TEXT_A)
        (data / "valid.txt").write_text(VALID)
    return smoke(data__source="text", data__train_files=[str(data / "train.txt")],
                 data__valid_files=[str(data / "valid.txt")],
                 data__cache_dir=str(tmp_path / "cache"), **overrides)


def test_resume_on_changed_data_files_is_refused(tmp_path, capsys):
    workdir = tmp_path / "run"
    first = train_lib.train_and_evaluate(_text_run(tmp_path, train__steps=3), str(workdir))
    store = ckpt.CheckpointStore(workdir / "checkpoints", keep=2)
    try:
        assert store.token_fingerprint(3) == first["data_fingerprint"]
    finally:
        store.close()
    # The same config over the same files resumes (and the fingerprint is stored again).
    second = train_lib.train_and_evaluate(_text_run(tmp_path, train__steps=4), str(workdir))
    assert second["steps"] == 4 and second["data_fingerprint"] == first["data_fingerprint"]
    assert "predates token fingerprints" not in capsys.readouterr().out
    # The train file is edited under the same path: the config is unchanged, the tokens not.
    (tmp_path / "data" / "train.txt").write_text(TEXT_A.replace("lazy", "lively", 1))
    before = digest(workdir)
    with pytest.raises(identity.RunMismatchError) as info:
        train_lib.train_and_evaluate(_text_run(tmp_path, train__steps=6), str(workdir))
    msg = str(info.value)
    assert "other tokens (checkpoint step 4" in msg and first["data_fingerprint"] in msg
    assert "train.restart=True" in msg and "--workdir" in msg
    assert digest(workdir) == before  # nothing moved, nothing written
    # train.restart=True keeps the old run aside and trains on the new tokens from step 0.
    redone = train_lib.train_and_evaluate(
        _text_run(tmp_path, train__steps=6, train__restart=True), str(workdir))
    assert redone["steps"] == 6 and redone["data_fingerprint"] != first["data_fingerprint"]
    (previous,) = list((workdir / "previous").iterdir())
    assert json.loads((previous / "results.json").read_text())["steps"] == 4
    assert rows(workdir, "train")[0]["step"] == 0


def test_finished_run_rerun_on_changed_data_files_is_refused(tmp_path, capsys):
    """A finished run's results stand for the tokens it trained on: after its data files
    changed, a rerun refuses instead of reporting them; with the data gone it keeps them."""
    workdir = tmp_path / "run"
    first = train_lib.train_and_evaluate(_text_run(tmp_path, train__steps=3), str(workdir))
    capsys.readouterr()
    again = train_lib.train_and_evaluate(_text_run(tmp_path, train__steps=3), str(workdir))
    assert _same(again, first) and "is finished (step 3 of 3)" in capsys.readouterr().out
    (tmp_path / "data" / "train.txt").write_text(TEXT_A.replace("lazy", "lively", 1))
    before = digest(workdir)
    with pytest.raises(identity.RunMismatchError) as info:
        train_lib.train_and_evaluate(_text_run(tmp_path, train__steps=3), str(workdir))
    assert "other tokens (checkpoint step 3" in str(info.value)
    assert first["data_fingerprint"] in str(info.value)
    assert digest(workdir) == before
    # Data that cannot be read any more: the finished results come back, with a note.
    (tmp_path / "data" / "train.txt").unlink()
    capsys.readouterr()
    kept = train_lib.train_and_evaluate(_text_run(tmp_path, train__steps=3), str(workdir))
    out = capsys.readouterr().out
    assert _same(kept, first) and "is finished (step 3 of 3)" in out
    assert "note: the config's data could not be read (DataConfigError" in out
    assert digest(workdir) == before
    # train.restart=True over the changed data moves the finished run aside and retrains.
    (tmp_path / "data" / "train.txt").write_text(TEXT_A.replace("lazy", "lively", 1))
    redone = train_lib.train_and_evaluate(
        _text_run(tmp_path, train__steps=3, train__restart=True), str(workdir))
    assert redone["data_fingerprint"] != first["data_fingerprint"]
    (previous,) = list((workdir / "previous").iterdir())
    assert _same(json.loads((previous / "results.json").read_text()), first)
    assert rows(workdir, "train")[0]["step"] == 0


def _same(a: dict, b: dict) -> bool:
    """Equal results dicts, as returned or as read from results.json (NaN, e.g. the MFU on CPU,
    equal to itself and to the file's "nan")."""
    return (json.dumps(json_safe(a), sort_keys=True)
            == json.dumps(json_safe(b), sort_keys=True))


def test_checkpoint_without_a_token_fingerprint_resumes_with_a_note(tmp_path, monkeypatch,
                                                                    capsys):
    """A checkpoint written before fingerprints were stored has none: it resumes, saying so."""
    save = ckpt.CheckpointStore.save
    monkeypatch.setattr(ckpt.CheckpointStore, "save",
                        lambda self, *args: save(self, *args[:4]))  # drops the fingerprint
    workdir = tmp_path / "run"
    train_lib.train_and_evaluate(_text_run(tmp_path, train__steps=3), str(workdir))
    monkeypatch.setattr(ckpt.CheckpointStore, "save", save)
    # Rerun as finished: results.json's fingerprint stands in for the checkpoint's; with
    # neither, the results come back with a note.
    capsys.readouterr()
    train_lib.train_and_evaluate(_text_run(tmp_path, train__steps=3), str(workdir))
    assert "predates token fingerprints" not in capsys.readouterr().out
    results_path = workdir / "results.json"
    old_results = json.loads(results_path.read_text())
    results_path.write_text(json.dumps({k: v for k, v in old_results.items()
                                        if k != "data_fingerprint"}))
    train_lib.train_and_evaluate(_text_run(tmp_path, train__steps=3), str(workdir))
    out = capsys.readouterr().out
    assert "is finished (step 3 of 3)" in out
    assert "the finished run in" in out and "predates token fingerprints" in out
    capsys.readouterr()
    results = train_lib.train_and_evaluate(_text_run(tmp_path, train__steps=4), str(workdir))
    out = capsys.readouterr().out
    assert "resumed from checkpoint step 3" in out
    assert "note: checkpoint step 3 predates token fingerprints" in out
    assert results["steps"] == 4
    store = ckpt.CheckpointStore(workdir / "checkpoints", keep=2)
    try:  # the step written after the resume has one again
        assert store.token_fingerprint(3) is None
        assert store.token_fingerprint(4) == results["data_fingerprint"]
    finally:
        store.close()


# ---------------------------------------------------------------------------------------------
# Checkpoints: finite, damaged, mismatched, transient
# ---------------------------------------------------------------------------------------------


def test_non_finite_state_is_never_saved(tmp_path):
    # η = 1e39 is inf in float32: the first update makes the params non-finite while the
    # loss of step 0 (computed before that update) is still finite.
    cfg = smoke(optimizer__learning_rate=1e39, optimizer__warmup_steps=0,
                train__checkpoint_every=1)
    with pytest.raises(train_lib.NonFiniteLossError, match="not finite after step 1"):
        train_lib.train_and_evaluate(cfg, str(tmp_path / "stop"))
    assert not list((tmp_path / "stop" / "checkpoints").glob("[0-9]*"))
    cfg.train.nan_policy = "ignore"
    cfg.train.steps = 2
    train_lib.train_and_evaluate(cfg, str(tmp_path / "ignore"))
    assert not list((tmp_path / "ignore" / "checkpoints").glob("[0-9]*"))


def test_state_is_finite():
    ok = {"a": jnp.ones(3), "b": {"c": jnp.zeros((2, 2))}, "step": jnp.int32(3)}
    assert bool(train_lib.state_is_finite(ok))
    assert not bool(train_lib.state_is_finite({**ok, "a": jnp.array([1.0, jnp.nan, 0.0])}))
    assert not bool(train_lib.state_is_finite({**ok, "a": jnp.array([jnp.inf, 0.0, 0.0])}))


def test_shape_mismatch_is_not_treated_as_damage(finished, tmp_path, monkeypatch):
    workdir = copy_run(finished, tmp_path / "run")
    before = digest(workdir / "checkpoints")
    other = train_lib.build_run(smoke(model__width=64, model__num_heads=2))
    store = ckpt.CheckpointStore(workdir / "checkpoints", keep=3)

    def no_read(*args, **kwargs):
        raise AssertionError("the arrays were read; the metadata should have refused them")

    # The stored shapes are compared from the metadata, before any array is read, and the
    # message names the arrays that differ (the smoke model has width 32, one head).
    monkeypatch.setattr(store._state_reader, "restore", no_read)
    with pytest.raises(ckpt.CheckpointMismatchError,
                       match=r"does not fit this model \(21 array\(s\) differ in shape: "
                             r"params\.params\.embedding: stored \(256, 32\), this model "
                             r"\(256, 64\); params\.params\.layer_0\.attn_out: .*; and 17 more\)"):
        store.restore(6, other.abstract_state)
    store.close()
    assert digest(workdir / "checkpoints") == before


def test_shape_mismatches_names_the_arrays_both_sides_hold():
    sds = jax.ShapeDtypeStruct
    stored = {"params": {"a": sds((4, 8), jnp.float32), "b": sds((3,), jnp.float32)},
              "opt_state": ({"count": sds((), jnp.int32)},), "old": sds((2,), jnp.float32)}
    model = {"params": {"a": sds((4, 16), jnp.float32), "b": sds((3,), jnp.bfloat16)},
             "opt_state": ({"count": sds((), jnp.int32)},), "new": sds((5,), jnp.float32)}
    # Only shapes of arrays on both sides count: a dtype is cast by orbax, and arrays one side
    # lacks are orbax's structure check (so a naming difference can never refuse a restore).
    assert ckpt.shape_mismatches(stored, model) == ["params.a: stored (4, 8), this model (4, 16)"]
    assert ckpt.shape_mismatches(stored, stored) == []
    stored["opt_state"][0]["count"] = sds((1,), jnp.int32)  # parameters are named first
    assert ckpt.shape_mismatches(stored, model) == [
        "params.a: stored (4, 8), this model (4, 16)",
        "opt_state.0.count: stored (1,), this model ()"]


def test_transient_errors_are_retried_then_fail_leaving_the_checkpoint(finished, tmp_path,
                                                                       monkeypatch):
    workdir = copy_run(finished, tmp_path / "run")
    before = digest(workdir / "checkpoints")
    run = train_lib.build_run(smoke())
    store = ckpt.CheckpointStore(workdir / "checkpoints", keep=3)
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        raise OSError("Resource temporarily unavailable")

    monkeypatch.setattr(ckpt, "RETRY_WAIT_S", 0.0)
    monkeypatch.setattr(store._state_reader, "restore", flaky)
    with pytest.raises(ckpt.CheckpointReadError, match="after 3 tries"):
        store.restore(6, run.abstract_state)
    assert len(calls) == ckpt.RETRIES
    store.close()
    assert digest(workdir / "checkpoints") == before


def test_manifest_detects_any_changed_byte(finished, tmp_path):
    workdir = copy_run(finished, tmp_path / "run")
    step_dir = workdir / "checkpoints" / "6"
    assert (step_dir / ckpt.MANIFEST).exists() and ckpt.verify(step_dir) is None
    victim = max((p for p in (step_dir / "state").rglob("*") if p.is_file()),
                 key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte
    victim.write_bytes(bytes(data))
    assert "fails its CRC-32 check" in ckpt.verify(step_dir)


# ---------------------------------------------------------------------------------------------
# Data: cache keys and train/valid overlap
# ---------------------------------------------------------------------------------------------

TEXT_A = "the quick brown fox jumps over the lazy dog. " * 400
TEXT_B = "Of Man's first disobedience, and the fruit of that forbidden tree. " * 300
VALID = "the fruit of the lazy tree jumps over first disobedience. " * 60


def test_token_cache_is_keyed_by_the_tokenizer_content(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    (tmp_path / "a" / "train.txt").write_text(TEXT_A)
    (tmp_path / "b" / "train.txt").write_text(TEXT_B)
    (tmp_path / "valid.txt").write_text(VALID)
    cfg = config_lib.base_config("umup").data
    cfg.source, cfg.tokenizer, cfg.vocab_size = "text", "bpe", 400
    cfg.valid_files = [str(tmp_path / "valid.txt")]
    cache = str(tmp_path / "cache")
    cfg.train_files = [str(tmp_path / "a" / "train.txt")]
    a = data_lib.load_tokens(cfg, cache)
    cfg.train_files = [str(tmp_path / "b" / "train.txt")]
    b = data_lib.load_tokens(cfg, cache)
    assert a.tokenizer.name == b.tokenizer.name  # same name, different merges
    assert a.tokenizer.fingerprint != b.tokenizer.fingerprint
    np.testing.assert_array_equal(b.valid, b.tokenizer.encode(VALID))
    assert not np.array_equal(a.valid, b.valid)
    assert not list(pathlib.Path(cache).glob(".*"))  # no temporary files left behind


def test_concurrent_cache_writers_do_not_collide(tmp_path):
    text = "concurrent writers " * 2000
    tok = data_lib.ByteTokenizer()
    code = ("import sys, pathlib; from umup_jax import data; "
            "data._cached_encode(data.ByteTokenizer(), sys.argv[1], pathlib.Path(sys.argv[2]), "
            "'train')")
    procs = [subprocess.Popen([sys.executable, "-c", code, text, str(tmp_path)], cwd=ROOT,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    (entry,) = tmp_path.glob("tokens-bytes-*.npy")
    np.testing.assert_array_equal(np.load(entry), tok.encode(text))


def test_overlapping_train_and_valid_files_are_refused(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT_A)
    (tmp_path / "b.txt").write_text(TEXT_B)
    (tmp_path / "held").mkdir()
    (tmp_path / "held" / "copy_of_b.txt").write_text(TEXT_B)
    cfg = config_lib.base_config("umup").data
    cfg.source, cfg.tokenizer, cfg.cache_dir = "text", "bytes", str(tmp_path / "cache")
    cfg.train_files = [str(tmp_path / "*.txt")]
    cfg.valid_files = [str(tmp_path / "a.txt")]
    with pytest.raises(data_lib.DataConfigError, match=r"overlap data.train_files: .*a\.txt"):
        data_lib.load_tokens(cfg, cfg.cache_dir)
    cfg.valid_files = [str(tmp_path / "held" / "copy_of_b.txt")]
    with pytest.raises(data_lib.DataConfigError, match=r"same bytes as .*b\.txt"):
        data_lib.load_tokens(cfg, cfg.cache_dir)


# ---------------------------------------------------------------------------------------------
# Sweeps
# ---------------------------------------------------------------------------------------------


def test_sweep_rerun_with_another_base_config_is_refused(tmp_path):
    spec = {"name": "s", "kind": "grid", "grid": {"optimizer.learning_rate": [0.5, 1.0]}}
    base = config_lib.proxy_config("umup", "smoke,train.steps=2")
    sweep_lib.run_sweep(base, spec, str(tmp_path), progress=False)
    other = config_lib.proxy_config("umup", "smoke,train.steps=2,model.width=64,"
                                            "model.num_heads=2")
    with pytest.raises(sweep_lib.SweepError, match=r"another base config .*model.width: 32 → 64"):
        sweep_lib.run_sweep(other, spec, str(tmp_path), progress=False)
    # Execution-only changes (the progress bar, cadence) are the same sweep.
    cosmetic = config_lib.proxy_config("umup", "smoke,train.steps=2,train.log_every=5")
    assert len(sweep_lib.run_sweep(cosmetic, spec, str(tmp_path), progress=False)) == 2


def test_legacy_sweep_json_is_checked_against_its_rows(tmp_path, capsys):
    """A sweep.json written before base-config identity holds only the spec: its rows' config
    columns decide whether the current base config is the one they were trained with."""
    spec = {"name": "s", "kind": "grid", "grid": {"optimizer.learning_rate": [0.5, 1.0]}}
    base = config_lib.proxy_config("umup", "smoke,train.steps=2")
    sweep_lib.run_sweep(base, spec, str(tmp_path), progress=False)
    legacy = json.dumps(spec)
    (tmp_path / "sweep.json").write_text(legacy)
    rows_before = (tmp_path / "results.csv").read_bytes()
    for other, match in (
        ("smoke,train.steps=2,model.width=64,model.num_heads=2", r"width 32 vs 64"),
        ("smoke,train.steps=4", r"steps 2 vs 4"),
        ("smoke,train.steps=2,model.hparams.attn_mult=2.0", r"hp.attn_mult 1.0 vs 2.0"),
    ):
        with pytest.raises(sweep_lib.SweepError,
                           match=rf"predates base-config identity, and 2 of its rows .*{match}"):
            sweep_lib.run_sweep(config_lib.proxy_config("umup", other), spec, str(tmp_path),
                                progress=False)
        assert (tmp_path / "sweep.json").read_text() == legacy  # nothing adopted
        assert (tmp_path / "results.csv").read_bytes() == rows_before
    capsys.readouterr()
    rows = sweep_lib.run_sweep(base, spec, str(tmp_path), progress=False)
    assert "2 row(s) agree with the current base config" in capsys.readouterr().out
    assert len(rows) == 2 and (tmp_path / "results.csv").read_bytes() == rows_before
    record = json.loads((tmp_path / "sweep.json").read_text())
    assert record["base_config_identity"] == identity.identity_hash(base)


def test_sweep_rerun_of_finished_single_runs_is_not_diverged(tmp_path):
    spec = {"name": "s", "kind": "grid", "grid": {"model.width": [32]}}
    base = config_lib.proxy_config("umup", "smoke,train.steps=2")
    sweep_lib.run_sweep(base, spec, str(tmp_path), progress=False)
    (tmp_path / "results.csv").write_text((tmp_path / "results.csv").read_text()
                                          .splitlines()[0] + "\n")  # forget the row
    (row,) = sweep_lib.run_sweep(base, spec, str(tmp_path), progress=False)
    assert row["diverged"] in (0, "0") and float(row["final_eval_loss"]) > 0


# ---------------------------------------------------------------------------------------------
# One clear line on failure
# ---------------------------------------------------------------------------------------------


def test_cli_failure_is_one_line_with_the_traceback_in_the_workdir(finished, tmp_path):
    workdir = copy_run(finished, tmp_path / "run")
    cmd = [sys.executable, "-m", "umup_jax.main", f"--config={CONFIG}:smoke,model.width=64,"
           "model.num_heads=2", f"--workdir={workdir}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 1
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr and len(err) == 1, proc.stderr[-3000:]
    assert err[0].startswith("python -m umup_jax.main: error: ")
    assert "model.width: 32 → 64" in err[0]
    assert "error.log" in err[0] and "Traceback" in (workdir / "error.log").read_text()


def test_token_fingerprint_sees_every_token_of_a_split_over_one_read_chunk():
    """A split of at most FINGERPRINT_FULL_TOKENS is hashed whole, read in chunks of 2**20
    tokens: a token changed anywhere in a chunk, its second half included, or in the next
    chunk changes the fingerprint."""
    rng = np.random.default_rng(1)
    train = rng.integers(0, 50000, (1 << 20) + 5000).astype(np.uint16)
    valid = rng.integers(0, 50000, 100).astype(np.uint16)
    fp = data_lib.token_fingerprint(train, valid, 50000)
    for i in (3 << 18, (1 << 20) - 1, 1 << 20, train.size - 1):
        edited = train.copy()
        edited[i] ^= 1
        assert data_lib.token_fingerprint(edited, valid, 50000) != fp, i


def test_token_fingerprint_of_a_sampled_split_holds_its_exact_length(monkeypatch):
    """A split read in blocks is hashed with its exact length: two lengths whose blocks read
    the same tokens (a constant split) still differ."""
    monkeypatch.setattr(data_lib, "FINGERPRINT_FULL_TOKENS", 1000)
    monkeypatch.setattr(data_lib, "FINGERPRINT_BLOCKS", 8)
    monkeypatch.setattr(data_lib, "FINGERPRINT_BLOCK_TOKENS", 100)
    valid = np.zeros(10, np.uint16)
    assert (data_lib.token_fingerprint(np.zeros(5000, np.uint16), valid, 50000)
            != data_lib.token_fingerprint(np.zeros(5001, np.uint16), valid, 50000))
