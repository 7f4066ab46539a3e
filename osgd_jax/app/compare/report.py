"""``osgd-compare --report``: the Markdown, the figures and the README's tables.

The report is made from ``results.json`` alone, so it can be made again (or
on another machine) without training: ``report.md`` holds
:func:`~osgd_jax.app.compare.tables.render_markdown`'s tables and links the
figures, and the same tables can replace a section of the README between
``<!-- compare:<section>:begin -->`` and ``<!-- compare:<section>:end -->``.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

from osgd_jax.app.compare import results as results_lib
from osgd_jax.app.compare import stats
from osgd_jax.app.compare.metric import metric_of
from osgd_jax.app.compare.tables import paired_differences, render_markdown
from osgd_jax.app.report import (
  plot_accuracy_vs_flops,
  plot_accuracy_vs_lr,
  plot_exit_accuracy,
  plot_paired_differences,
)

__all__ = [
  "DIFFERENCES_FIGURE",
  "REPORT_FILE",
  "markers",
  "replace_section",
  "write_differences_figure",
  "write_report",
]

#: The report's Markdown file, beside its figures.
REPORT_FILE = "report.md"
#: The report's summary figure, every model's paired differences from the
#: baseline in one forest plot (the README shows it).
DIFFERENCES_FIGURE = "differences.png"
_SECTION = re.compile(r"[A-Za-z0-9_.-]+")


def markers(section: str) -> tuple[str, str]:
  """The README lines that enclose a generated section.

  Args:
    section: the section's name, e.g. ``digits``.

  Returns:
    ``(begin, end)``.

  Raises:
    ValueError: a name other than letters, digits, ``.``, ``_`` and ``-``.

  Example:
    >>> markers("digits")
    ('<!-- compare:digits:begin -->', '<!-- compare:digits:end -->')
  """
  if not _SECTION.fullmatch(section):
    raise ValueError(
      f"--section {section!r} must be letters, digits, '.',"
      " '_' or '-', such as digits."
    )
  return (
    f"<!-- compare:{section}:begin -->",
    f"<!-- compare:{section}:end -->",
  )


def replace_section(
  text: str, section: str, fragment: str, where: str = "the README"
) -> str:
  """``text`` with the lines between a section's markers set to ``fragment``.

  Args:
    text: a Markdown document.
    section: the section's name (see :func:`markers`).
    fragment: the new content, ending with a newline.
    where: the document's name, for the error.

  Returns:
    The document, the markers kept and everything outside them unchanged.

  Raises:
    ValueError: the markers are missing, repeated or out of order.

  Example:
    >>> doc = ("a\\n<!-- compare:x:begin -->\\nold\\n"
    ...        "<!-- compare:x:end -->\\nb\\n")
    >>> print(replace_section(doc, "x", "new\\n"), end="")
    a
    <!-- compare:x:begin -->
    new
    <!-- compare:x:end -->
    b
  """
  begin, end = markers(section)
  lines = text.splitlines(keepends=True)
  starts = [i for i, line in enumerate(lines) if line.strip() == begin]
  ends = [i for i, line in enumerate(lines) if line.strip() == end]
  if len(starts) != 1 or len(ends) != 1 or starts[0] > ends[0]:
    raise ValueError(
      f"{where} needs the line {begin} and, below it, the line {end}, once"
      " each; add them where the tables go, then report again."
    )
  return "".join(lines[: starts[0] + 1]) + fragment + "".join(lines[ends[0] :])


def write_differences_figure(payload: dict[str, Any], out: str) -> str | None:
  """Draws :data:`DIFFERENCES_FIGURE` of a comparison into ``out``.

  Args:
    payload: the results (:mod:`osgd_jax.app.compare.results`).
    out: an existing directory.

  Returns:
    The figure's path, or ``None`` (nothing drawn) when no optimizer could
    be paired with the baseline.

  Example:
    >>> import tempfile
    >>> os.path.basename(write_differences_figure(results_lib.EXAMPLE,
    ...                                           tempfile.mkdtemp()))
    'differences.png'
  """
  settings = payload["settings"]
  panels = {
    model: {
      name: (overall.mean, overall.half_width)
      for name, (_, overall) in per_model.items()
    }
    for model, per_model in paired_differences(payload).items()
  }
  if all(
    np.isnan(mean) for rows in panels.values() for mean, _ in rows.values()
  ):
    return None
  path = os.path.join(out, DIFFERENCES_FIGURE)
  metric = metric_of(payload)
  plot_paired_differences(
    panels,
    path,
    title=(
      f"{settings['dataset']}: test {metric.title} minus"
      f" {settings['baseline']}'s,"
      f" mean over exits ({100 * settings['confidence']:g}% interval,"
      " paired by seed)"
    ),
    xlabel=f"difference ({metric.difference_unit})",
    scale=metric.scale,
  )
  return path


def _figures(payload: dict[str, Any], out: str) -> list[str]:
  settings = payload["settings"]
  dataset, seeds = settings["dataset"], len(settings["seeds"])
  metric = metric_of(payload)
  label = metric.title + (" (%)" if metric.unit == "%" else "")
  differences = write_differences_figure(payload, out)
  written = [] if differences is None else [differences]
  for model, entry in payload["models"].items():
    num_exits = len(entry["flops"])
    summary = {}
    for name, result in entry["optimizers"].items():
      mean, std, n = stats.mean_and_std(
        results_lib.accuracy_rows(result.get(f"test_{metric.name}"), num_exits)
      )
      if n:
        summary[name] = (mean, np.nan_to_num(std))
    title = f"{model} on {dataset}, {seeds} seeds"
    path = os.path.join(out, f"accuracy-{model}.png")
    plot_exit_accuracy(
      summary,
      path,
      title=title + " (± std)",
      ylabel=f"test {label}",
      scale=metric.scale,
    )
    written.append(path)
    path = os.path.join(out, f"flops-{model}.png")
    plot_accuracy_vs_flops(
      {n: (entry["flops"], m) for n, (m, _) in summary.items()},
      path,
      title=title,
      ylabel=f"test {label}",
      percent=metric.scale == 100,
    )
    written.append(path)
    curves = {
      name: (
        [p["lr"] for p in result["grid"]],
        results_lib.accuracy_rows(
          [p.get(f"val_{metric.name}") for p in result["grid"]], num_exits
        ),
      )
      for name, result in entry["optimizers"].items()
      if result["grid"]
    }
    path = os.path.join(out, f"lr-{model}.png")
    plot_accuracy_vs_lr(
      curves,
      path,
      chosen={n: entry["optimizers"][n]["chosen_lr"] for n in curves},
      title=f"{model} on {dataset}: the tuning runs",
      ylabel=f"validation {label}",
      scale=metric.scale,
    )
    written.append(path)
  return written


def write_report(payload: dict[str, Any], out: str) -> list[str]:
  """Writes ``report.md`` and the figures of a comparison into ``out``.

  Figures: :data:`DIFFERENCES_FIGURE` (each optimizer's paired difference
  from the baseline, mean over exits, with its interval; left out when no
  optimizer can be paired) and, per model: ``accuracy-<model>.png`` (test
  accuracy per exit, mean ± std per optimizer), ``flops-<model>.png``
  (mean test accuracy against FLOPs per example) and ``lr-<model>.png``
  (validation accuracy of the tuning runs against the learning rate, log
  axis).

  Args:
    payload: the results (:mod:`osgd_jax.app.compare.results`).
    out: the directory, created if missing.

  Returns:
    The paths written, ``report.md`` first.

  Example:
    >>> import tempfile
    >>> paths = write_report(results_lib.EXAMPLE, tempfile.mkdtemp())
    >>> for p in paths:
    ...   print(os.path.basename(p))
    report.md
    differences.png
    accuracy-branched-mlp.png
    flops-branched-mlp.png
    lr-branched-mlp.png
  """
  os.makedirs(out, exist_ok=True)
  figures = _figures(payload, out)
  links = "\n".join(
    f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in figures
  )
  path = os.path.join(out, REPORT_FILE)
  with open(path, "w") as f:
    f.write(render_markdown(payload) + "\n" + links + "\n")
  return [path, *figures]
