"""From a weighting to an Optax transformation: the one aggregation path.

Every transformation of the library takes per-exit gradients stacked on a
leading axis K (every leaf ``(K, *param.shape)``, as
:func:`osgd_jax.value_and_per_exit_grads` returns them) and returns one
parameter-shaped update, in three steps:

1. the Gram matrix of every leaf (one pass over the gradients), summed over
   the leaves when they share one basis (``granularity="global"``);
2. the weights ``w`` of each group (a leaf, or all leaves), from a
   :mod:`~osgd_jax.weightings` function of its K×K Gram matrix;
3. ``Σ_k w_k g_k`` for every leaf (a second pass).

:func:`from_weighting` builds such a transformation from any weighting; the
pieces it is made of (:func:`read_stacked`, :func:`group_grams`,
:func:`combine`, :func:`diagnostics`) are public too, for transformations
whose state holds more (:func:`osgd_jax.osgd` builds on them).

A weighting that needs a state (a step count, a running average, a PRNG key)
or the step's losses is a :class:`StatefulWeighting`. Its state lives in the
Optax state, one copy per group, with shapes fixed at ``init``; the
update's keyword arguments (``tx.update(grads, state, params,
losses=losses)``) reach its ``apply``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from osgd_jax import gram as gram_lib
from osgd_jax import weightings

__all__ = [
    "GRANULARITIES",
    "AggregationState",
    "StackedGradients",
    "StatefulWeighting",
    "check_granularity",
    "check_num_exits",
    "check_fraction",
    "check_nonnegative",
    "check_positive_int",
    "check_pref_vector",
    "check_unit_interval",
    "combine",
    "diagnostics",
    "from_weighting",
    "group_grams",
    "init_weighting_state",
    "is_checkable_number",
    "num_groups",
    "read_stacked",
    "size_weighted_mean",
    "stateless",
]

#: The ``granularity`` values: one Gram matrix and weight vector per
#: parameter tensor (``"leaf"``), or one over all parameters (``"global"``).
GRANULARITIES = ("leaf", "global")

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
    ...     apply=lambda gram, count, **_: (jnp.ones(gram.shape[-1]), count + 1))
    >>> weights, count = counting.apply(jnp.eye(2), counting.init(2))
    >>> weights.tolist(), int(count)
    ([1.0, 1.0], 1)
  """

  init: Callable[[int], Any]
  apply: Callable[..., tuple[jax.Array, Any]]


def stateless(weighting: weightings.Weighting) -> StatefulWeighting:
  """A :class:`StatefulWeighting` with an empty state around a pure weighting.

  Args:
    weighting: ``(K, K) -> (K,)``.

  Returns:
    A :class:`StatefulWeighting` whose state is ``()``.

  Example:
    >>> import jax.numpy as jnp
    >>> from osgd_jax import weightings
    >>> stateless(weightings.uniform).apply(jnp.eye(2), ())[0].tolist()
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
    grams: ``(L, K, K)`` the Gram matrix of every leaf, in ``compute_dtype``.
  """

  leaves: list[jax.Array]
  treedef: Any
  sizes: tuple[int, ...]
  compute_dtype: Any
  grams: jax.Array

  @property
  def num_exits(self) -> int:
    """K, the length of the leading axis of every leaf."""
    return self.leaves[0].shape[0]


def check_granularity(granularity: str) -> str:
  """Returns ``granularity``, or raises a ``ValueError`` naming the choices.

  Example:
    >>> check_granularity("leaf")
    'leaf'
  """
  if granularity not in GRANULARITIES:
    raise ValueError(
        f"granularity must be one of {GRANULARITIES}, got {granularity!r}.")
  return granularity


def check_positive_int(value: Any, name: str, owner: str) -> int:
  """Returns ``value`` as an int, or raises a ``ValueError`` naming it.

  Structural settings (K, iteration caps, step counts) must be Python ints:
  they fix shapes or loop lengths when the update is traced. Under
  ``optax.inject_hyperparams`` every number becomes an array unless it is
  listed in ``static_args``, which the message says.

  Args:
    value: the value given.
    name: the argument's name.
    owner: the transformation's name, for the message.

  Returns:
    ``value`` as an int.

  Example:
    >>> check_positive_int(3, "max_iter", "mgda")
    3
  """
  if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
      or value < 1):
    raise ValueError(
        f"{owner}: {name} must be a positive int, got {value!r}. Under"
        f" optax.inject_hyperparams pass static_args=({name!r},).")
  return int(value)


