"""Which exits' logits each output of a jaxpr depends on, differentiably.

The staged Jacobian (:func:`osgd_jax.staged_value_and_per_exit_grads`) runs
exit k's backward pass through stages 1..k only. It is exact only if the loss
of exit k reads, with a gradient, the logits of exits 1..k and never a later
exit's. The loss function is the user's code, so before the staged Jacobian
is built this module checks that on the loss's jaxpr, and
:func:`check_exit_dependencies` refuses a loss that breaks it with an error
that says which exit reads which.

The analysis interprets the jaxpr once, forwards, without running it. Every
value carries a :data:`Dependency`: the labels of the inputs (here the exit
indices) it reads, for the whole array or row by row along its leading axis.
Rows matter because the losses are one ``(K,)`` vector: ``losses[0]`` must
not inherit what ``losses[2]`` reads through ``losses.at[2].add(...)``, nor a
row of a stacked array what the other rows read.

The analysis is conservative: an operation without a row rule depends, as a
whole, on everything its inputs depend on. It may report a dependency that
does not exist (and refuse a loss that would be fine), but it never misses
one, so a loss it accepts is one the staged Jacobian computes exactly.
Integer and boolean values carry no gradient, so they depend on nothing;
neither does the output of ``jax.lax.stop_gradient``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax.extend.core import ClosedJaxpr, Jaxpr, JaxprEqn, Literal

__all__ = [
  "Dependency",
  "check_exit_dependencies",
  "dependencies",
  "row_dependencies",
]

#: The labels an array depends on, as one set for the whole array or as a
#: tuple of sets, one per row of its leading axis (its length is that axis's
#: size).
Dependency = frozenset[int] | tuple[frozenset[int], ...]

_NONE: frozenset[int] = frozenset()

# Primitives with floating-point results that act element by element (their
# operands have the output's shape, or are scalars): row i of the output
# reads row i of every operand. Comparisons and bitwise operations are absent
# on purpose: their results are boolean or integer and so depend on nothing.
_ELEMENTWISE = frozenset(
  {
    "abs",
    "acos",
    "acosh",
    "add",
    "asin",
    "asinh",
    "atan",
    "atan2",
    "atanh",
    "cbrt",
    "ceil",
    "clamp",
    "convert_element_type",
    "copy",
    "cos",
    "cosh",
    "digamma",
    "div",
    "erf",
    "erf_inv",
    "erfc",
    "exp",
    "exp2",
    "expm1",
    "floor",
    "imag",
    "integer_pow",
    "lgamma",
    "log",
    "log1p",
    "logistic",
    "max",
    "min",
    "mul",
    "neg",
    "nextafter",
    "pow",
    "real",
    "reduce_precision",
    "rem",
    "round",
    "rsqrt",
    "select_n",
    "sign",
    "sin",
    "sinh",
    "sqrt",
    "square",
    "sub",
    "tan",
    "tanh",
  }
)
_REDUCTIONS = frozenset(
  {"reduce_max", "reduce_min", "reduce_prod", "reduce_sum"}
)
_CUMULATIVE = frozenset(
  {"cumlogsumexp", "cummax", "cummin", "cumprod", "cumsum"}
)
_SCATTERS = frozenset(
  {
    "scatter",
    "scatter-add",
    "scatter-sub",
    "scatter-mul",
    "scatter-min",
    "scatter-max",
  }
)
# Calls whose body takes the call's inputs and returns its outputs, and the
# parameter that holds the body: followed exactly. custom_jvp_call is
# followed through its primal body, assuming (as every library rule does)
# that the custom derivative reads what the primal reads.
_CALLS = {
  "jit": "jaxpr",
  "closed_call": "call_jaxpr",
  "remat2": "jaxpr",
  "custom_jvp_call": "call_jaxpr",
}


def _union(dep: Dependency) -> frozenset[int]:
  """All labels ``dep`` holds, whichever row they belong to."""
  return dep if isinstance(dep, frozenset) else _NONE.union(*dep)


def row_dependencies(
  dep: Dependency, num_rows: int
) -> tuple[frozenset[int], ...]:
  """The labels that each of ``num_rows`` rows of an array depends on.

  Args:
    dep: the dependency of an array whose leading axis has ``num_rows`` rows,
      as :func:`dependencies` returns it.
    num_rows: the size of that leading axis.

  Returns:
    One frozenset per row: ``dep``'s own rows if it tracks them, else
    ``num_rows`` copies of the labels the whole array depends on.

  Example:
    >>> from osgd_jax import dataflow
    >>> dataflow.row_dependencies(frozenset({0, 2}), 2)
    (frozenset({0, 2}), frozenset({0, 2}))
  """
  if isinstance(dep, tuple) and len(dep) == num_rows:
    return dep
  return (_union(dep),) * num_rows


def _union_rows(deps: Sequence[Dependency], num_rows: int) -> tuple:
  """Row i of the result reads row i of every dependency (or all of it)."""
  return tuple(
    _NONE.union(*row)
    for row in zip(*(row_dependencies(d, num_rows) for d in deps), strict=True)
  )


def _known_value(var: Any, consts: dict[Any, np.ndarray]) -> Any:
  """The value of ``var`` if it is a literal or a known constant, else None."""
  if isinstance(var, Literal):  # literals are not hashable: no dict lookup
    return np.asarray(var.val)
  return consts.get(var)


def _rows_hit_by_scatter(
  eqn: JaxprEqn, num_rows: int, consts: dict[Any, np.ndarray]
) -> set[int]:
  """The rows of a scatter's operand that its updates may change.

  Only an index that is a constant and names single rows along axis 0 (as
  ``losses.at[2].add(...)`` writes it) narrows the rows down; any other
  index may hit every row.
  """
  every_row = set(range(num_rows))
  index = _known_value(eqn.invars[1], consts)
  numbers = eqn.params["dimension_numbers"]
  if (
    index is None
    or tuple(numbers.scatter_dims_to_operand_dims) != (0,)
    or 0 not in numbers.inserted_window_dims
    or numbers.operand_batching_dims
  ):
    return every_row
  named = {int(i) for i in np.ravel(index)}
  # An index out of range may be clipped to an edge row: keep them all.
  return named if named <= every_row else every_row


def _scatter_rows(
  eqn: JaxprEqn,
  ins: list[Dependency],
  num_rows: int,
  consts: dict[Any, np.ndarray],
) -> tuple:
  """Rows of a scatter's output: the operand's, plus the updates' where hit."""
  rows = row_dependencies(ins[0], num_rows)
  if eqn.primitive.name == "dynamic_update_slice":
    # Operands (operand, update, *start_indices): any row may be written.
    updates, hit = _union(ins[1]), range(num_rows)
  else:
    # Operands (operand, indices, updates).
    updates, hit = _union(ins[2]), _rows_hit_by_scatter(eqn, num_rows, consts)
  return tuple(row | updates if i in hit else row for i, row in enumerate(rows))


