"""Per-exit gradients: the rows of the Jacobian of an anytime network's losses.

An anytime network with K exits has a loss *vector* ``(l_1, ..., l_K)``. OSGD
needs the gradient of every component separately, i.e. the rows of the
Jacobian of that vector with respect to the parameters.

:func:`value_and_per_exit_grads` computes them for any
``loss_fn(params, *args)``. Reverse mode gives row k as the VJP with the
one-hot cotangent ``e_k``; vmapping the VJP over the rows of the identity
computes all K rows from a single forward pass, with the K backward passes
batched by XLA. Each of those passes runs through the whole network; for a
zoo :class:`~osgd_jax.zoo.AnytimeNet`,
:func:`~osgd_jax.staged.staged_value_and_per_exit_grads` runs exit k's only
through the stages that exit reads.

The checks of what a loss function returns, which both share, are here too:
:func:`check_loss_vector` and :func:`check_aux_pair`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["check_aux_pair", "check_loss_vector", "value_and_per_exit_grads"]


def check_loss_vector(losses: Any, fn_name: str) -> None:
  """Raises unless ``losses`` is a non-empty 1-D floating-point vector.

  Args:
    losses: what a loss function returned as its per-exit losses: an array
      or anything with ``shape`` and ``dtype`` (e.g. a
      ``jax.ShapeDtypeStruct``).
    fn_name: the loss function's name, for the error message.

  Raises:
    ValueError: if ``losses`` has no shape or dtype, is not 1-D, is empty, or
      is not floating-point; the message says how to fix the loss function.

  Example:
    >>> import jax.numpy as jnp
    >>> from osgd_jax import grads
    >>> grads.check_loss_vector(jnp.zeros(3), "loss_fn")  # fine: returns None
    >>> grads.check_loss_vector(jnp.zeros(()), "loss_fn")
    Traceback (most recent call last):
    ...
    ValueError: loss_fn must return a 1-D vector ... returned shape (). ...
  """
  shape = getattr(losses, "shape", None)
  dtype = getattr(losses, "dtype", None)
  if shape is None or dtype is None:
    raise ValueError(
      f"{fn_name} must return a 1-D array of per-exit losses with shape (K,),"
      f" but it returned a {type(losses).__name__}. Stack the exit losses,"
      " e.g. `return jnp.stack([loss_1, ..., loss_K])`, and pass"
      " `has_aux=True` if it also returns auxiliary data as `(losses, aux)`."
    )
  if len(shape) != 1:
    hint = (
      " For a single scalar loss use `jax.value_and_grad` instead."
      if len(shape) == 0
      else " Reduce over the batch (e.g. `.mean(axis=-1)`) so one loss per"
      " exit remains."
    )
    raise ValueError(
      f"{fn_name} must return a 1-D vector of per-exit losses with shape"
      f" (K,), but it returned shape {tuple(shape)}.{hint}"
    )
  if shape[0] == 0:
    raise ValueError(
      f"{fn_name} returned an empty loss vector (K=0); an anytime network"
      " needs at least one exit."
    )
  if not jnp.issubdtype(dtype, jnp.inexact):
    raise ValueError(
      f"{fn_name} must return floating-point losses, got dtype {dtype}."
      " Cast them with `.astype(jnp.float32)`."
    )


def check_aux_pair(out: Any, fn_name: str) -> tuple[Any, Any]:
  """Returns ``out``, a loss function's ``(losses, aux)``, or raises.

  Args:
    out: what a loss function called with ``has_aux=True`` returned.
    fn_name: the loss function's name, for the error message.

  Returns:
    ``out`` itself, once it is known to be a pair.

  Raises:
    ValueError: if ``out`` is not a tuple of two elements.

  Example:
    >>> import jax.numpy as jnp
    >>> from osgd_jax import grads
    >>> losses, aux = grads.check_aux_pair((jnp.zeros(2), {}), "loss_fn")
    >>> grads.check_aux_pair([jnp.zeros(2), {}], "loss_fn")
    Traceback (most recent call last):
    ...
    ValueError: With has_aux=True, loss_fn must return a pair ... returned list.
  """
  if not (isinstance(out, tuple) and len(out) == 2):
    raise ValueError(
      f"With has_aux=True, {fn_name} must return a pair (losses, aux),"
      f" but it returned {type(out).__name__}."
    )
  return out


def value_and_per_exit_grads(
  loss_fn: Callable[..., Any],
  has_aux: bool = False,
) -> Callable[..., tuple[Any, Any]]:
  """Creates a function returning the exit losses and their stacked gradients.

  ``loss_fn(params, *args)`` must return a ``(K,)`` vector of exit losses (or
  ``(losses, aux)`` with ``has_aux=True``). The returned function evaluates
  ``loss_fn`` once and computes the K gradients with a ``jax.vmap`` of the VJP
  over the rows of the K×K identity, not with K separate ``jax.grad`` calls.

  Args:
    loss_fn: function of ``(params, *args)`` whose first output is the vector
      of per-exit losses, in the exits' priority order (earliest exit first).
    has_aux: whether ``loss_fn`` returns a pair ``(losses, aux)``.

  Returns:
    A function of ``(params, *args)`` returning ``(losses, grads)``, or
    ``((losses, aux), grads)`` when ``has_aux``. Every leaf of ``grads`` has
    shape ``(K, *param.shape)``: row k is the gradient of ``losses[k]``.

  Raises:
    ValueError: at trace time, if ``loss_fn`` does not return a non-empty 1-D
      floating-point vector, or (with ``has_aux``) not a pair.

  Example:
    >>> import jax.numpy as jnp
    >>> import osgd_jax
    >>> def loss_fn(w, x):
    ...   return jnp.stack([jnp.sum(w * x), jnp.sum((w * x) ** 2)])
    >>> losses, grads = osgd_jax.value_and_per_exit_grads(loss_fn)(
    ...     jnp.ones(3), jnp.arange(3.0))
    >>> grads.shape
    (2, 3)
  """
  fn_name = getattr(loss_fn, "__name__", "loss_fn")

  @functools.wraps(loss_fn)
  def value_and_grads(params, *args):
    if has_aux:
      # Checked inside the one trace that jax.vjp makes of loss_fn.
      losses, vjp_fn, aux = jax.vjp(
        lambda p: check_aux_pair(loss_fn(p, *args), fn_name),
        params,
        has_aux=True,
      )
    else:
      losses, vjp_fn = jax.vjp(lambda p: loss_fn(p, *args), params)
    check_loss_vector(losses, fn_name)
    cotangents = jnp.eye(losses.shape[0], dtype=losses.dtype)
    (grads,) = jax.vmap(vjp_fn)(cotangents)
    if has_aux:
      return (losses, aux), grads
    return losses, grads

  return value_and_grads
