"""A release builds: ``python -m build`` gives an sdist and a wheel that
install into a fresh virtual environment and import there.

The build runs without isolation, with the setuptools the test extra
installs, so it needs no network. The fresh environment sees the test
environment's packages for the dependencies, but imports osgd_jax from the
installed wheel or sdist, never from this checkout.
"""

from __future__ import annotations

import email
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tomllib
import venv
import zipfile

import pytest

import osgd_jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
  """``(sdist, wheel)`` built from the repository's tracked files."""
  tmp = tmp_path_factory.mktemp("build")
  source = tmp / "source"
  tracked = (
    subprocess.run(
      ["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True
    )
    .stdout.decode()
    .split("\0")
  )
  for name in filter(None, tracked):
    if (ROOT / name).is_file():  # a file deleted but not yet committed is not
      (source / name).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(ROOT / name, source / name)
  # The sdist first, then the wheel built from the unpacked sdist: a file
  # the sdist leaves out breaks the wheel.
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "build",
      "--no-isolation",
      "--outdir",
      str(tmp / "dist"),
      str(source),
    ],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  (sdist,) = (tmp / "dist").glob("*.tar.gz")
  (wheel,) = (tmp / "dist").glob("*.whl")
  return sdist, wheel


def test_sdist_and_wheel_carry_the_package_and_its_metadata(dists):
  sdist, wheel = dists
  version = osgd_jax.__version__
  assert sdist.name == f"osgd_jax-{version}.tar.gz"
  assert wheel.name == f"osgd_jax-{version}-py3-none-any.whl"
  with tarfile.open(sdist) as tar:
    names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
  for name in (
    "pyproject.toml",
    "README.md",
    "LICENSE",
    "CHANGELOG.md",
    "osgd_jax/py.typed",
    "osgd_jax/app/train/cli.py",
  ):
    assert name in names, name
  with zipfile.ZipFile(wheel) as whl:
    wheel_names = set(whl.namelist())
    metadata = email.message_from_bytes(
      whl.read(f"osgd_jax-{version}.dist-info/METADATA")
    )
  assert "osgd_jax/py.typed" in wheel_names
  assert not any(n.startswith(("tests/", "benchmarks/")) for n in wheel_names)
  assert metadata["Version"] == version
  assert metadata["License-Expression"] == PROJECT["license"]
  assert set(metadata.get_all("Provides-Extra")) == set(
    PROJECT["optional-dependencies"]
  )


@pytest.mark.parametrize("which", ["sdist", "wheel"])
def test_each_dist_installs_into_a_fresh_venv_and_imports(
  dists, which, tmp_path
):
  dist = dists[0] if which == "sdist" else dists[1]
  env = tmp_path / "venv"
  venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env)
  python = env / "bin" / "python"
  install = subprocess.run(
    [
      sys.executable,
      "-m",
      "pip",
      "--python",
      str(python),
      "install",
      "--no-deps",
      "--no-index",
      "--no-build-isolation",
      "--quiet",
      str(dist),
    ],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert install.returncode == 0, install.stderr[-3000:]
  probe = subprocess.run(
    [
      str(python),
      "-I",
      "-c",
      "import importlib.metadata, osgd_jax, osgd_jax.app.train.cli;"
      "print(osgd_jax.__version__, importlib.metadata.version('osgd-jax'),"
      " osgd_jax.__file__)",
    ],
    cwd=tmp_path,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert probe.returncode == 0, probe.stderr[-3000:]
  version, installed, where = probe.stdout.split()
  assert version == installed == osgd_jax.__version__
  assert pathlib.Path(where).is_relative_to(env), where
  assert (env / "bin" / "osgd-train").is_file()
