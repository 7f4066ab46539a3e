"""Times the OSGD transform against a memory floor measured in the same run.

OSGD is memory bound: the K×K algebra is negligible next to reading the
stacked ``(K, N)`` gradient buffer. So the useful yardstick is not FLOPs but
the cost of one fused pass over that buffer, measured here as a jitted
weighted sum over K on the very same buffer, in two forms: a contraction
(``jnp.tensordot(w, G, axes=1)``) and K scaled rows added elementwise (the
library's ``gram.weighted_sum``). The floor is the faster of the two.
``method="gram"`` needs two passes (the Gram matrix, then the weighted sum),
so its ideal is about 2× the floor; the target is 3×. ``method="sequential"``
makes O(K) passes and is reported for comparison only.

Every timed function is jitted once and warmed up; then the floor and the
methods are called in turn, ``--repeats`` times, so machine noise hits all of
them alike. Times are medians. The target verdict (PASS/MISS) is printed, never
asserted: timings on a shared machine are evidence, not a test.

Each call is timed to its end (``block_until_ready``), which on the CPU
backend, with JAX's default asynchronous dispatch, hands the program to a
runtime thread and puts the calling thread to sleep until it is done. Once a
program runs longer than the caller's short wait before sleeping, waking it
again costs the call a fixed delay: small rows would measure that hand-off,
not the work. So by default the CPU
backend runs each program on the calling thread
(``jax_cpu_enable_async_dispatch=False``), for the floor and the methods
alike; ``--dispatch async`` keeps JAX's default. Inside a training step the
transform is part of one program and pays no hand-off of its own.

Usage::

  python benchmarks/bench_transform.py                  # full run
  python benchmarks/bench_transform.py --quick          # smoke test, seconds
  python benchmarks/bench_transform.py --sizes 1e5 1e6 --ks 2 8 --json out.json
  python benchmarks/bench_transform.py --dispatch async  # JAX's CPU default
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

import osgd_jax
from osgd_jax import gram as gram_lib

METHODS = ("gram", "sequential")
TARGET_RATIO = 3.0  # gram's target, as a multiple of the floor
TARGET_METHOD = "gram"
DEFAULT_SIZES = (10**4, 10**5, 10**6, 10**7)
DEFAULT_KS = (2, 4, 8)
DEFAULT_LEAVES = 20
MIN_SAMPLE_S = 0.02  # calls are batched so that one sample lasts about this
# Each case compiles two osgd updates, so --quick keeps few.
QUICK = dict(sizes=(10**4,), ks=(2,), repeats=3, leaves=3)


class Case(NamedTuple):
  """One benchmarked configuration: a pytree layout, a granularity, K and N."""

  layout: str  # "single" (one leaf of N) or "multi" (several leaves, N total)
  granularity: str
  num_exits: int
  size: int


def _leaf_shapes(size: int, num_leaves: int) -> list[tuple[int, ...]]:
  """Splits ``size`` parameters into ``num_leaves`` tensors, mostly 2-D.

  2-D leaves exercise the contraction over several trailing axes, as a dense
  kernel would; the last leaf takes the remainder so the total is exactly N.
  """
  per_leaf = max(size // num_leaves, 1)
  shapes = []
  remaining = size
  for i in range(num_leaves):
    n = remaining if i == num_leaves - 1 else min(per_leaf, remaining)
    if n <= 0:
      break
    remaining -= n
    cols = 100 if n % 100 == 0 and n >= 100 else 1
    shapes.append((n // cols, cols) if cols > 1 else (n,))
  return shapes


def _make_grads(
  case: Case, num_leaves: int, key: jax.Array
) -> dict[str, jax.Array]:
  """Random stacked gradients ``{name: (K, *shape)}`` in float32."""
  shapes = (
    [(case.size,)]
    if case.layout == "single"
    else _leaf_shapes(case.size, num_leaves)
  )
  keys = jax.random.split(key, len(shapes))
  return {
    f"p{i:02d}": jax.random.normal(k, (case.num_exits,) + s, jnp.float32)
    for i, (k, s) in enumerate(zip(keys, shapes, strict=True))
  }


def _floor_fns() -> dict[str, Callable]:
  """One fused read of every stacked leaf: a weighted sum over K per leaf.

  Two forms, since which is faster depends on the backend and the leaf's
  shape: a contraction over K, and K scaled rows added elementwise. The
  weights are an argument, not a constant, so XLA cannot fold them away or
  turn the sum into a plain reduction.
  """

  def contraction(weights, grads):
    return jax.tree.map(lambda g: jnp.tensordot(weights, g, axes=1), grads)

  def rows(weights, grads):
    return jax.tree.map(
      lambda g: gram_lib.weighted_sum(weights, g, jnp.float32), grads
    )

  return {"floor-tensordot": jax.jit(contraction), "floor-rows": jax.jit(rows)}


def _method_fn(case: Case, method: str, grads) -> Callable:
  """The whole ``osgd`` update (projection and diagnostics), jitted."""
  tx = osgd_jax.osgd(
    granularity=case.granularity, method=method, num_exits=case.num_exits
  )
  params = jax.tree.map(
    lambda g: jax.ShapeDtypeStruct(g.shape[1:], g.dtype), grads
  )
  state = tx.init(params)

  def update(grads):
    return tx.update(grads, state)

  return jax.jit(update)


def _time_calls(fn: Callable, args: tuple, number: int) -> float:
  """Mean seconds per call over ``number`` back-to-back calls."""
  start = time.perf_counter()
  for _ in range(number):
    jax.block_until_ready(fn(*args))
  return (time.perf_counter() - start) / number


def _run_case(
  case: Case,
  methods: Sequence[str],
  repeats: int,
  num_leaves: int,
  key: jax.Array,
) -> dict:
  """Times the floor and each method on one buffer, interleaved."""
  grads = _make_grads(case, num_leaves, key)
  weights = jnp.linspace(1.0, 2.0, case.num_exits, dtype=jnp.float32)
  calls = {name: (fn, (weights, grads)) for name, fn in _floor_fns().items()}
  for method in methods:
    calls[method] = (_method_fn(case, method, grads), (grads,))
  # Compile and warm up (the first call also pages in the buffers), then size
  # each sample to last about MIN_SAMPLE_S: small sizes run in microseconds,
  # where one call per sample would measure the timer and the scheduler.
  numbers = {}
  for name, (fn, args) in calls.items():
    jax.block_until_ready(fn(*args))
    once = _time_calls(fn, args, 1)
    numbers[name] = max(1, min(1000, int(MIN_SAMPLE_S / max(once, 1e-7))))
  samples = {name: [] for name in calls}
  for _ in range(repeats):
    for name, (fn, args) in calls.items():
      samples[name].append(_time_calls(fn, args, numbers[name]))
  nbytes = sum(g.size * g.dtype.itemsize for g in grads.values())
  del grads, calls
  times = {name: statistics.median(s) for name, s in samples.items()}
  mins = {name: min(s) for name, s in samples.items()}
  floor_form = min(("floor-tensordot", "floor-rows"), key=times.get)
  times["floor"], mins["floor"] = times[floor_form], mins[floor_form]
  return dict(
    layout=case.layout,
    granularity=case.granularity,
    K=case.num_exits,
    N=case.size,
    leaves=1 if case.layout == "single" else num_leaves,
    bytes=nbytes,
    median_s=times,
    floor_form=floor_form,
    min_s=mins,
    gb_per_s={name: nbytes / t / 1e9 for name, t in times.items()},
    ratio={m: times[m] / times["floor"] for m in methods},
    ratio_of_mins={m: mins[m] / mins["floor"] for m in methods},
  )


def _fmt_bytes(n: float) -> str:
  for unit in ("B", "KB", "MB", "GB"):
    if n < 1000 or unit == "GB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1000
  raise AssertionError("unreachable")


HEADER = (
  f"{'layout':<7} {'gran':<6} {'K':>2} {'N':>10} {'buffer':>9}"
  f" {'floor ms':>9} {'GB/s':>6}  {'method':<10} {'ms':>9} {'GB/s':>6}"
  f" {'x floor':>8}  target"
)


def _rows(result: dict) -> list[str]:
  lines = []
  floor_ms = result["median_s"]["floor"] * 1e3
  for i, method in enumerate(result["ratio"]):
    ratio = result["ratio"][method]
    if method == TARGET_METHOD:
      verdict = "PASS" if ratio <= TARGET_RATIO else "MISS"
    else:
      verdict = "-"
    # The case and floor columns are printed once per case to keep it legible.
    prefix = (
      f"{result['layout']:<7} {result['granularity']:<6}"
      f" {result['K']:>2} {result['N']:>10,} {_fmt_bytes(result['bytes']):>9}"
      f" {floor_ms:>8.3f}{result['floor_form'][6]}"
      f" {result['gb_per_s']['floor']:>6.1f}"
      if i == 0
      else " " * 55
    )
    lines.append(
      f"{prefix}  {method:<10} {result['median_s'][method] * 1e3:>9.3f}"
      f" {result['gb_per_s'][method]:>6.1f} {ratio:>7.2f}x  {verdict}"
    )
  return lines


def _parse_sizes(values: Sequence[str]) -> list[int]:
  return [int(float(v)) for v in values]  # accepts 1e6 as well as 1000000


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--sizes",
    nargs="+",
    default=None,
    help="total parameter counts N (e.g. 1e4 1e5); default"
    f" {' '.join(f'{s:.0e}' for s in DEFAULT_SIZES)}",
  )
  parser.add_argument(
    "--ks",
    nargs="+",
    type=int,
    default=None,
    help=f"numbers of exits K; default {DEFAULT_KS}",
  )
  parser.add_argument(
    "--repeats",
    type=int,
    default=None,
    help="timed samples per function (median taken); default 5",
  )
  parser.add_argument(
    "--leaves",
    type=int,
    default=None,
    help=f"leaves in the multi-leaf pytree; default {DEFAULT_LEAVES}",
  )
  parser.add_argument(
    "--methods", nargs="+", default=list(METHODS), choices=METHODS
  )
  parser.add_argument(
    "--no-multi", action="store_true", help="skip the multi-leaf rows"
  )
  parser.add_argument(
    "--quick", action="store_true", help="tiny configuration for a smoke test"
  )
  parser.add_argument("--json", metavar="PATH", help="write results as JSON")
  parser.add_argument(
    "--dispatch",
    choices=("sync", "async"),
    default="sync",
    help="CPU backend: run each program on the calling"
    " thread (sync, default) or hand it to a runtime"
    " thread (async, JAX's default); see the module"
    " docstring",
  )
  args = parser.parse_args(argv)
  # Read when the CPU client is created: before the first computation.
  jax.config.update("jax_cpu_enable_async_dispatch", args.dispatch == "async")

  base = (
    QUICK
    if args.quick
    else dict(
      sizes=DEFAULT_SIZES, ks=DEFAULT_KS, repeats=5, leaves=DEFAULT_LEAVES
    )
  )
  sizes = _parse_sizes(args.sizes) if args.sizes else list(base["sizes"])
  ks = args.ks or list(base["ks"])
  repeats = args.repeats or base["repeats"]
  num_leaves = args.leaves or base["leaves"]

  device = jax.devices()[0]
  print(
    f"jax {jax.__version__}, backend {jax.default_backend()},"
    f" device {device.device_kind} ({device}), {jax.device_count()} device(s);"
    f" python {platform.python_version()}"
  )
  # Read back from JAX's config: what the runs below actually use.
  dispatch = (
    "async" if jax.config.read("jax_cpu_enable_async_dispatch") else "sync"
  )
  print(
    f"float32; {dispatch} dispatch on CPU;"
    f" median of {repeats} interleaved samples"
    f" (each >= {MIN_SAMPLE_S * 1e3:g} ms of back-to-back calls)"
    f" after warm-up;"
    f" floor = the faster of two jitted weighted sums over K on the same"
    f" buffer (t: tensordot(w, G, axes=1), r: K rows added elementwise);"
    f" GB/s = buffer bytes / time; target: {TARGET_METHOD} <="
    f" {TARGET_RATIO:g}x floor"
  )

  cases = [Case("single", "leaf", k, n) for n in sizes for k in ks]
  if not args.no_multi:
    cases += [
      Case("multi", g, k, n)
      for g in ("leaf", "global")
      for n in sizes
      for k in ks
    ]

  results = []
  key = jax.random.key(0)
  start = time.perf_counter()
  last_section = None
  for case in cases:
    section = (case.layout, case.granularity)
    if section != last_section:
      leaves = 1 if case.layout == "single" else num_leaves
      print(
        f"\n== {case.layout}-leaf pytree ({leaves}"
        f" {'leaf' if leaves == 1 else 'leaves'}),"
        f" granularity={case.granularity!r} =="
      )
      print(HEADER)
      last_section = section
    key, sub = jax.random.split(key)
    result = _run_case(case, args.methods, repeats, num_leaves, sub)
    results.append(result)
    for line in _rows(result):
      print(line, flush=True)

  target_rows = [r for r in results if TARGET_METHOD in r["ratio"]]
  misses = [r for r in target_rows if r["ratio"][TARGET_METHOD] > TARGET_RATIO]
  print(
    f"\n{TARGET_METHOD}: {len(target_rows) - len(misses)}/{len(target_rows)}"
    f" rows within {TARGET_RATIO:g}x of the floor;"
    f" total {time.perf_counter() - start:.1f} s"
  )

  if args.json:
    meta = dict(
      jax=jax.__version__,
      backend=jax.default_backend(),
      device=str(device),
      device_kind=device.device_kind,
      python=platform.python_version(),
      repeats=repeats,
      dispatch=dispatch,
      target_ratio=TARGET_RATIO,
      argv=sys.argv[1:],
    )
    with open(args.json, "w") as f:
      json.dump(dict(meta=meta, results=results), f, indent=2)
  return 0  # timings never fail the run


if __name__ == "__main__":
  sys.exit(main())
