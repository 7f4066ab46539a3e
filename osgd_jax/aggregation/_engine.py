"""From a weighting to an Optax transformation: the one aggregation path.

Every transformation of the package takes per-exit gradients stacked on a
leading axis K (every leaf ``(K, *param.shape)``, as
:func:`osgd_jax.value_and_per_exit_grads` returns them) and returns one
parameter-shaped update, in three steps (``docs/design.md``, "Weightings:
the one aggregation path"):

1. the Gram matrix of every leaf (one pass over the gradients), summed over
   the leaves when they share one basis (``granularity="global"``);
2. the weights ``w`` of each group (a leaf, or all leaves), from a weighting
   of its K×K Gram matrix;
3. ``Σ_k w_k g_k`` for every leaf (a second pass).

:func:`from_weighting` builds such a transformation from any weighting; the
pieces it is made of (:func:`read_stacked`, :func:`group_grams`,
:func:`combine`, :func:`diagnostics`) serve the transformations whose
state holds more (OSGD's) or that read every coordinate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from osgd_jax import gram as gram_lib
from osgd_jax._gramian_core import Gramian
from osgd_jax.aggregation import _checks
from osgd_jax.aggregation._types import Granularity, Weighting

# The dtype of every diagnostic in a state, whatever the gradients' dtype, so
# that a state keeps its dtypes from ``init`` on.
DIAGNOSTICS_DTYPE = jnp.float32


class StatefulWeighting(NamedTuple):
  """A weighting with a state of its own, or one that reads the step's losses.

  Attributes:
    init: ``init(num_exits) -> state``: the state of one group, a pytree of
      arrays whose shapes and dtypes never change.
    apply: ``apply(gram, state, **extra_args) -> (weights, new_state)`` for
      one group's ``(K, K)`` Gram matrix. ``extra_args`` are the keyword
      arguments of the transformation's ``update`` (e.g. ``losses=``); an
      ``apply`` ignores those it does not use.

  Example:
    >>> import jax.numpy as jnp
    >>> # The sum of the exits' gradients, counting the steps.
    >>> counting = StatefulWeighting(
    ...     init=lambda num_exits: jnp.zeros((), jnp.int32),
    ...     apply=lambda gram, count, **_: (
    ...         jnp.ones(gram.shape[-1]), count + 1))
    >>> weights, count = counting.apply(jnp.eye(2), counting.init(2))
    >>> weights.tolist(), int(count)
    ([1.0, 1.0], 1)
  """

  init: Callable[[int], Any]
  apply: Callable[..., tuple[jax.Array, Any]]


def stateless(weighting: Weighting) -> StatefulWeighting:
  """A :class:`StatefulWeighting` with an empty state around a pure weighting.

  Example:
    >>> import jax.numpy as jnp
    >>> stateless(lambda gram: jnp.ones(2)).apply(jnp.eye(2), ())[0].tolist()
    [1.0, 1.0]
  """

  def apply(gram, state, **extra_args):
    del extra_args
    return weighting(gram), state

  return StatefulWeighting(init=lambda num_exits: (), apply=apply)


class AggregationState(NamedTuple):
  """The state of a :func:`from_weighting` transformation.

  Attributes:
    weights: ``(K,)`` the weights of the last update (``granularity="leaf"``:
      their mean over the leaves, weighted by the leaves' sizes).
    exit_norms: ``(K,)`` the norm of each exit's gradient over all
      parameters, at the last update.
    cosine: ``(K, K)`` the cosine similarity between the exits' gradients
      over all parameters, at the last update (0 where either is zero).
    weighting_state: the weighting's own state, with a leading axis of one
      entry per group (one per leaf for ``granularity="leaf"``, else one);
      ``()`` for a stateless weighting.
  """

  weights: jax.Array
  exit_norms: jax.Array
  cosine: jax.Array
  weighting_state: Any


class StackedGradients(NamedTuple):
  """Validated stacked gradients and their Gram matrices.

  Attributes:
    leaves: the stacked leaves, each ``(K, *param.shape)``.
    treedef: the tree structure of the gradients.
    sizes: the number of parameters of every leaf.
    compute_dtype: float32, or float64 for float64 gradients.
    grams: ``(L, K, K)`` the Gram matrix of every leaf scaled by a power of
      four, in ``compute_dtype``: finite for any finite gradients
      (:func:`osgd_jax.gram.scaled_gram_matrices`).
    exponents: ``(L,)`` int32; leaf l's Gram matrix is
      ``4^exponents[l] · grams[l]``.
  """

  leaves: list[jax.Array]
  treedef: Any
  sizes: tuple[int, ...]
  compute_dtype: Any
  grams: jax.Array
  exponents: jax.Array


def num_groups(params: optax.Params, granularity: Granularity) -> int:
  """How many Gram matrices an update weighs: one per leaf, or one.

  Example:
    >>> num_groups({"w": 0.0, "b": 0.0}, "leaf"), num_groups({}, "global")
    (2, 1)
  """
  return len(jax.tree.leaves(params)) if granularity == "leaf" else 1


def _leaf_name(path: Any) -> str:
  return jax.tree_util.keystr(path) or "<root>"


# How to make stacked gradients, for the errors that meet unstacked ones.
_HOW_TO_STACK = (
  "stack the K per-exit gradients on a new leading axis:"
  " osgd_jax.value_and_per_exit_grads returns them so, or"
  " jax.tree.map(lambda *g: jnp.stack(g), *per_exit_grads) stacks K"
  " gradient trees"
)


def _check_leaves(flat: list[tuple[Any, Any]], name: str) -> int:
  """Returns the shared leading size K, or raises naming the offending leaf."""
  first_path, first = flat[0]
  for path, leaf in flat:
    if not hasattr(leaf, "shape") or np.ndim(leaf) == 0:
      raise ValueError(
        f"{name} expects every gradient leaf stacked as (K, *param.shape),"
        f" but leaf {_leaf_name(path)} is a scalar. Compute the gradients"
        " with osgd_jax.value_and_per_exit_grads."
      )
    if jnp.issubdtype(leaf.dtype, jnp.complexfloating):
      raise ValueError(
        f"gradient leaf {_leaf_name(path)} has complex dtype {leaf.dtype};"
        f" {name} takes real gradients only: keep the real and imaginary"
        " parts as two real parameters."
      )
    if not jnp.issubdtype(leaf.dtype, jnp.inexact):
      raise ValueError(
        f"gradient leaf {_leaf_name(path)} has non-float dtype {leaf.dtype};"
        " gradients are floating point."
      )
    if leaf.shape[0] != first.shape[0]:
      raise ValueError(
        f"all gradient leaves must share the leading exit axis K, but leaf"
        f" {_leaf_name(first_path)} has K={first.shape[0]} and leaf"
        f" {_leaf_name(path)} has K={leaf.shape[0]}. If these are"
        f" unstacked (parameter-shaped) gradients, {_HOW_TO_STACK}."
      )
  if first.shape[0] == 0:
    raise ValueError(
      f"gradient leaf {_leaf_name(first_path)} has K=0 exits; stacked"
      " gradients need at least one row."
    )
  return first.shape[0]


def _check_structure(treedef: Any, params: Any) -> list[Any]:
  """The params' leaves, once their structure is the gradients'."""
  flat_params, params_treedef = jax.tree_util.tree_flatten_with_path(params)
  if params_treedef != treedef:
    raise ValueError(
      "the stacked gradients and params have different tree structures:"
      f" {treedef} vs {params_treedef}. Pass the params the gradients were"
      " taken with respect to."
    )
  return [param for _, param in flat_params]


def _check_unstacked(
  flat: list[tuple[Any, Any]], params: list[Any], name: str
) -> None:
  """Refuses gradients shaped like the params: one gradient, not K."""
  if all(
    np.shape(leaf) == np.shape(param)
    for (_, leaf), param in zip(flat, params, strict=True)
  ):
    raise ValueError(
      f"{name} takes per-exit gradients stacked as (K, *param.shape), but"
      " every gradient leaf has its parameter's shape: these are unstacked"
      f" gradients. {_HOW_TO_STACK[0].upper()}{_HOW_TO_STACK[1:]}."
    )


def _check_against_params(
  flat: list[tuple[Any, Any]], params: list[Any]
) -> None:
  for (path, leaf), param in zip(flat, params, strict=True):
    if tuple(leaf.shape[1:]) != tuple(np.shape(param)):
      shape = ", ".join(map(str, np.shape(param)))
      raise ValueError(
        f"gradient leaf {_leaf_name(path)} has shape {tuple(leaf.shape)},"
        f" expected (K, *param.shape) = (K, {shape}) for its parameter."
        " Stack per-exit gradients on a new leading axis"
        " (osgd_jax.value_and_per_exit_grads does)."
      )


def read_stacked(
  updates: optax.Updates,
  *,
  num_exits: int,
  params: optax.Params | None = None,
  name: str,
) -> StackedGradients | None:
  """Checks stacked gradients and forms every leaf's Gram matrix.

  Args:
    updates: a pytree whose leaves are ``(K, *param.shape)`` float arrays.
    num_exits: the K the transformation was built for.
    params: the parameters, if given to ``update``: the gradients must have
      their structure and shapes (with the extra leading axis).
    name: the transformation's name, for error messages.

  Returns:
    A :class:`StackedGradients`, or ``None`` for a tree without leaves.

  Raises:
    ValueError: at trace time, naming the leaf: a scalar, integer or
      complex leaf, leaves with different K, a K other than ``num_exits``,
      unstacked gradients (every leaf shaped like its parameter, when
      ``params`` is given), or a shape that does not match its parameter.

  Example:
    >>> import jax.numpy as jnp
    >>> stacked = read_stacked({"w": jnp.ones((2, 3))}, num_exits=2,
    ...                        name="example")
    >>> stacked.sizes, stacked.grams.shape
    ((3,), (1, 2, 2))
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(updates)
  if not flat:
    return None
  flat_params = None
  if params is not None:
    flat_params = _check_structure(treedef, params)
    _check_unstacked(flat, flat_params, name)
  k = _check_leaves(flat, name)
  if k != num_exits:
    # Without params, unstacked gradients whose every leading dimension
    # happens to be the same look stacked; so the advice starts there.
    raise ValueError(
      f"the gradients have K={k} exits but {name} was built with"
      f" num_exits={num_exits} (K={k} is every leaf's leading axis)."
      " If these are unstacked"
      f" gradients, {_HOW_TO_STACK}; pass params to update so that the"
      " shapes are checked. Only if they really are stacked for K="
      f"{k} exits, build {name} with num_exits={k} and its state with"
      " that transformation's init."
    )
  if flat_params is not None:
    _check_against_params(flat, flat_params)
  leaves = [leaf for _, leaf in flat]
  compute_dtype = jnp.result_type(jnp.float32, *[leaf.dtype for leaf in leaves])
  sizes = tuple(math.prod(leaf.shape[1:]) for leaf in leaves)
  grams, exponents = gram_lib.scaled_gram_matrices(leaves, compute_dtype)
  return StackedGradients(
    leaves, treedef, sizes, compute_dtype, grams, exponents
  )


class GramianGradients(NamedTuple):
  """A :class:`~osgd_jax.Gramian` read like :class:`StackedGradients`.

  What a Gram weighting reads of the gradients, without their coordinates:
  :func:`combine` asks the Gramian for ``Σ_k w_k g_k``.

  Attributes:
    gramian: the :class:`~osgd_jax.Gramian`.
    treedef: the tree structure of the parameters.
    sizes: the number of parameters of every leaf.
    compute_dtype: float32, or float64 for float64 parameters.
    grams: ``(G, K, K)`` the Gram matrix of each group the transformation
      weighs: one per leaf (``granularity="leaf"``), or one.
    exponents: ``(G,)`` int32; group g's Gram matrix is
      ``4^exponents[g] · grams[g]`` (:meth:`~osgd_jax.Gramian.scaled_grams`,
      finite for any finite gradients, as for :class:`StackedGradients`).
  """

  gramian: Gramian
  treedef: Any
  sizes: tuple[int, ...]
  compute_dtype: Any
  grams: jax.Array
  exponents: jax.Array


def read_gramian(
  gramian: Gramian,
  *,
  num_exits: int,
  params: optax.Params | None = None,
  name: str,
  granularity: Granularity | None,
) -> GramianGradients:
  """Checks a :class:`~osgd_jax.Gramian` and forms its groups' Gram matrices.

  Args:
    gramian: from :func:`osgd_jax.value_and_gramian` or
      :func:`osgd_jax.staged_value_and_gramian`.
    num_exits: the K the transformation was built for.
    params: the parameters, if given to ``update``.
    name: the transformation's name, for error messages.
    granularity: the groups the transformation weighs; ``None`` for a
      transformation that reads every coordinate, which a Gramian lacks.

  Raises:
    ValueError: a transformation that needs coordinates, another K, or
      params of another structure or shape.
  """
  if granularity is None:
    raise ValueError(
      f"{name} reads every coordinate of the per-exit gradients, which an"
      " osgd_jax.Gramian does not hold; pass it stacked gradients from"
      " osgd_jax.value_and_per_exit_grads."
    )
  if gramian.num_exits != num_exits:
    raise ValueError(
      f"the Gramian has K={gramian.num_exits} exits but {name} was built"
      f" with num_exits={num_exits}; build it with"
      f" num_exits={gramian.num_exits}."
    )
  if params is not None:
    gramian.check_params(params, name)
  grams, exponents = gramian.scaled_grams(granularity)
  return GramianGradients(
    gramian,
    gramian.treedef,
    gramian.sizes,
    gramian.compute_dtype,
    grams,
    exponents,
  )


def read_gradients(
  updates: optax.Updates,
  *,
  num_exits: int,
  params: optax.Params | None,
  name: str,
  granularity: Granularity | None,
) -> StackedGradients | GramianGradients | None:
  """Reads stacked gradients (:func:`read_stacked`) or a Gramian.

  A Gramian is read by :func:`read_gramian` for a transformation that weighs
  ``granularity`` groups, and refused by one that reads coordinates
  (``granularity=None``).
  """
  if isinstance(updates, Gramian):
    return read_gramian(
      updates,
      num_exits=num_exits,
      params=params,
      name=name,
      granularity=granularity,
    )
  return read_stacked(updates, num_exits=num_exits, params=params, name=name)


def check_not_lost(params: optax.Params | None, name: str) -> None:
  """Refuses gradients without leaves for params that have some.

  A tree without leaves passes through a transformation (``optax.masked``
  hands one over when nothing is selected), but not with params that have
  leaves: the gradients were lost on the way. That is what an
  :class:`~osgd_jax.Gramian` given to ``nnx.Optimizer.update`` becomes, as
  Flax keeps only the ``nnx.Variable`` leaves of its gradients, so the
  message names the optimizer that takes one.

  Raises:
    ValueError: ``params`` has leaves.

  Example:
    >>> check_not_lost({}, "osgd")
  """
  count = len(jax.tree.leaves(params))
  if count:
    raise ValueError(
      f"{name} got gradients without leaves for params with {count}"
      " leaves. nnx.Optimizer.update drops an osgd_jax.Gramian so (it"
      " keeps only nnx.Variables): use osgd_jax.Optimizer, whose update"
      " takes a Gramian, in place of nnx.Optimizer (same arguments)."
    )


def is_gramian(updates: Any) -> bool:
  """Whether ``updates`` is a :class:`~osgd_jax.Gramian`.

  Example:
    >>> is_gramian({"w": 0.0})
    False
  """
  return isinstance(updates, Gramian)


def sum_exits(updates: Any) -> Any:
  """``Σ_k g_k`` of stacked gradients or of a Gramian, parameter-shaped.

  Example:
    >>> import jax.numpy as jnp
    >>> sum_exits({"w": jnp.ones((2, 3))})["w"].tolist()
    [2.0, 2.0, 2.0]
  """
  if isinstance(updates, Gramian):
    return updates.combine(
      jnp.ones((updates.num_exits,), updates.compute_dtype)
    )
  return jax.tree.map(lambda g: jnp.sum(g, axis=0), updates)


def group_grams(
  grams: jax.Array, exponents: jax.Array, granularity: Granularity
) -> tuple[jax.Array, jax.Array]:
  """The scaled Gram matrix of each group and its exponent.

  ``(L, K, K)`` per leaf, or their sum (:func:`osgd_jax.gram.combine_scaled`).

  Example:
    >>> import jax.numpy as jnp
    >>> grams, exps = group_grams(jnp.ones((3, 2, 2)), jnp.zeros(3, int),
    ...                           "global")
    >>> grams.shape, exps.tolist()
    ((1, 2, 2), [0])
  """
  return gram_lib.combine_scaled(grams, exponents, granularity == "global")


def group_ranks(sizes: tuple[int, ...], granularity: Granularity) -> jax.Array:
  """The largest rank each group's Gram matrix can have: its size.

  Example:
    >>> group_ranks((2, 3), "leaf").tolist(), group_ranks((2, 3), "global")
    ([2, 3], Array([5], dtype=int32))
  """
  per_group = [sum(sizes)] if granularity == "global" else list(sizes)
  # int32 saturates: a group beyond 2^31 entries has no rank bound below K.
  return jnp.asarray(np.minimum(per_group, 2**31 - 1), jnp.int32)


def weigh_groups(
  weighting: StatefulWeighting,
  grams: jax.Array,
  exponents: jax.Array,
  weighting_state: Any,
  gram_degree: float | None,
  extra_args: dict[str, Any],
) -> tuple[jax.Array, Any]:
  """Each group's weights from its scaled Gram matrix, in true units.

  A weighting declared homogeneous (``w(c·M) = c^p · w(M)`` for ``c > 0``,
  ``gram_degree=p``) sees the scaled Gram matrix, always finite, and its
  weights are multiplied by ``4^(E·p)``; one with ``gram_degree=None``
  sees the Gram matrix as it is, and where that overflows the dtype its
  weights are NaN, so that the update is non-finite rather than silently
  wrong.

  Args:
    weighting: the weighting.
    grams: ``(G, K, K)`` scaled Gram matrices.
    exponents: ``(G,)`` int32, each group's Gram matrix is
      ``4^exponents[g] · grams[g]``.
    weighting_state: the weighting's state, one entry per group.
    gram_degree: p, or ``None``.
    extra_args: the keyword arguments of ``update``.

  Returns:
    ``((G, K) weights, new weighting state)``.
  """
  overflow = None
  if gram_degree is None:
    scaled_finite = jnp.all(jnp.isfinite(grams), axis=(-2, -1))
    grams = gram_lib.unscale(grams, exponents[:, None, None])
    overflow = scaled_finite & ~jnp.all(jnp.isfinite(grams), axis=(-2, -1))
  weights, weighting_state = jax.vmap(
    lambda m, s: weighting.apply(m, s, **extra_args)
  )(grams, weighting_state)
  if overflow is not None:
    # Finite gradients whose Gram matrix overflows: the weights of an inf
    # Gram matrix may come out finite and wrong; NaN says so instead.
    weights = jnp.where(overflow[:, None], jnp.nan, weights)
  if gram_degree:
    log2_factor = (2.0 * gram_degree) * exponents.astype(weights.dtype)
    weights = weights * jnp.exp2(log2_factor)[:, None]
  return weights, weighting_state


def combine(
  stacked: StackedGradients | GramianGradients,
  weights: jax.Array,
  granularity: Granularity,
) -> optax.Updates:
  """``Σ_k w_k g_k`` for every leaf, in the structure and dtypes of the input.

  Args:
    stacked: from :func:`read_stacked`.
    weights: ``(G, K)``, one row per group (one per leaf, or one).
    granularity: ``"leaf"`` or ``"global"``.

  Returns:
    The parameter-shaped update.

  Example:
    >>> import jax.numpy as jnp
    >>> stacked = read_stacked({"w": jnp.eye(2)}, num_exits=2, name="example")
    >>> combine(stacked, jnp.asarray([[3.0, 4.0]]), "global")["w"].tolist()
    [3.0, 4.0]
  """
  if isinstance(stacked, GramianGradients):
    return stacked.gramian.combine(weights, granularity)
  shared = granularity == "global"
  outs = [
    gram_lib.weighted_sum(
      weights[0 if shared else i],
      leaf,
      stacked.compute_dtype,
      stacked.exponents[i],
    ).astype(leaf.dtype)
    for i, leaf in enumerate(stacked.leaves)
  ]
  return jax.tree.unflatten(stacked.treedef, outs)


def size_weighted_mean(
  per_group: jax.Array, sizes: tuple[int, ...]
) -> jax.Array:
  """Averages ``(G, ...)`` per-group values, weighting leaves by their size.

  With one group (``granularity="global"``) it is that group's value.

  Example:
    >>> import jax.numpy as jnp
    >>> size_weighted_mean(jnp.asarray([0.0, 1.0]), (1, 3)).tolist()
    0.75
  """
  if per_group.shape[0] == 1:
    return per_group[0]
  fractions = jnp.asarray(sizes, per_group.dtype) / max(sum(sizes), 1)
  return jnp.tensordot(fractions, per_group, axes=1)


def as_diagnostic(x: jax.Array) -> jax.Array:
  """``x`` in the dtype every diagnostic of a state has."""
  return x.astype(DIAGNOSTICS_DTYPE)


def gram_diagnostics(
  stacked: StackedGradients | GramianGradients,
) -> tuple[jax.Array, jax.Array]:
  """``(exit_norms, cosine)`` over all parameters, in the state's dtype."""
  grams, exponents = gram_lib.combine_scaled(
    stacked.grams, stacked.exponents, True
  )
  exit_norms, cosine = gram_lib.gram_statistics(grams[0])
  return (
    as_diagnostic(gram_lib.unscale(exit_norms, exponents[0], degree=1)),
    as_diagnostic(cosine),
  )


def diagnostics(
  stacked: StackedGradients | GramianGradients, weights: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The diagnostics every aggregation state holds, in the state's dtype.

  Args:
    stacked: from :func:`read_stacked`.
    weights: ``(G, K)`` the weights applied to each group.

  Returns:
    ``(weights, exit_norms, cosine)`` as in :class:`AggregationState`.
  """
  mean_weights = size_weighted_mean(weights, stacked.sizes)
  return (as_diagnostic(mean_weights), *gram_diagnostics(stacked))


def init_weighting_state(
  weighting: StatefulWeighting, num_exits: int, groups: int
) -> Any:
  """One copy of the weighting's initial state per group, stacked.

  Example:
    >>> import jax.numpy as jnp
    >>> counting = StatefulWeighting(lambda k: jnp.zeros(k), None)
    >>> init_weighting_state(counting, 3, 2).shape
    (2, 3)
  """
  one = weighting.init(num_exits)
  return jax.tree.map(
    lambda x: jnp.broadcast_to(jnp.asarray(x), (groups,) + jnp.shape(x)), one
  )


def check_state(
  state: Any,
  init_fn: optax.TransformInitFn,
  updates: optax.Updates,
  params: optax.Params | None,
  *,
  num_exits: int,
  name: str,
) -> None:
  """Refuses a state that ``init_fn`` would not make for these gradients.

  A state made for another K (or other params) has other shapes: taken as
  it is, it would change shape under ``jax.lax.scan`` or fail inside the
  update with a broadcasting error. Its shapes are compared with those of
  ``init_fn`` on the params (or, without them, on the gradients' parameter
  shapes); dtypes are not, since ``init`` may see other params' dtypes.

  Raises:
    ValueError: naming the first state field whose shape differs, or the
      two structures; the fix is to make the state with this ``init``.
  """
  if params is None and isinstance(updates, Gramian):
    params = jax.tree.unflatten(
      updates.treedef,
      [
        jax.ShapeDtypeStruct(shape, dtype)
        for shape, dtype in zip(updates.shapes, updates.dtypes, strict=True)
      ],
    )
  elif params is None:
    params = jax.tree.map(
      lambda g: jax.ShapeDtypeStruct(np.shape(g)[1:], jnp.result_type(g)),
      updates,
    )
  expected = jax.eval_shape(init_fn, params)
  fix = (
    f" The state was made by another transformation's init (another"
    f" num_exits, or other params); make it with this one's:"
    f" state = tx.init(params) for {name}(num_exits={num_exits})."
  )
  flat, treedef = jax.tree_util.tree_flatten_with_path(state)
  flat_expected, expected_treedef = jax.tree_util.tree_flatten_with_path(
    expected
  )
  if treedef != expected_treedef:
    raise ValueError(
      f"{name}'s state has structure {treedef}, but its init makes"
      f" {expected_treedef}.{fix}"
    )
  for (path, leaf), (_, want) in zip(flat, flat_expected, strict=True):
    if tuple(np.shape(leaf)) != tuple(want.shape):
      raise ValueError(
        f"{name}'s state field {_leaf_name(path)} has shape"
        f" {tuple(np.shape(leaf))}, but {name} with num_exits={num_exits}"
        f" makes it {tuple(want.shape)} for these gradients.{fix}"
      )


def all_finite(tree: Any) -> jax.Array:
  """Whether every float in ``tree`` is finite (other leaves are ignored).

  An aggregator keeps its own state (running averages, counts, keys) where
  this is false, so that ``optax.apply_if_finite`` after it skips the step.

  Example:
    >>> import jax.numpy as jnp
    >>> bool(all_finite({"g": jnp.ones(2), "key": jnp.zeros(2, jnp.uint32)}))
    True
  """
  checks = [
    jnp.all(jnp.isfinite(x))
    for x in jax.tree.leaves(tree)
    if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
  ]
  return jnp.all(jnp.stack(checks)) if checks else jnp.asarray(True)


def keep_if_finite(finite: jax.Array, new: Any, old: Any) -> Any:
  """``new`` where ``finite``, else ``old``, each leaf in ``old``'s dtype."""
  return jax.tree.map(
    lambda n, o: jnp.where(finite, jnp.asarray(n).astype(o.dtype), o), new, old
  )


def stacked_transformation(
  init_fn: optax.TransformInitFn,
  apply_fn: Callable[..., tuple[optax.Updates, Any]],
  *,
  num_exits: int,
  name: str,
  granularity: Granularity | None = None,
) -> optax.GradientTransformationExtraArgs:
  """A transformation whose update starts from checked stacked gradients.

  Every aggregator's ``update`` checks the stacked gradients against
  ``num_exits`` and ``params`` and the state against what ``init_fn``
  makes (:func:`check_state`), forms their Gram matrices, passes a tree
  without leaves through, and runs in a ``jax.named_scope`` of its name;
  this is that part, once.

  Args:
    init_fn: ``init_fn(params) -> state``.
    apply_fn: ``apply_fn(stacked, state, **extra_args) -> (updates,
      state)`` on the :class:`StackedGradients` of the update.
    num_exits: K.
    name: the transformation's name, for errors and the named scope.
    granularity: the groups a transformation that needs only Gram matrices
      weighs: it then also takes an :class:`~osgd_jax.Gramian` (read by
      :func:`read_gramian`). ``None``: it reads every coordinate and
      refuses a Gramian.

  Returns:
    The ``optax.GradientTransformationExtraArgs``.
  """

  def update_fn(updates, state, params=None, **extra_args):
    with jax.named_scope(name):
      stacked = read_gradients(
        updates,
        num_exits=num_exits,
        params=params,
        name=name,
        granularity=granularity,
      )
      if stacked is None:
        check_not_lost(params, name)
        return updates, state
      check_state(
        state, init_fn, updates, params, num_exits=num_exits, name=name
      )
      return apply_fn(stacked, state, **extra_args)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def from_weighting(
  weighting: Weighting | StatefulWeighting,
  num_exits: int | None = None,
  *,
  granularity: Granularity = "global",
  name: str = "from_weighting",
  gram_degree: float | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Turns a weighting into an Optax transformation of stacked gradients.

  The update is ``Σ_k w_k g_k`` with ``w`` the weighting of the Gram matrix
  ``M = G Gᵀ`` of the exits' gradients: over all parameters
  (``granularity="global"``), or per parameter tensor (``"leaf"``). The
  transformation consumes stacked gradients and emits parameter-shaped
  updates, so it goes first in a chain; what follows sees ordinary
  gradients. Gradients in bfloat16 or float16 are processed in float32 and
  returned in their own dtype.

  Args:
    weighting: a function ``(K, K) -> (K,)`` (see :mod:`osgd_jax.weightings`)
      or a :class:`StatefulWeighting`.
    num_exits: K, required. The state's shapes are fixed at ``init`` (for
      ``jax.lax.scan`` over steps and checkpoints restored onto
      ``tx.init(params)``), so K must be known up front.
    granularity: ``"global"`` (one weight vector for all parameters) or
      ``"leaf"`` (one per parameter tensor).
    name: the name in error messages, and the ``jax.named_scope`` of the
      update's operations (visible in profiles).
    gram_degree: how the weights change when the Gram matrix is scaled. A
      number p declares ``weighting(c·M) = c^p · weighting(M)`` for every
      ``c > 0`` (0: scale-invariant weights, as for most methods; then the
      update scales with the gradients): the weighting is given the Gram
      matrix divided by an exact power of four, finite for any finite
      gradients, and its weights are scaled back. ``None`` (the default,
      for a weighting with constants of its own, such as an ``eps``): it
      is given the Gram matrix as it is, which overflows float32 for
      gradients of norm beyond about 1.8e19, making the update non-finite
      (``docs/design.md``, "Range, rank and derivatives").

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`AggregationState`. ``update(grads, state, params=None,
    **extra_args)`` takes the stacked gradients; ``params``, if given, are
    checked against them; ``extra_args`` reach a stateful weighting. A NaN
    or Inf gradient gives a non-finite update (of its group, under
    ``"leaf"``) and leaves the weighting's state unchanged, so
    ``optax.apply_if_finite`` after this transformation skips the step.

  Raises:
    ValueError: a bad ``num_exits`` or ``granularity`` (at construction);
      gradients that are not stacked ``(K, *param.shape)`` real float
      arrays with ``K == num_exits``, or a state this transformation's
      ``init`` did not make (at trace time, naming the leaf or field).
      Without ``params``, unstacked gradients cannot always be told from
      stacked ones: when every parameter's first dimension happens to be
      K, they pass as K rows. Pass ``params`` to ``update`` and such
      gradients are refused.

  Example:
    >>> import jax.numpy as jnp, optax, osgd_jax
    >>> def by_norm(gram):   # exit k weighted by its share of ‖g‖²
    ...   sq = jnp.diagonal(gram)
    ...   return gram.shape[-1] * sq / jnp.maximum(sq.sum(), 1e-30)
    >>> tx = optax.chain(osgd_jax.from_weighting(by_norm, num_exits=2),
    ...                  optax.sgd(1.0))
    >>> params = {"w": jnp.zeros(2)}
    >>> grads = {"w": jnp.asarray([[1.0, 0.0], [0.0, 3.0]])}
    >>> updates, state = tx.update(grads, tx.init(params), params)
    >>> [round(u, 4) for u in updates["w"].tolist()]   # weights 0.2 and 1.8
    [-0.2, -5.4]
  """
  _checks.check_not_num_exits(weighting, "weighting", name, num_exits)
  num_exits = _checks.check_num_exits(num_exits, name)
  _checks.check_granularity(granularity, name)
  _checks.check_finite(gram_degree, "gram_degree", name)
  if not isinstance(weighting, StatefulWeighting):
    if not callable(weighting):
      raise ValueError(
        f"{name}: weighting must be a function (K, K) -> (K,) or an"
        f" osgd_jax.StatefulWeighting, got {type(weighting).__name__}."
      )
    weighting = stateless(weighting)
  stateful: StatefulWeighting = weighting

  def init_fn(params):
    k = num_exits
    return AggregationState(
      weights=jnp.zeros((k,), DIAGNOSTICS_DTYPE),
      exit_norms=jnp.zeros((k,), DIAGNOSTICS_DTYPE),
      cosine=jnp.zeros((k, k), DIAGNOSTICS_DTYPE),
      weighting_state=init_weighting_state(
        stateful, k, num_groups(params, granularity)
      ),
    )

  def apply_fn(stacked, state, **extra_args):
    grams, exponents = group_grams(
      stacked.grams, stacked.exponents, granularity
    )
    weights, weighting_state = weigh_groups(
      stateful,
      grams,
      exponents,
      state.weighting_state,
      gram_degree,
      extra_args,
    )
    weights = weights.astype(stacked.compute_dtype)
    new_updates = combine(stacked, weights, granularity)
    mean_weights, exit_norms, cosine = diagnostics(stacked, weights)
    # A step with a NaN or Inf gradient or loss leaves the weighting's
    # state (AdaLoss's running losses, ...) as it was: its update is
    # non-finite, so that optax.apply_if_finite later in the chain skips
    # it, and the steps after it start from an unpoisoned state.
    weighting_state = keep_if_finite(
      all_finite((grams, extra_args)), weighting_state, state.weighting_state
    )
    return new_updates, AggregationState(
      mean_weights, exit_norms, cosine, weighting_state
    )

  return stacked_transformation(
    init_fn, apply_fn, num_exits=num_exits, name=name, granularity=granularity
  )
