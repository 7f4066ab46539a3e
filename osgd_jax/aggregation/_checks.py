"""The checks every aggregator's factory runs on its options.

Options are checked when the factory runs, so that a bad one is named before
anything is traced. Under ``optax.inject_hyperparams`` numeric options
arrive as (possibly traced) arrays: those cannot be checked then, and are
not. Shapes that depend on K are checked against ``num_exits``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeGuard, get_args

import jax
import jax.numpy as jnp
import numpy as np

from osgd_jax.aggregation._types import Granularity


def is_checkable_number(x: Any) -> TypeGuard[int | float | np.number]:
  """A Python or NumPy number, which can be checked when the factory runs.

  Example:
    >>> is_checkable_number(0.5), is_checkable_number(True)
    (True, False)
  """
  return isinstance(x, (int, float, np.number)) and not isinstance(x, bool)


def check_choice(value: Any, name: str, owner: str, choices: Any) -> None:
  """Raises a ``ValueError`` unless ``value`` is one of a ``Literal``'s values.

  Example:
    >>> check_choice("leaf", "granularity", "osgd", Granularity)
  """
  allowed = get_args(choices)
  if value not in allowed:
    raise ValueError(
      f"{owner}: {name} must be one of {allowed}, got {value!r}."
    )


def check_granularity(granularity: Any, owner: str) -> None:
  """Raises a ``ValueError`` naming the choices unless ``granularity`` is one.

  Example:
    >>> check_granularity("global", "mgda")
  """
  check_choice(granularity, "granularity", owner, Granularity)


def check_positive_int(value: Any, name: str, owner: str) -> int:
  """Returns ``value`` as an int, or raises a ``ValueError`` naming it.

  Structural settings (K, iteration caps, step counts) must be Python ints:
  they fix shapes or loop lengths when the update is traced. Under
  ``optax.inject_hyperparams`` every number becomes an array unless it is
  listed in ``static_args``, which the message says.

  Example:
    >>> check_positive_int(3, "max_iter", "mgda")
    3
  """
  return _check_int(value, name, owner, minimum=1, wanted="a positive int")


def check_count(value: Any, name: str, owner: str) -> int:
  """Returns ``value`` as an int, or raises unless it is an int ``≥ 0``.

  Example:
    >>> check_count(0, "n_byzantine", "krum")
    0
  """
  return _check_int(value, name, owner, minimum=0, wanted="an int >= 0")


# Counts, caps and step numbers meet the int32 step count or a loop bound
# when the update is traced; a larger Python int overflows there.
INT32_MAX = 2**31 - 1


def _check_int(
  value: Any, name: str, owner: str, *, minimum: int, wanted: str
) -> int:
  if (
    isinstance(value, bool)
    or not isinstance(value, (int, np.integer))
    or not minimum <= value <= INT32_MAX
  ):
    raise ValueError(
      f"{owner}: {name} must be {wanted} (at most 2**31 - 1), got"
      f" {value!r}. Under optax.inject_hyperparams pass"
      f" static_args=({name!r},)."
    )
  return int(value)


def check_seed(seed: Any, owner: str) -> None:
  """Raises a ``ValueError`` unless ``seed`` is an int that seeds a PRNG key.

  ``jax.random.key`` takes integers in the int64 range; an array (injected
  by ``optax.inject_hyperparams``) is left to it.

  Example:
    >>> check_seed(0, "pcgrad")
    >>> check_seed(0.5, "pcgrad")
    Traceback (most recent call last):
    ...
    ValueError: pcgrad: seed must be an int in [-2**63, 2**63 - 1], ...
  """
  if isinstance(seed, jax.Array):
    return
  if (
    isinstance(seed, bool)
    or not isinstance(seed, (int, np.integer))
    or not -(2**63) <= seed <= 2**63 - 1
  ):
    raise ValueError(
      f"{owner}: seed must be an int in [-2**63, 2**63 - 1], got {seed!r};"
      " e.g. seed=0."
    )


def check_flag(value: Any, name: str, owner: str) -> None:
  """Raises a ``ValueError`` unless ``value`` is ``True`` or ``False``.

  A flag fixes which program is traced, so it cannot be an array
  (``optax.inject_hyperparams`` leaves bools static), and a number such as
  NaN would silently read as True.

  Example:
    >>> check_flag(False, "rescale", "osgd")
  """
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f"{owner}: {name} must be True or False, got {value!r}.")


def check_fraction(value: Any, name: str, owner: str) -> None:
  """Raises a ``ValueError`` naming ``value`` unless it lies in ``[0, 1)``.

  Tolerances and decay rates are such fractions.

  Example:
    >>> check_fraction(1e-6, "tol", "osgd")
  """
  if is_checkable_number(value) and not 0 <= value < 1:
    raise ValueError(f"{owner}: {name} must be in [0, 1), got {value!r}.")


def check_unit_interval(value: Any, name: str, owner: str) -> None:
  """Raises a ``ValueError`` naming ``value`` unless it lies in ``[0, 1]``.

  For rates where both ends mean something (an EMA rate of 1 keeps only the
  newest value).

  Example:
    >>> check_unit_interval(1.0, "beta", "gradvac")
  """
  if is_checkable_number(value) and not 0 <= value <= 1:
    raise ValueError(f"{owner}: {name} must be in [0, 1], got {value!r}.")


def check_nonnegative(value: Any, name: str, owner: str) -> None:
  """Raises a ``ValueError`` naming ``value`` unless it is finite and ``≥ 0``.

  For small constants added to denominators, and radii.

  Example:
    >>> check_nonnegative(1e-8, "eps", "gradvac")
  """
  if is_checkable_number(value) and not (np.isfinite(value) and value >= 0):
    raise ValueError(
      f"{owner}: {name} must be a finite number >= 0, got {value!r}."
    )


def check_finite(value: Any, name: str, owner: str) -> None:
  """Raises a ``ValueError`` naming ``value`` unless it is a finite number.

  For learning rates, whose sign is the user's choice.

  Example:
    >>> check_finite(0.1, "learning_rate", "osgd_sgd")
  """
  if is_checkable_number(value) and not np.isfinite(value):
    raise ValueError(
      f"{owner}: {name} must be a finite number, got {value!r}; a"
      " non-finite one makes every update NaN."
    )


def check_positive(value: Any, name: str, owner: str) -> None:
  """Raises a ``ValueError`` naming ``value`` unless it is finite and ``> 0``.

  Example:
    >>> check_positive(0.1, "gamma", "modo")
  """
  if is_checkable_number(value) and not (np.isfinite(value) and value > 0):
    raise ValueError(
      f"{owner}: {name} must be a finite number > 0, got {value!r}."
    )


def check_qp_options(max_iter: Any, tol: Any, owner: str) -> None:
  """Checks a QP solver's ``max_iter`` (an int >= 1) and ``tol`` (in [0, 1)).

  Example:
    >>> check_qp_options(100, 1e-6, "mgda")
  """
  check_positive_int(max_iter, "max_iter", owner)
  check_fraction(tol, "tol", owner)


def check_pref_vector(pref_vector: Any, num_exits: int, owner: str) -> None:
  """Raises a ``ValueError`` unless ``pref_vector`` is None or K finite numbers.

  Example:
    >>> check_pref_vector([0.5, 0.5], 2, "dualproj")
  """
  if pref_vector is None:
    return
  # An array (injected by optax.inject_hyperparams, maybe traced) has a
  # shape to check but perhaps no values.
  finite = isinstance(pref_vector, jax.Array) or np.all(
    np.isfinite(np.asarray(pref_vector, np.float64))
  )
  if np.shape(pref_vector) != (num_exits,) or not finite:
    raise ValueError(
      f"{owner}: pref_vector must be {num_exits} finite numbers (one per"
      f" exit, num_exits={num_exits}), got {pref_vector!r}."
    )


def preference(
  gram: jax.Array, pref_vector: jax.Array | Sequence[float] | None, owner: str
) -> jax.Array:
  """``pref_vector`` as ``(K,)`` in the Gram's dtype; ``None``: ``1/K`` each.

  The check a weighting makes when it is traced, where K is first known.

  Example:
    >>> import jax.numpy as jnp
    >>> preference(jnp.eye(2), None, "dualproj").tolist()
    [0.5, 0.5]
  """
  k = gram.shape[-1]
  if pref_vector is None:
    return jnp.full((k,), 1.0 / k, gram.dtype)
  if np.shape(pref_vector) != (k,):
    raise ValueError(
      f"{owner} got pref_vector of shape {np.shape(pref_vector)}, but the"
      f" gradients have K={k} exits; pass one preference per exit, shape"
      f" ({k},)."
    )
  return jnp.asarray(pref_vector, gram.dtype)


def check_not_num_exits(
  value: Any, name: str, owner: str, num_exits: Any
) -> None:
  """Refuses an int where a factory takes ``name`` before ``num_exits``.

  ``from_weighting``, ``crmogm`` and ``weighted_sum`` take what they apply
  first and K second, and ``osgd_sgd`` takes the learning rate first, as
  ``optax.sgd`` does; ``f(4)`` written for K = 4 must not be misread.

  Raises:
    ValueError: if ``num_exits`` is not given and ``value`` is an int (not
      a bool), saying the order.

  Example:
    >>> check_not_num_exits("sum", "weights", "weighted_sum", None)
    >>> check_not_num_exits(4, "weights", "weighted_sum", None)
    Traceback (most recent call last):
    ...
    ValueError: weighted_sum takes weights first and num_exits second, ...
  """
  if (
    num_exits is None
    and isinstance(value, (int, np.integer))
    and not isinstance(value, bool)
  ):
    raise ValueError(
      f"{owner} takes {name} first and num_exits second, but got"
      f" {name}={value!r}, which looks like a number of exits; write"
      f" {owner}({name}, num_exits=K), e.g. with num_exits={value!r}."
    )


def check_num_exits(num_exits: Any, owner: str) -> int:
  """Returns ``num_exits`` as an int, or raises a ``ValueError`` saying why.

  Every transformation fixes the shapes of its state at ``init``, which has
  only the parameters, so it needs K, the number of exits, up front.

  Example:
    >>> check_num_exits(4, "osgd")
    4
  """
  if num_exits is None:
    raise ValueError(
      f"{owner} needs num_exits=K, the number of exits (the leading axis of"
      " the stacked gradients): its state holds (K,) diagnostics whose"
      " shapes are fixed at init, so that lax.scan over steps and"
      f" restoring a checkpoint onto tx.init(params) work; e.g."
      f" {owner}(num_exits=4)."
    )
  return check_positive_int(num_exits, "num_exits", owner)
