"""Times every aggregator's update against the one-pass floor, and TorchJD's.

For each aggregator of the library (TorchJD 0.18's list, plus OSGD) and each
K, one stacked float32 gradient buffer ``(K, N)`` is built; the jitted
update is timed against the floor measured on the same buffer in the same
run (one fused weighted sum over K, as in ``bench_transform.py``), and
TorchJD's aggregator is timed on the same matrix, as a torch tensor, when
torch and TorchJD are installed (CAGrad and Nash-MTL need cvxpy there, and
are skipped without it). Every function is warmed up first; samples are
interleaved; times are medians. Nothing is asserted: timings on a shared
machine are evidence, not a test. The CPU backend runs each program on the
calling thread (see ``bench_transform.py`` for why).

Usage::

  python benchmarks/bench_aggregators.py                 # K = 2, 4, 8; N = 1e6
  python benchmarks/bench_aggregators.py --quick         # smoke test
  python benchmarks/bench_aggregators.py --size 1e5 --only upgrad cagrad
  python benchmarks/bench_aggregators.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

import osgd_jax

DEFAULT_KS = (2, 4, 8)
MIN_SAMPLE_S = 0.02

# name -> (factory of the transform for K, the smallest K it takes).
TRANSFORMS: dict[str, tuple[Callable[[int], object], int]] = {
  "osgd": (lambda k: osgd_jax.osgd(num_exits=k, granularity="global"), 1),
  "mean": (lambda k: osgd_jax.weighted_sum("mean", num_exits=k), 1),
  "random_weighting": (lambda k: osgd_jax.random_weighting(num_exits=k), 1),
  "pcgrad": (lambda k: osgd_jax.pcgrad(num_exits=k), 1),
  "mgda": (lambda k: osgd_jax.mgda(num_exits=k), 1),
  "upgrad": (lambda k: osgd_jax.upgrad(num_exits=k), 1),
  "imtl_g": (lambda k: osgd_jax.imtl_g(num_exits=k), 1),
  "aligned_mtl": (lambda k: osgd_jax.aligned_mtl(num_exits=k), 1),
  "krum": (lambda k: osgd_jax.krum(num_exits=k), 3),
  "dualproj": (lambda k: osgd_jax.dualproj(num_exits=k), 1),
  "gradvac": (lambda k: osgd_jax.gradvac(num_exits=k), 1),
  "cagrad": (lambda k: osgd_jax.cagrad(num_exits=k), 1),
  "config": (lambda k: osgd_jax.aggregation.config(num_exits=k), 1),
  "fairgrad": (lambda k: osgd_jax.fairgrad(num_exits=k), 1),
  "nash_mtl": (lambda k: osgd_jax.nash_mtl(num_exits=k), 1),
  "modo": (lambda k: osgd_jax.modo(num_exits=k), 1),
  "sdmgrad": (lambda k: osgd_jax.sdmgrad(num_exits=k), 1),
  "pcd": (lambda k: osgd_jax.pcd(num_exits=k), 1),
  "crmogm": (lambda k: osgd_jax.crmogm("upgrad", num_exits=k), 1),
  "trimmed_mean": (lambda k: osgd_jax.trimmed_mean(k, trim_number=1), 3),
  "graddrop": (lambda k: osgd_jax.graddrop(num_exits=k), 1),
  "excess_mtl": (lambda k: osgd_jax.excess_mtl(num_exits=k), 1),
}


def _torchjd_factories() -> dict[str, Callable[[int], Callable]]:
  """TorchJD's aggregators by our names, or {} without torch and TorchJD."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
    from torchjd import aggregation as agg  # pylint: disable=import-outside-toplevel
  except ImportError:
    return {}

  def on_gramian(weighting):
    return lambda m: weighting(m @ m.T) @ m

  out = {
    "mean": lambda k: agg.Mean(),
    "random_weighting": lambda k: agg.Random(),
    "pcgrad": lambda k: agg.PCGrad(),
    "mgda": lambda k: agg.MGDA(),
    "upgrad": lambda k: agg.UPGrad(),
    "imtl_g": lambda k: agg.IMTLG(),
    "aligned_mtl": lambda k: agg.AlignedMTL(),
    "krum": lambda k: agg.Krum(n_byzantine=0),
    "dualproj": lambda k: agg.DualProj(),
    "gradvac": lambda k: agg.GradVac(),
    "config": lambda k: agg.ConFIG(),
    "fairgrad": lambda k: agg.FairGrad(alpha=1.0),
    "modo": lambda k: on_gramian(agg.MoDoWeighting()),
    "sdmgrad": lambda k: on_gramian(agg.SDMGradWeighting()),
    "pcd": lambda k: agg.PCD(),
    "crmogm": lambda k: agg.GramianWeightedAggregator(
      agg.CRMOGMWeighting(agg.UPGradWeighting())
    ),
    "trimmed_mean": lambda k: agg.TrimmedMean(trim_number=1),
    "graddrop": lambda k: agg.GradDrop(),
    "excess_mtl": lambda k: agg.ExcessMTL(),
  }
  for name, make in (
    ("cagrad", lambda k: agg.CAGrad(c=0.4)),
    ("nash_mtl", lambda k: agg.NashMTL(n_tasks=k)),
  ):
    try:
      make(2)
      out[name] = make
    except ImportError:  # cvxpy and its solvers are optional in TorchJD
      pass
  out["_torch"] = torch
  return out


