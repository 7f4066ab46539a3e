"""Compiled memory and step time of the Gramian engine against the stack.

For each network, one jitted training step (per-exit losses, their
gradients or Gramian, ``osgd`` then SGD with momentum) per way of forming
what the aggregator reads:

- ``plain``: the summed-loss gradient and SGD, the floor;
- ``stacked``: ``value_and_per_exit_grads``, the K×P stack (vmapped VJP);
- ``staged-stacked``: ``staged_value_and_per_exit_grads`` (zoo models);
- ``gramian-vmap``, ``gramian-scan``, ``gramian-auto``: ``value_and_gramian``
  with each ``form``;
- ``staged-gramian``: ``staged_value_and_gramian`` (zoo models).

It prints XLA's compiled temp bytes (``jax.jit(step).lower(...).compile()
.memory_analysis().temp_size_in_bytes``: deterministic for a backend and
shapes) and, unless ``--no-time``, the step time and its ratio to the plain
step (indicative only on a shared machine). Networks: every zoo model with
a ``cifar`` preset at batch 128 (the others are skipped, and said so), and
a parameter-dominated MLP (four 2048-wide layers, ~19M parameters, K exit
heads spread over its depth) at batch 64 for each ``--mlp-exits`` K, both
granularities. Verdicts against the targets of the Gramian engine's issue
are printed, never asserted. TorchJD's ``autogram`` is timed where torch
and torchjd are installed; otherwise the script says it skipped it.

  python benchmarks/bench_memory.py                  # everything
  python benchmarks/bench_memory.py --smoke          # seconds: a smoke test
  python benchmarks/bench_memory.py --models branched-resnet --repeats 3
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import platform
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import osgd_jax
from osgd_jax import zoo
from osgd_jax.losses import per_exit_cross_entropy

MB = 1 << 20
ZOO_VARIANTS = (
  "plain",
  "stacked",
  "staged-stacked",
  "gramian-vmap",
  "gramian-scan",
  "gramian-auto",
  "staged-gramian",
)
MLP_VARIANTS = (
  "plain",
  "stacked",
  "gramian-vmap",
  "gramian-scan",
  "gramian-auto",
)


class ExitMLP(nnx.Module):
  """A dense trunk with K exit heads spread evenly over its depth.

  Exit k reads hidden layer ``ceil((k + 1) L / K) - 1``, so the parameters
  barely change with K (a head is ``width × classes``): the network on
  which the engine's memory must not grow with K.
  """

  def __init__(
    self,
    in_features: int,
    width: int,
    layers: int,
    num_exits: int,
    num_classes: int,
    rngs: nnx.Rngs,
  ):
    sizes = [in_features] + [width] * layers
    self.layers = nnx.List(
      [
        nnx.Linear(a, b, rngs=rngs)
        for a, b in zip(sizes[:-1], sizes[1:], strict=True)
      ]
    )
    self.heads = nnx.List(
      [nnx.Linear(width, num_classes, rngs=rngs) for _ in range(num_exits)]
    )
    self.reads = [
      math.ceil((k + 1) * layers / num_exits) - 1 for k in range(num_exits)
    ]

  def __call__(self, x: jax.Array) -> jax.Array:
    hidden = []
    for layer in self.layers:
      x = jax.nn.relu(layer(x))
      hidden.append(x)
    return jnp.stack(
      [head(hidden[i]) for head, i in zip(self.heads, self.reads, strict=True)]
    )


def _make_step(
  variant: str, graphdef: Any, num_exits: int, granularity: str
) -> Callable:
  """A step ``(params, rest, opt_state, x, y)`` to the next, and the tx."""

  def exit_losses(params, rest, x, y):
    model = nnx.merge(graphdef, params, rest, copy=True)
    losses = per_exit_cross_entropy(model(x), y)
    return losses, nnx.state(model, nnx.Not(nnx.Param))

  def logits_losses(logits, y):
    return per_exit_cross_entropy(logits, y)

  sgd = optax.sgd(0.01, momentum=0.9)
  if variant == "plain":
    tx = sgd

    def grads_of(params, rest, x, y):
      def total(p):
        losses, new_rest = exit_losses(p, rest, x, y)
        return losses.sum(), (losses, new_rest)

      (_, (losses, new_rest)), grads = jax.value_and_grad(total, has_aux=True)(
        params
      )
      return losses, new_rest, grads

  else:
    tx = optax.chain(
      osgd_jax.osgd(num_exits=num_exits, granularity=granularity), sgd
    )
    kind, _, form = variant.partition("-")
    if kind == "staged":
      make = (
        osgd_jax.staged_value_and_gramian
        if form == "gramian"
        else osgd_jax.staged_value_and_per_exit_grads
      )
      staged = make(graphdef, logits_losses)

      def grads_of(params, rest, x, y):
        (losses, new_rest), grads = staged(params, rest, x, y)
        return losses, new_rest, grads

    else:
      if kind == "gramian":
        fn = osgd_jax.value_and_gramian(exit_losses, has_aux=True, form=form)
      else:
        fn = osgd_jax.value_and_per_exit_grads(exit_losses, has_aux=True)

      def grads_of(params, rest, x, y):
        (losses, new_rest), grads = fn(params, rest, x, y)
        return losses, new_rest, grads

  def step(params, rest, opt_state, x, y):
    losses, rest, grads = grads_of(params, rest, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), rest, opt_state, losses

  return step, tx


def _measure(
  variant: str,
  model: nnx.Module,
  num_exits: int,
  granularity: str,
  x: jax.Array,
  y: jax.Array,
  repeats: int,
) -> dict[str, Any]:
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  step, tx = _make_step(variant, graphdef, num_exits, granularity)
  state = tx.init(params)
  jitted = jax.jit(step, donate_argnums=(0, 1, 2))
  start = time.perf_counter()
  compiled = jitted.lower(params, rest, state, x, y).compile()
  compile_s = time.perf_counter() - start
  analysis = compiled.memory_analysis()
  temp = None if analysis is None else analysis.temp_size_in_bytes
  seconds = None
  if repeats:
    carry = jax.tree.map(jnp.copy, (params, rest, state))
    carry = compiled(*carry, x, y)[:3]  # warm-up
    jax.block_until_ready(carry)
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      *carry, losses = compiled(*carry, x, y)
      jax.block_until_ready(losses)
      times.append(time.perf_counter() - start)
    seconds = min(times)
  return {"temp": temp, "seconds": seconds, "compile_s": compile_s}


def _param_bytes(model: nnx.Module) -> int:
  return sum(
    x.size * x.dtype.itemsize
    for x in jax.tree.leaves(nnx.state(model, nnx.Param))
  )


def _row(label, variant, result, plain, param_bytes, out):
  temp = result["temp"]
  extra = (temp - plain["temp"]) / param_bytes
  line = f"{label:<34} {variant:<15} {temp / MB:>10.1f} {extra:>+9.2f}"
  if result["seconds"] is not None:
    ratio = result["seconds"] / plain["seconds"]
    line += f" {result['seconds'] * 1e3:>10.1f} {ratio:>7.2f}x"
  out(line)


def _header(out, timed):
  line = f"{'network':<34} {'variant':<15} {'temp MB':>10} {'Δ/params':>9}"
  if timed:
    line += f" {'step ms':>10} {'/plain':>8}"
  out(line)
  out("-" * len(line))


def run_network(
  label, model, num_exits, granularity, x, y, variants, repeats, out
):
  param_bytes = _param_bytes(model)
  results = {}
  for variant in variants:
    results[variant] = _measure(
      variant, model, num_exits, granularity, x, y, repeats
    )
    _row(label, variant, results[variant], results["plain"], param_bytes, out)
  return results, param_bytes


def _zoo_models(names: Sequence[str] | None, out) -> list[str]:
  chosen = []
  for name in names or zoo.names():
    if "cifar" in zoo.presets(name):
      chosen.append(name)
    else:
      out(f"skipped {name}: it has no cifar preset")
  return chosen


def _torchjd_autogram(out) -> None:
  if importlib.util.find_spec("torch") is None:
    out("TorchJD autogram: skipped, torch is not installed (the bench extra)")
    return
  if importlib.util.find_spec("torchjd") is None:
    out("TorchJD autogram: skipped, torchjd is not installed (the bench extra)")
    return
  if importlib.util.find_spec("torchjd.autogram") is None:
    out("TorchJD autogram: skipped, this torchjd has no autogram engine")
    return
  out(
    "TorchJD autogram: installed, but this script does not time it yet;"
    " see benchmarks/RESULTS.md"
  )


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", nargs="*", help="zoo names (default: all)")
  parser.add_argument(
    "--no-zoo", action="store_true", help="only the parameter-dominated MLP"
  )
  parser.add_argument("--batch", type=int, default=128, help="zoo batch")
  parser.add_argument("--mlp-batch", type=int, default=64)
  parser.add_argument("--mlp-width", type=int, default=2048)
  parser.add_argument("--mlp-layers", type=int, default=4)
  parser.add_argument(
    "--mlp-exits", type=int, nargs="*", default=[4, 8], help="K of the MLP"
  )
  parser.add_argument(
    "--repeats", type=int, default=5, help="timed steps per variant (min)"
  )
  parser.add_argument(
    "--no-time", action="store_true", help="compiled memory only"
  )
  parser.add_argument(
    "--smoke",
    action="store_true",
    help="a small MLP and one small zoo model, no timing: seconds",
  )
  args = parser.parse_args(argv)
  out = print
  repeats = 0 if args.no_time or args.smoke else args.repeats
  mlp_variants, zoo_variants = MLP_VARIANTS, ZOO_VARIANTS
  granularities = ("global", "leaf")
  if args.smoke:
    # Few, tiny compiles: the script's paths and its table, not figures.
    args.mlp_width, args.mlp_layers, args.mlp_exits = 32, 2, [2]
    args.models, args.batch, args.mlp_batch = ["branched-mlp"], 4, 4
    mlp_variants = ("plain", "stacked", "gramian-auto")
    zoo_variants = ("plain", "staged-stacked", "staged-gramian")
    granularities = ("global",)
  out(
    f"jax {jax.__version__} on {jax.devices()[0].platform}"
    f" ({platform.processor() or platform.machine()}),"
    f" python {sys.version.split()[0]}"
  )
  _header(out, bool(repeats))
  verdicts = []
  key = jax.random.key(0)
  # The parameter-dominated MLP, both granularities, every K.
  mlp = {}
  for granularity in granularities:
    for k in args.mlp_exits:
      model = ExitMLP(3072, args.mlp_width, args.mlp_layers, k, 10, nnx.Rngs(0))
      x = jax.random.normal(key, (args.mlp_batch, 3072))
      y = jax.random.randint(key, (args.mlp_batch,), 0, 10)
      params_m = _param_bytes(model) / 4e6
      label = f"mlp {params_m:.1f}M K={k} b={args.mlp_batch} {granularity}"
      mlp[granularity, k] = run_network(
        label, model, k, granularity, x, y, mlp_variants, repeats, out
      )
  for granularity, bound in (("global", 1), ("leaf", 2)):
    if granularity not in granularities:
      continue
    for k in args.mlp_exits:
      results, param_bytes = mlp[granularity, k]
      plain = results["plain"]["temp"]
      for variant in ("gramian-auto", "gramian-scan"):
        if variant not in results:
          continue
        temp = results[variant]["temp"]
        verdicts.append(
          f"MLP K={k} {granularity} {variant}: temp {temp / MB:.1f} MB"
          f" {'<=' if temp <= plain + bound * param_bytes else '>'} plain"
          f" + {bound}x params = {(plain + bound * param_bytes) / MB:.1f} MB"
        )
      if repeats:
        ratio = results["gramian-auto"]["seconds"] / results["plain"]["seconds"]
        limit = (2 * k + 3) / 3
        verdicts.append(
          f"MLP K={k} {granularity} gramian-auto time: {ratio:.2f}x plain"
          f" {'<=' if ratio <= limit else '>'} (2K+3)/3 = {limit:.2f}"
        )
    if len(args.mlp_exits) >= 2:
      k0, k1 = args.mlp_exits[0], args.mlp_exits[-1]
      t0 = mlp[granularity, k0][0]["gramian-auto"]["temp"]
      t1 = mlp[granularity, k1][0]["gramian-auto"]["temp"]
      verdicts.append(
        f"MLP {granularity} gramian-auto K={k1} vs K={k0}: temp"
        f" {t1 / t0 - 1:+.1%} ({'within' if t1 <= 1.1 * t0 else 'above'} 10%)"
      )
  if not args.no_zoo:
    for name in _zoo_models(args.models, out):
      model = zoo.create(name, rngs=nnx.Rngs(0), preset="cifar")
      shape = zoo.input_spec(name, "cifar").shape
      x = jax.random.normal(key, (args.batch, *shape))
      y = jax.random.randint(key, (args.batch,), 0, 10)
      label = f"{name} cifar b={args.batch}"
      results, _ = run_network(
        label,
        model,
        model.num_exits,
        "global",
        x,
        y,
        zoo_variants,
        repeats,
        out,
      )
      staged = results["staged-stacked"]
      for variant in ("gramian-auto", "staged-gramian"):
        if variant not in results:
          continue
        temp = results[variant]["temp"]
        line = (
          f"{name} {variant}: temp {temp / MB:.1f} MB"
          f" {'<=' if temp <= staged['temp'] else '>'} staged stacked"
          f" {staged['temp'] / MB:.1f} MB"
        )
        if repeats:
          ratio = results[variant]["seconds"] / staged["seconds"]
          line += f"; time {ratio:.2f}x staged stacked"
          line += f" ({'<=' if ratio <= 2 else '>'} 2x)"
        verdicts.append(line)
  _torchjd_autogram(out)
  out("")
  out("verdicts (targets of the Gramian engine's issue):")
  for line in verdicts:
    out(f"  {line}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
