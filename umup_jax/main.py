"""Entry point: ``python -m umup_jax.main --config=configs/umup_proxy.py[:ARG] --workdir=DIR``.

Flags in, ``train_and_evaluate(config, workdir)`` out; nothing else reads absl flags.
Override any config field with ``--config.model.width=512``-style flags.

A failure ends with one ``error: …`` line and exit status 1; the traceback goes to
``WORKDIR/error.log`` and library logging (orbax, jax) to ``WORKDIR/run.log``
(:mod:`umup_jax.failures`).
"""

from absl import app, flags, logging
from ml_collections import config_flags

from umup_jax import failures
from umup_jax.train import train_and_evaluate

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (get_config(arg) style).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, results.json.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    failures.log_to_workdir(FLAGS.workdir, logging.get_absl_logger().getEffectiveLevel())
    with failures.exit_on_failure(FLAGS.workdir):
        train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
