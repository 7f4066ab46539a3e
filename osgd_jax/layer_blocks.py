"""Per-layer Gram blocks: the Gram matrix from layer inputs and cotangents.

The ``"blocks"`` formulation of :func:`~osgd_jax.gramian.value_and_gramian`
(``docs/design.md``, "The Gramian engine"). A parameter ``W`` that enters the
loss only as an operand of matrix products ``y_u = x_u · W`` (``dot_general``
with no batch dimension on ``W``'s side: dense layers, einsum projections, a
head shared by several exits; also through transposes, dtype changes,
slices and concatenations, as a MatFormer's nested widths use it) has exit
k's gradient

    g_k = Σ_u x_uᵀ δ_{u,k},      δ_{u,k} = ∂ℓ_k / ∂y_u,

so its K×K Gram block is

    M_W[i, j] = Σ_{u,v} ⟨δ_{u,i}, (x_u x_vᵀ) δ_{v,j}⟩,

which needs the layer inputs ``x_u`` (residuals of the forward pass anyway)
and the output cotangents ``δ_{u,k}``, never the gradients. The cotangents
come from one backward pass carrying the K one-hot cotangents that stops at
the activations: every ``y_u`` gets a zero perturbation ``e_u`` added, and
the pullback is taken with respect to the perturbations (``∂ℓ_k/∂e_u =
δ_{u,k}``) and the other parameters only, so the weight-gradient products of
the tapped parameters are never formed. This is TorchJD autogram's idea in
JAX's terms: the loss function is traced to a jaxpr once, the matrix
products of parameters are found in it, and it is evaluated again with the
perturbations added (a small jaxpr interpreter, as in JAX's "Writing custom
Jaxpr interpreters").

Per tapped leaf, one of two contractions, whichever holds less:

* ``"kernel"``: ``(x_u x_vᵀ)`` is N×N (N the number of rows of x: batch
  times sequence), multiplied into the K cotangents; memory ``N²`` plus the
  K cotangents.
* ``"rows"``: the leaf's K gradient rows ``Σ_u x_uᵀ δ_{u,k}`` formed and
  contracted (K times the leaf), chosen when ``N² > K·|W|``.

Parameters used any other way (biases, norms, embeddings looked up by
``gather``, convolutions, a parameter inside a nested ``jax.jit``,
``jax.checkpoint`` or ``lax.scan`` such as layers stacked by ``nnx.scan``)
keep their K gradient rows from the same backward pass; where those rows
and the tapped products' cotangents hold more than one copy of the
parameters, ``form="auto"`` picks another formulation.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from osgd_jax import gram as gram_lib
from osgd_jax import sharding
from osgd_jax._gramian_core import (
  Gramian,
  ScaledGramEngine,
  embed_block,
  pullback_of_weights,
)
from osgd_jax.exit_pullback import (
  ExitRows,
  bind_equation,
  one_hot_pullback_rows,
)

__all__ = ["BlocksEngine", "LeafTap", "Use", "find_taps", "tapped_vjp"]

_PRECISION = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class Use:
  """One matrix product ``y = dot_general(·, ·)`` of a tapped parameter.

  The parameter may enter it through transposes, changes of dtype, slices
  and concatenations (an alias of the leaf, or of a block of it, or one
  holding it as a block). Axes are listed in the leaf's order: the k-th
  entry of :attr:`x_contract` is paired with the leaf's k-th contracted
  axis, the k-th entry of :attr:`y_w` holds the leaf's k-th free axis.

  Attributes:
    slot: the index of the tapped product (its perturbation and input).
    w_operand: 0 if the parameter is the left operand, 1 if the right.
    x_contract: the other operand's contracted axes, in the leaf's order.
    x_free: the other operand's remaining axes, in increasing order.
    y_x: the axes of ``y`` that come from :attr:`x_free`, in that order.
    y_w: the axes of ``y`` that come from the leaf, in the leaf's order.
    layout: the permutation from ``(y's leaf axes in y's order, x's
      contracted axes in x's order)`` to the leaf's own axes.
    spans: per leaf axis, ``(start in the operand, start in the leaf,
      length)``: the operand's entries that are the leaf's.
  """

  slot: int
  w_operand: int
  x_contract: tuple[int, ...]
  x_free: tuple[int, ...]
  y_x: tuple[int, ...]
  y_w: tuple[int, ...]
  layout: tuple[int, ...]
  spans: tuple[tuple[int, int, int], ...]


@dataclasses.dataclass(frozen=True)
class LeafTap:
  """A parameter leaf that enters the loss only through matrix products.

  Attributes:
    leaf: its index among the parameter leaves.
    shape: its shape.
    contracted: its contracted axes (the same in every use), increasing.
    uses: its matrix products, at least one.
    contraction: ``"kernel"`` or ``"rows"`` (see the module docstring).
  """

  leaf: int
  shape: tuple[int, ...]
  contracted: tuple[int, ...]
  uses: tuple[Use, ...]
  contraction: str


@dataclasses.dataclass(frozen=True)
class _Entry:
  """A leaf inside an array: its axes and the block it occupies there.

  Axis i of the array is the leaf's axis ``axes[i]``; along it, the
  array's entries ``[start[i], start[i] + length[i])`` are the leaf's
  ``[leaf_start[i], leaf_start[i] + length[i])``.
  """

  leaf: int
  axes: tuple[int, ...]
  start: tuple[int, ...]
  leaf_start: tuple[int, ...]
  length: tuple[int, ...]

  def permuted(self, order: Sequence[int]) -> _Entry:
    return _Entry(
      self.leaf,
      *(tuple(v[a] for a in order) for v in self._per_axis()),
    )

  def _per_axis(self) -> tuple[tuple[int, ...], ...]:
    return (self.axes, self.start, self.leaf_start, self.length)

  def sliced(self, lo: Sequence[int], hi: Sequence[int]) -> _Entry | None:
    """The entry in ``array[lo:hi]``, or ``None`` if it lies outside."""
    start, leaf_start, length = [], [], []
    for i in range(len(self.axes)):
      a = max(self.start[i], lo[i])
      b = min(self.start[i] + self.length[i], hi[i])
      if b <= a:
        return None
      start.append(a - lo[i])
      leaf_start.append(self.leaf_start[i] + a - self.start[i])
      length.append(b - a)
    return _Entry(
      self.leaf, self.axes, tuple(start), tuple(leaf_start), tuple(length)
    )

  def shifted(self, axis: int, offset: int) -> _Entry:
    start = list(self.start)
    start[axis] += offset
    return dataclasses.replace(self, start=tuple(start))


def _dot_use(
  eqn: Any, operand: int, entry: _Entry
) -> tuple[Use, tuple[int, ...]] | None:
  """Operand ``operand`` of a ``dot_general`` as a :class:`Use` of a leaf.

  Returns the use (its slot to be set) and the leaf's contracted axes
  (increasing), or ``None`` for a batched product (per-head weights),
  which is not a plain layer.
  """
  axes = entry.axes
  contract, batch = eqn.params["dimension_numbers"]
  if batch[operand]:
    return None
  other = 1 - operand
  x_ndim = eqn.invars[other].aval.ndim
  pairs = sorted(
    (axes[w], int(x))
    for w, x in zip(contract[operand], contract[other], strict=True)
  )
  x_contract = tuple(x for _, x in pairs)
  x_free = tuple(a for a in range(x_ndim) if a not in x_contract)
  w_free = [a for a in range(len(axes)) if a not in contract[operand]]
  # dot_general's output: batch axes (none), lhs free axes, rhs free axes.
  if operand == 1:
    y_x = tuple(range(len(x_free)))
    y_w_in_order = list(range(len(x_free), len(x_free) + len(w_free)))
  else:
    y_w_in_order = list(range(len(w_free)))
    y_x = tuple(range(len(w_free), len(w_free) + len(x_free)))
  leaf_of_y = dict(zip(y_w_in_order, (axes[a] for a in w_free), strict=True))
  y_w = tuple(sorted(y_w_in_order, key=leaf_of_y.__getitem__))
  leaf_of_x = {x: leaf for leaf, x in pairs}
  value_axes = [leaf_of_y[a] for a in y_w_in_order] + [
    leaf_of_x[a] for a in sorted(x_contract)
  ]
  layout = tuple(value_axes.index(a) for a in range(len(axes)))
  at = {leaf_axis: i for i, leaf_axis in enumerate(axes)}
  spans = tuple(
    (entry.start[at[a]], entry.leaf_start[at[a]], entry.length[at[a]])
    for a in range(len(axes))
  )
  contracted = tuple(leaf for leaf, _ in pairs)
  use = Use(-1, operand, x_contract, x_free, y_x, y_w, layout, spans)
  return use, contracted


def _passed_on(eqn: Any, found: list[Any]) -> tuple[_Entry, ...] | None:
  """The entries of an equation's output that pass leaves on, if it does.

  Transposes, changes of dtype, unit-stride slices and concatenations
  keep a leaf's entries (moved, cut or shifted); any other equation does
  not, and ``None`` is returned.
  """
  name = eqn.primitive.name
  if name == "concatenate":
    axis, offset, out = eqn.params["dimension"], 0, []
    for v, entries in zip(eqn.invars, found, strict=True):
      out += [e.shifted(axis, offset) for e in entries or ()]
      offset += v.aval.shape[axis]
    return tuple(out)
  if len(found) != 1 or found[0] is None:
    return None
  if name == "convert_element_type":
    return found[0]
  if name == "transpose":
    return tuple(e.permuted(eqn.params["permutation"]) for e in found[0])
  if name == "slice" and not any(
    s not in (None, 1) for s in eqn.params["strides"] or ()
  ):
    lo, hi = eqn.params["start_indices"], eqn.params["limit_indices"]
    return tuple(
      e for e in (e.sliced(lo, hi) for e in found[0]) if e is not None
    )
  return None


def find_taps(
  jaxpr: Any, num_leaves: int, num_exits: int
) -> tuple[tuple[LeafTap, ...], tuple[int, ...]]:
  """The parameter leaves of ``jaxpr`` (its first invars) to tap.

  A leaf is tapped when every use of it at the top level of the jaxpr,
  directly or through transposes, changes of dtype, unit-stride slices
  and concatenations, is an operand of a ``dot_general`` without batch
  axes on its side whose other operand holds no parameter, all
  contracting the same leaf axes, and none of them is an output.

  Args:
    jaxpr: the loss function's jaxpr, its parameter leaves first.
    num_leaves: how many of its first invars are parameter leaves.
    num_exits: K, for the choice of each leaf's contraction.

  Returns:
    ``(taps, slots)``: the tapped leaves, in leaf order, and the index in
    the jaxpr of every tapped product (a use's ``slot`` indexes it).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from osgd_jax import layer_blocks
    >>> def loss(w, b, x):  # b is added, not multiplied: not tapped
    ...   return jnp.tanh(x @ w.T + b).sum()
    >>> closed = jax.make_jaxpr(loss)(jnp.ones((4, 3)), jnp.ones(4),
    ...                               jnp.ones((2, 3)))
    >>> taps, slots = layer_blocks.find_taps(closed.jaxpr, 2, num_exits=1)
    >>> [(t.leaf, t.contracted) for t in taps], len(slots)
    ([(0, (1,))], 1)
  """
  entries: dict[Any, tuple[_Entry, ...]] = {
    v: (
      _Entry(
        i,
        tuple(range(v.aval.ndim)),
        (0,) * v.aval.ndim,
        (0,) * v.aval.ndim,
        tuple(v.aval.shape),
      ),
    )
    for i, v in enumerate(jaxpr.invars[:num_leaves])
  }
  uses: dict[int, list[tuple[int, Use]]] = {i: [] for i in range(num_leaves)}
  contracted: dict[int, tuple[int, ...]] = {}
  untappable: set[int] = set()

  def held(v: Any) -> tuple[_Entry, ...] | None:
    return None if isinstance(v, jex_core.Literal) else entries.get(v)

  def refuse(found: Any) -> None:
    untappable.update(e.leaf for e in found or ())

  for v in jaxpr.outvars:
    refuse(held(v))
  for index, eqn in enumerate(jaxpr.eqns):
    found = [held(v) for v in eqn.invars]
    if not any(found):
      continue
    passed = _passed_on(eqn, found)
    if passed is not None:
      entries[eqn.outvars[0]] = passed
      continue
    is_dot = eqn.primitive is jex_core.primitives.dot_general_p
    if not is_dot or all(found):  # parameters on both sides: not a layer
      for hit in found:
        refuse(hit)
      continue
    position = 0 if found[0] else 1
    for entry in found[position] or ():
      use = _dot_use(eqn, position, entry)
      leaf = entry.leaf
      if use is None or contracted.setdefault(leaf, use[1]) != use[1]:
        untappable.add(leaf)
        continue
      uses[leaf].append((index, use[0]))
  chosen = [leaf for leaf in range(num_leaves) if uses[leaf]]
  chosen = [leaf for leaf in chosen if leaf not in untappable]
  slots = tuple(sorted({index for leaf in chosen for index, _ in uses[leaf]}))
  taps = []
  for leaf in chosen:
    shape = tuple(jaxpr.invars[leaf].aval.shape)
    rows = sum(
      math.prod(
        jaxpr.eqns[index].invars[1 - u.w_operand].aval.shape[a]
        for a in u.x_free
      )
      for index, u in uses[leaf]
    )
    contraction = (
      "kernel" if rows * rows <= num_exits * math.prod(shape) else "rows"
    )
    leaf_uses = tuple(
      dataclasses.replace(u, slot=slots.index(index)) for index, u in uses[leaf]
    )
    taps.append(LeafTap(leaf, shape, contracted[leaf], leaf_uses, contraction))
  return tuple(taps), slots


def _interpret(
  jaxpr: Any,
  consts: Sequence[Any],
  leaves: Sequence[Any],
  perturbations: Sequence[Any],
  tapped: dict[int, tuple[int, int]],
) -> tuple[list[Any], list[Any]]:
  """Evaluates ``jaxpr``, adding ``perturbations[u]`` to tapped products.

  Returns the outputs and the layer input of every tapped use.
  """
  env: dict[Any, Any] = {}

  def read(v: Any) -> Any:
    return v.val if isinstance(v, jex_core.Literal) else env[v]

  env.update(zip(jaxpr.constvars, consts, strict=True))
  env.update(zip(jaxpr.invars, leaves, strict=True))
  inputs: list[Any] = [None] * len(perturbations)
  for index, eqn in enumerate(jaxpr.eqns):
    values = [read(v) for v in eqn.invars]
    out = bind_equation(eqn, values)
    if index in tapped:
      u, w_operand = tapped[index]
      out = out + perturbations[u]
      inputs[u] = values[1 - w_operand]
    outs = out if eqn.primitive.multiple_results else [out]
    env.update(zip(eqn.outvars, outs, strict=True))
  return [read(v) for v in jaxpr.outvars], inputs


def tapped_vjp(
  pure_fn: Callable[[Any], Any], params: Any, num_exits_of: Callable[[Any], int]
) -> tuple[Any, Any, Any, tuple[LeafTap, ...], list[Any]]:
  """The pullback of ``pure_fn(params) -> (losses, aux)``, its layers tapped.

  ``pure_fn`` is traced to a jaxpr once; its matrix products of parameters
  are found (:func:`find_taps`) and the jaxpr is evaluated again with a zero
  perturbation added to each, whose cotangent is the product's output
  cotangent. One forward pass, as ``jax.vjp(pure_fn, params)``.

  Args:
    pure_fn: function of the parameters returning ``(losses, aux)``.
    params: the parameters (any pytree of arrays).
    num_exits_of: called with the abstract losses before anything is
      tapped; checks them and returns K.

  Returns:
    ``(losses, aux, vjp_fn, taps, inputs)``: ``vjp_fn(w)`` is ``(the
    parameter leaves' cotangents, the perturbations' cotangents)``, a
    ``jax.tree_util.Partial``; ``taps`` the tapped leaves; ``inputs`` the
    layer input of every tapped product (a use's ``slot`` indexes it).

  Example:
    >>> import jax.numpy as jnp
    >>> from osgd_jax import layer_blocks
    >>> def pure_fn(w):
    ...   h = jnp.ones((2, 3)) @ w
    ...   return jnp.stack([h.sum(), (h ** 2).sum()]), None
    >>> _, _, vjp_fn, taps, inputs = layer_blocks.tapped_vjp(
    ...     pure_fn, jnp.ones((3, 4)), lambda losses: losses.shape[0])
    >>> [t.contraction for t in taps], inputs[0].shape
    (['kernel'], (2, 3))
    >>> vjp_fn(jnp.asarray([1.0, 0.0]))[1][0].shape  # ∂ℓ_1/∂h
    (2, 4)
  """
  leaves, treedef = jax.tree.flatten(params)
  closed, out_shape = jax.make_jaxpr(
    lambda *xs: pure_fn(jax.tree.unflatten(treedef, xs)), return_shape=True
  )(*leaves)
  out_tree = jax.tree.structure(out_shape)
  num_exits = num_exits_of(out_shape[0])
  jaxpr = closed.jaxpr
  taps, slots = find_taps(jaxpr, len(leaves), num_exits)
  tapped = {
    index: (slot, use.w_operand)
    for tap in taps
    for use in tap.uses
    for slot, index in [(use.slot, slots[use.slot])]
  }
  perturbations = []
  for index in slots:
    aval = jaxpr.eqns[index].outvars[0].aval
    perturbations.append(jnp.zeros(aval.shape, aval.dtype))

  def run(leaves, perturbations):
    flat, inputs = _interpret(
      jaxpr, closed.consts, leaves, perturbations, tapped
    )
    losses, aux = jax.tree.unflatten(out_tree, flat)
    return losses, (aux, inputs)

  losses, vjp_fn, (aux, inputs) = jax.vjp(
    run, leaves, perturbations, has_aux=True
  )
  return losses, aux, vjp_fn, taps, inputs


def _specs(x: jax.Array) -> list[Any]:
  """The mesh axes of each axis of ``x`` (``None``: not split)."""
  spec = tuple(jax.typeof(x).sharding.spec)
  return list(spec) + [None] * (x.ndim - len(spec))


def _out_sharding(mesh: Any, specs: Sequence[Any]) -> Any:
  """``NamedSharding(mesh, specs)`` keeping each mesh axis once, or ``None``.

  Under ``Explicit`` axes a contraction over split axes must name its
  output's sharding: the axes the output keeps stay as the operands split
  them, except a mesh axis already used by an earlier output axis (the
  second operand's copy of the batch, in ``x_u x_vᵀ``), which is gathered:
  the cross-device terms of the global batch need it. ``None`` without
  such a mesh (XLA's partitioner chooses).
  """
  if mesh is None:
    return None
  seen: set[Any] = set()
  kept = []
  for spec in specs:
    names = spec if isinstance(spec, tuple) else (spec,)
    if spec is None or seen & set(names):
      kept.append(None)
      continue
    seen.update(names)
    kept.append(spec)
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*kept))


def _cut(x: jax.Array, axis: int, lo: int, hi: int) -> jax.Array:
  """``x[lo:hi]`` along ``axis``, ``x`` itself when that is all of it."""
  if lo == 0 and hi == x.shape[axis]:
    return x
  return jax.lax.slice_in_dim(x, lo, hi, axis=axis)


def _product(
  cotangent: jax.Array, x: jax.Array, use: Use, tap: LeafTap, batch: int
) -> jax.Array:
  """``xᵀ δ`` as the leaf's gradient, for a ``δ`` with ``batch`` leading axes.

  The product is the gradient of the operand; the leaf's is its block
  there (:attr:`Use.spans`), at the leaf's place, zero elsewhere.
  """
  y_x = tuple(batch + a for a in use.y_x)
  # Its axes: δ's batch axes, y's leaf axes (y's order), x's contracted
  # axes (x's order); ``use.layout`` puts the last two in the leaf's order.
  d_specs, x_specs = _specs(cotangent), _specs(x)
  value = jax.lax.dot_general(
    cotangent,
    x,
    ((y_x, use.x_free), ((), ())),
    precision=_PRECISION,
    out_sharding=_out_sharding(
      sharding.explicit_mesh(x),
      [None] * batch
      + [d_specs[batch + a] for a in sorted(use.y_w)]
      + [x_specs[a] for a in sorted(use.x_contract)],
    ),
  )
  value = jnp.transpose(
    value, tuple(range(batch)) + tuple(batch + a for a in use.layout)
  )
  pads = [(0, 0, 0)] * batch
  for a, (start, leaf_start, length) in enumerate(use.spans):
    value = _cut(value, batch + a, start, start + length)
    pads.append((leaf_start, tap.shape[a] - leaf_start - length, 0))
  if any(p != (0, 0, 0) for p in pads):
    value = jax.lax.pad(value, jnp.zeros((), value.dtype), pads)
  return value


def _overlap(
  tap: LeafTap, use: Use, other: Use, d: jax.Array, x: jax.Array
) -> tuple[jax.Array, jax.Array] | None:
  """``δ`` and ``x`` of ``use`` cut to the leaf entries ``other`` also has.

  ``None`` if the two uses share no entry of the leaf (their blocks'
  gradients are then orthogonal).
  """
  free = [a for a in range(len(tap.shape)) if a not in tap.contracted]
  for a, ((at, mine, n), (_, theirs, m)) in enumerate(
    zip(use.spans, other.spans, strict=True)
  ):
    # In leaf coordinates, then in this use's operand's.
    start, stop = max(mine, theirs), min(mine + n, theirs + m)
    if stop <= start:
      return None
    cut = (at + start - mine, at + stop - mine)
    if a in tap.contracted:
      x = _cut(x, use.x_contract[tap.contracted.index(a)], *cut)
    else:
      d = _cut(d, 1 + use.y_w[free.index(a)], *cut)
  return d, x


def _kernel_gram(
  cotangents: list[ExitRows],
  inputs: list[jax.Array],
  tap: LeafTap,
  num_exits: int,
) -> jax.Array:
  """``Σ_{u,v} ⟨δ_{u,i}, (x_u x_vᵀ) δ_{v,j}⟩`` for per-exit cotangents.

  Over the entries of the leaf both uses hold: a use of a block of the
  leaf (a slice, or a leaf concatenated into a larger operand) has a
  gradient that is zero outside its block. Each pair of uses contributes
  at the exits that reach both (every other exit's cotangent is zero).
  """
  mesh = sharding.explicit_mesh(inputs[0])
  total = None
  for use_u, rows_u, x_u_all in zip(tap.uses, cotangents, inputs, strict=True):
    nu = len(use_u.x_free)
    d_u_all = rows_u.value
    for use_v, rows_v, x_v_all in zip(
      tap.uses, cotangents, inputs, strict=True
    ):
      d_v_all = rows_v.value
      cut_u = _overlap(tap, use_u, use_v, d_u_all, x_u_all)
      cut_v = _overlap(tap, use_v, use_u, d_v_all, x_v_all)
      if cut_u is None or cut_v is None:
        continue
      (d_u, x_u), (d_v, x_v) = cut_u, cut_v
      u_specs = [_specs(x_u)[a] for a in use_u.x_free]
      # x_u x_vᵀ: (x_u free..., x_v free...), paired through the leaf.
      kernel = jax.lax.dot_general(
        x_u,
        x_v,
        ((use_u.x_contract, use_v.x_contract), ((), ())),
        precision=_PRECISION,
        out_sharding=_out_sharding(
          mesh, u_specs + [_specs(x_v)[a] for a in use_v.x_free]
        ),
      )
      # (x_u free..., K, y_v's leaf axes in y_v's order).
      in_order = sorted(use_v.y_w)
      mixed = jax.lax.dot_general(
        kernel,
        d_v,
        (
          (tuple(range(nu, kernel.ndim)), tuple(1 + a for a in use_v.y_x)),
          ((), ()),
        ),
        precision=_PRECISION,
        out_sharding=_out_sharding(
          mesh, u_specs + [None] + [_specs(d_v)[1 + a] for a in in_order]
        ),
      )
      mixed_w = tuple(nu + 1 + in_order.index(a) for a in use_v.y_w)
      # ⟨δ_{u,i}, mixed_j⟩ over x_u's free axes and the leaf's free axes.
      block = jax.lax.dot_general(
        d_u,
        mixed,
        (
          (
            tuple(1 + a for a in use_u.y_x + use_u.y_w),
            tuple(range(nu)) + mixed_w,
          ),
          ((), ()),
        ),
        precision=_PRECISION,
        out_sharding=_out_sharding(mesh, [None, None]),
      )
      block = embed_block(block, rows_u.exits, rows_v.exits, num_exits)
      total = block if total is None else total + block
  if total is None:  # no two uses share an entry: cannot happen, u = v
    raise AssertionError("a tapped leaf without a use")
  return total


@dataclasses.dataclass(frozen=True)
class BlocksEngine(ScaledGramEngine):
  """The Gram matrix from per-layer blocks (see the module docstring).

  ``parts`` is ``(vjp_fn, inputs)`` from :func:`tapped_vjp`.
  """

  loss_dtype: str
  taps: tuple[LeafTap, ...]

  def _backward(
    self, vjp_fn: Any, gramian: Gramian
  ) -> tuple[list[jax.Array], list[ExitRows]]:
    """One backward pass carrying the K one-hot cotangents.

    Returns the K gradient rows of every leaf (those of the tapped leaves
    go unused) and each tapped product's output cotangents, held for the
    exits that reach it.
    """
    k = gramian.num_exits
    leaf_rows, cotangents = one_hot_pullback_rows(
      vjp_fn, k, np.dtype(self.loss_dtype)
    )
    everyone = tuple(range(k))
    leaves = jax.tree.leaves(
      leaf_rows, is_leaf=lambda x: isinstance(x, ExitRows)
    )
    return [rows.widened(everyone) for rows in leaves], list(cotangents)

  def scaled_grams(
    self, parts: Any, gramian: Gramian, granularity: str
  ) -> tuple[jax.Array, jax.Array]:
    vjp_fn, inputs = parts
    cd = gramian.compute_dtype
    leaf_rows, cotangents = self._backward(vjp_fn, gramian)
    tapped = {tap.leaf: tap for tap in self.taps}
    others = [i for i in range(len(gramian.shapes)) if i not in tapped]
    grams: list[Any] = [None] * len(gramian.shapes)
    exponents: list[Any] = [None] * len(gramian.shapes)
    if others:
      g, e = gram_lib.scaled_gram_matrices([leaf_rows[i] for i in others], cd)
      for n, i in enumerate(others):
        grams[i], exponents[i] = g[n], e[n]
    for tap in self.taps:
      grams[tap.leaf], exponents[tap.leaf] = self._tap_gram(
        tap,
        [cotangents[u.slot] for u in tap.uses],
        [inputs[u.slot] for u in tap.uses],
        cd,
        gramian.num_exits,
      )
    return gram_lib.combine_scaled(
      jnp.stack(grams), jnp.stack(exponents), granularity == "global"
    )

  def _tap_gram(
    self,
    tap: LeafTap,
    cotangents: list[ExitRows],
    inputs: list[jax.Array],
    cd: Any,
    num_exits: int,
  ) -> tuple[jax.Array, jax.Array]:
    """One tapped leaf's scaled Gram block ``(M̃, e)``, ``M = 4^e M̃``."""
    if tap.contraction == "rows":
      # The leaf's gradient rows for the exits that reach any of its uses.
      exits = tuple(sorted(set().union(*(d.exits for d in cotangents))))
      rows = functools.reduce(
        operator.add,
        [
          _product(d.widened(exits).astype(cd), x.astype(cd), use, tap, 1)
          for d, x, use in zip(cotangents, inputs, tap.uses, strict=True)
        ],
      )
      g, e = gram_lib.scaled_gram_matrices([rows], cd)
      return embed_block(g[0], exits, exits, num_exits), e[0]
    # δ and x scaled by powers of two into (-1, 1), so that no product
    # overflows; M = 4^(a+s) M̃ with 2^a, 2^s their largest magnitudes.
    a = jnp.max(gram_lib.scale_exponents([d.value for d in cotangents]))
    s = jnp.max(gram_lib.scale_exponents(inputs))
    down_d = [
      ExitRows(gram_lib.times_power_of_two(d.value.astype(cd), -a), d.exits)
      for d in cotangents
    ]
    down_x = [gram_lib.times_power_of_two(x.astype(cd), -s) for x in inputs]
    block = _kernel_gram(down_d, down_x, tap, num_exits)
    return 0.5 * (block + block.T), a + s

  def combine(
    self, parts: Any, gramian: Gramian, weights: jax.Array, granularity: str
  ) -> list[jax.Array]:
    vjp_fn, inputs = parts
    dtype = np.dtype(self.loss_dtype)
    if granularity == "global":
      return pullback_of_weights(
        lambda w: jax.tree.leaves(vjp_fn(w)[0]), weights[0], dtype
      )
    # One weight row per leaf: the rows of the untapped leaves and the
    # cotangents of the tapped ones from one backward pass, each weighted.
    leaf_rows, cotangents = self._backward(vjp_fn, gramian)
    cd = gramian.compute_dtype
    tapped = {tap.leaf: tap for tap in self.taps}
    out = []
    for i, rows in enumerate(leaf_rows):
      w = weights[i].astype(cd)
      if i not in tapped:
        out.append(jnp.tensordot(w, rows.astype(cd), axes=1))
        continue
      tap = tapped[i]
      out.append(
        functools.reduce(
          operator.add,
          [
            _product(
              _weighted(w, cotangents[use.slot], cd),
              inputs[use.slot].astype(cd),
              use,
              tap,
              0,
            )
            for use in tap.uses
          ],
        )
      )
    return out


def _weighted(w: jax.Array, rows: ExitRows, cd: Any) -> jax.Array:
  """``Σ_k w_k δ_k`` over the exits that reach ``δ`` (the rest are zero)."""
  return jnp.tensordot(w[np.asarray(rows.exits)], rows.value.astype(cd), axes=1)
