"""Tests for osgd_jax.app.data: loaders, batch streams and augmentation.

The CIFAR tests write tiny archives in the official layout
(``tests/cifar_files.py``).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import sys

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cifar_files import py2_pickle, write_cifar

from osgd_jax.app import data
from osgd_jax.app.data import (
  Dataset,
  DatasetFormatError,
  DatasetNotFoundError,
  load_dataset,
)
from osgd_jax.app.data import mnist1d as mnist1d_loader

_SETTINGS = hypothesis.settings(max_examples=30, deadline=None)


@pytest.fixture(scope="module")
def cifar10_only_folder(tmp_path_factory):
  return write_cifar(
    str(tmp_path_factory.mktemp("c10f")), "cifar10", archived=False
  )


@pytest.fixture(scope="module")
def cifar10_only_archive(tmp_path_factory):
  return write_cifar(
    str(tmp_path_factory.mktemp("c10a")), "cifar10", extracted=False
  )


@pytest.fixture(scope="module")
def cifar100_archive(tmp_path_factory):
  return write_cifar(
    str(tmp_path_factory.mktemp("c100")),
    "cifar100",
    seed=1,
    n=30,
    extracted=False,
  )


def _unstandardize(ds: Dataset, x: np.ndarray) -> np.ndarray:
  return x * ds.std + ds.mean


# ---------------------------------------------------------------------------
# CIFAR loading.


@pytest.mark.parametrize("source", ["folder", "archive", "folder_itself"])
def test_cifar10_round_trips_pixels_and_labels(
  source, cifar10_only_folder, cifar10_only_archive
):
  written = cifar10_only_archive if source == "archive" else cifar10_only_folder
  data_dir = written.folder if source == "folder_itself" else written.root
  ds = load_dataset("cifar10", data_dir=data_dir)

  assert ds.name == "cifar10" and ds.num_classes == 10
  assert ds.x_train.shape == (100, 32, 32, 3)
  assert ds.x_test.shape == (20, 32, 32, 3)
  assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
  np.testing.assert_array_equal(ds.y_train, written.train_labels["labels"])
  np.testing.assert_array_equal(ds.y_test, written.test_labels["labels"])
  # Official rows are channel-first, row-major: R plane, G plane, B plane.
  img, row, col, ch = 57, 3, 30, 2
  expected = written.train[img, ch * 1024 + row * 32 + col] / 255
  np.testing.assert_allclose(
    _unstandardize(ds, ds.x_train[img, row, col])[ch], expected, atol=1e-6
  )
  nchw = written.test.reshape(-1, 3, 32, 32)
  np.testing.assert_allclose(
    _unstandardize(ds, ds.x_test), nchw.transpose(0, 2, 3, 1) / 255, atol=1e-6
  )
  assert ds.class_names == tuple(f"class{i}" for i in range(10))


def test_cifar_folder_and_archive_give_identical_datasets(tmp_path):
  written = write_cifar(str(tmp_path / "both"), "cifar10", seed=5)
  from_dir = load_dataset("cifar10", data_dir=written.root)
  os.rename(written.folder, str(tmp_path / "elsewhere"))
  from_tar = load_dataset("cifar10", data_dir=written.root)
  for field in ("x_train", "y_train", "x_test", "y_test", "mean", "std"):
    np.testing.assert_array_equal(
      getattr(from_dir, field), getattr(from_tar, field)
    )


def test_cifar_normalisation_uses_training_statistics(cifar10_only_archive):
  written = cifar10_only_archive
  ds = load_dataset("cifar10", data_dir=written.root)
  train = written.train.reshape(-1, 3, 1024) / 255
  np.testing.assert_allclose(ds.mean, train.mean(axis=(0, 2)), rtol=1e-6)
  np.testing.assert_allclose(ds.std, train.std(axis=(0, 2)), rtol=1e-6)
  np.testing.assert_allclose(ds.x_train.mean(axis=(0, 1, 2)), 0, atol=1e-5)
  np.testing.assert_allclose(ds.x_train.std(axis=(0, 1, 2)), 1, atol=1e-5)
  # The test set is standardised with the train stats, not its own.
  test = written.test.reshape(-1, 3, 1024) / 255
  np.testing.assert_allclose(
    ds.x_test.mean(axis=(0, 1, 2)),
    (test.mean(axis=(0, 2)) - ds.mean) / ds.std,
    atol=1e-5,
  )


def test_cifar100_fine_and_coarse_labels(cifar100_archive):
  written = cifar100_archive
  fine = load_dataset("cifar100", data_dir=written.root)
  coarse = load_dataset("CIFAR-100", data_dir=written.root, label_mode="coarse")
  assert fine.num_classes == 100 and coarse.num_classes == 20
  np.testing.assert_array_equal(
    fine.y_train, written.train_labels["fine_labels"]
  )
  np.testing.assert_array_equal(
    coarse.y_test, written.test_labels["coarse_labels"]
  )
  np.testing.assert_array_equal(fine.x_train, coarse.x_train)
  assert fine.x_train.shape == (30, 32, 32, 3)
  assert coarse.class_names[:2] == ("coarse0", "coarse1")
  with pytest.raises(ValueError, match="label_mode"):
    load_dataset("cifar100", data_dir=written.root, label_mode="medium")


def test_cifar_reads_pickles_written_by_python3_numpy2(tmp_path):
  def repickle(blobs):
    for name, blob in blobs.items():
      blobs[name] = pickle.dumps(
        pickle.loads(blob, encoding="bytes"), protocol=2
      )

  written = write_cifar(
    str(tmp_path / "py3"), "cifar10", edit=repickle, archived=False
  )
  ds = load_dataset("cifar10", data_dir=written.root)
  np.testing.assert_array_equal(ds.y_train, written.train_labels["labels"])


def test_meta_file_is_optional(tmp_path):
  written = write_cifar(
    str(tmp_path / "nometa"),
    "cifar10",
    archived=False,
    edit=lambda blobs: blobs.pop("batches.meta"),
  )
  ds = load_dataset("cifar10", data_dir=written.root)
  assert ds.class_names == () and ds.num_train == 100


# ---------------------------------------------------------------------------
# CIFAR error paths: clear ValueErrors, no chained tracebacks.


def _raises(error, data_dir, name="cifar10", **kwargs) -> str:
  with pytest.raises(error) as info:
    load_dataset(name, data_dir=data_dir, **kwargs)
  assert isinstance(info.value, ValueError)
  # No chained pickle/tarfile traceback behind the message.
  error = info.value
  assert error.__cause__ is None
  assert error.__context__ is None or error.__suppress_context__
  return str(info.value)


def test_missing_directory_names_directory_files_and_url(tmp_path):
  missing = str(tmp_path / "nope")
  msg = _raises(DatasetNotFoundError, missing)
  for text in (
    missing,
    "cifar-10-python.tar.gz",
    "cifar-10-batches-py",
    "data_batch_1",
    "test_batch",
    data.CIFAR_URL,
  ):
    assert text in msg


def test_no_data_dir_and_empty_directory(tmp_path):
  assert "data_dir" in _raises(DatasetNotFoundError, None, "cifar100")
  msg = _raises(DatasetNotFoundError, str(tmp_path), "cifar100")
  assert "cifar-100-python.tar.gz" in msg and str(tmp_path) in msg
  assert "cifar-100-python" in msg and data.CIFAR_URL in msg


def test_missing_batch_file_is_named(tmp_path):
  written = write_cifar(
    str(tmp_path / "partial"),
    "cifar10",
    archived=False,
    edit=lambda blobs: blobs.pop("data_batch_3"),
  )
  msg = _raises(DatasetNotFoundError, written.root)
  assert "data_batch_3" in msg and written.folder in msg


def test_archive_missing_a_member(tmp_path):
  written = write_cifar(
    str(tmp_path / "short"),
    "cifar10",
    extracted=False,
    edit=lambda blobs: blobs.pop("test_batch"),
  )
  msg = _raises(DatasetFormatError, written.root)
  assert "test_batch" in msg and written.archive in msg


@pytest.mark.parametrize("corruption", ["truncated", "garbage", "empty"])
def test_corrupt_pickle(tmp_path, corruption):
  def corrupt(blobs):
    blob = blobs["data_batch_2"]
    blobs["data_batch_2"] = {
      "truncated": blob[: len(blob) // 2],
      "garbage": b"\x80\x02not a pickle at all",
      "empty": b"",
    }[corruption]

  written = write_cifar(str(tmp_path / "bad"), "cifar10", edit=corrupt)
  msg = _raises(DatasetFormatError, written.root)
  assert "data_batch_2" in msg and "pickle" in msg and data.CIFAR_URL in msg
  os.rename(written.folder, str(tmp_path / "moved"))  # now read the archive
  msg = _raises(DatasetFormatError, written.root)
  assert "data_batch_2" in msg and written.archive in msg


@pytest.mark.parametrize(
  "problem, expected",
  [
    (lambda d: d.update({b"data": d[b"data"][:, :3000]}), "(N, 3072)"),
    (lambda d: d.update({b"data": d[b"data"].astype(np.float32)}), "uint8"),
    (lambda d: d.update({b"labels": d[b"labels"][:-1]}), "labels"),
    (lambda d: d.update({b"labels": [10] * len(d[b"labels"])}), "outside"),
    (lambda d: d.pop(b"data"), "b'data'"),
    (lambda d: d.pop(b"labels"), "b'labels'"),
  ],
)
def test_wrong_contents(tmp_path, problem, expected):
  def edit(blobs):
    batch = pickle.loads(blobs["test_batch"], encoding="bytes")
    problem(batch)
    blobs["test_batch"] = py2_pickle(batch)

  written = write_cifar(
    str(tmp_path / "wrong"), "cifar10", edit=edit, archived=False
  )
  msg = _raises(DatasetFormatError, written.root)
  assert expected in msg and "test_batch" in msg


def test_non_dict_pickle_and_bad_meta(tmp_path):
  written = write_cifar(
    str(tmp_path / "list"),
    "cifar10",
    archived=False,
    edit=lambda blobs: blobs.update(data_batch_1=py2_pickle([1, 2])),
  )
  assert "not a dict" in _raises(DatasetFormatError, written.root)
  written = write_cifar(
    str(tmp_path / "meta"),
    "cifar10",
    archived=False,
    edit=lambda blobs: blobs.update({"batches.meta": py2_pickle({})}),
  )
  assert "batches.meta" in _raises(DatasetFormatError, written.root)


def test_corrupt_archive(tmp_path):
  root = tmp_path / "junk"
  root.mkdir()
  (root / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8bthis is no gzip")
  msg = _raises(DatasetFormatError, str(root))
  assert "cifar-10-python.tar.gz" in msg and "archive" in msg
  written = write_cifar(str(tmp_path / "cut"), "cifar10", extracted=False)
  with open(written.archive, "rb") as f:
    blob = f.read()
  with open(written.archive, "wb") as f:
    f.write(blob[: len(blob) // 2])
  assert written.archive in _raises(DatasetFormatError, written.root)


class _Exploit:
  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return (os.mkdir, (self.path,))


def test_pickle_cannot_run_code(tmp_path):
  sentinel = str(tmp_path / "pwned")
  written = write_cifar(
    str(tmp_path / "evil"),
    "cifar10",
    archived=False,
    edit=lambda blobs: blobs.update(
      data_batch_1=pickle.dumps({b"data": _Exploit(sentinel)}, 2)
    ),
  )
  msg = _raises(DatasetFormatError, written.root)
  assert "mkdir" in msg and "data_batch_1" in msg
  assert not os.path.exists(sentinel)


# ---------------------------------------------------------------------------
# digits, synthetic and load_dataset.


@pytest.fixture(scope="module")
def digits():
  return load_dataset("digits")


def test_digits_split_is_fixed_stratified_and_round_trips(digits):
  from sklearn import datasets  # pylint: disable=g-import-not-at-top

  bunch = datasets.load_digits()
  train, test = data.stratified_split(bunch.target, 0.2, seed=0)
  assert digits.x_train.shape == (1438, 8, 8, 1)
  assert digits.x_test.shape == (359, 8, 8, 1)
  np.testing.assert_array_equal(
    np.sort(np.concatenate([train, test])), np.arange(1797)
  )
  # Pinned: the split must never change between runs or library versions.
  np.testing.assert_array_equal(test[:6], [5, 9, 12, 14, 16, 17])
  assert int(test.sum()) == 324981
  class_sizes = np.bincount(bunch.target)
  assert np.all(np.abs(np.bincount(digits.y_test) - 0.2 * class_sizes) <= 0.5)
  np.testing.assert_array_equal(digits.y_test, bunch.target[test])
  np.testing.assert_allclose(
    _unstandardize(digits, digits.x_test[..., 0]),
    bunch.images[test] / 16,
    atol=1e-6,
  )
  pixels = bunch.images[train] / 16
  np.testing.assert_allclose(digits.mean, [pixels.mean()], rtol=1e-6)
  np.testing.assert_allclose(digits.std, [pixels.std()], rtol=1e-6)


def test_digits_flatten_and_seed(digits):
  flat = load_dataset("digits", flatten=True)
  assert flat.x_train.shape == (1438, 64) and flat.input_shape == (64,)
  np.testing.assert_array_equal(flat.x_train, digits.x_train.reshape(-1, 64))
  other = load_dataset("digits", seed=1)
  assert not np.array_equal(other.y_test, digits.y_test)
  np.testing.assert_array_equal(load_dataset("digits").x_test, digits.x_test)


def test_digits_without_scikit_learn_names_the_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, "sklearn", None)
  with pytest.raises(ImportError, match=r'scikit-learn.*"osgd-jax\[app\]"'):
    load_dataset("digits")


def test_dataset_is_frozen_and_read_only(digits):
  with pytest.raises(dataclasses.FrozenInstanceError):
    digits.num_classes = 3
  with pytest.raises(ValueError, match="read-only"):
    digits.x_train[0, 0, 0, 0] = 1.0
  assert digits.input_shape == (8, 8, 1) and digits.num_test == 359


def _generate_uncached():
  """MNIST-1D's generation, bypassing the in-process cache of its arrays."""
  return mnist1d_loader._generate.__wrapped__()  # pylint: disable=protected-access


