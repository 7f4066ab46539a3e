"""The Gramian engine: the exits' Gram matrix without the K×P stack.

Every Gram weighting (OSGD's Gram–Schmidt, UPGrad, MGDA, ...) needs only two
things from the per-exit gradients ``g_k = Jᵀ e_k`` (J the K×P Jacobian of
the loss vector): their K×K Gram matrix ``M = J Jᵀ`` (one per group: all
parameters, or each leaf) and one weighted combination ``Σ_k w_k g_k =
Jᵀ w``. Neither needs the K×P stack that
:func:`~osgd_jax.grads.value_and_per_exit_grads` returns: both are products
with J, and reverse mode gives products with J from the residuals of one
forward pass. :func:`value_and_gramian` returns the losses and a
:class:`Gramian`, which keeps that pullback ``w ↦ Jᵀ w`` (a
``jax.tree_util.Partial``, so a pytree) and computes ``M`` and ``Jᵀ w``
when a transformation asks (``docs/design.md``, "The Gramian engine"). Every
Gram-weighting transformation takes it in place of the stacked gradients::

    losses, gramian = osgd_jax.value_and_gramian(loss_fn)(params, x, y)
    updates, state = tx.update(gramian, state, params)

A Flax NNX model goes in as with ``nnx.value_and_grad``
(``value_and_gramian(loss_fn)(model, x, y)``, a zoo model getting the
staged Gramian), and :class:`osgd_jax.Optimizer
<osgd_jax.optimizer.Optimizer>` applies its Gramian in one call.

Formulations of the Gram matrix (``form``):

* ``"vmap"``: one backward pass carrying the K one-hot cotangents (the
  result of a vmapped VJP, each value held for the exits that reach it:
  :mod:`osgd_jax.exit_pullback`), whose gradient rows are kept: each
  leaf's rows for the exits that reach it, what the stacked path holds
  without its zero rows. The pullback is then dead, so the forward's
  residuals are freed before the weighting runs, and the update is the
  rows' weighted sum. The fewest passes; its memory grows with K (K rows
  of every parameter), and is the leanest where the activations dominate.
* ``"scan"``: a ``jax.lax.scan`` over the exits. Global granularity: column
  k of ``M`` is ``J g_k``, one backward pass for ``g_k = Jᵀ e_k`` and its
  transpose (``jax.linear_transpose`` of the backward pass: a forward-mode
  product computed from the same residuals, without ``jax.jvp`` and without
  running the forward again). Per leaf: ``⟨g_j, g_k⟩`` of each leaf for
  ``j ≤ k``, two gradients at a time. Memory independent of K: one or two
  gradients (P or 2P) on top of the plain step.
* ``"blocks"``: per-layer Gram blocks (:mod:`osgd_jax.layer_blocks`).
  A parameter used only as an operand of matrix products (dense layers,
  einsum projections, a shared head) gets its K×K block from its layers'
  inputs and output cotangents, from one backward pass carrying the K
  one-hot cotangents that never forms its weight gradients; any other
  parameter keeps its K rows from that pass. One backward, each value
  held for the exits that reach it (:mod:`osgd_jax.exit_pullback`: a
  head's cotangent is one row, a layer's has one per exit at or above
  it), without the K×P stack where the matrix products hold the
  parameters.
* ``"auto"``: ``"vmap"`` where the activations dominate (``K·P`` bytes
  below the bytes of the residuals the backward pass reads); else
  ``"blocks"`` where what it holds (the tapped products' output
  cotangents for the exits that reach them, and K rows of the parameters
  it cannot tap) is at most one copy of the parameters; else ``"scan"``.
  A structural rule read from shapes when the function is traced, the
  same on every backend.

For ``"scan"`` and ``"blocks"`` the weighted combination is one more
backward pass of ``Σ_k w_k ℓ_k`` for one group (``granularity="global"``);
for one weight vector per leaf, ``"scan"`` accumulates ``w_{l,k} g_k``
leaf by leaf in a ``lax.scan`` over the exits, and ``"blocks"`` weights
each leaf's rows or cotangents of its one backward pass.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from osgd_jax import gram as gram_lib
from osgd_jax._gramian_core import (
  GramEngine,
  Gramian,
  RowsEngine,
  ScaledGramEngine,
  choose_form,
  nbytes,
  pullback_of_weights,
)
from osgd_jax.exit_pullback import ExitRows, one_hot_pullback_rows
from osgd_jax.grads import (
  check_aux_pair,
  check_loss_vector,
  module_value_and_derivative,
)
from osgd_jax.layer_blocks import BlocksEngine, tapped_vjp
from osgd_jax.staged_gramian import staged_value_and_gramian

__all__ = ["FORMS", "Form", "GramEngine", "Gramian", "value_and_gramian"]

#: How :func:`value_and_gramian` forms the Gram matrix; see the module
#: docstring.
Form = Literal["auto", "vmap", "scan", "blocks"]
FORMS: tuple[str, ...] = ("auto", "vmap", "scan", "blocks")
# The floor of gram.scale_exponents: a zero row's exponent.
_ZERO_ROW_EXPONENT = -125


def one_hot(k: jax.Array | int, num_exits: int, dtype: Any) -> jax.Array:
  """The cotangent ``e_k`` of exit k's loss."""
  return (jnp.arange(num_exits) == k).astype(dtype)


