"""The console scripts ``osgd-train`` and ``osgd-compare``.

Each checks first that the ``app`` extra is installed, so that a user who
installed only the library gets one line naming what is missing and the
command that installs it, instead of a traceback (or, for a package that is
imported late, a failure at the end of a run). The commands themselves are
imported only after that check.
"""

from __future__ import annotations

import importlib
import shlex
import sys
from typing import Callable, Sequence

from osgd_jax.app.command_line import (EXIT_BAD_INPUT, EXIT_INTERRUPTED,
                                       print_error)

__all__ = ["APP_REQUIREMENTS", "install_command", "missing_requirements",
           "osgd_compare", "osgd_train"]

#: The app extra of pyproject.toml, as a mapping from the module the
#: application imports to the name of the distribution that provides it.
APP_REQUIREMENTS = {
    "orbax.checkpoint": "orbax-checkpoint",
    "sklearn": "scikit-learn",
    "scipy": "scipy",
    "matplotlib": "matplotlib",
    "tqdm": "tqdm",
    "yaml": "pyyaml",
    "mnist1d": "mnist1d",
}


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
  top = lambda name: name.split(".")[0]
  return [APP_REQUIREMENTS[module] for module, culprit in failed.items()
          if not any(top(culprit) == top(other)
                     for other in failed if other != module)]


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
    print_error(prog, f"{prog} needs the app extra, which lacks"
                f" {', '.join(missing)}; install it with: {install_command()}")
  return bool(missing)


def _run(prog: str, command: Callable[[], Callable[..., int]],
         argv: Sequence[str] | None) -> int:
  """Runs ``command()(argv)`` once the app extra is known to be complete.

  ``command`` imports the command's module: JAX's import takes seconds, and
  a Ctrl-C in them (or anywhere the command does not handle one) is one line
  too.
  """
  if _report_missing(prog):
    return EXIT_BAD_INPUT
  try:
    return command()(argv)
  except KeyboardInterrupt:
    print_error(prog, "interrupted before any work was saved.")
    return EXIT_INTERRUPTED


def _train_main() -> Callable[..., int]:
  from osgd_jax.app.train import cli  # pylint: disable=g-import-not-at-top
  return cli.main


def _compare_main() -> Callable[..., int]:
  from osgd_jax.app import compare  # pylint: disable=g-import-not-at-top
  return compare.main


def osgd_train(argv: Sequence[str] | None = None) -> int:
  """``osgd-train``: see :func:`osgd_jax.app.train.cli.main`.

  Args:
    argv: the command's arguments; ``None`` reads ``sys.argv``.

  Returns:
    The process exit status.
  """
  return _run("osgd-train", _train_main, argv)


def osgd_compare(argv: Sequence[str] | None = None) -> int:
  """``osgd-compare``: see :func:`osgd_jax.app.compare.main`.

  Args:
    argv: the command's arguments; ``None`` reads ``sys.argv``.

  Returns:
    The process exit status.
  """
  return _run("osgd-compare", _compare_main, argv)
