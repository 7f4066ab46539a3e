"""Atomic, rotating training checkpoints with Orbax.

Each save writes a new step directory through Orbax, which stages it under a
temporary name and renames it only once it is complete, so a crash mid-write
never leaves a half-written checkpoint that ``latest`` would pick. Only the
newest ``keep`` checkpoints are retained; a run that fails keeps the last good
one because nothing is deleted before a newer save has finished.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["CheckpointError", "CheckpointStore"]


class CheckpointError(ValueError):
  """A checkpoint is missing, corrupt or does not match the run."""


class CheckpointStore:
  """Saves and restores ``(arrays, metadata)`` pairs keyed by epoch.

  Args:
    directory: where the step directories live (created if missing).
    keep: how many of the newest checkpoints to keep.

  Example:
    >>> store = CheckpointStore("/tmp/run/checkpoints", keep=2)  # doctest: +SKIP
    >>> store.save(3, {"params": params}, {"epoch": 3})           # doctest: +SKIP
    >>> arrays, meta = store.restore_latest({"params": params})  # doctest: +SKIP
  """

  def __init__(self, directory: str, keep: int = 3):
    if keep < 1:
      raise ValueError(f"keep must be >= 1 checkpoints, got {keep}.")
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
    )

  def latest_epoch(self) -> int | None:
    """The newest complete checkpoint's epoch, or None if there is none."""
    self._manager.reload()
    return self._manager.latest_step()

  def save(self, epoch: int, arrays: Any, metadata: dict[str, Any]) -> None:
    """Writes a checkpoint for ``epoch`` and waits until it is complete.

    Args:
      epoch: the checkpoint key (completed epochs).
      arrays: a pytree of arrays (params, optimizer state, ...).
      metadata: JSON-serialisable run information (config, metrics so far).
    """
    self._manager.save(
        epoch,
        args=ocp.args.Composite(
            arrays=ocp.args.StandardSave(arrays),
            metadata=ocp.args.JsonSave(metadata),
        ),
    )
    self._manager.wait_until_finished()

  def restore_latest(self, template: Any) -> tuple[Any, dict[str, Any]]:
    """Restores the newest checkpoint onto ``template``'s structure.

    Args:
      template: a pytree with the structure, shapes and dtypes to restore.

    Returns:
      ``(arrays, metadata)``.

    Raises:
      CheckpointError: no checkpoint exists, or it cannot be read, or its
        arrays do not match ``template``.
    """
    epoch = self.latest_epoch()
    if epoch is None:
      raise CheckpointError(
          f"no checkpoint to resume from in {self.directory}; run without"
          " --resume to start a new run.")
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)
        if not hasattr(x, "sharding") else
        jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
        template)
    try:
      restored = self._manager.restore(
          epoch,
          args=ocp.args.Composite(
              arrays=ocp.args.StandardRestore(abstract),
              metadata=ocp.args.JsonRestore(),
          ),
      )
    except Exception as e:  # Orbax raises many types for unreadable data.
      raise CheckpointError(
          f"checkpoint {os.path.join(self.directory, str(epoch))} is corrupt or"
          f" does not match this model ({type(e).__name__}: {str(e)[:200]})."
          " Delete it to fall back to an older one, or start a new run"
          " without --resume.") from e
    return restored.arrays, dict(restored.metadata)

  def close(self) -> None:
    self._manager.close()
