"""Train one model: ``python -m umup_jax.main --config=configs/umup_proxy.py[:ARG] --workdir=DIR``.

Flags in, ``train_and_evaluate(config, workdir)`` out.  Override any config field with
``--config.model.width=512``-style flags; the conventions (flag files, ``--helpfull``, one-line
usage errors, exit status 2) are those of :mod:`umup_jax.cli`.

A failure while running ends with one ``python -m umup_jax.main: error: …`` line and exit
status 1; the traceback goes to ``WORKDIR/error.log`` and library logging (orbax, jax) to
``WORKDIR/run.log`` (:mod:`umup_jax.failures`).  A run stopped by SIGTERM or SIGINT
checkpoints, writes ``results.json`` with ``interrupted: true`` and exits with status
128 + the signal's number (143, 130), so that a job scheduler restarts it; rerun with the same
flags to resume.
"""

import sys

import jax
from absl import app, flags, logging

from umup_jax import cli
from umup_jax import failures
from umup_jax import sharding as sharding_lib
from umup_jax import train as train_lib

FLAGS = flags.FLAGS


def define_flags() -> None:
    cli.define_config_flag(FLAGS)
    flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, results.json.")
    flags.mark_flags_as_required(["config", "workdir"])


def main() -> None:
    config = FLAGS.config
    with cli.usage_errors():
        train_lib.check_config(config)
        # One process: the device checks too (mesh, batch split, micro-batches, attention
        # kernel), before the workdir is touched.  Several: JAX's devices exist only once
        # jax.distributed is up, inside train_and_evaluate, which checks them there.
        if not sharding_lib.distributed_requested(dict(config.distributed)):
            try:
                devices = jax.devices()
            except Exception:  # noqa: BLE001 - no backend (JAX_PLATFORMS=cuda without a
                devices = None  # GPU): the run reports it in its error line, as before
            if devices is not None:
                train_lib.check_devices(config, devices)
    failures.log_to_workdir(FLAGS.workdir, logging.get_absl_logger().getEffectiveLevel())
    with failures.exit_on_failure(FLAGS.workdir):
        results = train_lib.train_and_evaluate(config, FLAGS.workdir)
    if results.get("interrupted"):
        # Stopped by SIGTERM/SIGINT after checkpointing: not a finished run, so the shell's
        # 128 + signal number (143 for SIGTERM), which schedulers read as "restart me".
        sys.exit(128 + int(results["signal"]))


if __name__ == "__main__":
    define_flags()
    entry, parse = cli.app_main(main, FLAGS)
    app.run(entry, flags_parser=parse)
