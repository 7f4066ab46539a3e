"""Per-exit losses: stacked ``(K, batch, classes)`` logits to a ``(K,)`` vector.

The zoo models return the logits of all exits stacked on a leading axis;
:func:`osgd_jax.value_and_per_exit_grads` wants a loss function returning one
loss per exit. :func:`per_exit_cross_entropy` connects the two.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

__all__ = ["per_exit_cross_entropy"]


def per_exit_cross_entropy(
  logits: jax.Array,
  labels: jax.Array,
  weights: Any | None = None,
) -> jax.Array:
  """Mean softmax cross-entropy of every exit.

  Args:
    logits: stacked exit logits, shape ``(K, batch, classes)``, or ``(K,
      batch, seq, classes)`` for a causal transformer's logits per position
      (any axes between the batch and the classes).
    labels: integer class labels, shape ``(batch,)`` (``(batch, seq)``:
      one per position).
    weights: optional per-exit loss weights, shape ``(K,)``; exit k's loss
      is multiplied by ``weights[k]``.

  Returns:
    The ``(K,)`` vector of (weighted) mean cross-entropies (over the batch
    and every position), exit 1 first, in
    the logits' floating dtype (at least float32).

  Raises:
    ValueError: if the shapes or dtypes do not fit (checked at trace time).

  Example:
    >>> import jax.numpy as jnp
    >>> logits = jnp.zeros((3, 4, 10))
    >>> per_exit_cross_entropy(logits, jnp.array([0, 1, 2, 3])).shape
    (3,)
  """
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  if logits.ndim < 3:
    raise ValueError(
      "logits must have shape (K, batch, classes) (exits stacked first, as"
      f" the zoo models return them), got shape {tuple(logits.shape)}. For"
      " one exit, add the leading axis with `logits[None]`."
    )
  k, batch = logits.shape[:2]
  if not jnp.issubdtype(logits.dtype, jnp.floating):
    raise ValueError(
      f"logits must be floating point, got dtype {logits.dtype}."
    )
  expected = tuple(logits.shape[1:-1])
  if labels.shape != expected:
    axes = "(batch,)" if len(expected) == 1 else "(batch, seq, ...)"
    raise ValueError(
      f"labels must be integer class indices of shape {axes} ="
      f" {expected} to match logits of shape {tuple(logits.shape)}, got"
      f" shape {tuple(labels.shape)}. Pass class indices, not one-hot"
      " vectors."
    )
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(
      f"labels must be integer class indices, got dtype {labels.dtype};"
      " cast them with `.astype(jnp.int32)`."
    )
  dtype = jnp.promote_types(logits.dtype, jnp.float32)
  losses = optax.softmax_cross_entropy_with_integer_labels(
    logits.astype(dtype), jnp.broadcast_to(labels, (k, *expected))
  )
  # The mean over the batch and, for sequence logits, every position.
  losses = losses.reshape(k, -1).mean(axis=-1)
  if weights is None:
    return losses
  weights = jnp.asarray(weights)
  if weights.shape != (k,):
    raise ValueError(
      f"weights must have shape (K,) = ({k},), one per exit, got shape"
      f" {tuple(weights.shape)}."
    )
  return losses * weights.astype(dtype)
