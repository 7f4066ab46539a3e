"""A seeded Gaussian-clusters classification task with tunable difficulty."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from osgd_jax.app.data.base import Dataset, standardized

__all__ = ["make_synthetic"]


def _class_centres(
  rng: np.random.Generator, num_classes: int, dim: int
) -> np.ndarray:
  """Unit-norm class centres, mutually orthogonal whenever ``dim`` allows."""
  if num_classes <= dim:
    q, _ = np.linalg.qr(rng.standard_normal((dim, num_classes)))
    return q.T
  centres = rng.standard_normal((num_classes, dim))
  return centres / np.linalg.norm(centres, axis=1, keepdims=True)


def _sample(
  rng: np.random.Generator, centres: np.ndarray, num: int, difficulty: float
) -> tuple[np.ndarray, np.ndarray]:
  num_classes, dim = centres.shape
  # Balanced classes in a random order.
  labels = rng.permutation(np.arange(num) % num_classes).astype(np.int32)
  x = centres[labels] + difficulty * rng.standard_normal((num, dim))
  return x, labels


def make_synthetic(
  *,
  seed: int = 0,
  num_train: int = 2048,
  num_test: int = 512,
  num_classes: int = 10,
  shape: Sequence[int] = (32,),
  difficulty: float = 0.5,
) -> Dataset:
  """Generates Gaussian class clusters, a cheap stand-in for real data.

  Class ``c`` is ``N(mu_c, difficulty^2 I)`` in ``prod(shape)`` dimensions
  with unit-norm centres ``mu_c``, mutually orthogonal when
  ``num_classes <= prod(shape)``. Then two classes are ``sqrt(2)`` apart and
  the Bayes error between them is ``Phi(-1 / (sqrt(2) * difficulty))``:
  0.2 is easy (2e-4), 0.5 is moderate (8%), 1.0 is hard (24%),
  whatever the dimension. The inputs are then standardised per feature
  (per channel for image shapes) with the training statistics, which leaves
  the Bayes error unchanged.

  Centres, training set and test set come from separate random streams of
  ``seed``, so e.g. changing ``num_test`` leaves the training set unchanged.

  Args:
    seed: non-negative integer seed.
    num_train: number of training examples.
    num_test: number of test examples.
    num_classes: number of classes (at least 2); classes are balanced.
    shape: shape of one example: ``(D,)`` for vectors, ``(H, W, C)`` for
      images.
    difficulty: noise standard deviation relative to the unit centre norm;
      ``0`` gives noise-free points at the centres.

  Returns:
    A ``Dataset`` named ``"synthetic"``.

  Example:
    >>> ds = make_synthetic(seed=0, shape=(8, 8, 1), difficulty=0.3)
    >>> ds.x_train.shape
    (2048, 8, 8, 1)
  """
  shape = tuple(int(s) for s in shape)
  if not shape or min(shape) < 1:
    raise ValueError(
      f"shape must be a non-empty tuple of positive sizes, got {shape}"
    )
  if num_classes < 2:
    raise ValueError(f"num_classes must be at least 2, got {num_classes}")
  if num_train < 1 or num_test < 0:
    raise ValueError(
      f"need num_train >= 1 and num_test >= 0, got {num_train} and {num_test}"
    )
  if not difficulty >= 0:
    raise ValueError(f"difficulty must be >= 0, got {difficulty}")
  dim = math.prod(shape)
  centres = _class_centres(np.random.default_rng([seed, 0]), num_classes, dim)
  x_train, y_train = _sample(
    np.random.default_rng([seed, 1]), centres, num_train, difficulty
  )
  x_test, y_test = _sample(
    np.random.default_rng([seed, 2]), centres, num_test, difficulty
  )
  x_train = x_train.reshape(num_train, *shape)
  x_test = x_test.reshape(num_test, *shape)
  return standardized(
    "synthetic", x_train, y_train, x_test, y_test, num_classes
  )
