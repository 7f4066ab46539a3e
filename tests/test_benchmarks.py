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


def test_bench_sharded_quick_shows_memory_falling_as_one_over_devices():
  proc = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "bench_sharded.py"), "--quick"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  rows = [line.split() for line in proc.stdout.splitlines()
          if line.split() and line.split()[0] in {"1", "2", "4", "8"}]
  assert [int(r[0]) for r in rows] == [1, 2, 4, 8], proc.stdout
  per_device = [float(r[1]) for r in rows]
  for devices, mb in zip((1, 2, 4, 8), per_device):
    # Memory is exact, not a timing: it must fall as 1/devices.
    assert abs(mb * devices - per_device[0]) <= 0.02 * per_device[0], rows
  assert all("all-gather" not in " ".join(r) for r in rows), proc.stdout
