"""One command-line convention for every entry point (umup_jax.cli): ``--config=FILE[:ARG]``,
``--config.a.b=value`` overrides, flag files, and one error format (one line on stderr,
``python -m umup_jax.X: error: …``, exit status 2, before any work).

The parser is tested in-process on a fresh ``FlagValues``; the three entry points (``main``,
``sweep``, ``coord_check``) are run as subprocesses on the same bad command lines, which fail
while parsing (about a second each, all at once)."""

import os
import pathlib
import subprocess
import sys

import pytest
from absl import flags

from umup_jax import cli

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIG = str(ROOT / "configs" / "umup_proxy.py")


@pytest.fixture
def parse(monkeypatch):
    """parse(*args) → the FlagValues after cli.parse_flags([prog, *args]) on fresh flags."""

    def parse(*args):
        fv = flags.FlagValues()
        cli.define_config_flag(fv)
        flags.DEFINE_string("workdir", None, "", flag_values=fv)
        argv = ["prog", *args]
        monkeypatch.setattr(sys, "argv", argv)  # ml_collections finds overrides in sys.argv
        cli.parse_flags(argv, fv)
        return fv

    return parse


def usage_error(parse, *args) -> str:
    with pytest.raises(cli.UsageError) as info:
        parse(*args)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message, message
    return message


def test_config_file_arg_and_overrides(parse):
    fv = parse(f"--config={CONFIG}:smoke,model.width=64", "--config.train.steps=7",
               "--config.model.hparams.attn_mult=2", "--config.optimizer.learning_rate=1",
               "--noconfig.train.progress", "--workdir=w")
    c = fv.config
    assert (c.model.width, c.train.steps, c.model.num_heads) == (64, 7, 1)  # :smoke, ARG, flag
    assert c.model.hparams.attn_mult == 2.0 and isinstance(c.model.hparams.attn_mult, float)
    assert c.optimizer.learning_rate == 1.0 and isinstance(c.optimizer.learning_rate, float)
    assert c.train.progress is False and fv.workdir == "w"


def test_flag_file(parse, tmp_path):
    flagfile = tmp_path / "flags.txt"
    flagfile.write_text(f"--config={CONFIG}:smoke\n--config.train.steps=3\n--workdir=from_file\n")
    fv = parse(f"--flagfile={flagfile}", "--config.model.width=64")
    assert (fv.config.train.steps, fv.config.model.width, fv.workdir) == (3, 64, "from_file")
    flagfile.write_text(f"--config={CONFIG}:smoke\n--config.train.stepz=3\n")
    assert usage_error(parse, f"--flagfile={flagfile}") == (
        "config key 'train.stepz' is unknown (did you mean 'train.steps'?)")


def test_unknown_key_is_one_message_wherever_it_is_given(parse):
    expected = "config key 'train.stepz' is unknown (did you mean 'train.steps'?)"
    assert usage_error(parse, f"--config={CONFIG}:smoke", "--config.train.stepz=3") == expected
    assert usage_error(parse, f"--config={CONFIG}:smoke,train.stepz=3") == expected
    assert usage_error(parse, f"--config={CONFIG}", "--config.model.hparams.atn_mult=2") == (
        "config key 'model.hparams.atn_mult' is unknown: hparams of 'umup' are "
        "['attn_mult', 'ffn_act_mult', 'loss_softmax_mult', 'residual_attn_ratio', "
        "'residual_mult']")
    assert usage_error(parse, f"--config={CONFIG}", "--config.model.width.x=2") == (
        "config key 'model.width.x' is unknown: 'model.width' is a value, not a group of keys")


