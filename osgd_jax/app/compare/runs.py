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

from osgd_jax.app.compare.metric import metric_for_dataset
from osgd_jax.app.report import write_json
from osgd_jax.app.train import (
  TrainConfig,
  TrainingDiverged,
  config_differences,
  describe_differences,
  read_metrics,
  train,
)

__all__ = ["RESULT_FILE", "read_record", "run_once", "run_record"]

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
    for key in _score_keys(config):
      try:
        result[key] = np.asarray(result[key], dtype=np.float64)
      except (KeyError, TypeError, ValueError) as e:
        raise ValueError(
          f"cannot read {path} (no valid {e}); run the"
          " comparison with a new --out."
        ) from None
  return result


def _score_keys(config: TrainConfig) -> tuple[str, ...]:
  """The per-exit scores a finished run records: accuracy, and its metric."""
  prefix = config.eval_prefix
  metric = metric_for_dataset(config.dataset).name
  return tuple(dict.fromkeys((f"{prefix}_accuracy", f"{prefix}_{metric}")))


def _has_checkpoints(out: str) -> bool:
  # Orbax names a complete checkpoint by its step; a partial one has a suffix.
  directory = os.path.join(out, "checkpoints")
  return os.path.isdir(directory) and any(
    name.isdigit() for name in os.listdir(directory)
  )


def run_record(config: TrainConfig) -> tuple[str, dict[str, Any] | None]:
  """Trains one run of a comparison, or reads its recorded outcome.

  A run with a ``result.json`` of the same settings is not trained again;
  one with checkpoints but no result is resumed; a run whose loss diverges
  is recorded as diverged. ``result.json`` holds ``status``, ``config``,
  ``evaluated_on`` and the final scores per exit under the run's metric
  names: ``test_accuracy``, or ``val_accuracy`` for a run on a validation
  split; a language model (``--dataset text``) adds ``test_bits_per_byte``
  (or ``val_...``) and, scored on the test set, its token early-exit
  curve ``early_exit`` as its ``metrics.json`` has it.

  Args:
    config: the run's settings; ``config.out`` is its own directory.

  Returns:
    ``(status, record)``: ``status`` is ``"trained"``, ``"resumed"``,
    ``"skipped"`` (finished earlier) or ``"diverged"``; ``record`` is the
    run's ``result.json`` with each per-exit score a ``(K,)`` float64
    array, or ``None`` for a diverged run.

  Raises:
    ValueError: the directory holds a run with other settings.

  Example:
    >>> status, record = run_record(TrainConfig(
    ...     model="branched-mlp", epochs=1, out="/tmp/run"))  # doctest: +SKIP
  """
  recorded = _read_result(config)
  if recorded is not None:
    if recorded["status"] == "diverged":
      return "diverged", None
    return "skipped", recorded
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
  record: dict[str, Any] = {
    "status": "finished",
    "config": config.to_json(),
    "evaluated_on": config.evaluated_on,
    f"{config.eval_prefix}_accuracy": result.accuracy,
  }
  if result.bits_per_byte is not None:
    record[f"{config.eval_prefix}_bits_per_byte"] = result.bits_per_byte
    if config.evaluated_on == "test":
      path = os.path.join(_run_dir(config), "metrics.json")
      record["early_exit"] = read_metrics(path)["final"]["early_exit"]
  write_json(os.path.join(_run_dir(config), RESULT_FILE), record)
  return ("resumed" if resume else "trained"), _read_result(config)


def run_once(config: TrainConfig) -> tuple[str, np.ndarray | None]:
  """Trains one run of a comparison, or reads its accuracy per exit.

  :func:`run_record` with the accuracy alone.

  Args:
    config: the run's settings; ``config.out`` is its own directory.

  Returns:
    ``(status, accuracy)``: the status of :func:`run_record`, and the
    ``(K,)`` accuracy per exit on the split the run is scored on
    (``config.evaluated_on``), or ``None`` for a diverged run.

  Raises:
    ValueError: the directory holds a run with other settings.

  Example:
    >>> status, accuracy = run_once(TrainConfig(
    ...     model="branched-mlp", epochs=1, out="/tmp/run"))  # doctest: +SKIP
  """
  status, record = run_record(config)
  if record is None:
    return status, None
  return status, record[f"{config.eval_prefix}_accuracy"]