@pytest.fixture(scope="module")
def mnist1d():
  return load_dataset("mnist1d")


def test_mnist1d_shapes_labels_and_pinned_split(mnist1d):
  assert mnist1d.x_train.shape == (4000, 40, 1)
  assert mnist1d.x_test.shape == (1000, 40, 1)
  assert mnist1d.x_train.dtype == mnist1d.x_test.dtype == np.float32
  assert mnist1d.y_train.dtype == mnist1d.y_test.dtype == np.int32
  assert mnist1d.num_classes == 10 and mnist1d.mean.shape == (1,)
  for labels in (mnist1d.y_train, mnist1d.y_test):
    assert np.all(np.bincount(labels, minlength=10) > 80)
    assert labels.min() == 0 and labels.max() == 9
  # Pinned: the generator's seed is its own default argument, so the data
  # must never change between runs, machines or versions.
  np.testing.assert_array_equal(
    mnist1d.y_train[:10], [2, 6, 4, 5, 6, 6, 6, 0, 3, 1]
  )
  np.testing.assert_array_equal(
    mnist1d.y_test[:10], [2, 6, 3, 9, 4, 3, 1, 9, 5, 2]
  )
  np.testing.assert_allclose(mnist1d.mean, [-3.2367e-4], atol=1e-8)
  np.testing.assert_allclose(mnist1d.std, [0.997648], rtol=1e-6)
  # Loading again (as osgd-compare does per run) and by an alias: the same.
  again = load_dataset("MNIST-1D", seed=5)  # the split ignores the seed
  assert again.name == "mnist1d"
  np.testing.assert_array_equal(again.x_train, mnist1d.x_train)
  np.testing.assert_array_equal(again.y_test, mnist1d.y_test)
  flat = load_dataset("mnist-1d", flatten=True)
  assert flat.input_shape == (40,)


