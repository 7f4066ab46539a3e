"""The staged Gramian of a zoo :class:`~osgd_jax.zoo.AnytimeNet`.

The twin of :func:`~osgd_jax.staged.staged_value_and_per_exit_grads` for the
Gramian engine (``docs/design.md``, "The Gramian engine"): exit k's gradient
involves stages 1..k only, so stage j's K×K Gram block has non-zero entries
only between the exits j..K that reach it. The forward runs once, stage by
stage, keeping each stage's pullback; the Gram matrix is one staged backward
pass whose stage-j rows (exits j..K) are contracted into their Gram blocks as
soon as they exist, and ``Σ_k w_k g_k`` is one more staged backward pass with
the single cotangent ``Σ_k w_k e_k`` (``granularity="global"``), or the
staged backward with each stage's rows summed with their leaf's weights
(``"leaf"``). No K×P stack is formed; a stage's rows live only while its
blocks are contracted (``form="replay"``). Where the activations dominate
that keeps the forward's residuals alive until the update, so
``form="keep"`` (the automatic choice there) instead keeps each leaf's
rows from one staged backward, frees the residuals, and forms the Gram
matrices and the update from the rows as the stacked path does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from osgd_jax import gram as gram_lib
from osgd_jax import staged
from osgd_jax._gramian_core import (
  Gramian,
  RowsEngine,
  ScaledGramEngine,
  choose_form,
  nbytes,
  pullback_of_weights,
)

__all__ = ["STAGED_FORMS", "staged_value_and_gramian"]

#: How :func:`staged_value_and_gramian` keeps what its Gram matrix and
#: update need: ``"keep"`` the stages' rows of one staged backward,
#: ``"replay"`` the stages' pullbacks (one more backward for the update),
#: ``"auto"`` the leaner by the rule of ``osgd_jax._gramian_core.choose_form``.
STAGED_FORMS: tuple[str, ...] = ("auto", "keep", "replay")


@dataclasses.dataclass(frozen=True)
class StagedEngine(ScaledGramEngine):
  """A :class:`~osgd_jax.Gramian`'s formulation from the staged pullbacks.

  ``parts`` is ``(vjps, logit_cts)`` of
  :func:`~osgd_jax.staged.staged_forward`.

  Attributes:
    rows: how a stage's pullback runs for its exits (see
      :data:`osgd_jax.staged.ROWS`).
    stage_leaves: for each stage, the index among the parameters' leaves of
      each of its own leaves.
    loss_dtype: the dtype of the losses (and their cotangents).
  """

  rows: str
  stage_leaves: tuple[tuple[int, ...], ...]
  loss_dtype: str

  def _backward(
    self, parts: Any, num_exits: int, reduce: Callable[[int, Any], Any]
  ) -> list[Any]:
    vjps, logit_cts = parts

    def run(rows):
      return staged.staged_backward(vjps, logit_cts, num_exits, rows, reduce)

    if self.rows == "auto":
      # Decided when the step is lowered for its platform, as the staged
      # Jacobian does.
      return jax.lax.platform_dependent(
        cpu=lambda: run("looped"), default=lambda: run("batched")
      )
    return run(self.rows)

  def _in_param_order(self, per_stage: list[list[Any]], count: int) -> list:
    out: list[Any] = [None] * count
    for leaves, indices in zip(per_stage, self.stage_leaves, strict=True):
      for leaf, i in zip(leaves, indices, strict=True):
        out[i] = leaf
    return out

  def scaled_grams(
    self, parts: Any, gramian: Gramian, granularity: str
  ) -> tuple[jax.Array, jax.Array]:
    k, cd = gramian.num_exits, gramian.compute_dtype

    def blocks(j, grads_j):
      # Exits j..K reach stage j: their block, zero rows and columns before.
      grams, exponents = gram_lib.scaled_gram_matrices(
        jax.tree.leaves(grads_j), cd
      )
      grams = jnp.pad(grams, ((0, 0), (j, 0), (j, 0)))
      return list(zip(grams, exponents, strict=True))

    per_stage = self._backward(parts, k, blocks)
    pairs = self._in_param_order(per_stage, len(gramian.shapes))
    return gram_lib.combine_scaled(
      jnp.stack([g for g, _ in pairs]),
      jnp.stack([e for _, e in pairs]),
      granularity == "global",
    )

  def combine(
    self, parts: Any, gramian: Gramian, weights: jax.Array, granularity: str
  ) -> list[jax.Array]:
    k, cd = gramian.num_exits, gramian.compute_dtype
    if granularity == "leaf":
      weights = weights.astype(cd)

      def summed(j, grads_j):
        return [
          gram_lib.weighted_sum(weights[i, j:], leaf, cd)
          for i, leaf in zip(
            self.stage_leaves[j], jax.tree.leaves(grads_j), strict=True
          )
        ]

      per_stage = self._backward(parts, k, summed)
      return self._in_param_order(per_stage, len(gramian.shapes))
    # One staged backward with the single cotangent Σ_k w_k e_k, the
    # weights brought near 1 by a power of two (gramian.pullback_of_weights).
    return pullback_of_weights(
      lambda w: self._weighted_backward(parts, w, len(gramian.shapes)),
      weights[0],
      np.dtype(self.loss_dtype),
    )

  def _weighted_backward(self, parts: Any, w: jax.Array, count: int) -> list:
    vjps, logit_cts = parts
    k = len(vjps)
    per_stage: list[Any] = [None] * k
    carry = None
    for j in reversed(range(k)):
      vjp, out_floats = vjps[j]
      logit_ct = jnp.tensordot(w.astype(logit_cts[j].dtype), logit_cts[j], 1)
      carry_ct = (
        [jnp.zeros_like(f) for f in out_floats] if carry is None else carry
      )
      if j == 0:
        (grads_j,) = vjp((carry_ct, logit_ct))
      else:
        grads_j, carry = vjp((carry_ct, logit_ct))
      per_stage[j] = jax.tree.leaves(grads_j)
    return self._in_param_order(per_stage, count)


def _stage_leaves(params: Any, num_exits: int) -> tuple[tuple[int, ...], ...]:
  """Where each stage's parameter leaves sit among all the parameters."""
  paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  index = {path: i for i, path in enumerate(paths)}
  out = []
  for j in range(num_exits):
    prefix = (jax.tree_util.DictKey("stages"), jax.tree_util.DictKey(j))
    own = params["stages"][j] if j in params["stages"] else nnx.State({})
    out.append(
      tuple(
        index[prefix + path]
        for path, _ in jax.tree_util.tree_flatten_with_path(own)[0]
      )
    )
  return tuple(out)