def is_checkable_number(x: Any) -> bool:
  """A Python or NumPy number, which can be checked when the factory runs.

  Under ``optax.inject_hyperparams`` numeric arguments arrive as (possibly
  traced) arrays; those are not checked.

  Example:
    >>> is_checkable_number(0.5), is_checkable_number(True)
    (True, False)
  """
  return isinstance(x, (int, float, np.number)) and not isinstance(x, bool)


def check_fraction(value: Any, name: str, owner: str) -> None:
  """Raises a ``ValueError`` naming ``value`` unless it lies in ``[0, 1)``.

  Tolerances and decay rates are such fractions. An array (a hyperparameter
  injected by ``optax.inject_hyperparams``) is not checked.

  Args:
    value: the value given.
    name: the argument's name.
    owner: the transformation's name, for the message.

  Example:
    >>> check_fraction(1e-6, "tol", "osgd")
  """
  if is_checkable_number(value) and not 0 <= value < 1:
    raise ValueError(f"{owner}: {name} must be in [0, 1), got {value!r}.")


def check_unit_interval(value: Any, name: str, owner: str) -> None:
  """Raises a ``ValueError`` naming ``value`` unless it lies in ``[0, 1]``.

  For rates where both ends mean something (an EMA rate of 1 keeps only the
  newest value); an injected array is not checked.

  Example:
    >>> check_unit_interval(1.0, "beta", "gradvac")
  """
  if is_checkable_number(value) and not 0 <= value <= 1:
    raise ValueError(f"{owner}: {name} must be in [0, 1], got {value!r}.")


def check_nonnegative(value: Any, name: str, owner: str) -> None:
  """Raises a ``ValueError`` naming ``value`` unless it is finite and ``≥ 0``.

  For small constants added to denominators, and radii; an injected array
  is not checked.

  Example:
    >>> check_nonnegative(1e-8, "eps", "gradvac")
  """
  if is_checkable_number(value) and not (np.isfinite(value) and value >= 0):
    raise ValueError(
        f"{owner}: {name} must be a finite number >= 0, got {value!r}.")


def check_pref_vector(pref_vector: Any, num_exits: int, owner: str) -> None:
  """Raises a ``ValueError`` unless ``pref_vector`` is ``None`` or K finite numbers.

  Args:
    pref_vector: the preferences given, or ``None`` (uniform).
    num_exits: K.
    owner: the transformation's name, for the message.

  Example:
    >>> check_pref_vector([0.5, 0.5], 2, "dualproj")
  """
  if pref_vector is None:
    return
  # An array (injected by optax.inject_hyperparams, maybe traced) has a
  # shape to check but perhaps no values.
  finite = isinstance(pref_vector, jax.Array) or np.all(
      np.isfinite(np.asarray(pref_vector, np.float64)))
  if np.shape(pref_vector) != (num_exits,) or not finite:
    raise ValueError(
        f"{owner}: pref_vector must be {num_exits} finite numbers (one per"
        f" exit, num_exits={num_exits}), got {pref_vector!r}.")


def check_num_exits(num_exits: Any, name: str) -> int:
  """Returns ``num_exits`` as an int, or raises a ``ValueError`` saying why.

  Every transformation fixes the shapes of its state at ``init``, which has
  only the parameters, so it needs K, the number of exits, up front.

  Args:
    num_exits: the value passed as ``num_exits``.
    name: the transformation's name, for the message.

  Returns:
    K, a positive int.

  Example:
    >>> check_num_exits(4, "osgd")
    4
  """
  if num_exits is None:
    raise ValueError(
        f"{name} needs num_exits=K, the number of exits (the leading axis of"
        " the stacked gradients): its state holds (K,) diagnostics whose"
        " shapes are fixed at init, so that lax.scan over steps and"
        f" restoring a checkpoint onto tx.init(params) work; e.g."
        f" {name}(num_exits=4).")
  return check_positive_int(num_exits, "num_exits", name)


def num_groups(params: Any, granularity: str) -> int:
  """How many Gram matrices an update weighs: one per leaf, or one.

  Example:
    >>> num_groups({"w": 0.0, "b": 0.0}, "leaf"), num_groups({}, "global")
    (2, 1)
  """
  return len(jax.tree.leaves(params)) if granularity == "leaf" else 1


def _leaf_name(path: Any) -> str:
  return jax.tree_util.keystr(path) or "<root>"


