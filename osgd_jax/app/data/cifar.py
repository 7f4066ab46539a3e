"""CIFAR-10 / CIFAR-100 from the official "python version" archives.

The archives (https://www.cs.toronto.edu/~kriz/cifar.html) hold pickled dicts
written by Python 2: bytes keys, ``b"data"`` a uint8 ``(N, 3072)`` array of
row-major channel-first 3x32x32 images, and integer label lists. They are read
either straight from the ``.tar.gz`` or from its extracted folder. Reading
never downloads anything; ``download.py`` fetches the archives.

Pickles can run arbitrary code when loaded, so the unpickler here only resolves
the handful of globals that NumPy arrays need and rejects everything else.
"""

from __future__ import annotations

import codecs
import dataclasses
import os
import pickle
import posixpath
import tarfile
import zlib
from typing import IO, Any

import numpy as np

from osgd_jax.app.data.base import (
  CIFAR_URL,
  Dataset,
  DatasetFormatError,
  DatasetNotFoundError,
  standardized,
)

__all__ = ["archive_path", "find_cifar", "load_cifar"]

_IMAGE_SIZE = 3 * 32 * 32


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Where one CIFAR variant keeps its files and labels."""

  name: str
  title: str
  folder: str
  archive: str
  train: tuple[str, ...]
  test: tuple[str, ...]
  meta: str
  # label_mode -> (label key, class-names key in meta, number of classes)
  labels: dict[str, tuple[str, str, int]]

  @property
  def files(self) -> tuple[str, ...]:
    return self.train + self.test


_LAYOUTS = {
  "cifar10": _Layout(
    name="cifar10",
    title="CIFAR-10 python version",
    folder="cifar-10-batches-py",
    archive="cifar-10-python.tar.gz",
    train=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test=("test_batch",),
    meta="batches.meta",
    labels={"fine": ("labels", "label_names", 10)},
  ),
  "cifar100": _Layout(
    name="cifar100",
    title="CIFAR-100 python version",
    folder="cifar-100-python",
    archive="cifar-100-python.tar.gz",
    train=("train",),
    test=("test",),
    meta="meta",
    labels={
      "fine": ("fine_labels", "fine_label_names", 100),
      "coarse": ("coarse_labels", "coarse_label_names", 20),
    },
  ),
}


def _reconstruct_globals() -> dict[tuple[str, str], Any]:
  reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]
  scalar = np.float64(0).__reduce__()[0]
  allowed = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    # Python 3 pickles of bytes at protocol 2 go through this.
    ("_codecs", "encode"): codecs.encode,
  }
  # The official files name NumPy 1's module; NumPy 2 writes ``numpy._core``.
  for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
    allowed[(module, "_reconstruct")] = reconstruct
    allowed[(module, "scalar")] = scalar
  return allowed


class _ArrayUnpickler(pickle.Unpickler):
  """Unpickler that only builds plain containers and NumPy arrays."""

  _ALLOWED = _reconstruct_globals()

  def find_class(self, module: str, name: str) -> Any:
    try:
      return self._ALLOWED[(module, name)]
    except KeyError:
      raise pickle.UnpicklingError(
        f"refusing to load global {module}.{name}; a CIFAR pickle only"
        " contains NumPy arrays, lists, bytes and numbers"
      ) from None


def _format_error(
  layout: _Layout, where: str, problem: str
) -> DatasetFormatError:
  return DatasetFormatError(
    f"{layout.name}: {where} {problem}. Expected the unmodified"
    f" '{layout.title}' files from {CIFAR_URL}; re-download {layout.archive}"
    " if it is corrupt."
  )


def _unpickle(layout: _Layout, f: IO[bytes], where: str) -> dict[str, Any]:
  try:
    obj = _ArrayUnpickler(f, encoding="bytes").load()
  # Corrupt pickles raise almost anything (EOFError, KeyError, ValueError, ...).
  except Exception as e:  # pylint: disable=broad-except
    raise _format_error(
      layout, where, f"is not a readable pickle ({type(e).__name__}: {e})"
    ) from None
  if not isinstance(obj, dict):
    raise _format_error(
      layout, where, f"holds a {type(obj).__name__}, not a dict"
    )
  return {
    k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()
  }


def _images_and_labels(
  layout: _Layout,
  batch: dict[str, Any],
  where: str,
  label_key: str,
  num_classes: int,
):
  """Validates one batch dict; returns NHWC uint8 images and int32 labels."""
  data = batch.get("data")
  if not isinstance(data, np.ndarray):
    raise _format_error(
      layout, where, f"has no array under b'data' (keys: {sorted(batch)})"
    )
  if data.ndim != 2 or data.shape[1] != _IMAGE_SIZE:
    raise _format_error(
      layout,
      where,
      f"has b'data' of shape {data.shape}; expected (N, {_IMAGE_SIZE})",
    )
  if data.dtype != np.uint8:
    raise _format_error(
      layout, where, f"has b'data' of dtype {data.dtype}; expected uint8"
    )
  if label_key not in batch:
    raise _format_error(
      layout, where, f"has no b'{label_key}' entry (keys: {sorted(batch)})"
    )
  try:
    labels = np.asarray(batch[label_key])
  except Exception:  # pylint: disable=broad-except
    labels = np.asarray(None)
  if labels.size == 0:
    labels = labels.astype(np.int32)
  if labels.shape != data.shape[:1] or not np.issubdtype(
    labels.dtype, np.integer
  ):
    raise _format_error(
      layout,
      where,
      f"has b'{label_key}' of shape {labels.shape} and dtype"
      f" {labels.dtype}; expected {data.shape[0]} integer labels",
    )
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise _format_error(layout, where, f"has labels outside [0, {num_classes})")
  images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return images, labels.astype(np.int32)


def _not_found(
  layout: _Layout, root: str | None, problem: str
) -> DatasetNotFoundError:
  where = "Expected" if root is None else f"Looked in {root!r} for"
  return DatasetNotFoundError(
    f"{layout.name}: {problem}. {where} the folder {layout.folder}/"
    f" (holding {', '.join(layout.files)} and optionally {layout.meta}) or"
    f" the archive {layout.archive}. Download the '{layout.title}' from"
    f" {CIFAR_URL} and pass the directory holding it (extracted or not) as"
    " data_dir, or let download_cifar (osgd-train --download) fetch it."
  )


# Each reader returns {file name: (where it was read, unpickled dict)}.
_Contents = dict[str, tuple[str, dict[str, Any]]]


def _read_folder(layout: _Layout, folder: str) -> _Contents:
  missing = [
    n for n in layout.files if not os.path.isfile(os.path.join(folder, n))
  ]
  if missing:
    raise _not_found(
      layout, folder, f"missing {', '.join(missing)} in {folder}"
    )
  contents = {}
  for name in layout.files + (layout.meta,):
    path = os.path.join(folder, name)
    if os.path.isfile(path):
      with open(path, "rb") as f:
        contents[name] = (path, _unpickle(layout, f, path))
  return contents


def _read_archive(layout: _Layout, archive: str) -> _Contents:
  wanted = set(layout.files + (layout.meta,))
  contents = {}
  try:
    # One sequential pass: seeking backwards in a gzip stream re-decompresses.
    with tarfile.open(archive, "r:*") as tar:
      for member in tar:
        name = posixpath.basename(member.name)
        if member.isfile() and name in wanted and name not in contents:
          where = f"{archive}:{member.name}"
          handle = tar.extractfile(member)
          assert handle is not None  # a regular file's member has one
          contents[name] = (where, _unpickle(layout, handle, where))
  except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
    raise _format_error(
      layout,
      archive,
      f"is not a readable .tar.gz archive ({type(e).__name__}: {e})",
    ) from None
  missing = [n for n in layout.files if n not in contents]
  if missing:
    raise _format_error(
      layout, archive, f"lacks the members {', '.join(missing)}"
    )
  return contents


def _layout(name: str) -> _Layout:
  if name not in _LAYOUTS:
    raise ValueError(
      f"unknown CIFAR variant {name!r}; use one of {sorted(_LAYOUTS)}"
    )
  return _LAYOUTS[name]


def _locate(layout: _Layout, root: str) -> str | None:
  folder = os.path.join(root, layout.folder)
  archive = os.path.join(root, layout.archive)
  if os.path.isdir(folder):
    return folder
  if os.path.isfile(archive):
    return archive
  # data_dir may itself be the extracted folder.
  if os.path.isfile(os.path.join(root, layout.files[0])):
    return root
  return None


def archive_path(data_dir: str | os.PathLike[str], name: str) -> str:
  """Where the official archive of ``name`` belongs in ``data_dir``.

  Args:
    data_dir: a directory (``~`` is expanded).
    name: ``"cifar10"`` or ``"cifar100"``.

  Returns:
    The path of ``cifar-10-python.tar.gz`` or ``cifar-100-python.tar.gz``
    in ``data_dir``, whether or not it exists.

  Raises:
    ValueError: an unknown ``name``.

  Example:
    >>> archive_path("/data", "cifar100")
    '/data/cifar-100-python.tar.gz'
  """
  root = os.fspath(os.path.expanduser(data_dir))
  return os.path.join(root, _layout(name).archive)


def find_cifar(data_dir: str | os.PathLike[str], name: str) -> str | None:
  """The files :func:`load_cifar` reads for ``name`` in ``data_dir``, if any.

  Args:
    data_dir: a directory (``~`` is expanded).
    name: ``"cifar10"`` or ``"cifar100"``.

  Returns:
    The extracted folder, else the archive, else ``data_dir`` itself when it
    holds the batch files, as :func:`load_cifar` looks for them; ``None``
    when there is none of these. Whether they are complete and valid is
    only known by reading them.

  Raises:
    ValueError: an unknown ``name``.

  Example:
    >>> find_cifar("/nonexistent", "cifar10") is None
    True
  """
  return _locate(_layout(name), os.fspath(os.path.expanduser(data_dir)))


def _read(
  layout: _Layout, data_dir: str | os.PathLike[str] | None
) -> _Contents:
  if data_dir is None:
    raise _not_found(layout, None, "no data_dir was given")
  root = os.fspath(os.path.expanduser(data_dir))
  if not os.path.isdir(root):
    raise _not_found(layout, root, f"the directory {root!r} does not exist")
  found = _locate(layout, root)
  if found is None:
    raise _not_found(layout, root, "found neither the folder nor the archive")
  if found == os.path.join(root, layout.archive):
    return _read_archive(layout, found)
  return _read_folder(layout, found)


def _class_names(
  layout: _Layout,
  contents: _Contents,
  names_key: str,
  num_classes: int,
  label_mode: str,
) -> tuple[str, ...]:
  if layout.meta not in contents:
    return ()
  where, meta = contents[layout.meta]
  names = meta.get(names_key)
  if not isinstance(names, list) or len(names) != num_classes:
    raise _format_error(
      layout,
      where,
      f"has no list of {num_classes}"
      f" {label_mode} class names under b'{names_key}'",
    )
  return tuple(
    n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names
  )


def load_cifar(
  data_dir: str | os.PathLike[str] | None,
  *,
  name: str = "cifar10",
  label_mode: str = "fine",
) -> Dataset:
  """Loads CIFAR-10 or CIFAR-100 from the official python-version files.

  ``data_dir`` is searched, in order, for the extracted folder
  (``cifar-10-batches-py/`` or ``cifar-100-python/``), the untouched archive
  (``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``, read directly
  without extracting) and finally for the batch files in ``data_dir`` itself.
  The meta file with class names is optional.

  Images become NHWC float32, scaled to [0, 1] and standardised per channel
  with the mean and standard deviation of the *training* set, computed on load
  (exactly, in float64). For the official CIFAR-10 files these are the
  well-known mean (0.4914, 0.4822, 0.4465) and std (0.2470, 0.2435, 0.2616);
  for CIFAR-100, mean (0.5071, 0.4865, 0.4409), std (0.2673, 0.2564, 0.2762).

  Args:
    data_dir: directory holding the archive or its extracted folder.
    name: ``"cifar10"`` or ``"cifar100"``.
    label_mode: CIFAR-100 only: ``"fine"`` (100 classes) or ``"coarse"``
      (20 superclasses).

  Returns:
    A ``Dataset`` with ``(32, 32, 3)`` images.

  Raises:
    DatasetNotFoundError: ``data_dir`` or the expected files are missing.
    DatasetFormatError: a file exists but is not a valid CIFAR archive/pickle.

  Example:
    >>> ds = load_cifar("~/data", name="cifar10")  # doctest: +SKIP
    >>> ds.x_train.shape  # doctest: +SKIP
    (50000, 32, 32, 3)
  """
  layout = _layout(name)
  if label_mode not in layout.labels:
    raise ValueError(
      f"{name} has no label_mode {label_mode!r}; use one of"
      f" {sorted(layout.labels)}"
    )
  label_key, names_key, num_classes = layout.labels[label_mode]
  contents = _read(layout, data_dir)

  def split(files):
    parts = [
      _images_and_labels(
        layout, contents[f][1], contents[f][0], label_key, num_classes
      )
      for f in files
    ]
    return (
      np.concatenate([p[0] for p in parts]),
      np.concatenate([p[1] for p in parts]),
    )

  train_images, y_train = split(layout.train)
  test_images, y_test = split(layout.test)
  if train_images.shape[0] == 0:
    raise _format_error(
      layout, contents[layout.train[0]][0], "holds no training images"
    )
  return standardized(
    name,
    train_images,
    y_train,
    test_images,
    y_test,
    num_classes,
    scale=1 / 255,
    class_names=_class_names(
      layout, contents, names_key, num_classes, label_mode
    ),
  )
