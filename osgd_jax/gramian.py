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

Formulations of the Gram matrix (``form``):

* ``"vmap"``: one backward pass carrying the K one-hot cotangents (a vmapped
  VJP); each leaf's ``(K, *shape)`` block is contracted into its K×K block
  as soon as it exists. The fewest passes; its memory grows with K (K
  cotangents of every activation, and a leaf's K rows at a time).
* ``"scan"``: a ``jax.lax.scan`` over the exits. Global granularity: column
  k of ``M`` is ``J g_k``, one backward pass for ``g_k = Jᵀ e_k`` and its
  transpose (``jax.linear_transpose`` of the backward pass: a forward-mode
  product computed from the same residuals, without ``jax.jvp`` and without
  running the forward again). Per leaf: ``⟨g_j, g_k⟩`` of each leaf for
  ``j ≤ k``, two gradients at a time. Memory independent of K: one or two
  gradients (P or 2P) on top of the plain step.
* ``"auto"``: ``"scan"`` where the parameters dominate (``K·P`` bytes at
  least the bytes of the residuals the backward pass reads), else
  ``"vmap"``; a structural rule read from shapes when the function is
  traced, the same on every backend.

The weighted combination is one more backward pass of ``Σ_k w_k ℓ_k`` for
one group (``granularity="global"``), and for one weight vector per leaf a
``lax.scan`` over the exits accumulating ``w_{l,k} g_k`` leaf by leaf.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, Literal, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from osgd_jax import gram as gram_lib
from osgd_jax.grads import check_aux_pair, check_loss_vector

__all__ = ["FORMS", "Form", "GramEngine", "Gramian", "value_and_gramian"]

#: How :func:`value_and_gramian` forms the Gram matrix; see the module
#: docstring.
Form = Literal["auto", "vmap", "scan"]
FORMS: tuple[str, ...] = ("auto", "vmap", "scan")
_GRANULARITIES = ("global", "leaf")
# The floor of gram.scale_exponents: a zero row's exponent.
_ZERO_ROW_EXPONENT = -125


class GramEngine(Protocol):
  """How a :class:`Gramian` computes from its parts (static, hashable).

  An engine may also define ``scaled_grams(parts, gramian, granularity)``
  returning ``(M̃, e)`` with ``M = 4^e M̃`` (see :meth:`Gramian.scaled_grams`);
  the library's engines do, so that their Gram matrices are scale-safe.
  """

  def grams(
    self, parts: Any, gramian: Gramian, granularity: str
  ) -> jax.Array: ...

  def combine(
    self, parts: Any, gramian: Gramian, weights: jax.Array, granularity: str
  ) -> list[jax.Array]: ...


@jax.tree_util.register_pytree_node_class
class Gramian:
  """The per-exit gradients of K losses, without their K×P stack.

  Returned by :func:`value_and_gramian` and
  :func:`~osgd_jax.staged_gramian.staged_value_and_gramian`; every
  Gram-weighting transformation takes it in place of stacked gradients,
  with the same update and state. It is a pytree (the residuals of the
  forward pass, held by ``jax.tree_util.Partial`` pullbacks, plus static
  metadata), so it crosses ``jax.jit`` boundaries and enters ``tx.update``.

  Attributes:
    parts: the arrays and pullbacks its engine computes from.
    engine: the static formulation (how :meth:`grams` and :meth:`combine`
      run).
    num_exits: K.
    treedef: the tree structure of the parameters.
    shapes: each parameter leaf's shape.
    dtypes: each parameter leaf's dtype.
    form: the formulation chosen (``"vmap"``, ``"scan"``, ``"staged"`` or
      ``"staged-keep"``).
  """

  def __init__(
    self,
    parts: Any,
    *,
    engine: GramEngine,
    num_exits: int,
    treedef: Any,
    shapes: tuple[tuple[int, ...], ...],
    dtypes: tuple[Any, ...],
    form: str,
  ) -> None:
    self.parts = parts
    self.engine = engine
    self.num_exits = num_exits
    self.treedef = treedef
    self.shapes = shapes
    self.dtypes = dtypes
    self.form = form

  def _static(self) -> tuple[Any, ...]:
    return (
      self.engine,
      self.num_exits,
      self.treedef,
      self.shapes,
      tuple(np.dtype(d).name for d in self.dtypes),
      self.form,
    )

  def tree_flatten(self) -> tuple[tuple[Any], tuple[Any, ...]]:
    return (self.parts,), self._static()

  @classmethod
  def tree_unflatten(cls, static: tuple[Any, ...], children: Any) -> Gramian:
    engine, num_exits, treedef, shapes, dtypes, form = static
    return cls(
      children[0],
      engine=engine,
      num_exits=num_exits,
      treedef=treedef,
      shapes=shapes,
      dtypes=tuple(np.dtype(d) for d in dtypes),
      form=form,
    )

  def __repr__(self) -> str:
    return (
      f"Gramian(num_exits={self.num_exits}, leaves={len(self.shapes)},"
      f" form={self.form!r})"
    )

  @property
  def sizes(self) -> tuple[int, ...]:
    """The number of parameters of every leaf."""
    return tuple(math.prod(s) for s in self.shapes)

  @property
  def compute_dtype(self) -> Any:
    """The dtype of the Gram matrices, float32 or float64 (float64 params)."""
    return jnp.result_type(jnp.float32, *self.dtypes)

  def grams(self, granularity: str = "global") -> jax.Array:
    """The Gram matrix of each group, in :attr:`compute_dtype`.

    Args:
      granularity: ``"global"`` (one group: all parameters) or ``"leaf"``
        (one group per parameter leaf, in the order of the tree's leaves).

    Returns:
      ``(G, K, K)``: ``G = 1`` for ``"global"``, the number of leaves for
      ``"leaf"``; ``M[j, k] = ⟨g_j, g_k⟩`` over the group's parameters.

    Raises:
      ValueError: an unknown ``granularity``.
    """
    _check_granularity(granularity)
    grams, exponents = self.scaled_grams(granularity)
    return gram_lib.unscale(grams, exponents[:, None, None])

  def scaled_grams(self, granularity: str = "global") -> tuple[Any, Any]:
    """The Gram matrix of each group as ``(M̃, e)``, ``M = 4^e M̃``.

    Finite for any finite gradients, as the stacked path's
    :func:`~osgd_jax.gram.scaled_gram_matrices` (``docs/design.md``,
    "Range, rank and derivatives"): the Gram matrix of gradients of norm
    beyond about 1.8e19 overflows float32, its scaled form does not.

    Args:
      granularity: ``"global"`` or ``"leaf"``, as in :meth:`grams`.

    Returns:
      ``((G, K, K) scaled Gram matrices, (G,) int32 exponents)``.

    Raises:
      ValueError: an unknown ``granularity``.

    Example:
      >>> import jax.numpy as jnp, osgd_jax
      >>> loss_fn = lambda w: jnp.stack([1e30 * w.sum(), w.sum()])
      >>> _, gramian = osgd_jax.value_and_gramian(loss_fn)(jnp.ones(2))
      >>> grams, exponents = gramian.scaled_grams()
      >>> bool(jnp.isfinite(grams).all()), exponents.tolist()
      (True, [100])
    """
    _check_granularity(granularity)
    scaled = getattr(self.engine, "scaled_grams", None)
    if scaled is None:  # an engine without scaling: exponents 0
      grams = self.engine.grams(self.parts, self, granularity)
      return grams, jnp.zeros(grams.shape[:1], jnp.int32)
    return scaled(self.parts, self, granularity)

  def combine(self, weights: jax.Array, granularity: str = "global") -> Any:
    """``Σ_k w_k g_k``: the parameter-shaped weighted sum of the gradients.

    Args:
      weights: ``(K,)``, or ``(G, K)`` with one row per group.
      granularity: ``"global"`` (one row for all parameters) or ``"leaf"``
        (row l for leaf l).

    Returns:
      A tree shaped like the parameters, each leaf in its parameter's dtype.

    Raises:
      ValueError: an unknown ``granularity``.

    Example:
      >>> import jax.numpy as jnp, osgd_jax
      >>> loss_fn = lambda w: jnp.stack([w.sum(), (w ** 2).sum()])
      >>> _, gramian = osgd_jax.value_and_gramian(loss_fn)(jnp.ones(2))
      >>> gramian.combine(jnp.asarray([1.0, 0.5])).tolist()  # g1 + g2 / 2
      [2.0, 2.0]
    """
    _check_granularity(granularity)
    weights = jnp.asarray(weights)
    if weights.ndim == 1:
      weights = weights[None]
    leaves = self.engine.combine(self.parts, self, weights, granularity)
    return jax.tree.unflatten(
      self.treedef,
      [
        leaf.astype(dtype)
        for leaf, dtype in zip(leaves, self.dtypes, strict=True)
      ],
    )

  def check_params(self, params: Any, name: str) -> None:
    """Raises unless ``params`` have the structure and shapes of the Gramian.

    Raises:
      ValueError: naming the mismatch and the fix.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    if treedef != self.treedef:
      raise ValueError(
        f"{name}: the Gramian and params have different tree structures:"
        f" {self.treedef} vs {treedef}. Pass the params the Gramian was"
        " taken with respect to."
      )
    for (path, param), shape in zip(flat, self.shapes, strict=True):
      if tuple(np.shape(param)) != shape:
        raise ValueError(
          f"{name}: the Gramian's leaf {jax.tree_util.keystr(path)} has"
          f" shape {shape} but its parameter has {tuple(np.shape(param))}."
          " Pass the params the Gramian was taken with respect to."
        )


def _check_granularity(granularity: str) -> None:
  if granularity not in _GRANULARITIES:
    raise ValueError(
      f"granularity must be one of {_GRANULARITIES}, got {granularity!r}."
    )


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


def _scaled_rows(leaves: list[Any], exponents: jax.Array, cd: Any) -> list:
  return [
    gram_lib.times_power_of_two(leaf.astype(cd), -exponents[i])
    for i, leaf in enumerate(leaves)
  ]


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
    return _scaled_rows(leaves, exponents, compute_dtype), exponents

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
class VjpEngine:
  """The Gram matrix from the pullback of one forward pass (any function).

  ``parts`` is the ``jax.vjp`` pullback of the loss vector: ``(K,)``
  cotangent ``w`` to the one-element tuple ``(Jᵀ w,)``.
  """

  form: str
  loss_dtype: str

  def _pull(self, vjp_fn: Any) -> Callable[[jax.Array], list[Any]]:
    return lambda w: jax.tree.leaves(vjp_fn(w)[0])

  def grams(self, parts: Any, gramian: Gramian, granularity: str) -> jax.Array:
    grams, exponents = self.scaled_grams(parts, gramian, granularity)
    return gram_lib.unscale(grams, exponents[:, None, None])

  def scaled_grams(
    self, parts: Any, gramian: Gramian, granularity: str
  ) -> tuple[jax.Array, jax.Array]:
    vjp_fn, k = parts, gramian.num_exits
    dtype, cd = np.dtype(self.loss_dtype), gramian.compute_dtype
    shared = granularity == "global"
    if self.form == "vmap":
      # The rows exist: scaled exactly as the stacked path scales them.
      (stacked,) = jax.vmap(vjp_fn)(jnp.eye(k, dtype=dtype))
      grams, exponents = gram_lib.scaled_gram_matrices(
        jax.tree.leaves(stacked), cd
      )
      return gram_lib.combine_scaled(grams, exponents, shared)
    if not shared:
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
    transposed = jax.linear_transpose(vjp_fn, jnp.zeros((k,), dtype))

    def column(carry, e):
      g = vjp_fn(e)[0]
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
      (col,) = transposed((down,))
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


def pullback_of_weights(
  pull: Callable[[jax.Array], list[Any]], weights: jax.Array, dtype: Any
) -> list[jax.Array]:
  """``Jᵀ w`` by one pullback of ``w / 2^s``, scaled back by ``2^s``.

  ``2^s`` is just above the largest weight, so the cotangents of the
  backward pass are those of a unit-weighted loss whatever the weights'
  scale (weights scaled back from a scaled Gram matrix may be far from 1);
  scaling by a power of two is exact, so in the ordinary range the result
  is that of ``pull(w)`` bit for bit.
  """
  s = gram_lib.scale_exponents([weights])[0]
  leaves = pull(gram_lib.times_power_of_two(weights, -s).astype(dtype))
  return [gram_lib.times_power_of_two(leaf, s) for leaf in leaves]


def nbytes(tree: Any) -> int:
  """The bytes of every array (or abstract array) in ``tree``."""
  return sum(
    math.prod(np.shape(x)) * np.dtype(jnp.result_type(x)).itemsize
    for x in jax.tree.leaves(tree)
    if hasattr(x, "dtype")
  )


def choose_form(
  form: str, num_exits: int, param_bytes: int, residual_bytes: int
) -> str:
  """The formulation ``"auto"`` picks: ``"scan"`` when parameters dominate.

  ``"vmap"`` holds K cotangents of the activations and a leaf's K rows;
  ``"scan"`` one or two gradients and the transient of one backward pass
  more. The stack ``"vmap"`` would pass through is ``K·P`` bytes; the
  residuals of the forward pass (about the activations) are what its K
  cotangents scale. ``"scan"`` when ``K·P ≥`` the residual bytes.

  Example:
    >>> choose_form("auto", 4, param_bytes=64 << 20, residual_bytes=1 << 20)
    'scan'
    >>> choose_form("auto", 4, param_bytes=4 << 20, residual_bytes=600 << 20)
    'vmap'
  """
  if form != "auto":
    return form
  return "scan" if num_exits * param_bytes >= residual_bytes else "vmap"


def check_form(form: Any, fn_name: str) -> None:
  """Raises unless ``form`` is one of :data:`FORMS`."""
  if form not in FORMS:
    raise ValueError(f"{fn_name}: form must be one of {FORMS}, got {form!r}.")


def value_and_gramian(
  loss_fn: Callable[..., Any],
  *,
  has_aux: bool = False,
  form: Form = "auto",
) -> Callable[..., tuple[Any, Gramian]]:
  """Creates a function returning the exit losses and their :class:`Gramian`.

  The twin of :func:`~osgd_jax.grads.value_and_per_exit_grads`: the same
  ``loss_fn(params, *args)`` returning a ``(K,)`` loss vector, run forward
  once; instead of the stacked K×P gradients it returns a :class:`Gramian`
  that every Gram-weighting transformation takes in their place, with the
  same update and state, without the stack ever existing.

  Args:
    loss_fn: function of ``(params, *args)`` whose first output is the
      vector of per-exit losses, earliest exit first.
    has_aux: whether ``loss_fn`` returns a pair ``(losses, aux)`` (e.g. the
      new BatchNorm statistics: the forward runs once, so they are updated
      once per step).
    form: how the Gram matrix is formed: ``"vmap"``, ``"scan"`` or
      ``"auto"`` (see the module docstring and ``docs/design.md``, "The
      Gramian engine"). The results agree to float rounding.

  Returns:
    A function of ``(params, *args)`` returning ``(losses, gramian)``, or
    ``((losses, aux), gramian)`` with ``has_aux``.

  Raises:
    ValueError: an unknown ``form`` (at construction); at trace time, if
      ``loss_fn`` does not return a non-empty 1-D floating-point vector,
      or (with ``has_aux``) not a pair.

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
  """
  fn_name = getattr(loss_fn, "__name__", "loss_fn")
  check_form(form, "value_and_gramian")

  @functools.wraps(loss_fn)
  def value_and_gram(params, *args):
    if has_aux:
      losses, vjp_fn, aux = jax.vjp(
        lambda p: check_aux_pair(loss_fn(p, *args), fn_name),
        params,
        has_aux=True,
      )
    else:
      losses, vjp_fn = jax.vjp(lambda p: loss_fn(p, *args), params)
      aux = None
    check_loss_vector(losses, fn_name)
    k = losses.shape[0]
    leaves, treedef = jax.tree.flatten(params)
    chosen = choose_form(form, k, nbytes(leaves), nbytes(vjp_fn))
    gramian = Gramian(
      vjp_fn,
      engine=VjpEngine(chosen, np.dtype(losses.dtype).name),
      num_exits=k,
      treedef=treedef,
      shapes=tuple(tuple(np.shape(x)) for x in leaves),
      dtypes=tuple(jnp.result_type(x) for x in leaves),
      form=chosen,
    )
    if has_aux:
      return (losses, aux), gramian
    return losses, gramian

  return value_and_gram