def _check_leaves(flat: list[tuple[Any, Any]], name: str) -> int:
  """Returns the shared leading size K, or raises naming the offending leaf."""
  first_path, first = flat[0]
  for path, leaf in flat:
    if not hasattr(leaf, "shape") or np.ndim(leaf) == 0:
      raise ValueError(
          f"{name} expects every gradient leaf stacked as (K, *param.shape),"
          f" but leaf {_leaf_name(path)} is a scalar. Compute the gradients"
          " with osgd_jax.value_and_per_exit_grads.")
    if not jnp.issubdtype(leaf.dtype, jnp.inexact):
      raise ValueError(
          f"gradient leaf {_leaf_name(path)} has non-float dtype {leaf.dtype};"
          " gradients are floating point.")
    if leaf.shape[0] != first.shape[0]:
      raise ValueError(
          f"all gradient leaves must share the leading exit axis K, but leaf"
          f" {_leaf_name(first_path)} has K={first.shape[0]} and leaf"
          f" {_leaf_name(path)} has K={leaf.shape[0]}.")
  if first.shape[0] == 0:
    raise ValueError(
        f"gradient leaf {_leaf_name(first_path)} has K=0 exits; stacked"
        " gradients need at least one row.")
  return first.shape[0]


def _check_against_params(flat: list[tuple[Any, Any]], treedef: Any,
                          params: Any) -> None:
  flat_params, params_treedef = jax.tree_util.tree_flatten_with_path(params)
  if params_treedef != treedef:
    raise ValueError(
        "the stacked gradients and params have different tree structures:"
        f" {treedef} vs {params_treedef}. Pass the params the gradients were"
        " taken with respect to.")
  for (path, leaf), (_, param) in zip(flat, flat_params):
    if tuple(leaf.shape[1:]) != tuple(np.shape(param)):
      shape = ", ".join(map(str, np.shape(param)))
      raise ValueError(
          f"gradient leaf {_leaf_name(path)} has shape {tuple(leaf.shape)},"
          f" expected (K, *param.shape) = (K, {shape}) for its parameter."
          " Stack per-exit gradients on a new leading axis"
          " (osgd_jax.value_and_per_exit_grads does).")


def read_stacked(updates: Any, *, num_exits: int, params: Any = None,
                 name: str) -> StackedGradients | None:
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
    ValueError: at trace time, naming the leaf: a scalar or integer leaf,
      leaves with different K, a K other than ``num_exits``, or a shape that
      does not match its parameter.

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
  k = _check_leaves(flat, name)
  if k != num_exits:
    raise ValueError(
        f"the stacked gradients have K={k} exits but {name} was built with"
        f" num_exits={num_exits}; build it with num_exits={k}.")
  if params is not None:
    _check_against_params(flat, treedef, params)
  leaves = [leaf for _, leaf in flat]
  compute_dtype = jnp.result_type(jnp.float32, *[leaf.dtype for leaf in leaves])
  sizes = tuple(math.prod(leaf.shape[1:]) for leaf in leaves)
  return StackedGradients(leaves, treedef, sizes, compute_dtype,
                          gram_lib.gram_matrices(leaves, compute_dtype))


def group_grams(grams: jax.Array, granularity: str) -> jax.Array:
  """The Gram matrix of each group: ``(L, K, K)`` per leaf, or their sum.

  Example:
    >>> import jax.numpy as jnp
    >>> group_grams(jnp.ones((3, 2, 2)), "global").shape
    (1, 2, 2)
  """
  return grams.sum(axis=0, keepdims=True) if granularity == "global" else grams


def combine(stacked: StackedGradients, weights: jax.Array,
            granularity: str) -> Any:
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
  shared = granularity == "global"
  outs = [
      gram_lib.weighted_sum(weights[0 if shared else i], leaf,
                            stacked.compute_dtype).astype(leaf.dtype)
      for i, leaf in enumerate(stacked.leaves)]
  return jax.tree.unflatten(stacked.treedef, outs)