def test_mnist1d_is_the_packages_split_standardised_on_training_statistics(
  mnist1d,
):
  import mnist1d.data as package  # pylint: disable=g-import-not-at-top

  state = np.random.get_state()  # make_dataset seeds NumPy's global stream
  try:
    raw = package.make_dataset(package.get_dataset_args())
  finally:
    np.random.set_state(state)
  np.testing.assert_array_equal(mnist1d.y_train, raw["y"])
  np.testing.assert_array_equal(mnist1d.y_test, raw["y_test"])
  mean, std = raw["x"].mean(), raw["x"].std()  # all training samples
  np.testing.assert_allclose(mnist1d.mean, [mean], rtol=1e-5)
  np.testing.assert_allclose(mnist1d.std, [std], rtol=1e-6)
  np.testing.assert_allclose(
    mnist1d.x_train[..., 0], (raw["x"] - mean) / std, atol=1e-5
  )
  np.testing.assert_allclose(
    mnist1d.x_test[..., 0], (raw["x_test"] - mean) / std, atol=1e-5
  )


def test_mnist1d_generation_leaves_the_global_random_streams(monkeypatch):
  import random  # pylint: disable=g-import-not-at-top

  import mnist1d.data  # pylint: disable=g-import-not-at-top

  def reseeding(args):  # as the real generator does, without its seconds
    np.random.seed(args.seed)
    random.seed(args.seed)
    return {
      "x": np.zeros((2, 40)),
      "y": np.arange(2),
      "x_test": np.ones((1, 40)),
      "y_test": np.arange(1),
    }

  monkeypatch.setattr(mnist1d.data, "make_dataset", reseeding)
  np.random.seed(123)
  random.seed(123)
  expected = np.random.random(), random.random()
  np.random.seed(123)
  random.seed(123)
  x_train, *_ = _generate_uncached()
  assert x_train.shape == (2, 40) and not x_train.flags.writeable
  assert (np.random.random(), random.random()) == expected


