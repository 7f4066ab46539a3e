"""Sphinx configuration of the osgd-jax documentation.

Build it from the repository root (``tests/test_docs.py`` runs the same
command, warnings as errors)::

    python -m sphinx -W --keep-going -n -b html docs docs/_build/html

The build never touches the network: no intersphinx, and the notebooks are
rendered as stored (without outputs), never executed.
"""

from __future__ import annotations

import importlib
import pathlib
import sys

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
# The checkout's own package is documented, whatever else is installed: it
# is imported only once the checkout leads sys.path.
sys.path[:0] = [str(ROOT), str(DOCS / "_ext")]
osgd_jax = importlib.import_module("osgd_jax")

project = "osgd-jax"
author = "osgd-jax developers"
copyright = "2026, osgd-jax developers"  # pylint: disable=redefined-builtin
release = version = osgd_jax.__version__

extensions = [
  "sphinx.ext.autodoc",
  "sphinx.ext.napoleon",
  "myst_nb",  # Markdown pages (MyST) and notebooks
  "osgd_docs",  # docs/_ext: one entry per object, re-exports as aliases
  "outside_pages",  # docs/_ext: notebooks/ and benchmarks/ as pages
]

# The notebooks and the benchmarks' results are pages too (docs/_ext/
# outside_pages.py copies them into the git-ignored docs/_generated/).
outside_pages = {
  "notebooks": ("README.md", "*.ipynb"),
  "benchmarks": ("README.md", "RESULTS.md"),
}

exclude_patterns = ["_build"]
source_suffix = {
  ".rst": "restructuredtext",
  ".md": "myst-nb",
  ".ipynb": "myst-nb",
}

# --- API reference ---------------------------------------------------------
# A module's page is `automodule :members:`: what its __all__ lists, those
# with a docstring (or a `#:` comment). A package's page lists what it
# re-exports (`public-names`). tests/test_docs.py checks that every name of
# every public module's __all__ reaches objects.inv.
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# -n: every cross-reference must resolve. Without intersphinx (it would
# fetch inventories) the names of other packages cannot; these are ignored.
nitpicky = True
nitpick_ignore_regex = [
  (
    r"py:.*",
    r"(jax|jaxlib|optax|flax|numpy|np|jnp|chex|orbax|matplotlib"
    r"|argparse|collections|types|pathlib|os|concurrent)\..*",
  ),
]

# --- Markdown and notebooks ----------------------------------------------
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3
nb_execution_mode = "off"  # the notebooks are stored without outputs

# --- HTML --------------------------------------------------------------------
# Sphinx's own theme: no dependency beyond Sphinx, and the cheapest to build
# (the docs are built by the test suite).
html_theme = "alabaster"
html_title = f"osgd-jax {version}"
html_theme_options = {
  "description": "Orthogonalized SGD and nested anytime networks in JAX",
  "page_width": "1160px",
  "sidebar_width": "250px",
  "fixed_sidebar": True,
}
