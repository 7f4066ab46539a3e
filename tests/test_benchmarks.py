"""Smoke test of the benchmark scripts: they run and print their tables.

Timings are never asserted: the machine running the tests may be loaded.
"""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_bench_transform_quick_prints_ratios_for_both_methods():
  proc = subprocess.run(
    [
      sys.executable,
      str(ROOT / "benchmarks" / "bench_transform.py"),
      "--quick",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout
  assert "floor ms" in out and "x floor" in out, out  # the table header
  for method in ("gram", "sequential"):
    rows = [line for line in out.splitlines() if f" {method} " in line]
    assert rows, f"no row for {method}:\n{out}"
    assert all(line.split()[-2].endswith("x") for line in rows), rows  # a ratio
  # Programs run on the calling thread unless --dispatch async says not to.
  assert "sync dispatch on CPU" in out, out


def test_bench_transform_dispatch_async_keeps_jax_default(tmp_path):
  out_json = tmp_path / "out.json"
  proc = subprocess.run(
    [
      sys.executable,
      str(ROOT / "benchmarks" / "bench_transform.py"),
      "--quick",
      "--methods",
      "gram",
      "--no-multi",
      "--dispatch",
      "async",
      "--json",
      str(out_json),
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert proc.returncode == 0, proc.stderr
  assert "async dispatch on CPU" in proc.stdout, proc.stdout
  assert json.loads(out_json.read_text())["meta"]["dispatch"] == "async"


def test_bench_sharded_quick_shows_memory_falling_as_one_over_devices(
  tmp_path,
):
  out_json = tmp_path / "sharded.json"
  proc = subprocess.run(
    [
      sys.executable,
      str(ROOT / "benchmarks" / "bench_sharded.py"),
      "--quick",
      "--json",
      str(out_json),
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 0, proc.stderr
  rows = [
    line.split()
    for line in proc.stdout.splitlines()
    if line.split() and line.split()[0] in {"1", "2", "4", "8"}
  ]
  assert [int(r[0]) for r in rows] == [1, 2, 4, 8], proc.stdout
  # The bytes, not the table's MB rounded to 0.01: the quick model's shards
  # are tens of kB.
  saved = json.loads(out_json.read_text())["rows"]
  assert [r["devices"] for r in saved] == [1, 2, 4, 8]
  per_device = [r["stacked_bytes_per_device"] for r in saved]
  for devices, nbytes in zip((1, 2, 4, 8), per_device, strict=True):
    # Memory is exact, not a timing: it must fall as 1/devices.
    assert abs(nbytes * devices - per_device[0]) <= 0.02 * per_device[0], rows
  for row, printed in zip(saved, rows, strict=True):
    assert float(printed[1]) == round(row["stacked_bytes_per_device"] / 1e6, 2)
  assert all("all-gather" not in " ".join(r) for r in rows), proc.stdout


def _bench_step_module():
  sys.path.insert(0, str(ROOT / "benchmarks"))
  try:
    import bench_step
  finally:
    sys.path.remove(str(ROOT / "benchmarks"))
  return bench_step


@pytest.mark.slow  # compiles a dozen small steps: under a minute on 2 cores
def test_bench_step_quick_prints_step_ratios_and_targets():
  proc = subprocess.run(
    [sys.executable, str(ROOT / "benchmarks" / "bench_step.py"), "--quick"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout
  assert "median ms" in out and "x jax plain" in out, out  # the table header
  # A row: the label, then median ms, the ratio to plain and min ms.
  rows = {
    label: rest
    for label, *rest in (
      line.rsplit(None, 3)
      for line in out.splitlines()
      if line.startswith(("jax ", "torch", "osgd("))
    )
  }
  staged = "jax OSGD, staged Jacobian (default: rows looped on CPU)"
  expected = [
    "jax plain SGD (floor)",
    staged,
    "jax OSGD, staged Jacobian, rows batched",
    "jax OSGD, vmap Jacobian",
    "jax staged Jacobian, rows summed (no projection)",
    "jax forward+backward of the sum (F+B)",
    "osgd(...).update alone",
  ]
  for label in expected:
    assert label in rows, f"no row {label!r}:\n{out}"
    ms, ratio, min_ms = rows[label]
    assert float(ms) >= float(min_ms) > 0 and ratio.endswith("x"), rows[label]
    # The ratio is of this row's median to the plain step's, both printed
    # rounded to 0.005 ms (and the ratio to 0.005): the quick steps take
    # under a millisecond, so the rounding alone moves the quotient of the
    # printed medians by a few hundredths.
    plain_ms = float(rows["jax plain SGD (floor)"][0])
    low = (float(ms) - 0.005) / (plain_ms + 0.005) - 0.005
    high = (float(ms) + 0.005) / (plain_ms - 0.005) + 0.005
    assert low - 1e-9 <= float(ratio[:-1]) <= high + 1e-9, (
      label,
      rows[label],
      plain_ms,
    )
  assert rows["jax plain SGD (floor)"][1] == "1.00x"
  # No experiment rows any more: every OSGD row is a path of osgd_jax.
  assert not any(label.startswith("experiment") for label in rows), rows
  assert "(F + sum_k prefix_k B) / (F + B) =" in out
  # The targets are judged on the default staged step.
  lines = out.splitlines()
  for target in ("target 1:", "target 2:"):
    line = next(line for line in lines if line.startswith(target))
    assert line.rstrip().endswith(("PASS", "MISS")), line
  target_1 = next(line for line in lines if line.startswith("target 1:"))
  assert target_1.startswith(f"target 1: {staged} / plain"), out
  # Target 2: the transform's time inside the OSGD step, from profiles: the
  # estimate within its bounds, their parts, then the standalone call.
  share = next(line for line in lines if line.startswith("target 2:"))
  match = re.match(
    r"target 2: the transform inside the OSGD step \(profiles"
    r" of \d+ steps\): ([\d.]+) ms = ([\d.]+)% of its kernel"
    r" time",
    share,
  )
  assert match, share
  estimate_ms, percent = float(match[1]), float(match[2])
  bounds = lines[lines.index(share) + 1]
  parts = re.search(
    r"bounds ([\d.]+)% \.\. ([\d.]+)%: \d+ osgd-only kernels"
    r" ([\d.]+) ms; \+\d+ kernels fusing .* ([\d.]+) ms; of"
    r" ([\d.]+) ms in \d+ kernels",
    bounds,
  )
  assert parts, bounds
  lower, upper, osgd_ms, mixed_ms, total_ms = map(float, parts.groups())
  # osgd <= estimate <= osgd + mixed holds for the values; each is printed
  # rounded to 0.001 ms, so within half of that of its value (and a float's
  # error in the sums below).
  half = 0.0005 + 1e-9
  assert 0 < osgd_ms <= estimate_ms + 2 * half, bounds
  assert estimate_ms <= osgd_ms + mixed_ms + 3 * half, bounds
  assert lower - 0.01 <= percent <= upper + 0.01, (share, bounds)
  assert abs(percent - 100 * estimate_ms / total_ms) <= 0.05 + 0.01 * percent
  alone = lines[lines.index(share) + 3]
  match = re.search(
    r"osgd\(\.\.\.\)\.update alone, its own jitted call:"
    r" ([\d.]+) ms .* rows summed = (-?[\d.]+) ms",
    alone,
  )
  assert match, alone
  assert abs(float(match[1]) - float(rows["osgd(...).update alone"][0])) <= 0.01
  osgd_ms = float(rows[staged][0])
  summed_ms = float(rows["jax staged Jacobian, rows summed (no projection)"][0])
  assert abs(float(match[2]) - (osgd_ms - summed_ms)) <= 0.02, (alone, rows)
  # The batched rows against the same limit; the vmap Jacobian against the
  # limit of K full backward passes, which the run printed.
  assert any(
    line.strip().startswith("(staged, rows batched:") for line in lines
  ), out
  vmap_limit = float(re.search(r"\(F \+ K B\)/\(F \+ B\) = ([\d.]+)", out)[1])
  vmap = next(line for line in lines if line.startswith("vmap Jacobian"))
  match = re.search(
    r"OSGD / plain = ([\d.]+)x, beside the limit of K full"
    r" backward passes ([\d.]+)x = ([\d.]+)x that limit",
    vmap,
  )
  assert match, vmap
  assert float(match[2]) == vmap_limit
  assert abs(float(match[1]) / vmap_limit - float(match[3])) <= 2e-3, vmap
  # --quick's model has K = 2 exits: the stack is twice the parameters.
  assert "stacked per-exit gradients" in out and "2.00x the parameters" in out
  # The PyTorch half is optional: either its rows, or a line saying why not.
  if "PyTorch/TorchJD part skipped" not in out:
    for agg in ("Mean", "UPGrad", "PCGrad"):
      assert f"torchjd {agg}" in rows, out
    assert "torch plain SGD" in rows and "(the same tensor sizes)" in out, out
    assert "torch.set_num_threads(1)" in out, out  # --quick's default
    line = next(line for line in lines if line.startswith("target 3:"))
    match = re.match(
      r"target 3: OSGD / plain ([\d.]+)x against TorchJD's"
      r" fastest / PyTorch plain ([\d.]+)x \(torchjd \w+\) ="
      r" ([\d.]+) \(target < 1\)",
      line,
    )
    assert match, line
    ours, theirs, rel = map(float, match.groups())
    assert abs(ours / theirs - rel) <= 2e-3 + 1e-3 * rel, line
    assert line.rstrip().endswith(("PASS", "MISS")), line


def test_bench_step_without_torch_reports_the_skip(monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # import torch fails
  mods, note = _bench_step_module()._torch_modules()
  assert mods is None and "torch" in note


def test_scope_profile_splits_kernel_time_by_named_scope():
  sys.path.insert(0, str(ROOT / "benchmarks"))
  try:
    import scope_profile
  finally:
    sys.path.remove(str(ROOT / "benchmarks"))
  import jax
  import jax.numpy as jnp

  def f(x, v):
    with jax.named_scope("heavy"):
      z = jnp.dot(x, x)  # a kernel of its own: the scope's
    w = jnp.sin(v) * 2.0  # outside the scope, small
    with jax.named_scope("heavy"):
      z = z[:, :64] + jnp.tanh(w)  # may fuse with the outside ops: mixed
    return z

  x, v = jnp.ones((384, 384)), jnp.ones((64,))
  compiled = jax.jit(f).lower(x, v).compile()
  text = compiled.as_text()
  classes = scope_profile.classify_kernels(text, "heavy")
  assert "scope" in classes.values(), classes
  assert set(scope_profile.classify_kernels(text, "absent").values()) <= {
    "other",
    "control",
  }
  shares = scope_profile.profile_scopes(
    lambda: jax.block_until_ready(compiled(x, v)),
    text,
    ("heavy", "absent"),
    runs=5,
  )
  heavy, absent = shares["heavy"], shares["absent"]
  assert heavy.runs == 5 and heavy.kernels >= 2
  # The 384³ matmul is most of the work: the scope's kernels dominate.
  assert heavy.scope_s > 0 and heavy.share > 0.3, heavy
  assert 0 <= heavy.share <= heavy.upper_share <= 1 + 1e-9
  assert absent.scope_s == absent.mixed_s == 0 and absent.share == 0
  assert abs(absent.total_s - heavy.total_s) <= 1e-9  # one profile


def test_bench_loop_quick_prints_both_loops_and_their_ratio(tmp_path):
  out_json = tmp_path / "loop.json"
  proc = subprocess.run(
    [
      sys.executable,
      str(ROOT / "benchmarks" / "bench_loop.py"),
      "--quick",
      "--log-every",
      "3",
      "--json",
      str(out_json),
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 0, proc.stderr
  rows = {
    line[:28].strip(): line[28:].split()
    for line in proc.stdout.splitlines()
    if line.startswith(("wait after", "fetch every"))
  }
  assert set(rows) == {"wait after every step", "fetch every 3 steps"}, (
    proc.stdout
  )
  assert rows["wait after every step"][1] == "1.00x", proc.stdout
  result = json.loads(out_json.read_text())
  assert sorted(result["epoch_seconds"]) == ["1", "3"]
  seconds = {k: np.median(v) for k, v in result["epoch_seconds"].items()}
  assert f"{result['ratio']:.2f}x" == rows["fetch every 3 steps"][1]
  np.testing.assert_allclose(result["ratio"], seconds["3"] / seconds["1"])


def test_bench_memory_smoke_prints_temp_bytes_and_verdicts():
  proc = subprocess.run(
    [sys.executable, str(ROOT / "benchmarks" / "bench_memory.py"), "--smoke"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 0, proc.stderr
  # Untimed rows end with: variant, temp MB, Δ/params.
  variants = {
    line.split()[-3]
    for line in proc.stdout.splitlines()
    if line.startswith(("mlp ", "branched-mlp "))
  }
  assert {"plain", "stacked", "gramian-auto", "staged-gramian"} <= variants
  # The smoke test times nothing, so the comparison says it is skipped.
  assert (
    "TorchJD autogram: skipped, steps are not timed (--no-time, --smoke)"
    in proc.stdout
  )
  assert "staged-gramian: temp" in proc.stdout  # a verdict line


def _bench_memory_module():
  sys.path.insert(0, str(ROOT / "benchmarks"))
  try:
    import bench_memory
  finally:
    sys.path.remove(str(ROOT / "benchmarks"))
  return bench_memory


def test_bench_memory_without_torch_reports_the_skip(monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # import torch fails
  mods, note = _bench_memory_module()._autogram_modules()
  assert mods is None
  assert note == "torch is not installed (pip install -e '.[bench]')"


@pytest.mark.parametrize(
  "repeats, granularities, variants, no_torch, reason",
  [
    (0, ("global",), ("plain", "gramian-auto"), False, "not timed"),
    (3, ("leaf",), ("plain", "gramian-auto"), False, "global granularity"),
    (3, ("global", "leaf"), ("plain", "stacked"), False, "not among"),
    (3, ("global",), ("plain", "gramian-auto"), True, "--no-torch"),
    (3, ("global",), ("plain", "gramian-auto"), False, None),
  ],
)
def test_bench_memory_says_which_option_skips_torchjd(
  repeats, granularities, variants, no_torch, reason
):
  got = _bench_memory_module()._autogram_skip_reason(
    repeats, granularities, variants, no_torch
  )
  if reason is None:
    assert got is None
  else:
    assert reason in got, got
