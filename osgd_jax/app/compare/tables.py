"""The comparison's Markdown: settings, accuracy, paired differences, grid.

Each function takes the results (:mod:`osgd_jax.app.compare.results`) and
returns Markdown; :func:`render_markdown` puts them together, and the same
text goes into the report and between the README's markers. The tables
show the comparison's metric (:mod:`osgd_jax.app.compare.metric`):
accuracies in percent and their differences in percentage points, or a
language model's bits per byte (lower is better) and their differences in
bits per byte.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from osgd_jax.app.compare import results as results_lib
from osgd_jax.app.compare import stats
from osgd_jax.app.compare.metric import Metric, metric_of

__all__ = [
  "EARLY_EXIT_SHOWN",
  "accuracy_table",
  "difference_table",
  "early_exit_table",
  "edge_note",
  "matched_table",
  "paired_differences",
  "render_markdown",
  "robustness_table",
  "settings_text",
]


def _num_exits(entry: dict[str, Any]) -> int:
  return len(entry["flops"])


def _header(first: list[str], num_exits: int, last: list[str]) -> list[str]:
  columns = first + [f"exit {k}" for k in range(1, num_exits + 1)] + last
  return ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]


def _max_exits(payload: dict[str, Any]) -> int:
  return max((_num_exits(e) for e in payload["models"].values()), default=0)


def _pad(cells: list[str], width: int) -> list[str]:
  return cells + ["—"] * (width - len(cells))


def _rows(result: dict[str, Any], num_exits: int, metric: Metric) -> np.ndarray:
  return results_lib.accuracy_rows(result.get(f"test_{metric.name}"), num_exits)


def _rate(lr: float | None) -> str:
  return "—" if lr is None else f"{lr:.3g}"


def _seed_range(seeds: list[int]) -> str:
  if seeds == list(range(len(seeds))) and len(seeds) > 1:
    return f"seeds 0–{len(seeds) - 1}"
  return (
    "seed" + ("s " if len(seeds) != 1 else " ") + ", ".join(map(str, seeds))
  )


def settings_text(payload: dict[str, Any]) -> str:
  """The method in a paragraph: data, training, tuning, seeds.

  Args:
    payload: the results.

  Returns:
    Markdown text.

  Example:
    >>> print(*settings_text(results_lib.EXAMPLE).split(";")[0].split(", "),
    ...       sep="\\n")
    `osgd-compare` on digits
    1 epoch
    batch 256
    cosine schedule
    momentum 0.9
    weight decay 0.0005
  """
  s = payload["settings"]
  base = s["base_config"]
  metric = metric_of(payload)
  grid = ", ".join(f"{lr:g}" for lr in s["lr_grid"])
  preset = base.get("preset")
  data = s["dataset"] + ("" if preset is None else f" (preset {preset})")
  if s["dataset"] == "text":  # next-byte windows in the text's order
    split = (
      f" of the training text and validating on its last"
      f" {100 * s['validation']:g}% (its tail, not a sample of windows;"
    )
  else:
    split = (
      f" of the training set and validating on the other"
      f" {100 * s['validation']:g}% (stratified, split seed"
      f" {s['validation_split_seed']};"
    )
  matched = (
    " `sgd-matched` is summed-loss SGD at"
    f" `{s['matched_to']}`'s chosen rate times the ratio of"
    f" `{s['matched_to']}`'s mean update norm to the summed gradient's"
    " along its tuning run."
    if "sgd-matched" in s["optimizers"]
    else ""
  )
  return (
    f"`osgd-compare` on {data}, {s['epochs']}"
    f" epoch{'s' * (s['epochs'] != 1)}, batch"
    f" {s['batch_size']}, {base['schedule']} schedule, momentum"
    f" {base['momentum']}, weight decay {base['weight_decay']}; `sgd` is"
    " the gradient of the summed exit losses. Each optimizer's peak"
    f" learning rate was chosen from {{{grid}}} by the mean over exits of"
    f" the validation {metric.title}, training on"
    f" {100 * (1 - s['validation']):g}%{split} tuning seed"
    f" {s['tuning_seed']}; ties"
    " go to the smaller rate). The chosen rate was then trained on the"
    f" whole training set with {_seed_range(s['seeds'])} and scored on"
    f" the test set.{matched}"
  )


def accuracy_table(payload: dict[str, Any]) -> str:
  """Test score per exit and its mean over exits, mean ± std over seeds.

  The score is the comparison's metric: accuracy (in percent), or a
  language model's bits per byte.

  Args:
    payload: the results.

  Returns:
    A Markdown table: one row per (model, optimizer) with its learning
    rate; an optimizer with diverged runs says how many, over the others.

  Example:
    >>> print(accuracy_table(results_lib.EXAMPLE).splitlines()[2])
    | branched-mlp | sgd | 0.1 | 60.0 ± 14.1 | 80.0 ± 14.1 | 70.0 ± 14.1 |
  """
  width = _max_exits(payload)
  metric = metric_of(payload)
  lines = _header(["model", "optimizer", "lr"], width, ["mean"])
  for model, entry in payload["models"].items():
    num_exits = _num_exits(entry)
    for name, result in entry["optimizers"].items():
      rows = _rows(result, num_exits, metric)
      label = name
      if result.get(f"test_{metric.name}") is None:
        why = (
          "every grid rate diverged" if result["grid"] else "no rate to match"
        )
        cells = _pad([why], width + 1)
      else:
        with_mean = np.concatenate(
          [rows, rows.mean(axis=1, keepdims=True)], axis=1
        )
        mean, std, n = stats.mean_and_std(with_mean)
        if n < len(rows):
          label += f" ({len(rows) - n}/{len(rows)} diverged)"
        cells = [
          _mean_std(m, s, metric) for m, s in zip(mean, std, strict=True)
        ]
        cells = _pad(cells[:-1], width) + cells[-1:]
      lines.append(
        f"| {model} | {label} | {_rate(result['chosen_lr'])} | "
        + " | ".join(cells)
        + " |"
      )
  return "\n".join(lines)


def _mean_std(mean: float, std: float, metric: Metric) -> str:
  if np.isnan(mean):
    return "diverged"
  if np.isnan(std):
    return metric.show(mean)
  return f"{metric.show(mean)} ± {metric.show(std)}"


def _difference(d: stats.PairedDifference, metric: Metric) -> str:
  if d.n == 0:
    return "—"
  text = ("+" if d.mean >= 0 else "") + metric.show(d.mean)
  if d.n >= 2:
    text += f" ± {metric.show(d.half_width)}"
  return f"**{text}**" if d.excludes_zero else text


def paired_differences(
  payload: dict[str, Any],
) -> dict[
  str, dict[str, tuple[list[stats.PairedDifference], stats.PairedDifference]]
]:
  """Each optimizer's test score minus the baseline's, paired by seed.

  Args:
    payload: the results.

  Returns:
    model -> optimizer -> ``(per_exit, overall)``: one
    :class:`~osgd_jax.app.compare.stats.PairedDifference` per exit, and one
    for the mean over exits, at the results' confidence level, of the
    comparison's metric as recorded (accuracies are fractions; a negative
    difference of bits per byte is a better language model). The
    baseline itself is left out; a model without any baseline runs gets
    ``n = 0`` throughout, and so does an optimizer without test runs.

  Example:
    >>> per_exit, overall = paired_differences(
    ...     results_lib.EXAMPLE)["branched-mlp"]["osgd"]
    >>> overall.n, round(overall.mean, 3), len(per_exit)
    (2, 0.075, 2)
  """
  settings = payload["settings"]
  baseline, confidence = settings["baseline"], settings["confidence"]
  metric = metric_of(payload)
  differences = {}
  for model, entry in payload["models"].items():
    num_exits = _num_exits(entry)
    base = _rows(entry["optimizers"].get(baseline, {}), num_exits, metric)
    per_model = differences[model] = {}
    for name, result in entry["optimizers"].items():
      if name == baseline:
        continue
      rows = _rows(result, num_exits, metric)
      if base.size == 0 or rows.size == 0:
        none = stats.paired_difference(np.array([]), np.array([]))
        per_model[name] = ([none] * num_exits, none)
        continue
      per_model[name] = (
        [
          stats.paired_difference(rows[:, k], base[:, k], confidence)
          for k in range(num_exits)
        ],
        stats.paired_difference(
          rows.mean(axis=1), base.mean(axis=1), confidence
        ),
      )
  return differences


def difference_table(payload: dict[str, Any]) -> str:
  """Each optimizer minus the baseline, paired by seed, with t intervals.

  Args:
    payload: the results.

  Returns:
    A Markdown table in the metric's difference unit (percentage points
    of accuracy, or bits per byte): the mean difference ± the
    half-width of its confidence interval per exit and for the mean over
    exits, **bold** where the interval excludes zero; ``n`` is the number
    of seeds where neither run diverged. A sentence instead when the
    baseline was not run.

  Example:
    >>> print(difference_table(results_lib.EXAMPLE).splitlines()[2])
    | branched-mlp | osgd | 2 | +5.0 ± 63.5 | **+10.0 ± 0.0** | +7.5 ± 31.8 |
  """
  baseline = payload["settings"]["baseline"]
  if not any(baseline in e["optimizers"] for e in payload["models"].values()):
    return f"(No `{baseline}` runs to pair the others with.)"
  differences = paired_differences(payload)
  metric = metric_of(payload)
  width = _max_exits(payload)
  lines = _header(["model", "optimizer", "n"], width, ["mean over exits"])
  for model, per_model in differences.items():
    for name, (per_exit, overall) in per_model.items():
      if overall.n == 0:
        lines.append(
          f"| {model} | {name} | 0 | " + " | ".join(["—"] * (width + 1)) + " |"
        )
        continue
      cells = _pad([_difference(d, metric) for d in per_exit], width)
      lines.append(
        f"| {model} | {name} | {overall.n} | "
        + " | ".join(cells + [_difference(overall, metric)])
        + " |"
      )
  return "\n".join(lines)


def robustness_table(payload: dict[str, Any]) -> str:
  """Validation score over the whole grid, per model and rate.

  Args:
    payload: the results.

  Returns:
    A Markdown table, one row per (model, rate) and one column per tuned
    optimizer: the mean-over-exits / last-exit validation score (the
    comparison's metric) of its tuning run, ``*`` marking the rate
    chosen.

  Example:
    >>> print(robustness_table(results_lib.EXAMPLE).splitlines()[3])
    | branched-mlp | 0.1 | 75.0 / 80.0 * | diverged |
  """
  tuned = [
    n
    for n in payload["settings"]["optimizers"]
    if any(
      e["optimizers"].get(n, {}).get("grid") for e in payload["models"].values()
    )
  ]
  metric = metric_of(payload)
  key = f"val_{metric.name}"
  columns = ["model", "lr", *tuned]
  lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
  for model, entry in payload["models"].items():
    for lr in payload["settings"]["lr_grid"]:
      cells = []
      for name in tuned:
        result = entry["optimizers"].get(name)
        point = next(
          (p for p in (result or {}).get("grid", ()) if p["lr"] == lr), None
        )
        if point is None:
          cells.append("—")
        elif point.get(key) is None:
          cells.append("diverged")
        else:
          score = np.asarray(point[key])
          chosen = " *" if result["chosen_lr"] == lr else ""
          cells.append(
            f"{metric.show(score.mean())} / {metric.show(score[-1])}{chosen}"
          )
      lines.append(f"| {model} | {lr:g} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def edge_note(payload: dict[str, Any]) -> str:
  """A sentence naming the rates chosen at an end of the grid, or ``""``.

  A rate at the end of the grid may not be the best one: a wider grid
  could find a better one beyond it.

  Args:
    payload: the results.

  Returns:
    Markdown text.

  Example:
    >>> print(*edge_note(results_lib.EXAMPLE).split(": "), sep="\\n")
    Chosen at an end of the grid (a rate beyond it may do better)
    branched-mlp
    sgd 0.1, osgd 0.01.
  """
  grid = payload["settings"]["lr_grid"]
  if len(grid) < 2:
    return ""
  found = []
  for model, entry in payload["models"].items():
    edges = [
      f"{name} {r['chosen_lr']:g}"
      for name, r in entry["optimizers"].items()
      if r["grid"] and r["chosen_lr"] in (grid[0], grid[-1])
    ]
    if edges:
      found.append(f"{model}: {', '.join(edges)}")
  if not found:
    return ""
  return (
    "Chosen at an end of the grid (a rate beyond it may do better): "
    + "; ".join(found)
    + "."
  )


#: The confidence thresholds the early-exit table shows, of the curve each
#: language-model test run records (osgd_jax.app.train.EARLY_EXIT_THRESHOLDS).
EARLY_EXIT_SHOWN = (0.5, 0.7, 0.9)


def early_exit_table(payload: dict[str, Any]) -> str:
  """A language model's token-level early exit, per model and optimizer.

  Each test run of a language model records its curve
  (:func:`osgd_jax.anytime.token_early_exit_curve`: a byte stops at the
  first exit whose top probability reaches the threshold); the table shows
  it at the thresholds of :data:`EARLY_EXIT_SHOWN`, averaged over the
  seeds whose run finished.

  Args:
    payload: the results.

  Returns:
    A Markdown table, one row per (model, optimizer): at each threshold
    the mean exit, the mean FLOPs per byte over the last exit's, and the
    bits per byte; ``""`` when no run recorded a curve (a classifier's
    comparison, or one from before the curves were recorded).

  Example:
    >>> early_exit_table(results_lib.EXAMPLE)
    ''
  """
  found = []
  for model, entry in payload["models"].items():
    for name, result in entry["optimizers"].items():
      curves = [c for c in result.get("early_exit") or () if c is not None]
      if curves:
        found.append((model, name, curves))
  if not found:
    return ""
  columns = ["model", "optimizer"] + [
    f"p ≥ {t:g}: exit / FLOPs / bits" for t in EARLY_EXIT_SHOWN
  ]
  lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
  for model, name, curves in found:
    cells = []
    for threshold in EARLY_EXIT_SHOWN:
      exit_, flops, bits = [], [], []
      for c in curves:
        i = int(np.argmin(np.abs(np.asarray(c["threshold"]) - threshold)))
        exit_.append(c["mean_exit"][i])
        flops.append(c["mean_flops"][i] / c["mean_flops"][-1])
        bits.append(c["bits_per_byte"][i])
      cells.append(
        f"{np.mean(exit_):.2f} / {100 * np.mean(flops):.0f}% /"
        f" {np.mean(bits):.3f}"
      )
    lines.append(f"| {model} | {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def matched_table(payload: dict[str, Any]) -> str:
  """The measured update-norm ratio of ``sgd-matched``, per model.

  Args:
    payload: the results.

  Returns:
    A Markdown table (empty when no model has a ratio): OSGD's chosen rate,
    the ratio r, sgd-matched's rate, and r over the first and last epochs.

  Example:
    >>> print(matched_table(results_lib.EXAMPLE).splitlines()[2])
    | branched-mlp | 0.01 | 0.562 | 0.00562 | 1.002 | 0.871 → 0.498 |
  """
  entries = {
    m: e["matched"] for m, e in payload["models"].items() if e.get("matched")
  }
  if not entries:
    return ""
  to = payload["settings"]["matched_to"]
  lines = [
    f"| model | {to} lr | ratio r | sgd-matched lr | r at step 1 |"
    " r per epoch, first → last |",
    "|" + " --- |" * 6,
  ]
  for model, m in entries.items():
    epochs = m["epoch_ratios"]
    lines.append(
      f"| {model} | {m['osgd_lr']:.3g} | {m['ratio']:.3f} |"
      f" {m['lr']:.3g} | {m['first_step_ratio']:.3f} |"
      f" {epochs[0]:.3f} → {epochs[-1]:.3f} |"
    )
  return "\n".join(lines)


def render_markdown(payload: dict[str, Any]) -> str:
  """The comparison's tables with their captions, as one Markdown text.

  This is what ``osgd-compare --report`` writes to ``report.md`` (before
  the figures) and between the README's markers.

  Args:
    payload: the results.

  Returns:
    Markdown, ending with a newline.

  Example:
    >>> render_markdown(results_lib.EXAMPLE).count("| model |")
    4
  """
  s = payload["settings"]
  seeds = len(s["seeds"])
  confidence = f"{100 * s['confidence']:g}%"
  metric = metric_of(payload)
  if metric.higher_is_better:
    score, better = f"{metric.title} ({metric.unit})", ""
  else:
    score = metric.title
    better = f"; negative: fewer bits than `{s['baseline']}`'s, a better model"
  parts = [
    settings_text(payload),
    f"**Test {score}** per exit and its mean over exits, mean ±"
    f" sample standard deviation over {seeds} seed{'s' * (seeds != 1)}"
    " (lr: the peak learning rate of the test runs"
    + ("" if metric.higher_is_better else "; lower is better")
    + "):",
    accuracy_table(payload),
    f"**Difference from `{s['baseline']}`** ({metric.difference_unit}"
    f"{better}), paired by"
    f" seed: mean ± half-width of the {confidence} Student t interval over"
    f" the n seeds where neither run diverged; **bold**: the interval"
    " excludes 0."
    + (" With fewer than 2 seeds there is no interval." if seeds < 2 else ""),
    difference_table(payload),
    f"**Learning-rate robustness**: validation {score} of each tuning"
    " run, mean over exits / last exit; `*`: the rate chosen.",
    robustness_table(payload),
  ]
  early = early_exit_table(payload)
  if early:
    parts += [
      "**Token-level early exit** (CALM-style: each byte leaves at the"
      " first exit whose top probability reaches the threshold), mean"
      " over the test runs' seeds: the mean exit, the FLOPs per byte as a"
      " share of the last exit's, and the test bits per byte:",
      early,
    ]
  edges = edge_note(payload)
  if edges:
    parts.append(edges)
  matched = matched_table(payload)
  if matched:
    parts += [
      "**sgd-matched**: r = Σ‖u_t‖ / Σ‖Σ_k g_k,t‖ over the steps of"
      f" `{s['matched_to']}`'s chosen tuning run (u_t its update"
      " before momentum, g_k,t exit k's gradient):",
      matched,
    ]
  return "\n\n".join(parts) + "\n"
