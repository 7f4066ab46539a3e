"""Orthogonalized SGD as an Optax gradient transformation.

Implements the projection step of Wan, Hoffmann, Lu & Maire, *Orthogonalized
SGD and Nested Architectures for Anytime Neural Networks* (ICML 2020,
arXiv:2008.06635): each exit's gradient is projected onto the orthogonal
complement of the earlier exits' (already projected) gradients, then the
components are summed.

Assumptions where the paper's text is silent (each is an option):

* the projection is applied per parameter tensor (``granularity="leaf"``);
  ``"global"`` applies it to the whole flattened parameter vector;
* projected components are not rescaled (``rescale=False``); ``rescale=True``
  scales each kept component back to the norm of the gradient it came from;
* there is no switch to plain SGD late in training; schedule one yourself by
  swapping the transformation if you want it.

Every aggregator of the library (``osgd`` and the baselines of
:mod:`osgd_jax.aggregators`) is built by one factory, ``_aggregate``: check
the stacked leaves, form each leaf's K×K Gram matrix, turn the Gram matrix of
each group (a leaf, or all leaves) into weights ``w``, return ``Σ_k w_k g_k``.
For OSGD the weights are the LDLᵀ ones (``method="gram"``); its
``method="sequential"`` replaces the weighted sum by Gram–Schmidt on the data.

Combinators. ``osgd`` consumes *stacked* gradients (leading axis K) and emits
ordinary param-shaped updates, so it must come first in a chain. Wrappers that
treat the incoming gradients as param-shaped cannot wrap it:

* ``optax.MultiSteps(osgd_chain)`` accumulates the incoming gradients into a
  param-shaped buffer, which stacked gradients do not fit. To accumulate over
  micro-batches, average the stacked per-exit gradients yourself and call
  ``osgd`` once: the projection is not linear, so accumulating projected
  micro-batch updates (``MultiSteps`` placed after ``osgd``) is a different
  algorithm, not the projection of the large-batch gradients.
* ``optax.apply_if_finite(osgd(...), n)`` returns ``zeros_like(stacked)`` when it
  rejects a step, which has the wrong shape. Put it after the projection:
  ``optax.chain(osgd(), optax.apply_if_finite(optax.sgd(...), n))``; non-finite
  gradients stay non-finite through the projection, so it still catches them.
* ``optax.masked`` / ``optax.multi_transform`` work only when every leaf they
  route to ``osgd`` is stacked and the rest are not.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from osgd_jax import orthogonalize

__all__ = ["OsgdState", "osgd", "osgd_sgd"]

# Default relative tolerance on ‖ĝ_k‖² / ‖g_k‖². A component keeping less than
# this fraction of its squared norm (≈0.3% of its norm) is treated as lying in
# the span of earlier exits: in float32 the Gram method cannot resolve finer
# residuals of nearly collinear rows, since cond(M) = cond(G)².
DEFAULT_TOL = 1e-5


class OsgdState(NamedTuple):
  """Diagnostics of the last projection, as one array that can be logged.

  The four diagnostics are read through properties; they are stored as the
  columns of a single ``(K, K + 3)`` array because every array of a state is
  one more buffer that each jitted step writes and returns, and one more
  small kernel. On CPU, where a program of at most 8 kernels runs them in
  turn on the calling thread and a larger one spreads them over the thread
  pool, four separate arrays made the update of one leaf 9 kernels (6 now),
  and a call of it at 10⁵ parameters and K = 2 took about 60 µs instead of 45
  (``benchmarks/README.md``).

  Attributes:
    diagnostics: ``(K, K + 3)`` float array: column 0 ``exit_norms``, 1
      ``projected_norms``, 2 ``degenerate_fraction``, columns 3… ``cosine``.
      Any leading batch axes (e.g. states stacked over steps) are kept by the
      properties.
  """

  diagnostics: jax.Array

  @classmethod
  def pack(cls, exit_norms: jax.Array, projected_norms: jax.Array,
           cosine: jax.Array, degenerate_fraction: jax.Array) -> "OsgdState":
    """Builds the state from its four diagnostics (see the properties).

    Args:
      exit_norms: ``(K,)``.
      projected_norms: ``(K,)``.
      cosine: ``(K, K)``.
      degenerate_fraction: ``(K,)``.

    Returns:
      An :class:`OsgdState` holding them in one ``(K, K + 3)`` array.

    Example:
      >>> import jax.numpy as jnp
      >>> state = OsgdState.pack(jnp.ones(2), jnp.ones(2), jnp.eye(2),
      ...                        jnp.zeros(2))
      >>> state.diagnostics.shape, state.cosine.shape
      ((2, 5), (2, 2))
    """
    columns = jnp.stack([exit_norms, projected_norms, degenerate_fraction],
                        axis=-1)
    return cls(jnp.concatenate([columns, cosine.astype(columns.dtype)],
                               axis=-1))

  @property
  def exit_norms(self) -> jax.Array:
    """``(K,)`` norm of each exit's gradient over all parameters."""
    return self.diagnostics[..., 0]

  @property
  def projected_norms(self) -> jax.Array:
    """``(K,)`` norm of each exit's projected component ĝ_k."""
    return self.diagnostics[..., 1]

  @property
  def degenerate_fraction(self) -> jax.Array:
    """``(K,)`` fraction of the parameters (by size) on which exit k's
    component was degenerate and dropped, e.g. a head exit k does not reach."""
    return self.diagnostics[..., 2]

  @property
  def cosine(self) -> jax.Array:
    """``(K, K)`` cosine similarity between exits' gradients, averaged over
    leaves weighted by their size, counting only the leaves where both
    gradients are non-zero (0 where there is none)."""
    return self.diagnostics[..., 3:]


