"""The one registry of aggregators by name, for the CLI, configs and sweeps.

Every method module registers its transformation here under one name (and
the weighted sum its presets, one name each), with the pure weighting of
the Gram matrix it uses, where it has one, so that a smoothing such as
CR-MOGM can take any of them by name. :func:`names` and :func:`create`
mirror :func:`osgd_jax.zoo.names` and :func:`osgd_jax.zoo.create`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import optax

from osgd_jax.aggregation._types import Weighting


class _Entry(NamedTuple):
  factory: Callable[..., optax.GradientTransformationExtraArgs]
  fixed: dict[str, Any]
  weighting: Weighting | None


_ENTRIES: dict[str, _Entry] = {}


def register(
  name: str,
  factory: Callable[..., optax.GradientTransformationExtraArgs],
  *,
  weighting: Weighting | None = None,
  **fixed: Any,
) -> None:
  """Registers ``factory(**fixed, num_exits=K, **options)`` under ``name``.

  Args:
    name: the registry name, lower case with dashes.
    factory: the transformation's factory; it takes ``num_exits``.
    weighting: the pure weighting of the Gram matrix the transformation
      applies with its defaults, if it is one.
    **fixed: options the name fixes (a weighted sum's preset).
  """
  if name in _ENTRIES:
    raise ValueError(f"the aggregator name {name!r} is registered twice.")
  _ENTRIES[name] = _Entry(factory, fixed, weighting)


def names() -> tuple[str, ...]:
  """The names :func:`create` takes, sorted.

  Example:
    >>> import osgd_jax
    >>> "osgd" in osgd_jax.aggregation.names()
    True
  """
  return tuple(sorted(_ENTRIES))


def _entry(name: Any) -> _Entry:
  if name not in _ENTRIES:
    raise ValueError(
      f"unknown aggregator {name!r}; choose one of {', '.join(names())}."
    )
  return _ENTRIES[name]


def options(name: str) -> tuple[str, ...]:
  """The keyword options :func:`create` passes on for ``name``.

  The factory's parameters, less ``num_exits`` and those the name fixes.

  Example:
    >>> import osgd_jax
    >>> "seed" in osgd_jax.aggregation.options("pcgrad")
    True
  """
  entry = _entry(name)
  parameters = inspect.signature(entry.factory).parameters
  return tuple(
    p for p in parameters if p != "num_exits" and p not in entry.fixed
  )


def create(
  name: str, *, num_exits: int, **kwargs: Any
) -> optax.GradientTransformationExtraArgs:
  """The aggregator ``name`` for K exits, with its defaults or ``kwargs``.

  Args:
    name: one of :func:`names`: a method (``"osgd"``, ``"upgrad"``, ...) or
      a weighted-sum preset (``"sum"``, ``"linear"``, ...).
    num_exits: K.
    **kwargs: options of the method's factory (:func:`options`).

  Returns:
    The Optax transformation of stacked per-exit gradients.

  Raises:
    ValueError: an unknown name or option, naming the valid ones; or a bad
      option value, as the factory raises it.

  Example:
    >>> import osgd_jax
    >>> tx = osgd_jax.aggregation.create("pcgrad", num_exits=3, seed=1)
  """
  entry = _entry(name)
  unknown = sorted(set(kwargs) - set(options(name)))
  if unknown:
    raise ValueError(
      f"aggregator {name!r} takes no option {', '.join(unknown)}; its"
      f" options are {', '.join(options(name)) or 'none'}."
    )
  return entry.factory(**entry.fixed, num_exits=num_exits, **kwargs)


def weighting_names() -> tuple[str, ...]:
  """The names whose transformation is a pure weighting of the Gram matrix.

  Example:
    >>> import osgd_jax
    >>> "mgda" in osgd_jax.aggregation.weighting_names()
    True
  """
  return tuple(n for n in names() if _ENTRIES[n].weighting is not None)


def weighting(name: str) -> Weighting:
  """The pure weighting of the Gram matrix registered as ``name``.

  Raises:
    ValueError: ``name`` has none, naming those that do.

  Example:
    >>> import jax.numpy as jnp, osgd_jax
    >>> osgd_jax.aggregation.weighting("mean")(jnp.eye(2)).tolist()
    [0.5, 0.5]
  """
  found = _ENTRIES.get(name)
  if found is None or found.weighting is None:
    raise ValueError(
      f"unknown weighting {name!r}: name an aggregator that is a weighting"
      f" of the Gram matrix alone ({', '.join(weighting_names())}), or"
      " pass a function"
      " (K, K) -> (K,) or an osgd_jax.aggregation.StatefulWeighting."
    )
  return found.weighting
