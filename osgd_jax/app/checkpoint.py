"""Atomic, rotating training checkpoints with Orbax.

Each save writes a new step directory through Orbax, which stages it under a
temporary name and renames it only once it is complete, so a crash mid-write
never leaves a half-written checkpoint that ``latest`` would pick. Only the
newest ``keep`` checkpoints are retained; a run that fails keeps the last good
one because nothing is deleted before a newer save has finished.

Only a checkpoint that fails to read is reported as damaged, and the advice
for it moves the checkpoint aside instead of deleting it: following any
message of this module loses nothing.
"""

from __future__ import annotations

import os
import re
import shlex
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["CheckpointError", "CheckpointStore", "CheckpointWriteError"]


class CheckpointError(ValueError):
  """A checkpoint to resume from is missing or cannot be read."""


class CheckpointWriteError(RuntimeError):
  """A checkpoint could not be written (a full disk, a lost mount, ...)."""


def _reason(error: BaseException) -> str:
  """What went wrong, short enough for a one-line message.

  TensorStore's messages name every file and layer involved; the cause a
  user can act on (a full disk, a missing permission) is the operating
  system's error, which they carry as ``os_error_code``.
  """
  text = str(error)
  code = re.search(r"os_error_code='?(\d+)", text)
  if code:
    number = int(code.group(1))
    return f"{os.strerror(number)} [errno {number}]"
  lines = text.strip().splitlines()
  first = lines[0].split(" See full TensorStore details")[0] if lines else ""
  if len(first) > 240:
    first = f"{first[:100]} ... {first[-140:]}"
  return f"{type(error).__name__}: {first}".rstrip(": ")


class CheckpointStore:
  """Saves and restores ``(arrays, metadata)`` pairs keyed by epoch.

  Args:
    directory: where the step directories live (created if missing).
    keep: how many of the newest checkpoints to keep.

  Example:
    >>> store = CheckpointStore(
    ...     "/tmp/run/checkpoints", keep=2)  # doctest: +SKIP
    >>> store.save(3, {"params": params}, {"epoch": 3})  # doctest: +SKIP
    >>> arrays, meta = store.restore_latest(
    ...     {"params": params})  # doctest: +SKIP
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

    Raises:
      CheckpointWriteError: the file system refused the write. The older
        checkpoints are untouched, since Orbax renames a checkpoint into
        place only once it is complete.
    """
    try:
      self._manager.save(
        epoch,
        args=ocp.args.Composite(
          arrays=ocp.args.StandardSave(arrays),
          metadata=ocp.args.JsonSave(metadata),
        ),
      )
      self._manager.wait_until_finished()
    except Exception as e:  # Orbax and TensorStore raise many types
      last = self._complete_epochs()
      then = (
        f"the checkpoint of epoch {last[-1]} is kept. Free space or"
        " fix the file system, then resume with --resume"
        if last
        else "no earlier checkpoint exists. Free space or fix the file"
        " system, then run the command again"
      )
      raise CheckpointWriteError(
        f"could not write the checkpoint of epoch {epoch} to"
        f" {self.directory} ({_reason(e)}); {then}."
      ) from e

  def _complete_epochs(self) -> list[int]:
    try:
      self._manager.reload()
      return sorted(self._manager.all_steps())
    except Exception:  # the same fault that stopped the save
      return []

  def read_metadata(self, epoch: int) -> dict[str, Any]:
    """Reads only the JSON metadata of the checkpoint of ``epoch``.

    Args:
      epoch: a complete checkpoint's epoch.

    Returns:
      The metadata dict that was saved with it.

    Raises:
      CheckpointError: it cannot be read.
    """
    try:
      restored = self._manager.restore(
        epoch, args=ocp.args.Composite(metadata=ocp.args.JsonRestore())
      )
    except Exception as e:  # Orbax raises many types for unreadable data
      raise self._damaged(epoch, e) from e
    return dict(restored["metadata"])

  def _damaged(self, epoch: int, error: BaseException) -> CheckpointError:
    path = os.path.join(self.directory, str(epoch))
    aside = os.path.join(
      os.path.dirname(self.directory), f"damaged-checkpoint-{epoch}"
    )
    older = [e for e in self._complete_epochs() if e < epoch]
    if older:
      move = shlex.join(["mv", path, aside])
      advice = (
        f"To resume from the checkpoint of epoch {older[-1]} instead,"
        f" move the damaged one aside (nothing is deleted): {move}"
      )
    else:
      advice = (
        "There is no older checkpoint: start again with a new --out"
        " (the damaged one stays for inspection)."
      )
    return CheckpointError(
      f"checkpoint {path} cannot be read ({_reason(error)}); it is damaged."
      f" {advice}"
    )

  def restore_latest(self, template: Any) -> tuple[Any, dict[str, Any]]:
    """Restores the newest checkpoint onto ``template``'s structure.

    Args:
      template: a pytree with the structure, shapes and dtypes to restore.

    Returns:
      ``(arrays, metadata)``.

    Raises:
      CheckpointError: no checkpoint exists, or it cannot be read onto
        ``template``. Callers check the run's configuration first (see
        :func:`osgd_jax.app.train.check_resumable`), so that a checkpoint of
        another model is never taken for a damaged one.
    """
    epoch = self.latest_epoch()
    if epoch is None:
      raise CheckpointError(
        f"no checkpoint to resume from in {self.directory}; run without"
        " --resume to start a new run."
      )
    abstract = jax.tree.map(
      lambda x: (
        jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)
        if not hasattr(x, "sharding")
        else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
      ),
      template,
    )
    try:
      restored = self._manager.restore(
        epoch,
        args=ocp.args.Composite(
          arrays=ocp.args.StandardRestore(abstract),
          metadata=ocp.args.JsonRestore(),
        ),
      )
    except Exception as e:  # Orbax raises many types for unreadable data.
      raise self._damaged(epoch, e) from e
    return restored["arrays"], dict(restored["metadata"])

  def wait(self) -> None:
    """Blocks until a save in flight is complete or has failed.

    A failure is not raised here: the save that was interrupted reports
    nothing more, and :meth:`latest_epoch` tells what was written.
    """
    try:
      self._manager.wait_until_finished()
    except Exception:  # pylint: disable=broad-except
      pass

  def close(self) -> None:
    """Waits for any save in flight and releases Orbax's resources.

    It does not raise: a failed save has already raised from :meth:`save`,
    and ``close`` runs on the way out of a failure whose error must not be
    replaced.
    """
    self.wait()
    try:
      self._manager.close()
    except Exception:  # pylint: disable=broad-except
      pass