def _empty_state(num_exits: int, dtype=jnp.float32) -> OsgdState:
  return OsgdState(jnp.zeros((num_exits, num_exits + 3), dtype))


def _validate_order(order: Sequence[int] | None) -> tuple[int, ...] | None:
  if order is None:
    return None
  try:
    order = tuple(int(i) for i in np.asarray(order).reshape(-1))
  except (TypeError, ValueError) as e:
    raise ValueError(
        f"order must be a sequence of ints (a permutation of range(K)), got"
        f" {order!r}.") from e
  if sorted(order) != list(range(len(order))):
    raise ValueError(
        f"order must be a permutation of range(K) listing exits by priority"
        f" (highest first), e.g. (0, 1, 2); got {order}.")
  if not order:
    raise ValueError("order is empty: an anytime network needs K >= 1 exits.")
  return order


def _leaf_name(path) -> str:
  return jax.tree_util.keystr(path) or "<root>"


def _num_exits(flat_updates, name: str = "osgd") -> int:
  """Returns the shared leading size K, or raises naming the offending leaf."""
  first_path, first = flat_updates[0]
  for path, leaf in flat_updates:
    if not hasattr(leaf, "shape") or leaf.ndim == 0:
      raise ValueError(
          f"{name} expects every gradient leaf stacked as (K, *param.shape), but"
          f" leaf {_leaf_name(path)} is a scalar. Compute gradients with"
          " osgd_jax.value_and_per_exit_grads.")
    if not jnp.issubdtype(leaf.dtype, jnp.inexact):
      raise ValueError(
          f"gradient leaf {_leaf_name(path)} has non-float dtype {leaf.dtype}.")
    if leaf.shape[0] != first.shape[0]:
      raise ValueError(
          f"all gradient leaves must share the leading exit axis K, but leaf"
          f" {_leaf_name(first_path)} has K={first.shape[0]} and leaf"
          f" {_leaf_name(path)} has K={leaf.shape[0]}.")
  num_exits = first.shape[0]
  if num_exits == 0:
    raise ValueError(
        f"gradient leaf {_leaf_name(first_path)} has K=0 exits; stacked"
        " gradients need at least one row.")
  return num_exits