def staged_value_and_gramian(
  graphdef: Any,
  loss_fn: Callable[..., Any] | None = None,
  has_aux: bool = False,
  rows: str = "auto",
  form: str = "auto",
) -> Callable[..., tuple[Any, Gramian]]:
  """The staged Jacobian's twin for the Gramian engine: no K×P stack.

  Takes what :func:`~osgd_jax.staged.staged_value_and_per_exit_grads` takes
  and checks the same assumptions (disjoint stages; exit k's loss reads
  the logits of exits 1..k only); returns a :class:`~osgd_jax.Gramian` in
  place of the stacked gradients. Every Gram-weighting transformation takes
  it, with the same update and state as from the stacked gradients.

  Two forms, as the staged Jacobian's. **With a model** (as
  ``nnx.value_and_grad``): ``staged_value_and_gramian(loss_fn)(model,
  *args)`` with ``loss_fn(model, *args)`` written as for
  :func:`~osgd_jax.gramian.value_and_gramian`, which calls the model
  exactly once, ``model(x)`` on one of ``args`` as passed, and reaches the
  parameters only through that call. It returns ``(losses, gramian)``
  (``((losses, aux), gramian)`` with ``has_aux``), the Gramian taken with
  respect to the model's ``nnx.Param`` variables, and updates the model's
  other state (BatchNorm statistics) in place, once; a loss function that
  does not fit is refused with the reason (``value_and_gramian`` then
  takes the vmapped VJP's path instead). **Functional**:
  ``staged_value_and_gramian(graphdef, loss_fn)(params, rest, x,
  *loss_args)`` as below.

  Args:
    graphdef: the graph definition of an :class:`~osgd_jax.zoo.AnytimeNet`,
      from ``graphdef, params, rest = nnx.split(model, nnx.Param, ...)``;
      or, in the model form, the loss function ``loss_fn(model, *args)``.
    loss_fn: ``loss_fn(stacked_logits, *loss_args)`` returning the ``(K,)``
      exit losses (or ``(losses, aux)`` with ``has_aux``). Left out in the
      model form.
    has_aux: whether ``loss_fn`` returns a pair ``(losses, aux)``.
    rows: how a stage's pullback runs for its exits, as in the staged
      Jacobian: ``"batched"``, ``"looped"`` or ``"auto"``.
    form: ``"keep"``: one staged backward whose rows are kept (at most
      K×P, the forward's residuals freed at once); ``"replay"``: the
      stages' pullbacks are kept, the Gram matrix is one staged backward
      contracting each stage's rows as they appear and the update one more
      (no rows kept; the residuals live until the update); ``"auto"``
      (default): ``"replay"`` where the parameters dominate (``K·P`` bytes
      at least the residuals' bytes, the rule of
      ``osgd_jax._gramian_core.choose_form``), else ``"keep"``. See
      ``docs/design.md``, "The Gramian engine".

  Returns:
    In the model form, ``fn(model, *args)`` as described above. Otherwise
    a function ``fn(params, rest, x, *loss_args)`` returning ``((losses,
    new_rest), gramian)``, or ``((losses, aux, new_rest), gramian)`` with
    ``has_aux``. ``new_rest`` is the non-parameter state after the one
    forward pass (BatchNorm statistics updated once per step).

  Raises:
    ValueError: as :func:`~osgd_jax.staged.staged_value_and_per_exit_grads`
      raises, and for an unknown ``form``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from flax import nnx
    >>> import osgd_jax
    >>> from osgd_jax import zoo
    >>> model = zoo.create("nested-depth-mlp", rngs=nnx.Rngs(0), width=8,
    ...                    stages=3)
    >>> graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    >>> loss_fn = lambda logits, y: osgd_jax.per_exit_cross_entropy(logits, y)
    >>> fn = osgd_jax.staged_value_and_gramian(graphdef, loss_fn)
    >>> tx = osgd_jax.osgd(num_exits=3)
    >>> @jax.jit
    ... def step(params, rest, state, x, y):
    ...   (losses, rest), gramian = fn(params, rest, x, y)
    ...   updates, state = tx.update(gramian, state, params)
    ...   params = optax.apply_updates(params, updates)
    ...   return params, rest, state, gramian.grams()
    >>> x, y = jnp.ones((4, 64)), jnp.zeros(4, jnp.int32)
    >>> params, rest, state, grams = step(params, rest, tx.init(params), x, y)
    >>> grams.shape
    (1, 3, 3)

    With the model, as with ``nnx.value_and_grad`` (and ``nnx.jit``):

    >>> def model_loss(model, x, y):
    ...   return osgd_jax.per_exit_cross_entropy(model(x), y)
    >>> model_fn = nnx.jit(osgd_jax.staged_value_and_gramian(model_loss))
    >>> losses, gramian = model_fn(model, x, y)
    >>> gramian.form.startswith('staged')
    True
  """
  if rows not in staged.ROWS:
    raise ValueError(f"rows must be one of {staged.ROWS}, got {rows!r}.")
  if form not in STAGED_FORMS:
    raise ValueError(
      f"staged_value_and_gramian: form must be one of {STAGED_FORMS}, got"
      f" {form!r}."
    )
  if loss_fn is None and callable(graphdef):
    return _model_form(graphdef, has_aux, rows, form)
  if loss_fn is None or not isinstance(graphdef, nnx.GraphDef):
    raise ValueError(
      "staged_value_and_gramian takes the graphdef of an anytime network,"
      " from `graphdef, params, rest = nnx.split(model, nnx.Param, ...)`,"
      f" and a loss function, but got a {type(graphdef).__name__} and a"
      f" {type(loss_fn).__name__}; or, for a model, the loss function"
      " alone: `staged_value_and_gramian(loss_fn)(model, x, y)`."
    )
  fn_name = getattr(loss_fn, "__name__", "loss_fn")

  def value_and_gram(params, rest, x, *loss_args):
    losses, aux, vjps, logit_cts, new_rest = staged.staged_forward(
      graphdef, loss_fn, has_aux, fn_name, params, rest, x, *loss_args
    )
    k = len(vjps)
    leaves, treedef = jax.tree.flatten(params)
    stage_leaves = _stage_leaves(params, k)
    replay = StagedEngine(rows, stage_leaves, np.dtype(losses.dtype).name)
    # The same shape-only rule as value_and_gramian's: "scan" there (the
    # parameters dominate) is "replay" here.
    keep = form == "keep" or (
      form == "auto"
      and choose_form("auto", k, nbytes(leaves), nbytes((vjps, logit_cts)))
      == "vmap"
    )
    if keep:
      per_stage = replay._backward(
        (vjps, logit_cts), k, lambda j, grads_j: jax.tree.leaves(grads_j)
      )
      # A leaf of stage j holds the rows of exits j..K, which reach it.
      exits = [tuple(range(k))] * len(leaves)
      for j, indices in enumerate(stage_leaves):
        for i in indices:
          exits[i] = tuple(range(j, k))
      parts: Any = replay._in_param_order(per_stage, len(leaves))
      engine: Any = RowsEngine(tuple(exits))
    else:
      parts, engine = (vjps, logit_cts), replay
    gramian = Gramian(
      parts,
      engine=engine,
      num_exits=k,
      treedef=treedef,
      shapes=tuple(tuple(np.shape(leaf)) for leaf in leaves),
      dtypes=tuple(jnp.result_type(leaf) for leaf in leaves),
      form="staged-keep" if keep else "staged",
    )
    if has_aux:
      return (losses, aux, new_rest), gramian
    return (losses, new_rest), gramian

  return value_and_gram


def _model_form(
  loss_fn: Callable[..., Any], has_aux: bool, rows: str, form: str
) -> Callable[..., tuple[Any, Gramian]]:
  """``staged_value_and_gramian(loss_fn)``: ``fn(model, *args)``."""
  fn_name = getattr(loss_fn, "__name__", "loss_fn")

  def functional(graphdef, loss, aux, rows):
    return staged_value_and_gramian(graphdef, loss, aux, rows, form)

  def value_and_gram_of_model(model, *args):
    out = staged.staged_module_value_and_grads(
      loss_fn,
      model,
      args,
      has_aux=has_aux,
      rows=rows,
      required=True,
      fn_name=fn_name,
      functional=functional,
      entry="osgd_jax.value_and_gramian",
      what="staged Gramian",
    )
    assert out is not None  # required=True raises instead
    return out

  return value_and_gram_of_model
