"""The comparison's two phases: tune each optimizer's rate, then test it.

Phase 1 trains every optimizer that has a grid (all but ``sgd-matched``)
at each rate of the grid on the validation split, with the tuning seed, and
picks the rate with the best mean-over-exits validation score: the highest
accuracy, or for a language model the fewest bits per byte
(:mod:`osgd_jax.app.compare.metric`). Phase 2
trains the chosen rate with each seed on the whole training set and scores
it on the test set. ``sgd-matched`` gets OSGD's chosen rate times the
update-norm ratio measured along OSGD's chosen tuning run
(:mod:`osgd_jax.app.compare.matched`). Every run goes through
:func:`~osgd_jax.app.compare.runs.run_once`, so the comparison resumes
where it stopped.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from osgd_jax import anytime
from osgd_jax.app import data as data_lib
from osgd_jax.app.compare import matched, results, variants
from osgd_jax.app.compare.metric import METRICS, Metric, metric_for_dataset
from osgd_jax.app.compare.runs import read_record, run_record
from osgd_jax.app.report import write_json
from osgd_jax.app.train import (
  TrainConfig,
  TrainingDiverged,
  build_model,
  load_data,
)

__all__ = [
  "MAX_SEEDS",
  "TIE_TOLERANCE",
  "TUNING_SEED",
  "Plan",
  "choose_rate",
  "model_costs",
  "run_comparison",
]

#: The seed of every tuning run, outside the evaluation seeds 0..N-1 (N is
#: at most MAX_SEEDS), so no tested run shares its initialisation or data
#: order with the run that chose its rate.
TUNING_SEED = 1000
#: The most seeds a comparison tests.
MAX_SEEDS = 1000
#: Mean scores closer than this are a tie, which the smaller rate wins.
TIE_TOLERANCE = 1e-9
# The TrainConfig fields a comparison sets run by run.
_PER_RUN = (
  "model",
  "optimizer",
  "granularity",
  "method",
  "rescale",
  "switch_to_sgd",
  "lr",
  "seed",
  "validation",
  "out",
  "resume",
)
# sgd-matched's ratio, beside the run it was measured along.
_RATIO_FILE = "ratio.json"


@dataclasses.dataclass(frozen=True)
class Plan:
  """What a comparison trains.

  Attributes:
    base: the settings every run shares; ``out`` is the comparison's
      directory, and ``model``, ``optimizer`` and its options, ``lr``,
      ``seed``, ``validation`` and ``out`` are set per run.
    models: zoo model names.
    optimizers: names from :data:`~osgd_jax.app.compare.variants.VARIANTS`.
    lr_grid: the learning rates phase 1 tries, ascending.
    validation: the fraction of the training set phase 1 validates on.
    seeds: phase 2's seeds.
  """

  base: TrainConfig
  models: tuple[str, ...]
  optimizers: tuple[str, ...]
  lr_grid: tuple[float, ...]
  validation: float
  seeds: tuple[int, ...]

  @property
  def out(self) -> str:
    """The comparison's directory, ``base.out``, which every plan sets."""
    if self.base.out is None:
      raise ValueError(
        "a comparison needs its output directory; pass --out DIR."
      )
    return self.base.out

  @property
  def num_runs(self) -> int:
    """The most runs the plan trains, over phase 1, phase 2 and the ratios.

    Example:
      >>> Plan(TrainConfig(), ("branched-mlp",), ("sgd", "osgd",
      ...      "sgd-matched"), (0.01, 0.1), 0.2, (0, 1, 2)).num_runs
      14
    """
    tuned = sum(variants.is_tuned(o) for o in self.optimizers)
    measured = int(variants.MATCHED in self.optimizers)
    return len(self.models) * (
      tuned * len(self.lr_grid)
      + measured
      + len(self.optimizers) * len(self.seeds)
    )


def choose_rate(
  grid: Sequence[dict[str, Any]], metric: Metric = METRICS["accuracy"]
) -> float | None:
  """The rate of the best mean-over-exits validation score.

  The best is the highest accuracy, or the fewest bits per byte for a
  language model (``metric``). A diverged rate counts as failed; scores
  within :data:`TIE_TOLERANCE` tie, and the smaller rate wins a tie.

  Args:
    grid: one ``{"lr", "status", "val_<metric>"}`` per rate (see
      :func:`run_comparison`), ``None`` for a diverged rate.
    metric: the score to choose by.

  Returns:
    The rate, or ``None`` when every rate diverged.

  Example:
    >>> choose_rate([{"lr": 0.1, "val_accuracy": [0.8, 0.9]},
    ...              {"lr": 0.01, "val_accuracy": [0.9, 0.8]},
    ...              {"lr": 1.0, "val_accuracy": None}])
    0.01
    >>> choose_rate([{"lr": 0.1, "val_bits_per_byte": [3.0, 2.0]},
    ...              {"lr": 0.5, "val_bits_per_byte": [2.5, 2.0]}],
    ...             METRICS["bits_per_byte"])
    0.5
  """
  key = f"val_{metric.name}"
  sign = 1.0 if metric.higher_is_better else -1.0
  scored = [
    (sign * float(np.mean(p[key])), p["lr"]) for p in grid if p[key] is not None
  ]
  if not scored:
    return None
  best = max(score for score, _ in scored)
  return min(lr for score, lr in scored if score >= best - TIE_TOLERANCE)


