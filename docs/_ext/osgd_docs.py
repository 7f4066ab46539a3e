"""Sphinx helpers of the osgd-jax documentation: one page per public face.

A *public module* is one whose dotted name has no part starting with an
underscore (``osgd_jax.aggregation._osgd`` is private). A *face* is a public
package (``osgd_jax``, ``osgd_jax.aggregation``, ``osgd_jax.zoo``, ...) or a
public module directly in ``osgd_jax`` (``osgd_jax.grads``, ...); each face
has one page, ``api/<face>``, that says ``.. face:: <face>``. Any other public
module (``osgd_jax.zoo.blocks``, ``osgd_jax.app.train.config``) is a section
of the page of the face that holds it.

Every object is documented once, at its *home*: of the faces whose
``__all__`` list it, the deepest that holds the module defining it (the
module of a function or class, or where a constant's ``#:`` comment is),
else the deepest of them; an object that no face lists is documented in the
section of the public module that does. ``osgd_jax.osgd`` and
``osgd_jax.aggregation.osgd`` are one function: it is documented on the
page of ``osgd_jax.aggregation``, and every other public name of it is
registered as an alias of that entry, so that ``:func:`osgd_jax.osgd```
resolves, ``objects.inv`` lists both names, and a search finds one
description, not two.

* :func:`home_of` maps each public name to its home, :func:`public_aliases`
  each home to its other public names;
* the ``face`` directive writes a face's page: its docstring, its
  ``__all__`` (``public-names``: each name with the first paragraph of its
  docstring, linked to its entry), the entries of the names whose home it
  is, then a section per public module it holds;
* ``doctree-read`` registers the aliases next to the entries autodoc made,
  and drops the names autodoc gives classes at their defining, private,
  modules (``:canonical:``), so that ``objects.inv`` holds public names only;
* a docstring's unqualified names resolve in the public module it is written
  in, as they did when each object was documented there;
* a constant documented away from its module gets its ``#:`` comment;
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
from sphinx.errors import PycodeError
from sphinx.pycode import ModuleAnalyzer
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import make_refnode, nested_parse_with_titles

PACKAGE = "osgd_jax"
API = "api"  # the folder of the face pages

logger = logging.getLogger(__name__)


def is_public(module_name: str) -> bool:
  """Whether no part of ``module_name`` starts with an underscore."""
  return not any(part.startswith("_") for part in module_name.split("."))


@functools.cache
def all_modules() -> tuple[str, ...]:
  """Every module of the package, private ones too, ``__main__`` aside."""
  root = importlib.import_module(PACKAGE)
  return (PACKAGE,) + tuple(
    sorted(
      m.name
      for m in pkgutil.walk_packages(root.__path__, PACKAGE + ".")
      if not m.name.endswith(".__main__")
    )
  )


def public_modules() -> list[str]:
  """The public modules, sorted: every name of their ``__all__`` is public."""
  return [name for name in all_modules() if is_public(name)]


def _is_package(module: Any) -> bool:
  return hasattr(module, "__path__")


def is_face(module_name: str) -> bool:
  """Whether a public module has a page: a package, or a top-level module."""
  return module_name.rpartition(".")[0] == PACKAGE or _is_package(
    importlib.import_module(module_name)
  )


def faces() -> list[str]:
  """The public modules that have a page of their own, sorted."""
  return [name for name in public_modules() if is_face(name)]


def face_of(module_name: str) -> str:
  """The deepest face that is ``module_name`` or a package holding it."""
  return max(
    (f for f in faces() if module_name == f or module_name.startswith(f + ".")),
    key=lambda f: f.count("."),
  )


def sections_of(face: str) -> list[str]:
  """The public modules, other than ``face``, documented on its page."""
  return [m for m in public_modules() if m != face and face_of(m) == face]


def _names(module_name: str) -> list[str]:
  return list(getattr(importlib.import_module(module_name), "__all__", ()))


def _is_definition(obj: Any) -> bool:
  """Functions and classes: the same object under any name is the same."""
  return inspect.isfunction(obj) or inspect.isclass(obj)


@functools.cache
def _attr_docs(module_name: str) -> dict[tuple[str, str], list[str]]:
  try:
    analyzer = ModuleAnalyzer.for_module(module_name)
    analyzer.analyze()
  except PycodeError:
    return {}
  return analyzer.attr_docs


def _comment_home(obj: Any, name: str) -> str | None:
  """The module, private ones included, with ``name``'s ``#:`` comment."""
  for module_name in all_modules():
    module = importlib.import_module(module_name)
    if getattr(module, name, None) is obj and ("", name) in _attr_docs(
      module_name
    ):
      return module_name
  return None


