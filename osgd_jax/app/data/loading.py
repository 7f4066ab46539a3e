"""``load_dataset``: the single entry point, dispatching on the dataset name."""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable
from typing import Any

from osgd_jax.app.data.base import Dataset
from osgd_jax.app.data.cifar import load_cifar
from osgd_jax.app.data.digits import load_digits
from osgd_jax.app.data.mnist1d import load_mnist1d
from osgd_jax.app.data.synthetic import make_synthetic
from osgd_jax.app.data.text import load_text

__all__ = [
  "DATASET_ALIASES",
  "DATASET_NAMES",
  "canonical_dataset_name",
  "load_dataset",
]

# name -> (loader, whether it reads data_dir, whether it takes seed)
_LOADERS: dict[str, tuple[Callable[..., Dataset], bool, bool]] = {
  "digits": (load_digits, False, True),
  "cifar10": (functools.partial(load_cifar, name="cifar10"), True, False),
  "cifar100": (functools.partial(load_cifar, name="cifar100"), True, False),
  "mnist1d": (load_mnist1d, False, False),
  "synthetic": (make_synthetic, False, True),
  "text": (load_text, False, False),
}
#: The data sets :func:`load_dataset` loads, by their canonical names.
DATASET_NAMES: tuple[str, ...] = tuple(_LOADERS)
#: The spellings accepted besides the names themselves, each for one data
#: set. Matching is exact: a name that is neither a dataset nor an alias is
#: an error, never a guess, because the model's preset is chosen by the data
#: set.
DATASET_ALIASES: dict[str, str] = {
  "CIFAR-10": "cifar10",
  "cifar-10": "cifar10",
  "CIFAR10": "cifar10",
  "CIFAR-100": "cifar100",
  "cifar-100": "cifar100",
  "CIFAR100": "cifar100",
  "MNIST-1D": "mnist1d",
  "mnist-1d": "mnist1d",
  "MNIST1D": "mnist1d",
}


def canonical_dataset_name(name: Any) -> str:
  """The dataset ``name`` stands for: itself, or what its alias names.

  Args:
    name: one of ``DATASET_NAMES`` or of ``DATASET_ALIASES``' keys.

  Returns:
    The name in ``DATASET_NAMES``.

  Raises:
    ValueError: any other value; the message lists the valid names.

  Example:
    >>> canonical_dataset_name("CIFAR-10"), canonical_dataset_name("digits")
    ('cifar10', 'digits')
  """
  if isinstance(name, str):
    if name in _LOADERS:
      return name
    if name in DATASET_ALIASES:
      return DATASET_ALIASES[name]
  raise ValueError(
    f"unknown dataset {name!r}; choose one of: {', '.join(DATASET_NAMES)}"
    f" (or the aliases {', '.join(DATASET_ALIASES)})."
  )


def _options_of(loader: Callable[..., Dataset]) -> list[str]:
  bound = getattr(loader, "keywords", {})
  return [
    p.name
    for p in inspect.signature(loader).parameters.values()
    if p.kind is inspect.Parameter.KEYWORD_ONLY
    and p.name not in ("seed", "name", *bound)
  ]


def load_dataset(
  name: str,
  *,
  data_dir: str | os.PathLike[str] | None = None,
  seed: int = 0,
  flatten: bool = False,
  **options: Any,
) -> Dataset:
  """Loads a dataset by name into host memory, standardised with train stats.

  ==============  ==========  =================================================
  name            input       source
  ==============  ==========  =================================================
  ``digits``      8x8x1       scikit-learn's bundled digits, stratified 80/20
  ``cifar10``     32x32x3     ``cifar-10-python.tar.gz`` (or extracted) in
                              ``data_dir``
  ``cifar100``    32x32x3     ``cifar-100-python.tar.gz`` (or extracted) in
                              ``data_dir``; ``label_mode="coarse"`` for 20
                              superclasses
  ``mnist1d``     40x1        1-D digit signals from the ``mnist1d`` package's
                              generator, its fixed 4000/1000 split
  ``synthetic``   ``shape``   seeded Gaussian clusters with a ``difficulty``
  ``text``        context     bytes of ``text_file`` (default: Python standard
                              library source) as next-byte windows, the last
                              ``test_fraction`` of the text held out
  ==============  ==========  =================================================

  Args:
    name: one of ``DATASET_NAMES``, or an alias from ``DATASET_ALIASES``
      (``"CIFAR-10"``); any other spelling is an error.
    data_dir: directory holding the CIFAR archives; unused by the others.
    seed: the *data* seed: the train/test split of ``digits`` and the sample
      of ``synthetic``; CIFAR, MNIST-1D and text have fixed splits and
      ignore it.
      Keep it fixed across training seeds to compare runs on the same test
      set.
    flatten: return each example as a flat vector (for MLPs) instead of an
      ``(H, W, C)`` image or ``(length, C)`` signal.
    **options: loader-specific keyword arguments, e.g. ``test_fraction``
      (digits), ``label_mode`` (CIFAR), ``num_train``, ``num_test``,
      ``num_classes``, ``shape``, ``difficulty`` (synthetic),
      ``text_file``, ``context``, ``max_bytes`` (text).

  Returns:
    A frozen ``Dataset`` of read-only NumPy arrays.

  Raises:
    ValueError: unknown name or option.
    DatasetNotFoundError: CIFAR files missing (a ``ValueError``).
    DatasetFormatError: CIFAR files malformed (a ``ValueError``).

  Example:
    >>> ds = load_dataset("digits", flatten=True)
    >>> ds.x_train.shape, ds.num_classes
    ((1438, 64), 10)
  """
  key = canonical_dataset_name(name)
  loader, reads_dir, takes_seed = _LOADERS[key]
  allowed = _options_of(loader)
  unknown = sorted(set(options) - set(allowed))
  if unknown:
    raise ValueError(
      f"{key} does not take the option(s) {', '.join(unknown)};"
      f" it takes {', '.join(allowed) or 'none'}"
    )
  if takes_seed:
    options["seed"] = seed
  dataset = loader(data_dir, **options) if reads_dir else loader(**options)
  return dataset.flatten() if flatten else dataset