def _check_against_params(flat_updates, treedef, params) -> None:
  flat_params, params_treedef = jax.tree_util.tree_flatten_with_path(params)
  if params_treedef != treedef:
    raise ValueError(
        "the stacked gradients and params have different tree structures:"
        f" {treedef} vs {params_treedef}. Pass the params the gradients were"
        " taken with respect to.")
  for (path, leaf), (_, param) in zip(flat_updates, flat_params):
    if tuple(leaf.shape[1:]) != tuple(np.shape(param)):
      raise ValueError(
          f"gradient leaf {_leaf_name(path)} has shape {tuple(leaf.shape)},"
          f" expected (K, *param.shape) = (K, {', '.join(map(str, np.shape(param)))})"
          " for its parameter. Stack per-exit gradients on a new leading axis"
          " (osgd_jax.value_and_per_exit_grads does).")


def _gram_stats(grams, sizes, compute_dtype) -> tuple[jax.Array, jax.Array]:
  """``(exit_norms, cosine)`` from the per-leaf Grams; see :class:`OsgdState`."""
  sizes = jnp.asarray(sizes, compute_dtype)
  diag = jnp.diagonal(grams, axis1=-2, axis2=-1)
  nonzero = diag > 0
  inv_norm = jnp.where(nonzero, jax.lax.rsqrt(jnp.where(nonzero, diag, 1.0)), 0.0)
  cosine = grams * inv_norm[:, :, None] * inv_norm[:, None, :]
  # A cosine is undefined on a leaf where either exit's gradient is zero (a
  # head it does not reach); average only over the leaves where it is defined.
  defined = (nonzero[:, :, None] & nonzero[:, None, :]).astype(compute_dtype)
  defined_size = jnp.einsum("l,lij->ij", sizes, defined)
  mean_cosine = jnp.einsum("l,lij->ij", sizes, defined * cosine) / jnp.maximum(
      defined_size, 1.0)
  return jnp.sqrt(diag.sum(axis=0)), mean_cosine


def _group_mean(per_group: jax.Array, sizes: Sequence[int]) -> jax.Array:
  """Averages ``(G, ...)`` per-group values, weighting leaves by their size.

  With one group (``granularity="global"``) it is that group's value.
  """
  if per_group.shape[0] == 1:
    return per_group[0]
  sizes = jnp.asarray(sizes, per_group.dtype)
  return jnp.tensordot(sizes / jnp.maximum(sizes.sum(), 1.0), per_group, axes=1)


def _diagnostics(aggregation: Aggregation) -> OsgdState:
  """OSGD's state from the Grams and the projected squared norms ‖ĝ_k‖²."""
  exit_norms, cosine = _gram_stats(
      aggregation.grams, aggregation.sizes, aggregation.compute_dtype)
  residual_sq = aggregation.group_outputs
  dropped = (residual_sq <= 0).astype(aggregation.compute_dtype)
  return OsgdState.pack(
      exit_norms=exit_norms,
      projected_norms=jnp.sqrt(residual_sq.sum(axis=0)),
      cosine=cosine,
      degenerate_fraction=_group_mean(dropped, aggregation.sizes),
  )


# --- the generic factory: a weighting of the Gram matrix plus a weighted sum ---

# ``(M, state, extra_args) -> (w, out)``: the weights ``w`` (K,) of one group's
# Gram matrix ``M`` (K, K), and any per-group output ``out`` (a pytree of
# arrays) for the state. ``state`` is the transformation's state before the
# update and ``extra_args`` the keyword arguments of ``update``.
WeightingFn = Callable[[jax.Array, Any, Mapping[str, Any]], tuple[jax.Array, Any]]


class Aggregation(NamedTuple):
  """What one update computed, handed to the factory's ``finish`` hook.

  Attributes:
    grams: ``(n_leaves, K, K)`` per-leaf Gram matrices of the input rows.
    sizes: number of parameters of every leaf.
    weights: ``(n_groups, K)`` weights applied to the rows of every group
      (a leaf, or one row for ``granularity="global"``); ``None`` when the
      update was not a weighted sum of the rows (OSGD's sequential method).
    group_outputs: the weighting's per-group outputs, stacked on a leading
      axis of size n_groups.
    compute_dtype: the dtype everything was computed in.
  """

  grams: jax.Array
  sizes: tuple[int, ...]
  weights: jax.Array | None
  group_outputs: Any
  compute_dtype: Any