def comment_of(obj: Any, name: str) -> list[str]:
  """The ``#:`` comment of a constant, from the module that defines it."""
  module_name = _comment_home(obj, name)
  return (
    [] if module_name is None else list(_attr_docs(module_name)[("", name)])
  )


def _defining_module(obj: Any, name: str) -> str | None:
  if _is_definition(obj):
    return obj.__module__
  return _comment_home(obj, name)


@functools.cache
def _homes() -> dict[tuple[str, str], str]:
  """``(public module, name in its __all__)`` -> the dotted name of its entry.

  A module in an ``__all__`` is its own home.
  """
  listed = [(m, n) for m in public_modules() for n in _names(m)]
  homes = {}
  for module_name, name in listed:
    obj = getattr(importlib.import_module(module_name), name)
    if inspect.ismodule(obj):
      homes[module_name, name] = obj.__name__
      continue
    same = [
      (m, n)
      for m, n in listed
      if getattr(importlib.import_module(m), n) is obj
      and (_is_definition(obj) or n == name)
    ]
    # A module of the same name takes ``osgd_jax.app.data.augment``: the
    # function ``augment`` is documented in that module's section.
    same = [(m, n) for m, n in same if f"{m}.{n}" not in all_modules()]
    pool = [(m, n) for m, n in same if is_face(m)] or same
    defining = _defining_module(obj, name) or ""

    def rank(candidate, defining=defining):
      holds = defining == candidate[0] or defining.startswith(
        candidate[0] + "."
      )
      return (not holds, -candidate[0].count("."), candidate)

    home_module, home_name = min(pool, key=rank)
    homes[module_name, name] = f"{home_module}.{home_name}"
  return homes


def home_of(module_name: str, name: str) -> str:
  """The dotted name of the entry that documents ``module_name.name``."""
  return _homes()[module_name, name]


def public_aliases() -> dict[str, list[str]]:
  """Home -> the other public names of the same object."""
  aliases: dict[str, list[str]] = {}
  for (module_name, name), home in _homes().items():
    full = f"{module_name}.{name}"
    if (
      home != full
      and full not in all_modules()
      and not inspect.ismodule(
        getattr(importlib.import_module(module_name), name)
      )
    ):
      aliases.setdefault(home, []).append(full)
  return aliases


@functools.cache
def _private_to_home() -> dict[str, str]:
  """``module.__qualname__`` of each class at a private module -> its home."""
  found = {}
  for (module_name, name), home in _homes().items():
    obj = getattr(importlib.import_module(module_name), name)
    if inspect.isclass(obj) and not is_public(obj.__module__):
      found[f"{obj.__module__}.{obj.__qualname__}"] = home
  return found


def _register_aliases(app, doctree) -> None:
  """Registers each described object's other public names as its aliases.

  A class's members get them too: ``osgd_jax.OsgdState.cosine`` is
  ``osgd_jax.aggregation.OsgdState.cosine``. The private names autodoc
  registers (a class's ``:canonical:`` name) are dropped.
  """
  aliases = public_aliases()
  domain = app.env.get_domain("py")
  for sig in doctree.findall(addnodes.desc_signature):
    if sig.parent.get("domain") != "py" or not sig.get("ids"):
      continue
    parts = f"{sig.get('module')}.{sig.get('fullname')}".split(".")
    for end in range(len(parts), 0, -1):
      rest = ".".join(parts[end:])
      for alias in aliases.get(".".join(parts[:end]), ()):
        name = f"{alias}.{rest}" if rest else alias
        if getattr(domain.objects.get(name), "node_id", None) != sig["ids"][0]:
          domain.note_object(
            name,
            sig.parent["objtype"],
            sig["ids"][0],
            aliased=True,
            location=sig,
          )
  objects = domain.data["objects"]
  for name in [
    n
    for n, entry in objects.items()
    if entry.docname == app.env.docname
    and n.startswith(PACKAGE)
    and not is_public(n)
  ]:
    del objects[name]


