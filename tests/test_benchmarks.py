"""Smoke test of the benchmark scripts: they run and print their tables.

Timings are never asserted: the machine running the tests may be loaded.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_bench_transform_quick_prints_ratios_for_both_methods():
  proc = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "bench_transform.py"), "--quick"],
      cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout
  assert "floor ms" in out and "x floor" in out, out  # the table header
  for method in ("gram", "sequential"):
    rows = [line for line in out.splitlines() if f" {method} " in line]
    assert rows, f"no row for {method}:\n{out}"
    assert all(line.split()[-2].endswith("x") for line in rows), rows  # a ratio