def test_mnist1d_without_the_package_names_the_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, "mnist1d", None)
  monkeypatch.setitem(sys.modules, "mnist1d.data", None)
  # Uncached: the data set may already be in memory in this process.
  with pytest.raises(ImportError, match=r'mnist1d package.*"osgd-jax\[app\]"'):
    _generate_uncached()


def test_load_dataset_rejects_unknown_names_and_options():
  with pytest.raises(ValueError) as info:
    load_dataset("mnist")
  for name in ("digits", "cifar10", "cifar100", "mnist1d", "synthetic"):
    assert name in str(info.value)
  with pytest.raises(ValueError, match="difficulty"):
    load_dataset("synthetic", difficuly=0.3)


def _nearest_centroid_accuracy(ds: Dataset) -> float:
  x_train = ds.x_train.reshape(ds.num_train, -1)
  x_test = ds.x_test.reshape(ds.num_test, -1)
  centroids = np.stack(
    [x_train[ds.y_train == c].mean(0) for c in range(ds.num_classes)]
  )
  dist = ((x_test[:, None, :] - centroids[None]) ** 2).sum(-1)
  return float((dist.argmin(1) == ds.y_test).mean())


def test_synthetic_difficulty_controls_separability():
  acc = [
    _nearest_centroid_accuracy(
      load_dataset("synthetic", num_train=1000, num_test=1000, difficulty=d)
    )
    for d in (0.1, 0.5, 1.5)
  ]
  assert acc[0] > 0.99
  assert acc[0] > acc[1] + 0.05 and acc[1] > acc[2] + 0.2
  assert acc[2] > 0.15  # still above chance (0.1)