def model_costs(config: TrainConfig) -> dict[str, Any]:
  """FLOPs and parameters per exit of ``config.model`` on its data.

  Args:
    config: ``model``, ``dataset`` and the preset.

  Returns:
    ``{"flops", "flops_source", "params"}``, as ``osgd-train`` reports them
    (FLOPs of one example in eval mode).

  Example:
    >>> model_costs(TrainConfig(model="branched-mlp"))["params"][0] > 0
    True
  """
  dataset = load_data(config)
  model = build_model(config, dataset)
  model.eval()
  flops = anytime.flops_per_exit(model, (1,) + dataset.input_shape)
  return {
    "flops": flops.flops.tolist(),
    "flops_source": flops.source,
    "params": anytime.params_per_exit(model).tolist(),
  }


class _Progress:
  """Numbers the runs and prints a line before and after each."""

  def __init__(self, total: int, metric: Metric):
    self.total, self.done, self.metric = total, 0, metric

  def run(self, label: str, config: TrainConfig) -> dict[str, Any] | None:
    self.done += 1
    name = f"[{self.done}/{self.total}] {label}"
    print(name, flush=True)  # the run's epochs print below it
    start = time.perf_counter()
    status, record = run_record(config)
    summary = ""
    if record is not None:
      metric = self.metric
      score = record[f"{config.eval_prefix}_{metric.name}"]
      unit = "%" if metric.unit == "%" else f" {metric.unit}"
      summary = (
        f" ({config.evaluated_on}: mean {metric.show(np.mean(score))}{unit},"
        f" last exit {metric.show(score[-1])}{unit})"
      )
    print(
      f"{name}: {status} in {time.perf_counter() - start:.0f} s{summary}",
      flush=True,
    )
    return record


def _scores(
  record: dict[str, Any] | None, prefix: str, metric: Metric
) -> dict[str, Any]:
  """A run's per-exit scores as the results file lists them."""
  names = dict.fromkeys(("accuracy", metric.name))
  return {
    f"{prefix}_{n}": None
    if record is None
    else record[f"{prefix}_{n}"].tolist()
    for n in names
  }


def _lr_dir(lr: float) -> str:
  return f"lr{lr!r}"


def _tune(
  plan: Plan, model: str, name: str, progress: _Progress
) -> list[dict[str, Any]]:
  grid = []
  for lr in plan.lr_grid:
    config = variants.config_for(
      plan.base,
      name,
      model=model,
      lr=lr,
      seed=TUNING_SEED,
      validation=plan.validation,
      out=os.path.join(plan.out, model, name, "tune", _lr_dir(lr)),
    )
    record = progress.run(f"{model}, {name}, tuning lr {lr}", config)
    grid.append(
      {
        "lr": lr,
        "status": "diverged" if record is None else "finished",
        **_scores(record, "val", progress.metric),
      }
    )
  return grid


def _matched_ratio(
  plan: Plan, model: str, osgd_lr: float, progress: _Progress
) -> dict[str, Any] | None:
  """The ratio along OSGD's chosen tuning run, measured once and kept."""
  directory = os.path.join(
    plan.out, model, variants.MATCHED, "measure", _lr_dir(osgd_lr)
  )
  config = variants.config_for(
    plan.base,
    variants.MATCHED_TO,
    model=model,
    lr=osgd_lr,
    seed=TUNING_SEED,
    validation=plan.validation,
    out=directory,
  )
  path = os.path.join(directory, _RATIO_FILE)
  progress.done += 1
  name = (
    f"[{progress.done}/{progress.total}] {model}, {variants.MATCHED}:"
    f" {variants.MATCHED_TO}'s update norm at lr {osgd_lr}"
  )
  print(name, flush=True)
  record = read_record(path, config, required=("ratio",))
  status = "skipped"
  if record is None:
    try:
      record = {
        "config": config.to_json(),
        **matched.measure_update_ratio(config),
      }
    except TrainingDiverged as e:
      record = {"config": config.to_json(), "ratio": None, "reason": str(e)}
    os.makedirs(directory, exist_ok=True)
    write_json(path, record)
    status = "measured"
  ratio = record["ratio"]
  print(
    f"{name}: {status}, ratio "
    f"{'none (diverged)' if ratio is None else f'{ratio:.3f}'}",
    flush=True,
  )
  if ratio is None:
    return None
  measured = {k: v for k, v in record.items() if k != "config"}
  return {
    "to": variants.MATCHED_TO,
    "osgd_lr": osgd_lr,
    **measured,
    "lr": osgd_lr * ratio,
  }


