"""Interleaved, rotated timing rounds shared by the step benchmarks.

``bench_step.py`` and ``bench_memory.py`` time several training steps side
by side (JAX and PyTorch alike) and compare them by ratios of medians. On a
shared machine the load changes during a run, so every variant is timed
once per round, in an order rotated per round, and each variant's time is
the median over the rounds: a burst of load hits all variants alike.

A sample is one call, or back-to-back calls lasting at least
``MIN_SAMPLE_S`` for fast steps, after one untimed call that lets the
framework's thread pool wake up (switching between JAX and PyTorch leaves
the other's threads asleep).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

MIN_SAMPLE_S = 0.2  # fast steps are repeated back to back for this long


class Variant(NamedTuple):
  """One timed function: ``call()`` runs a step and waits for its result."""

  name: str
  label: str
  call: Callable[[], Any]


def cpu_cores() -> int:
  """The cores this process may use: XLA:CPU's intra-op pool has one each.

  PyTorch's ``torch.set_num_threads`` is set to this by default, so that
  both frameworks get the same cores.
  """
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def time_calls(call: Callable[[], Any], number: int) -> float:
  """Mean seconds of ``number`` back-to-back calls."""
  start = time.perf_counter()
  for _ in range(number):
    call()
  return (time.perf_counter() - start) / number


def run_rounds(
  variants: Sequence[Variant], repeats: int, log: Callable[[str], None]
) -> dict[str, list[float]]:
  """Times every variant once per round, rotating the order per round.

  Args:
    variants: the calls, already compiled (or, for PyTorch, built).
    repeats: the rounds; each gives one sample per variant.
    log: where a line per round goes (its wall time).

  Returns:
    ``{variant name: [seconds per call, one per round]}``.
  """
  numbers, wake = {}, {}
  for v in variants:
    v.call()  # warm-up (compilation happened before)
    once = time_calls(v.call, 1)
    numbers[v.name] = max(
      1, min(1000, math.ceil(MIN_SAMPLE_S / max(once, 1e-7)))
    )
    # Switching frameworks leaves the other's threads asleep; one untimed
    # call wakes them, which matters only when a call is short.
    wake[v.name] = once < 1.0
  samples = {v.name: [] for v in variants}
  for r in range(repeats):
    start = time.perf_counter()
    shift = r % len(variants)
    for v in list(variants[shift:]) + list(variants[:shift]):
      if wake[v.name]:
        v.call()
      samples[v.name].append(time_calls(v.call, numbers[v.name]))
    log(f"  round {r + 1}/{repeats}: {time.perf_counter() - start:.1f} s")
  return samples
