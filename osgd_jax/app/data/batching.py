"""Deterministic batch streams from host memory.

The order of epoch ``e`` is a function of ``(seed, e)`` only, and the
augmentation key of step ``s`` a function of ``(key, e, s)`` only. So a run
resumed at ``(epoch, start_step)`` sees exactly the batches, and draws exactly
the augmentations, of the uninterrupted run.
"""

from __future__ import annotations

from collections.abc import Iterator

import jax
import numpy as np

__all__ = [
  "augment_key",
  "batch_indices",
  "epoch_permutation",
  "iterate_batches",
  "num_batches",
]


def _check_non_negative(**values: int) -> None:
  for name, value in values.items():
    if int(value) != value or value < 0:
      raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """The shuffled example order of one epoch.

  Args:
    seed: non-negative data-order seed of the run.
    epoch: non-negative epoch index.
    num_examples: size of the split.

  Returns:
    A permutation of ``range(num_examples)`` that depends only on
    ``(seed, epoch, num_examples)``.

  Example:
    >>> order = epoch_permutation(seed=0, epoch=3, num_examples=10)
  """
  _check_non_negative(seed=seed, epoch=epoch, num_examples=num_examples)
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def num_batches(
  num_examples: int, batch_size: int, *, drop_last: bool = True
) -> int:
  """Number of (global) batches in one epoch.

  Args:
    num_examples: size of the split.
    batch_size: global batch size.
    drop_last: whether a final partial batch is dropped.

  Returns:
    ``num_examples // batch_size``, plus one for a partial batch unless
    ``drop_last``.

  Example:
    >>> num_batches(10, 4), num_batches(10, 4, drop_last=False)
    (2, 3)
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  full, rest = divmod(num_examples, batch_size)
  return full + int(bool(rest) and not drop_last)


def batch_indices(
  num_examples: int,
  batch_size: int,
  *,
  seed: int,
  epoch: int,
  shuffle: bool = True,
  drop_last: bool = True,
  start_step: int = 0,
  process_index: int = 0,
  process_count: int = 1,
) -> Iterator[np.ndarray]:
  """Yields the example indices of each batch of one epoch.

  Global batch ``s`` is ``order[s * batch_size:(s + 1) * batch_size]`` of the
  epoch's order (``epoch_permutation`` when shuffling, else ``range``).
  Process ``p`` of ``P`` gets the ``p``-th of ``P`` equal contiguous slices of
  every global batch, so the processes partition it. A final partial batch
  (``drop_last=False``) is split into slices whose sizes differ by at most one.

  Args:
    num_examples: size of the split.
    batch_size: global batch size, a multiple of ``process_count``.
    seed: non-negative data-order seed.
    epoch: non-negative epoch index.
    shuffle: shuffle the order (training) or keep it (evaluation).
    drop_last: drop a final partial batch, so every batch has one shape.
    start_step: index of the first batch to yield; the earlier ones are
      skipped without being built, to resume mid-epoch.
    process_index: this process's index in ``[0, process_count)``.
    process_count: number of processes sharing each global batch.

  Returns:
    An iterator of int64 index arrays of length ``batch_size // process_count``
    (shorter for a final partial batch).

  Example:
    >>> for idx in batch_indices(10, 4, seed=0, epoch=0):
    ...   print(idx.shape)
    (4,)
    (4,)
  """
  _check_non_negative(start_step=start_step, process_index=process_index)
  if process_count < 1 or process_index >= process_count:
    raise ValueError(
      f"need 0 <= process_index < process_count, got"
      f" process_index={process_index},"
      f" process_count={process_count}"
    )
  if batch_size % process_count:
    raise ValueError(
      f"batch_size {batch_size} is not a multiple of"
      f" process_count {process_count}"
    )
  steps = num_batches(num_examples, batch_size, drop_last=drop_last)
  if start_step > steps:
    raise ValueError(
      f"start_step {start_step} is past the {steps} batches of an epoch"
    )
  if shuffle:
    order = epoch_permutation(seed, epoch, num_examples)
  else:
    _check_non_negative(seed=seed, epoch=epoch)
    order = np.arange(num_examples)
  # Validation above runs eagerly; only the slicing is deferred.
  return (
    np.array_split(order[s * batch_size : (s + 1) * batch_size], process_count)[
      process_index
    ]
    for s in range(start_step, steps)
  )


def iterate_batches(
  x: np.ndarray,
  y: np.ndarray,
  batch_size: int,
  *,
  seed: int,
  epoch: int,
  shuffle: bool = True,
  drop_last: bool = True,
  start_step: int = 0,
  process_index: int = 0,
  process_count: int = 1,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields ``(inputs, labels)`` batches of one epoch, copying only each batch.

  See ``batch_indices`` for the order, resumption and process sharding.

  Args:
    x: inputs ``(N, ...)``, in host memory.
    y: labels ``(N,)``.
    batch_size: global batch size, a multiple of ``process_count``.
    seed: non-negative data-order seed.
    epoch: non-negative epoch index.
    shuffle: shuffle the order (training) or keep it (evaluation).
    drop_last: drop a final partial batch.
    start_step: index of the first batch to yield, to resume mid-epoch.
    process_index: this process's index in ``[0, process_count)``.
    process_count: number of processes sharing each global batch.

  Returns:
    An iterator of ``(x[idx], y[idx])`` pairs, freshly allocated per batch.

  Example:
    >>> from osgd_jax.app.data import iterate_batches, load_dataset
    >>> ds = load_dataset("digits")
    >>> for xb, yb in iterate_batches(ds.x_train, ds.y_train, 128, seed=0,
    ...                               epoch=0):
    ...   pass
    >>> xb.shape[1:] == ds.x_train.shape[1:]
    True
  """
  if len(x) != len(y):
    raise ValueError(f"x and y have different lengths: {len(x)} != {len(y)}")
  indices = batch_indices(
    len(x),
    batch_size,
    seed=seed,
    epoch=epoch,
    shuffle=shuffle,
    drop_last=drop_last,
    start_step=start_step,
    process_index=process_index,
    process_count=process_count,
  )
  return ((x[idx], y[idx]) for idx in indices)


def augment_key(key: jax.Array | int, epoch: int, step: int) -> jax.Array:
  """The augmentation key of one step, a function of ``(key, epoch, step)``.

  Args:
    key: the run's data-augmentation key, or an integer seed for one.
    epoch: epoch index.
    step: index of the batch within the epoch (as in ``start_step``).

  Returns:
    ``fold_in(fold_in(key, epoch), step)``, of the same key type as ``key``
    (a typed ``jax.random.key`` when an integer seed was given).

  Example:
    >>> k = augment_key(jax.random.key(0), epoch=2, step=17)
  """
  if isinstance(key, (int, np.integer)):
    key = jax.random.key(int(key))
  return jax.random.fold_in(jax.random.fold_in(key, epoch), step)