def _test(
  plan: Plan, model: str, name: str, lr: float, progress: _Progress
) -> dict[str, Any]:
  """The test runs' scores, one row per seed (``None``: diverged)."""
  rows: dict[str, list[Any]] = {}
  for seed in plan.seeds:
    config = variants.config_for(
      plan.base,
      name,
      model=model,
      lr=lr,
      seed=seed,
      validation=0.0,
      out=os.path.join(
        plan.out, model, name, "test", _lr_dir(lr), f"seed{seed}"
      ),
    )
    record = progress.run(f"{model}, {name}, lr {lr:.4g}, seed {seed}", config)
    scores = _scores(record, "test", progress.metric)
    if progress.metric.name == "bits_per_byte":  # a language model
      scores["early_exit"] = None if record is None else record["early_exit"]
    for key, value in scores.items():
      rows.setdefault(key, []).append(value)
  return rows


def _settings(plan: Plan) -> dict[str, Any]:
  # The settings every run shares: not those set per run, nor this
  # machine's output directory.
  base = {k: v for k, v in plan.base.to_json().items() if k not in _PER_RUN}
  metric = metric_for_dataset(plan.base.dataset)
  return {
    "base_config": base,
    "dataset": plan.base.dataset,
    "metric": metric.name,
    "epochs": plan.base.epochs,
    "batch_size": plan.base.batch_size,
    "models": list(plan.models),
    "optimizers": list(plan.optimizers),
    "variants": {o: variants.VARIANTS[o] for o in plan.optimizers},
    "lr_grid": list(plan.lr_grid),
    "validation": plan.validation,
    "validation_split_seed": data_lib.VALIDATION_SPLIT_SEED,
    "tuning_seed": TUNING_SEED,
    "seeds": list(plan.seeds),
    "selection": "the grid rate of the best mean-over-exits validation"
    f" {metric.title}; ties (within {TIE_TOLERANCE}) go to the"
    " smaller rate; a diverged rate fails",
    "baseline": variants.BASELINE,
    "matched_to": variants.MATCHED_TO,
    "confidence": results.CONFIDENCE,
  }


def run_comparison(plan: Plan) -> dict[str, Any]:
  """Runs both phases for every model and optimizer.

  Args:
    plan: what to train; ``plan.out`` holds one directory per run:
      ``<model>/<optimizer>/tune/lr<rate>`` and
      ``<model>/<optimizer>/test/lr<rate>/seed<seed>``, and sgd-matched's
      measurement in ``<model>/sgd-matched/measure/lr<osgd's rate>``. A
      run is named by its rate, so a wider grid or a new choice adds runs
      and reuses the others.

  Returns:
    The results, as :mod:`osgd_jax.app.compare.results` describes them.

  Raises:
    ValueError: a bad setting, or a directory holding runs of other
      settings.
    KeyboardInterrupt: Ctrl-C; finished runs are kept.

  Example:
    >>> plan = Plan(TrainConfig(model="branched-mlp", epochs=1,
    ...                         out="/tmp/cmp"), ("branched-mlp",),
    ...             ("sgd", "osgd"), (0.05,), 0.2, (0, 1))
    >>> payload = run_comparison(plan)  # doctest: +SKIP
  """
  metric = metric_for_dataset(plan.base.dataset)
  progress = _Progress(plan.num_runs, metric)
  payload: dict[str, Any] = {
    "format": results.FORMAT,
    "version": results.VERSION,
    "settings": _settings(plan),
    "models": {},
  }
  for model in plan.models:
    entry: dict[str, Any] = {"matched": None, "optimizers": {}}
    for name in plan.optimizers:
      if variants.is_tuned(name):
        grid = _tune(plan, model, name, progress)
        entry["optimizers"][name] = {
          "fields": variants.VARIANTS[name],
          "lr_source": "tuned",
          "grid": grid,
          "chosen_lr": choose_rate(grid, metric),
        }
    if variants.MATCHED in plan.optimizers:
      osgd_lr = entry["optimizers"][variants.MATCHED_TO]["chosen_lr"]
      if osgd_lr is not None:
        entry["matched"] = _matched_ratio(plan, model, osgd_lr, progress)
      else:
        progress.done += 1  # nothing to measure
      entry["optimizers"][variants.MATCHED] = {
        "fields": variants.VARIANTS[variants.MATCHED],
        "lr_source": "matched",
        "grid": [],
        "chosen_lr": (
          None if entry["matched"] is None else entry["matched"]["lr"]
        ),
      }
    for name in plan.optimizers:
      result = entry["optimizers"][name]
      lr = result["chosen_lr"]
      if lr is None:
        why = (
          "every grid rate diverged"
          if result["grid"]
          else f"{variants.MATCHED_TO} has no rate, or its measured run"
          " diverged"
        )
        print(
          f"{model}, {name}: no learning rate to test ({why}); its test"
          " runs are left out.",
          flush=True,
        )
        progress.done += len(plan.seeds)
        result.update(dict.fromkeys(_scores(None, "test", metric)))
        continue
      result.update(_test(plan, model, name, lr, progress))
    payload["models"][model] = {
      **model_costs(dataclasses.replace(plan.base, model=model)),
      "matched": entry["matched"],
      "optimizers": {o: entry["optimizers"][o] for o in plan.optimizers},
    }
  return payload