def test_synthetic_is_seeded_shaped_and_balanced():
  kwargs = dict(num_train=60, num_test=30, num_classes=3, shape=(4, 4, 2))
  a = load_dataset("synthetic", seed=7, **kwargs)
  b = load_dataset("synthetic", seed=7, **kwargs)
  c = load_dataset("synthetic", seed=8, **kwargs)
  np.testing.assert_array_equal(a.x_train, b.x_train)
  assert not np.allclose(a.x_train, c.x_train)
  assert a.x_train.shape == (60, 4, 4, 2) and a.mean.shape == (2,)
  np.testing.assert_array_equal(np.bincount(a.y_train), [20, 20, 20])
  more_test = load_dataset("synthetic", seed=7, **{**kwargs, "num_test": 90})
  np.testing.assert_array_equal(more_test.x_train, a.x_train)
  flat = load_dataset("synthetic", seed=7, flatten=True, **kwargs)
  assert flat.x_test.shape == (30, 32)


# ---------------------------------------------------------------------------
# Batch streams.


def _stream(n, bs, **kwargs):
  return list(data.batch_indices(n, bs, **kwargs))


def test_epoch_order_depends_only_on_seed_and_epoch():
  np.testing.assert_array_equal(
    data.epoch_permutation(3, 5, 100),
    np.random.default_rng([3, 5]).permutation(100),
  )
  first = [data.epoch_permutation(0, e, 50) for e in range(3)]
  again = [data.epoch_permutation(0, e, 50) for e in range(3)]
  for x, y in zip(first, again, strict=True):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(first[0], first[1])
  assert not np.array_equal(first[0], data.epoch_permutation(1, 0, 50))


