"""What the commands share: exit statuses, one-line errors, quiet logs.

Bad input ends a command with one line on stderr saying what is wrong and
what to do, and exit status :data:`EXIT_BAD_INPUT`; a run that failed (a
diverged loss) exits with :data:`EXIT_FAILED`. This module needs only the
standard library, so that it can report a missing ``app`` extra.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import NoReturn

__all__ = ["EXIT_BAD_INPUT", "EXIT_FAILED", "OneLineArgumentParser",
           "print_error", "quiet_library_logs"]

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


class OneLineArgumentParser(argparse.ArgumentParser):
  """An ArgumentParser whose errors are one line, not usage plus error.

  Example:
    >>> parser = OneLineArgumentParser(prog="osgd-demo")
    >>> _ = parser.add_argument("--epochs", type=int)
    >>> parser.parse_args(["--epochs", "3"]).epochs
    3
  """

  def error(self, message: str) -> NoReturn:
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


def quiet_library_logs() -> None:
  """Silences absl logging for the command-line tools.

  Orbax logs its own errors and save-timing warnings through absl before
  raising; a command reports each failure once, as one line.
  """
  logging.getLogger("absl").setLevel(logging.CRITICAL)
