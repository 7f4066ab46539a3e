"""The K one-hot pullbacks of a loss vector, each value kept to its exits.

``jax.vmap(vjp_fn)(jnp.eye(K))`` pulls the K one-hot cotangents of K losses
back through a network in one backward pass, but every value in it then
carries K rows, also where all rows but a few are zero: exit k's head
reads its own loss only, so the cotangent of its logits, and of the hidden
layer it adds to, is zero for every other exit. An early-exit network's
backward pass then holds, for each of its K heads, a K × batch × width
contribution to the trunk's cotangent: memory quadratic in K
(``docs/design.md``, "Which exits reach a value").

:func:`one_hot_pullbacks` gives the same result from the pullback's jaxpr,
evaluated by a small interpreter that follows the exits: each value it
computes is held in one of three forms,

* unbatched: it does not depend on the cotangent (a residual of the
  forward pass), the same for every exit;
* rows: one row per exit it depends on (its *support*), zero for the
  others;
* diagonal: the exit axis is one of the value's own axes: index ``i``
  along ``axis`` belongs to exit ``exits[i]`` and the value of every other
  exit is zero there, as for the stacked logits' cotangent, whose slice k
  is exit k's. It is computed once, as an unbatched value, by the
  operations that keep that axis (elementwise ones, broadcasts, reductions
  and contractions over other axes, transposes, reshapes keeping it,
  scatter-adds along it, slices).

The cotangent of the K losses starts diagonal; unstacking or slicing
along the exit axis turns it into rows, one per exit; an operation whose
inputs hold different exits widens them to their union (zero rows added
where an input has none), and any operation without a diagonal rule is
batched by ``jax.vmap`` over the rows of its support. The pullback must be
linear in its cotangent (every VJP is): a value that does not depend on
the cotangent and meets one that does is then zero, and a row an input
lacks is zero.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

__all__ = ["ExitRows", "one_hot_pullback_rows", "one_hot_pullbacks"]

# Elementwise primitives linear in each cotangent operand (the others are
# residuals): the diagonal stays on the same axis.
_ELEMENTWISE = frozenset(
  {
    "add",
    "add_any",
    "sub",
    "neg",
    "mul",
    "div",
    "convert_element_type",
    "select_n",
    "copy",
    "copy_p",
    "reduce_precision",
    "real",
    "imag",
    "conj",
    "complex",
  }
)
# At most one cotangent operand, and for ``div`` it is the numerator.
_ONE_COTANGENT = frozenset({"mul", "div"})
_CALLS = frozenset({"jit", "pjit"})


@dataclasses.dataclass(frozen=True)
class ExitRows:
  """A value per exit, held for the exits that reach it only.

  Attributes:
    value: ``(len(exits), ...)``: row i is exit ``exits[i]``'s value.
    exits: the exits whose value may be nonzero, increasing; every other
      exit's value is zero.
  """

  value: jax.Array
  exits: tuple[int, ...]

  def widened(self, exits: tuple[int, ...]) -> jax.Array:
    """The rows of ``exits`` (a superset of :attr:`exits`), zero-filled."""
    return _widen(self, exits)


@dataclasses.dataclass(frozen=True)
class _Diagonal:
  """Index ``i`` along ``axis`` is exit ``exits[i]``'s; zero elsewhere."""

  value: jax.Array
  axis: int
  exits: tuple[int, ...]


_Value = Any  # an unbatched array, an ExitRows or a _Diagonal


def _support(x: _Value) -> tuple[int, ...]:
  if isinstance(x, ExitRows):
    return x.exits
  if isinstance(x, _Diagonal):
    return tuple(sorted(set(x.exits)))
  return ()


def _diagonal(value: jax.Array, axis: int, exits: Sequence[int]) -> _Value:
  """A diagonal value, as rows if it holds a single exit."""
  exits = tuple(exits)
  if len(set(exits)) == 1:
    return ExitRows(value[None], exits[:1])
  return _Diagonal(value, axis, exits)


def _widen(x: _Value, support: tuple[int, ...]) -> jax.Array:
  """``x``'s rows for ``support`` (a superset of its own), zero-filled."""
  if isinstance(x, _Diagonal):
    exits = np.asarray(x.exits)
    shape = [1] * (x.value.ndim + 1)
    shape[0], shape[1 + x.axis] = len(support), len(exits)
    mask = (np.asarray(support)[:, None] == exits[None, :]).reshape(shape)
    return jnp.where(mask, x.value[None], jnp.zeros((), x.value.dtype))
  assert isinstance(x, ExitRows)
  return _place(x.value, x.exits, support)


