"""Downloading the official CIFAR archives, checked and written atomically.

``download_cifar(dataset, data_dir)`` fetches ``cifar-10-python.tar.gz`` or
``cifar-100-python.tar.gz`` into ``data_dir``, where
:func:`~osgd_jax.app.data.cifar.load_cifar` reads it. The bytes stream into a
hidden ``.partial`` file in that directory and are hashed as they arrive; only
a file of the announced length and the expected MD5 is renamed to the
archive's name. An interrupted, cut or altered download therefore leaves
nothing that the loader would read, and what the loader would read that is
already in ``data_dir`` is used as it is, never downloaded again, replaced or
deleted.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import secrets
import shlex
import urllib.error
import urllib.request
from typing import NamedTuple

from tqdm.auto import tqdm

from osgd_jax.app.data.base import CIFAR_URL, DatasetFormatError
from osgd_jax.app.data.cifar import archive_path, find_cifar
from osgd_jax.app.data.loading import canonical_dataset_name

__all__ = ["CIFAR_ARCHIVES", "CifarArchive", "DownloadError", "download_cifar"]

_CHUNK = 1 << 20
# Seconds without a byte (or a connection) before the download is abandoned.
_TIMEOUT_S = 60.0


class CifarArchive(NamedTuple):
  """Where an official archive is published, and its published MD5."""

  url: str
  md5: str


#: Where each data set's official "python version" archive is, and the MD5
#: sum published for it (https://www.cs.toronto.edu/~kriz/cifar.html); the
#: file names are the ones the loader reads.
CIFAR_ARCHIVES: dict[str, CifarArchive] = {
  "cifar10": CifarArchive(
    "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "c58f30108f718f92721af3b95e74349a",
  ),
  "cifar100": CifarArchive(
    "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    "eb9058c3a382ffc7106e4002c42a8d85",
  ),
}


class DownloadError(OSError):
  """A download failed: the transfer broke, or its bytes were not the archive.

  Nothing of it is left in the data directory. It is an ``OSError`` (like
  ``urllib``'s errors): the input was fine and the same call may succeed
  later; the commands exit with status 1 on it.
  """


def _content_length(response) -> int | None:
  value = response.headers.get("Content-Length")
  try:
    return int(value) if value is not None else None
  except ValueError:  # a malformed header is as good as none
    return None


def _say(progress: bool, message: str) -> None:
  if progress:
    print(message, flush=True)


def _fetch(
  label: str, url: str, md5: str, archive: str, progress: bool
) -> None:
  """Streams ``url`` into ``archive``, or raises and leaves nothing there."""
  root = os.path.dirname(archive)
  # Hidden and suffixed: load_cifar only opens the exact official names.
  # Created with open(..., "x") rather than tempfile's 0600 files, so that
  # the archive gets the permissions the user's umask gives any new file.
  partial = os.path.join(
    root, f".{os.path.basename(archive)}.{secrets.token_hex(4)}.partial"
  )
  try:
    with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response:
      expected = _content_length(response)
      digest = hashlib.md5(usedforsecurity=False)
      received = 0
      with (
        open(partial, "xb") as f,
        tqdm(
          total=expected,
          unit="B",
          unit_scale=True,
          unit_divisor=1024,
          desc=f"{label} archive",
          disable=not progress,
        ) as bar,
      ):
        while chunk := response.read(_CHUNK):
          f.write(chunk)
          digest.update(chunk)
          received += len(chunk)
          bar.update(len(chunk))
        f.flush()
        os.fsync(f.fileno())  # on disk before it takes the archive's name
    # http.client ends a body cut short of its Content-Length without an
    # error: only the count tells.
    if expected is not None and received != expected:
      raise DownloadError(
        f"{label}: the download of {url} ended after {received} of"
        f" {expected} bytes; nothing was saved in {root}. Try again."
      )
    if digest.hexdigest() != md5:
      raise DownloadError(
        f"{label}: the {received} bytes downloaded from {url} have MD5"
        f" {digest.hexdigest()}, not {md5}: that is not the official"
        f" archive (a proxy's page, or an altered file); nothing was saved"
        f" in {root}. Try again, or put the archive from {CIFAR_URL} in"
        f" {root} yourself."
      )
    os.replace(partial, archive)
  except BaseException as error:  # Ctrl-C included: never leave a partial
    try:
      os.remove(partial)
    except FileNotFoundError:
      pass
    if isinstance(error, DownloadError):
      raise
    # URLError and the socket errors are OSErrors too: the transfer's first.
    if isinstance(
      error,
      (
        urllib.error.URLError,
        http.client.HTTPException,
        ConnectionError,
        TimeoutError,
      ),
    ):
      raise DownloadError(
        f"{label}: downloading {url} failed ({error}); nothing was saved"
        f" in {root}. Check the connection and the address, then try"
        " again."
      ) from None
    if isinstance(error, OSError):
      raise DownloadError(
        f"{label}: writing the download into {root} failed ({error});"
        " nothing was left there. Make it a writable directory with room"
        " for the archive, then try again."
      ) from None
    raise


def _moved_aside_name(path: str) -> str:
  candidate, n = f"{path}.damaged", 1
  while os.path.exists(candidate):
    n += 1
    candidate = f"{path}.damaged-{n}"
  return candidate


def _check_present(label: str, archive: str, md5: str) -> None:
  digest = hashlib.md5(usedforsecurity=False)
  with open(archive, "rb") as f:
    while chunk := f.read(_CHUNK):
      digest.update(chunk)
  if digest.hexdigest() != md5:
    # The file is the user's: say how to keep it out of the way, never
    # remove or overwrite it.
    move = shlex.join(["mv", archive, _moved_aside_name(archive)])
    raise DatasetFormatError(
      f"{label}: {archive} has MD5 {digest.hexdigest()}, not {md5}: it is"
      " damaged or not the official archive. Move it aside (nothing is"
      f" deleted): {move}, then download again."
    )


def download_cifar(
  dataset: str,
  data_dir: str | os.PathLike[str],
  *,
  url: str | None = None,
  md5: str | None = None,
  progress: bool = True,
) -> str:
  """Downloads a CIFAR archive into ``data_dir`` unless it is there already.

  When ``data_dir`` already holds what
  :func:`~osgd_jax.app.data.cifar.load_cifar` reads (the extracted folder,
  the archive, or the batch files themselves), nothing is downloaded; an
  archive found there is checked against ``md5`` first.
  Otherwise ``url`` is streamed into a hidden ``.partial`` file in
  ``data_dir`` (created if needed), hashed on the way, and renamed to the
  archive's official name only once its length and MD5 are right. Several
  processes may download into one shared directory at once: each writes a
  file of its own and the renames are atomic.

  Args:
    dataset: ``"cifar10"`` or ``"cifar100"``, or one of their aliases
      (``"CIFAR-10"``, ...).
    data_dir: the directory to download into, later the loader's
      ``data_dir``.
    url: where to download from; default: the official archive's address
      (:data:`~osgd_jax.app.data.download.CIFAR_ARCHIVES`). Any URL
      ``urllib`` opens works (``https://``, ``file://``, ...).
    md5: the MD5 the archive must have (hex); default: the official
      archive's. It also checks an archive already in ``data_dir``.
    progress: show a progress bar while downloading, and print one line
      saying what was found or fetched.

  Returns:
    The path :func:`~osgd_jax.app.data.cifar.load_cifar` will read: the
    archive just downloaded, or what was already there.

  Raises:
    ValueError: a dataset other than CIFAR, or ``md5`` not 32 hex digits.
    DatasetFormatError: an archive in ``data_dir`` has another MD5 (a
      ``ValueError``); it is left as it is.
    DownloadError: the transfer failed, was cut short, or brought other
      bytes than ``md5`` says (an ``OSError``); nothing of it is left.

  Example:
    >>> path = download_cifar("cifar10", "~/data")  # doctest: +SKIP
    >>> load_dataset("cifar10", data_dir="~/data")  # doctest: +SKIP
  """
  name = canonical_dataset_name(dataset)
  if name not in CIFAR_ARCHIVES:
    raise ValueError(
      f"{name} has nothing to download: download_cifar fetches"
      f" {' and '.join(CIFAR_ARCHIVES)}."
    )
  official = CIFAR_ARCHIVES[name]
  url = official.url if url is None else url
  md5 = (official.md5 if md5 is None else md5).lower()
  if not re.fullmatch(r"[0-9a-f]{32}", md5):
    raise ValueError(f"md5 must be 32 hexadecimal digits, got {md5!r}.")
  archive = archive_path(data_dir, name)
  found = find_cifar(data_dir, name)
  if found is not None:
    if found == archive:
      _check_present(name, archive, md5)
    _say(progress, f"{name}: found {found}; nothing to download.")
    return found
  root = os.path.dirname(archive)
  try:
    os.makedirs(root, exist_ok=True)
  except OSError as error:
    raise DownloadError(
      f"{name}: cannot create {root} to download into"
      f" ({error}); choose another directory."
    ) from None
  _fetch(name, url, md5, archive, progress)
  _say(progress, f"{name}: downloaded {archive} (MD5 checked).")
  return archive
