"""XLA's memory plan of the train step against the device's limit (umup_jax.memory_plan): the
plan's arithmetic, the limit read from the devices, the refusal and its remedies, and the
trainer compiling its steps ahead and stopping before any state is placed on the devices."""

import json
import os

import jax
import jax.numpy as jnp
import pytest

from umup_jax import config as config_lib
from umup_jax import memory_plan
from umup_jax import sharding as sharding_lib
from umup_jax import train as train_lib
from umup_jax.metrics import read_metrics


def smoke(**overrides):
    cfg = config_lib.proxy_config("umup", "smoke")
    for key, value in overrides.items():
        config_lib.set_key(cfg, key.replace("__", "."), value)
    return cfg


def test_plan_counts_arguments_outputs_and_temporaries_and_donations_once():
    x = jax.ShapeDtypeStruct((1024,), jnp.float32)
    compiled = jax.jit(lambda a: jnp.cumsum(a * 2.0)).lower(x).compile()
    m = compiled.memory_analysis()
    assert memory_plan.compiled_step_bytes(compiled) == (
        m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
        - m.alias_size_in_bytes) >= 2 * 4096  # a 4 KiB input and a 4 KiB output at least
    # A donated input that the output reuses is counted once, not twice.
    kept, donated = (jax.jit(lambda a: a * 2.0, donate_argnums=d).lower(x).compile()
                     for d in ((), 0))
    assert (memory_plan.compiled_step_bytes(kept)
            - memory_plan.compiled_step_bytes(donated)) == 4096
    assert memory_plan.compiled_step_bytes(object()) is None  # no analysis: nothing known


class FakeDevice:
    def __init__(self, stats):
        self.stats = stats

    def memory_stats(self):
        if isinstance(self.stats, Exception):
            raise self.stats
        return self.stats


def test_limit_is_the_smallest_allocator_limit_and_none_where_unreported():
    gib = 2**30
    devices = [FakeDevice({"bytes_limit": 60 * gib, "bytes_in_use": 0}),
               FakeDevice({"bytes_limit": 59 * gib}), FakeDevice(None)]
    assert memory_plan.device_memory_limit(devices) == 59 * gib
    assert memory_plan.device_memory_limit([FakeDevice(None)]) is None
    assert memory_plan.device_memory_limit([FakeDevice(RuntimeError("unsupported"))]) is None
    assert memory_plan.device_memory_limit([FakeDevice({"bytes_in_use": 1})]) is None
    if jax.default_backend() == "cpu":  # the CPU backend reports no limit
        assert memory_plan.device_memory_limit() is None


def test_shard_bytes_follow_each_leafs_sharding():
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh([jax.devices()[0]] * 2, ("x",))  # abstract: only its shape matters here
    split = jax.ShapeDtypeStruct((8, 6), jnp.float32, sharding=NamedSharding(mesh,
                                                                             PartitionSpec("x")))
    whole = jax.ShapeDtypeStruct((8, 6), jnp.bfloat16, sharding=NamedSharding(mesh,
                                                                              PartitionSpec()))
    assert sharding_lib.shard_bytes({"a": split, "b": whole}) == 4 * 6 * 4 + 8 * 6 * 2
    assert sharding_lib.shard_bytes([jnp.zeros((3, 5), jnp.int32)]) == 60


def test_describe_and_sizes():
    gib = 2**30
    assert memory_plan.size(1310720) == "1.25 MiB"
    assert memory_plan.size(int(44.05 * gib)) == "44.05 GiB"
    assert (memory_plan.describe(int(44.05 * gib), int(59.25 * gib))
            == "XLA plans 44.05 GiB per device for the train step (59.25 GiB allowed: 74%)")
    assert memory_plan.describe(3 * 2**20, None) == "XLA plans 3.00 MiB per device for the train step"


