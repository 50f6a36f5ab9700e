"""The command-line conventions every entry point shares (``main``, ``sweep``, ``coord_check``,
and any new one): absl flags with an ml_collections config file.

* ``--config=FILE[:ARG]``: a Python file whose ``get_config(ARG)`` returns the run's
  ``ConfigDict`` (``configs/*.py``: ARG is comma-separated variants and ``key=value``
  overrides, :func:`umup_jax.config.apply_arg`);
* ``--config.a.b=value``: override one field (after ``--config``; typed by the field);
* ``--flagfile=FILE`` (flags one per line), ``--help`` (this command's flags), ``--helpfull``
  (every flag);
* one error format: an unknown flag, an unknown config key (in ARG or in an override), a
  value of the wrong type, a missing config file, a positional argument, or a config that
  fails its checks (:func:`usage_errors`) ends the command before any work with **one line**
  on stderr, ``python -m umup_jax.X: error: MESSAGE``, and exit status :data:`USAGE_EXIT`.

An entry point is a module that defines its flags only when it runs (it may also be imported
as a library), reads them in its own ``main()`` and hands the values on::

    FLAGS = flags.FLAGS

    def define_flags() -> None:
        cli.define_config_flag(FLAGS)
        flags.DEFINE_string("workdir", None, "Run directory.")
        flags.mark_flags_as_required(["config", "workdir"])

    def main() -> None:
        with cli.usage_errors():
            train.check_config(FLAGS.config)
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir)

    if __name__ == "__main__":
        define_flags()
        entry, parse = cli.app_main(main, FLAGS)
        app.run(entry, flags_parser=parse)

This module never reads ``flags.FLAGS`` itself: the flag values are passed in.
"""

from __future__ import annotations

import contextlib
import re
import sys
from typing import Callable, Iterator, Optional

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from umup_jax import config as config_lib

# Flags defined through this module's helpers belong to the entry point that calls them (so
# ``--help`` lists them with that command's own flags).
flags.disclaim_key_flags()

USAGE_EXIT = 2  # exit status of a bad command line (as argparse and most Unix tools)

CONFIG_HELP = ("config file, FILE[:ARG]: FILE's get_config(ARG); for configs/*.py ARG is "
               "comma-separated variants (" + ", ".join(config_lib.VARIANTS) + ") and "
               "key=value overrides. Override one field with --config.a.b=value after it.")


class UsageError(Exception):
    """A bad command line or config: reported as one line, exit status :data:`USAGE_EXIT`."""


def define_config_flag(flag_values: flags.FlagValues, name: str = "config",
                       help_string: str = CONFIG_HELP) -> flags.FlagHolder:
    """Defines ``--NAME=FILE[:ARG]`` with ``--NAME.a.b=value`` overrides on ``flag_values``
    (the loaded config is locked: an override cannot add a key)."""
    return config_flags.DEFINE_config_file(name, None, help_string, flag_values=flag_values,
                                           lock_config=True)


@contextlib.contextmanager
def usage_errors() -> Iterator[None]:
    """Turns a ``ValueError`` raised inside (a config or argument check) into a
    :class:`UsageError`, so that it is reported like a bad flag."""
    try:
        yield
    except ValueError as e:
        raise UsageError(_one_line(e)) from None


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _config_args(args: list[str], name: str
                 ) -> tuple[Optional[str], list[tuple[str, Optional[str]]]]:
    """The last ``--NAME`` value and the (key, value or ``None``) of every ``--NAME.a.b``
    override in ``args``."""
    spec, overrides = None, []
    for i, arg in enumerate(args):
        if match := re.fullmatch(rf"--?{re.escape(name)}(?:=(.*))?", arg):
            if match.group(1) is not None:
                spec = match.group(1)
            elif i + 1 < len(args):
                spec = args[i + 1]
        elif match := re.match(rf"--?(?:no)?{re.escape(name)}\.([^=]+)(?:=(.*))?", arg):
            overrides.append((match.group(1), match.group(2)))
    return spec, overrides


# What absl's boolean flags accept (case-insensitive).
_BOOLEAN_WORDS = {"true", "false", "t", "f", "1", "0"}


def _value_problem(config: ml_collections.ConfigDict, key: str, text: str) -> Optional[str]:
    """Why ``--config.KEY=TEXT`` cannot set ``KEY`` (a value its type cannot take), or
    ``None``."""
    node = config
    for part in key.split("."):
        node = node[part]
    if isinstance(node, ml_collections.ConfigDict):  # ``--config.model.hparams=3``
        return str(config_lib.wrong_type(key, node, text))
    ok = {bool: lambda t: t.lower() in _BOOLEAN_WORDS, int: lambda t: _parses(int, t),
          float: lambda t: _parses(float, t)}
    for kind, accepts in ok.items():
        if isinstance(node, kind):
            return None if accepts(text) else str(config_lib.wrong_type(key, node, text))
    return None


