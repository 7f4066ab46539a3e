"""The comparison's results file, ``results.json``: its layout and reading.

Everything a report needs is in one JSON object, so that the report (and
the README's tables) can be made again from the file alone::

  {
    "format": "osgd-compare results", "version": 1,
    "settings": {
      "base_config": {...},       # the TrainConfig fields all runs share
      "dataset", "metric": "accuracy" | "bits_per_byte",
      "epochs", "batch_size",
      "models": [...], "optimizers": [...],
      "variants": {name: {TrainConfig field: value}},
      "lr_grid": [...], "validation": 0.2, "validation_split_seed": 0,
      "tuning_seed": 1000, "seeds": [0, 1, ...], "selection": "...",
      "baseline": "sgd", "matched_to": "osgd", "confidence": 0.95
    },
    "models": {
      model: {
        "flops": [K], "flops_source": "xla", "params": [K],
        "matched": null | {"to": "osgd", "osgd_lr", "ratio",
                           "epoch_ratios": [...], "first_step_ratio",
                           "steps", "lr"},
        "optimizers": {
          name: {
            "fields": {...}, "lr_source": "tuned" | "matched",
            "grid": [{"lr", "status": "finished" | "diverged",
                      "val_accuracy": [K] | null,
                      "val_bits_per_byte": [K] | null}],  # text only
            "chosen_lr": rate | null,
            "test_accuracy": null | [[K] | null],  # one row per seed
            "test_bits_per_byte": null | [[K] | null],  # text only
            "early_exit": [curve | null]  # text only, one per seed
          }
        }
      }
    }
  }

Accuracies are fractions in [0, 1]; ``null`` marks a diverged run (a
``test_accuracy`` of ``null`` as a whole: no rate to test). ``metric``
names the score the rates were chosen by and the tables show
(:mod:`osgd_jax.app.compare.metric`; a file without it is scored by
accuracy): a language model's (``--dataset text``) is its bits per byte,
and each of its test runs also records its token-level early-exit curve,
as the run's ``metrics.json`` has it (``threshold``, ``mean_exit``,
``mean_flops``, ``bits_per_byte``, ``accuracy``, ``exit_counts``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from osgd_jax.app.compare.metric import metric_of

__all__ = [
  "CONFIDENCE",
  "EXAMPLE",
  "FORMAT",
  "VERSION",
  "accuracy_rows",
  "load_results",
]

#: The ``"format"`` entry that marks a results file.
FORMAT = "osgd-compare results"
#: The version of the file's layout that this code reads and writes.
VERSION = 1
#: The confidence level of the paired differences' intervals.
CONFIDENCE = 0.95

#: A small hand-made results object in this layout, for the examples (one
#: model with 2 exits, 2 seeds, a 2-rate grid, sgd, osgd and sgd-matched).
EXAMPLE: dict[str, Any] = {
  "format": FORMAT,
  "version": VERSION,
  "settings": {
    "base_config": {
      "schedule": "cosine",
      "momentum": 0.9,
      "weight_decay": 0.0005,
    },
    "dataset": "digits",
    "epochs": 1,
    "batch_size": 256,
    "models": ["branched-mlp"],
    "optimizers": ["sgd", "osgd", "sgd-matched"],
    "variants": {
      "sgd": {"optimizer": "sgd"},
      "osgd": {"optimizer": "osgd"},
      "sgd-matched": {"optimizer": "sgd"},
    },
    "lr_grid": [0.01, 0.1],
    "validation": 0.2,
    "validation_split_seed": 0,
    "tuning_seed": 1000,
    "seeds": [0, 1],
    "selection": "best mean-over-exits validation accuracy",
    "baseline": "sgd",
    "matched_to": "osgd",
    "confidence": CONFIDENCE,
  },
  "models": {
    "branched-mlp": {
      "flops": [1000.0, 2000.0],
      "flops_source": "xla",
      "params": [100, 200],
      "matched": {
        "to": "osgd",
        "osgd_lr": 0.01,
        "ratio": 0.562,
        "epoch_ratios": [0.871, 0.498],
        "first_step_ratio": 1.002,
        "steps": 10,
        "lr": 0.00562,
      },
      "optimizers": {
        "sgd": {
          "fields": {"optimizer": "sgd"},
          "lr_source": "tuned",
          "grid": [
            {"lr": 0.01, "status": "finished", "val_accuracy": [0.6, 0.7]},
            {"lr": 0.1, "status": "finished", "val_accuracy": [0.7, 0.8]},
          ],
          "chosen_lr": 0.1,
          "test_accuracy": [[0.5, 0.7], [0.7, 0.9]],
        },
        "osgd": {
          "fields": {"optimizer": "osgd"},
          "lr_source": "tuned",
          "grid": [
            {"lr": 0.01, "status": "finished", "val_accuracy": [0.7, 0.9]},
            {"lr": 0.1, "status": "diverged", "val_accuracy": None},
          ],
          "chosen_lr": 0.01,
          "test_accuracy": [[0.6, 0.8], [0.7, 1.0]],
        },
        "sgd-matched": {
          "fields": {"optimizer": "sgd"},
          "lr_source": "matched",
          "grid": [],
          "chosen_lr": 0.00562,
          "test_accuracy": [[0.5, 0.8], None],
        },
      },
    }
  },
}

_ADVICE = "pass the results.json that osgd-compare wrote in its --out"


def load_results(path: str) -> dict[str, Any]:
  """Reads and checks a results file.

  Args:
    path: a ``results.json``.

  Returns:
    Its contents.

  Raises:
    ValueError: it is missing, not JSON, or not a results file of this
      version; one line that says so.

  Example:
    >>> import textwrap
    >>> try:
    ...   load_results("/nonexistent/results.json")
    ... except ValueError as e:
    ...   print(textwrap.fill(str(e), 72))
    --report /nonexistent/results.json does not exist; pass the results.json
    that osgd-compare wrote in its --out.
  """
  if not os.path.isfile(path):
    raise ValueError(f"--report {path} does not exist; {_ADVICE}.")
  try:
    with open(path) as f:
      payload = json.load(f)
  except (OSError, ValueError) as e:
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise ValueError(
      f"--report {path} cannot be read as JSON ({reason}); {_ADVICE}."
    ) from None
  if not isinstance(payload, dict) or payload.get("format") != FORMAT:
    raise ValueError(
      f"--report {path} is not an osgd-compare results file; {_ADVICE}."
    )
  if payload.get("version") != VERSION:
    raise ValueError(
      f"--report {path} is a results file of version"
      f" {payload.get('version')!r}, and this osgd-compare reads version"
      f" {VERSION}; report it with the osgd-compare that wrote it (a"
      " newer one: upgrade osgd-jax)."
    )
  try:
    settings, models = payload["settings"], payload["models"]
    for key in ("models", "optimizers", "lr_grid", "seeds", "baseline"):
      settings[key]  # pylint: disable=pointless-statement
    scores = f"test_{metric_of(payload).name}"
    for entry in models.values():
      for key in ("flops", "params"):
        entry[key]  # pylint: disable=pointless-statement
      for result in entry["optimizers"].values():
        for key in ("grid", "chosen_lr", "test_accuracy", scores):
          result[key]  # pylint: disable=pointless-statement
  except (KeyError, TypeError, AttributeError) as e:
    raise ValueError(
      f"--report {path} lacks {e} of a results file; {_ADVICE}."
    ) from None
  except ValueError as e:  # an unknown metric
    raise ValueError(f"--report {path}: {e}") from None
  return payload


def accuracy_rows(
  rows: Sequence[Sequence[float] | None] | None, num_exits: int
) -> np.ndarray:
  """Accuracy rows as a float64 array, NaN for a diverged (``null``) row.

  Args:
    rows: a ``test_accuracy`` or the ``val_accuracy`` of a grid, one row
      per run; ``None`` for none.
    num_exits: K, the width of a ``null`` row.

  Returns:
    An array ``(len(rows), K)``; ``(0, K)`` for ``None``.

  Example:
    >>> accuracy_rows([[0.5, 0.75], None], 2).tolist()
    [[0.5, 0.75], [nan, nan]]
  """
  rows = rows or []
  return np.array(
    [[np.nan] * num_exits if r is None else r for r in rows], dtype=np.float64
  ).reshape(len(rows), num_exits)