def _place(
  value: jax.Array, exits: tuple[int, ...], support: tuple[int, ...]
) -> jax.Array:
  """``value``'s rows (exits ``exits``) at ``support``'s, zero elsewhere.

  ``support`` is a superset of ``exits``, both increasing. Runs of
  consecutive exits are padded, not scattered, so that XLA fuses them
  into their consumer.
  """
  if exits == support:
    return value
  at = [support.index(e) for e in exits]
  # Runs of consecutive positions: (first position, first index, length).
  runs: list[list[int]] = []
  for i, p in enumerate(at):
    if runs and runs[-1][0] + runs[-1][2] == p:
      runs[-1][2] += 1
    else:
      runs.append([p, i, 1])
  zero = jnp.zeros((), value.dtype)
  total = None
  for p, i, n in runs:
    pads = [(p, len(support) - p - n, 0)] + [(0, 0, 0)] * (value.ndim - 1)
    piece = jax.lax.pad(jax.lax.slice_in_dim(value, i, i + n), zero, pads)
    total = piece if total is None else total + piece
  assert total is not None
  return total


def _batched(eqn: Any, values: list[_Value]) -> list[_Value]:
  """``eqn`` over the rows of its inputs' joint support, by ``jax.vmap``."""
  support = tuple(sorted(set().union(*(_support(v) for v in values))))
  args, axes = [], []
  for v in values:
    if _support(v):
      args.append(_widen(v, support))
      axes.append(0)
    else:
      args.append(v)
      axes.append(None)
  out = jax.vmap(lambda *xs: bind_equation(eqn, xs), in_axes=axes)(*args)
  outs = out if eqn.primitive.multiple_results else [out]
  return [ExitRows(o, support) for o in outs]


def _shape(v: Any) -> tuple[int, ...]:
  return tuple(v.aval.shape)


def _reshape_axis(
  old: tuple[int, ...], new: tuple[int, ...], axis: int
) -> int | None:
  """The axis of ``new`` that is ``old``'s ``axis`` after a reshape, if any."""
  before = math.prod(old[:axis])
  for b in range(len(new)):
    if math.prod(new[:b]) == before and new[b] == old[axis]:
      return b
  return None


def _scatter_axis(eqn: Any, axis: int) -> int | None:
  """The operand axis a scatter-add writes its updates' ``axis`` to.

  ``None`` unless index ``i`` of that updates axis lands on index ``i`` of
  the operand axis whatever the indices: a window axis the indices do not
  address, or a batching axis, of the operand's length.
  """
  dims = eqn.params["dimension_numbers"]
  operand_shape = _shape(eqn.invars[0])
  updates_shape = _shape(eqn.invars[2])
  if axis in dims.update_window_dims:
    window = [
      a
      for a in range(len(operand_shape))
      if a not in dims.inserted_window_dims
      and a not in dims.operand_batching_dims
    ]
    target = window[dims.update_window_dims.index(axis)]
    if target in dims.scatter_dims_to_operand_dims:
      return None
  else:
    # The updates' scatter axes are the indices' axes but the last (the
    # index vector), in order.
    scatter = [
      a for a in range(len(updates_shape)) if a not in dims.update_window_dims
    ]
    position = scatter.index(axis)
    if position not in dims.scatter_indices_batching_dims:
      return None
    at = dims.scatter_indices_batching_dims.index(position)
    target = dims.operand_batching_dims[at]
  if operand_shape[target] != updates_shape[axis]:
    return None
  return target


