"""Byte-level text for an early-exit language model: windows of next bytes.

The text is read as bytes and every byte is a token (a vocabulary of 256):
no vocabulary is built from the text, so any file can be read, UTF-8 or
not, and a byte of the test text that the training text lacks is still a
token the model has an output for. Its bits per byte are its bits per
character wherever the text is ASCII, as the default corpus nearly is.

The last ``test_fraction`` of the bytes is the test text, and the rest
trains: a held-out *tail*, never a random sample of windows, since
neighbouring windows share their topic (``hold_out_validation`` also holds
out the tail of the training windows). Each part is cut into
non-overlapping windows of ``context + 1`` bytes from its start; a window's
first ``context`` bytes are an example's input and its last ``context`` its
next-byte targets. Bytes after the last whole window are not used.

With no file, the text is the source of :data:`STDLIB_MODULES`, modules of
the running interpreter's standard library: offline, and the same on every
run of one Python version, but not across versions, so the version is part
of what :func:`load_text` records.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform

import numpy as np

from osgd_jax.app.data.base import Dataset

__all__ = [
  "STDLIB_MODULES",
  "VOCAB_SIZE",
  "default_corpus",
  "load_text",
  "text_windows",
]

#: Every byte is a token.
VOCAB_SIZE = 256

#: The standard-library modules whose source, in this order, is the default
#: text: pure-Python modules present in every CPython from 3.11 on and not
#: deprecated for removal (about 1 MB on 3.11). A package contributes its
#: ``__init__.py``.
STDLIB_MODULES = (
  "argparse",
  "ast",
  "bisect",
  "calendar",
  "collections",
  "contextlib",
  "copy",
  "csv",
  "dataclasses",
  "difflib",
  "enum",
  "fractions",
  "functools",
  "heapq",
  "inspect",
  "json.decoder",
  "json.encoder",
  "operator",
  "pprint",
  "random",
  "shlex",
  "string",
  "textwrap",
  "threading",
  "tokenize",
  "typing",
)


def default_corpus() -> tuple[bytes, dict[str, object]]:
  """The source files of :data:`STDLIB_MODULES`, joined by blank lines.

  Each module's file is found with ``importlib.util.find_spec`` (no
  module is imported) and read as bytes, as the interpreter ships it.

  Returns:
    ``(text, info)``: the bytes, and a JSON-ready record of where they came
    from: ``source`` (``"python-stdlib"``), ``modules``, ``python`` (the
    interpreter's implementation and version, on which the text depends),
    ``bytes`` and ``sha256``.

  Raises:
    ValueError: a module's source file is missing (an interpreter installed
      without its ``.py`` files); the message says to pass a text file.

  Example:
    >>> text, info = default_corpus()
    >>> info["modules"][0], len(text) == info["bytes"]
    ('argparse', True)
  """
  parts = []
  for name in STDLIB_MODULES:
    spec = importlib.util.find_spec(name)
    origin = None if spec is None else spec.origin
    if origin is None or not origin.endswith(".py"):
      raise ValueError(
        f"the default text is the source of Python's standard library, but"
        f" this interpreter has no source file for {name!r}; pass"
        " --text-file with a text file of your own."
      )
    with open(origin, "rb") as f:
      parts.append(f.read())
  text = b"\n".join(parts)
  info: dict[str, object] = {
    "source": "python-stdlib",
    "modules": list(STDLIB_MODULES),
    "python": (
      f"{platform.python_implementation()} {platform.python_version()}"
    ),
  }
  return text, {**info, **_fingerprint(text)}


def _fingerprint(text: bytes) -> dict[str, object]:
  return {"bytes": len(text), "sha256": hashlib.sha256(text).hexdigest()}


def _read_file(path: str) -> bytes:
  if not os.path.isfile(path):
    raise ValueError(
      f"--text-file {path} does not exist or is not a file; pass the path"
      " of a text file, or leave --text-file out for the default text."
    )
  try:
    with open(path, "rb") as f:
      return f.read()
  except OSError as e:
    raise ValueError(
      f"cannot read --text-file {path} ({e.strerror or e}); make it"
      " readable, or pass another file."
    ) from None


def text_windows(
  tokens: np.ndarray, context: int
) -> tuple[np.ndarray, np.ndarray]:
  """Cuts a token stream into non-overlapping next-token examples.

  Window ``i`` covers ``tokens[i * context : (i + 1) * context + 1]``: its
  first ``context`` tokens are the input, its last ``context`` the targets,
  so consecutive windows share one token and every token but the first is
  a target once.

  Args:
    tokens: ``(n,)`` integer tokens.
    context: tokens per example, at least 1.

  Returns:
    ``(x, y)``, int32 arrays of shape ``((n - 1) // context, context)``
    with ``y[:, t] == x[:, t + 1]`` for ``t < context - 1``.

  Example:
    >>> x, y = text_windows(np.arange(8), 3)
    >>> x.tolist(), y.tolist()
    ([[0, 1, 2], [3, 4, 5]], [[1, 2, 3], [4, 5, 6]])
  """
  tokens = np.asarray(tokens, np.int32)
  count = max(len(tokens) - 1, 0) // context
  x = tokens[: count * context].reshape(count, context)
  y = tokens[1 : count * context + 1].reshape(count, context)
  return x, y


def load_text(
  *,
  text_file: str | os.PathLike[str] | None = None,
  context: int = 128,
  test_fraction: float = 0.1,
  max_bytes: int | None = None,
) -> Dataset:
  """Loads a text as next-byte windows, its tail held out for testing.

  Args:
    text_file: the text to train on; ``None`` reads the default corpus
      (:func:`default_corpus`).
    context: bytes per example (the model's sequence length).
    test_fraction: the fraction of the bytes, at the end of the text, held
      out as the test text, in (0, 1).
    max_bytes: read only the text's first ``max_bytes`` bytes (its test
      tail is then the end of those), to train a run on less of it;
      ``None``: all of it.

  Returns:
    A ``Dataset`` named ``"text"``: int32 inputs and targets of shape
    ``(N, context)`` (tokens are not standardised: ``mean`` 0, ``std`` 1),
    ``num_classes`` 256, and in ``info`` where the text came from (its
    path or the modules and Python version), its size and SHA-256, and the
    split.

  Raises:
    ValueError: the file is missing, unreadable or empty, or too short to
      give a training and a test window, or ``max_bytes`` is not a
      positive integer; the message says what to pass.

  Example:
    >>> import tempfile
    >>> with tempfile.NamedTemporaryFile(suffix=".txt") as f:
    ...   _ = f.write(b"abcdefgh" * 8); f.flush()
    ...   ds = load_text(text_file=f.name, context=4, test_fraction=0.25)
    >>> ds.x_train.shape, ds.x_test.shape, ds.num_classes
    ((11, 4), (3, 4), 256)
  """
  if isinstance(context, bool) or not isinstance(context, int) or context < 1:
    raise ValueError(f"context must be a positive integer, got {context!r}.")
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}.")
  if max_bytes is not None and (
    isinstance(max_bytes, bool)
    or not isinstance(max_bytes, int)
    or max_bytes < 1
  ):
    raise ValueError(
      f"max_bytes must be a positive integer or None, got {max_bytes!r}."
    )
  if text_file is None:
    text, info = default_corpus()
  else:
    path = os.fspath(text_file)
    text = _read_file(path)
    info: dict[str, object] = {"source": "file", "path": os.path.abspath(path)}
    info.update(_fingerprint(text))
    if not text:
      raise ValueError(
        f"--text-file {path} is empty; pass a file with text in it."
      )
  if max_bytes is not None:
    text = text[:max_bytes]
    info["max_bytes"] = max_bytes
  num_test = int(round(test_fraction * len(text)))
  # Each side needs one window of context + 1 bytes.
  needed = int(np.ceil((context + 1) / min(test_fraction, 1 - test_fraction)))
  if min(num_test, len(text) - num_test) < context + 1:
    if max_bytes is not None and len(text) == max_bytes:
      raise ValueError(
        f"--text-bytes {max_bytes} keeps too few bytes for a training and a"
        f" test window of {context} bytes with {test_fraction:g} of them"
        f" held out for testing; pass --text-bytes {needed} or more."
      )
    where = (
      "the default text"
      if text_file is None
      else f"--text-file {os.fspath(text_file)}"
    )
    raise ValueError(
      f"{where} holds {len(text)} bytes, too few for a training and a test"
      f" window of {context} bytes with {test_fraction:g} of it held out"
      f" for testing; pass a text of at least {needed} bytes."
    )
  tokens = np.frombuffer(text, np.uint8)
  split = len(tokens) - num_test
  x_train, y_train = text_windows(tokens[:split], context)
  x_test, y_test = text_windows(tokens[split:], context)
  info.update(
    context=context,
    vocab_size=VOCAB_SIZE,
    train_bytes=split,
    test_bytes=num_test,
  )
  return Dataset(
    name="text",
    x_train=x_train,
    y_train=y_train,
    x_test=x_test,
    y_test=y_test,
    num_classes=VOCAB_SIZE,
    mean=np.zeros(1, np.float32),
    std=np.ones(1, np.float32),
    info=info,
  )