def test_every_other_bad_command_line_is_one_line(parse, tmp_path):
    assert usage_error(parse, f"--config={tmp_path / 'none.py'}") == (
        f"config file '{tmp_path / 'none.py'}' does not exist")
    assert usage_error(parse, f"--config={CONFIG}:smok") == (
        "config argument 'smok' is invalid: use variants ['1b', 'cpu', 'paper_ffn', 'smoke', 'wikitext103'] or key=value overrides")
    # A value the key's type cannot take, as an override flag or in the config argument.
    assert usage_error(parse, f"--config={CONFIG}", "--config.train.steps=abc") == (
        "config key 'train.steps' expects an integer (it is 8192), got 'abc'")
    assert usage_error(parse, f"--config={CONFIG}:train.steps=1.5") == (
        "config key 'train.steps' expects an integer (it is 8192), got 1.5")
    assert usage_error(parse, f"--config={CONFIG}", "--config.model.scan_layers=yes") == (
        "config key 'model.scan_layers' expects True or False (it is False), got 'yes'")
    assert usage_error(parse, f"--config={CONFIG}:model.scan_layers=yes") == (
        "config key 'model.scan_layers' expects True or False (it is False), got 'yes'")
    assert usage_error(parse, f"--config={CONFIG}", "--config.optimizer.b1=high") == (
        "config key 'optimizer.b1' expects a number (it is 0.9), got 'high'")
    assert usage_error(parse, f"--config={CONFIG}:model.hparams=3").startswith(
        "config key 'model.hparams' is a group of keys (attn_mult, ffn_act_mult, "
        "loss_softmax_mult, residual_attn_ratio, residual_mult): set them one by one, e.g. "
        "model.hparams.attn_mult=…, not model.hparams=3")
    assert usage_error(parse, f"--config={CONFIG}", "--config.model.hparams=3") == (
        "config key 'model.hparams' is a group of keys (attn_mult, ffn_act_mult, "
        "loss_softmax_mult, residual_attn_ratio, residual_mult): set them one by one, e.g. "
        "model.hparams.attn_mult=…, not model.hparams='3'")
    assert usage_error(parse, f"--config={CONFIG}", "--workdr=x") == (
        "Unknown command line flag 'workdr'. Did you mean: workdir ?")
    assert usage_error(parse, f"--config={CONFIG}", "extra").startswith(
        "unexpected positional arguments ['extra']")
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(arg=None):\n    return undefined_name\n")
    assert usage_error(parse, f"--config={broken}") == (
        f"config file '{broken}': NameError: name 'undefined_name' is not defined")


def test_a_missing_required_flag_is_named_with_its_help():
    fv = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.", flag_values=fv)
    flags.mark_flags_as_required(["workdir"], flag_values=fv)
    with pytest.raises(cli.UsageError) as info:
        cli.parse_flags(["prog"], fv)
    assert str(info.value) == "--workdir is required: Run directory: checkpoints, metrics."


def test_a_sweep_file_that_is_not_json_is_named(tmp_path):
    from umup_jax import sweep as sweep_lib

    bad = tmp_path / "lr.json"
    bad.write_text('{"kind": "grid" "grid": {}}')
    with pytest.raises(sweep_lib.SweepError, match=rf"^--sweep={bad}: not valid JSON: "
                                                   r"Expecting ',' delimiter: line 1"):
        sweep_lib.load_sweep(str(bad))
    bad.write_text("[1, 2]")
    with pytest.raises(sweep_lib.SweepError, match="must hold a JSON object, not a list"):
        sweep_lib.load_sweep(str(bad))


def test_usage_errors_turns_value_errors_into_one_line():
    with pytest.raises(cli.UsageError, match="^width=3 is invalid$"):
        with cli.usage_errors():
            raise ValueError("width=3 is invalid\nmore detail")
    with pytest.raises(KeyError):  # anything else is a bug: it keeps its traceback
        with cli.usage_errors():
            raise KeyError("x")


def test_library_imports_define_no_flags():
    """The entry modules define their flags only when run, so they import side by side."""
    import umup_jax.coord_check  # noqa: F401
    import umup_jax.main  # noqa: F401
    import umup_jax.sweep  # noqa: F401

    assert not {"config", "workdir", "sweep", "out", "widths"} & set(flags.FLAGS)


ENTRY_POINTS = {
    "main": ["--workdir=unused"],
    "sweep": ["--sweep=unused.json", "--workdir=unused"],
    "coord_check": ["--out=unused"],
}
BAD = {
    "override": ([f"--config={CONFIG}:smoke", "--config.train.stepz=1"],
                 "config key 'train.stepz' is unknown (did you mean 'train.steps'?)"),
    "arg": ([f"--config={CONFIG}:smoke,train.stepz=1"],
            "config key 'train.stepz' is unknown (did you mean 'train.steps'?)"),
    # A known key with a bad value: the override reached the config, which failed its checks.
    "value": ([f"--config={CONFIG}:smoke", "--config.model.num_heads=3"],
              "width=32 is invalid: it must be divisible by num_heads=3"),
    "flag": ([f"--config={CONFIG}:smoke", "--bogus_flag=1"],
             "Unknown command line flag 'bogus_flag'"),
}