def source_module(obj: Any, name: str, home_module: str) -> str:
  """Where ``obj``'s docstring is written, if public; else ``home_module``.

  Its relative references (``:data:`RESUMABLE_CHANGES```) were written for
  that module: they resolve there, wherever the entry is.
  """
  module_name = _defining_module(obj, name)
  return (
    module_name
    if module_name is not None and is_public(module_name)
    else home_module
  )


def _described(node) -> str | None:
  """The dotted name of the top-level entry whose description holds node."""
  found = None
  for ancestor in _ancestors(node):
    if isinstance(ancestor, addnodes.desc) and ancestor.get("domain") == "py":
      sig = next(iter(ancestor.findall(addnodes.desc_signature)), None)
      if sig is not None and sig.get("module"):
        found = f"{sig['module']}.{sig['fullname'].split('.')[0]}"
  return found


def _resolve_in_source(app, env, node, contnode):
  """Resolves what a docstring names relative to the module it is written in.

  A function or class documented at a face (``osgd_jax.app.train.train``)
  was written in a public module (``osgd_jax.app.train.loop``) whose names
  its docstring may use unqualified; autodoc resolves them at the face.

  A signature's annotation that names a class by its private defining
  module (``osgd_jax.aggregation._engine.StatefulWeighting``, as autodoc
  writes it) links to the class's entry; a docstring that names a private
  module stays a broken reference.
  """
  if node.get("refdomain") != "py":
    return None
  domain = env.get_domain("py")
  home = _private_to_home().get(node.get("reftarget", ""))
  if home is not None:
    entry = domain.objects.get(home)
    if entry is None or not any(
      isinstance(n, addnodes.desc_signature) for n in _ancestors(node)
    ):
      return None
    return make_refnode(
      app.builder, node["refdoc"], entry.docname, entry.node_id, contnode, home
    )
  described = _described(node)
  if described is None:
    return None
  module_name, _, name = described.rpartition(".")
  try:
    obj = getattr(importlib.import_module(module_name), name)
  except (ImportError, AttributeError):
    return None
  source = source_module(obj, name, module_name)
  if source == node.get("py:module"):
    return None
  retry = node.deepcopy()
  retry["py:module"] = source
  return domain.resolve_xref(
    env,
    node["refdoc"],
    app.builder,
    node["reftype"],
    node["reftarget"],
    retry,
    contnode,
  )


def _ancestors(node):
  while node is not None:
    yield node
    node = node.parent


def _skip_namedtuple_fields(app, what, name, obj, skip, options):
  del app, name, skip, options
  if what == "class" and (getattr(obj, "__doc__", None) or "").startswith(
    "Alias for field number"
  ):
    return True  # the class's Attributes: section documents the field
  return None


def _constant_comment(app, what, name, obj, options, lines) -> None:
  """A constant documented away from its module: its ``#:`` comment.

  Without one, autodoc would show the docstring of the value's type.
  """
  del app, options
  if what != "data":
    return
  comment = comment_of(obj, name.rpartition(".")[2])
  if comment:
    lines[:] = comment
  elif (
    lines
    and " ".join(lines).strip()
    == " ".join((inspect.getdoc(type(obj)) or "").split("\n")).strip()
  ):
    lines[:] = []


def _summary(home: str, obj: Any) -> str:
  """The first paragraph of ``obj``'s docstring, or of a constant's ``#:``."""
  if inspect.ismodule(obj) or _is_definition(obj):
    doc = inspect.getdoc(obj) or ""
  else:
    doc = "\n".join(comment_of(obj, home.rpartition(".")[2]))
  return " ".join(doc.strip().split("\n\n")[0].split())


