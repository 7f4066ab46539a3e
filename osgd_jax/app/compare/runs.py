"""One run of a comparison: trained once, its outcome kept beside it.

Each run records its outcome in ``result.json`` in its own directory, so a
comparison can be run again: finished runs are read instead of trained,
interrupted ones resumed from their checkpoints, and a run whose loss
diverged is recorded as diverged instead of ending the comparison.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

from osgd_jax.app.report import write_json
from osgd_jax.app.train import (
  TrainConfig,
  TrainingDiverged,
  config_differences,
  describe_differences,
  train,
)

__all__ = ["RESULT_FILE", "read_record", "run_once"]

#: A finished (or diverged) run's outcome, in the run's own directory.
RESULT_FILE = "result.json"


def read_record(
  path: str, config: TrainConfig, required: tuple[str, ...] = ()
) -> dict[str, Any] | None:
  """A JSON record of a comparison that names the run settings it is of.

  Args:
    path: the record: a JSON object whose ``config`` holds
      ``TrainConfig.to_json()`` of the run it records.
    config: the settings the comparison expects it to be of.
    required: keys it must hold besides ``config``.

  Returns:
    The record, or ``None`` when ``path`` does not exist.

  Raises:
    ValueError: it cannot be read, or records other settings than
      ``config`` (the message names them and advises a new ``--out``).

  Example:
    >>> read_record("/nonexistent/result.json", TrainConfig()) is None
    True
  """
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      record = json.load(f)
    saved = record["config"]
    for key in required:
      record[key]  # pylint: disable=pointless-statement
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ValueError(
      f"cannot read {path} ({e}); run the comparison with a new --out."
    ) from None
  changed = config_differences(saved, config)
  if changed:
    raise ValueError(
      f"{os.path.dirname(path)} holds a finished run with other settings"
      f" than this comparison's"
      f" ({describe_differences(saved, config, changed)}); run the"
      " comparison with its settings or a new --out."
    )
  return record


def _run_dir(config: TrainConfig) -> str:
  """The run's directory: every run of a comparison has its own ``out``."""
  if config.out is None:
    raise ValueError("a comparison's run needs its directory (out).")
  return config.out


def _read_result(config: TrainConfig) -> dict[str, Any] | None:
  path = os.path.join(_run_dir(config), RESULT_FILE)
  result = read_record(path, config, required=("status",))
  if result is None:
    return None
  status = result["status"]
  if status not in ("finished", "diverged"):
    raise ValueError(
      f"{path} has an unknown status {status!r}; run the"
      " comparison with a new --out."
    )
  if status == "finished":
    key = f"{config.eval_prefix}_accuracy"
    try:
      result[key] = np.asarray(result[key], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(
        f"cannot read {path} (no valid {e}); run the"
        " comparison with a new --out."
      ) from None
  return result


def _has_checkpoints(out: str) -> bool:
  # Orbax names a complete checkpoint by its step; a partial one has a suffix.
  directory = os.path.join(out, "checkpoints")
  return os.path.isdir(directory) and any(
    name.isdigit() for name in os.listdir(directory)
  )


def run_once(config: TrainConfig) -> tuple[str, np.ndarray | None]:
  """Trains one run of a comparison, or reads its recorded outcome.

  A run with a ``result.json`` of the same settings is not trained again;
  one with checkpoints but no result is resumed; a run whose loss diverges
  is recorded as diverged. ``result.json`` holds ``status``, ``config``,
  ``evaluated_on`` and the final accuracy per exit under the run's metric
  name: ``test_accuracy``, or ``val_accuracy`` for a run on a validation
  split.

  Args:
    config: the run's settings; ``config.out`` is its own directory.

  Returns:
    ``(status, accuracy)``: ``status`` is ``"trained"``, ``"resumed"``,
    ``"skipped"`` (finished earlier) or ``"diverged"``; ``accuracy`` is the
    ``(K,)`` accuracy per exit on the split the run is scored on
    (``config.evaluated_on``), or ``None`` for a diverged run.

  Raises:
    ValueError: the directory holds a run with other settings.

  Example:
    >>> status, accuracy = run_once(TrainConfig(
    ...     model="branched-mlp", epochs=1, out="/tmp/run"))  # doctest: +SKIP
  """
  key = f"{config.eval_prefix}_accuracy"
  recorded = _read_result(config)
  if recorded is not None:
    if recorded["status"] == "diverged":
      return "diverged", None
    return "skipped", recorded[key]
  resume = _has_checkpoints(_run_dir(config))
  try:
    result = train(dataclasses.replace(config, resume=resume))
  except TrainingDiverged as e:
    write_json(
      os.path.join(_run_dir(config), RESULT_FILE),
      {
        "status": "diverged",
        "config": config.to_json(),
        "evaluated_on": config.evaluated_on,
        "reason": str(e),
      },
    )
    return "diverged", None
  write_json(
    os.path.join(_run_dir(config), RESULT_FILE),
    {
      "status": "finished",
      "config": config.to_json(),
      "evaluated_on": config.evaluated_on,
      key: result.accuracy,
    },
  )
  return ("resumed" if resume else "trained"), result.accuracy