def test_a_step_over_the_limit_is_refused_with_the_remedies_not_yet_used(monkeypatch):
    gib = 2**30
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    memory_plan.check_fits(59 * gib, 59 * gib, smoke())  # at the limit: fits
    memory_plan.check_fits(None, 1, smoke())  # unknown plan or limit: nothing to check
    memory_plan.check_fits(10 * gib, None, smoke())
    with pytest.raises(memory_plan.StepMemoryError) as e:
        memory_plan.check_fits(92 * gib, 59 * gib, smoke(train__grad_accum_steps=2))
    text = str(e.value)
    assert text.startswith("the train step does not fit: XLA plans 92.00 GiB per device, the "
                           "allocator allows 59.00 GiB (by default JAX's allocator takes 75%")
    for remedy in ("train.grad_accum_steps=4 (now 2", "model.remat=full (now none)",
                   "model.loss_chunks=8", "a smaller train.batch_size (now 4)"):
        assert remedy in text
    assert isinstance(e.value, ValueError)  # the CLI's one-line error, without a type name
    # What the config already does is not suggested; a set allocator fraction is named.
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", ".95")
    with pytest.raises(memory_plan.StepMemoryError) as e:
        memory_plan.check_fits(92 * gib, 59 * gib, smoke(model__remat="full",
                                                         model__loss_chunks=4))
    text = str(e.value)
    assert "(XLA_PYTHON_CLIENT_MEM_FRACTION=.95)" in text
    assert "model.remat" not in text and "model.loss_chunks" not in text
    assert "train.grad_accum_steps=2 (now 1" in text
    assert len(text) < 600  # failures.one_line keeps it whole


@pytest.mark.parametrize("start, total, every, used", [
    (0, 6, 3, True), (3, 6, 3, True), (4, 6, 3, False), (5, 6, 3, False), (4, 7, 3, True),
    (0, 6, 7, False), (0, 6, 6, True), (1, 6, 6, False),
])
def test_stats_step_is_compiled_only_where_a_step_logs_statistics(start, total, every, used):
    assert train_lib.stats_step_used(start, total, every) is used
    loop = any(every <= total and s % every == 0 for s in range(start, total))
    assert loop is used  # the loop's own rule


@pytest.mark.parametrize("program", ["train step", "eval step"])
def test_the_trainer_stops_before_placing_any_state_when_a_step_cannot_fit(
        tmp_path, monkeypatch, program):
    """With the allocator's limit made 1 MiB below a program's plan the run stops while
    compiling: nothing is initialised, restored or written (no checkpoint, metrics or
    tokenizer), and the error names the program, its plan and what would shrink it.  The
    eval step (here 66 rows in one piece, not a multiple of the train step's 4) counts the
    optimizer state that stays on the devices beside it."""
    cfg = smoke(train__eval_batch_size=66) if program == "eval step" else smoke()
    run = train_lib.build_run(cfg)
    monkeypatch.setattr(memory_plan, "device_memory_limit", lambda: None)
    steps = train_lib.compile_steps(run, cfg, 0)
    assert steps.limit is None and steps.step_bytes > 0
    resident = (sharding_lib.shard_bytes(run.abstract_state)
                - sharding_lib.shard_bytes(run.abstract_state["params"]))
    assert steps.eval_bytes == memory_plan.compiled_step_bytes(steps.eval) + resident
    params = sharding_lib.shard_bytes(run.abstract_state["params"])
    assert 2 * params < resident <= 2 * params + 64  # AdamW's two moments and a few counters
    plan = steps.step_bytes if program == "train step" else steps.eval_bytes
    if program == "eval step":
        assert steps.eval_bytes > steps.step_bytes + 2**20

    def no_state(*a, **k):
        raise AssertionError("state was placed on the devices before the memory check")

    monkeypatch.setattr(train_lib, "make_init_fn", no_state)
    monkeypatch.setattr(memory_plan, "device_memory_limit", lambda: plan - 2**20)
    with pytest.raises(memory_plan.StepMemoryError,
                       match=rf"the {program} does not fit: XLA plans "
                             rf"{memory_plan.size(plan)} per device") as e:
        train_lib.train_and_evaluate(cfg, str(tmp_path))
    assert ("train.eval_batch_size a multiple of the train step's micro-batch of 4 rows, "
            "evaluated in pieces of it (now 66)" in str(e.value)) is (program == "eval step")
    assert not any(p.is_file() for p in tmp_path.rglob("*")), list(tmp_path.rglob("*"))


