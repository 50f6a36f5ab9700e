"""Train one model: ``python -m umup_jax.main --config=configs/umup_proxy.py[:ARG] --workdir=DIR``.

Flags in, ``train_and_evaluate(config, workdir)`` out.  Override any config field with
``--config.model.width=512``-style flags; the conventions (flag files, ``--helpfull``, one-line
errors) are those of :mod:`umup_jax.cli`.
"""

from absl import flags

from umup_jax import cli
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
    train_lib.train_and_evaluate(config, FLAGS.workdir)


if __name__ == "__main__":
    define_flags()
    cli.run(main, FLAGS)
