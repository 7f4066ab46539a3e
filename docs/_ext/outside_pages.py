"""Pages of the repository outside docs/, built as pages of the site.

Sphinx reads sources under its source directory only, and the notebooks
(``notebooks/``) and the benchmarks' results (``benchmarks/``) live where
their readers find them on GitHub. When a build starts, the files that
``outside_pages`` names (folder -> glob patterns, relative to the
repository) are copied into ``docs/_generated/<folder>/``, a git-ignored
folder, so their relative links to each other keep working.

A page links to one of them by its path in the repository
(``[results](../../benchmarks/RESULTS.md)``), which is right on GitHub;
MyST could not find that document, and this extension points the link at
the page built from the copy.
"""

from __future__ import annotations

import pathlib
import shutil

from sphinx import addnodes
from sphinx.transforms import SphinxTransform

GENERATED = "_generated"


def _copy_outside_pages(app, config) -> None:
  """Copies the outside pages, keeping unchanged copies (and their mtimes).

  An unchanged file is not copied again, so an incremental build does not
  re-read it; a file gone from its folder is removed from the copies.
  """
  srcdir = pathlib.Path(app.srcdir)
  root = srcdir.parent
  for folder, patterns in config.outside_pages.items():
    target = srcdir / GENERATED / folder
    target.mkdir(parents=True, exist_ok=True)
    sources = {
      p.name: p for pattern in patterns for p in (root / folder).glob(pattern)
    }
    for stale in {p.name for p in target.iterdir()} - set(sources):
      (target / stale).unlink()
    for name, source in sources.items():
      copy = target / name
      if not copy.exists() or copy.read_bytes() != source.read_bytes():
        shutil.copy2(source, copy)


class OutsidePageLinks(SphinxTransform):
  """Points a link to an outside page at the page built from its copy."""

  default_priority = 500

  def apply(self, **kwargs) -> None:
    srcdir = pathlib.Path(self.env.srcdir)
    root = srcdir.parent
    for node in self.document.findall(addnodes.pending_xref):
      if node.get("refdomain") != "doc" or node.get("reftype") != "myst":
        continue
      # MyST gives a file outside the source directory its absolute path.
      try:
        relative = (srcdir / node["reftarget"]).resolve().relative_to(root)
      except ValueError:
        continue
      docname = f"{GENERATED}/{relative.as_posix()}"
      if (
        relative.parts[0] in self.config.outside_pages
        and docname in self.env.found_docs
      ):
        node["reftarget"] = docname


def setup(app):
  app.add_config_value("outside_pages", {}, "env", types=[dict])
  app.connect("config-inited", _copy_outside_pages)
  app.add_transform(OutsidePageLinks)
  return {"parallel_read_safe": True, "parallel_write_safe": True}
