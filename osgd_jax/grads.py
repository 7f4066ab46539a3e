"""Per-exit gradients: the rows of the Jacobian of an anytime network's losses.

An anytime network with K exits has a loss *vector* ``(l_1, ..., l_K)``. OSGD
needs the gradient of every component separately, i.e. the rows of the
Jacobian of that vector with respect to the parameters.

:func:`value_and_per_exit_grads` computes them for any
``loss_fn(params, *args)``. Reverse mode gives row k as the VJP with the
one-hot cotangent ``e_k``; one backward pass carrying the K one-hot
cotangents computes all K rows from a single forward pass
(:func:`~osgd_jax.exit_pullback.one_hot_pullbacks`, the result of
vmapping the VJP over the rows of the identity, with each value of the
backward pass held for the exits that reach it: a head's cotangent is
one row, not K). Each of those passes runs through the whole network; for a
zoo :class:`~osgd_jax.zoo.AnytimeNet`,
:func:`~osgd_jax.staged.staged_value_and_per_exit_grads` runs exit k's only
through the stages that exit reads.

Given a Flax NNX module instead of a parameter pytree, it works as
``nnx.value_and_grad`` does: ``loss_fn(model, *args)``, gradients with
respect to the ``nnx.Param`` variables as an ``nnx.State``, and the rest of
the model's state (BatchNorm statistics, RNG counts) updated in place once
per call; a zoo model gets the staged Jacobian automatically.

The checks of what a loss function returns, which both share, are here too:
:func:`check_loss_vector` and :func:`check_aux_pair`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from osgd_jax._loss_checks import check_aux_pair, check_loss_vector
from osgd_jax.exit_pullback import one_hot_pullbacks
from osgd_jax.staged import staged_module_value_and_grads

__all__ = ["check_aux_pair", "check_loss_vector", "value_and_per_exit_grads"]


def _per_exit_rows(
  pure_fn: Callable[[Any], Any], params: Any, fn_name: str
) -> tuple[Any, Any, Any]:
  """``(losses, aux, grads)`` of ``pure_fn(params) -> (losses, aux)``.

  One forward pass (one trace of ``pure_fn``, which checks the pair), and
  the VJP of the rows of the identity, each value held for the exits that
  reach it.
  """
  losses, vjp_fn, aux = jax.vjp(pure_fn, params, has_aux=True)
  check_loss_vector(losses, fn_name)
  (grads,) = one_hot_pullbacks(vjp_fn, losses.shape[0], losses.dtype)
  return losses, aux, grads


def module_value_and_derivative(
  loss_fn: Callable[..., Any],
  model: nnx.Module,
  args: tuple[Any, ...],
  *,
  has_aux: bool,
  staged: bool | None,
  fn_name: str,
  differentiate: Callable[..., tuple[Any, Any, Any]] = _per_exit_rows,
  staged_functional: Callable[..., Callable[..., Any]] | None = None,
  entry: str = "osgd_jax.value_and_per_exit_grads",
  what: str = "staged Jacobian",
) -> tuple[Any, Any]:
  """The model case of :func:`value_and_per_exit_grads`, and its twins'.

  ``loss_fn(model, *args)`` is differentiated with respect to the model's
  ``nnx.Param`` variables; the rest of its state is written back once. A
  zoo model goes to the staged form (``staged_functional``, see
  :func:`osgd_jax.staged.staged_module_value_and_grads`) unless
  ``staged=False`` or the loss function does not fit; any other case to
  ``differentiate(pure_fn, params, fn_name) -> (losses, aux, out)``, of
  ``pure_fn(params) -> (losses, aux)``. The defaults give stacked
  gradients; :func:`osgd_jax.gramian.value_and_gramian` passes its own to
  give a Gramian, with ``entry`` and ``what`` naming it in errors.

  Returns:
    ``(losses, out)``, or ``((losses, aux), out)`` with ``has_aux``.
  """
  if staged is not False:
    result = staged_module_value_and_grads(
      loss_fn,
      model,
      args,
      has_aux=has_aux,
      rows="auto",
      required=bool(staged),
      fn_name=fn_name,
      functional=staged_functional,
      entry=entry,
      what=what,
    )
    if result is not None:
      return result
  # Differentiate a pure function of the parameters, as nnx.value_and_grad
  # does: a fresh copy of the model runs inside the trace, and its new
  # non-parameter state comes out as auxiliary data, written back once.
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def pure_fn(p):
    copy = nnx.merge(graphdef, p, rest, copy=True)
    out = loss_fn(copy, *args)
    losses, aux = check_aux_pair(out, fn_name) if has_aux else (out, None)
    return losses, (aux, nnx.state(copy, nnx.Not(nnx.Param)))

  losses, (aux, new_rest), out = differentiate(pure_fn, params, fn_name)
  nnx.update(model, new_rest)
  return ((losses, aux), out) if has_aux else (losses, out)


def value_and_per_exit_grads(
  loss_fn: Callable[..., Any],
  has_aux: bool = False,
  *,
  staged: bool | None = None,
) -> Callable[..., tuple[Any, Any]]:
  """Creates a function returning the exit losses and their stacked gradients.

  ``loss_fn(params, *args)`` must return a ``(K,)`` vector of exit losses (or
  ``(losses, aux)`` with ``has_aux=True``). The returned function evaluates
  ``loss_fn`` once and computes the K gradients with a ``jax.vmap`` of the VJP
  over the rows of the K×K identity, not with K separate ``jax.grad`` calls.

  **Flax NNX models.** Called with an ``nnx.Module`` as its first argument,
  the returned function works as ``nnx.value_and_grad`` does:

  * ``loss_fn(model, *args)`` takes the model itself (a copy that the
    function makes) and returns the ``(K,)`` losses, exit 1 first;
  * the gradients are taken with respect to the model's ``nnx.Param``
    variables and come back as an ``nnx.State`` of their structure (what
    ``nnx.state(model, nnx.Param)`` gives), every leaf ``(K,
    *param.shape)``: ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` takes them
    with ``optimizer.update(model, grads)``;
  * the model's other state (BatchNorm statistics in train mode, RNG
    counts) is updated in place, exactly once per call, inside ``nnx.jit``
    too. Other arguments are not differentiated, and modules among them
    are not updated.

  A zoo :class:`~osgd_jax.zoo.AnytimeNet` is differentiated by the staged
  Jacobian (:func:`~osgd_jax.staged.staged_value_and_per_exit_grads`,
  about half the backward work) when ``loss_fn`` calls the model exactly
  once, ``model(x)`` on one of ``args`` as passed, and reaches the
  parameters only through that call, as in ``def loss_fn(model, x, y):
  return osgd_jax.per_exit_cross_entropy(model(x), y)``; any other loss
  function gets the vmapped VJP, which gives the same gradients.

  Args:
    loss_fn: function of ``(params, *args)`` (or ``(model, *args)``) whose
      first output is the vector of per-exit losses, in the exits' priority
      order (earliest exit first).
    has_aux: whether ``loss_fn`` returns a pair ``(losses, aux)``.
    staged: for an NNX model only: ``None`` (the default) uses the staged
      Jacobian where it applies, as above; ``True`` requires it (and says
      why it does not apply); ``False`` always uses the vmapped VJP.

  Returns:
    A function of ``(params, *args)`` (or ``(model, *args)``) returning
    ``(losses, grads)``, or ``((losses, aux), grads)`` when ``has_aux``.
    Every leaf of ``grads`` has shape ``(K, *param.shape)``: row k is the
    gradient of ``losses[k]``.

  Raises:
    ValueError: at trace time, if ``loss_fn`` does not return a non-empty 1-D
      floating-point vector, or (with ``has_aux``) not a pair; if ``staged``
      is given for a first argument that is not an ``nnx.Module``, or
      ``staged=True`` and the staged Jacobian does not apply.

  Example:
    >>> import jax.numpy as jnp
    >>> import osgd_jax
    >>> def loss_fn(w, x):
    ...   return jnp.stack([jnp.sum(w * x), jnp.sum((w * x) ** 2)])
    >>> losses, grads = osgd_jax.value_and_per_exit_grads(loss_fn)(
    ...     jnp.ones(3), jnp.arange(3.0))
    >>> grads.shape
    (2, 3)

    With a zoo model, as with ``nnx.value_and_grad`` (and ``nnx.jit``):

    >>> from flax import nnx
    >>> from osgd_jax import zoo
    >>> model = zoo.create("branched-mlp", rngs=nnx.Rngs(0), stages=3)
    >>> def loss_fn(model, x, y):
    ...   return osgd_jax.per_exit_cross_entropy(model(x), y)
    >>> losses, grads = nnx.jit(osgd_jax.value_and_per_exit_grads(loss_fn))(
    ...     model, jnp.ones((4, 64)), jnp.zeros(4, jnp.int32))
    >>> type(grads).__name__, grads["stages"][0]["head"]["linear"][
    ...     "kernel"].shape
    ('State', (3, 64, 10))
  """
  fn_name = getattr(loss_fn, "__name__", "loss_fn")
  if staged not in (None, True, False):
    raise ValueError(f"staged must be None, True or False, got {staged!r}.")

  @functools.wraps(loss_fn)
  def value_and_grads(params, *args):
    if isinstance(params, nnx.Module):
      return module_value_and_derivative(
        loss_fn, params, args, has_aux=has_aux, staged=staged, fn_name=fn_name
      )
    if staged is not None:
      raise ValueError(
        f"staged={staged!r} applies to an nnx.Module, but the first"
        f" argument is a {type(params).__name__}; leave staged out, or use"
        " osgd_jax.staged_value_and_per_exit_grads(graphdef, loss_fn) for"
        " split parameters."
      )

    def pure_fn(p):
      out = loss_fn(p, *args)
      return check_aux_pair(out, fn_name) if has_aux else (out, None)

    losses, aux, grads = _per_exit_rows(pure_fn, params, fn_name)
    return ((losses, aux), grads) if has_aux else (losses, grads)

  return value_and_grads