def _aggregate(
    weighting_fn: WeightingFn,
    granularity: str,
    *,
    name: str,
    init: Callable[[], Any],
    finish: Callable[[Aggregation, Any], Any],
    num_exits: int | None = None,
    num_exits_source: str = "num_exits",
    combine: Callable[..., tuple[list[jax.Array], Any]] | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Builds a transformation ``stacked (K, *s) leaves -> param-shaped update``.

  Every aggregator of this library is one instance: it checks the stacked
  leaves, forms every leaf's Gram matrix (one pass), reduces them to one
  matrix per group (every leaf for ``granularity="leaf"``, their sum for
  ``"global"``), asks ``weighting_fn`` for the group's weights and returns
  ``Σ_k w_k g_k`` per leaf (a second pass). The K×K work is negligible.

  Args:
    weighting_fn: see :data:`WeightingFn`; vmapped over the groups, so under
      ``granularity="leaf"`` it sees one leaf's Gram at a time.
    granularity: ``"leaf"`` or ``"global"``.
    name: the public name, for error messages.
    init: returns the initial state.
    finish: ``(aggregation, old_state) -> new_state``.
    num_exits: K if known; a gradient with another K is an error.
    num_exits_source: what fixed ``num_exits``, for the error message.
    combine: optional replacement for "weights, then weighted sum", as
      ``(leaves, grams, state, extra_args, compute_dtype) -> (updates,
      group_outputs)``; OSGD's sequential method, which works on the data.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  if granularity not in orthogonalize.GRANULARITIES:
    raise ValueError(
        f"granularity must be one of {orthogonalize.GRANULARITIES}, got"
        f" {granularity!r}.")
  shared_basis = granularity == "global"

  def init_fn(params):
    del params
    return init()

  def update_fn(updates, state, params=None, **extra_args):
    # A named scope marks this update's operations in compiled programs and
    # profiles (benchmarks/bench_step.py measures its share of a step so).
    with jax.named_scope(name):
      return _update(updates, state, params, **extra_args)

  def _update(updates, state, params, **extra_args):
    flat_updates, treedef = jax.tree_util.tree_flatten_with_path(updates)
    if not flat_updates:
      return updates, state
    k = _num_exits(flat_updates, name)
    if num_exits is not None and k != num_exits:
      raise ValueError(
          f"the stacked gradients have K={k} exits but"
          f" {num_exits_source}={num_exits}.")
    if params is not None:
      _check_against_params(flat_updates, treedef, params)
    leaves = [leaf for _, leaf in flat_updates]
    compute_dtype = jnp.result_type(jnp.float32, *[l.dtype for l in leaves])
    grams = orthogonalize.gram_matrices(leaves, compute_dtype)
    if combine is not None:
      outs, group_outputs = combine(
          leaves, grams, state, extra_args, compute_dtype)
      weights = None
    else:
      group_grams = grams.sum(axis=0, keepdims=True) if shared_basis else grams
      weights, group_outputs = jax.vmap(
          lambda m: weighting_fn(m, state, extra_args))(group_grams)
      weights = weights.astype(compute_dtype)
      outs = [
          orthogonalize.weighted_sum(
              weights[0 if shared_basis else i], leaf, compute_dtype)
          for i, leaf in enumerate(leaves)
      ]
    new_updates = jax.tree_util.tree_unflatten(treedef, [
        u.astype(leaf.dtype) for u, leaf in zip(outs, leaves)])
    sizes = tuple(int(np.prod(leaf.shape[1:])) for leaf in leaves)
    aggregation = Aggregation(grams, sizes, weights, group_outputs, compute_dtype)
    return new_updates, finish(aggregation, state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def osgd(
    granularity: str = "leaf",
    method: str = "gram",
    order: Sequence[int] | None = None,
    tol: float = DEFAULT_TOL,
    rescale: bool = False,
    num_exits: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Orthogonalized SGD: projects per-exit gradients in priority order and sums.

  The input ``updates`` hold one gradient per exit, stacked on a leading axis:
  every leaf has shape ``(K, *param.shape)`` (see
  :func:`osgd_jax.value_and_per_exit_grads`). In priority order (exit 1 first)
  each exit's gradient is projected onto the orthogonal complement of the
  earlier exits' components (Gram–Schmidt), and the output is the sum of the
  components, shaped like the params::

    ĝ_1 = g_1,   ĝ_k = g_k − Σ_{j<k} ⟨g_k, ĝ_j⟩/‖ĝ_j‖² ĝ_j,   u = Σ_k ĝ_k.

  A component with ``‖ĝ_k‖² ≤ tol·‖g_k‖²`` (a zero gradient, or one in the span
  of earlier exits) is degenerate: it joins no basis and adds nothing. bf16 and
  fp16 gradients are processed in float32 and returned in their own dtype.

  ``osgd`` must be the first transformation of a chain; what follows sees
  ordinary gradients. See the module docstring for combinators that cannot
  wrap it.

  References:
    Wan, Hoffmann, Lu & Maire, *Orthogonalized SGD and Nested Architectures for
    Anytime Neural Networks*, ICML 2020. https://arxiv.org/abs/2008.06635

  Args:
    granularity: ``"leaf"`` projects each parameter tensor separately (the
      default, an assumption: the paper does not say); ``"global"`` projects the
      whole flattened parameter vector.
    method: ``"gram"`` (default) forms the K×K Gram matrix in one pass and
      applies LDLᵀ weights in a second, whatever K is; ``"sequential"`` runs
      modified Gram–Schmidt on the data (O(K) passes, more accurate for nearly
      collinear gradients).
    order: a permutation of ``range(K)`` listing exits from highest to lowest
      priority; ``None`` means ``range(K)``.
    tol: relative tolerance below which a projected component is degenerate.
    rescale: if True, rescale every kept component ĝ_k to ``‖g_k‖`` (an
      assumption the paper's text does not settle; off by default).
    num_exits: K, if known. It fixes the shapes of the diagnostics in the state
      at ``init``, which ``jax.lax.scan`` over steps and wrappers that merge
      old and new states need. Without it (and without ``order``) the
      diagnostics are empty until the first update.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`OsgdState` of diagnostics.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import osgd_jax
    >>> params = {"w": jnp.ones(3)}
    >>> def losses(p, x):
    ...   return jnp.stack([jnp.sum(p["w"] * x), jnp.sum((p["w"] * x) ** 2)])
    >>> tx = optax.chain(osgd_jax.osgd(), optax.sgd(0.1, momentum=0.9))
    >>> state = tx.init(params)
    >>> _, grads = osgd_jax.value_and_per_exit_grads(losses)(params, jnp.arange(3.))
    >>> updates, state = tx.update(grads, state, params)
    >>> updates["w"].shape
    (3,)
  """
  if granularity not in orthogonalize.GRANULARITIES:
    raise ValueError(
        f"granularity must be one of {orthogonalize.GRANULARITIES}, got"
        f" {granularity!r}.")
  if method not in orthogonalize.METHODS:
    raise ValueError(
        f"method must be one of {orthogonalize.METHODS}, got {method!r}.")
  order = _validate_order(order)
  if isinstance(tol, (int, float)) and not 0 <= tol < 1:
    raise ValueError(f"tol must be in [0, 1), got {tol}.")
  if num_exits is not None:
    if not isinstance(num_exits, (int, np.integer)) or num_exits < 1:
      raise ValueError(
          f"num_exits must be a positive int, got {num_exits!r}. Under"
          " optax.inject_hyperparams pass static_args=('num_exits',).")
    if order is not None and len(order) != num_exits:
      raise ValueError(
          f"order has {len(order)} entries but num_exits={num_exits}.")
  known_exits = num_exits if num_exits is not None else (
      len(order) if order is not None else None)

  def priority(k: int) -> np.ndarray:
    return np.arange(k) if order is None else np.asarray(order)

  def ldl_weighting(gram, state, extra_args):
    # Gram–Schmidt in priority order is LDLᵀ of the permuted Gram matrix;
    # the projected squared norms ‖ĝ_k‖² go to the diagnostics.
    del state, extra_args
    perm = priority(gram.shape[-1])
    if np.array_equal(perm, np.arange(perm.size)):
      # Exit order is priority order: no gathers for XLA to launch.
      return orthogonalize.ldl_weights(gram, tol=tol, rescale=rescale)
    weights, residual_sq = orthogonalize.ldl_weights(
        gram[perm][:, perm], tol=tol, rescale=rescale)
    inverse = np.argsort(perm)
    return weights[inverse], residual_sq[inverse]

  def sequential(leaves, grams, state, extra_args, compute_dtype):
    del grams, state, extra_args
    return orthogonalize._sequential_method(  # pylint: disable=protected-access
        leaves, order=jnp.asarray(priority(leaves[0].shape[0]), jnp.int32),
        tol=tol, rescale=rescale, shared_basis=granularity == "global",
        compute_dtype=compute_dtype)

  def finish(aggregation, state):
    return jax.tree.map(lambda x: x.astype(state.diagnostics.dtype),
                        _diagnostics(aggregation))

  return _aggregate(
      ldl_weighting, granularity, name="osgd",
      init=lambda: _empty_state(known_exits or 0), finish=finish,
      num_exits=known_exits,
      num_exits_source="num_exits" if num_exits is not None else "len(order)",
      combine=sequential if method == "sequential" else None)


def osgd_sgd(
    learning_rate: optax.ScalarOrSchedule,
    momentum: float | None = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    *,
    granularity: str = "leaf",
    method: str = "gram",
    order: Sequence[int] | None = None,
    tol: float = DEFAULT_TOL,
    rescale: bool = False,
    num_exits: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  """The paper's optimizer: OSGD, then weight decay, momentum and learning rate.

  Equivalent to::

    optax.chain(
        osgd(granularity, method, order, tol, rescale, num_exits),
        optax.add_decayed_weights(weight_decay),
        optax.trace(decay=momentum, nesterov=nesterov),
        optax.scale_by_learning_rate(learning_rate),
    )

  Weight decay is added to the projected direction (outside the loss, so it is
  never projected), then momentum accumulates, as in PyTorch's SGD.

  Args:
    learning_rate: a fixed learning rate or an Optax schedule.
    momentum: momentum decay; ``None`` disables momentum.
    nesterov: use Nesterov momentum.
    weight_decay: L2 weight-decay coefficient added to the update.
    granularity: see :func:`osgd`.
    method: see :func:`osgd`.
    order: see :func:`osgd`.
    tol: see :func:`osgd`.
    rescale: see :func:`osgd`.
    num_exits: see :func:`osgd`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; it also works through
    ``optax.inject_hyperparams(osgd_sgd)(learning_rate=..., momentum=...)``.

  Example:
    >>> import jax.numpy as jnp, optax, osgd_jax
    >>> tx = optax.inject_hyperparams(osgd_jax.osgd_sgd)(
    ...     learning_rate=optax.cosine_decay_schedule(0.1, 100), momentum=0.9)
    >>> params = {"w": jnp.zeros(3)}
    >>> state = tx.init(params)
    >>> # Injected, weight_decay is an array, so the decay step needs params.
    >>> updates, state = tx.update({"w": jnp.ones((2, 3))}, state, params)
  """
  # The osgd options are explicit keywords, not **kwargs, because
  # optax.inject_hyperparams binds the factory's signature by name.
  transforms = [osgd(granularity, method, order, tol, rescale, num_exits)]
  if not (isinstance(weight_decay, (int, float)) and weight_decay == 0):
    transforms.append(optax.add_decayed_weights(weight_decay))
  if momentum is not None:
    transforms.append(optax.trace(decay=momentum, nesterov=nesterov))
  transforms.append(optax.scale_by_learning_rate(learning_rate))
  return optax.chain(*transforms)
