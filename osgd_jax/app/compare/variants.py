"""The optimizers a comparison trains, by name, and the settings each sets.

A comparison's optimizer name is one of ``osgd_jax.app.train.OPTIMIZERS``
(the optimizer with its defaults), a variant of OSGD with one of the
options the paper leaves open, or the matched-step control
:data:`MATCHED`. :data:`VARIANTS` is the one table from a name to the
:class:`~osgd_jax.app.train.TrainConfig` fields it sets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from osgd_jax.app.train import OPTIMIZERS, TrainConfig

__all__ = [
  "BASELINE",
  "MATCHED",
  "MATCHED_TO",
  "VARIANTS",
  "check_names",
  "config_for",
  "is_tuned",
]

#: The summed-loss baseline every optimizer is paired with.
BASELINE = "sgd"
#: Plain summed-loss SGD whose learning rate is MATCHED_TO's tuned rate
#: times the measured ratio of the two optimizers' update norms
#: (osgd_jax.app.compare.matched); it has no rate grid of its own.
MATCHED = "sgd-matched"
#: The optimizer whose update size MATCHED is matched to.
MATCHED_TO = "osgd"

#: Every name ``--optimizers`` takes, and the run settings it stands for.
VARIANTS: dict[str, dict[str, Any]] = {
  **{name: {"optimizer": name} for name in OPTIMIZERS},
  "osgd-global": {"optimizer": "osgd", "granularity": "global"},
  "osgd-rescale": {"optimizer": "osgd", "rescale": True},
  "osgd-switch": {"optimizer": "osgd", "switch_to_sgd": 0.8},
  MATCHED: {"optimizer": "sgd"},
}


def is_tuned(name: str) -> bool:
  """Whether ``name``'s learning rate is chosen on the grid (all but MATCHED).

  Example:
    >>> is_tuned("osgd-global"), is_tuned(MATCHED)
    (True, False)
  """
  return name != MATCHED


def check_names(names: Sequence[str]) -> None:
  """Checks a comparison's optimizer names.

  Args:
    names: the ``--optimizers``.

  Raises:
    ValueError: an unknown or repeated name, or :data:`MATCHED` without
      :data:`MATCHED_TO`, whose tuned rate it needs; one line that says
      what to change.

  Example:
    >>> check_names(["sgd", "osgd", "osgd-rescale"])
  """
  for name in names:
    if name not in VARIANTS:
      raise ValueError(
        f"unknown optimizer {name!r} in --optimizers; choose"
        f" from: {', '.join(VARIANTS)}."
      )
  repeated = sorted({n for n in names if list(names).count(n) > 1})
  if repeated:
    raise ValueError(
      f"--optimizers names {', '.join(repeated)} more than"
      " once; give each name once."
    )
  if MATCHED in names and MATCHED_TO not in names:
    raise ValueError(
      f"{MATCHED} takes its learning rate from {MATCHED_TO}'s"
      f" tuned rate; add {MATCHED_TO} to --optimizers."
    )


def config_for(base: TrainConfig, name: str, **fields: Any) -> TrainConfig:
  """``base`` with the fields of optimizer ``name`` and the given ones.

  Args:
    base: the comparison's shared settings.
    name: a key of :data:`VARIANTS`.
    **fields: further fields, such as ``lr``, ``seed`` and ``out``.

  Returns:
    The run's configuration.

  Example:
    >>> config = config_for(TrainConfig(), "osgd-global", lr=0.1)
    >>> config.optimizer, config.granularity, config.lr
    ('osgd', 'global', 0.1)
  """
  return dataclasses.replace(base, **VARIANTS[name], **fields)
