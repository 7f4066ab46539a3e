"""JAX's own per-exit gradients: ``jax.vmap`` of the VJP, as a reference.

The library's ``value_and_per_exit_grads`` pulls the K one-hot cotangents
back with ``osgd_jax.exit_pullback``; tests of other paths (the staged
Jacobian) compare against this independent reference instead, which is
also quicker to compile.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def value_and_vmapped_grads(fn: Callable[..., Any]) -> Callable[..., Any]:
  """``((losses, aux), grads)`` of ``fn(params, *args) -> (losses, aux)``.

  The same structure as ``osgd_jax.value_and_per_exit_grads(fn,
  has_aux=True)``: the gradients are stacked on a leading axis K.
  """

  def value_and_grads(params: Any, *args: Any) -> Any:
    losses, vjp_fn, aux = jax.vjp(lambda p: fn(p, *args), params, has_aux=True)
    eye = jnp.eye(losses.shape[0], dtype=losses.dtype)
    (grads,) = jax.vmap(vjp_fn)(eye)
    return (losses, aux), grads

  return value_and_grads