def leaf_inner(a: list[Any], b: list[Any], compute_dtype: Any) -> jax.Array:
  """``(L,)`` the inner product of two gradients, leaf by leaf."""
  return jnp.stack(
    [
      gram_lib.contract_trailing(
        x, y, batch_a=False, batch_b=False, compute_dtype=compute_dtype
      )
      for x, y in zip(a, b, strict=True)
    ]
  )


def pairwise_leaf_grams(
  pull: Callable[[jax.Array], list[Any]],
  num_exits: int,
  num_leaves: int,
  loss_dtype: Any,
  compute_dtype: Any,
) -> jax.Array:
  """Per-leaf Gram matrices, two gradients alive at a time.

  ``4^e M̃`` of :func:`scaled_pairwise_leaf_grams` (which see): it
  overflows where the true Gram matrix does.
  """
  grams, exponents = scaled_pairwise_leaf_grams(
    pull, num_exits, num_leaves, loss_dtype, compute_dtype
  )
  return gram_lib.unscale(grams, exponents[:, None, None])


def _row_exponents(leaves: list[Any]) -> jax.Array:
  """``(L,)`` each leaf's power of two (:func:`gram.scale_exponents`).

  A zero row gets the smallest exponent, so that it never sets the scale
  of a leaf's other rows.
  """
  exponents = gram_lib.scale_exponents([leaf[None] for leaf in leaves])
  zero = jnp.stack([~jnp.any(leaf != 0) for leaf in leaves])
  return jnp.where(zero, _ZERO_ROW_EXPONENT, exponents)


