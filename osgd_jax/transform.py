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

from typing import NamedTuple, Sequence

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
  """Diagnostics of the last projection, as arrays that can be logged.

  Attributes:
    exit_norms: ``(K,)`` norm of each exit's gradient over all parameters.
    projected_norms: ``(K,)`` norm of each exit's projected component ĝ_k.
    cosine: ``(K, K)`` cosine similarity between exits' gradients, averaged
      over leaves weighted by their size, counting only the leaves where both
      gradients are non-zero (0 where there is none).
    degenerate_fraction: ``(K,)`` fraction of the parameters (by size) on which
      exit k's component was degenerate and dropped, e.g. a head exit k does
      not reach.
  """

  exit_norms: jax.Array
  projected_norms: jax.Array
  cosine: jax.Array
  degenerate_fraction: jax.Array


def _empty_state(num_exits: int, dtype=jnp.float32) -> OsgdState:
  return OsgdState(
      exit_norms=jnp.zeros((num_exits,), dtype),
      projected_norms=jnp.zeros((num_exits,), dtype),
      cosine=jnp.zeros((num_exits, num_exits), dtype),
      degenerate_fraction=jnp.zeros((num_exits,), dtype),
  )


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


def _num_exits(flat_updates) -> int:
  """Returns the shared leading size K, or raises naming the offending leaf."""
  first_path, first = flat_updates[0]
  for path, leaf in flat_updates:
    if not hasattr(leaf, "shape") or leaf.ndim == 0:
      raise ValueError(
          f"osgd expects every gradient leaf stacked as (K, *param.shape), but"
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


def _diagnostics(projection, sizes, compute_dtype) -> OsgdState:
  grams = projection.grams
  sizes = jnp.asarray(sizes, compute_dtype)
  weights = sizes / jnp.maximum(sizes.sum(), 1.0)
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
  residual_sq = projection.residual_sq_norms
  dropped = (residual_sq <= 0).astype(compute_dtype)
  if residual_sq.shape[0] == 1:  # one global basis
    degenerate = dropped[0]
  else:
    degenerate = weights @ dropped
  return OsgdState(
      exit_norms=jnp.sqrt(diag.sum(axis=0)),
      projected_norms=jnp.sqrt(residual_sq.sum(axis=0)),
      cosine=mean_cosine,
      degenerate_fraction=degenerate,
  )


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

  def init_fn(params):
    del params
    return _empty_state(known_exits or 0)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    flat_updates, treedef = jax.tree_util.tree_flatten_with_path(updates)
    if not flat_updates:
      return updates, state
    k = _num_exits(flat_updates)
    if known_exits is not None and k != known_exits:
      what = "num_exits" if num_exits is not None else "len(order)"
      raise ValueError(
          f"the stacked gradients have K={k} exits but {what}={known_exits}.")
    if params is not None:
      _check_against_params(flat_updates, treedef, params)
    leaves = [leaf for _, leaf in flat_updates]
    compute_dtype = jnp.result_type(jnp.float32, *[l.dtype for l in leaves])
    projection = orthogonalize.project(
        leaves, method=method, granularity=granularity,
        order=np.arange(k) if order is None else np.asarray(order),
        tol=tol, rescale=rescale, compute_dtype=compute_dtype)
    new_updates = jax.tree_util.tree_unflatten(treedef, [
        u.astype(leaf.dtype) for u, leaf in zip(projection.updates, leaves)])
    sizes = [int(np.prod(leaf.shape[1:])) for leaf in leaves]
    diagnostics = _diagnostics(projection, sizes, compute_dtype)
    state_dtype = state.exit_norms.dtype
    return new_updates, jax.tree.map(
        lambda x: x.astype(state_dtype), diagnostics)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


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
    >>> state = tx.init({"w": jnp.zeros(3)})
    >>> updates, state = tx.update({"w": jnp.ones((2, 3))}, state)
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
