"""The :class:`~osgd_jax.gramian.Gramian` type and what its engines share.

Both engines of the Gramian (``osgd_jax.gramian``, any function, and
``osgd_jax.staged_gramian``, the staged one of a zoo model) build this
type, choose their formulation by the rule of ``choose_form``, form
the update by ``pullback_of_weights`` or keep each leaf's gradient rows
in a ``RowsEngine``. It is its own module so that
``osgd_jax.gramian`` can hand a zoo model to the staged engine, as
``osgd_jax.grads`` hands it to the staged Jacobian, without an import
cycle.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from osgd_jax import gram as gram_lib

__all__ = [
  "GramEngine",
  "ScaledGramEngine",
  "Gramian",
  "RowsEngine",
  "check_granularity",
  "choose_form",
  "embed_block",
  "nbytes",
  "pullback_of_weights",
]

_GRANULARITIES = ("global", "leaf")


class GramEngine(Protocol):
  """How a :class:`~osgd_jax.gramian.Gramian` computes (static, hashable).

  An engine may also define ``scaled_grams(parts, gramian, granularity)``
  returning ``(M̃, e)`` with ``M = 4^e M̃`` (see
  :meth:`~osgd_jax.gramian.Gramian.scaled_grams`); the library's engines
  do, so that their Gram matrices are scale-safe.
  """

  def grams(
    self, parts: Any, gramian: Gramian, granularity: str
  ) -> jax.Array: ...

  def combine(
    self, parts: Any, gramian: Gramian, weights: jax.Array, granularity: str
  ) -> list[jax.Array]: ...


class ScaledGramEngine:
  """A :class:`GramEngine` whose Gram matrices come from ``scaled_grams``.

  The library's engines compute the scaled form ``(M̃, e)`` first (it is
  finite where ``M`` overflows), so their plain ``grams`` is that form
  unscaled; a subclass defines ``scaled_grams`` and ``combine``.
  """

  def scaled_grams(
    self, parts: Any, gramian: Gramian, granularity: str
  ) -> tuple[jax.Array, jax.Array]:
    raise NotImplementedError

  def grams(self, parts: Any, gramian: Gramian, granularity: str) -> jax.Array:
    grams, exponents = self.scaled_grams(parts, gramian, granularity)
    return gram_lib.unscale(grams, exponents[:, None, None])


@jax.tree_util.register_pytree_node_class
class Gramian:
  """The per-exit gradients of K losses, without their K×P stack.

  Returned by :func:`~osgd_jax.gramian.value_and_gramian` and
  :func:`~osgd_jax.staged_gramian.staged_value_and_gramian`; every
  Gram-weighting transformation takes it in place of stacked gradients,
  with the same update and state. It is a pytree (the residuals of the
  forward pass, held by ``jax.tree_util.Partial`` pullbacks, plus static
  metadata), so it crosses ``jax.jit`` boundaries and enters ``tx.update``.

  Attributes:
    parts: the arrays and pullbacks its engine computes from.
    engine: the static formulation (how :meth:`Gramian.grams` and
      :meth:`Gramian.combine` run).
    num_exits: K.
    treedef: the tree structure of the parameters.
    shapes: each parameter leaf's shape.
    dtypes: each parameter leaf's dtype.
    form: the formulation chosen (``"vmap"``, ``"scan"``, ``"blocks"``,
      ``"staged"`` or ``"staged-keep"``).
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
    check_granularity(granularity)
    grams, exponents = self.scaled_grams(granularity)
    return gram_lib.unscale(grams, exponents[:, None, None])

  def scaled_grams(self, granularity: str = "global") -> tuple[Any, Any]:
    """The Gram matrix of each group as ``(M̃, e)``, ``M = 4^e M̃``.

    Finite for any finite gradients, as the stacked path's
    :func:`~osgd_jax.gram.scaled_gram_matrices` (``docs/design.md``,
    "Range, rank and derivatives"): the Gram matrix of gradients of norm
    beyond about 1.8e19 overflows float32, its scaled form does not.

    Args:
      granularity: ``"global"`` or ``"leaf"``, as in :meth:`Gramian.grams`.

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
    check_granularity(granularity)
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
    check_granularity(granularity)
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


def check_granularity(granularity: str) -> None:
  if granularity not in _GRANULARITIES:
    raise ValueError(
      f"granularity must be one of {_GRANULARITIES}, got {granularity!r}."
    )


def embed_block(
  block: jax.Array, rows: Sequence[int], cols: Sequence[int], num_exits: int
) -> jax.Array:
  """The K×K matrix holding ``block`` at exits ``rows`` × ``cols``, else 0.

  Example:
    >>> import jax.numpy as jnp
    >>> embed_block(jnp.ones((1, 2)), (0,), (1, 2), 3).tolist()
    [[0.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
  """
  rows, cols = tuple(rows), tuple(cols)
  if rows == cols == tuple(range(num_exits - len(rows), num_exits)):
    # The exits from some j on, as a stage's (a pad, which XLA fuses).
    j = num_exits - len(rows)
    return jnp.pad(block, ((j, 0), (j, 0)))
  zeros = jnp.zeros((num_exits, num_exits), block.dtype)
  return zeros.at[np.ix_(rows, cols)].set(block)


@dataclasses.dataclass(frozen=True)
class RowsEngine(ScaledGramEngine):
  """A :class:`Gramian` from each leaf's gradient rows, kept.

  ``parts`` is, in the parameters' leaf order, each leaf's gradient rows
  for the exits that reach it, ``(len(exits[l]), *shape_l)``: what the
  stacked path holds, without its zero rows. Once they exist the pullback
  that made them is dead, so the forward's residuals are freed before the
  weighting runs (the formulation for activation-dominated networks,
  ``docs/design.md``, "The Gramian engine"). The Gram matrices and the
  update are the stacked path's, each leaf scaled by its own exponent, so
  that XLA can contract and sum the leaves one at a time.

  Attributes:
    exits: for each leaf, the exits whose rows it holds, increasing; every
      other exit's gradient is zero there.
  """

  exits: tuple[tuple[int, ...], ...]

  def scaled_grams(
    self, parts: Any, gramian: Gramian, granularity: str
  ) -> tuple[jax.Array, jax.Array]:
    cd, k = gramian.compute_dtype, gramian.num_exits
    scaled, exponents = gram_lib.scale_each(parts, cd)
    grams = [
      embed_block(gram_lib.gram_matrices([rows], cd)[0], exits, exits, k)
      for rows, exits in zip(scaled, self.exits, strict=True)
    ]
    return gram_lib.combine_scaled(
      jnp.stack(grams), exponents, granularity == "global"
    )

  def combine(
    self, parts: Any, gramian: Gramian, weights: jax.Array, granularity: str
  ) -> list[jax.Array]:
    cd, shared = gramian.compute_dtype, granularity == "global"
    exponents = gram_lib.leaf_exponents(parts)
    return [
      gram_lib.weighted_sum(
        weights[0 if shared else i][np.asarray(exits)],
        rows,
        cd,
        exponents[i],
      )
      for i, (rows, exits) in enumerate(zip(parts, self.exits, strict=True))
    ]


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
  form: str,
  num_exits: int,
  param_bytes: int,
  residual_bytes: int,
  untapped_bytes: int | None = None,
  cotangent_bytes: Callable[[], int] | None = None,
) -> str:
  """The formulation ``"auto"`` picks (``docs/design.md``, "The Gramian
  engine").

  ``untapped_bytes`` is ``None`` when no parameter is tapped (``"blocks"``
  does not apply), else the bytes of the parameters ``"blocks"`` cannot tap
  (not used only in matrix products); ``cotangent_bytes`` returns the bytes
  of the tapped products' output cotangents, each held for the exits that
  reach it (called only where it decides):

  * where the activations dominate (``K·P <`` the residuals' bytes),
    ``"vmap"``, which keeps the K rows of one backward pass and frees the
    residuals there (``"blocks"`` and ``"scan"`` keep them for one more
    backward pass);
  * else ``"blocks"`` where what it holds, those cotangents and the K
    rows of the untapped parameters, is at most one copy of the
    parameters;
  * else ``"scan"``, which holds one or two gradients whatever K.

  Example:
    >>> choose_form("auto", 4, param_bytes=64 << 20, residual_bytes=1 << 20,
    ...             untapped_bytes=1 << 20, cotangent_bytes=lambda: 8 << 20)
    'blocks'
    >>> choose_form("auto", 4, param_bytes=64 << 20, residual_bytes=1 << 20)
    'scan'
    >>> choose_form("auto", 4, param_bytes=4 << 20, residual_bytes=600 << 20,
    ...             untapped_bytes=1 << 20, cotangent_bytes=lambda: 1 << 20)
    'vmap'
  """
  if form != "auto":
    return form
  k = num_exits
  if k * param_bytes < residual_bytes:
    return "vmap"
  if (
    untapped_bytes is not None
    and cotangent_bytes is not None
    and cotangent_bytes() + k * untapped_bytes <= param_bytes
  ):
    return "blocks"
  return "scan"
