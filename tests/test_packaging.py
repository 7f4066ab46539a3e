"""The distribution's metadata: dependencies, extras, version, license."""

from __future__ import annotations

import importlib.metadata
import pathlib
import re
import tomllib

import osgd_jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]


def _names(requirements):
  return [re.match(r"[A-Za-z0-9._-]+(\[[^]]*\])?", r).group(0)
          for r in requirements]


def test_the_library_depends_on_jax_optax_flax_and_numpy_only():
  assert sorted(_names(PROJECT["dependencies"])) == [
      "flax", "jax", "jaxlib", "numpy", "optax"]


def test_the_app_and_test_extras():
  extras = PROJECT["optional-dependencies"]
  assert sorted(_names(extras["app"])) == [
      "matplotlib", "orbax-checkpoint", "pyyaml", "scikit-learn", "scipy",
      "tqdm"]
  assert sorted(_names(extras["test"])) == [
      "build", "chex", "hypothesis", "ipykernel", "nbclient", "nbformat",
      "osgd-jax[app,tensorboard]", "pytest", "pytest-xdist", "setuptools"]
  assert _names(extras["tensorboard"]) == ["tensorboardX"]


def test_the_version_has_one_source():
  assert "version" not in PROJECT and "version" in PROJECT["dynamic"]
  assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {
      "attr": "osgd_jax.__version__"}
  assert re.fullmatch(r"\d+\.\d+\.\d+", osgd_jax.__version__)
  # The installed metadata was built from that attribute.
  assert importlib.metadata.version("osgd-jax") == osgd_jax.__version__


def test_license_is_an_spdx_expression_with_its_text():
  assert PROJECT["license"] == "Apache-2.0"
  assert PROJECT["license-files"] == ["LICENSE"]
  text = (ROOT / "LICENSE").read_text()
  assert "Apache License" in text and "Version 2.0, January 2004" in text
  assert "END OF TERMS AND CONDITIONS" in text
  # PEP 639 needs setuptools 77 to build it.
  assert PYPROJECT["build-system"]["requires"] == ["setuptools>=77"]
  assert not any(c.startswith("License ::") for c in PROJECT["classifiers"])


def test_python_versions_and_typing_marker():
  classifiers = PROJECT["classifiers"]
  for version in ("3.11", "3.12", "3.13"):
    assert f"Programming Language :: Python :: {version}" in classifiers
  assert PROJECT["requires-python"] == ">=3.11"
  assert (ROOT / "osgd_jax" / "py.typed").is_file()
  assert "Typing :: Typed" in classifiers
  assert PYPROJECT["tool"]["setuptools"]["package-data"]["osgd_jax"] == [
      "py.typed"]