def scaled_pairwise_leaf_grams(
  pull: Callable[[jax.Array], list[Any]],
  num_exits: int,
  num_leaves: int,
  loss_dtype: Any,
  compute_dtype: Any,
) -> tuple[jax.Array, jax.Array]:
  """Per-leaf Gram matrices as ``(M̃, e)``, two gradients alive at a time.

  A ``lax.scan`` over k computes ``g_k = pull(e_k)``; inside it a loop over
  ``j < k`` recomputes ``g_j`` and stores ``⟨g_j, g_k⟩`` of every leaf:
  ``K (K + 1) / 2`` pullbacks, memory of two gradients whatever K is. Each
  row of a leaf is divided by its own power of two ``2^{a_{k,l}}`` before
  the product (so no product overflows), and the products are brought to
  the leaf's exponent ``e_l = max_k a_{k,l}`` at the end, as
  :func:`~osgd_jax.gram.scaled_gram_matrices` scales a stacked leaf.

  Returns:
    ``((L, K, K) scaled Gram matrices, (L,) int32 exponents)``.
  """

  def scaled(k):
    leaves = pull(one_hot(k, num_exits, loss_dtype))
    exponents = _row_exponents(leaves)
    return gram_lib.scale_down(leaves, exponents, compute_dtype), exponents

  def outer(grams, k):
    g_k, a_k = scaled(k)

    def inner(j, grams):
      col = leaf_inner(scaled(j)[0], g_k, compute_dtype)
      return grams.at[:, j, k].set(col).at[:, k, j].set(col)

    grams = jax.lax.fori_loop(0, k, inner, grams)
    diag = leaf_inner(g_k, g_k, compute_dtype)
    return grams.at[:, k, k].set(diag), a_k

  zeros = jnp.zeros((num_leaves, num_exits, num_exits), compute_dtype)
  grams, rows = jax.lax.scan(outer, zeros, jnp.arange(num_exits))
  exponents = jnp.max(rows, axis=0)  # (L,)
  # Entry (l, j, k) was divided by 2^(a_jl + a_kl); bring it to 4^e_l.
  shift = rows.T[:, :, None] + rows.T[:, None, :] - 2 * exponents[:, None, None]
  return gram_lib.times_power_of_two(grams, shift), exponents


def scanned_combine(
  pull: Callable[[jax.Array], list[Any]],
  weights: jax.Array,
  num_exits: int,
  loss_dtype: Any,
  compute_dtype: Any,
) -> list[jax.Array]:
  """``Σ_k w_{l,k} g_k`` of every leaf l, one gradient alive at a time."""
  weights = weights.astype(compute_dtype)

  def scaled(k, g):
    return [
      w * leaf.astype(compute_dtype)
      for w, leaf in zip(weights[:, k], g, strict=True)
    ]

  first = scaled(0, pull(one_hot(0, num_exits, loss_dtype)))

  def step(total, k):
    g = scaled(k, pull(one_hot(k, num_exits, loss_dtype)))
    return [t + x for t, x in zip(total, g, strict=True)], None

  total, _ = jax.lax.scan(step, first, jnp.arange(1, num_exits))
  return total


