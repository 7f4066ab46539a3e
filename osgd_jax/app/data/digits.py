"""scikit-learn's bundled 8x8 digits, with a fixed stratified split."""

from __future__ import annotations

import numpy as np

from osgd_jax.app.data.base import Dataset, standardized
from osgd_jax.app.data.splits import stratified_split

__all__ = ["load_digits"]


def load_digits(*, seed: int = 0, test_fraction: float = 0.2) -> Dataset:
  """Loads the 1797 8x8 digit images that ship inside scikit-learn.

  Pixels (0..16) are scaled to [0, 1], then standardised with the mean and
  standard deviation of all training pixels (one channel). Nothing is
  downloaded.

  Args:
    seed: seed of the stratified train/test split. Keep it fixed (the default)
      so that every run, whatever its training seed, tests on the same images.
    test_fraction: fraction of each class held out for testing.

  Returns:
    A ``Dataset`` named ``"digits"`` with images of shape ``(8, 8, 1)`` and 10
    classes (1438 train / 359 test examples with the defaults).

  Example:
    >>> ds = load_digits()
    >>> ds.x_train.shape
    (1438, 8, 8, 1)
  """
  try:
    from sklearn import datasets  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
      "the 'digits' dataset ships with scikit-learn, part of the app extra:"
      ' pip install "osgd-jax[app]"'
    ) from e
  pixels, target = datasets.load_digits(return_X_y=True)
  images = (pixels.reshape(-1, 8, 8) / 16.0)[..., None]
  labels = target.astype(np.int32)
  train, test = stratified_split(labels, test_fraction, seed)
  return standardized(
    "digits",
    images[train],
    labels[train],
    images[test],
    labels[test],
    10,
    class_names=tuple(str(d) for d in range(10)),
  )
