"""Datasets, deterministic batch streams and on-device augmentation.

``load_dataset(name)`` returns a ``Dataset`` of standardised NumPy arrays in
host memory: scikit-learn's ``digits``, ``cifar10``/``cifar100`` from the
official archives in a local ``data_dir``, the 1-D signals of ``mnist1d``
from the ``mnist1d`` package's generator, a seeded ``synthetic`` task, or
``text``: bytes of a text file (by default, Python standard-library source)
as next-byte windows.
``download_cifar`` fetches the CIFAR archives into that directory, checked
against their published MD5. ``hold_out_validation`` splits a validation set
off the training set. ``iterate_batches`` streams an epoch in an order fixed
by ``(seed, epoch)``, and ``augment`` (random crop with padding and flip)
runs inside a jitted step with keys from ``augment_key(key, epoch, step)``.
"""

from osgd_jax.app.data.augment import augment, random_crop, random_flip
from osgd_jax.app.data.base import (
  CIFAR_URL,
  Dataset,
  DatasetFormatError,
  DatasetNotFoundError,
)
from osgd_jax.app.data.batching import (
  augment_key,
  batch_indices,
  epoch_permutation,
  iterate_batches,
  num_batches,
)
from osgd_jax.app.data.cifar import load_cifar
from osgd_jax.app.data.digits import load_digits
from osgd_jax.app.data.download import (
  CIFAR_ARCHIVES,
  CifarArchive,
  DownloadError,
  download_cifar,
)
from osgd_jax.app.data.loading import (
  DATASET_ALIASES,
  DATASET_NAMES,
  canonical_dataset_name,
  load_dataset,
)
from osgd_jax.app.data.mnist1d import load_mnist1d
from osgd_jax.app.data.splits import (
  VALIDATION_SPLIT_SEED,
  hold_out_validation,
  stratified_split,
)
from osgd_jax.app.data.synthetic import make_synthetic
from osgd_jax.app.data.text import (
  STDLIB_MODULES,
  VOCAB_SIZE,
  default_corpus,
  load_text,
  text_windows,
)

__all__ = [
  "CIFAR_ARCHIVES",
  "CIFAR_URL",
  "CifarArchive",
  "DATASET_ALIASES",
  "DATASET_NAMES",
  "Dataset",
  "DatasetFormatError",
  "DatasetNotFoundError",
  "DownloadError",
  "STDLIB_MODULES",
  "VALIDATION_SPLIT_SEED",
  "VOCAB_SIZE",
  "augment",
  "augment_key",
  "batch_indices",
  "canonical_dataset_name",
  "default_corpus",
  "download_cifar",
  "epoch_permutation",
  "hold_out_validation",
  "iterate_batches",
  "load_cifar",
  "load_dataset",
  "load_digits",
  "load_mnist1d",
  "load_text",
  "make_synthetic",
  "num_batches",
  "random_crop",
  "random_flip",
  "stratified_split",
  "text_windows",
]
