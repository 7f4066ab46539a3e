"""The ``text`` data set: next-byte windows, the held-out tail, the default.

The texts are written by the tests; the default text is read from the
running interpreter's standard library, nothing from the network.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import platform

import numpy as np
import pytest

from osgd_jax.app import data
from osgd_jax.app.data import text as text_module


def _read(path) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def _write(tmp_path, content: bytes, name="corpus.txt"):
  path = tmp_path / name
  path.write_bytes(content)
  return str(path)


def test_windows_are_next_byte_targets_of_the_text(tmp_path):
  # UTF-8 (é), then a byte that is no UTF-8 at all: 101 bytes in all.
  content = bytes(range(40)) + b"\xc3\xa9\xff" + bytes(range(58))
  path = _write(tmp_path, content)
  ds = data.load_text(text_file=path, context=8, test_fraction=0.2)
  tokens = np.frombuffer(content, np.uint8).astype(np.int64)
  split = len(content) - round(0.2 * len(content))  # the last 20 bytes test
  for x, y, start, stop in (
    (ds.x_train, ds.y_train, 0, split),
    (ds.x_test, ds.y_test, split, len(content)),
  ):
    assert x.dtype == y.dtype == np.int32
    assert x.shape == y.shape == ((stop - start - 1) // 8, 8)
    for i in range(len(x)):  # window i starts 8 i bytes into its part
      first = start + 8 * i
      np.testing.assert_array_equal(x[i], tokens[first : first + 8])
      np.testing.assert_array_equal(y[i], tokens[first + 1 : first + 9])
  assert ds.num_classes == 256 and ds.input_shape == (8,)
  assert ds.sequence_labels
  assert not ds.x_train.flags.writeable
  info = ds.info
  assert info["source"] == "file" and info["path"] == os.path.abspath(path)
  assert info["bytes"] == 101
  assert info["sha256"] == hashlib.sha256(content).hexdigest()
  assert (info["train_bytes"], info["test_bytes"]) == (81, 20)
  assert (info["context"], info["vocab_size"]) == (8, 256)


def test_load_dataset_reaches_the_text_loader(tmp_path):
  path = _write(tmp_path, b"0123456789" * 30)
  ds = data.load_dataset("text", text_file=path, context=16)
  assert ds.name == "text" and ds.x_train.shape[1:] == (16,)
  with pytest.raises(ValueError, match="takes text_file, context"):
    data.load_dataset("text", shape=(3,))


def test_validation_holds_out_the_tail_of_the_training_windows(tmp_path):
  path = _write(tmp_path, bytes(range(256)) * 4)
  ds = data.load_text(text_file=path, context=10)
  split = data.hold_out_validation(ds, 0.25)
  held = round(0.25 * ds.num_train)
  np.testing.assert_array_equal(split.x_train, ds.x_train[:-held])
  np.testing.assert_array_equal(split.x_test, ds.x_train[-held:])
  np.testing.assert_array_equal(split.y_test, ds.y_train[-held:])


def test_the_default_text_is_the_listed_modules_source():
  text, info = data.default_corpus()
  # An independent reading: each module imported, its source file found by
  # inspect, read as bytes.
  expected = b"\n".join(
    _read(inspect.getsourcefile(importlib.import_module(name)))
    for name in data.STDLIB_MODULES
  )
  assert text == expected
  assert info["modules"] == list(data.STDLIB_MODULES)
  assert info["python"] == (
    f"{platform.python_implementation()} {platform.python_version()}"
  )
  assert info["sha256"] == hashlib.sha256(text).hexdigest()
  again, again_info = data.default_corpus()
  assert again == text and again_info == info  # deterministic
  ds = data.load_text(context=64)
  assert ds.info["sha256"] == info["sha256"]
  assert ds.num_test == (round(0.1 * len(text)) - 1) // 64 > 0


def test_a_missing_module_source_names_the_way_out(monkeypatch):
  real = importlib.util.find_spec

  def without_source(name, *args):
    spec = real(name, *args)
    if name == "heapq" and spec is not None:
      spec.origin = spec.origin[:-3] + ".pyc"
    return spec

  monkeypatch.setattr(text_module.importlib.util, "find_spec", without_source)
  with pytest.raises(
    ValueError, match="no source file for 'heapq'.*--text-file"
  ):
    data.default_corpus()


def test_too_short_a_text_says_how_long_and_that_length_works(tmp_path):
  path = _write(tmp_path, b"x" * 50)
  with pytest.raises(ValueError, match="holds 50 bytes") as error:
    data.load_text(text_file=path, context=16, test_fraction=0.1)
  needed = int(str(error.value).split("at least ")[1].split()[0])
  longer = _write(tmp_path, b"x" * needed, "longer.txt")
  ds = data.load_text(text_file=longer, context=16, test_fraction=0.1)
  assert ds.num_train >= 1 and ds.num_test == 1


@pytest.mark.parametrize(
  "make, match",
  [
    (lambda tmp: str(tmp / "absent.txt"), "does not exist or is not a file"),
    (lambda tmp: str(tmp), "does not exist or is not a file"),
    (lambda tmp: _write(tmp, b""), "is empty"),
  ],
)
def test_bad_text_files(tmp_path, make, match):
  with pytest.raises(ValueError, match=match):
    data.load_text(text_file=make(tmp_path))


def test_an_unreadable_text_file(tmp_path, monkeypatch):
  path = _write(tmp_path, b"text")

  def refuse(*args, **kwargs):
    raise PermissionError(13, "Permission denied")

  monkeypatch.setattr(text_module, "open", refuse, raising=False)
  with pytest.raises(ValueError, match="cannot read --text-file .*Permission"):
    data.load_text(text_file=path)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(context=0), "context must be a positive integer"),
    (dict(context=True), "context must be a positive integer"),
    (dict(test_fraction=1.0), r"test_fraction must be in \(0, 1\)"),
  ],
)
def test_bad_options(kwargs, match):
  with pytest.raises(ValueError, match=match):
    data.load_text(**kwargs)


def test_labels_must_be_per_example_or_per_position():
  with pytest.raises(ValueError, match=r"or \(N, length\) like x"):
    data.Dataset(
      "toy",
      np.zeros((2, 3), np.int32),
      np.zeros((2, 4), np.int32),
      np.zeros((1, 3), np.int32),
      np.zeros((1, 3), np.int32),
      4,
      np.zeros(1),
      np.ones(1),
    )