def _parses(kind: type, text: str) -> bool:
    try:
        kind(text)
        return True
    except ValueError:
        return False


def _config_problem(argv: list[str], flag_values: flags.FlagValues, name: str) -> Optional[str]:
    """What is wrong with ``--NAME`` and its overrides, in one line (or ``None``): loads the
    config file the way ml_collections does and checks every override key against it."""
    try:
        args = flag_values.read_flags_from_files(argv[1:], force_gnu=False)
    except flags.Error:
        return None
    spec, overrides = _config_args(args, name)
    if spec is None:
        return None
    try:
        config = config_lib.load_config_file(spec)
        for key, _ in overrides:
            config_lib.check_key(config, key)
        for key, text in overrides:
            if text is not None and (problem := _value_problem(config, key, text)):
                return problem
    except ValueError as e:
        return _one_line(e)
    except Exception as e:  # a config file that does not run: its error, in one line
        return f"config file {spec.partition(':')[0]!r}: {type(e).__name__}: {_one_line(e)}"
    return None


def _missing_flag(error: flags.Error, flag_values: flags.FlagValues) -> Optional[str]:
    """absl's ``flag --workdir=None: Flag --workdir must have a value other than None.`` as
    ``--workdir is required: <its help>``; ``None`` for any other error."""
    match = re.fullmatch(r"flag --(\w+)=None: Flag --\1 must have a value other than None\.?",
                         _one_line(error))
    if match is None:
        return None
    name = match.group(1)
    help_text = flag_values[name].help if name in flag_values else ""
    return f"--{name} is required" + (f": {help_text}" if help_text else "")


def parse_flags(argv: list[str], flag_values: flags.FlagValues,
                config_flag: str = "config") -> list[str]:
    """Parses ``argv`` into ``flag_values``; any problem raises :class:`UsageError` with one
    line naming the flag or config key.  Positional arguments are refused."""
    try:
        rest = flag_values(argv)
    except flags.Error as e:
        raise UsageError(_config_problem(argv, flag_values, config_flag)
                         or _missing_flag(e, flag_values) or _one_line(e)) from None
    except Exception as e:  # ml_collections: an override of a key the config lacks
        problem = _config_problem(argv, flag_values, config_flag)
        raise UsageError(problem or f"{type(e).__name__}: {_one_line(e)}") from None
    if config_flag in flag_values:
        value = flag_values[config_flag].value
        # ml_collections defers a config file that failed to load until first use.
        if value is not None and not isinstance(value, ml_collections.ConfigDict):
            raise UsageError(_config_problem(argv, flag_values, config_flag)
                             or f"--{config_flag}: the config file did not load")
    if len(rest) > 1:
        raise UsageError(f"unexpected positional arguments {rest[1:]}: every input is a flag "
                         "(--help lists them)")
    return rest


def program_name(argv0: str = "") -> str:
    """``python -m umup_jax.sweep`` for a module run with ``-m``, else the script's name."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        return f"python -m {spec.name.removesuffix('.__main__')}"
    return argv0 or (sys.argv[0] if sys.argv else "umup_jax")


def _fail(message: str) -> None:
    sys.stderr.write(f"{program_name()}: error: {message}\n")
    sys.stderr.flush()
    sys.exit(USAGE_EXIT)


def app_main(main: Callable[[], object], flag_values: flags.FlagValues,
             config_flag: str = "config") -> tuple[Callable[[list[str]], object],
                                                   Callable[[list[str]], list[str]]]:
    """``(entry, flags_parser)`` for ``absl.app.run(entry, flags_parser=flags_parser)``, which
    the entry-point module calls itself (it is the module that reads its flags).  ``entry``
    runs ``main()`` (no arguments: it reads its flags) with this project's conventions:
    one-line usage errors (:class:`UsageError` from parsing or from ``main``), and absl
    logging at WARNING unless ``--verbosity`` is given (orbax logs every file it writes at
    INFO)."""

    def parse(argv: list[str]) -> list[str]:
        try:
            return parse_flags(argv, flag_values, config_flag)
        except UsageError as e:
            _fail(str(e))

    def entry(argv: list[str]) -> object:
        del argv  # parse() refused positional arguments
        if not flag_values["verbosity"].present:
            logging.set_verbosity(logging.WARNING)
        try:
            return main()
        except UsageError as e:
            _fail(str(e))

    return entry, parse
