"""Run artefacts: the per-exit table, metrics.json and the figures."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
  "write_json",
  "exit_table",
  "plot_accuracy_vs_flops",
  "plot_accuracy_vs_lr",
  "plot_exit_accuracy",
  "plot_paired_differences",
]


def write_json(path: str, payload: Any) -> None:
  """Writes JSON atomically: a reader sees the old file or the new, never half.

  Args:
    path: destination file.
    payload: a JSON-serialisable object (NumPy arrays and scalars allowed).
  """
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=directory)
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(payload, f, indent=2, default=_to_builtin)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def _to_builtin(x: Any) -> Any:
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, np.generic):
    return x.item()
  raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _human(n: float) -> str:
  for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(n) >= scale:
      return f"{n / scale:.2f}{unit}"
  return f"{n:.0f}"


def exit_table(
  accuracy: Sequence[float] | np.ndarray,
  flops: Sequence[float] | np.ndarray,
  params: Sequence[int] | np.ndarray,
  flops_source: str = "",
  split: str = "test",
  bits_per_byte: Sequence[float] | np.ndarray | None = None,
) -> str:
  """Formats the per-exit table: accuracy, FLOPs and parameters.

  Args:
    accuracy: ``(K,)`` accuracy per exit, in [0, 1].
    flops: ``(K,)`` FLOPs of one example up to each exit.
    params: ``(K,)`` parameters on each exit's path.
    flops_source: where the FLOPs come from ("xla" or "analytic").
    split: the split the accuracy is of, ``"test"`` or ``"validation"``
      (the column reads ``val acc``).
    bits_per_byte: ``(K,)`` a language model's bits per byte per exit, a
      column after the accuracy (then a token accuracy); ``None``: none.

  Returns:
    A multi-line string.

  Example:
    >>> print(exit_table([0.5, 0.9], [1e6, 3e6], [100, 300]).splitlines()[0])
    exit  test acc      FLOPs     params
    >>> print(exit_table([0.5], [1e6], [100], bits_per_byte=[2.5])
    ...       .splitlines()[1])
       1    50.00%      2.500      1.00M        100
  """
  label = "val acc" if split == "validation" else f"{split} acc"
  bits = "" if bits_per_byte is None else f"  {'bits/byte':>9}"
  lines = [f"{'exit':>4}  {label:>8}{bits}  {'FLOPs':>9}  {'params':>9}"]
  column = [None] * len(accuracy) if bits_per_byte is None else bits_per_byte
  for k, (a, b, f, p) in enumerate(
    zip(accuracy, column, flops, params, strict=True), start=1
  ):
    cell = "" if b is None else f"  {b:>9.3f}"
    lines.append(
      f"{k:>4}  {100 * a:>7.2f}%{cell}  {_human(f):>9}  {_human(p):>9}"
    )
  if flops_source:
    lines.append(f"(FLOPs per example, from the {flops_source} cost count)")
  return "\n".join(lines)


def _figure(**kwargs):
  # A bare Figure renders to files without pyplot: no global backend switch
  # (which would silence plt.show() in a notebook), and nothing to close.
  from matplotlib.figure import Figure

  return Figure(**kwargs)


def plot_accuracy_vs_flops(
  curves: Mapping[
    str, tuple[Sequence[float] | np.ndarray, Sequence[float] | np.ndarray]
  ],
  path: str,
  title: str = "",
  ylabel: str = "test accuracy (%)",
  xlabel: str = "FLOPs per example",
  percent: bool = True,
) -> None:
  """Plots accuracy against FLOPs per example, one line per curve.

  Args:
    curves: label -> (flops, accuracy) arrays.
    path: the PNG to write.
    title: figure title.
    ylabel: the y axis' label: the split the accuracy is of.
    xlabel: the x axis' label.
    percent: plot the values times 100 (accuracies); ``False`` plots them
      as they are (e.g. a language model's bits per byte).
  """
  fig = _figure(figsize=(5, 3.5), dpi=120)
  ax = fig.subplots()
  scale = 100 if percent else 1
  for label, (flops, acc) in curves.items():
    ax.plot(np.asarray(flops), scale * np.asarray(acc), marker="o", label=label)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  if curves:  # a model whose every run diverged has no lines to name
    ax.legend()
  fig.tight_layout()
  fig.savefig(path)


def plot_exit_accuracy(
  results: dict[str, tuple[np.ndarray, np.ndarray]],
  path: str,
  title: str = "",
  ylabel: str = "test accuracy (%)",
  scale: float = 100,
) -> None:
  """Bar chart of mean ± std test accuracy per exit for several optimizers.

  Args:
    results: label -> (mean, std) arrays of shape (K,).
    path: the PNG to write.
    title: figure title.
    ylabel: the y axis' label (another score: e.g. bits per byte).
    scale: the values are plotted times this (100: fractions in percent).
  """
  fig = _figure(figsize=(5.5, 3.5), dpi=120)
  ax = fig.subplots()
  width = 0.8 / max(len(results), 1)
  for i, (label, (mean, std)) in enumerate(results.items()):
    exits = np.arange(1, len(mean) + 1)
    ax.bar(
      exits + (i - (len(results) - 1) / 2) * width,
      scale * np.asarray(mean),
      width,
      yerr=scale * np.asarray(std),
      label=label,
      capsize=2,
    )
  num_exits = max((len(mean) for mean, _ in results.values()), default=0)
  ax.set_xticks(np.arange(1, num_exits + 1))
  ax.set_xlabel("exit")
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  if results:
    ax.legend()
  fig.tight_layout()
  fig.savefig(path)


def plot_accuracy_vs_lr(
  curves: Mapping[str, tuple[Sequence[float], np.ndarray]],
  path: str,
  title: str = "",
  chosen: dict[str, float] | None = None,
  ylabel: str = "validation accuracy (%)",
  scale: float = 100,
) -> None:
  """Accuracy against the learning rate (log axis), one line per curve.

  Two panels: the mean over exits, and the last exit.

  Args:
    curves: label -> (rates, accuracy): ``(R,)`` rates and ``(R, K)``
      accuracies in [0, 1], a NaN row where the run diverged (a gap).
    path: the PNG to write.
    title: figure title.
    chosen: label -> the rate chosen, circled.
    ylabel: the y axis' label (another score: e.g. bits per byte).
    scale: the values are plotted times this (100: fractions in percent).
  """
  fig = _figure(figsize=(8, 3.5), dpi=120)
  axes = fig.subplots(1, 2, sharey=True)
  for ax, name in zip(axes, ("mean over exits", "last exit"), strict=True):
    for label, (rates, acc) in curves.items():
      acc = np.asarray(acc, np.float64)
      values = scale * (
        acc.mean(axis=1) if name == "mean over exits" else acc[:, -1]
      )
      (line,) = ax.plot(np.asarray(rates), values, marker="o", label=label)
      if chosen and chosen.get(label) in list(rates):
        i = list(rates).index(chosen[label])
        ax.plot(
          [rates[i]],
          [values[i]],
          marker="o",
          markersize=11,
          fillstyle="none",
          color=line.get_color(),
        )
    ax.set_xscale("log")
    rates = sorted({r for rs, _ in curves.values() for r in rs})
    ax.set_xticks(rates, [f"{r:g}" for r in rates])
    ax.minorticks_off()
    ax.set_xlabel("peak learning rate")
    ax.set_title(name)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel(ylabel)
  axes[-1].legend(fontsize="small")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path)


def plot_paired_differences(
  panels: dict[str, dict[str, tuple[float, float]]],
  path: str,
  title: str = "",
  xlabel: str = "difference (percentage points)",
  scale: float = 100,
) -> Any:
  """Differences with their confidence intervals, one panel per group.

  A forest plot: each label is a row with its mean difference and a bar
  for its interval; a dashed line marks 0, and a filled marker a
  difference whose interval excludes it.

  Args:
    panels: panel title (e.g. a model) -> label (e.g. an optimizer) ->
      ``(mean, half_width)``, as fractions; a NaN half-width (one pair)
      draws no bar, and a NaN mean no row.
    path: the PNG to write.
    title: figure title.
    xlabel: the x axis' label.
    scale: the differences are plotted times this (100: fractions as
      percentage points).

  Returns:
    The ``matplotlib.figure.Figure``, already written to ``path``.
  """
  labels = list(
    dict.fromkeys(label for rows in panels.values() for label in rows)
  )
  fig = _figure(
    figsize=(2.6 * max(len(panels), 1) + 1.2, 0.32 * len(labels) + 1.4), dpi=100
  )
  # One x scale for all panels, so that their intervals compare by eye.
  axes = fig.subplots(
    1, max(len(panels), 1), sharex=True, sharey=True, squeeze=False
  )[0]
  for ax, (name, rows) in zip(axes, panels.items(), strict=True):
    for y, label in enumerate(labels):
      mean, half = rows.get(label, (np.nan, np.nan))
      if np.isnan(mean):
        continue
      excludes = not np.isnan(half) and abs(mean) > half
      ax.errorbar(
        [scale * mean],
        [y],
        xerr=None if np.isnan(half) else [[scale * half], [scale * half]],
        fmt="o",
        color="C0",
        markerfacecolor="C0" if excludes else "white",
        capsize=2,
      )
    ax.axvline(0.0, color="grey", linestyle="--", linewidth=0.8)
    ax.set_title(name, fontsize="medium")
    ax.set_xlabel(xlabel, fontsize="small")
    ax.grid(axis="x", alpha=0.3)
  axes[0].set_yticks(range(len(labels)), labels)
  axes[0].invert_yaxis()
  if title:
    fig.suptitle(title, fontsize="medium")
  fig.tight_layout()
  fig.savefig(path)
  return fig