@dataclasses.dataclass(frozen=True)
class ScanEngine(ScaledGramEngine):
  """The ``"scan"`` formulation: the pullback of one forward pass, kept.

  ``parts`` is the ``jax.vjp`` pullback of the loss vector: ``(K,)``
  cotangent ``w`` to a tuple whose first element is ``Jᵀ w`` (the
  parameters' tree, or their leaves for the tapped pullback of
  :func:`~osgd_jax.layer_blocks.tapped_vjp`). The Gram matrix and the
  update are scans over the exits, one or two gradients alive at a time.
  """

  loss_dtype: str

  def _pull(self, vjp_fn: Any) -> Callable[[jax.Array], list[Any]]:
    return lambda w: jax.tree.leaves(vjp_fn(w)[0])

  def scaled_grams(
    self, parts: Any, gramian: Gramian, granularity: str
  ) -> tuple[jax.Array, jax.Array]:
    vjp_fn, k = parts, gramian.num_exits
    dtype, cd = np.dtype(self.loss_dtype), gramian.compute_dtype
    if granularity == "leaf":
      return scaled_pairwise_leaf_grams(
        self._pull(vjp_fn), k, len(gramian.shapes), dtype, cd
      )
    return self._scan_columns(vjp_fn, gramian)

  def _scan_columns(
    self, vjp_fn: Any, gramian: Gramian
  ) -> tuple[jax.Array, jax.Array]:
    """Column k of M is ``J g_k``, with ``g_k`` scaled before the product.

    ``J g_k`` is the transpose of the backward pass applied to ``g_k``,
    computed from the same residuals (no forward-mode rules needed). Its
    entries ``⟨g_j, g_k⟩`` overflow float32 for gradients of norm about
    1.8e19, so ``g_k`` enters divided by ``2^{a_k + c}``: ``2^{a_k}`` just
    above its largest magnitude and ``2^c ≥ 2P`` (P its size), so that
    ``|⟨g_j, g_k⟩| 2^{-a_k-c} ≤ ‖g_j‖_∞ / 2`` is finite; the columns are
    then brought to the common exponent ``E = max_k a_k``.
    """
    k, dtype = gramian.num_exits, np.dtype(self.loss_dtype)
    cd = gramian.compute_dtype
    c = max(sum(gramian.sizes), 1).bit_length() + 1
    pull = lambda w: vjp_fn(w)[0]  # noqa: E731 - the parameters' part
    transposed = jax.linear_transpose(pull, jnp.zeros((k,), dtype))

    def column(carry, e):
      g = pull(e)
      leaves, treedef = jax.tree.flatten(g)
      a = (
        gram_lib.scale_exponents(
          [jnp.stack([jnp.max(jnp.abs(x)).astype(cd) for x in leaves])]
        )[0]
        if leaves
        else jnp.int32(0)
      )
      down = jax.tree.unflatten(
        treedef,
        [gram_lib.times_power_of_two(leaf, -(a + c)) for leaf in leaves],
      )
      (col,) = transposed(down)
      return carry, (col.astype(cd), a)

    _, (cols, a) = jax.lax.scan(column, None, jnp.eye(k, dtype=dtype))
    top = jnp.max(a)
    # cols[k] = M[:, k] / 2^(a_k + c); M̃ = M / 4^top.
    cols = gram_lib.times_power_of_two(cols, (a + c - 2 * top)[:, None])
    # Symmetric in exact arithmetic; averaging removes the rounding skew.
    return (0.5 * (cols + cols.T))[None], top[None]

  def combine(
    self, parts: Any, gramian: Gramian, weights: jax.Array, granularity: str
  ) -> list[jax.Array]:
    vjp_fn, dtype = parts, np.dtype(self.loss_dtype)
    if granularity == "global":
      return pullback_of_weights(
        lambda w: jax.tree.leaves(vjp_fn(w)[0]), weights[0], dtype
      )
    return scanned_combine(
      self._pull(vjp_fn),
      weights,
      gramian.num_exits,
      dtype,
      gramian.compute_dtype,
    )


def check_form(form: Any, fn_name: str) -> None:
  """Raises unless ``form`` is one of :data:`FORMS`."""
  if form not in FORMS:
    raise ValueError(f"{fn_name}: form must be one of {FORMS}, got {form!r}.")


