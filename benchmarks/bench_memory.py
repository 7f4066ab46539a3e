"""Compiled memory and step time of the Gramian engine against the stack.

For each network, one jitted training step (per-exit losses, their
gradients or Gramian, ``osgd`` then SGD with momentum) per way of forming
what the aggregator reads:

- ``plain``: the summed-loss gradient and SGD, the floor;
- ``stacked``: ``value_and_per_exit_grads``, the K×P stack (vmapped VJP);
- ``staged-stacked``: ``staged_value_and_per_exit_grads`` (zoo models);
- ``gramian-vmap``, ``gramian-scan``, ``gramian-blocks``, ``gramian-auto``:
  ``value_and_gramian`` with each ``form``;
- ``staged-gramian``: ``staged_value_and_gramian`` (zoo models).

It prints XLA's compiled temp bytes (``jax.jit(step).lower(...).compile()
.memory_analysis().temp_size_in_bytes``: deterministic for a backend and
shapes) and, unless ``--no-time``, the step time and its ratio to the plain
step (indicative only on a shared machine). Networks: every zoo model with
a ``cifar`` preset at batch 128 (the others are skipped, and said so), and
a parameter-dominated MLP (four 2048-wide layers, ~19M parameters, K exit
heads spread over its depth) at batch 64 for each ``--mlp-exits`` K, both
granularities (``--granularities``). ``--variants`` picks the steps.

With the ``bench`` extra (torch and torchjd), on the MLP at the global
granularity, the same rounds also time the MLP's PyTorch twin
(``torch_zoo.ExitMLP``: the same layers, parameter counts printed side by
side): its plain summed-loss step, and TorchJD's autogram step
(``torchjd.autogram.Engine.compute_gramian`` of the K exit losses,
``UPGradWeighting`` of that Gramian, one backward of the weighted losses,
then the same SGD with momentum). Autogram's ratio to PyTorch's plain step
is printed beside ours, gramian-auto's to our plain step: the issue's
target is ours below theirs. ``torch.set_num_threads`` is the cores
XLA:CPU uses (``--threads`` overrides it; on a loaded CPU run it under
``taskset -c N``, see ``benchmarks/README.md``). Without the extra, or with
``--no-torch``, ``--no-time`` or ``--smoke``, the script says it skipped
the comparison, and why.

Method (``benchmarks/timing.py``, as ``bench_step.py``): every step of a
network is compiled (PyTorch's built) first; then each of ``--repeats``
rounds runs every step once, in an order rotated per round, after a
warm-up; times are medians over the rounds. Verdicts against the targets
of the Gramian engine's issue are printed, never asserted: among them, on
the zoo models, the time of the engine's automatic choice (``gramian-auto``
and ``staged-gramian``) over the staged stacked step (target <= 2x).

  python benchmarks/bench_memory.py                  # everything
  python benchmarks/bench_memory.py --smoke          # seconds: a smoke test
  python benchmarks/bench_memory.py --models branched-resnet --repeats 3
  python benchmarks/bench_memory.py --no-zoo --granularities global \\
    --variants gramian-auto                          # the TorchJD comparison
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from timing import (  # benchmarks/timing.py, beside this script
  MIN_SAMPLE_S,
  Variant,
  cpu_cores,
  run_rounds,
)

import osgd_jax
from osgd_jax import zoo
from osgd_jax.losses import per_exit_cross_entropy

MB = 1 << 20
LR = 0.01  # SGD with momentum 0.9, in JAX and PyTorch alike
LABEL_WIDTH = 42  # fits "nested-width-depth-transformer cifar b=128"
ZOO_VARIANTS = (
  "plain",
  "stacked",
  "staged-stacked",
  "gramian-vmap",
  "gramian-scan",
  "gramian-blocks",
  "gramian-auto",
  "staged-gramian",
)
MLP_VARIANTS = (
  "plain",
  "stacked",
  "gramian-vmap",
  "gramian-scan",
  "gramian-blocks",
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

  sgd = optax.sgd(LR, momentum=0.9)
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


def _prepare(
  variant: str,
  model: nnx.Module,
  num_exits: int,
  granularity: str,
  x: jax.Array,
  y: jax.Array,
) -> dict[str, Any]:
  """Compiles one variant's step: its temp bytes and a call for timing.

  The call owns a copy of the state (made at its first call, so that an
  untimed run holds none) and feeds each step's donated state to the next,
  as a training loop does.
  """
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  step, tx = _make_step(variant, graphdef, num_exits, granularity)
  state = tx.init(params)
  jitted = jax.jit(step, donate_argnums=(0, 1, 2))
  start = time.perf_counter()
  compiled = jitted.lower(params, rest, state, x, y).compile()
  compile_s = time.perf_counter() - start
  analysis = compiled.memory_analysis()
  temp = None if analysis is None else analysis.temp_size_in_bytes
  carry = []

  def call():
    if not carry:
      carry.extend(jax.tree.map(jnp.copy, (params, rest, state)))
    carry[0], carry[1], carry[2], losses = compiled(*carry, x, y)
    return jax.block_until_ready(losses)

  return {"temp": temp, "seconds": None, "compile_s": compile_s, "call": call}


def _param_bytes(model: nnx.Module) -> int:
  return sum(
    x.size * x.dtype.itemsize
    for x in jax.tree.leaves(nnx.state(model, nnx.Param))
  )


def _row(label, variant, result, plain, param_bytes, out):
  temp = result["temp"]
  extra = (temp - plain["temp"]) / param_bytes
  line = (
    f"{label:<{LABEL_WIDTH}} {variant:<15} {temp / MB:>10.1f} {extra:>+9.2f}"
  )
  if result["seconds"] is not None:
    ratio = result["seconds"] / plain["seconds"]
    line += f" {result['seconds'] * 1e3:>10.1f} {ratio:>7.2f}x"
  out(line)


def _header(out, timed):
  line = f"{'network':<{LABEL_WIDTH}} {'variant':<15}"
  line += f" {'temp MB':>10} {'Δ/params':>9}"
  if timed:
    line += f" {'step ms':>10} {'/plain':>8}"
  out(line)
  out("-" * len(line))


def run_network(
  label: str,
  model: nnx.Module,
  num_exits: int,
  granularity: str,
  x: jax.Array,
  y: jax.Array,
  variants: Sequence[str],
  repeats: int,
  out: Callable[[str], None],
  log: Callable[[str], None],
  extra: Sequence[Variant] = (),
) -> tuple[dict[str, dict[str, Any]], int, dict[str, float]]:
  """Compiles every variant, times them in interleaved rounds, prints rows.

  Args:
    label: the network column of the rows.
    model, num_exits, granularity, x, y: the network, its exits, ``osgd``'s
      granularity and the batch.
    variants: the JAX steps (``plain`` first: the other rows are relative
      to it).
    repeats: timed rounds (0: memory only).
    out: where the rows go; log: where a line per round goes.
    extra: more calls to time in the same rounds (PyTorch's steps).

  Returns:
    Per variant its temp bytes, median seconds and compile seconds; the
    parameter bytes; the median seconds of every timed call, extra included.
  """
  param_bytes = _param_bytes(model)
  results = {
    v: _prepare(v, model, num_exits, granularity, x, y) for v in variants
  }
  medians = {}
  if repeats:
    timed = [Variant(v, v, results[v]["call"]) for v in variants]
    samples = run_rounds(timed + list(extra), repeats, log)
    medians = {k: statistics.median(s) for k, s in samples.items()}
    for v in variants:
      results[v]["seconds"] = medians[v]
  for v in variants:
    del results[v]["call"]  # frees the variant's state
    _row(label, v, results[v], results["plain"], param_bytes, out)
  return results, param_bytes, medians


def _zoo_models(names: Sequence[str] | None, out) -> list[str]:
  chosen = []
  for name in names or zoo.names():
    if "cifar" in zoo.presets(name):
      chosen.append(name)
    else:
      out(f"skipped {name}: it has no cifar preset")
  return chosen


def _autogram_skip_reason(
  repeats: int,
  granularities: Sequence[str],
  mlp_variants: Sequence[str],
  no_torch: bool,
) -> str | None:
  """Why the run's options leave out the TorchJD comparison, or ``None``."""
  if not repeats:
    return "steps are not timed (--no-time, --smoke)"
  if "global" not in granularities:
    return "it runs on the MLP at the global granularity, not chosen"
  if "gramian-auto" not in mlp_variants:
    return "our side of it, gramian-auto, is not among --variants"
  if no_torch:
    return "--no-torch"
  return None


def _autogram_modules() -> tuple[tuple | None, str | None]:
  """``(torch, torch_zoo, Engine, UPGradWeighting)``, or ``None`` and why.

  Without the ``bench`` extra (torch and torchjd with its quadprog solver)
  the comparison is skipped, and the run says why.
  """
  try:
    import torch
  except ImportError:
    return None, "torch is not installed (pip install -e '.[bench]')"
  try:
    import torchjd
    from torchjd.aggregation import UPGradWeighting
  except ImportError:
    return None, "torchjd is not installed (pip install -e '.[bench]')"
  try:
    from torchjd.autogram import Engine
  except ImportError:
    return None, (
      f"torchjd {torchjd.__version__} has no autogram engine"
      " (pip install -e '.[bench]' installs one that has)"
    )
  try:
    UPGradWeighting()  # needs the quadprog solver; fail here, not mid-run
  except ImportError as e:
    return None, f"UPGradWeighting needs its solver: {e}"
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import torch_zoo

  return (torch, torch_zoo, Engine, UPGradWeighting), None


def _torch_variants(
  mods: tuple,
  in_features: int,
  width: int,
  layers: int,
  num_exits: int,
  x: np.ndarray,
  y: np.ndarray,
) -> tuple[list[Variant], int]:
  """PyTorch's plain step and TorchJD's autogram step on the MLP's twin.

  Both start from one initial model (each its own copy and its own SGD,
  momentum 0.9, as ours). The plain step backpropagates the summed exit
  losses. The autogram step is TorchJD's Gramian-based Jacobian descent:
  ``Engine.compute_gramian`` of the K exit losses (the K x K Gramian of
  their Jacobian, accumulated layer by layer), ``UPGradWeighting`` of it,
  then one backward of the losses weighted by it, as in the ``Engine``
  docstring's example. ``batch_dim=None``: the losses are batch means, so
  the Gramian is the same K x K matrix ``value_and_gramian`` forms (with a
  batch dimension the engine would form the (K B) x (K B) Gramian of
  per-sample losses instead).

  Returns:
    The two calls, and the twin's parameter count.
  """
  torch, torch_zoo, engine_cls, weighting_cls = mods
  from torch.nn import functional as F

  torch.manual_seed(0)
  base = torch_zoo.ExitMLP(in_features, width, layers, num_exits, 10)
  xt = torch.from_numpy(np.array(x, dtype=np.float32))  # a writable copy
  yt = torch.from_numpy(np.asarray(y, dtype=np.int64))
  variants = []
  for kind in ("plain", "autogram"):
    model = copy.deepcopy(base)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    engine = engine_cls(model, batch_dim=None) if kind == "autogram" else None
    weighting = weighting_cls()

    def call(model=model, opt=opt, engine=engine, weighting=weighting):
      opt.zero_grad(set_to_none=True)
      losses = torch.stack([F.cross_entropy(o, yt) for o in model(xt)])
      if engine is None:
        losses.sum().backward()
      else:
        losses.backward(weighting(engine.compute_gramian(losses)))
      opt.step()
      return losses

    label = (
      "torch plain" if kind == "plain" else "torchjd autogram (UPGradWeighting)"
    )
    variants.append(Variant(f"torch-{kind}", label, call))
  return variants, sum(p.numel() for p in base.parameters())


def _torch_rows(
  label: str,
  variants: Sequence[Variant],
  medians: dict[str, float],
  out: Callable[[str], None],
) -> None:
  """PyTorch's rows in the table: no temp bytes, /plain to PyTorch's plain."""
  for v in variants:
    ratio = medians[v.name] / medians["torch-plain"]
    out(
      f"{label:<{LABEL_WIDTH}} {v.name:<15} {'-':>10} {'-':>9}"
      f" {medians[v.name] * 1e3:>10.1f} {ratio:>7.2f}x"
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
    "--granularities",
    nargs="+",
    choices=("global", "leaf"),
    default=["global", "leaf"],
    help="osgd's granularity on the MLP (the zoo uses global); default both",
  )
  parser.add_argument(
    "--variants",
    nargs="+",
    choices=ZOO_VARIANTS,
    help="the steps to compile (plain always: the rest is relative to it);"
    " default all",
  )
  parser.add_argument(
    "--repeats",
    type=int,
    default=5,
    help="timed rounds, the variants interleaved (median)",
  )
  parser.add_argument(
    "--no-time", action="store_true", help="compiled memory only"
  )
  parser.add_argument(
    "--threads",
    type=int,
    default=None,
    help="PyTorch intra-op threads; default: the cores XLA:CPU uses",
  )
  parser.add_argument(
    "--no-torch",
    action="store_true",
    help="skip PyTorch and TorchJD's autogram even if installed",
  )
  parser.add_argument(
    "--smoke",
    action="store_true",
    help="a small MLP and one small zoo model, no timing: seconds",
  )
  args = parser.parse_args(argv)

  def out(line: str) -> None:
    print(line, flush=True)

  def log(line: str) -> None:  # progress, kept out of the table
    print(line, file=sys.stderr, flush=True)

  repeats = 0 if args.no_time or args.smoke else args.repeats
  mlp_variants, zoo_variants = MLP_VARIANTS, ZOO_VARIANTS
  granularities = tuple(args.granularities)
  if args.smoke:
    # Few, tiny compiles: the script's paths and its table, not figures.
    args.mlp_width, args.mlp_layers, args.mlp_exits = 32, 2, [2]
    args.models, args.batch, args.mlp_batch = ["branched-mlp"], 4, 4
    mlp_variants = ("plain", "stacked", "gramian-auto")
    zoo_variants = ("plain", "staged-stacked", "staged-gramian")
    granularities = ("global",)
  if args.variants:
    chosen = {"plain", *args.variants}
    mlp_variants = tuple(v for v in mlp_variants if v in chosen)
    zoo_variants = tuple(v for v in zoo_variants if v in chosen)

  # TorchJD's autogram against our engine: the MLP, global granularity
  # (autogram's Gramian is of the whole Jacobian), timed in the same rounds.
  mods, torch_note = (
    None,
    _autogram_skip_reason(repeats, granularities, mlp_variants, args.no_torch),
  )
  if torch_note is None:
    mods, torch_note = _autogram_modules()
  cores = cpu_cores()
  cores_text = f"{cores} core{'' if cores == 1 else 's'}"
  out(
    f"jax {jax.__version__} on {jax.devices()[0].platform}"
    f" ({platform.processor() or platform.machine()}, {cores_text}),"
    f" python {sys.version.split()[0]}"
  )
  if mods is not None:
    from importlib import metadata

    threads = args.threads or cores
    mods[0].set_num_threads(threads)
    out(
      f"torch {mods[0].__version__}, torchjd {metadata.version('torchjd')};"
      f" torch.set_num_threads({threads}) (XLA:CPU uses {cores_text})"
    )
  else:
    out(f"TorchJD autogram: skipped, {torch_note}")
  out(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  if repeats:
    out(
      f"float32; step ms: median of {repeats} rounds after a warm-up, the"
      " variants of a network (JAX and PyTorch) interleaved in rotated order;"
      f" a sample lasts >= {MIN_SAMPLE_S:g} s or one step; /plain: to the"
      " plain step of the same framework"
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
      extra, torch_params = [], None
      if mods is not None and granularity == "global":
        extra, torch_params = _torch_variants(
          mods,
          3072,
          args.mlp_width,
          args.mlp_layers,
          k,
          np.asarray(x),
          np.asarray(y),
        )
      results, param_bytes, medians = run_network(
        label,
        model,
        k,
        granularity,
        x,
        y,
        mlp_variants,
        repeats,
        out,
        log,
        extra,
      )
      mlp[granularity, k] = results, param_bytes
      if extra:
        _torch_rows(label, extra, medians, out)
        jax_params = sum(
          p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param))
        )
        ours = medians["gramian-auto"] / medians["plain"]
        theirs = medians["torch-autogram"] / medians["torch-plain"]
        out(
          f"  parameters: jax {jax_params:,} | torch {torch_params:,};"
          f" gramian-auto/plain {ours:.2f}x against TorchJD autogram/torch"
          f" plain {theirs:.2f}x"
        )
        verdicts.append(
          f"MLP K={k} global vs TorchJD autogram: ours gramian-auto/plain"
          f" {ours:.2f}x {'<' if ours < theirs else '>='} autogram/torch"
          f" plain {theirs:.2f}x (ours/theirs {ours / theirs:.2f},"
          f" target < 1: {'met' if ours < theirs else 'missed'})"
        )
  if mods is None:
    verdicts.append(f"TorchJD autogram comparison: skipped, {torch_note}")
  for granularity, bound in (("global", 1), ("leaf", 2)):
    if granularity not in granularities:
      continue
    for k in args.mlp_exits:
      results, param_bytes = mlp[granularity, k]
      plain = results["plain"]["temp"]
      for variant in ("gramian-auto", "gramian-scan", "gramian-blocks"):
        if variant not in results:
          continue
        temp = results[variant]["temp"]
        verdicts.append(
          f"MLP K={k} {granularity} {variant}: temp {temp / MB:.1f} MB"
          f" {'<=' if temp <= plain + bound * param_bytes else '>'} plain"
          f" + {bound}x params = {(plain + bound * param_bytes) / MB:.1f} MB"
        )
      if repeats and "gramian-auto" in results:
        ratio = results["gramian-auto"]["seconds"] / results["plain"]["seconds"]
        limit = (2 * k + 3) / 3
        verdicts.append(
          f"MLP K={k} {granularity} gramian-auto time: {ratio:.2f}x plain"
          f" {'<=' if ratio <= limit else '>'} (2K+3)/3 = {limit:.2f}"
        )
    if len(args.mlp_exits) >= 2 and "gramian-auto" in mlp_variants:
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
      results, _, _ = run_network(
        label,
        model,
        model.num_exits,
        "global",
        x,
        y,
        zoo_variants,
        repeats,
        out,
        log,
      )
      # The target is the staged stack; a function's Gramian (not
      # staged) is also held against its own stack.
      for variant, reference in (
        ("gramian-auto", "stacked"),
        ("gramian-auto", "staged-stacked"),
        ("staged-gramian", "staged-stacked"),
      ):
        if variant not in results or reference not in results:
          continue
        temp, ref = results[variant]["temp"], results[reference]
        what = reference.replace("-", " ")
        line = (
          f"{name} {variant}: temp {temp / MB:.1f} MB"
          f" {'<=' if temp <= ref['temp'] else '>'} {what}"
          f" {ref['temp'] / MB:.1f} MB"
        )
        if repeats and reference == "staged-stacked":
          ratio = results[variant]["seconds"] / ref["seconds"]
          line += f"; time {ratio:.2f}x staged stacked"
          line += f" ({'<=' if ratio <= 2 else '>'} 2x)"
        verdicts.append(line)
  out("")
  out("verdicts (targets of the Gramian engine's issue):")
  for line in verdicts:
    out(f"  {line}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