def _shape(var: Any) -> tuple[int, ...]:
  """The shape of a jaxpr variable's abstract value (arrays only reach here)."""
  return tuple(var.aval.shape)


def _gather_keeps_rows(eqn: JaxprEqn) -> bool:
  """Whether a gather's output axis 0 is its operand's axis 0, row for row."""
  numbers = eqn.params["dimension_numbers"]
  operand_shape = _shape(eqn.invars[0])
  if 0 in numbers.offset_dims:
    # Output axis 0 is the operand's first sliced axis: aligned when that is
    # axis 0, taken whole and from row 0.
    first = next(
      i
      for i in range(len(operand_shape))
      if i not in numbers.collapsed_slice_dims
      and i not in numbers.operand_batching_dims
    )
    return (
      first == 0
      and 0 not in numbers.start_index_map
      and eqn.params["slice_sizes"][0] == operand_shape[0]
    )
  # Output axis 0 is the indices' axis 0: aligned when it batches axis 0.
  if 0 not in numbers.operand_batching_dims:
    return False
  position = numbers.operand_batching_dims.index(0)
  return numbers.start_indices_batching_dims[position] == 0


def _dot_general_rows(
  eqn: JaxprEqn, ins: list[Dependency], num_rows: int
) -> tuple | None:
  """Rows of a dot_general whose output axis 0 is the lhs's axis 0."""
  (lhs_contract, _), (lhs_batch, rhs_batch) = eqn.params["dimension_numbers"]
  if lhs_batch:
    # Output axis 0 is the first batch axis; the rhs's rows align with it
    # only if that is the rhs's axis 0 too.
    if lhs_batch[0] != 0:
      return None
    rhs = ins[1] if rhs_batch[0] == 0 else _union(ins[1])
    return _union_rows([ins[0], rhs], num_rows)
  if 0 in lhs_contract:
    return None
  # Output axis 0 is the lhs's first free axis, axis 0; every output row
  # reads the whole rhs.
  return _union_rows([ins[0], _union(ins[1])], num_rows)


