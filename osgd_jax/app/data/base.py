"""The ``Dataset`` container, the loader errors, and standardisation."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = [
  "CIFAR_URL",
  "Dataset",
  "DatasetFormatError",
  "DatasetNotFoundError",
  "channel_stats",
  "standardize",
  "standardized",
]

#: The CIFAR data sets' home page, where error messages send users for the
#: archives.
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


class DatasetNotFoundError(ValueError):
  """A dataset's files are not where the loader looked for them."""


class DatasetFormatError(ValueError):
  """A dataset's files exist but do not have the expected format."""


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """A classification or next-token data set held in host memory.

  The inputs of the classification sets are float32 NumPy arrays, already
  standardised: ``x = (raw - mean) / std`` with ``raw`` scaled to [0, 1]
  (pixels; MNIST-1D's signals are taken as its generator returns them) and
  ``mean``/``std`` computed on the training split only, per channel (the
  last axis of the unflattened input: ``(H, W, C)`` images, ``(length, C)``
  signals).
  A next-token set (``text``) holds int32 token windows instead, not
  standardised, with one label per position: ``y`` has the inputs' shape
  ``(N, length)``, and ``num_classes`` is the vocabulary's size.
  The arrays are read-only, so batches sliced from them can be handed out
  without defensive copies.

  Attributes:
    name: the registry name (``"digits"``, ``"cifar10"``, ``"mnist1d"``, ...).
    x_train: inputs, ``(N_train, *input_shape)`` float32.
    y_train: labels, ``(N_train,)`` int32 in ``[0, num_classes)``
      (``(N_train, length)`` next tokens for text).
    x_test: inputs, ``(N_test, *input_shape)``.
    y_test: labels, ``(N_test,)`` int32 (``(N_test, length)`` for text).
    num_classes: number of classes.
    mean: per-channel mean subtracted from the raw inputs, ``(C,)``.
    std: per-channel standard deviation divided out, ``(C,)``.
    class_names: human-readable class names, or ``()`` when unknown.
    info: where the data came from, as a JSON-ready mapping that a run
      records in its ``metrics.json`` (``text`` says which text, and the
      Python version its default text depends on); ``None`` for the others.
  """

  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int
  mean: np.ndarray
  std: np.ndarray
  class_names: tuple[str, ...] = ()
  # None rather than a default factory: the docs render the signature.
  info: Mapping[str, Any] | None = None

  def __post_init__(self):
    for split, x, y in (
      ("train", self.x_train, self.y_train),
      ("test", self.x_test, self.y_test),
    ):
      if x.ndim < 2 or y.shape not in (x.shape[:1], x.shape):
        raise ValueError(
          f"{self.name} {split} split: inputs {x.shape} and labels {y.shape}"
          " do not match; expected x of shape (N, ...) and y of shape (N,),"
          " or (N, length) like x for next-token targets."
        )
    if self.x_train.shape[1:] != self.x_test.shape[1:]:
      raise ValueError(
        f"{self.name}: train inputs {self.x_train.shape[1:]} and test inputs"
        f" {self.x_test.shape[1:]} have different shapes."
      )
    for array in (
      self.x_train,
      self.y_train,
      self.x_test,
      self.y_test,
      self.mean,
      self.std,
    ):
      array.flags.writeable = False

  @property
  def input_shape(self) -> tuple[int, ...]:
    """The shape of one example, e.g. ``(32, 32, 3)`` or ``(64,)``."""
    return tuple(self.x_train.shape[1:])

  @property
  def sequence_labels(self) -> bool:
    """Whether every input position has a label (next-token data).

    Example:
      >>> Dataset("toy", np.zeros((2, 3)), np.zeros((2, 3), np.int32),
      ...         np.zeros((1, 3)), np.zeros((1, 3), np.int32), 4,
      ...         np.zeros(1), np.ones(1)).sequence_labels
      True
    """
    return self.y_train.ndim > 1

  @property
  def num_train(self) -> int:
    return int(self.x_train.shape[0])

  @property
  def num_test(self) -> int:
    return int(self.x_test.shape[0])

  def flatten(self) -> Dataset:
    """Returns the same dataset with every example flattened to a vector.

    Images flatten in row-major (H, W, C) order; ``mean`` and ``std`` stay
    per channel.
    """
    return dataclasses.replace(
      self,
      x_train=self.x_train.reshape(self.num_train, -1),
      x_test=self.x_test.reshape(self.num_test, -1),
    )

  def __repr__(self) -> str:
    return (
      f"Dataset(name={self.name!r}, train={self.x_train.shape},"
      f" test={self.x_test.shape}, num_classes={self.num_classes})"
    )


def channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and standard deviation over all axes but the last.

  Args:
    x: array of shape ``(..., C)``.

  Returns:
    ``(mean, std)`` in the units of ``x``, each float32 of shape ``(C,)``;
    a constant channel gets ``std = 1`` so that standardising it cannot
    divide by zero.

  Example:
    >>> mean, std = channel_stats(np.ones((4, 8, 8, 3)))
  """
  flat = np.asarray(x).reshape(-1, x.shape[-1])
  n = flat.shape[0]
  if n == 0:
    raise ValueError("cannot compute channel statistics of an empty array")
  # Two passes in float64 over row chunks: exact enough for 10^8 pixels
  # without materialising a float64 copy of the whole training set.
  chunk = 1 << 18
  total = np.zeros(flat.shape[1], np.float64)
  for start in range(0, n, chunk):
    total += flat[start : start + chunk].sum(axis=0, dtype=np.float64)
  mean = total / n
  squares = np.zeros_like(mean)
  for start in range(0, n, chunk):
    deviation = flat[start : start + chunk].astype(np.float64) - mean
    squares += np.einsum("ij,ij->j", deviation, deviation)
  std = np.sqrt(squares / n)
  std = np.where(std > 0, std, 1.0)
  return mean.astype(np.float32), std.astype(np.float32)


def standardize(
  x: np.ndarray, mean: np.ndarray, std: np.ndarray, *, scale: float = 1.0
) -> np.ndarray:
  """Returns ``(x * scale - mean) / std`` as a new float32 array.

  Args:
    x: array of shape ``(..., C)``, e.g. raw uint8 pixels.
    mean: ``(C,)`` channel means, in the units of ``x * scale``.
    std: ``(C,)`` channel standard deviations, in the same units.
    scale: factor applied first, e.g. ``1 / 255`` to map uint8 pixels to [0, 1].

  Returns:
    float32 array of the same shape as ``x``.

  Example:
    >>> standardize(np.full((1, 3), 255, np.uint8), np.zeros(3), np.ones(3),
    ...             scale=1 / 255)
    array([[1., 1., 1.]], dtype=float32)
  """
  out = np.array(x, dtype=np.float32, copy=True)
  # In place: CIFAR's float32 training set is 600 MB, so avoid temporaries.
  if scale != 1.0:
    out *= np.float32(scale)
  out -= np.asarray(mean, np.float32)
  out /= np.asarray(std, np.float32)
  return out


def standardized(
  name: str,
  x_train: np.ndarray,
  y_train: np.ndarray,
  x_test: np.ndarray,
  y_test: np.ndarray,
  num_classes: int,
  *,
  scale: float = 1.0,
  class_names: tuple[str, ...] = (),
) -> Dataset:
  """A :class:`Dataset` of inputs standardised with the training statistics.

  Every loader ends here, so that each standardises the same way: the
  per-channel mean and standard deviation of ``x_train * scale`` (never the
  test split's) are subtracted and divided out of both splits.

  Args:
    name: the registry name.
    x_train: raw training inputs, ``(N_train, ..., C)``.
    y_train: ``(N_train,)`` int32 labels.
    x_test: raw test inputs, ``(N_test, ..., C)``.
    y_test: ``(N_test,)`` int32 labels.
    num_classes: the number of classes.
    scale: applied to the raw inputs first, e.g. ``1 / 255`` for uint8
      pixels.
    class_names: human-readable class names, or ``()``.

  Returns:
    The dataset, its ``mean`` and ``std`` in the units of ``x * scale``.

  Example:
    >>> ds = standardized("toy", np.array([[0.0], [2.0]]), np.array([0, 1]),
    ...                   np.array([[4.0]]), np.array([1]), 2)
    >>> ds.x_train.ravel().tolist(), ds.x_test.ravel().tolist()
    ([-1.0, 1.0], [3.0])
  """
  mean, std = channel_stats(x_train)
  if scale != 1.0:
    mean, std = mean * np.float32(scale), std * np.float32(scale)
  return Dataset(
    name=name,
    x_train=standardize(x_train, mean, std, scale=scale),
    y_train=y_train,
    x_test=standardize(x_test, mean, std, scale=scale),
    y_test=y_test,
    num_classes=num_classes,
    mean=mean,
    std=std,
    class_names=class_names,
  )