@_SETTINGS
@hypothesis.given(
  n=st.integers(0, 60),
  bs=st.integers(1, 16),
  drop_last=st.booleans(),
  seed=st.integers(0, 2**32 - 1),
  epoch=st.integers(0, 1000),
)
def test_batches_cover_the_epoch_order(n, bs, drop_last, seed, epoch):
  batches = _stream(n, bs, seed=seed, epoch=epoch, drop_last=drop_last)
  assert len(batches) == data.num_batches(n, bs, drop_last=drop_last)
  order = data.epoch_permutation(seed, epoch, n)
  flat = np.concatenate(batches) if batches else np.zeros(0, int)
  np.testing.assert_array_equal(flat, order[: len(flat)])
  assert all(len(b) == bs for b in (batches if drop_last else batches[:-1]))
  assert len(flat) == (n // bs * bs if drop_last else n)


@_SETTINGS
@hypothesis.given(
  n=st.integers(0, 60),
  bs=st.integers(1, 16),
  drop_last=st.booleans(),
  start=st.integers(0, 61),
  shuffle=st.booleans(),
)
def test_start_step_reproduces_the_tail(n, bs, drop_last, start, shuffle):
  kwargs = dict(seed=4, epoch=2, drop_last=drop_last, shuffle=shuffle)
  full = _stream(n, bs, **kwargs)
  start = min(start, len(full))
  tail = _stream(n, bs, start_step=start, **kwargs)
  assert len(tail) == len(full) - start
  for a, b in zip(tail, full[start:], strict=True):
    np.testing.assert_array_equal(a, b)


@_SETTINGS
@hypothesis.given(
  n=st.integers(0, 70),
  per_process=st.integers(1, 6),
  count=st.sampled_from([1, 2, 4]),
  drop_last=st.booleans(),
)
def test_process_shards_partition_every_global_batch(
  n, per_process, count, drop_last
):
  bs = per_process * count
  kwargs = dict(seed=1, epoch=3, drop_last=drop_last)
  shards = [
    _stream(n, bs, process_index=p, process_count=count, **kwargs)
    for p in range(count)
  ]
  for step, global_batch in enumerate(_stream(n, bs, **kwargs)):
    parts = [s[step] for s in shards]
    np.testing.assert_array_equal(np.concatenate(parts), global_batch)
    if len(global_batch) == bs:
      assert all(len(p) == per_process for p in parts)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_unshuffled_order_and_iterate_batches_copies_only_batches():
  x = np.arange(30, dtype=np.float32).reshape(10, 3)
  y = np.arange(10, dtype=np.int32)
  batches = list(
    data.iterate_batches(
      x, y, 4, seed=0, epoch=0, shuffle=False, drop_last=False
    )
  )
  assert [len(b[1]) for b in batches] == [4, 4, 2]
  np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), y)
  shuffled = list(data.iterate_batches(x, y, 4, seed=9, epoch=1))
  for xb, yb in shuffled:
    np.testing.assert_array_equal(xb, x[yb])
    assert not np.shares_memory(xb, x)
  resumed = list(data.iterate_batches(x, y, 4, seed=9, epoch=1, start_step=1))
  np.testing.assert_array_equal(resumed[0][0], shuffled[1][0])


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(batch_size=6, process_count=4), "multiple of process_count"),
    (dict(start_step=4), "start_step"),
    (dict(process_index=2, process_count=2), "process_index"),
    (dict(seed=-1), "seed"),
    (dict(batch_size=0), "batch_size"),
  ],
)
def test_batch_stream_errors_are_raised_eagerly(kwargs, match):
  kwargs = {"batch_size": 4, "seed": 0, "epoch": 0, **kwargs}
  with pytest.raises(ValueError, match=match):
    data.batch_indices(10, **kwargs)  # no next(): validation is eager