def size_weighted_mean(per_group: jax.Array, sizes: tuple[int, ...]
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


def diagnostics(stacked: StackedGradients, weights: jax.Array
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The diagnostics every aggregation state holds, in the state's dtype.

  Args:
    stacked: from :func:`read_stacked`.
    weights: ``(G, K)`` the weights applied to each group.

  Returns:
    ``(weights, exit_norms, cosine)`` as in :class:`AggregationState`.
  """
  exit_norms, cosine = gram_lib.gram_statistics(stacked.grams.sum(axis=0))
  mean_weights = size_weighted_mean(weights, stacked.sizes)
  as_state = lambda x: x.astype(DIAGNOSTICS_DTYPE)
  return as_state(mean_weights), as_state(exit_norms), as_state(cosine)


def init_weighting_state(weighting: StatefulWeighting, num_exits: int,
                         groups: int) -> Any:
  """One copy of the weighting's initial state per group, stacked.

  Args:
    weighting: the weighting.
    num_exits: K.
    groups: the number of groups (:func:`num_groups`).

  Returns:
    ``weighting.init(num_exits)`` with a leading axis of size ``groups``.

  Example:
    >>> import jax.numpy as jnp
    >>> counting = StatefulWeighting(lambda k: jnp.zeros(k), None)
    >>> init_weighting_state(counting, 3, 2).shape
    (2, 3)
  """
  one = weighting.init(num_exits)
  return jax.tree.map(
      lambda x: jnp.broadcast_to(jnp.asarray(x), (groups,) + jnp.shape(x)),
      one)


def _check_groups(weighting_state: Any, groups: int, name: str) -> None:
  for leaf in jax.tree.leaves(weighting_state):
    if leaf.shape[0] != groups:
      raise ValueError(
          f"{name}'s state holds the weighting's state for {leaf.shape[0]}"
          f" groups but the gradients form {groups}; initialise the state"
          " with tx.init(params) for the params these gradients are of.")


def all_finite(tree: Any) -> jax.Array:
  """Whether every float in ``tree`` is finite (other leaves are ignored).

  An aggregator keeps its own state (running averages, counts, keys) where
  this is false, so that ``optax.apply_if_finite`` after it skips the step.

  Example:
    >>> import jax.numpy as jnp
    >>> bool(all_finite({"g": jnp.ones(2), "key": jnp.zeros(2, jnp.uint32)}))
    True
  """
  checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.all(jnp.stack(checks)) if checks else jnp.asarray(True)


def from_weighting(
    weighting: weightings.Weighting | StatefulWeighting,
    *,
    num_exits: int | None = None,
    granularity: str = "global",
    name: str = "from_weighting",
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
      gradients that are not stacked ``(K, *param.shape)`` float arrays with
      ``K == num_exits`` (at trace time, naming the leaf).

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
  num_exits = check_num_exits(num_exits, name)
  check_granularity(granularity)
  if not isinstance(weighting, StatefulWeighting):
    if not callable(weighting):
      raise ValueError(
          f"{name}: weighting must be a function (K, K) -> (K,) or an"
          f" osgd_jax.StatefulWeighting, got {type(weighting).__name__}.")
    weighting = stateless(weighting)

  def init_fn(params):
    k = num_exits
    return AggregationState(
        weights=jnp.zeros((k,), DIAGNOSTICS_DTYPE),
        exit_norms=jnp.zeros((k,), DIAGNOSTICS_DTYPE),
        cosine=jnp.zeros((k, k), DIAGNOSTICS_DTYPE),
        weighting_state=init_weighting_state(
            weighting, k, num_groups(params, granularity)))

  def update_fn(updates, state, params=None, **extra_args):
    with jax.named_scope(name):
      stacked = read_stacked(updates, num_exits=num_exits, params=params,
                             name=name)
      if stacked is None:
        return updates, state
      grams = group_grams(stacked.grams, granularity)
      _check_groups(state.weighting_state, grams.shape[0], name)
      weights, weighting_state = jax.vmap(
          lambda m, s: weighting.apply(m, s, **extra_args))(
              grams, state.weighting_state)
      weights = weights.astype(stacked.compute_dtype)
      new_updates = combine(stacked, weights, granularity)
      mean_weights, exit_norms, cosine = diagnostics(stacked, weights)
      # A step with a NaN or Inf gradient or loss leaves the weighting's
      # state (AdaLoss's running losses, ...) as it was: its update is
      # non-finite, so that optax.apply_if_finite later in the chain skips
      # it, and the steps after it start from an unpoisoned state.
      finite = all_finite((grams, extra_args))
      weighting_state = jax.tree.map(
          lambda new, old: jnp.where(finite, new.astype(old.dtype), old),
          weighting_state, state.weighting_state)
      return new_updates, AggregationState(mean_weights, exit_norms, cosine,
                                           weighting_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