def _diagonal_rule(eqn: Any, values: list[_Value]) -> list[_Value] | None:
  """``eqn`` on diagonal inputs computed once, or ``None`` if no rule.

  Every cotangent input must be diagonal with the same exits; the output
  keeps them on the axis the rule gives.
  """
  diagonal = [v for v in values if isinstance(v, _Diagonal)]
  if not diagonal or any(isinstance(v, ExitRows) for v in values):
    return None
  exits = diagonal[0].exits
  if any(v.exits != exits for v in diagonal):
    return None
  name = eqn.primitive.name
  params = eqn.params
  positions = [i for i, v in enumerate(values) if isinstance(v, _Diagonal)]
  axis = diagonal[0].axis
  out_axis: int | None = None
  if name in _ELEMENTWISE:
    output = _shape(eqn.outvars[0])
    keeps = all(
      values[i].axis == axis and _shape(eqn.invars[i]) == output
      for i in positions
    )
    if name in _ONE_COTANGENT and (
      len(positions) != 1 or (name == "div" and positions != [0])
    ):
      keeps = False
    out_axis = axis if keeps else None
  elif len(positions) != 1:
    return None
  elif name == "broadcast_in_dim":
    target = params["broadcast_dimensions"][axis]
    if _shape(eqn.outvars[0])[target] == _shape(eqn.invars[0])[axis]:
      out_axis = target
  elif name == "reduce_sum" and axis not in params["axes"]:
    out_axis = axis - sum(a < axis for a in params["axes"])
  elif name == "cumsum" and axis != params["axis"]:
    out_axis = axis
  elif name == "reshape" and params.get("dimensions") is None:
    out_axis = _reshape_axis(
      _shape(eqn.invars[0]), _shape(eqn.outvars[0]), axis
    )
  elif name == "squeeze":
    out_axis = axis - sum(d < axis for d in params["dimensions"])
  elif name == "transpose":
    out_axis = list(params["permutation"]).index(axis)
  elif name == "dot_general" and positions[0] in (0, 1):
    out_axis = _dot_axis(eqn, positions[0], axis)
  elif name == "scatter-add" and positions == [2]:
    out_axis = _scatter_axis(eqn, axis)
  elif name == "slice":
    return _slice_rule(eqn, values[0], axis)
  elif name == "unstack":
    return _unstack_rule(eqn, values[0], axis)
  if out_axis is None:
    return None
  args = [v.value if isinstance(v, _Diagonal) else v for v in values]
  out = bind_equation(eqn, args)
  return [_diagonal(out, out_axis, exits)]


def _dot_axis(eqn: Any, operand: int, axis: int) -> int | None:
  """The output axis of a ``dot_general`` that is its operand's ``axis``."""
  contract, batch = eqn.params["dimension_numbers"]
  if axis in contract[operand]:
    return None
  if axis in batch[operand]:
    return list(batch[operand]).index(axis)
  shapes = [_shape(v) for v in eqn.invars]
  free = [
    [a for a in range(len(s)) if a not in contract[i] and a not in batch[i]]
    for i, s in enumerate(shapes)
  ]
  offset = len(batch[0]) + (len(free[0]) if operand == 1 else 0)
  return offset + free[operand].index(axis)


def _slice_rule(eqn: Any, x: _Diagonal, axis: int) -> list[_Value]:
  out = bind_equation(eqn, [x.value])
  start = eqn.params["start_indices"][axis]
  stop = eqn.params["limit_indices"][axis]
  strides = eqn.params["strides"]
  step = 1 if strides is None else strides[axis]
  return [_diagonal(out, axis, x.exits[start:stop:step])]


def _unstack_rule(eqn: Any, x: _Diagonal, axis: int) -> list[_Value]:
  outs = bind_equation(eqn, [x.value])
  along = eqn.params["axis"]
  if along == axis:
    return [ExitRows(o[None], (e,)) for o, e in zip(outs, x.exits, strict=True)]
  kept = axis - (along < axis)
  return [_diagonal(o, kept, x.exits) for o in outs]


def bind_equation(eqn: Any, args: Sequence[Any]) -> Any:
  """Binds a jaxpr equation's primitive to ``args``, as ``eval_jaxpr`` does.

  In the context the equation was traced under (e.g. its compute and
  sharding settings), with the primitive's own bind parameters. The
  interpreters of this module and of :mod:`osgd_jax.layer_blocks` bind
  every equation through it.
  """
  with eqn.ctx.manager:
    return eqn.primitive.bind(
      *args, **eqn.primitive.get_bind_params(eqn.params)
    )


def _evaluate(
  jaxpr: Any, consts: Sequence[Any], args: Sequence[_Value]
) -> list:
  env: dict[Any, _Value] = {}

  def read(v: Any) -> _Value:
    return v.val if isinstance(v, jex_core.Literal) else env[v]

  env.update(zip(jaxpr.constvars, consts, strict=True))
  env.update(zip(jaxpr.invars, args, strict=True))
  for eqn in jaxpr.eqns:
    values = [read(v) for v in eqn.invars]
    if not any(_support(v) for v in values):
      out = bind_equation(eqn, values)
      outs = out if eqn.primitive.multiple_results else [out]
    elif eqn.primitive.name in _CALLS:
      # A nested jit is evaluated inline, so its values keep their exits.
      inner = eqn.params["jaxpr"]
      outs = _evaluate(inner.jaxpr, inner.consts, values)
    else:
      outs = _diagonal_rule(eqn, values) or _batched(eqn, values)
    env.update(zip(eqn.outvars, outs, strict=True))
  return [read(v) for v in jaxpr.outvars]