def _keeps_rows(eqn: JaxprEqn, num_rows: int) -> bool:
  """Whether the output's rows are its first operand's rows, unchanged."""
  name, params = eqn.primitive.name, eqn.params
  lead = _shape(eqn.invars[0])[0]
  if name in ("broadcast_in_dim", "reshape") and lead != num_rows:
    return False
  if name == "broadcast_in_dim":
    return params["broadcast_dimensions"][:1] == (0,)
  if name == "reshape":
    return params.get("dimensions") is None
  if name == "squeeze":
    return 0 not in params["dimensions"]
  if name == "transpose":
    return params["permutation"][0] == 0
  if name == "dynamic_slice":
    return params["slice_sizes"][0] == lead
  if name in _REDUCTIONS:
    return 0 not in params["axes"]
  if name in _CUMULATIVE:
    return params["axis"] != 0
  if name == "gather":
    return _gather_keeps_rows(eqn)
  return False


def _output_rows(
  eqn: JaxprEqn,
  ins: list[Dependency],
  num_rows: int,
  consts: dict[Any, np.ndarray],
) -> tuple | None:
  """Per-row dependencies of the single output of ``eqn``.

  Returns ``None`` where no rule says how the output's leading axis (of
  ``num_rows`` rows) relates to the inputs'; the caller then falls back to
  the union of everything the inputs depend on.
  """
  name, params = eqn.primitive.name, eqn.params
  if name in _SCATTERS or name == "dynamic_update_slice":
    return _scatter_rows(eqn, ins, num_rows, consts)
  if (
    name in _ELEMENTWISE
    or (name == "stack" and params["axis"] != 0)
    or (name == "concatenate" and params["dimension"] != 0)
  ):
    return _union_rows(ins, num_rows)
  if name == "stack":
    return tuple(_union(d) for d in ins)
  if name == "concatenate":
    return tuple(
      row
      for d, var in zip(ins, eqn.invars, strict=True)
      for row in row_dependencies(d, _shape(var)[0])
    )
  rows = ins[0] if isinstance(ins[0], tuple) else None
  if rows is None:
    return None
  if name == "slice":
    strides = params["strides"] or (1,) * len(params["start_indices"])
    return rows[
      params["start_indices"][0] : params["limit_indices"][0] : strides[0]
    ]
  if (
    name == "broadcast_in_dim"
    and len(rows) == 1
    and params["broadcast_dimensions"][:1] == (0,)
  ):
    return rows * num_rows
  if name == "dot_general":
    return _dot_general_rows(eqn, ins, num_rows)
  return rows if _keeps_rows(eqn, num_rows) else None


def _call_body(eqn: JaxprEqn) -> Jaxpr | None:
  """The jaxpr a call runs, if its inputs and outputs are the call's."""
  body = eqn.params.get(_CALLS[eqn.primitive.name])
  body = getattr(body, "jaxpr", body)  # a ClosedJaxpr's open jaxpr
  if (
    not isinstance(body, Jaxpr)
    or len(body.invars) != len(eqn.invars)
    or len(body.outvars) != len(eqn.outvars)
  ):
    return None
  return body


def _interpret(jaxpr: Jaxpr, in_deps: Sequence[Dependency]) -> list[Dependency]:
  """:func:`dependencies` of an open jaxpr (a call's body too), eqn by eqn.

  The integer arrays that the jaxpr builds by broadcasting a scalar literal,
  such as the index ``2`` of ``.at[2]``, are kept in ``consts``, so that a
  scatter can tell which rows such an index names.
  """
  env: dict[Any, Dependency] = dict(zip(jaxpr.invars, in_deps, strict=True))
  consts: dict[Any, np.ndarray] = {}

  def read(v):
    return _NONE if isinstance(v, Literal) else env.get(v, _NONE)

  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    ins = [read(v) for v in eqn.invars]
    if (
      name == "broadcast_in_dim"
      and isinstance(eqn.invars[0], Literal)
      and np.ndim(eqn.invars[0].val) == 0
    ):
      consts[eqn.outvars[0]] = np.full(eqn.params["shape"], eqn.invars[0].val)
    body = _call_body(eqn) if name in _CALLS else None
    if name == "stop_gradient" or not any(map(_union, ins)):
      outs = [_NONE] * len(eqn.outvars)
    elif body is not None:
      outs = _interpret(body, ins)
    else:
      shape = getattr(eqn.outvars[0].aval, "shape", ())
      rows = None
      if len(eqn.outvars) == 1 and shape:
        rows = _output_rows(eqn, ins, shape[0], consts)
      outs = (
        [rows]
        if rows is not None
        else ([_NONE.union(*map(_union, ins))] * len(eqn.outvars))
      )
    for var, dep in zip(eqn.outvars, outs, strict=True):
      differentiable = jnp.issubdtype(
        getattr(var.aval, "dtype", jnp.int32), jnp.inexact
      )
      env[var] = dep if differentiable else _NONE
  return [read(v) for v in jaxpr.outvars]


