"""The jaxpr dataflow analysis: its row rules, its check, and its errors.

Each rule is checked on a small function against a hand-derived expectation
of which labelled inputs every row of the output depends on. The true
dependencies, read off the function's Jacobian in float64 at a random point,
must lie within what the analysis reports (it never misses one), and equal
it where the rule is exact; where it over-reports, the case says so.
Tracing a jaxpr compiles nothing, so only the Jacobians cost a compile.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from osgd_jax import dataflow


def _s(*labels):
  return frozenset(labels)


def _rows(num_rows, first=0):
  """An input whose row i carries label ``first + i``."""
  return tuple(_s(first + i) for i in range(num_rows))


ALL3 = _s(0, 1, 2)


def _take_column_0(x):
  return jnp.take_along_axis(x, jnp.zeros((3, 4, 1), jnp.int32), axis=2)


# (function, [(input shape, input dependency)], expected rows, exact).
_CASES = {
  # gather
  "gather_of_columns_keeps_rows": (
    lambda x: x[:, np.array([0, 2])],
    [((3, 4, 5), _rows(3))],
    _rows(3),
    True,
  ),
  "batched_gather_in_a_call_keeps_rows": (
    _take_column_0,
    [((3, 4, 5), _rows(3))],
    _rows(3),
    True,
  ),
  "gather_of_rows_takes_the_union": (
    lambda x: x[np.array([2, 0, 1])],
    [((3, 4), _rows(3))],
    (ALL3,) * 3,
    False,
  ),
  # scatter and dynamic_update_slice
  "scatter_at_a_constant_row": (
    lambda v, a: v.at[2].add(jnp.sum(a)),
    [((3,), _rows(3)), ((4,), _s(3))],
    (_s(0), _s(1), _s(2, 3)),
    True,
  ),
  "scatter_set_keeps_the_old_row": (
    lambda v, a: v.at[2].set(jnp.sum(a)),
    [((3,), _rows(3)), ((4,), _s(3))],
    (_s(0), _s(1), _s(2, 3)),
    False,
  ),
  "scatter_of_a_window_hits_every_row": (
    lambda v, a: v.at[1:].add(jnp.sum(a)),
    [((3,), _rows(3)), ((4,), _s(3))],
    (_s(0, 3), _s(1, 3), _s(2, 3)),
    False,
  ),
  "scatter_out_of_range_hits_every_row": (
    lambda v, a: v.at[5].add(jnp.sum(a)),
    [((3,), _rows(3)), ((4,), _s(3))],
    (_s(0, 3), _s(1, 3), _s(2, 3)),
    False,
  ),
  "scatter_at_a_computed_index_hits_every_row": (
    lambda v, a: v.at[np.array([0, 2])].add(jnp.sum(a)),
    [((3,), _rows(3)), ((4,), _s(3))],
    (_s(0, 3), _s(1, 3), _s(2, 3)),
    False,
  ),
  "dynamic_update_slice_hits_every_row": (
    lambda v, u: jax.lax.dynamic_update_slice(v, u, (1,)),
    [((3,), _rows(3)), ((1,), _s(3))],
    (_s(0, 3), _s(1, 3), _s(2, 3)),
    False,
  ),
  # concatenate and stack
  "concatenate_puts_rows_in_order": (
    lambda a, b: jnp.concatenate([a, b]),
    [((2, 4), _s(0)), ((1, 4), _s(1))],
    (_s(0), _s(0), _s(1)),
    True,
  ),
  "concatenate_of_slices_rotates_rows": (
    lambda x: jnp.concatenate([x[1:], x[:1]]),
    [((3, 4), _rows(3))],
    (_s(1), _s(2), _s(0)),
    True,
  ),
  "concatenate_along_axis_1_joins_rows": (
    lambda x, b: jnp.concatenate([x, b], axis=1),
    [((3, 4), _rows(3)), ((3, 2), _s(3))],
    (_s(0, 3), _s(1, 3), _s(2, 3)),
    True,
  ),
  "stack_makes_each_input_a_row": (
    lambda a, b: jnp.stack([jnp.mean(a), jnp.mean(b)]),
    [((4,), _s(0)), ((4,), _s(1))],
    (_s(0), _s(1)),
    True,
  ),
  "stack_along_axis_1_joins_rows": (
    lambda x, b: jnp.stack([x, b], axis=1),
    [((3, 4), _rows(3)), ((3, 4), _s(3))],
    (_s(0, 3), _s(1, 3), _s(2, 3)),
    True,
  ),
  # dot_general
  "dot_general_batched_over_rows": (
    lambda x, w: jnp.einsum("kbc,kcd->kbd", x, w),
    [((3, 4, 5), _rows(3)), ((3, 5, 2), _rows(3, first=3))],
    (_s(0, 3), _s(1, 4), _s(2, 5)),
    True,
  ),
  # The rhs's rows run along its contracted axis, not the batch axis: each
  # output row reads all of them.
  "dot_general_batched_over_another_rhs_axis": (
    lambda x, w: jax.lax.dot_general(x, w, (((2,), (0,)), ((0,), (1,)))),
    [((3, 4, 3), _rows(3)), ((3, 3, 2), _rows(3, first=3))],
    tuple(_s(k, 3, 4, 5) for k in range(3)),
    True,
  ),
  "dot_general_batched_over_another_lhs_axis": (
    lambda x, w: jax.lax.dot_general(x, w, (((2,), (1,)), ((1,), (0,)))),
    [((4, 3, 5), _rows(4)), ((3, 5, 2), _s(4))],
    (_s(0, 1, 2, 3, 4),) * 3,
    True,
  ),
  "dot_general_without_batch_keeps_lhs_rows": (
    lambda x, w: x @ w,
    [((3, 4), _rows(3)), ((4, 2), _s(3))],
    (_s(0, 3), _s(1, 3), _s(2, 3)),
    True,
  ),
  "dot_general_contracting_rows": (
    lambda x, w: jax.lax.dot_general(x, w, (((0,), (0,)), ((), ()))),
    [((3, 4), _rows(3)), ((3, 2), _s(3))],
    (_s(0, 1, 2, 3),) * 4,
    True,
  ),
  # what carries no gradient
  "stop_gradient_carries_nothing": (
    lambda x: jax.lax.stop_gradient(x) * 2.0,
    [((3, 4), _rows(3))],
    (_s(),) * 3,
    True,
  ),
  "integers_carry_nothing": (
    lambda x: jnp.argmax(x, axis=1).astype(x.dtype),
    [((3, 4), _rows(3))],
    (_s(),) * 3,
    True,
  ),
  # axis bookkeeping
  "elementwise_with_a_scalar": (
    lambda x, s: jnp.tanh(x) * s,
    [((3, 4), _rows(3)), ((), _s(3))],
    (_s(0, 3), _s(1, 3), _s(2, 3)),
    True,
  ),
  "strided_slice": (
    lambda x: x[::2],
    [((3, 4), _rows(3))],
    (_s(0), _s(2)),
    True,
  ),
  "dynamic_slice_of_whole_rows": (
    lambda x: jax.lax.dynamic_slice_in_dim(x, 1, 2, axis=1),
    [((3, 4), _rows(3))],
    _rows(3),
    True,
  ),
  "broadcast_of_one_row": (
    lambda x: jnp.broadcast_to(x[1:2], (3, 4)),
    [((3, 4), _rows(3))],
    (_s(1),) * 3,
    True,
  ),
  "reduction_within_rows": (
    lambda x: jnp.sum(x**2, axis=1),
    [((3, 4), _rows(3))],
    _rows(3),
    True,
  ),
  "reduction_over_rows": (
    lambda x: jnp.sum(x, axis=0),
    [((3, 4), _rows(3))],
    (ALL3,) * 4,
    True,
  ),
  "reshape_keeping_rows": (
    lambda x: x.reshape(3, 2, 2),
    [((3, 4), _rows(3))],
    _rows(3),
    True,
  ),
  "reshape_merging_rows": (
    lambda x: x.reshape(6, 2),
    [((3, 4), _rows(3))],
    (ALL3,) * 6,
    False,
  ),
  "squeeze_of_another_axis": (
    lambda x: jnp.squeeze(x, 1),
    [((3, 1, 4), _rows(3))],
    _rows(3),
    True,
  ),
  "transpose_keeping_rows": (
    lambda x: jnp.transpose(x, (0, 2, 1)),
    [((3, 4, 5), _rows(3))],
    _rows(3),
    True,
  ),
  "transpose_moving_rows": (
    lambda x: x.T,
    [((3, 4), _rows(3))],
    (ALL3,) * 4,
    True,
  ),
  "cumsum_within_rows": (
    lambda x: jnp.cumsum(x, axis=1),
    [((3, 4), _rows(3))],
    _rows(3),
    True,
  ),
  "cumsum_over_rows": (
    lambda x: jnp.cumsum(x, axis=0),
    [((3, 4), _rows(3))],
    (ALL3,) * 3,
    False,
  ),
  # calls followed into their bodies
  "custom_jvp_call": (
    lambda x: jax.nn.relu(x) + x,
    [((3, 4), _rows(3))],
    _rows(3),
    True,
  ),
  "checkpoint": (jax.checkpoint(jnp.sin), [((3, 4), _rows(3))], _rows(3), True),
}


def _reported_rows(fn, inputs):
  args = [jax.ShapeDtypeStruct(shape, jnp.float64) for shape, _ in inputs]
  jaxpr = jax.make_jaxpr(fn)(*args)
  out = dataflow.dependencies(jaxpr, [dep for _, dep in inputs])[0]
  return dataflow.row_dependencies(out, jaxpr.out_avals[0].shape[0])


def _true_rows(fn, inputs):
  """Per output row, the labels of the inputs its Jacobian rows touch."""
  rng = np.random.default_rng(0)
  args = [rng.normal(size=shape) for shape, _ in inputs]
  jacobians = jax.jit(jax.jacrev(fn, argnums=tuple(range(len(args)))))(*args)
  rows = None
  for arg, (_, dep), jac in zip(
    args, inputs, jax.device_get(jacobians), strict=True
  ):
    # Each input row carries one label: the label of each input element.
    labels = np.empty(arg.shape, object)
    if arg.ndim:
      for i, row in enumerate(dataflow.row_dependencies(dep, arg.shape[0])):
        (labels[i],) = row
    else:
      (labels[()],) = dep
    # jac[r] has the output row's shape, then the input's.
    touched = [
      np.abs(jac[r]).reshape((-1,) + arg.shape).max(axis=0) > 0
      for r in range(jac.shape[0])
    ]
    reads = [frozenset(np.atleast_1d(labels[t]).tolist()) for t in touched]
    rows = (
      reads
      if rows is None
      else [a | b for a, b in zip(rows, reads, strict=True)]
    )
  return tuple(rows)


@pytest.mark.parametrize("case", list(_CASES))
def test_row_rule(case):
  fn, inputs, expected, exact = _CASES[case]
  with jax.enable_x64(True):
    reported = _reported_rows(fn, inputs)
    true = _true_rows(fn, inputs)
  assert reported == expected
  assert all(t <= e for t, e in zip(true, expected, strict=True)), true
  assert (true == expected) == exact, true


def test_row_dependencies():
  assert dataflow.row_dependencies((_s(0), _s(1)), 2) == (_s(0), _s(1))
  assert dataflow.row_dependencies(_s(0, 1), 3) == (_s(0, 1),) * 3
  # Rows of another axis's length say nothing about these rows: the union.
  assert dataflow.row_dependencies((_s(0), _s(1)), 3) == (_s(0, 1),) * 3


def test_dependencies_checks_its_inputs():
  jaxpr = jax.make_jaxpr(lambda a, b: a * b)(jnp.ones(2), jnp.ones(2))
  with pytest.raises(
    ValueError, match="in_deps has 1 entries but the jaxpr has 2 inputs"
  ):
    dataflow.dependencies(jaxpr, [_s(0)])
  with pytest.raises(
    ValueError,
    match=r"in_deps\[1\] has one set per row"
    r" for 3 rows, but input 1 has shape \(2,\)",
  ):
    dataflow.dependencies(jaxpr, [_s(0), _rows(3)])


def _mixing_losses(reads):
  """Losses of exits where exit k reads the logits of exits ``reads[k]``."""

  def losses(*exit_logits):
    logits = jnp.stack(exit_logits)  # as the staged Jacobian passes them
    per_exit = [jnp.mean(logits[j] ** 2) for j in range(len(exit_logits))]
    return jnp.stack(
      [
        sum((per_exit[j] for j in sorted(read)), jnp.zeros(()))
        for read in reads
      ]
    ), {"aux": 1.0}

  return losses


@settings(max_examples=30, deadline=None)
@given(
  st.integers(1, 4).flatmap(
    lambda k: st.lists(st.sets(st.integers(0, k - 1)), min_size=k, max_size=k)
  )
)
def test_check_exit_dependencies_names_every_later_read(reads):
  num_exits = len(reads)
  jaxpr = jax.make_jaxpr(_mixing_losses(reads))(*[jnp.ones((2, 3))] * num_exits)
  later = {
    (k + 1, j + 1) for k, read in enumerate(reads) for j in read if j > k
  }
  if not later:
    dataflow.check_exit_dependencies(jaxpr, num_exits, "losses")
    return
  with pytest.raises(
    ValueError,
    match="losses: the loss of an exit depends on the logits of a later exit",
  ) as error:
    dataflow.check_exit_dependencies(jaxpr, num_exits, "losses")
  named = {
    (int(k), int(j))
    for k, js in re.findall(
      r"exit (\d+) reads exit\(s\) ([\d, ]+)", str(error.value)
    )
    for j in js.split(", ")
  }
  assert named == later
