"""Orthogonalized SGD: its Gram–Schmidt weighting, transformation and optimizer.

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
* the paper trains with OSGD throughout; the late switch to plain SGD that
  it leaves open is an option, off by default:
  :func:`~osgd_jax.aggregation.switch_to_sum`, or
  ``osgd_sgd(..., sgd_after=N)``, sums the exit gradients from step N on.

``osgd`` is :func:`~osgd_jax.aggregation.from_weighting` of the Gram–Schmidt
weighting (:func:`osgd_weighting`), with a state that adds the projected
components' norms to the diagnostics. Its ``method="sequential"`` runs
modified Gram–Schmidt on the gradients instead, for nearly collinear rows.

Combinators. ``osgd`` consumes *stacked* gradients (leading axis K) and emits
ordinary parameter-shaped updates, so it must come first in a chain.
Wrappers that treat the incoming gradients as parameter-shaped cannot wrap
it:

* ``optax.MultiSteps(osgd_chain)`` accumulates the incoming gradients into a
  parameter-shaped buffer, which stacked gradients do not fit. To accumulate
  over micro-batches, average the stacked per-exit gradients yourself and
  call ``osgd`` once: the projection is not linear, so accumulating projected
  micro-batch updates (``MultiSteps`` placed after ``osgd``) is a different
  algorithm, not the projection of the large-batch gradients.
* ``optax.apply_if_finite(osgd(...), n)`` returns ``zeros_like(stacked)`` when
  it rejects a step, which has the wrong shape. Put it after the projection:
  ``optax.chain(osgd(num_exits=K), optax.apply_if_finite(optax.sgd(...), n))``;
  non-finite gradients stay non-finite through the projection, so it still
  catches them.
* ``optax.masked`` / ``optax.multi_transform`` work only when every leaf they
  route to ``osgd`` is stacked and the rest are not.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from osgd_jax import gram as gram_lib
from osgd_jax import orthogonalize
from osgd_jax.aggregation import _checks, _engine, _registry
from osgd_jax.aggregation._switch_to_sum import switch_to_sum
from osgd_jax.aggregation._types import Granularity

#: The ``method`` values of :func:`osgd`: two passes over the gradients (a
#: Gram matrix, then a weighted sum), or modified Gram–Schmidt on them.
OsgdMethod = Literal["gram", "sequential"]
_NAME = "osgd"


def osgd_weighting(
  gram: jax.Array,
  *,
  order: Sequence[int] | None = None,
  tol: float | jax.Array = orthogonalize.DEFAULT_TOL,
  rescale: bool = False,
) -> jax.Array:
  """OSGD's weighting: Gram–Schmidt in priority order, then the sum.

  ``ĝ_1 = g_1``, ``ĝ_k = g_k − Σ_{j<k} ⟨g_k, ĝ_j⟩/‖ĝ_j‖² ĝ_j`` and
  ``u = Σ_k ĝ_k = wᵀ G``, with ``w = L⁻ᵀ 1`` for ``M = L D Lᵀ`` (L unit lower
  triangular). A component keeping at most ``tol`` of its squared norm is
  degenerate and adds nothing.

  Args:
    gram: ``(K, K)`` Gram matrix of the exits' gradients.
    order: the exits from highest to lowest priority (a permutation of
      ``range(K)``); ``None``: exit 1 first.
    tol: relative tolerance on ``‖ĝ_k‖² / ‖g_k‖²``.
    rescale: scale each kept component back to ``‖g_k‖`` (an assumption
      where the paper's text is silent; off by default).

  Returns:
    ``(K,)`` weights, those :func:`osgd` applies.

  Example:
    >>> import jax.numpy as jnp
    >>> g = jnp.asarray([[1.0, 0.0], [1.0, 1.0]])
    >>> w = osgd_weighting(g @ g.T)
    >>> [round(v, 6) for v in (w @ g).tolist()]   # g1 + (g2 − its g1 part)
    [1.0, 1.0]

  """
  weights, _ = orthogonalize.gram_schmidt_weights(
    gram, order=order, tol=tol, rescale=rescale
  )
  return weights


class OsgdState(NamedTuple):
  """Diagnostics of the last projection, to log.

  Every field keeps its shape and dtype from ``init`` on; all are float32.

  Attributes:
    weights: ``(K,)`` the weights ``w`` of the update ``u = Σ_k w_k g_k``
      (for ``granularity="leaf"``, their mean over the leaves weighted by
      size; for ``method="sequential"``, the weights that give the same
      ``u`` in exact arithmetic).
    exit_norms: ``(K,)`` the norm of each exit's gradient over all
      parameters.
    projected_norms: ``(K,)`` the norm of each exit's projected component
      ``ĝ_k`` over all parameters (0 where it was degenerate everywhere).
    cosine: ``(K, K)`` the cosine similarity between the exits' gradients
      over all parameters (0 where either is zero).
    degenerate_fraction: ``(K,)`` the fraction of the parameters (by size)
      on which exit k's component was degenerate and dropped, e.g. a head
      that exit k does not reach.
    projected_sq_norms: ``(G, K)`` ``‖ĝ_k‖²`` in each group: per leaf for
      ``granularity="leaf"``, else one row.
  """

  weights: jax.Array
  exit_norms: jax.Array
  projected_norms: jax.Array
  cosine: jax.Array
  degenerate_fraction: jax.Array
  projected_sq_norms: jax.Array


def _check_order(order: Sequence[int] | None) -> tuple[int, ...] | None:
  if order is None:
    return None
  try:
    order = tuple(int(i) for i in np.asarray(order).reshape(-1))
  except (TypeError, ValueError, OverflowError) as e:
    raise ValueError(
      f"order must be a sequence of ints (a permutation of range(K)), got"
      f" {order!r}."
    ) from e
  if not order:
    raise ValueError("order is empty: an anytime network needs K >= 1 exits.")
  if sorted(order) != list(range(len(order))):
    raise ValueError(
      f"order must be a permutation of range(K) listing exits by priority"
      f" (highest first), e.g. (0, 1, 2); got {order}."
    )
  return order


def _osgd_state(
  weights, exit_norms, cosine, residual_sq, exponents, sizes
) -> OsgdState:
  """The state from the components' squared norms ``4^e · residual_sq``."""
  total, top = gram_lib.combine_scaled(residual_sq, exponents, True)
  dropped = (residual_sq <= 0).astype(_engine.DIAGNOSTICS_DTYPE)
  return OsgdState(
    weights=weights,
    exit_norms=exit_norms,
    projected_norms=_engine.as_diagnostic(
      gram_lib.unscale(gram_lib.safe_sqrt(total[0]), top[0], degree=1)
    ),
    cosine=cosine,
    degenerate_fraction=_engine.size_weighted_mean(dropped, sizes),
    projected_sq_norms=_engine.as_diagnostic(
      gram_lib.unscale(residual_sq, exponents[:, None])
    ),
  )


def osgd(
  num_exits: int | None = None,
  *,
  granularity: Granularity = "leaf",
  method: OsgdMethod = "gram",
  order: Sequence[int] | None = None,
  tol: float = orthogonalize.DEFAULT_TOL,
  rescale: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Orthogonalized SGD: projects per-exit gradients in priority order and sums.

  The input ``updates`` hold one gradient per exit, stacked on a leading
  axis: every leaf has shape ``(K, *param.shape)`` (see
  :func:`osgd_jax.value_and_per_exit_grads`). In priority order (exit 1
  first) each exit's gradient is projected onto the orthogonal complement of
  the earlier exits' components (Gram–Schmidt), and the output is the sum of
  the components, shaped like the params::

    ĝ_1 = g_1,   ĝ_k = g_k − Σ_{j<k} ⟨g_k, ĝ_j⟩/‖ĝ_j‖² ĝ_j,   u = Σ_k ĝ_k.

  A component with ``‖ĝ_k‖² ≤ tol·‖g_k‖²`` (a zero gradient, or one in the
  span of earlier exits) is degenerate: it joins no basis and adds nothing.
  bf16 and fp16 gradients are processed in float32 and returned in their own
  dtype. NaN or Inf in a gradient makes the update of its group (a leaf, or
  all parameters) non-finite.

  ``osgd`` must be the first transformation of a chain; what follows sees
  ordinary gradients. See the module docstring for combinators that cannot
  wrap it. Clipping goes *after* it (``optax.clip_by_global_norm`` before
  ``osgd`` would clip the K exits jointly and change their relative
  scales), and so do weight decay and the learning rate or its schedule::

    optax.chain(osgd(K), optax.clip_by_global_norm(1.0),
                optax.add_decayed_weights(5e-4),
                optax.sgd(optax.cosine_decay_schedule(0.1, 1000), 0.9))

  References:
    Wan, Hoffmann, Lu & Maire, *Orthogonalized SGD and Nested Architectures
    for Anytime Neural Networks*, ICML 2020. https://arxiv.org/abs/2008.06635

  Args:
    num_exits: K, the number of exits (the leading axis of the stacked
      gradients); the one positional parameter. Required unless ``order``
      gives it: the state's shapes are fixed at ``init``, for
      ``jax.lax.scan`` over steps and for restoring a checkpoint onto
      ``tx.init(params)``.
    granularity: ``"leaf"`` projects each parameter tensor separately (the
      default, an assumption: the paper does not say); ``"global"`` projects
      the whole flattened parameter vector.
    method: ``"gram"`` (default) forms the K×K Gram matrix in one pass and
      applies LDLᵀ weights in a second, whatever K is; ``"sequential"`` runs
      modified Gram–Schmidt on the gradients (K passes, more accurate for
      nearly collinear gradients).
    order: a permutation of ``range(K)`` listing exits from highest to lowest
      priority; ``None`` means ``range(K)``.
    tol: relative tolerance below which a projected component is degenerate.
    rescale: if True, rescale every kept component ĝ_k to ``‖g_k‖`` (an
      assumption the paper's text does not settle; off by default).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`OsgdState`.

  Raises:
    ValueError: a bad option, or no ``num_exits`` (at construction);
      gradients that are not stacked ``(K, *param.shape)`` real float
      arrays with the right K, or a state this transformation's ``init``
      did not make (at trace time, naming the leaf or field). Without
      ``params``, unstacked gradients cannot always be told from stacked
      ones: when every parameter's first dimension happens to be K, they
      pass as K rows. Pass ``params`` to ``update`` and they are refused.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import osgd_jax
    >>> params = {"w": jnp.ones(3)}
    >>> def losses(p, x):
    ...   return jnp.stack([jnp.sum(p["w"] * x), jnp.sum((p["w"] * x) ** 2)])
    >>> tx = optax.chain(osgd_jax.osgd(num_exits=2),
    ...                  optax.sgd(0.1, momentum=0.9))
    >>> state = tx.init(params)
    >>> _, grads = osgd_jax.value_and_per_exit_grads(losses)(
    ...     params, jnp.arange(3.))
    >>> updates, state = tx.update(grads, state, params)
    >>> updates["w"].shape
    (3,)
  """
  _checks.check_granularity(granularity, _NAME)
  _checks.check_choice(method, "method", _NAME, OsgdMethod)
  order = _check_order(order)
  _checks.check_fraction(tol, "tol", _NAME)
  _checks.check_flag(rescale, "rescale", _NAME)
  if order is not None:
    if num_exits is not None and num_exits != len(order):
      raise ValueError(
        f"order has {len(order)} entries but num_exits={num_exits}."
      )
    num_exits = len(order) if num_exits is None else num_exits
  num_exits = _checks.check_num_exits(num_exits, _NAME)

  def init_fn(params):
    def zeros(*shape):
      return jnp.zeros(shape, _engine.DIAGNOSTICS_DTYPE)

    k, groups = num_exits, _engine.num_groups(params, granularity)
    return OsgdState(
      weights=zeros(k),
      exit_norms=zeros(k),
      projected_norms=zeros(k),
      cosine=zeros(k, k),
      degenerate_fraction=zeros(k),
      projected_sq_norms=zeros(groups, k),
    )

  def gram_update(stacked, state):
    grams, exponents = _engine.group_grams(
      stacked.grams, stacked.exponents, granularity
    )
    # Gram–Schmidt weights are scale-invariant, so the scaled Gram matrices
    # serve as they are; the group's size bounds its rank.
    weights, residual_sq = jax.vmap(
      lambda m, r: orthogonalize.gram_schmidt_weights(
        m, order=order, tol=tol, rescale=rescale, rank=r
      )
    )(grams, _engine.group_ranks(stacked.sizes, granularity))
    new_state = _osgd_state(
      *_engine.diagnostics(stacked, weights),
      residual_sq,
      exponents,
      stacked.sizes,
    )
    # A step with a NaN or Inf gradient keeps the last finite squared norms.
    finite = _engine.all_finite(grams)
    new_state = new_state._replace(
      projected_sq_norms=_engine.keep_if_finite(
        finite, new_state.projected_sq_norms, state.projected_sq_norms
      )
    )
    return _engine.combine(stacked, weights, granularity), new_state

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if _engine.is_gramian(updates) and method == "sequential":
      raise ValueError(
        "osgd: method='sequential' runs Gram–Schmidt on the gradients"
        " themselves, which an osgd_jax.Gramian does not hold; use"
        " method='gram' (the same projection from the Gram matrix)."
      )
    if not jax.tree.leaves(updates):
      _engine.check_not_lost(params, _NAME)
      return updates, state
    with jax.named_scope(_NAME):
      stacked = _engine.read_gradients(
        updates,
        num_exits=num_exits,
        params=params,
        name=_NAME,
        granularity=granularity if method == "gram" else None,
      )
      assert stacked is not None  # a tree without leaves returned above
      _engine.check_state(
        state, init_fn, updates, params, num_exits=num_exits, name=_NAME
      )
      if method == "gram":
        return gram_update(stacked, state)
      # The sequential method refused a Gramian above: these are stacked.
      assert isinstance(stacked, _engine.StackedGradients)
      outs, residual_sq, (weights, exponents) = (
        orthogonalize.modified_gram_schmidt(
          stacked.leaves,
          order=order,
          tol=tol,
          rescale=rescale,
          shared_basis=granularity == "global",
          compute_dtype=stacked.compute_dtype,
          scaled_norms=True,
        )
      )
      new_updates = jax.tree.unflatten(
        stacked.treedef,
        [
          out.astype(leaf.dtype)
          for out, leaf in zip(outs, stacked.leaves, strict=True)
        ],
      )
      return new_updates, _osgd_state(
        *_engine.diagnostics(stacked, weights),
        residual_sq,
        exponents,
        stacked.sizes,
      )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def osgd_sgd(
  learning_rate: optax.ScalarOrSchedule,
  momentum: float | None = 0.9,
  nesterov: bool = False,
  weight_decay: float = 0.0,
  *,
  granularity: Granularity = "leaf",
  method: OsgdMethod = "gram",
  order: Sequence[int] | None = None,
  tol: float = orthogonalize.DEFAULT_TOL,
  rescale: bool = False,
  num_exits: int | None = None,
  sgd_after: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  """The paper's optimizer: OSGD, then weight decay, momentum and learning rate.

  Equivalent to::

    optax.chain(
        osgd(num_exits, granularity=..., method=..., ...),
        # only with sgd_after: switch_to_sum(osgd(...), sgd_after)
        optax.add_decayed_weights(weight_decay),
        optax.trace(decay=momentum, nesterov=nesterov),
        optax.scale_by_learning_rate(learning_rate),
    )

  Weight decay is added to the projected direction (outside the loss, so it
  is never projected), then momentum accumulates, as in PyTorch's SGD.

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
    num_exits: see :func:`osgd` (required unless ``order`` gives K).
    sgd_after: from this many updates on, sum the exit gradients instead of
      projecting them: plain summed-loss SGD late in training (see
      :func:`~osgd_jax.aggregation.switch_to_sum`). ``None``, the default,
      never switches. The paper leaves such a switch open; this option is
      our assumption of what it would be.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; it also works through
    ``optax.inject_hyperparams(osgd_sgd, static_args=("num_exits",))``,
    which makes ``sgd_after`` a hyperparameter too.

  Raises:
    ValueError: a number given for ``learning_rate``, ``momentum`` or
      ``weight_decay`` is NaN or infinite (every update would be NaN, and
      ``optax.apply_if_finite``, which checks the incoming gradients, would
      not notice); or a bad OSGD option (see :func:`osgd`).

  Example:
    >>> import jax.numpy as jnp, optax, osgd_jax
    >>> tx = optax.inject_hyperparams(osgd_jax.osgd_sgd,
    ...                               static_args=("num_exits",))(
    ...     learning_rate=optax.cosine_decay_schedule(0.1, 100), momentum=0.9,
    ...     num_exits=2)
    >>> params = {"w": jnp.zeros(3)}
    >>> state = tx.init(params)
    >>> # Injected, weight_decay is an array, so the decay step needs params.
    >>> updates, state = tx.update({"w": jnp.ones((2, 3))}, state, params)
  """
  # osgd_sgd(4) written for K = 4 would read 4 as the learning rate.
  _checks.check_not_num_exits(
    learning_rate, "learning_rate", "osgd_sgd", num_exits
  )
  _checks.check_finite(learning_rate, "learning_rate", "osgd_sgd")
  _checks.check_fraction(momentum, "momentum", "osgd_sgd")
  _checks.check_nonnegative(weight_decay, "weight_decay", "osgd_sgd")
  _checks.check_flag(nesterov, "nesterov", "osgd_sgd")
  # The osgd options are explicit keywords, not **kwargs, because
  # optax.inject_hyperparams binds the factory's signature by name.
  transforms: list[optax.GradientTransformation] = [
    osgd(
      num_exits,
      granularity=granularity,
      method=method,
      order=order,
      tol=tol,
      rescale=rescale,
    )
  ]
  if sgd_after is not None:
    transforms[0] = switch_to_sum(transforms[0], sgd_after)
  if not (isinstance(weight_decay, (int, float)) and weight_decay == 0):
    transforms.append(optax.add_decayed_weights(weight_decay))
  if momentum is not None:
    transforms.append(optax.trace(decay=momentum, nesterov=nesterov))
  transforms.append(optax.scale_by_learning_rate(learning_rate))
  return optax.chain(*transforms)


_registry.register(_NAME, osgd, weighting=osgd_weighting)
