"""examples/quickstart.py runs on the library alone and learns every exit."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The application cannot be imported: the example must not need it.
_WITHOUT_APP = (
  "import runpy, sys; sys.modules['osgd_jax.app'] = None;"
  " sys.argv = sys.argv[1:];"
  " runpy.run_path(sys.argv[0], run_name='__main__')"
)


def test_quickstart_trains_every_exit_without_the_app():
  env = dict(
    os.environ,
    PYTHONPATH=os.pathsep.join(
      p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p
    ),
  )
  result = subprocess.run(
    [
      sys.executable,
      "-c",
      _WITHOUT_APP,
      str(ROOT / "examples" / "quickstart.py"),
      "--steps",
      "200",
    ],
    capture_output=True,
    text=True,
    env=env,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.splitlines()
  losses = [
    [float(v) for v in line.split()[1:]]
    for line in lines
    if re.match(r"\s*\d+\s+\d", line)
  ]
  assert len(losses) == 3  # steps 1, 100 and 200
  assert all(
    last < 0.5 * first
    for first, last in zip(losses[0], losses[-1], strict=True)
  )
  accuracy = re.search(r"test accuracy per exit: (.*)", result.stdout).group(1)
  # Chance is 0.1.
  assert all(float(a) > 0.5 for a in accuracy.split(", ")), accuracy


def _floats(pattern: str, text: str) -> list[float]:
  found = re.search(pattern, text)
  assert found, text
  return [float(v) for v in found.group(1).split(", ")]


def test_nnx_zoo_trains_batchnorm_and_evaluates_deterministically():
  """examples/nnx_zoo.py: the model form of value_and_per_exit_grads.

  A zoo model with BatchNorm, nnx.Optimizer and osgd_sgd inside nnx.jit:
  every exit's loss falls, the BatchNorm running statistics move (they
  stayed frozen before issue 29), and eval mode is deterministic and
  independent of the batch, so it reads the running averages.
  """
  env = dict(
    os.environ,
    PYTHONPATH=os.pathsep.join(
      p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p
    ),
  )
  result = subprocess.run(
    [
      sys.executable,
      "-c",
      _WITHOUT_APP,
      str(ROOT / "examples" / "nnx_zoo.py"),
      "--steps",
      "60",
      "--stages",
      "3",
    ],
    capture_output=True,
    text=True,
    env=env,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert out.startswith("nested-depth-mlp: 3 exits"), out
  first = _floats(r"mean loss per exit, first steps: (.*)", out)
  last = _floats(r"mean loss per exit, last steps: (.*)", out)
  assert len(first) == 3
  assert all(b < 0.5 * a for a, b in zip(first, last, strict=True)), out
  (moved,) = _floats(
    r"largest change of a BatchNorm running statistic: (.*)", out
  )
  assert moved > 0.01, out
  assert "eval mode deterministic: True" in out
  assert "eval mode independent of the batch: True" in out
  # Chance is 0.1.
  accuracy = _floats(r"test accuracy per exit: (.*)", out)
  assert len(accuracy) == 3 and min(accuracy) > 0.7, out