def _gramian_of(
  pure_fn: Callable[[Any], Any], params: Any, fn_name: str, form: str
) -> tuple[Any, Any, Gramian]:
  """``(losses, aux, gramian)`` of ``pure_fn(params) -> (losses, aux)``.

  One forward pass (one trace of ``pure_fn``), whose pullback the Gramian
  keeps; the counterpart of ``osgd_jax.grads``' vmapped VJP. ``"auto"``
  and ``"blocks"`` trace through :func:`~osgd_jax.layer_blocks.tapped_vjp`
  (the same forward pass, with its matrix products of parameters tapped);
  ``"vmap"`` and ``"scan"`` need no taps.
  """
  leaves, treedef = jax.tree.flatten(params)
  if form in ("vmap", "scan"):
    losses, vjp_fn, aux = jax.vjp(pure_fn, params, has_aux=True)
    check_loss_vector(losses, fn_name)
    taps, inputs = (), []
  else:

    def num_exits(losses: Any) -> int:
      check_loss_vector(losses, fn_name)
      return int(losses.shape[0])

    losses, aux, vjp_fn, taps, inputs = tapped_vjp(pure_fn, params, num_exits)
  k = losses.shape[0]
  untapped = set(range(len(leaves))) - {tap.leaf for tap in taps}

  def cotangent_bytes() -> int:
    # What "blocks" holds of the activations: each tapped product's
    # output cotangent for the exits that reach it, found abstractly
    # (nothing runs).
    return nbytes(
      jax.eval_shape(
        lambda: [
          c.value for c in one_hot_pullback_rows(vjp_fn, k, losses.dtype)[1]
        ]
      )
    )

  chosen = choose_form(
    form,
    k,
    nbytes(leaves),
    nbytes(vjp_fn),
    nbytes([leaves[i] for i in untapped]) if taps else None,
    cotangent_bytes if taps else None,
  )
  dtype = np.dtype(losses.dtype).name
  engine: GramEngine
  if chosen == "blocks":
    engine, parts = BlocksEngine(dtype, taps), (vjp_fn, inputs)
  elif chosen == "vmap":
    # The rows of one backward pass, kept; the pullback (and with it the
    # forward's residuals) dies here.
    rows = jax.tree.leaves(
      one_hot_pullback_rows(vjp_fn, k, losses.dtype)[0],
      is_leaf=lambda x: isinstance(x, ExitRows),
    )
    engine = RowsEngine(tuple(r.exits for r in rows))
    parts = [r.value for r in rows]
  else:
    engine, parts = ScanEngine(dtype), vjp_fn
  gramian = Gramian(
    parts,
    engine=engine,
    num_exits=k,
    treedef=treedef,
    shapes=tuple(tuple(np.shape(x)) for x in leaves),
    dtypes=tuple(jnp.result_type(x) for x in leaves),
    form=chosen,
  )
  return losses, aux, gramian


