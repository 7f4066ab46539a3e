"""What a run leaves behind: ``metrics.json``, the figure, the result.

Process 0 writes the files of a multi-process run; every process returns the
same :class:`TrainResult`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from osgd_jax import anytime
from osgd_jax.app.report import plot_accuracy_vs_flops, write_json
from osgd_jax.app.train.config import TrainConfig
from osgd_jax.app.train.run import Run, TrainState

__all__ = [
  "EARLY_EXIT_THRESHOLDS",
  "TrainResult",
  "figure_name",
  "finish_run",
  "write_metrics",
]

#: The confidence thresholds of the early-exit curve in metrics.json and the
#: figure, from 0 (every example takes exit 1) to 1 (only certain ones stop
#: before the last exit).
EARLY_EXIT_THRESHOLDS = np.linspace(0.0, 1.0, 21)


def figure_name(dataset: str) -> str:
  """The run's figure: accuracy, or a language model's bits, against FLOPs.

  Example:
    >>> figure_name("digits"), figure_name("text")
    ('accuracy_vs_flops.png', 'bits_vs_flops.png')
  """
  return "bits_vs_flops.png" if dataset == "text" else "accuracy_vs_flops.png"


@dataclasses.dataclass
class TrainResult:
  """What a finished run produced.

  A run is scored on one split, which ``evaluated_on`` names: the test
  set (``test_accuracy`` and ``test_loss`` are set, ``val_*`` are ``None``)
  or the validation split of a run with ``validation`` > 0 (the other way
  round), as the keys of its ``metrics.json`` are.

  Attributes:
    history: one dict per completed epoch (as written to ``metrics.json``).
    test_accuracy: ``(K,)`` final test accuracy per exit, or ``None``.
    test_loss: ``(K,)`` final test loss per exit, or ``None``.
    flops: ``(K,)`` FLOPs of one example up to each exit, and its source.
    params: ``(K,)`` parameters on each exit's path.
    out: the output directory.
    model: the trained model, in eval mode.
    val_accuracy: ``(K,)`` final validation accuracy per exit, or ``None``.
    val_loss: ``(K,)`` final validation loss per exit, or ``None``.
    evaluated_on: ``"test"`` or ``"validation"``.
    bits_per_byte: ``(K,)`` a language model's final bits per byte on that
      split (its loss over ``ln 2``), or ``None`` for a classifier.
  """

  history: list[dict[str, Any]]
  test_accuracy: np.ndarray | None
  test_loss: np.ndarray | None
  flops: anytime.ExitFlops
  params: np.ndarray
  out: str
  model: Any
  val_accuracy: np.ndarray | None = None
  val_loss: np.ndarray | None = None
  evaluated_on: str = "test"
  bits_per_byte: np.ndarray | None = None

  @property
  def accuracy(self) -> np.ndarray:
    """``(K,)`` final accuracy per exit on the split ``evaluated_on`` names."""
    accuracy = (
      self.val_accuracy
      if self.evaluated_on == "validation"
      else self.test_accuracy
    )
    if accuracy is None:  # the split it was evaluated on has its accuracy
      raise ValueError(f"the run recorded no {self.evaluated_on} accuracy.")
    return accuracy


def write_metrics(
  out: str,
  config: TrainConfig,
  history: list[dict[str, Any]],
  summary: dict[str, Any] | None = None,
  data: Mapping[str, Any] | None = None,
) -> None:
  """Writes ``out/metrics.json``: the config, the epochs and the final summary.

  Args:
    out: the run's output directory.
    config: the run's settings.
    history: one record per completed epoch.
    summary: the final test metrics, FLOPs and early-exit curve, once the
      run is over.
    data: where the data came from (``Dataset.info``), recorded under
      ``"data"``: for ``text``, which text, and the Python version that
      the default text depends on.

  Example:
    >>> import json, tempfile
    >>> with tempfile.TemporaryDirectory() as out:
    ...   write_metrics(out, TrainConfig(), [{"epoch": 1}])
    ...   with open(os.path.join(out, "metrics.json")) as f:
    ...     json.load(f)["epochs"]
    [{'epoch': 1}]
  """
  payload: dict[str, Any] = {"config": config.to_json()}
  if data:
    payload["data"] = dict(data)
  payload["epochs"] = history
  if summary is not None:
    payload["final"] = summary
  write_json(os.path.join(out, "metrics.json"), payload)


def finish_run(run: Run, state: TrainState) -> TrainResult:
  """Measures the trained model and writes the run's final artefacts.

  Adds the final test metrics (validation metrics for a run with
  ``validation`` > 0: ``val_accuracy``, ``val_loss`` and ``evaluated_on``
  say which), FLOPs and parameters per exit and the early-exit curve
  (accuracy against mean FLOPs, exiting at the first exit whose confidence
  reaches each of :data:`EARLY_EXIT_THRESHOLDS`) to
  ``metrics.json``, and plots both against FLOPs in
  ``accuracy_vs_flops.png``.

  A language model (``--dataset text``) exits token by token instead, as
  CALM does (:func:`osgd_jax.anytime.token_early_exit_curve`): its summary
  adds ``{split}_bits_per_byte`` per exit and ``flops_per_token`` (an
  exit's FLOPs on one window over its length), and its ``early_exit``
  curve gives, per threshold, the mean exit depth, the mean FLOPs per
  token, the bits per byte, the token accuracy and the tokens stopping at
  each exit; ``bits_vs_flops.png`` plots the bits per byte of each exit
  and of the curve against FLOPs per token.

  Args:
    run: the run, whose last history record holds the final metrics.
    state: the trained state.

  Returns:
    The :class:`TrainResult`.
  """
  config, dataset = run.config, run.dataset
  model = run.host_model(state)
  model.eval()
  final, prefix = run.history[-1], config.eval_prefix
  accuracy = np.asarray(final[f"{prefix}_accuracy"])
  loss = np.asarray(final[f"{prefix}_loss"])
  flops = anytime.flops_per_exit(
    model, (1,) + dataset.input_shape, dtype=dataset.x_train.dtype
  )
  param_counts = anytime.params_per_exit(model)
  on_test = config.evaluated_on == "test"
  bits = loss / math.log(2) if dataset.sequence_labels else None
  result = TrainResult(
    run.history,
    accuracy if on_test else None,
    loss if on_test else None,
    flops,
    param_counts,
    run.out,
    model,
    None if on_test else accuracy,
    None if on_test else loss,
    config.evaluated_on,
    bits,
  )
  summary: dict[str, Any] = {
    "evaluated_on": config.evaluated_on,
    f"{prefix}_accuracy": accuracy,
    f"{prefix}_loss": loss,
    "flops": flops.flops,
    "flops_source": flops.source,
    "params": param_counts,
  }
  if bits is not None:
    per_token = flops.flops / math.prod(dataset.input_shape)
    curve = anytime.token_early_exit_curve(
      model,
      dataset.x_test,
      dataset.y_test,
      EARLY_EXIT_THRESHOLDS,
      flops=per_token,
      batch_size=config.batch_size,
    )
    summary[f"{prefix}_bits_per_byte"] = bits
    summary["flops_per_token"] = per_token
    summary["early_exit"] = {
      "threshold": curve.threshold,
      "mean_exit": curve.mean_exit,
      "mean_flops": curve.mean_flops,
      "bits_per_byte": curve.bits,
      "accuracy": curve.accuracy,
      "exit_counts": curve.exit_counts,
    }
    curves = {
      f"{config.optimizer}: exit k": (per_token, bits),
      f"{config.optimizer}: token early exit by confidence": (
        curve.mean_flops,
        curve.bits,
      ),
    }
    ylabel, xlabel = f"{config.evaluated_on} bits per byte", "FLOPs per token"
  else:
    sweep_flops, sweep_accuracy = anytime.early_exit_curve(
      model,
      dataset.x_test,
      dataset.y_test,
      EARLY_EXIT_THRESHOLDS,
      flops=flops.flops,
    )
    summary["early_exit"] = {
      "threshold": EARLY_EXIT_THRESHOLDS,
      "mean_flops": sweep_flops,
      "accuracy": sweep_accuracy,
    }
    curves = {
      f"{config.optimizer}: exit k": (flops.flops, accuracy),
      f"{config.optimizer}: early exit by confidence": (
        sweep_flops,
        sweep_accuracy,
      ),
    }
    ylabel = f"{config.evaluated_on} accuracy (%)"
    xlabel = "FLOPs per example"
  if jax.process_index() != 0:  # process 0 writes the run's files
    return result
  write_metrics(run.out, config, run.history, summary, dataset.info)
  plot_accuracy_vs_flops(
    curves,
    os.path.join(run.out, figure_name(config.dataset)),
    title=f"{config.model} on {config.dataset}",
    ylabel=ylabel,
    xlabel=xlabel,
    percent=bits is None,
  )
  return result
