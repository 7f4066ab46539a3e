"""The distribution's metadata: dependencies, extras, version, license, URLs."""

from __future__ import annotations

import importlib.metadata
import pathlib
import re
import tomllib

import yaml

import osgd_jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]


def _names(requirements):
  return [
    re.match(r"[A-Za-z0-9._-]+(\[[^]]*\])?", r).group(0) for r in requirements
  ]


def test_the_library_depends_on_jax_optax_flax_and_numpy_only():
  assert sorted(_names(PROJECT["dependencies"])) == [
    "flax",
    "jax",
    "jaxlib",
    "numpy",
    "optax",
  ]


def test_the_app_and_test_extras():
  extras = PROJECT["optional-dependencies"]
  assert sorted(_names(extras["app"])) == [
    "matplotlib",
    "mnist1d",
    "orbax-checkpoint",
    "pooch",
    "pyyaml",
    "scikit-learn",
    "scipy",
    "tqdm",
  ]
  assert sorted(_names(extras["test"])) == [
    "build",
    "chex",
    "hypothesis",
    "ipykernel",
    "nbclient",
    "nbformat",
    "osgd-jax[app,tensorboard]",
    "osgd-jax[docs]",
    "osgd-jax[lint]",
    "pytest",
    "pytest-xdist",
    "setuptools",
  ]
  assert _names(extras["tensorboard"]) == ["tensorboardX"]
  # .ci/run and pre-commit run these; pinned, so a release cannot turn CI red.
  assert extras["lint"] == ["ruff==0.17.6", "basedpyright==1.40.2"]


def test_the_docs_extra_is_sphinx_and_myst_nb_with_the_app():
  # tests/test_docs.py builds the site, so the test extra installs it; the
  # API reference imports the application, so the site needs the app extra.
  assert sorted(_names(PROJECT["optional-dependencies"]["docs"])) == [
    "myst-nb",
    "osgd-jax[app]",
    "sphinx",
  ]


def test_the_version_has_one_source():
  assert "version" not in PROJECT and "version" in PROJECT["dynamic"]
  assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {
    "attr": "osgd_jax.__version__"
  }
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
    "py.typed"
  ]


def test_the_project_urls_point_into_the_repository():
  urls = PROJECT["urls"]
  repository = urls["Repository"]
  assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", repository)
  assert urls["Homepage"] == repository
  assert urls["Issues"] == f"{repository}/issues"
  assert urls["Changelog"] == f"{repository}/blob/main/CHANGELOG.md"
  assert urls["Documentation"].startswith(f"{repository}/")


# Links to a GitHub repository of the project's owner, or to any notebook
# Colab opens from GitHub; they end where Markdown, JSON or Python would end
# them.
_LINK_END = r"[^\s()\[\]<>\"'`\\]*"


def _documents() -> list[pathlib.Path]:
  # docs/ may hold a Sphinx site (.rst, conf.py, notebooks) besides Markdown.
  found = [ROOT / "README.md"]
  for folder in ("docs", "notebooks"):
    found += sorted(
      p
      for p in (ROOT / folder).rglob("*")
      if p.suffix in (".md", ".rst", ".py", ".ipynb")
    )
  return found


def test_every_link_to_the_repository_is_the_project_url():
  repository = PROJECT["urls"]["Repository"]
  owner = repository.split("/")[3]
  link = re.compile(
    rf"https?://(?:colab\.research\.google\.com/github/[\w.-]+|github\.com/"
    rf"{re.escape(owner)})/{_LINK_END}"
  )
  found = []
  for path in _documents():
    for match in link.finditer(path.read_text(encoding="utf-8")):
      url = re.sub(
        r"^https?://colab\.research\.google\.com/github/",
        "https://github.com/",
        match.group(0),
      ).rstrip(".,;:")
      found.append(url)
      where = f"{path.relative_to(ROOT)}: {match.group(0)}"
      assert url == repository or url.startswith(f"{repository}/"), where
      # A link to a file of the repository names one that exists.
      inside = re.match(
        rf"{re.escape(repository)}/(?:blob|tree)/main/(.+)", url
      )
      if inside:
        assert (ROOT / inside.group(1)).exists(), where
  # The three notebooks' Colab badges and install commands at least.
  assert len(found) >= 6, found


def test_pre_commit_runs_what_ci_runs_before_the_tests():
  # The hooks are local (language: system), so pre-commit downloads nothing,
  # and each runs a command that .ci/run runs before README's test command.
  config = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())
  (repo,) = config["repos"]
  assert repo["repo"] == "local"
  entries = [hook["entry"] for hook in repo["hooks"]]
  assert {hook["language"] for hook in repo["hooks"]} == {"system"}
  ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
  checks = [
    line
    for line in ci_lines
    if line.split()[:1] in (["ruff"], ["basedpyright"])
  ]
  assert [line.removesuffix(" .") for line in checks] == entries
  readme_command = 'python -m pip install -e ".[test]" && python -m pytest'
  assert ci_lines[-1] == readme_command
  assert readme_command in (ROOT / "README.md").read_text()