def value_and_gramian(
  loss_fn: Callable[..., Any],
  *,
  has_aux: bool = False,
  form: Form = "auto",
  staged: bool | None = None,
) -> Callable[..., tuple[Any, Gramian]]:
  """Creates a function returning the exit losses and their :class:`Gramian`.

  The twin of :func:`~osgd_jax.grads.value_and_per_exit_grads`: the same
  ``loss_fn(params, *args)`` returning a ``(K,)`` loss vector, run forward
  once; instead of the stacked K×P gradients it returns a :class:`Gramian`
  that every Gram-weighting transformation takes in their place, with the
  same update and state, without the stack ever existing.

  **Flax NNX models.** Called with an ``nnx.Module`` as its first argument,
  it works as the model form of
  :func:`~osgd_jax.grads.value_and_per_exit_grads` does, with the same
  machinery: ``loss_fn(model, *args)`` takes the model (a copy) and
  returns the ``(K,)`` losses; the Gramian is taken with respect to the
  model's ``nnx.Param`` variables (it stands for the gradients that
  function would return, in the structure of ``nnx.state(model,
  nnx.Param)``); the model's other state (BatchNorm statistics, RNG
  counts) is updated in place exactly once per call. A zoo
  :class:`~osgd_jax.zoo.AnytimeNet` whose ``loss_fn`` calls it once, as
  ``model(x)`` on one of ``args``, gets the staged Gramian
  (:func:`~osgd_jax.staged_gramian.staged_value_and_gramian`, its own
  ``form="auto"``); any other gets this function's. :class:`osgd_jax.Optimizer
  <osgd_jax.optimizer.Optimizer>`, ``nnx.Optimizer`` whose ``update`` also
  takes a Gramian, applies it in one call.

  Args:
    loss_fn: function of ``(params, *args)`` (or ``(model, *args)``) whose
      first output is the vector of per-exit losses, earliest exit first.
    has_aux: whether ``loss_fn`` returns a pair ``(losses, aux)`` (e.g. the
      new BatchNorm statistics: the forward runs once, so they are updated
      once per step).
    form: how the Gram matrix is formed: ``"vmap"``, ``"scan"``,
      ``"blocks"`` or ``"auto"`` (see the module docstring and
      ``docs/design.md``, "The Gramian engine"). The results agree to
      float rounding. For an NNX model, ``"vmap"``, ``"scan"`` or
      ``"blocks"`` also rules out the staged Gramian, which has
      formulations of its own.
    staged: for an NNX model only: ``None`` (the default) uses the staged
      Gramian where it applies (with ``form="auto"``); ``True`` requires
      it (and says why it does not apply); ``False`` never uses it.

  Returns:
    A function of ``(params, *args)`` (or ``(model, *args)``) returning
    ``(losses, gramian)``, or ``((losses, aux), gramian)`` with
    ``has_aux``.

  Raises:
    ValueError: at construction, an unknown ``form`` or ``staged``, or
      ``staged=True`` with a ``form`` other than ``"auto"``; at trace
      time, if ``loss_fn`` does not return a non-empty 1-D floating-point
      vector, or (with ``has_aux``) not a pair; if ``staged`` is given for
      a first argument that is not an ``nnx.Module``, or ``staged=True``
      and the staged Gramian does not apply.

  Example:
    >>> import jax, jax.numpy as jnp, optax, osgd_jax
    >>> def loss_fn(w, x):
    ...   return jnp.stack([jnp.sum(w * x), jnp.sum((w * x) ** 2)])
    >>> params = jnp.ones(3)
    >>> losses, gramian = osgd_jax.value_and_gramian(loss_fn)(
    ...     params, jnp.arange(3.0))
    >>> gramian.grams().shape
    (1, 2, 2)
    >>> tx = osgd_jax.osgd(num_exits=2)
    >>> updates, state = jax.jit(tx.update)(gramian, tx.init(params), params)
    >>> updates.shape
    (3,)

    With a zoo model, as with ``nnx.value_and_grad``:

    >>> from flax import nnx
    >>> from osgd_jax import zoo
    >>> model = zoo.create("branched-mlp", rngs=nnx.Rngs(0), stages=3)
    >>> def model_loss(model, x, y):
    ...   return osgd_jax.per_exit_cross_entropy(model(x), y)
    >>> losses, gramian = osgd_jax.value_and_gramian(model_loss)(
    ...     model, jnp.ones((4, 64)), jnp.zeros(4, jnp.int32))
    >>> gramian.form.startswith('staged'), gramian.grams().shape
    (True, (1, 3, 3))
  """
  fn_name = getattr(loss_fn, "__name__", "loss_fn")
  check_form(form, "value_and_gramian")
  if staged not in (None, True, False):
    raise ValueError(f"staged must be None, True or False, got {staged!r}.")
  if staged and form != "auto":
    raise ValueError(
      f"value_and_gramian: form={form!r} is a formulation of the vmapped"
      " VJP, and staged=True asks for the staged Gramian, which has its"
      " own; leave form out, or use"
      " osgd_jax.staged_value_and_gramian(loss_fn, form=...) to choose one."
    )

  def staged_functional(graphdef, loss, aux, rows):
    return staged_value_and_gramian(graphdef, loss, aux, rows)

  @functools.wraps(loss_fn)
  def value_and_gram(params, *args):
    if isinstance(params, nnx.Module):
      return module_value_and_derivative(
        loss_fn,
        params,
        args,
        has_aux=has_aux,
        # An explicit form asks for the vmapped VJP's formulations.
        staged=staged if form == "auto" else False,
        fn_name=fn_name,
        differentiate=functools.partial(_gramian_of, form=form),
        staged_functional=staged_functional,
        entry="osgd_jax.value_and_gramian",
        what="staged Gramian",
      )
    if staged is not None:
      raise ValueError(
        f"staged={staged!r} applies to an nnx.Module, but the first"
        f" argument is a {type(params).__name__}; leave staged out, or use"
        " osgd_jax.staged_value_and_gramian(graphdef, loss_fn) for split"
        " parameters."
      )

    def pure_fn(p):
      out = loss_fn(p, *args)
      return check_aux_pair(out, fn_name) if has_aux else (out, None)

    losses, aux, gramian = _gramian_of(pure_fn, params, fn_name, form)
    return ((losses, aux), gramian) if has_aux else (losses, gramian)

  return value_and_gram