def _exit_rows(x: _Value, num_exits: int, aval: Any) -> ExitRows:
  """``x`` as :class:`ExitRows` (every exit's, if it is unbatched)."""
  if isinstance(x, ExitRows):
    return x
  if isinstance(x, _Diagonal):
    support = _support(x)
    return ExitRows(_widen(x, support), support)
  # Not reached by the cotangent: as ``jax.vmap`` broadcasts it.
  value = jnp.asarray(x, aval.dtype)
  everyone = tuple(range(num_exits))
  return ExitRows(
    jnp.broadcast_to(value, (num_exits,) + tuple(aval.shape)), everyone
  )


def one_hot_pullback_rows(
  vjp_fn: Callable[[jax.Array], Any], num_exits: int, dtype: Any
) -> Any:
  """The K one-hot pullbacks of ``vjp_fn``, each leaf to its exits.

  The pullback's jaxpr is evaluated once, each value holding rows only for
  the exits that reach it (see the module docstring).

  Args:
    vjp_fn: the pullback of a function returning ``(K,)`` losses (any
      linear function of a ``(K,)`` cotangent).
    num_exits: K.
    dtype: the losses' dtype.

  Returns:
    The pytree ``vjp_fn`` returns, each leaf an :class:`ExitRows`: the
    leaf's pullback of the one-hot cotangent of each exit that reaches
    it (of every other exit, it is zero).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from osgd_jax.exit_pullback import one_hot_pullback_rows
    >>> def losses(w, v):  # exit 1 alone reads v
    ...   return jnp.stack([jnp.sum(w ** 2), jnp.sum(w) * jnp.sum(v)])
    >>> _, vjp_fn = jax.vjp(losses, jnp.ones(2), jnp.full(3, 2.0))
    >>> _, of_v = one_hot_pullback_rows(vjp_fn, 2, jnp.float32)
    >>> of_v.exits, of_v.value.shape
    ((1,), (1, 3))
  """
  closed, out_shape = jax.make_jaxpr(vjp_fn, return_shape=True)(
    jax.ShapeDtypeStruct((num_exits,), dtype)
  )
  everyone = tuple(range(num_exits))
  start = _Diagonal(jnp.ones((num_exits,), dtype), 0, everyone)
  outs = _evaluate(closed.jaxpr, closed.consts, [start])
  avals, treedef = jax.tree.flatten(out_shape)
  return jax.tree.unflatten(
    treedef,
    [_exit_rows(x, num_exits, a) for x, a in zip(outs, avals, strict=True)],
  )


def one_hot_pullbacks(
  vjp_fn: Callable[[jax.Array], Any], num_exits: int, dtype: Any
) -> Any:
  """``jax.vmap(vjp_fn)(jnp.eye(K, dtype=dtype))``, each value to its exits.

  :func:`one_hot_pullback_rows` with every leaf widened to K rows: the
  same result as the ``vmap``, up to the order of floating-point sums,
  without its K rows where fewer exits reach a value (a head's cotangent
  is one row, not K).

  Args:
    vjp_fn: the pullback of a function returning ``(K,)`` losses.
    num_exits: K.
    dtype: the losses' dtype.

  Returns:
    The pytree ``vjp_fn`` returns, each leaf with a leading axis of K:
    row k is ``vjp_fn`` of the k-th one-hot cotangent.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from osgd_jax.exit_pullback import one_hot_pullbacks
    >>> def losses(w):  # exit 0 reads w[0], exit 1 reads w[0] and w[1]
    ...   return jnp.stack([w[0] ** 2, (w[0] + w[1]) ** 2])
    >>> _, vjp_fn = jax.vjp(losses, jnp.array([1.0, 2.0]))
    >>> one_hot_pullbacks(vjp_fn, 2, jnp.float32)[0]
    Array([[2., 0.],
           [6., 6.]], dtype=float32)
  """
  everyone = tuple(range(num_exits))
  return jax.tree.map(
    lambda rows: rows.widened(everyone),
    one_hot_pullback_rows(vjp_fn, num_exits, dtype),
    is_leaf=lambda x: isinstance(x, ExitRows),
  )