def _time(fn: Callable, number: int) -> float:
  start = time.perf_counter()
  for _ in range(number):
    fn()
  return (time.perf_counter() - start) / number


def _bench(calls: dict[str, Callable], repeats: int) -> dict[str, float]:
  numbers = {}
  for name, fn in calls.items():
    fn()
    once = _time(fn, 1)
    numbers[name] = max(1, min(1000, int(MIN_SAMPLE_S / max(once, 1e-7))))
  samples = {name: [] for name in calls}
  for _ in range(repeats):
    for name, fn in calls.items():
      samples[name].append(_time(fn, numbers[name]))
  return {name: statistics.median(s) for name, s in samples.items()}


def run(ks, size: int, repeats: int, only=None) -> list[dict]:
  """Times every aggregator at every K; one row per (aggregator, K)."""
  torchjd = _torchjd_factories()
  torch = torchjd.pop("_torch", None)
  names = [n for n in TRANSFORMS if not only or n in only]
  rows = []
  for k in ks:
    key = jax.random.key(k)
    grads = {"w": jax.random.normal(key, (k, size), jnp.float32)}
    weights = jnp.linspace(1.0, 2.0, k, dtype=jnp.float32)
    floor = jax.jit(lambda w, g: jnp.tensordot(w, g["w"], axes=1))
    calls = {
      "floor": lambda f=floor, w=weights, g=grads: jax.block_until_ready(
        f(w, g)
      )
    }
    params = {"w": jnp.zeros((size,), jnp.float32)}
    for name in names:
      make, min_k = TRANSFORMS[name]
      if k < min_k:
        continue
      tx = make(k)
      update = jax.jit(tx.update)
      state = tx.init(params)
      calls[name] = lambda u=update, s=state, g=grads, p=params: (
        jax.block_until_ready(u(g, s, p))
      )
    matrix = (
      torch.from_numpy(jax.device_get(grads["w"]).copy())
      if torch is not None
      else None
    )
    for name in names:
      if name in torchjd and k >= TRANSFORMS[name][1]:
        aggregator = torchjd[name](k)
        calls[f"torchjd:{name}"] = lambda a=aggregator, m=matrix: a(m)
    times = _bench(calls, repeats)
    for name in names:
      if name not in times:
        continue
      theirs = times.get(f"torchjd:{name}")
      rows.append(
        dict(
          name=name,
          K=k,
          N=size,
          floor_ms=times["floor"] * 1e3,
          ms=times[name] * 1e3,
          x_floor=times[name] / times["floor"],
          torchjd_ms=None if theirs is None else theirs * 1e3,
        )
      )
  return rows


def format_table(rows: list[dict]) -> str:
  lines = [
    "| aggregator | K | N | floor ms | ms | × floor | TorchJD ms |",
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
  ]
  for r in rows:
    theirs = "—" if r["torchjd_ms"] is None else f"{r['torchjd_ms']:.2f}"
    lines.append(
      f"| {r['name']} | {r['K']} | {r['N']:.0e} |"
      f" {r['floor_ms']:.3f} | {r['ms']:.3f} | {r['x_floor']:.1f} |"
      f" {theirs} |"
    )
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--ks", type=int, nargs="+", default=list(DEFAULT_KS))
  p.add_argument("--size", type=float, default=1e6)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--only", nargs="+", choices=sorted(TRANSFORMS))
  p.add_argument(
    "--quick",
    action="store_true",
    help="K = 2, N = 1e4, 2 repeats, a few aggregators",
  )
  p.add_argument("--json")
  args = p.parse_args(argv)
  if jax.default_backend() == "cpu":
    jax.config.update("jax_cpu_enable_async_dispatch", False)
  if args.quick:
    args.ks, args.size, args.repeats = [2], 1e4, 2
    args.only = args.only or ["osgd", "upgrad", "cagrad", "graddrop"]
  rows = run(args.ks, int(args.size), args.repeats, args.only)
  print(f"# {platform.machine()} {jax.default_backend()} jax {jax.__version__}")
  print(format_table(rows))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