def test_every_entry_point_rejects_bad_input_the_same_way(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = {}
    for name, required in ENTRY_POINTS.items():
        for case, (args, _) in BAD.items():
            cmd = [sys.executable, "-m", f"umup_jax.{name}", *args, *required]
            procs[name, case] = subprocess.Popen(cmd, cwd=tmp_path, env=env, text=True,
                                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for (name, case), proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == cli.USAGE_EXIT, (name, case, stderr[-2000:])
        assert stdout == "", (name, case, stdout)
        assert stderr == f"python -m umup_jax.{name}: error: {BAD[case][1]}\n", (name, case)
    assert not list(tmp_path.iterdir())  # nothing was written


# Configs whose faults show only against this machine's devices, or in the data settings'
# form: main still stops before the workdir exists, like any other bad config.
DEVICE_BAD = {
    "accumulation": ("smoke,train.grad_accum_steps=3",
                     "train.grad_accum_steps=3 does not divide train.batch_size=4; "
                     "use one of [1, 2, 4]"),
    "mesh": ("smoke,mesh.data=2",
             "mesh {'data': 2, 'fsdp': 1, 'tensor': 1} has 2 devices but 1 are available"),
    "cudnn": ("smoke,model.attention_impl=cudnn,model.dtype=bfloat16",
              "model.attention_impl='cudnn' cannot run here: cuDNN attention needs a CUDA GPU"),
    "tokenizer": ("smoke,data.tokenizer=bpe:2048",
                  "data.tokenizer='bpe:2048' is invalid: use 'bytes', 'bpe' (of "
                  "data.vocab_size tokens) or a tokenizer.json"),
}


def test_main_checks_the_config_against_the_devices_before_touching_the_workdir(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = {case: subprocess.Popen(
        [sys.executable, "-m", "umup_jax.main", f"--config={CONFIG}:{arg}",
         f"--workdir={tmp_path / case}"], cwd=tmp_path, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE) for case, (arg, _) in DEVICE_BAD.items()}
    for case, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == cli.USAGE_EXIT, (case, stderr[-2000:])
        assert stdout == "" and stderr.count("\n") == 1, (case, stdout, stderr)
        assert stderr.startswith(f"python -m umup_jax.main: error: {DEVICE_BAD[case][1]}"), (
            case, stderr)
    assert not list(tmp_path.iterdir())  # no workdir, no error.log


TOOLS = {"prepare_data": ["--out=o"], "export": ["--workdir=w", "--out=o"],
         "sample": ["--workdir=w", "--prompt=p"]}


def test_tools_without_a_config_share_the_error_format(tmp_path):
    """prepare_data, export and sample take no --config but report bad flags and bad input
    the same way: one line, ``python -m umup_jax.X: error: …``, exit status 2."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = {}
    for name, required in TOOLS.items():
        for case, args in {"flag": ["--bogus=1"], "positional": ["extra"]}.items():
            cmd = [sys.executable, "-m", f"umup_jax.{name}", *required, *args]
            procs[name, case] = subprocess.Popen(cmd, cwd=tmp_path, env=env, text=True,
                                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    missing = subprocess.Popen([sys.executable, "-m", "umup_jax.export", "--workdir=nowhere",
                                "--out=o"], cwd=tmp_path, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for (name, case), proc in procs.items():
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == cli.USAGE_EXIT, (name, case, stderr[-2000:])
        assert stderr.startswith(f"python -m umup_jax.{name}: error: ") and \
            stderr.count("\n") == 1, (name, case, stderr)
    _, stderr = missing.communicate(timeout=120)
    assert missing.returncode == cli.USAGE_EXIT
    assert stderr == f"python -m umup_jax.export: error: --workdir {tmp_path / 'nowhere'} does not exist\n"
    assert not list(tmp_path.iterdir())
