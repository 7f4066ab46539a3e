"""The commands' console scripts, exit statuses and one-line errors.

The console scripts ``osgd-train`` and ``osgd-compare`` (:func:`osgd_train`,
:func:`osgd_compare`) check first that the ``app`` extra is installed, so
that a user who installed only the library gets one line naming what is
missing and the command that installs it, instead of a traceback (or, for a
package that is imported late, a failure at the end of a run). Only then do
they import the command itself (:data:`COMMANDS`).

Bad input ends a command with one line on stderr saying what is wrong and
what to do, and exit status :data:`EXIT_BAD_INPUT`; a run that failed (a
diverged loss, a full disk) exits with :data:`EXIT_FAILED`, and one stopped
by Ctrl-C with :data:`EXIT_INTERRUPTED`. This module needs only the
standard library, so that it can report a missing ``app`` extra.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import shlex
import sys
from collections.abc import Sequence
from typing import NoReturn

__all__ = [
  "APP_REQUIREMENTS",
  "COMMANDS",
  "EXIT_BAD_INPUT",
  "EXIT_FAILED",
  "EXIT_INTERRUPTED",
  "OneLineArgumentParser",
  "install_command",
  "missing_requirements",
  "osgd_compare",
  "osgd_train",
  "print_error",
  "quiet_library_logs",
  "stdout_closed",
]

#: Exit status of a command given bad input (a flag, a config file, missing
#: data, an unwritable output directory, a damaged checkpoint).
EXIT_BAD_INPUT = 2
#: Exit status of a run that failed (a diverged loss, a failed write).
EXIT_FAILED = 1
#: Exit status after Ctrl-C (128 + SIGINT, as shells report it).
EXIT_INTERRUPTED = 130

#: The app extra of pyproject.toml, as a mapping from the module the
#: application imports to the name of the distribution that provides it.
APP_REQUIREMENTS = {
  "orbax.checkpoint": "orbax-checkpoint",
  "sklearn": "scikit-learn",
  "scipy": "scipy",
  "matplotlib": "matplotlib",
  "tqdm": "tqdm",
  "yaml": "pyyaml",
  "pooch": "pooch",
  "mnist1d": "mnist1d",
}

#: Each command, as ``module:function``: the ``main`` its console script
#: runs. They are named, not imported, as ``[project.scripts]`` names the
#: console scripts: each command imports this module for what the commands
#: share, and is imported only once the app extra is known to be complete.
COMMANDS = {
  "osgd-train": "osgd_jax.app.train.cli:main",
  "osgd-compare": "osgd_jax.app.compare.cli:main",
}


class OneLineArgumentParser(argparse.ArgumentParser):
  """An ArgumentParser whose errors are one line, not usage plus error.

  Example:
    >>> parser = OneLineArgumentParser(prog="osgd-demo")
    >>> _ = parser.add_argument("--epochs", type=int)
    >>> parser.parse_args(["--epochs", "3"]).epochs
    3
  """

  def error(self, message: str) -> NoReturn:
    """Exits with ``EXIT_BAD_INPUT`` and one line: the error and ``--help``."""
    self.exit(
      EXIT_BAD_INPUT,
      f"{self.prog}: error: {message} (see {self.prog} --help)\n",
    )


def print_error(prog: str, message: object) -> None:
  """Prints ``<prog>: error: <message>`` to stderr, the commands' error line.

  Args:
    prog: the command's name.
    message: what went wrong and what to do about it.

  Example:
    >>> import contextlib, io
    >>> stderr = io.StringIO()
    >>> with contextlib.redirect_stderr(stderr):
    ...   print_error("osgd-demo", "--lr must be > 0.")
    >>> stderr.getvalue().splitlines()
    ['osgd-demo: error: --lr must be > 0.']
  """
  print(f"{prog}: error: {message}", file=sys.stderr)


def stdout_closed(prog: str, message: object) -> int:
  """Reports that the reader of stdout went away (``osgd-train | head``).

  A ``BrokenPipeError`` from a ``print`` is not a fault of the file system:
  the command says so in one line. The process's own stdout (not one a
  caller put in its place) is pointed at ``os.devnull``, so that the
  interpreter's last flush at exit does not fail again (Python's "Note on
  SIGPIPE", in the ``signal`` module's documentation).

  Args:
    prog: the command's name.
    message: what was kept and how to go on.

  Returns:
    :data:`EXIT_FAILED`.

  Example:
    >>> import contextlib, io
    >>> stderr = io.StringIO()
    >>> with contextlib.redirect_stderr(stderr):
    ...   status = stdout_closed("osgd-demo", "nothing was lost.")
    >>> status
    1
    >>> print(stderr.getvalue(), end="")
    osgd-demo: error: stdout was closed before the end; nothing was lost.
  """
  if sys.stdout is sys.__stdout__:
    with contextlib.suppress(OSError, ValueError):
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
  print_error(prog, f"stdout was closed before the end; {message}")
  return EXIT_FAILED


def _is_closed_loop_report(unraisable: sys.UnraisableHookArgs) -> bool:
  error = unraisable.exc_value
  return (
    isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
  )


def _drop_closed_loop_reports(unraisable: sys.UnraisableHookArgs) -> None:
  if not _is_closed_loop_report(unraisable):
    sys.__unraisablehook__(unraisable)


def quiet_library_logs() -> None:
  """Silences library noise for the command-line tools.

  Orbax logs its own errors and save-timing warnings through absl before
  raising, and asyncio logs the failed write tasks behind them; a command
  reports each failure once, as one line. When a
  checkpoint read fails, TensorStore's other reads still complete later and
  report to an event loop Orbax has already closed: Python prints each of
  those as an "Event loop is closed" traceback that says nothing about the
  fault. Only that report is dropped; every other unraisable error is
  printed as before.
  """
  logging.getLogger("absl").setLevel(logging.CRITICAL)
  # Orbax's failed background writes end as asyncio tasks whose exception
  # asyncio logs again ("Task exception was never retrieved").
  logging.getLogger("asyncio").setLevel(logging.CRITICAL)
  sys.unraisablehook = _drop_closed_loop_reports


def missing_requirements() -> list[str]:
  """The distributions of the ``app`` extra that cannot be imported.

  A distribution whose import fails only because another one of the extra
  cannot be imported (mnist1d imports matplotlib) is not named: it is not
  missing, and installing the extra mends both.

  Returns:
    Their names (as ``pip`` knows them), in :data:`APP_REQUIREMENTS` order;
    empty when the extra is complete.

  Example:
    >>> missing_requirements()
    []
  """
  failed = {}  # module -> the module whose import failed
  for module in APP_REQUIREMENTS:
    try:
      importlib.import_module(module)
    except ImportError as e:
      failed[module] = e.name or module

  def top(name):
    return name.split(".")[0]

  return [
    APP_REQUIREMENTS[module]
    for module, culprit in failed.items()
    if not any(
      top(culprit) == top(other) for other in failed if other != module
    )
  ]


def install_command() -> str:
  """The command that installs the ``app`` extra into this interpreter.

  Returns:
    ``<this python> -m pip install "osgd-jax[app]"``: pip keeps the installed
    osgd-jax (an editable one too) and adds what the extra lacks.

  Example:
    >>> install_command().endswith(' -m pip install "osgd-jax[app]"')
    True
  """
  return f'{shlex.quote(sys.executable)} -m pip install "osgd-jax[app]"'


def _report_missing(prog: str) -> bool:
  """Prints the error line and returns True when the app extra is incomplete."""
  missing = missing_requirements()
  if missing:
    print_error(
      prog,
      f"{prog} needs the app extra, which lacks"
      f" {', '.join(missing)}; install it with: {install_command()}",
    )
  return bool(missing)


def _run(prog: str, argv: Sequence[str] | None) -> int:
  """Runs the command ``prog`` once the app extra is known to be complete.

  Its module is imported here: JAX's import takes seconds, and a Ctrl-C in
  them (or anywhere the command does not handle one) is one line too.
  """
  if _report_missing(prog):
    return EXIT_BAD_INPUT
  module, function = COMMANDS[prog].split(":")
  try:
    return getattr(importlib.import_module(module), function)(argv)
  except KeyboardInterrupt:
    print_error(prog, "interrupted before any work was saved.")
    return EXIT_INTERRUPTED


def osgd_train(argv: Sequence[str] | None = None) -> int:
  """``osgd-train``: see :func:`osgd_jax.app.train.cli.main`.

  Args:
    argv: the command's arguments; ``None`` reads ``sys.argv``.

  Returns:
    The process exit status.
  """
  return _run("osgd-train", argv)


def osgd_compare(argv: Sequence[str] | None = None) -> int:
  """``osgd-compare``: see :func:`osgd_jax.app.compare.cli.main`.

  Args:
    argv: the command's arguments; ``None`` reads ``sys.argv``.

  Returns:
    The process exit status.
  """
  return _run("osgd-compare", argv)