def dependencies(
  closed_jaxpr: ClosedJaxpr, in_deps: Sequence[Dependency]
) -> list[Dependency]:
  """Which labelled inputs each output of a jaxpr depends on, differentiably.

  Args:
    closed_jaxpr: the jaxpr to analyse, e.g. from ``jax.make_jaxpr``.
    in_deps: one :data:`Dependency` per input of the jaxpr; usually
      ``frozenset({j})`` for input j, so that the outputs' dependencies name
      the inputs they read. A tuple holds one frozenset per row of the
      input's leading axis.

  Returns:
    One :data:`Dependency` per output: a frozenset of the labels the whole
    output depends on, or a tuple of frozensets, one per row of its leading
    axis (:func:`row_dependencies` turns either into rows). It never misses
    a dependency, and it may over-report one through an operation without a
    row rule (see the module docstring).

  Raises:
    ValueError: if ``in_deps`` does not have one entry per input, or a tuple
      entry does not have one set per row of its input.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from osgd_jax import dataflow
    >>> def losses(logits_1, logits_2):
    ...   per_exit = jnp.stack([jnp.mean(logits_1), jnp.mean(logits_2)])
    ...   return per_exit.at[1].add(jnp.mean(logits_1 ** 2))
    >>> jaxpr = jax.make_jaxpr(losses)(jnp.ones(3), jnp.ones(3))
    >>> (dep,) = dataflow.dependencies(jaxpr, [frozenset({0}), frozenset({1})])
    >>> dataflow.row_dependencies(dep, 2)
    (frozenset({0}), frozenset({0, 1}))
  """
  invars = closed_jaxpr.jaxpr.invars
  if len(in_deps) != len(invars):
    raise ValueError(
      f"in_deps has {len(in_deps)} entries but the jaxpr has {len(invars)}"
      " inputs; pass one dependency per input, in the order of the"
      " jaxpr's inputs."
    )
  for j, (dep, var) in enumerate(zip(in_deps, invars, strict=True)):
    rows = var.aval.shape[0] if getattr(var.aval, "shape", ()) else None
    if isinstance(dep, tuple) and len(dep) != rows:
      raise ValueError(
        f"in_deps[{j}] has one set per row for {len(dep)} rows, but input"
        f" {j} has shape {var.aval.shape}; give one frozenset per row of"
        " its leading axis, or a single frozenset for the whole input."
      )
  return _interpret(closed_jaxpr.jaxpr, in_deps)


def check_exit_dependencies(
  closed_jaxpr: ClosedJaxpr, num_exits: int, fn_name: str
) -> None:
  """Raises unless the loss of each exit reads no later exit's logits.

  Args:
    closed_jaxpr: the jaxpr of the loss function, with one input per exit
      (its logits, exit 1 first) and the ``(K,)`` vector of exit losses as
      its first output (any further outputs, auxiliary data, are ignored).
    num_exits: the number of exits K.
    fn_name: the loss function's name, for the error message.

  Raises:
    ValueError: if, by :func:`dependencies`, the loss of some exit k depends
      differentiably on the logits of an exit after k.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from osgd_jax import dataflow
    >>> def losses(logits_1, logits_2):
    ...   return jnp.stack([jnp.mean(logits_1 * logits_2), jnp.mean(logits_2)])
    >>> dataflow.check_exit_dependencies(  # doctest: +NORMALIZE_WHITESPACE
    ...     jax.make_jaxpr(losses)(jnp.ones(3), jnp.ones(3)), 2, "losses")
    Traceback (most recent call last):
    ...
    ValueError: losses: the loss of an exit depends on the logits of a later
    exit (exit 1 reads exit(s) 2)...
  """
  losses = dependencies(
    closed_jaxpr, [frozenset({j}) for j in range(num_exits)]
  )[0]
  later = [
    (k, sorted(j for j in dep if j > k))
    for k, dep in enumerate(row_dependencies(losses, num_exits))
  ]
  details = "; ".join(
    f"exit {k + 1} reads exit(s) {', '.join(str(j + 1) for j in exits)}"
    for k, exits in later
    if exits
  )
  if details:
    raise ValueError(
      f"{fn_name}: the loss of an exit depends on the logits of a later"
      f" exit ({details}). The staged Jacobian runs exit k's backward pass"
      " through stages 1..k only, so it cannot follow that dependency."
      " Use osgd_jax.value_and_per_exit_grads, or wrap the later logits in"
      " jax.lax.stop_gradient. (The check follows the loss's jaxpr and"
      " may over-report through operations it has no rule for.)"
    )
