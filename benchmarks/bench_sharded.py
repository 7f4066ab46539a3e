"""Per-device memory and time of the sharded OSGD update on 1, 2, 4, 8 devices.

The stacked per-exit gradients of a zoo model (``(K, *param.shape)`` per
leaf) and their parameters are split over a ``model`` mesh axis of n devices
by :func:`osgd_jax.sharding.param_spec` (the largest dimension n divides;
leaves with none stay replicated). For every n the script prints, side by
side in one run:

* the bytes of stacked gradients held by the fullest device, and that figure
  times n over the one-device figure (1.00 = memory falls exactly as 1/n);
* the compiled update's per-device memory (arguments, outputs, temporaries,
  from XLA's ``memory_analysis``);
* the cross-device traffic of the update: the collectives in its HLO (only
  K×K all-reduces are expected; an all-gather would be a regression);
* the median update time, and its ratio to the one-device update.

Without accelerators, run it on host devices: the script sets
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` itself when no device
count is forced. Host "devices" share the machine's cores, so CPU times show
the overhead of partitioning, not a speed-up; the memory columns are exact.

Usage::

  python benchmarks/bench_sharded.py  # nested-depth-resnet, cifar preset
  python benchmarks/bench_sharded.py --quick  # smoke test, seconds
  python benchmarks/bench_sharded.py --model branched-resnet --method sequential
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get(
  "XLA_FLAGS", ""
):
  # Must precede JAX's backend start-up; harmless on GPU/TPU machines.
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8"
  )

import argparse
import json
import platform
import re
import statistics
import sys
import time
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

import osgd_jax
from osgd_jax import sharding, zoo

DEVICE_COUNTS = (1, 2, 4, 8)
# The smoke test: two stages of the digits MLP, so that its four compiles
# (1, 2, 4 and 8 devices) take seconds; each stage adds a third of its leaves.
QUICK = dict(
  model="nested-depth-mlp", preset="digits", repeats=3, overrides={"stages": 2}
)
_COLLECTIVES = re.compile(
  r"^\s*\S+ = (.*?) (all-gather|all-reduce|all-to-all|collective-permute|"
  r"reduce-scatter)(?:-start)?\(",
  re.MULTILINE,
)


def _model_params(name: str, preset: str, overrides: dict) -> nnx.State:
  conv = "in_channels" in zoo.config_keys(name)
  fit = {"in_channels": 3} if conv else {}
  model = zoo.create(
    name, rngs=nnx.Rngs(0), preset=preset, **{**fit, **overrides}
  )
  return nnx.state(model, nnx.Param), model.num_exits


def _per_device_bytes(tree) -> int:
  """Bytes of ``tree``'s shards on the device that holds the most."""
  held: dict[int, int] = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      held[shard.device.id] = held.get(shard.device.id, 0) + shard.data.nbytes
  return max(held.values())


def _collective_summary(hlo: str) -> str:
  """Counts the collectives and the arrays and bytes they move (per device)."""
  stats: dict[str, list[int]] = {}
  for shape, op in _COLLECTIVES.findall(hlo):
    arrays = re.findall(r"(f32|f64|bf16|f16)\[([\d,]*)\]", shape)
    nbytes = sum(
      int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
      * {"f64": 8, "f32": 4}.get(dtype, 2)
      for dtype, dims in arrays
    )
    entry = stats.setdefault(op, [0, 0, 0])
    entry[0] += 1
    entry[1] += len(arrays)
    entry[2] += nbytes
  if not stats:
    return "none"
  return "; ".join(
    f"{op}: {n} op(s), {a} arrays, {b} B" for op, (n, a, b) in stats.items()
  )


def _setup(params, num_exits: int, devices: int, method: str, granularity: str):
  mesh = sharding.make_mesh(
    {"data": 1, "model": devices}, devices=jax.devices()[:devices]
  )
  shardings = sharding.param_shardings(params, mesh)
  rng = np.random.default_rng(0)
  host = jax.tree.map(
    lambda p: rng.standard_normal((num_exits,) + p.shape, np.float32), params
  )
  stacked = jax.tree.map(
    lambda g, s: jax.device_put(g, s),
    host,
    sharding.stacked_shardings(shardings),
  )
  placed = jax.tree.map(lambda p, s: jax.device_put(p, s), params, shardings)
  tx = osgd_jax.osgd(
    method=method, granularity=granularity, num_exits=num_exits
  )
  state = tx.init(placed)
  update = jax.jit(lambda g, p: tx.update(g, state, p)[0])
  compiled = update.lower(stacked, placed).compile()
  return dict(
    mesh=mesh, stacked=stacked, params=placed, update=update, compiled=compiled
  )


def _time(fn, args, number: int) -> float:
  start = time.perf_counter()
  for _ in range(number):
    jax.block_until_ready(fn(*args))
  return (time.perf_counter() - start) / number


