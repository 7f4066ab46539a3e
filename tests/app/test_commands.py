"""The console scripts without the ``app`` extra: one line, status 2.

Each command is run as its console script runs it (pyproject's
``[project.scripts]`` target, called in a fresh interpreter) with a package
of the extra made unimportable, either by a stand-in whose import fails
(as a broken or half-removed install does) or by ``sys.modules[name] = None``.
"""

from __future__ import annotations

import os
import pathlib
import runpy
import subprocess
import sys
import tomllib

import pytest

from osgd_jax.app import commands

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
  "scripts"
]


def _run_script(target, args, *, block=(), pythonpath=()):
  """Runs ``module:function`` the way a console script does."""
  module, function = target.split(":")
  code = (
    f"import sys\nfor name in {list(block)!r}: sys.modules[name] = None\n"
    f"from {module} import {function}\nsys.exit({function}())"
  )
  env = dict(
    os.environ,
    PYTHONPATH=os.pathsep.join(
      [*map(str, pythonpath), str(ROOT), os.environ.get("PYTHONPATH", "")]
    ),
  )
  return subprocess.run(
    [sys.executable, "-c", code, *args],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )


def _assert_one_line(result, *fragments):
  assert result.returncode == 2, (result.returncode, result.stderr)
  assert "Traceback" not in result.stderr
  assert result.stdout == ""
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  for fragment in fragments:
    assert fragment in lines[0], lines[0]


@pytest.fixture
def broken_sklearn(tmp_path):
  """A directory holding an ``sklearn`` package whose import fails."""
  package = tmp_path / "sklearn"
  package.mkdir()
  (package / "__init__.py").write_text(
    "raise ImportError('scikit-learn stand-in for the tests')\n"
  )
  return tmp_path


def test_the_scripts_point_into_the_application():
  assert SCRIPTS == {
    "osgd-train": "osgd_jax.app.commands:osgd_train",
    "osgd-compare": "osgd_jax.app.commands:osgd_compare",
  }
  # Each runs its command, which lives beside what it drives.
  assert commands.COMMANDS == {
    "osgd-train": "osgd_jax.app.train.cli:main",
    "osgd-compare": "osgd_jax.app.compare.cli:main",
  }


def test_a_missing_package_of_the_extra_is_one_line(broken_sklearn):
  result = _run_script(
    SCRIPTS["osgd-train"], ["--help"], pythonpath=[broken_sklearn]
  )
  _assert_one_line(
    result,
    "osgd-train: error:",
    "app extra",
    "scikit-learn",
    '-m pip install "osgd-jax[app]"',
  )
  # The command names this interpreter's pip, so it installs where it runs.
  assert sys.executable in result.stderr


def test_every_missing_package_is_named():
  # mnist1d imports matplotlib, so it cannot be imported either; it is
  # installed, though, and not named.
  result = _run_script(
    SCRIPTS["osgd-compare"],
    [],
    block=["orbax.checkpoint", "matplotlib", "tqdm"],
  )
  _assert_one_line(
    result,
    "osgd-compare: error:",
    "lacks orbax-checkpoint, matplotlib, tqdm;",
    'pip install "osgd-jax[app]"',
  )


def test_a_missing_mnist1d_is_named(monkeypatch):
  monkeypatch.setitem(sys.modules, "mnist1d", None)
  assert commands.missing_requirements() == ["mnist1d"]


def test_python_dash_m_runs_osgd_train(monkeypatch):
  # `python -m osgd_jax.app ARGS` is osgd_train, the app extra check first.
  calls = []
  monkeypatch.setattr(commands, "osgd_train", lambda: calls.append(1) or 7)
  # As under -m, where nothing imported the module before it runs.
  monkeypatch.delitem(sys.modules, "osgd_jax.app.__main__", raising=False)
  with pytest.raises(SystemExit) as exit_:
    runpy.run_module("osgd_jax.app", run_name="__main__")
  assert exit_.value.code == 7 and calls == [1]


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_with_the_extra_the_commands_run(script, capsys):
  assert commands.missing_requirements() == []
  module, function = SCRIPTS[script].split(":")
  assert module == commands.__name__
  with pytest.raises(SystemExit) as exit_:
    getattr(commands, function)(["--help"])
  assert exit_.value.code == 0
  assert capsys.readouterr().out.startswith(f"usage: {script}")


def test_the_checked_packages_are_the_app_extra():
  extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
    "optional-dependencies"
  ]["app"]
  names = [requirement.split(">")[0].split("=")[0] for requirement in extra]
  assert sorted(commands.APP_REQUIREMENTS.values()) == sorted(names)


@pytest.mark.parametrize(
  "script, module",
  [(commands.osgd_train, "train.cli"), (commands.osgd_compare, "compare.cli")],
)
def test_ctrl_c_outside_the_training_loop_is_one_line(
  script, module, capsys, monkeypatch
):
  # E.g. while JAX is still being imported: the command's own handler is
  # not in place yet.
  def interrupted(argv):
    raise KeyboardInterrupt

  monkeypatch.setattr(f"osgd_jax.app.{module}.main", interrupted)
  assert script([]) == 130
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [
    f"{script.__name__.replace('_', '-')}: error: interrupted"
    " before any work was saved."
  ]
