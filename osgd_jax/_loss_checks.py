"""Checks of what a per-exit loss function returns.

:func:`osgd_jax.grads.value_and_per_exit_grads` and
:func:`osgd_jax.staged.staged_value_and_per_exit_grads` both check their loss
function's output the same way; the checks live here, below both, so that
``grads`` can hand zoo models to ``staged`` without an import cycle.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

__all__ = ["check_aux_pair", "check_loss_vector"]


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
