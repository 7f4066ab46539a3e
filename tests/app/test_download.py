"""``download_cifar`` and ``osgd-train --download``, offline.

The archives are tiny ones in the official format (``tests/cifar_files.py``),
fetched (by pooch) from an HTTP server on localhost that can cut a body short
of its Content-Length, leave the header out, answer 404, or wait while the
client is interrupted. Every failure must leave
nothing in the data directory that the loader would read, and nothing the
user had there may be changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import os
import pathlib
import shlex
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import pytest
from cifar_files import CifarTree, write_cifar

from osgd_jax.app import data
from osgd_jax.app.data import (
  CifarArchive,
  DatasetFormatError,
  DatasetNotFoundError,
  DownloadError,
  download_cifar,
  load_dataset,
)
from osgd_jax.app.data.cifar import archive_path
from osgd_jax.app.train import cli

ARCHIVE = "cifar-10-python.tar.gz"


class _Page(NamedTuple):
  body: bytes
  length: int | None  # the Content-Length sent; None: no header
  after: Callable[[], None] | None = None  # runs once the body is sent


class _Handler(http.server.BaseHTTPRequestHandler):
  pages: dict[str, _Page] = {}

  def do_GET(self):  # pylint: disable=invalid-name
    page = self.pages.get(self.path)
    if page is None:
      self.send_error(404)
      return
    self.send_response(200)
    if page.length is not None:
      self.send_header("Content-Length", str(page.length))
    self.end_headers()
    self.wfile.write(page.body)
    self.wfile.flush()
    if page.after is not None:
      page.after()

  def log_message(self, *args):  # keep the test output clean
    del args


@pytest.fixture(scope="module")
def server():
  """An HTTP server on localhost; tests put pages in ``server.pages``."""
  httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
  httpd.daemon_threads = True
  thread = threading.Thread(
    target=httpd.serve_forever, args=(0.05,), daemon=True
  )
  thread.start()
  httpd.pages = _Handler.pages
  httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
  yield httpd
  httpd.shutdown()
  httpd.server_close()
  _Handler.pages.clear()


class _Source(NamedTuple):
  written: CifarTree
  blob: bytes
  md5: str
  url: str  # on the server


@pytest.fixture(scope="module")
def source(tmp_path_factory, server):
  written = write_cifar(
    str(tmp_path_factory.mktemp("served")), "cifar10", n=4, extracted=False
  )
  blob = pathlib.Path(written.archive).read_bytes()
  server.pages[f"/{ARCHIVE}"] = _Page(blob, len(blob))
  return _Source(
    written, blob, hashlib.md5(blob).hexdigest(), f"{server.url}/{ARCHIVE}"
  )


def _left_in(directory) -> list[str]:
  return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


def _assert_nothing_left(data_dir):
  assert _left_in(data_dir) == []
  with pytest.raises(DatasetNotFoundError):
    load_dataset("cifar10", data_dir=data_dir)


def test_the_official_archives_are_the_files_the_loader_reads():
  assert sorted(data.CIFAR_ARCHIVES) == ["cifar10", "cifar100"]
  for name, (url, md5) in data.CIFAR_ARCHIVES.items():
    assert url.startswith("https://www.cs.toronto.edu/~kriz/")
    assert url.rsplit("/", 1)[1] == os.path.basename(archive_path("d", name))
    assert len(md5) == 32 and set(md5) <= set("0123456789abcdef")


def test_an_archive_is_downloaded_checked_and_loaded(source, tmp_path, capsys):
  url = source.url
  data_dir = tmp_path / "new" / "data"  # created by the download
  path = download_cifar("CIFAR-10", str(data_dir), url=url, md5=source.md5)
  assert path == str(data_dir / ARCHIVE)
  assert _left_in(data_dir) == [ARCHIVE]
  assert pathlib.Path(path).read_bytes() == source.blob
  out, err = capsys.readouterr()
  assert out == f"cifar10: downloaded {path} (MD5 checked).\n"
  assert "cifar10 archive" in err  # the progress bar
  # The permissions of any new file, not tempfile's owner-only 0600.
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask
  ds = load_dataset("cifar10", data_dir=str(data_dir))
  np.testing.assert_array_equal(
    ds.y_train, source.written.train_labels["labels"]
  )
  np.testing.assert_array_equal(ds.y_test, source.written.test_labels["labels"])


@pytest.mark.parametrize("present", ["archive", "folder", "batch files"])
def test_what_the_loader_would_read_is_not_downloaded_again(
  present, source, server, tmp_path, capsys
):
  data_dir = tmp_path / "data"
  if present == "archive":
    data_dir.mkdir()
    shutil.copy(source.written.archive, data_dir / ARCHIVE)
    expected = data_dir / ARCHIVE
  else:
    written = write_cifar(str(data_dir), "cifar10", n=4, archived=False)
    expected = pathlib.Path(written.folder)
    if present == "batch files":  # data_dir is the extracted folder itself
      data_dir = expected
  before = {p: p.stat().st_mtime_ns for p in data_dir.rglob("*")}
  # Any attempt to download would fail: there is nothing at this address.
  nowhere = f"{server.url}/nowhere.tar.gz"
  path = download_cifar("cifar10", str(data_dir), url=nowhere, md5=source.md5)
  assert path == str(expected)
  assert capsys.readouterr().out == (
    f"cifar10: found {path}; nothing to download.\n"
  )
  assert {p: p.stat().st_mtime_ns for p in data_dir.rglob("*")} == before


def test_an_archive_of_another_md5_is_kept_and_moving_it_aside_works(
  source, tmp_path
):
  data_dir = tmp_path / "data"
  other = write_cifar(str(data_dir), "cifar10", seed=1, n=4, extracted=False)
  other_blob = pathlib.Path(other.archive).read_bytes()
  older = data_dir / f"{ARCHIVE}.damaged"  # moved aside before: kept too
  older.write_bytes(b"an older damaged archive")
  with pytest.raises(DatasetFormatError) as info:
    download_cifar(
      "cifar10", str(data_dir), url=source.url, md5=source.md5, progress=False
    )
  message = str(info.value)
  assert isinstance(info.value, ValueError) and "\n" not in message
  assert f"{other.archive} has MD5 {hashlib.md5(other_blob).hexdigest()}" in (
    message
  )
  assert f"not {source.md5}" in message and "nothing is deleted" in message
  assert pathlib.Path(other.archive).read_bytes() == other_blob  # untouched
  # The advice, as written, then the download again.
  move = message.split("(nothing is deleted): ")[1].split(", then")[0]
  assert shlex.split(move)[:2] == ["mv", other.archive]
  assert subprocess.run(shlex.split(move)).returncode == 0
  assert (
    download_cifar(
      "cifar10", str(data_dir), url=source.url, md5=source.md5, progress=False
    )
    == other.archive
  )
  assert pathlib.Path(other.archive).read_bytes() == source.blob
  assert (data_dir / f"{ARCHIVE}.damaged-2").read_bytes() == other_blob
  assert older.read_bytes() == b"an older damaged archive"


def test_other_bytes_than_the_md5_says_leave_nothing(source, tmp_path):
  # One clear error, a ValueError (the commands' status 2), not pooch's.
  data_dir = tmp_path / "data"
  with pytest.raises(DatasetFormatError) as info:
    download_cifar(
      "cifar10", str(data_dir), url=source.url, md5="0" * 32, progress=False
    )
  message = str(info.value)
  assert isinstance(info.value, ValueError) and "\n" not in message
  assert message.startswith(
    f"cifar10: the download from {source.url} has MD5 {source.md5},"
    f" not {'0' * 32}: that is not the official archive"
  )
  assert f"nothing was saved in {data_dir}" in message
  _assert_nothing_left(data_dir)


@pytest.mark.parametrize("declared", ["Content-Length", "no length"])
def test_a_body_cut_short_leaves_nothing(declared, source, server, tmp_path):
  half = source.blob[: len(source.blob) // 2]
  length = len(source.blob) if declared == "Content-Length" else None
  server.pages[f"/cut-{length}"] = _Page(half, length)
  data_dir = tmp_path / "data"
  url = f"{server.url}/cut-{length}"
  # Cut short of its Content-Length, the transfer fails; without one, only
  # the checksum can tell.
  error = DownloadError if length is not None else DatasetFormatError
  with pytest.raises(error) as info:
    download_cifar(
      "cifar10", str(data_dir), url=url, md5=source.md5, progress=False
    )
  if length is None:
    assert f"the download from {url} has MD5" in str(info.value)
  else:
    assert str(info.value).startswith(f"cifar10: downloading {url} failed (")
  assert f"nothing was saved in {data_dir}" in str(info.value)
  _assert_nothing_left(data_dir)
  # The advice, once the connection holds: nothing left behind is in the way.
  server.pages[f"/cut-{length}"] = _Page(source.blob, length)
  assert download_cifar(
    "cifar10",
    str(data_dir),
    url=f"{server.url}/cut-{length}",
    md5=source.md5,
    progress=False,
  ) == str(data_dir / ARCHIVE)
  assert _left_in(data_dir) == [ARCHIVE]


def _closed_port_url() -> str:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  return f"http://127.0.0.1:{port}/cifar-10-python.tar.gz"


@pytest.mark.parametrize(
  "where, reason",
  [
    ("404", "404 Client Error"),
    ("closed port", "Connection refused"),
  ],
)
def test_a_failed_transfer_leaves_nothing(
  where, reason, source, server, tmp_path
):
  url = {
    "404": f"{server.url}/nothing-here",
    "closed port": _closed_port_url(),
  }[where]
  data_dir = tmp_path / "data"
  with pytest.raises(DownloadError) as info:
    download_cifar(
      "cifar10", str(data_dir), url=url, md5=source.md5, progress=False
    )
  message = str(info.value)
  assert message.startswith(f"cifar10: downloading {url} failed (")
  assert reason in message and "Check the connection" in message
  assert info.value.__cause__ is None and info.value.__suppress_context__
  _assert_nothing_left(data_dir)


@contextlib.contextmanager
def _ctrl_c_midway(server, source, data_dir):
  """Yields a URL whose download this thread gets a real SIGINT during.

  The server sends half the archive, waits for the partial file to appear
  in ``data_dir``, then signals this thread, which is waiting for the rest
  of the body: as Ctrl-C would. The list yielded with the URL receives the
  partial files seen.
  """
  main_thread = threading.get_ident()
  seen, release = [], threading.Event()

  def interrupt():
    while not seen and not release.wait(0.01):
      seen.extend(data_dir.glob("tmp*"))  # pooch's temporary file
    signal.pthread_kill(main_thread, signal.SIGINT)
    release.wait(timeout=30)

  path = f"/slow/{len(server.pages)}"
  server.pages[path] = _Page(
    source.blob[: len(source.blob) // 2], len(source.blob), after=interrupt
  )
  handler = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    yield server.url + path, seen
  finally:
    signal.signal(signal.SIGINT, handler)
    release.set()


def test_ctrl_c_during_a_download_leaves_nothing(source, server, tmp_path):
  data_dir = tmp_path / "data"
  with _ctrl_c_midway(server, source, data_dir) as (url, seen):
    with pytest.raises(KeyboardInterrupt):
      download_cifar(
        "cifar10", str(data_dir), url=url, md5=source.md5, progress=False
      )
  assert [p.parent for p in seen] == [data_dir]  # it was interrupted midway
  _assert_nothing_left(data_dir)


def test_a_directory_that_cannot_be_written_leaves_nothing(source, tmp_path):
  # /proc/self exists but takes no new files, whoever runs the test.
  with pytest.raises(DownloadError) as info:
    download_cifar(
      "cifar10", "/proc/self", url=source.url, md5=source.md5, progress=False
    )
  assert str(info.value).startswith(
    "cifar10: writing the download into /proc/self failed ("
  )
  assert "Make it a writable directory" in str(info.value)
  assert not [n for n in os.listdir("/proc/self") if n.startswith("tmp")]
  a_file = tmp_path / "a-file"
  a_file.write_text("")
  with pytest.raises(DownloadError, match="cannot create .*a-file/data"):
    download_cifar(
      "cifar10",
      str(a_file / "data"),
      url=source.url,
      md5=source.md5,
      progress=False,
    )


@pytest.mark.parametrize(
  "dataset, md5, expected",
  [
    ("digits", None, "digits has nothing to download"),
    ("Cifar10", None, "unknown dataset 'Cifar10'"),
    ("cifar100", "not-a-checksum", "md5 must be 32 hexadecimal digits"),
    ("cifar10", "file://", "cannot download file:///a.tar.gz: give an"),
  ],
)
def test_bad_arguments_are_refused_before_anything_is_done(
  dataset, md5, expected, tmp_path
):
  url = "file:///a.tar.gz" if md5 == "file://" else None
  md5 = None if url else md5
  with pytest.raises(ValueError, match=expected):
    download_cifar(dataset, str(tmp_path / "data"), url=url, md5=md5)
  assert not (tmp_path / "data").exists()


# ---------------------------------------------------------------------------
# osgd-train --download, run by the command's main in this process. A
# training run would spend seconds compiling, so these runs stop at the
# first thing a run does: writing to --out, here a directory that takes no
# files. What was downloaded by then, and what was printed, shows that the
# download came first.

UNWRITABLE_OUT = "/proc/osgd-cannot-write"


def _main(args, capsys) -> tuple[int, str, str]:
  status = cli.main(list(args))
  out, err = capsys.readouterr()
  return status, out, err


@pytest.fixture
def official(monkeypatch, source):
  """Makes the tiny archive the official CIFAR-10 of this test."""
  monkeypatch.setitem(
    data.CIFAR_ARCHIVES, "cifar10", CifarArchive(source.url, source.md5)
  )
  return source


def test_osgd_train_download_fetches_the_archive_before_the_run(
  official, tmp_path, capsys
):
  data_dir = tmp_path / "data"
  args = [
    "--download",
    "--dataset",
    "CIFAR-10",
    "--data-dir",
    str(data_dir),
    "--out",
    UNWRITABLE_OUT,
  ]
  status, stdout, err = _main(args, capsys)
  assert stdout == (
    f"cifar10: downloaded {data_dir / ARCHIVE} (MD5 checked)."
    f"\nrun directory: {UNWRITABLE_OUT}\n"
  )
  assert "cifar10 archive" in err  # the progress bar
  assert status == 2 and err.splitlines()[-1].startswith(
    "osgd-train: error: cannot write to --out"
  )
  assert (data_dir / ARCHIVE).read_bytes() == official.blob
  # Again: the archive is there, nothing is fetched.
  status, stdout, _ = _main([*args, "--no-progress"], capsys)
  assert status == 2 and stdout == f"run directory: {UNWRITABLE_OUT}\n"
  assert _left_in(data_dir) == [ARCHIVE]


def test_osgd_train_download_is_no_setting_of_the_run():
  # It says what to fetch, not how to train: config.json does not record
  # it, so adding or dropping it never stands in the way of --resume.
  assert cli.config_from_args(["--download"]) == cli.config_from_args([])


def test_osgd_train_download_is_a_no_op_for_the_builtin_datasets(capsys):
  # No --data-dir, which a CIFAR download would need: nothing is fetched
  # and the run starts.
  for dataset in ("digits", "synthetic"):
    status, stdout, err = _main(
      ["--download", "--dataset", dataset, "--out", UNWRITABLE_OUT], capsys
    )
    assert stdout == f"run directory: {UNWRITABLE_OUT}\n"
    assert status == 2 and err.startswith(
      "osgd-train: error: cannot write to --out"
    )


def test_osgd_train_download_failures_are_one_line(
  official, tmp_path, monkeypatch, capsys
):
  data_dir, out = tmp_path / "data", tmp_path / "run"
  args = [
    "--download",
    "--data-dir",
    str(data_dir),
    "--out",
    str(out),
    "--dataset",
    "cifar10",
    "--no-progress",
  ]
  # A download of other bytes: one line, status 2, nothing in --data-dir,
  # no run started.
  monkeypatch.setitem(
    data.CIFAR_ARCHIVES, "cifar10", CifarArchive(official.url, "0" * 32)
  )
  status, stdout, err = _main(args, capsys)
  assert status == 2 and stdout == "" and len(err.splitlines()) == 1
  assert err.startswith(
    f"osgd-train: error: cifar10: the download from {official.url} has MD5"
  )
  assert _left_in(data_dir) == [] and not out.exists()
  # A failed transfer: status 1.
  monkeypatch.setitem(
    data.CIFAR_ARCHIVES,
    "cifar10",
    CifarArchive(official.url + ".missing", official.md5),
  )
  status, stdout, err = _main(args, capsys)
  assert status == 1 and stdout == "" and len(err.splitlines()) == 1
  assert "failed (404 Client Error" in err
  assert _left_in(data_dir) == [] and not out.exists()
  # An archive of another MD5 in --data-dir: bad input, kept as it is.
  (data_dir / ARCHIVE).write_bytes(b"not the archive")
  status, stdout, err = _main(args, capsys)
  assert status == 2 and len(err.splitlines()) == 1
  assert "it is damaged or not the official archive" in err
  assert "(nothing is deleted): mv " in err
  assert (data_dir / ARCHIVE).read_bytes() == b"not the archive"
  # No --data-dir to download into.
  status, _, err = _main(["--download", "--dataset", "cifar100"], capsys)
  assert (status, err) == (
    2,
    "osgd-train: error: --download needs"
    " --data-dir: the directory to keep cifar100's"
    " archive in.\n",
  )


def test_ctrl_c_during_osgd_train_download_is_one_line(
  source, server, tmp_path, monkeypatch, capsys
):
  data_dir, out = tmp_path / "data", tmp_path / "run"
  with _ctrl_c_midway(server, source, data_dir) as (url, seen):
    monkeypatch.setitem(
      data.CIFAR_ARCHIVES, "cifar10", CifarArchive(url, source.md5)
    )
    status, stdout, err = _main(
      [
        "--download",
        "--dataset",
        "cifar10",
        "--data-dir",
        str(data_dir),
        "--out",
        str(out),
        "--no-progress",
      ],
      capsys,
    )
  assert (status, stdout, err) == (
    130,
    "",
    "osgd-train: error: interrupted"
    " before training started; nothing was"
    " saved.\n",
  )
  assert seen and _left_in(data_dir) == [] and not out.exists()
