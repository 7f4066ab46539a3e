"""The training loop with a host wait after every step, against one per fetch.

``osgd_jax.app.train.train_epoch`` fetches the step losses from the device
every ``log_every`` steps. With ``log_every=1`` it waits on the device after
every step, as the loop did before it fetched in windows. This script times
whole epochs of one started run both ways, alternating them in one process so
that both see the same machine, and prints their ratio.

On a CPU the device is the host, so the ratio says whether the window costs
anything there; the gain it is for (the host reading the next batch while
the accelerator computes) shows only on a GPU or TPU.

Usage:
  python benchmarks/bench_loop.py                 # the default osgd-train run
  python benchmarks/bench_loop.py --quick         # smoke test
  python benchmarks/bench_loop.py --model nested-depth-mlp --repeats 7
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import tempfile
import time

import jax

from osgd_jax.app.train import TrainConfig, start_run, train_epoch


def _time_epoch(run, state, log_every: int):
  """``(seconds, state)``: one epoch from ``state``, which it donates."""
  run = dataclasses.replace(
    run, config=dataclasses.replace(run.config, log_every=log_every)
  )
  start = time.perf_counter()
  state, _, _ = train_epoch(run, state, epoch=0)
  jax.block_until_ready(state)
  return time.perf_counter() - start, state


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  defaults = TrainConfig()
  parser.add_argument("--model", default=defaults.model)
  parser.add_argument("--optimizer", default=defaults.optimizer)
  parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
  parser.add_argument(
    "--log-every",
    type=int,
    default=defaults.log_every,
    help="the windowed loop's fetch interval",
  )
  parser.add_argument(
    "--repeats", type=int, default=5, help="epochs timed per loop, alternating"
  )
  parser.add_argument(
    "--quick",
    action="store_true",
    help="a small MLP with plain SGD, one repeat of a few steps: a smoke test",
  )
  parser.add_argument("--json", help="also write the figures to this file")
  args = parser.parse_args()
  if args.quick:
    args.model, args.optimizer, args.batch_size, args.repeats = (
      "nested-depth-mlp",
      "sgd",
      256,
      1,
    )

  with tempfile.TemporaryDirectory() as out:
    config = TrainConfig(
      model=args.model,
      optimizer=args.optimizer,
      batch_size=args.batch_size,
      epochs=1,
      progress=False,
      out=out,
    )
    run, state = start_run(config)
    run.store.close()  # nothing is saved
    _, state = _time_epoch(run, state, 1)  # compiles the step
    times: dict[int, list[float]] = {1: [], args.log_every: []}
    for _ in range(args.repeats):
      for log_every in times:
        seconds, state = _time_epoch(run, state, log_every)
        times[log_every].append(seconds)

  per_step = {
    k: statistics.median(v) / run.steps_per_epoch for k, v in times.items()
  }
  ratio = per_step[args.log_every] / per_step[1]
  print(
    f"{args.model} {args.optimizer}, batch {args.batch_size},"
    f" {run.steps_per_epoch} steps per epoch, {args.repeats} epochs each,"
    f" backend {jax.default_backend()}"
  )
  print(f"{'loop':<28}{'ms/step':>10}{'ratio':>8}")
  print(f"{'wait after every step':<28}{1e3 * per_step[1]:>10.2f}{1.0:>7.2f}x")
  print(
    f"{f'fetch every {args.log_every} steps':<28}"
    f"{1e3 * per_step[args.log_every]:>10.2f}{ratio:>7.2f}x"
  )
  if args.json:
    with open(args.json, "w") as f:
      json.dump(
        {
          "meta": {
            **vars(args),
            "backend": jax.default_backend(),
            "machine": platform.platform(),
            "steps_per_epoch": run.steps_per_epoch,
          },
          "epoch_seconds": {str(k): v for k, v in times.items()},
          "ratio": ratio,
        },
        f,
        indent=1,
      )


if __name__ == "__main__":
  main()
