"""The OSGD-vs-baselines experiment: ``osgd-compare``.

For every model and optimizer, the learning rate is tuned on a validation
split of the training set (phase 1), and the chosen rate is trained with
each seed on the whole training set and scored on the test set (phase 2).
Everything goes to one ``results.json``, from which the report (Markdown
tables with paired differences from ``sgd`` and their t intervals, the
accuracy over the learning-rate grid, figures) is made, then or later with
``osgd-compare --report``. The pieces, one job each:

* :mod:`~osgd_jax.app.compare.variants`: the optimizer names and the
  settings each sets;
* :mod:`~osgd_jax.app.compare.runs`: one run, trained once, its outcome
  kept in ``result.json`` so the comparison resumes;
* :mod:`~osgd_jax.app.compare.matched`: the update-norm ratio of the
  matched control ``sgd-matched``;
* :mod:`~osgd_jax.app.compare.experiment`: the two phases;
* :mod:`~osgd_jax.app.compare.metric`: what the runs are scored by
  (accuracy, or a language model's bits per byte);
* :mod:`~osgd_jax.app.compare.results`: the results file's layout;
* :mod:`~osgd_jax.app.compare.stats`: means, standard deviations and
  paired t intervals;
* :mod:`~osgd_jax.app.compare.tables` and
  :mod:`~osgd_jax.app.compare.report`: the Markdown, the figures and the
  README's generated sections;
* :mod:`~osgd_jax.app.compare.cli`: the command.

Run it as ``osgd-compare`` or ``python -m osgd_jax.app.compare``.
"""

from osgd_jax.app.compare.cli import (
  DEFAULT_LR_GRID,
  DEFAULT_MODELS,
  DEFAULT_OPTIMIZERS,
  RESULTS_FILE,
  main,
)
from osgd_jax.app.compare.experiment import Plan, run_comparison
from osgd_jax.app.compare.report import write_report
from osgd_jax.app.compare.results import load_results
from osgd_jax.app.compare.runs import RESULT_FILE, run_once
from osgd_jax.app.compare.tables import render_markdown
from osgd_jax.app.compare.variants import VARIANTS

__all__ = [
  "DEFAULT_LR_GRID",
  "DEFAULT_MODELS",
  "DEFAULT_OPTIMIZERS",
  "Plan",
  "RESULTS_FILE",
  "RESULT_FILE",
  "VARIANTS",
  "load_results",
  "main",
  "render_markdown",
  "run_comparison",
  "run_once",
  "write_report",
]
