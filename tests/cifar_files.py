"""CIFAR files in the official format, written for the tests.

The official "python version" archives hold Python-2-style protocol-2 pickles
(byte strings as BINSTRING, NumPy 1 module names) inside
``cifar-10-batches-py/`` / ``cifar-100-python/`` and their ``.tar.gz``;
:func:`write_cifar` writes tiny ones, for the loader's tests and the
download's.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import struct
import tarfile

import numpy as np


class _Py2Pickler(pickle._Pickler):  # pylint: disable=protected-access
  """Pickles like Python 2's cPickle: every string is a byte string."""

  dispatch = dict(pickle._Pickler.dispatch)  # pylint: disable=protected-access

  def _save_py2_str(self, obj):
    raw = obj.encode("latin1") if isinstance(obj, str) else obj
    n = len(raw)
    if n < 256:
      self.write(pickle.SHORT_BINSTRING + bytes([n]) + raw)
    else:
      self.write(pickle.BINSTRING + struct.pack("<i", n) + raw)
    if raw is obj:
      self.memoize(obj)

  dispatch[bytes] = _save_py2_str
  dispatch[str] = _save_py2_str


def py2_pickle(obj) -> bytes:
  buf = io.BytesIO()
  _Py2Pickler(buf, protocol=2).dump(obj)
  # The official files were written by NumPy 1, whose module was numpy.core.
  return buf.getvalue().replace(
    b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"
  )


@dataclasses.dataclass
class CifarTree:
  """Raw contents of a generated CIFAR tree."""

  root: str
  folder: str
  archive: str
  train: np.ndarray  # uint8 (N, 3072), official row layout
  test: np.ndarray
  train_labels: dict  # label key -> int array
  test_labels: dict


def _cifar_files(variant: str, rng: np.random.Generator, n: int):
  """{file name: pickled dict} for a tiny CIFAR tree, plus raw arrays."""

  def batch(label, num_classes_by_key):
    d = {
      b"batch_label": label.encode(),
      b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
      b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }
    for key, k in num_classes_by_key.items():
      d[key.encode()] = [int(v) for v in rng.integers(0, k, n)]
    return d

  if variant == "cifar10":
    keys = {"labels": 10}
    files = {
      f"data_batch_{i}": batch(f"training batch {i} of 5", keys)
      for i in range(1, 6)
    }
    files["test_batch"] = batch("testing batch 1 of 1", keys)
    meta = (
      "batches.meta",
      {
        b"num_cases_per_batch": n,
        b"num_vis": 3072,
        b"label_names": [f"class{i}".encode() for i in range(10)],
      },
    )
    train_names, test_names = (
      [f"data_batch_{i}" for i in range(1, 6)],
      ["test_batch"],
    )
  else:
    keys = {"fine_labels": 100, "coarse_labels": 20}
    files = {
      "train": batch("training batch 1 of 1", keys),
      "test": batch("testing batch 1 of 1", keys),
    }
    meta = (
      "meta",
      {
        b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
        b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)],
      },
    )
    train_names, test_names = ["train"], ["test"]
  files[meta[0]] = meta[1]

  def cat(names, key):
    if key == "data":
      return np.concatenate([files[f][b"data"] for f in names])
    return np.concatenate([files[f][key.encode()] for f in names])

  raw = dict(
    train=cat(train_names, "data"),
    test=cat(test_names, "data"),
    train_labels={k: cat(train_names, k) for k in keys},
    test_labels={k: cat(test_names, k) for k in keys},
  )
  return files, raw


_NAMES = {
  "cifar10": ("cifar-10-batches-py", "cifar-10-python.tar.gz"),
  "cifar100": ("cifar-100-python", "cifar-100-python.tar.gz"),
}


def write_cifar(
  root: str,
  variant: str,
  *,
  seed: int = 0,
  n: int = 20,
  extracted: bool = True,
  archived: bool = True,
  edit=None,
) -> CifarTree:
  """Writes the folder and/or the archive; ``edit(files)`` may corrupt them."""
  folder_name, archive_name = _NAMES[variant]
  files, raw = _cifar_files(variant, np.random.default_rng(seed), n)
  blobs = {name: py2_pickle(d) for name, d in files.items()}
  if edit is not None:
    edit(blobs)
  os.makedirs(root, exist_ok=True)
  folder = os.path.join(root, folder_name)
  archive = os.path.join(root, archive_name)
  if extracted:
    os.makedirs(folder)
    for name, blob in blobs.items():
      with open(os.path.join(folder, name), "wb") as f:
        f.write(blob)
  if archived:
    with tarfile.open(archive, "w:gz") as tar:
      for name, blob in blobs.items():
        info = tarfile.TarInfo(f"{folder_name}/{name}")
        info.size = len(blob)
        tar.addfile(info, io.BytesIO(blob))
  return CifarTree(root=root, folder=folder, archive=archive, **raw)
