"""Statistics of a comparison: spread over seeds, and paired differences.

Two optimizers trained with the same seed share the initialisation and the
data order, so their accuracies are compared seed by seed: the difference
``d_s = a_s − b_s`` per seed s, its mean over the n seeds where neither run
diverged, and the Student t interval

    mean(d) ± t_{(1+c)/2, n−1} · sd(d) / √n,

with ``sd`` the sample standard deviation (n − 1 in the denominator) and c
the confidence (0.95). It assumes the differences are independent across
seeds and roughly normal; with n < 2 there is no interval.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import stats as scipy_stats

__all__ = [
  "PairedDifference",
  "mean_and_std",
  "paired_difference",
  "t_quantile",
]


def t_quantile(probability: float, dof: int) -> float:
  """The quantile of Student's t distribution.

  Args:
    probability: in (0, 1), e.g. 0.975 for a two-sided 95% interval.
    dof: degrees of freedom, >= 1.

  Returns:
    t such that P(T <= t) = ``probability``.

  Example:
    >>> round(t_quantile(0.975, 4), 3)
    2.776
  """
  return float(scipy_stats.t.ppf(probability, dof))


@dataclasses.dataclass(frozen=True)
class PairedDifference:
  """The mean of paired differences and its confidence interval.

  Attributes:
    mean: the mean difference (NaN when n = 0).
    half_width: the interval's half-width (NaN when n < 2).
    n: the number of pairs.
  """

  mean: float
  half_width: float
  n: int

  @property
  def excludes_zero(self) -> bool:
    """Whether the interval lies wholly above or below 0 (False if none)."""
    return not math.isnan(self.half_width) and abs(self.mean) > self.half_width


def paired_difference(
  values: np.ndarray, baseline: np.ndarray, confidence: float = 0.95
) -> PairedDifference:
  """Mean of ``values − baseline`` paired by position, with its t interval.

  Args:
    values: ``(S,)`` one optimizer's result per seed; NaN for a diverged run.
    baseline: ``(S,)`` the baseline's, seed by seed.
    confidence: the interval's confidence level.

  Returns:
    The :class:`PairedDifference` over the seeds where neither is NaN.

  Example:
    >>> d = paired_difference(np.array([0.9, 0.8, 0.7]),
    ...                       np.array([0.8, 0.8, 0.6]))
    >>> d.n, round(d.mean, 4), round(d.half_width, 4), d.excludes_zero
    (3, 0.0667, 0.1434, False)
  """
  diff = np.asarray(values, np.float64) - np.asarray(baseline, np.float64)
  diff = diff[~np.isnan(diff)]
  n = int(diff.size)
  if n == 0:
    return PairedDifference(math.nan, math.nan, 0)
  mean = float(diff.mean())
  if n < 2:
    return PairedDifference(mean, math.nan, 1)
  half = (
    t_quantile((1 + confidence) / 2, n - 1)
    * float(diff.std(ddof=1))
    / math.sqrt(n)
  )
  return PairedDifference(mean, half, n)


def mean_and_std(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
  """Mean and sample standard deviation over the runs that did not diverge.

  Args:
    rows: ``(S, K)`` accuracies, a NaN row for a diverged run.

  Returns:
    ``(mean, std, n)``: ``(K,)`` arrays (NaN when n = 0; the std NaN when
    n < 2) and the number of finished runs.

  Example:
    >>> mean, std, n = mean_and_std(np.array([[0.5, 0.9], [0.7, 0.9],
    ...                                       [np.nan, np.nan]]))
    >>> mean.round(3).tolist(), std.round(3).tolist(), n
    ([0.6, 0.9], [0.141, 0.0], 2)
  """
  finished = rows[~np.isnan(rows).any(axis=1)]
  n = len(finished)
  nan = np.full(rows.shape[1], np.nan)
  mean = finished.mean(axis=0) if n else nan
  std = finished.std(axis=0, ddof=1) if n >= 2 else nan
  return mean, std, n
