"""Callbacks: what the training loop hands out as it goes, and TensorBoard.

:func:`osgd_jax.app.train.train` calls each callback with every record it
logs, on every process:

* ``{"kind": "step", "epoch", "step", "global_step", "train_loss",
  "examples_per_s"}`` each time the loop fetches the losses from the device
  (after an epoch's first step, every ``log_every`` steps, and after its
  last), ``train_loss`` being the mean exit losses since the last fetch;
* ``{"kind": "epoch", "global_step", ...}`` after each epoch, the rest being
  the epoch's ``metrics.json`` record (``train_loss``, ``step_time_s``, and
  ``test_loss`` and ``test_accuracy`` when it was evaluated, or ``val_loss``
  and ``val_accuracy`` for a run scored on a validation split).

A callback runs on the host between fetches, so it costs no device time,
but it delays the next steps' dispatch by as long as it takes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["Callback", "TensorBoardLogger"]

#: The type of a callback, called with each record and returning nothing.
Callback = Callable[[dict[str, Any]], None]

_INSTALL_HINT = (
  "install the TensorBoard extra: python -m pip install 'osgd-jax[tensorboard]'"
)


class TensorBoardLogger:
  """Writes the training records as TensorBoard scalars, with tensorboardX.

  Scalars, against the global step: ``train/loss/exit_k`` from every step
  record, and ``test/accuracy/exit_k`` and ``test/loss/exit_k`` (or
  ``val/...`` on a validation split) from the epoch records that have
  them. View them with ``tensorboard --logdir``.

  Args:
    logdir: the directory for the event files; created if missing.

  Raises:
    ImportError: tensorboardX is not installed; the message says how to
      install it.

  Example:
    >>> import tempfile
    >>> with TensorBoardLogger(tempfile.mkdtemp()) as log:
    ...   log({"kind": "step", "global_step": 1, "train_loss": [0.5, 0.25]})
  """

  def __init__(self, logdir: str):
    try:
      import tensorboardX  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(
        f"--tensorboard needs tensorboardX; {_INSTALL_HINT}."
      ) from e
    self._writer = tensorboardX.SummaryWriter(logdir)

  def __call__(self, record: dict[str, Any]) -> None:
    step = record["global_step"]
    scalars = {
      "train/loss": record.get("train_loss")
      if record.get("kind") == "step"
      else None,
      "test/accuracy": record.get("test_accuracy"),
      "test/loss": record.get("test_loss"),
      "val/accuracy": record.get("val_accuracy"),
      "val/loss": record.get("val_loss"),
    }
    for tag, values in scalars.items():
      for k, value in enumerate(values or ()):
        self._writer.add_scalar(f"{tag}/exit_{k + 1}", value, step)

  def close(self) -> None:
    """Flushes the event file and closes it."""
    self._writer.close()

  def __enter__(self) -> TensorBoardLogger:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