def run(
  model: str,
  preset: str,
  method: str,
  granularity: str,
  repeats: int,
  device_counts: Sequence[int],
  overrides: dict | None = None,
) -> list[dict]:
  params, num_exits = _model_params(model, preset, overrides or {})
  cases = {
    n: _setup(params, num_exits, n, method, granularity) for n in device_counts
  }
  numbers = {}
  for n, case in cases.items():
    args = (case["stacked"], case["params"])
    jax.block_until_ready(case["update"](*args))  # warm up
    once = _time(case["update"], args, 1)
    numbers[n] = max(1, min(200, int(0.05 / max(once, 1e-6))))
  samples = {n: [] for n in cases}
  for _ in range(repeats):  # interleaved, so noise hits every n alike
    for n, case in cases.items():
      samples[n].append(
        _time(case["update"], (case["stacked"], case["params"]), numbers[n])
      )
  rows = []
  for n, case in cases.items():
    memory = case["compiled"].memory_analysis()
    rows.append(
      dict(
        devices=n,
        num_exits=num_exits,
        params=int(sum(p.size for p in jax.tree.leaves(params))),
        stacked_bytes_per_device=_per_device_bytes(case["stacked"]),
        argument_bytes=getattr(memory, "argument_size_in_bytes", None),
        output_bytes=getattr(memory, "output_size_in_bytes", None),
        temp_bytes=getattr(memory, "temp_size_in_bytes", None),
        collectives=_collective_summary(case["compiled"].as_text()),
        median_s=statistics.median(samples[n]),
      )
    )
  base = rows[0]  # the one-device run
  for row in rows:
    row["memory_x_devices"] = (
      row["stacked_bytes_per_device"]
      * row["devices"]
      / base["stacked_bytes_per_device"]
    )
    row["time_ratio"] = row["median_s"] / base["median_s"]
  return rows


def _mb(n) -> str:
  return "-" if n is None else f"{n / 1e6:.2f}"


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--model", default="nested-depth-resnet", choices=zoo.names()
  )
  parser.add_argument("--preset", default="cifar")
  parser.add_argument(
    "--method", default="gram", choices=("gram", "sequential")
  )
  parser.add_argument(
    "--granularity", default="leaf", choices=("leaf", "global")
  )
  parser.add_argument("--repeats", type=int, default=9)
  parser.add_argument(
    "--devices", type=int, nargs="+", default=list(DEVICE_COUNTS)
  )
  parser.add_argument(
    "--quick",
    action="store_true",
    help="a tiny model and few repeats (smoke test)",
  )
  parser.add_argument("--json", help="also write the rows to this file")
  args = parser.parse_args(argv)
  overrides: dict = {}
  if args.quick:
    overrides = QUICK["overrides"]
    args.model, args.preset, args.repeats = (
      QUICK["model"],
      QUICK["preset"],
      QUICK["repeats"],
    )
  available = jax.device_count()
  if max(args.devices) > available:
    print(
      f"error: --devices needs {max(args.devices)} devices, only"
      f" {available} available",
      file=sys.stderr,
    )
    return 2
  if args.devices[0] != 1:
    args.devices = [1] + [n for n in args.devices if n != 1]

  rows = run(
    args.model,
    args.preset,
    args.method,
    args.granularity,
    args.repeats,
    args.devices,
    overrides,
  )
  first = rows[0]
  size = "".join(f", {k}={v}" for k, v in overrides.items())
  print(
    f"# {args.model} ({args.preset} preset{size}): {first['params']:,} params,"
    f" K={first['num_exits']}, osgd(method={args.method!r},"
    f" granularity={args.granularity!r})"
  )
  print(
    f"# backend {jax.default_backend()} ({jax.devices()[0].device_kind}),"
    f" jax {jax.__version__}, {platform.machine()}, {os.cpu_count()} cores;"
    f" median of {args.repeats} interleaved samples"
  )
  print(
    f"{'devices':>7} {'stacked MB/dev':>15} {'x devices/1-dev':>16}"
    f" {'args MB':>8} {'out MB':>7} {'temp MB':>8} {'update ms':>10}"
    f" {'x 1-dev':>8}  collectives"
  )
  for row in rows:
    scaled = row["memory_x_devices"]
    print(
      f"{row['devices']:>7} {_mb(row['stacked_bytes_per_device']):>15}"
      f" {scaled:>16.3f} {_mb(row['argument_bytes']):>8}"
      f" {_mb(row['output_bytes']):>7} {_mb(row['temp_bytes']):>8}"
      f" {row['median_s'] * 1e3:>10.3f} {row['time_ratio']:>8.2f}"
      f"  {row['collectives']}"
    )
  worst = max(row["memory_x_devices"] for row in rows)
  verdict = "PASS" if worst <= 1.05 else "MISS"
  print(
    f"memory per device x devices, worst over n: {worst:.3f}"
    f" (target: 1/devices scaling, <= 1.05) {verdict}"
  )
  if args.json:
    with open(args.json, "w") as f:
      json.dump(
        dict(
          model=args.model,
          preset=args.preset,
          method=args.method,
          granularity=args.granularity,
          backend=jax.default_backend(),
          rows=rows,
        ),
        f,
        indent=2,
      )
  return 0


if __name__ == "__main__":
  sys.exit(main())