class PublicNames(SphinxDirective):
  """``.. public-names:: osgd_jax.zoo``: the module's ``__all__``, linked.

  Each name comes with the first paragraph of its docstring, parsed where
  its relative references (``:data:`NORMS```) resolve: in the public module
  the docstring is written in, else in the module of its entry. A name
  documented on another face's page says which; another name of an object
  (``PCGradState`` of ``KeyState``) says so.
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
        role = "py:mod" if inspect.ismodule(obj) else "py:obj"
        summary = _summary(home, obj)
        home_module = home if inspect.ismodule(obj) else home.rpartition(".")[0]
        ref_context["py:module"] = (
          home_module
          if inspect.ismodule(obj)
          else source_module(obj, name, home_module)
        )
        where = face_of(home_module)
        home_name = home.rpartition(".")[2]
        if not inspect.ismodule(obj) and home_name != name:
          summary = f"another name of :py:obj:`{home_name} <{home}>`."
        line = f":{role}:`{name} <{home}>`" + (
          f": {summary}" if summary else ""
        )
        if not inspect.ismodule(obj) and where != face_of(package):
          line += f" (in :py:mod:`{where}`)"
        item = nodes.list_item()
        self.state.nested_parse(
          StringList([line], self.get_source_info()[0]), 0, item
        )
        items += item
    finally:
      if saved is None:
        ref_context.pop("py:module", None)
      else:
        ref_context["py:module"] = saved
    return [items]


def _entry(full_name: str, obj: Any) -> list[str]:
  """The autodoc directive that documents ``obj`` as ``full_name``."""
  if inspect.isclass(obj):
    kind = "exception" if issubclass(obj, BaseException) else "class"
    return [f".. auto{kind}:: {full_name}", "   :members:", ""]
  if inspect.isfunction(obj):
    return [f".. autofunction:: {full_name}", ""]
  return [f".. autodata:: {full_name}", ""]


def _title(text: str, underline: str) -> list[str]:
  return [text, underline * len(text), ""]


class Face(SphinxDirective):
  """``.. face:: osgd_jax.zoo``: the page of a face (see the module's doc).

  The page is ``api/<face>``; the directive writes all that is below its
  title: the face's docstring, its ``public-names`` (a package's), the
  entries of the names whose home it is, and a section per public module
  it holds, with that module's docstring and the entries of its other names.
  """

  required_arguments = 1

  def run(self) -> list[nodes.Node]:
    face = self.arguments[0]
    if face not in faces():
      raise self.error(f"{face} is not a face: {', '.join(faces())}")
    if self.env.docname != f"{API}/{face}":
      raise self.error(f"the page of {face} is {API}/{face}")
    lines = [f".. automodule:: {face}", ""]
    package = _is_package(importlib.import_module(face))
    if _names(face) and package:
      lines += _title("Public names", "-")
      lines += [f".. public-names:: {face}", ""]
    elif _names(face):
      lines += self._elsewhere(face, "elsewhere")
    own = self._own_entries(face)
    if own and package:
      lines += _title("Reference", "-")
    lines += own
    for module_name in sections_of(face):
      lines += _title(f"``{module_name}``", "-")
      lines += [f".. automodule:: {module_name}", ""]
      lines += self._elsewhere(module_name, "above")
      lines += self._own_entries(module_name)
    node = nodes.section()
    node.document = self.state.document
    nested_parse_with_titles(
      self.state, StringList(lines, f"<face {face}>"), node
    )
    return node.children

  @staticmethod
  def _elsewhere(module_name: str, where: str) -> list[str]:
    """A line that links the names ``module_name`` exports from elsewhere."""
    links = [
      f":py:obj:`{name} <{home_of(module_name, name)}>`"
      for name in _names(module_name)
      if home_of(module_name, name) != f"{module_name}.{name}"
    ]
    return (
      [f"Also exports, documented {where}: {', '.join(links)}.", ""]
      if links
      else []
    )

  @staticmethod
  def _own_entries(module_name: str) -> list[str]:
    module = importlib.import_module(module_name)
    lines = []
    for name in _names(module_name):
      obj = getattr(module, name)
      full = f"{module_name}.{name}"
      if not inspect.ismodule(obj) and home_of(module_name, name) == full:
        lines += _entry(full, obj)
    return lines


def _check_pages(app, env) -> None:
  """Every face has its page, and ``api/`` has no other page."""
  pages = {d for d in env.found_docs if d.startswith(API + "/")}
  wanted = {f"{API}/{face}" for face in faces()} | {f"{API}/index"}
  for page in sorted(wanted - pages):
    logger.warning("the face %s has no page %s.rst", page.split("/")[1], page)
  for page in sorted(pages - wanted):
    logger.warning(
      "%s documents no face (private modules and the modules a"
      " face holds have no page)",
      page,
      location=page,
    )


def setup(app):
  app.connect("doctree-read", _register_aliases)
  app.connect("missing-reference", _resolve_in_source)
  app.connect("env-check-consistency", _check_pages)
  app.connect("autodoc-skip-member", _skip_namedtuple_fields)
  app.connect("autodoc-process-docstring", _constant_comment)
  app.add_directive("public-names", PublicNames)
  app.add_directive("face", Face)
  return {
    "parallel_read_safe": True,
    "parallel_write_safe": True,
    "env_version": 2,
  }