def test_the_trainer_records_the_plan_and_compiles_a_needed_stats_step_late(
        tmp_path, monkeypatch, capsys):
    """Under the limit the run trains as before and results.json holds the plan (the larger
    step's) and the limit.  A stats step that was not compiled ahead (a resume from an older
    checkpoint than the one the decision was made on) is compiled when first needed: made to
    look unneeded here, the run still logs every statistics row, with the same losses."""
    limit = 2**40
    monkeypatch.setattr(memory_plan, "device_memory_limit", lambda: limit)
    cfg = smoke()
    results = train_lib.train_and_evaluate(cfg, str(tmp_path / "ahead"))
    out = capsys.readouterr().out
    run = train_lib.build_run(cfg)
    plain, stats = (memory_plan.compiled_step_bytes(train_lib.compile_train_step(run, s, 4))
                    for s in (False, True))
    assert results["step_memory_bytes"] == max(plain, stats)
    assert max(plain, stats) > results["state_bytes"]["max_per_device"]
    assert results["device_memory_limit_bytes"] == limit
    assert ("compiled the train, stats and eval steps in " in out
            and f"XLA plans {memory_plan.size(max(plain, stats))} per device for the train step "
                f"({memory_plan.size(limit)} allowed: 0%)" in out), out

    monkeypatch.setattr(train_lib, "stats_step_used", lambda *a: False)
    late = train_lib.train_and_evaluate(cfg, str(tmp_path / "late"))
    assert "compiled the train and eval steps in " in capsys.readouterr().out
    rows = {name: read_metrics(tmp_path / name / "metrics.jsonl", "stats")
            for name in ("ahead", "late")}
    assert [r["step"] for r in rows["late"]] == [r["step"] for r in rows["ahead"]] == [0, 3]
    assert late["final_train_loss"] == results["final_train_loss"]
    assert json.loads((tmp_path / "late" / "results.json").read_text())["step_memory_bytes"] \
        == plain  # the plan of the steps compiled ahead


@pytest.mark.parametrize("batch, accum, eval_batch, pieces", [
    (64, 1, 64, 1), (64, 8, 64, 8), (64, 8, 16, 2), (64, 8, 8, 1), (64, 8, 4, 1),
    (64, 8, 12, 1), (4, 1, 64, 16), (4, 2, 6, 3),
    (64, 8, 20, 1),  # 20 rows > a micro-batch of 8 but not a multiple: one piece
])
def test_eval_pieces_hold_one_training_micro_batch_each(batch, accum, eval_batch, pieces):
    cfg = smoke(train__batch_size=batch, train__grad_accum_steps=accum,
                train__eval_batch_size=eval_batch)
    assert memory_plan.eval_pieces(cfg) == pieces


def test_eval_in_pieces_is_the_same_loss_for_a_fraction_of_the_memory():
    """64 eval rows where a training micro-batch is 4: 16 pieces, one after another.  The loss
    equals the whole batch's (measured 8.6e-8 relative at these shapes), and XLA's temporaries
    of the eval step fall about 10-fold (6.9 MB → 0.7 MB on jax 0.10.2)."""
    import numpy as np

    losses, temps = {}, {}
    for batch in (64, 4):  # one piece, 16 pieces
        cfg = smoke(train__batch_size=batch, train__eval_batch_size=64, model__width=64,
                    model__num_heads=1)
        run = train_lib.build_run(cfg)
        assert memory_plan.eval_pieces(cfg) == 64 // batch
        step = train_lib.make_eval_step(run)
        spec = {k: v for k, v in train_lib.batch_spec(run, 64).items()
                if k != train_lib.STOP_VOTES}
        temps[batch] = step.lower(run.abstract_state["params"], spec).compile(
        ).memory_analysis().temp_size_in_bytes
        params = train_lib.make_init_fn(run)(jax.random.key(0))["params"]
        rows = np.random.RandomState(0).randint(0, 256, (64, 33)).astype(np.int32)
        losses[batch] = float(step(params, train_lib.to_global(
            run, {"inputs": rows[:, :-1], "targets": rows[:, 1:]})))
    assert losses[4] == pytest.approx(losses[64], rel=1e-6)
    assert temps[4] * 4 < temps[64], temps
