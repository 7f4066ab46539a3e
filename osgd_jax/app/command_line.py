"""What the commands share: exit statuses, one-line errors, quiet logs.

Bad input ends a command with one line on stderr saying what is wrong and
what to do, and exit status :data:`EXIT_BAD_INPUT`; a run that failed (a
diverged loss, a full disk) exits with :data:`EXIT_FAILED`, and one stopped
by Ctrl-C with :data:`EXIT_INTERRUPTED`. This module needs only the
standard library, so that it can report a missing ``app`` extra.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import NoReturn

__all__ = ["EXIT_BAD_INPUT", "EXIT_FAILED", "EXIT_INTERRUPTED",
           "OneLineArgumentParser", "print_error", "quiet_library_logs"]

#: Exit status of a command given bad input (a flag, a config file, missing
#: data, an unwritable output directory, a damaged checkpoint).
EXIT_BAD_INPUT = 2
#: Exit status of a run that failed (a diverged loss, a failed write).
EXIT_FAILED = 1
#: Exit status after Ctrl-C (128 + SIGINT, as shells report it).
EXIT_INTERRUPTED = 130


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
    self.exit(EXIT_BAD_INPUT,
              f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def print_error(prog: str, message: object) -> None:
  """Prints ``<prog>: error: <message>`` to stderr, the commands' error line.

  Example:
    >>> import contextlib, io
    >>> stderr = io.StringIO()
    >>> with contextlib.redirect_stderr(stderr):
    ...   print_error("osgd-demo", "--lr must be > 0.")
    >>> stderr.getvalue().splitlines()
    ['osgd-demo: error: --lr must be > 0.']
  """
  print(f"{prog}: error: {message}", file=sys.stderr)


def _is_closed_loop_report(unraisable: "sys.UnraisableHookArgs") -> bool:
  error = unraisable.exc_value
  return (isinstance(error, RuntimeError)
          and str(error) == "Event loop is closed")


def _drop_closed_loop_reports(unraisable: "sys.UnraisableHookArgs") -> None:
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
