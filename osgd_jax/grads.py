"""Per-exit gradients: one forward pass, a ``vmap`` of the VJP over the exits.

An anytime network with K exits has a loss *vector* ``(l_1, ..., l_K)``. OSGD
needs the gradient of every component separately, i.e. the rows of the Jacobian
of that vector with respect to the parameters. Reverse mode gives row k as the
VJP with the one-hot cotangent ``e_k``; vmapping the VJP over the rows of the
identity computes all K rows from a single forward pass, with the backward
passes batched by XLA.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

__all__ = ["value_and_per_exit_grads"]


def _check_loss_vector(losses: Any, fn_name: str) -> None:
  """Raises a ``ValueError`` unless ``losses`` is a non-empty 1-D float vector."""
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
      floating-point vector.

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
    closed = lambda p: loss_fn(p, *args)
    if has_aux:
      def checked(p):
        # Checked inside the one trace that jax.vjp makes of loss_fn.
        out = closed(p)
        if not (isinstance(out, tuple) and len(out) == 2):
          raise ValueError(
              f"With has_aux=True, {fn_name} must return a pair (losses, aux),"
              f" but it returned {type(out).__name__}."
          )
        return out
      losses, vjp_fn, aux = jax.vjp(checked, params, has_aux=True)
    else:
      losses, vjp_fn = jax.vjp(closed, params)
    _check_loss_vector(losses, fn_name)
    cotangents = jnp.eye(losses.shape[0], dtype=losses.dtype)
    (grads,) = jax.vmap(vjp_fn)(cotangents)
    if has_aux:
      return (losses, aux), grads
    return losses, grads

  return value_and_grads
