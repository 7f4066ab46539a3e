"""Sphinx helpers of the osgd-jax documentation: one entry per object.

The library's packages (``osgd_jax``, ``osgd_jax.zoo``, ``osgd_jax.app.data``,
``osgd_jax.app.train``) re-export what their modules define. Every object is
documented once, on the page of the module that defines it; the names a
package re-exports it under (``osgd_jax.osgd`` for
``osgd_jax.transform.osgd``) are registered as aliases of that entry, so
that ``:func:`osgd_jax.osgd``` resolves, ``objects.inv`` lists both names,
and a search for ``osgd`` finds one description, not two.

* :func:`public_aliases` maps each defining name to the names it is
  re-exported under, read from the packages' ``__all__``;
* ``doctree-read`` registers those aliases next to the entries autodoc made;
* the ``public-names`` directive lists a package's ``__all__``, each name
  with the first paragraph of its docstring and a link to its entry;
* NamedTuple fields are left to their class's ``Attributes:`` section
  (autodoc would add a second, "Alias for field number 0", entry).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import pkgutil
from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx import addnodes
from sphinx.pycode import ModuleAnalyzer
from sphinx.util.docutils import SphinxDirective

PACKAGE = "osgd_jax"


def public_modules() -> list[str]:
  """Every module of the package, ``__main__`` aside, sorted."""
  root = importlib.import_module(PACKAGE)
  return [PACKAGE] + sorted(
      m.name for m in pkgutil.walk_packages(root.__path__, PACKAGE + ".")
      if not m.name.endswith(".__main__"))


def _is_package(module: Any) -> bool:
  return hasattr(module, "__path__")


def home_of(package: str, name: str) -> str | None:
  """The dotted name of the module entry that documents ``package.name``.

  Functions and classes live where they are defined. A constant has no
  ``__module__``: its home is the module below ``package`` whose
  ``__all__`` lists the same object under the same name (where its ``#:``
  comment is). A module is its own home.
  """
  obj = getattr(importlib.import_module(package), name)
  if inspect.ismodule(obj):
    return obj.__name__
  if inspect.isfunction(obj) or inspect.isclass(obj):
    return f"{obj.__module__}.{obj.__qualname__}"
  for module_name in public_modules():
    if module_name.startswith(package + ".") and module_name != package:
      module = importlib.import_module(module_name)
      if (not _is_package(module) and name in getattr(module, "__all__", ())
          and getattr(module, name) is obj):
        return f"{module_name}.{name}"
  return None


def public_aliases() -> dict[str, list[str]]:
  """Defining name -> the ``package.name`` paths that re-export it."""
  aliases: dict[str, list[str]] = {}
  for package in public_modules():
    module = importlib.import_module(package)
    if not _is_package(module):
      continue
    for name in getattr(module, "__all__", ()):
      home = home_of(package, name)
      alias = f"{package}.{name}"
      if home is not None and home != alias:
        aliases.setdefault(home, []).append(alias)
  return aliases


def _register_aliases(app, doctree, *, aliases: dict[str, list[str]]) -> None:
  """Registers each described object's re-exported names as its aliases.

  A class's members get them too: ``osgd_jax.OsgdState.cosine`` is
  ``osgd_jax.transform.OsgdState.cosine``.
  """
  domain = app.env.get_domain("py")
  for sig in doctree.findall(addnodes.desc_signature):
    if sig.parent.get("domain") != "py" or not sig.get("ids"):
      continue
    parts = f"{sig.get('module')}.{sig.get('fullname')}".split(".")
    for end in range(len(parts), 0, -1):
      rest = ".".join(parts[end:])
      for alias in aliases.get(".".join(parts[:end]), ()):
        domain.note_object(f"{alias}.{rest}" if rest else alias,
                           sig.parent["objtype"], sig["ids"][0],
                           aliased=True, location=sig)


def _skip_namedtuple_fields(app, what, name, obj, skip, options):
  del app, name, skip, options
  if what == "class" and (getattr(obj, "__doc__", None) or "").startswith(
      "Alias for field number"):
    return True  # the class's Attributes: section documents the field
  return None


def _summary(home: str, obj: Any) -> str:
  """The first paragraph of ``obj``'s docstring, or of a constant's ``#:``."""
  if inspect.ismodule(obj) or inspect.isfunction(obj) or inspect.isclass(obj):
    doc = inspect.getdoc(obj) or ""
  else:
    module, _, name = home.rpartition(".")
    doc = "\n".join(ModuleAnalyzer.for_module(module).find_attr_docs().get(
        ("", name), []))
  return " ".join(doc.strip().split("\n\n")[0].split())


class PublicNames(SphinxDirective):
  """``.. public-names:: osgd_jax.zoo``: the package's ``__all__``, linked.

  Each entry is parsed in its home module, where the relative references of
  its summary (``:data:`NORMS```) resolve.
  """

  required_arguments = 1

  def run(self) -> list[nodes.Node]:
    package = self.arguments[0]
    module = importlib.import_module(package)
    items = nodes.bullet_list()
    ref_context = self.env.ref_context
    saved = ref_context.get("py:module")
    try:
      for name in module.__all__:
        obj = getattr(module, name)
        home = home_of(package, name)
        if home is None:
          raise self.error(f"{package}.{name}: no module below {package}"
                           " defines it; document it there")
        role = "py:mod" if inspect.ismodule(obj) else "py:obj"
        summary = _summary(home, obj)
        ref_context["py:module"] = (home if inspect.ismodule(obj)
                                    else home.rpartition(".")[0])
        item = nodes.list_item()
        self.state.nested_parse(
            StringList([f":{role}:`{name} <{home}>`"
                        + (f": {summary}" if summary else "")],
                       self.get_source_info()[0]), 0, item)
        items += item
    finally:
      if saved is None:
        ref_context.pop("py:module", None)
      else:
        ref_context["py:module"] = saved
    return [items]


def setup(app):
  app.connect("doctree-read", functools.partial(_register_aliases,
                                                aliases=public_aliases()))
  app.connect("autodoc-skip-member", _skip_namedtuple_fields)
  app.add_directive("public-names", PublicNames)
  return {"parallel_read_safe": True, "parallel_write_safe": True,
          "env_version": 1}
