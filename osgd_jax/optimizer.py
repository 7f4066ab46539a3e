"""``nnx.Optimizer`` whose ``update`` also takes a :class:`~osgd_jax.Gramian`.

``nnx.Optimizer.update(model, grads)`` first keeps the ``nnx.Variable``
leaves of ``grads`` that its ``wrt`` filter selects (Flax 0.12's
``nnx.state(grads, wrt)``). Stacked per-exit gradients pass that filter;
a Gramian holds the residuals of the forward pass, not one variable per
parameter, so nothing of it would reach the transformation (which then
refuses the empty gradients with a one-line error naming this class).
:class:`Optimizer` is ``nnx.Optimizer`` with an ``update`` that hands a
Gramian to the transformation as it is; for anything else it is
``nnx.Optimizer.update`` itself. Its state (``step``, ``opt_state``),
construction and checkpoints are ``nnx.Optimizer``'s.
"""

from __future__ import annotations

from typing import Any

import jax
import optax
from flax import nnx

from osgd_jax._gramian_core import Gramian

__all__ = ["Optimizer"]

# Flax 0.12.8 renamed nnx.pure (now deprecated) to nnx.as_pure; 0.12.4,
# the oldest Flax this library supports, has only nnx.pure.
_as_pure = getattr(nnx, "as_pure", None) or nnx.pure


def _pure_structure(gramian: Gramian) -> Any:
  """The tree structure of the Gramian's parameters, variables unwrapped."""
  shaped = jax.tree.unflatten(
    gramian.treedef,
    [
      jax.ShapeDtypeStruct(shape, dtype)
      for shape, dtype in zip(gramian.shapes, gramian.dtypes, strict=True)
    ],
  )
  return jax.tree.structure(_as_pure(shaped))


class Optimizer(nnx.Optimizer):
  """``nnx.Optimizer`` whose ``update`` takes a Gramian or stacked gradients.

  Built, stored and checkpointed as ``nnx.Optimizer`` (the same arguments,
  the same ``step`` and ``opt_state``); only :meth:`update` differs: it
  also takes the :class:`~osgd_jax.Gramian` of
  :func:`~osgd_jax.gramian.value_and_gramian` or
  :func:`~osgd_jax.staged_gramian.staged_value_and_gramian` (model form),
  which ``nnx.Optimizer.update`` cannot, and applies it as Flax applies
  gradients: ``tx.update`` with the ``wrt`` parameters, the new parameters
  and optimizer state written back, the step count incremented. The
  transformation must weigh the exits by their Gram matrix (every
  ``osgd_jax`` Gram weighting does; GradDrop, TrimmedMean and ExcessMTL
  refuse a Gramian with a one-line error).

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import osgd_jax
    >>> from osgd_jax import zoo
    >>> model = zoo.create("branched-mlp", rngs=nnx.Rngs(0), stages=3)
    >>> optimizer = osgd_jax.Optimizer(
    ...     model, osgd_jax.osgd_sgd(0.1, num_exits=3), wrt=nnx.Param)
    >>> def loss_fn(model, x, y):
    ...   return osgd_jax.per_exit_cross_entropy(model(x), y)
    >>> losses, gramian = osgd_jax.value_and_gramian(loss_fn)(
    ...     model, jnp.ones((4, 64)), jnp.zeros(4, jnp.int32))
    >>> _ = optimizer.update(model, gramian)
    >>> int(optimizer.step[...])
    1
  """

  def update(self, model: Any, grads: Any, /, **kwargs: Any) -> optax.Updates:
    """Updates the model's ``wrt`` parameters and the optimizer state.

    Args:
      model: the model whose ``wrt`` variables the gradients are of.
      grads: a :class:`~osgd_jax.Gramian` taken with respect to the
        model's ``wrt`` variables (the model form of
        :func:`~osgd_jax.gramian.value_and_gramian` takes it with respect
        to ``nnx.Param``), or gradients as ``nnx.Optimizer.update`` takes
        them (stacked per-exit gradients), which go to it unchanged.
      **kwargs: passed on to ``tx.update``, as by ``nnx.Optimizer``.

    Returns:
      The updates applied, in the structure of the ``wrt`` parameters.

    Raises:
      ValueError: a Gramian taken with respect to other variables than
        the optimizer's ``wrt`` selects of ``model``; and whatever
        ``tx.update`` raises for it (another K, a transformation that
        reads coordinates).
    """
    if not isinstance(grads, Gramian):
      return super().update(model, grads, **kwargs)
    # Flax >= 0.12.5 has a graph (tree-mode) setting; older has neither it
    # nor the argument.
    graph = getattr(self, "graph", None)
    mode = {} if graph is None else {"graph": graph}
    params = _as_pure(nnx.state(model, self.wrt, **mode))
    structure = jax.tree.structure(params)
    if _pure_structure(grads) != structure:
      raise ValueError(
        "osgd_jax.Optimizer.update: the Gramian is not of the variables"
        f" this optimizer updates (wrt={self.wrt!r}): its parameters have"
        f" {len(grads.shapes)} leaves in another structure than the"
        f" model's {structure.num_leaves}. Take it with"
        " osgd_jax.value_and_gramian(loss_fn)(model, ...), which is of"
        " the nnx.Param variables, and build the optimizer with"
        " wrt=nnx.Param."
      )
    # The transformation meets the pure parameters it was initialised on;
    # the Gramian's leaves are in their order, so only its structure
    # changes (the engines compute leaf by leaf). Optax types its updates
    # as arrays; the library's transformations take a Gramian too.
    gramian: Any = Gramian(
      grads.parts,
      engine=grads.engine,
      num_exits=grads.num_exits,
      treedef=structure,
      shapes=grads.shapes,
      dtypes=grads.dtypes,
      form=grads.form,
    )
    updates, opt_state = self.tx.update(
      gramian, _as_pure(self.opt_state), params, **_as_pure(kwargs)
    )
    nnx.update(model, optax.apply_updates(params, updates))
    nnx.update(self.opt_state, nnx.state(opt_state, **mode))
    self.step[...] += 1
    return updates