def test_augment_key_depends_on_key_epoch_and_step():
  key = jax.random.key(3)
  same = data.augment_key(key, 2, 5)
  np.testing.assert_array_equal(
    jax.random.key_data(same), jax.random.key_data(data.augment_key(3, 2, 5))
  )
  others = [
    data.augment_key(key, 2, 6),
    data.augment_key(key, 3, 5),
    data.augment_key(jax.random.key(4), 2, 5),
  ]
  for other in others:
    assert not np.array_equal(
      jax.random.key_data(same), jax.random.key_data(other)
    )


# ---------------------------------------------------------------------------
# Augmentation.


def _images(b=16, h=12, w=10, c=2, seed=0):
  # Strictly positive, distinct values: every crop window is unique.
  rng = np.random.default_rng(seed)
  return rng.uniform(1, 2, (b, h, w, c)).astype(np.float32)


def test_random_crop_is_a_window_of_the_zero_padded_image():
  images = _images()
  out = np.asarray(
    data.random_crop(jax.random.key(0), jnp.asarray(images), padding=3)
  )
  padded = np.pad(images, ((0, 0), (3, 3), (3, 3), (0, 0)))
  offsets = set()
  for b in range(len(images)):
    found = [
      (i, j)
      for i in range(7)
      for j in range(7)
      if np.array_equal(out[b], padded[b, i : i + 12, j : j + 10])
    ]
    assert len(found) == 1
    offsets.add(found[0])
  assert len(offsets) > 4  # offsets are drawn per image
  identity = data.random_crop(jax.random.key(0), jnp.asarray(images), 0)
  np.testing.assert_array_equal(identity, images)


def test_random_flip_mirrors_about_half_the_images():
  images = _images(b=64)
  out = np.asarray(data.random_flip(jax.random.key(1), jnp.asarray(images)))
  flipped = [
    np.array_equal(o, im[:, ::-1]) for o, im in zip(out, images, strict=True)
  ]
  kept = [np.array_equal(o, im) for o, im in zip(out, images, strict=True)]
  assert all(f != k for f, k in zip(flipped, kept, strict=True))
  assert 16 < sum(flipped) < 48


def test_augment_is_deterministic_jittable_and_key_dependent():
  images = jnp.asarray(_images(b=8, h=32, w=32, c=3))
  jitted = jax.jit(data.augment)
  a = jitted(data.augment_key(0, 0, 0), images)
  np.testing.assert_array_equal(a, jitted(data.augment_key(0, 0, 0), images))
  b = jitted(data.augment_key(0, 0, 1), images)
  assert a.shape == images.shape and a.dtype == images.dtype
  assert not np.array_equal(a, b)
  raw = jitted(jax.random.PRNGKey(0), images)  # legacy uint32 keys work too
  assert raw.shape == images.shape
  with pytest.raises(ValueError, match="NHWC"):
    data.augment(jax.random.key(0), jnp.zeros((8, 64)))
