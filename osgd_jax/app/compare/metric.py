"""What a comparison scores its runs by: accuracy, or bits per byte.

A classifier's runs are scored by their accuracy per exit (higher is
better, shown in percent); a language model's (``--dataset text``) by
their bits per byte per exit, the next-byte cross-entropy in bits (lower
is better, shown as it is). The metric decides which learning rate the
tuning picks and how the tables read; the results file names it in
``settings["metric"]`` (a file without it is scored by accuracy, as every
comparison was before language models).
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["METRICS", "Metric", "metric_for_dataset", "metric_of"]


@dataclasses.dataclass(frozen=True)
class Metric:
  """A per-exit score of a run and how a comparison reads it.

  Attributes:
    name: the key's suffix in the run records and the results file
      (``test_<name>``, ``val_<name>``).
    title: the score's name in a sentence, e.g. ``"accuracy"``.
    unit: how a value is shown, e.g. ``"%"``; a difference is in
      ``difference_unit``.
    difference_unit: the unit of a difference of two values.
    scale: shown values are the recorded ones times this.
    decimals: decimals of a shown value.
    higher_is_better: whether a larger value is a better run.
  """

  name: str
  title: str
  unit: str
  difference_unit: str
  scale: float
  decimals: int
  higher_is_better: bool

  def show(self, value: float) -> str:
    """A recorded value as the tables show it.

    Example:
      >>> METRICS["accuracy"].show(0.5), METRICS["bits_per_byte"].show(2.5)
      ('50.0', '2.500')
    """
    return f"{self.scale * value:.{self.decimals}f}"

  def better(self, a: float, b: float) -> bool:
    """Whether value ``a`` is strictly better than ``b``.

    Example:
      >>> METRICS["bits_per_byte"].better(2.0, 3.0)
      True
    """
    return a > b if self.higher_is_better else a < b


#: The metrics by name.
METRICS: dict[str, Metric] = {
  "accuracy": Metric(
    "accuracy", "accuracy", "%", "percentage points", 100.0, 1, True
  ),
  "bits_per_byte": Metric(
    "bits_per_byte",
    "bits per byte",
    "bits per byte",
    "bits per byte",
    1.0,
    3,
    False,
  ),
}


def metric_for_dataset(dataset: str) -> Metric:
  """The metric a comparison on ``dataset`` is scored by.

  Args:
    dataset: a data set name, as ``--dataset`` takes it.

  Returns:
    Bits per byte for ``text`` (a language model), else accuracy.

  Example:
    >>> metric_for_dataset("text").name, metric_for_dataset("digits").name
    ('bits_per_byte', 'accuracy')
  """
  return METRICS["bits_per_byte" if dataset == "text" else "accuracy"]


def metric_of(payload: dict[str, Any]) -> Metric:
  """The metric a results file's comparison was scored by.

  Args:
    payload: the results (:mod:`osgd_jax.app.compare.results`).

  Returns:
    The :class:`Metric` its ``settings["metric"]`` names; accuracy when it
    names none.

  Raises:
    ValueError: it names an unknown metric.

  Example:
    >>> metric_of({"settings": {}}).name
    'accuracy'
  """
  name = payload["settings"].get("metric", "accuracy")
  if name not in METRICS:
    raise ValueError(
      f"the results file is scored by an unknown metric {name!r}; report"
      " it with the osgd-compare that wrote it."
    )
  return METRICS[name]
