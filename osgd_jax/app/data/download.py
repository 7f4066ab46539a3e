"""Downloading the official CIFAR archives, checked and written atomically.

``download_cifar(dataset, data_dir)`` fetches ``cifar-10-python.tar.gz`` or
``cifar-100-python.tar.gz`` into ``data_dir``, where
:func:`~osgd_jax.app.data.cifar.load_cifar` reads it. The transfer is
`pooch <https://www.fatiando.org/pooch>`_'s: it streams the bytes into a
temporary file in that directory, checks the MD5, and only then gives the
file the archive's name. An interrupted, cut or altered download therefore
leaves nothing that the loader would read, and what the loader would read
that is already in ``data_dir`` is used as it is, never downloaded again,
replaced or deleted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
from collections.abc import Iterator
from typing import NamedTuple
from urllib.parse import urlparse

import pooch
import requests
from tqdm.auto import tqdm

from osgd_jax.app.data.base import CIFAR_URL, DatasetFormatError
from osgd_jax.app.data.cifar import archive_path, find_cifar
from osgd_jax.app.data.loading import canonical_dataset_name

__all__ = ["CIFAR_ARCHIVES", "CifarArchive", "DownloadError", "download_cifar"]

_CHUNK = 1 << 20
# Seconds without a byte (or a connection) before the download is abandoned.
_TIMEOUT_S = 60.0
# The URL schemes pooch's HTTP and FTP downloaders fetch.
_SCHEMES = ("https", "http", "ftp")


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
  """A download failed: the transfer broke, or the directory took no file.

  Nothing of it is left in the data directory. It is an ``OSError`` (like
  the errors of ``requests``): the input was fine and the same call may
  succeed later; the commands exit with status 1 on it.
  """


def _say(progress: bool, message: str) -> None:
  if progress:
    print(message, flush=True)


@contextlib.contextmanager
def _quiet_pooch() -> Iterator[None]:
  """Silences pooch's "Downloading data from ..." log lines.

  ``download_cifar`` says what it fetched itself, in one line, and the
  commands' errors are one line each.
  """
  logger = pooch.get_logger()
  level = logger.level
  logger.setLevel(logging.WARNING)
  try:
    yield
  finally:
    logger.setLevel(level)


def _fetch(
  label: str, url: str, md5: str, archive: str, progress: bool
) -> None:
  """Downloads ``url`` into ``archive`` with pooch, or leaves nothing there."""
  root = os.path.dirname(archive)
  # pooch sets the bar's total from Content-Length; the placeholder 1 makes
  # the bar truthy, which is how pooch tells that it was given one.
  bar = (
    tqdm(
      total=1,
      unit="B",
      unit_scale=True,
      unit_divisor=1024,
      desc=f"{label} archive",
    )
    if progress
    else False
  )
  # pooch 1.9's annotations say less than its documentation: progressbar
  # takes a progress bar object too, and its Downloader protocol does not
  # describe its own HTTPDownloader.
  downloader = pooch.HTTPDownloader(
    progressbar=bar,  # pyright: ignore[reportArgumentType]
    timeout=_TIMEOUT_S,
    chunk_size=_CHUNK,
  )
  try:
    with _quiet_pooch():
      pooch.retrieve(
        url,
        known_hash=f"md5:{md5}",
        fname=os.path.basename(archive),
        path=root,
        downloader=downloader,  # pyright: ignore[reportArgumentType]
      )
  except requests.RequestException as error:  # an OSError: the transfer's
    raise DownloadError(
      f"{label}: downloading {url} failed ({error}); nothing was saved"
      f" in {root}. Check the connection and the address, then try again."
    ) from None
  except ValueError as error:  # pooch's checksum mismatch
    got = re.search(r"got ([0-9a-f]{32})", str(error))
    raise DatasetFormatError(
      f"{label}: the download from {url} has MD5"
      f" {got.group(1) if got else 'another'}, not {md5}: that is not the"
      " official archive (a proxy's page, or an altered file); nothing was"
      f" saved in {root}. Try again, or put the archive from {CIFAR_URL}"
      f" in {root} yourself."
    ) from None
  except OSError as error:  # the temporary file or the rename
    raise DownloadError(
      f"{label}: writing the download into {root} failed ({error});"
      " nothing was left there. Make it a writable directory with room"
      " for the archive, then try again."
    ) from None
  finally:
    if bar is not False:
      bar.close()
  # pooch's temporary file is owner-only (0600); the archive gets the
  # permissions the user's umask gives any new file.
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(archive, 0o666 & ~umask)


def _moved_aside_name(path: str) -> str:
  candidate, n = f"{path}.damaged", 1
  while os.path.exists(candidate):
    n += 1
    candidate = f"{path}.damaged-{n}"
  return candidate


def _check_present(label: str, archive: str, md5: str) -> None:
  found = pooch.file_hash(archive, alg="md5")
  if found != md5:
    # The file is the user's: say how to keep it out of the way, never
    # remove or overwrite it.
    move = shlex.join(["mv", archive, _moved_aside_name(archive)])
    raise DatasetFormatError(
      f"{label}: {archive} has MD5 {found}, not {md5}: it is"
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
  Otherwise pooch streams ``url`` into a temporary file in ``data_dir``
  (created if needed) and renames it to the archive's official name only
  once its MD5 is right. Several processes may download into one shared
  directory at once: each writes a file of its own and the renames are
  atomic.

  Args:
    dataset: ``"cifar10"`` or ``"cifar100"``, or one of their aliases
      (``"CIFAR-10"``, ...).
    data_dir: the directory to download into, later the loader's
      ``data_dir``.
    url: where to download from; default: the official archive's address
      (:data:`~osgd_jax.app.data.download.CIFAR_ARCHIVES`). An
      ``https://``, ``http://`` or ``ftp://`` URL.
    md5: the MD5 the archive must have (hex); default: the official
      archive's. It also checks an archive already in ``data_dir``.
    progress: show a progress bar while downloading, and print one line
      saying what was found or fetched.

  Returns:
    The path :func:`~osgd_jax.app.data.cifar.load_cifar` will read: the
    archive just downloaded, or what was already there.

  Raises:
    ValueError: a dataset other than CIFAR, ``md5`` not 32 hex digits, or
      a URL of another scheme.
    DatasetFormatError: an archive in ``data_dir`` has another MD5, or the
      download brought other bytes than ``md5`` says (a ``ValueError``);
      what was there is left as it is, and nothing of the download.
    DownloadError: the transfer failed or was cut short, or ``data_dir``
      takes no file (an ``OSError``); nothing of it is left.

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
  if urlparse(url).scheme not in _SCHEMES:
    raise ValueError(
      f"cannot download {url}: give an {', '.join(_SCHEMES)} URL, or put"
      f" the archive in {os.fspath(data_dir)} yourself."
    )
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
