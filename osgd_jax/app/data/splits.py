"""Stratified splits: digits' fixed test set, and a run's validation split."""

from __future__ import annotations

import dataclasses

import numpy as np

from osgd_jax.app.data.base import Dataset

__all__ = ["VALIDATION_SPLIT_SEED", "hold_out_validation", "stratified_split"]

#: The seed of every validation split. It is fixed, not the run's seed, so
#: that all runs of an experiment (every seed, optimizer and learning rate)
#: are scored on the same held-out examples.
VALIDATION_SPLIT_SEED = 0


def stratified_split(
  labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
  """Splits example indices so that every class keeps the same proportions.

  Each class independently sends ``round(test_fraction * class_size)`` of its
  examples to the test side. The split depends only on ``(labels,
  test_fraction, seed)``, so it never changes between runs (the test suite
  pins a few indices, guarding against a change of NumPy's random stream).

  Args:
    labels: ``(N,)`` integer labels.
    test_fraction: fraction of each class held out, in (0, 1).
    seed: non-negative integer seed of the split.

  Returns:
    ``(train_indices, test_indices)``, sorted int64 arrays that partition
    ``range(N)``.

  Example:
    >>> train, test = stratified_split(np.array([0, 0, 1, 1]), 0.5, seed=0)
  """
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  train, test = [], []
  for c in np.unique(labels):
    members = rng.permutation(np.flatnonzero(labels == c))
    num_test = int(np.floor(test_fraction * members.size + 0.5))
    test.append(members[:num_test])
    train.append(members[num_test:])
  return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def hold_out_validation(
  dataset: Dataset, fraction: float, seed: int = VALIDATION_SPLIT_SEED
) -> Dataset:
  """Holds out a stratified part of the *training* set for validation.

  Next-token data (labels per position, ``dataset.sequence_labels``) holds
  out the *tail* of its training windows instead, which are in the text's
  order: a random sample of windows would validate on text whose
  neighbours it trained on.

  The result trains on the rest and evaluates on the held-out part: its
  ``x_test``/``y_test`` are the validation examples, and the real test set
  is dropped, so nothing downstream can score on it by mistake. The inputs
  keep the dataset's standardisation (statistics of the whole training
  set's inputs, no labels), the same as a run on the full training set.

  Args:
    dataset: the data set, with its own train/test split.
    fraction: the fraction of each class of the training set held out,
      in (0, 1).
    seed: the split's seed; the default :data:`VALIDATION_SPLIT_SEED`
      keeps every run on the same validation examples.

  Returns:
    A ``Dataset`` of the same name whose training set is the rest and whose
    test arrays are the validation split.

  Raises:
    ValueError: the fraction holds out no example, or every one.

  Example:
    >>> from osgd_jax.app.data.synthetic import make_synthetic
    >>> split = hold_out_validation(make_synthetic(num_train=100), 0.2)
    >>> split.num_train, split.num_test
    (80, 20)
  """
  if not 0.0 < fraction < 1.0:
    raise ValueError(
      f"--validation must be in (0, 1) to hold out a split, got {fraction!r}."
    )
  if dataset.sequence_labels:
    num_held = int(np.floor(fraction * dataset.num_train + 0.5))
    indices = np.arange(dataset.num_train)
    rest, held = indices[: dataset.num_train - num_held], indices[-num_held:]
    if num_held == 0:
      held = indices[:0]
  else:
    rest, held = stratified_split(dataset.y_train, fraction, seed)
  if held.size == 0 or rest.size == 0:
    side = "none" if held.size == 0 else "all"
    raise ValueError(
      f"--validation {fraction} holds out {side} of the"
      f" {dataset.num_train} training examples of {dataset.name}; choose a"
      " fraction such as 0.2."
    )
  return dataclasses.replace(
    dataset,
    x_train=dataset.x_train[rest],
    y_train=dataset.y_train[rest],
    x_test=dataset.x_train[held],
    y_test=dataset.y_train[held],
  )
