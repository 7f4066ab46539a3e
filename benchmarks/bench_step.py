"""Times a whole training step: plain SGD, OSGD (vmap and staged), TorchJD.

On one network, batch and machine, in one run, the script times:

* our plain summed-loss SGD step, the floor: ``osgd_jax.app.train``'s jitted
  step with ``optimizer="sgd"`` (one forward, one backward, momentum);
* our OSGD step, through the same ``make_train_step``, so the benchmark
  measures what ``osgd-train`` runs, with each ``per_exit_grads``: the
  default staged Jacobian (``"staged"``: exit k's backward runs through
  stages 1..k only, a stage's per-exit VJPs looped on CPU and batched on
  accelerators), the staged Jacobian with its rows forced batched
  (``"staged-batched"``: one vmapped VJP per stage), and the vmap Jacobian
  (``"vmap"``: one forward, the whole backward vmapped over the K one-hot
  cotangents);
* the forward of the loss vector (F), the forward and backward of the summed
  loss (F + B), and the forwards of exits 1..k, from which the structural
  limit of the staged step follows:
  ``(F + sum_k prefix_k * B) / (F + B)`` with ``prefix_k`` the share of the
  network's cost in stages 1..k;
* the OSGD transform's share of the step, from profiles of
  ``--profile-runs`` runs of the compiled OSGD and plain steps
  (``benchmarks/scope_profile.py``): what the transform adds to the
  optimizer's kernels (the OSGD step's ``optimizer``-scope kernels minus the
  plain step's), kept between the kernels of ``osgd``'s operations only (a
  lower bound) and those plus the kernels that fuse ``osgd``'s weighted sum
  with the optimizer's update (an upper bound), over the kernel time of the
  step. A difference of two wall times cannot resolve a few percent on a
  shared machine; a profile can. Printed
  for reference: ``osgd(...).update`` alone, as its own jitted call on
  stacked gradients of the model's shapes (it adds the launch of a call,
  timed apart, and its weighted sums cannot fuse with an optimizer), and the
  same staged step with the rows summed instead of projected
  (``optimizer="sum"``), whose difference to the OSGD step is the
  noisy wall-time view of the same question;
* with the ``bench`` extra installed (``pip install -e '.[bench]'``): the same
  architecture in PyTorch (``benchmarks/torch_zoo.py``; parameter counts are
  printed side by side), its plain summed-loss step and TorchJD's Mean,
  UPGrad and PCGrad steps (``torchjd.autojac.backward`` then
  ``jac_to_grad``), each followed by the same SGD momentum update.

Targets, as ratios from the run (verdicts are printed, never asserted), all
of the default staged step: OSGD / plain at or under the structural limit;
the transform <= 5% of the OSGD step; OSGD / plain below the ratio of
TorchJD's fastest step to PyTorch's plain step, measured in the same run (the
absolute times are printed beside it). The vmap Jacobian's ratio is printed
beside its own limit, that of K full backward passes.
It also reports the memory of the stacked per-exit gradients against the
parameters (K x) and XLA's ``memory_analysis`` of each compiled step.

Method: everything is compiled (or, for PyTorch, run) and warmed up first;
then each round times every variant once, in an order rotated per round, so
that the load of a shared machine hits all alike; times are medians over
``--repeats`` rounds (``benchmarks/timing.py``, shared with
``bench_memory.py``). A sample is one call, or back-to-back calls lasting at
least ``MIN_SAMPLE_S`` for fast steps, after one untimed call that lets the
framework's thread pool wake up.

Usage::

  python benchmarks/bench_step.py          # the three architectures
  python benchmarks/bench_step.py --quick  # smoke test, seconds
  python benchmarks/bench_step.py --models nested-depth-mlp --repeats 9
  python benchmarks/bench_step.py --json out.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
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
import scope_profile  # benchmarks/scope_profile.py, beside this script
from flax import nnx
from timing import (  # benchmarks/timing.py, beside this script
  MIN_SAMPLE_S,
  Variant,
  cpu_cores,
  run_rounds,
)

import osgd_jax
from osgd_jax import anytime, zoo
from osgd_jax.app import data as data_lib
from osgd_jax.app import train
from osgd_jax.losses import per_exit_cross_entropy

TARGET_LIMIT = 1.0  # OSGD/plain at or under the structural limit
TARGET_SHARE = 0.05  # the transform's share of the OSGD step
LABEL_WIDTH = 56  # the step column of the printed table
LR = 1e-3  # small, so hundreds of steps on a fixed batch stay finite
MODELS = ("branched-resnet", "nested-depth-resnet", "nested-depth-mlp")
# The smoke test: one small MLP, so that compiling ~10 functions takes seconds.
# Two exits (K=2) are the fewest that have a projection and a staged prefix;
# each stage more adds about a third to every compile.
QUICK = dict(
  models=("nested-depth-mlp",),
  batch=16,
  repeats=2,
  overrides=dict(width=16, stages=2),
)
TORCHJD_AGGREGATORS = ("Mean", "UPGrad", "PCGrad")


def _preset(name: str) -> str:
  return "cifar" if name.endswith("resnet") else "digits"


def _batch(
  name: str, preset: str, config: dict, batch: int
) -> tuple[np.ndarray, np.ndarray]:
  """A fixed batch: real digits for the digits preset, else seeded noise.

  The step's cost does not depend on the pixel values, and CIFAR's archives
  need not be on the machine, so the 32×32×3 batch is Gaussian noise.
  """
  rng = np.random.default_rng(0)
  if preset == "digits":
    ds = data_lib.load_dataset("digits")
    x, y = ds.x_train[:batch], ds.y_train[:batch]
    if name.endswith("mlp"):
      x = x.reshape(batch, -1)
    return x.astype(np.float32), y.astype(np.int32)
  shape = (batch, 32, 32, config["in_channels"])
  x = rng.standard_normal(shape, dtype=np.float32)
  y = rng.integers(0, config["num_classes"], batch).astype(np.int32)
  return x, y


def _nbytes(tree: Any) -> int:
  return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree))


def _memory(compiled: Any) -> dict[str, int] | None:
  try:
    stats = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None  # not every backend reports it
  if stats is None:
    return None
  return {
    k: int(getattr(stats, f"{k}_size_in_bytes"))
    for k in ("argument", "output", "alias", "temp")
  }


# ----------------------------------------------------------------- JAX side


def _train_step(
  name: str,
  graphdef: Any,
  params: Any,
  rest: Any,
  num_exits: int,
  x: jax.Array,
  y: jax.Array,
  optimizer: str,
  per_exit_grads: str | None,
) -> tuple[Callable, Any]:
  """``make_train_step``'s jitted step, compiled, with a state it owns.

  The step donates its state, so every variant keeps its own copy and feeds
  each call's new state to the next call, exactly like the training loop.

  Returns:
    The call, and the compiled step (for its memory and its program).
  """
  config = train.TrainConfig(
    model=name, optimizer=optimizer, schedule="constant", lr=LR
  )
  if per_exit_grads is not None:
    config = dataclasses.replace(config, per_exit_grads=per_exit_grads)
  tx, step = train.make_train_step(
    config, graphdef, num_exits, total_steps=10**6, augment=False
  )
  key = jax.random.key(0)
  state = [
    jax.tree.map(jnp.copy, params),
    jax.tree.map(jnp.copy, rest),
    tx.init(params),
  ]
  compiled = step.lower(*state, x, y, key).compile()

  def call():
    state[0], state[1], state[2], losses = compiled(*state, x, y, key)
    return jax.block_until_ready(losses)

  return call, compiled


def _structural_fns(
  graphdef: Any,
  params: Any,
  rest: Any,
  num_exits: int,
  x: jax.Array,
  y: jax.Array,
) -> dict[str, Callable]:
  """Forward of exits 1..k for every k, and forward+backward of the sum."""

  def exit_losses(params, rest, x, y, upto=None):
    model = nnx.merge(graphdef, params, rest, copy=True)
    return per_exit_cross_entropy(model(x, upto=upto), y)

  def summed(params, rest, x, y):
    return exit_losses(params, rest, x, y).sum()

  fns = {}
  for k in range(1, num_exits + 1):
    fwd = jax.jit(functools.partial(exit_losses, upto=k))
    fns[f"fwd{k}"] = fwd.lower(params, rest, x, y).compile()
  fns["fwdbwd"] = (
    jax.jit(jax.value_and_grad(summed)).lower(params, rest, x, y).compile()
  )
  return {
    n: functools.partial(
      lambda f: jax.block_until_ready(f(params, rest, x, y)), f
    )
    for n, f in fns.items()
  }


def _transform_fns(params: Any, num_exits: int) -> tuple[Callable, Callable]:
  """The OSGD transform alone, as ``train`` configures it, on random grads.

  Returns the call and a call of a jitted function that takes the same
  arguments and does nothing, the launch cost included in the first.
  """
  tx = osgd_jax.osgd(granularity="leaf", method="gram", num_exits=num_exits)
  state = tx.init(params)
  # Drawn by NumPy: jax.random would compile a sampler per leaf shape.
  rng = np.random.default_rng(1)
  grads = jax.tree.map(
    lambda p: jnp.asarray(
      rng.standard_normal((num_exits,) + p.shape, dtype=np.float32)
    ),
    params,
  )
  update = jax.jit(lambda g, s, p: tx.update(g, s, p)[0])
  compiled = update.lower(grads, state, params).compile()
  # The launch cost of a jitted call with the same arguments: it returns a
  # scalar computed from one element, so it does (almost) no work.
  launch = (
    jax.jit(lambda g, s, p: jax.tree.leaves(g)[0].ravel()[0])
    .lower(grads, state, params)
    .compile()
  )
  return (
    lambda: jax.block_until_ready(compiled(grads, state, params)),
    lambda: jax.block_until_ready(launch(grads, state, params)),
  )


def _per_exit_grad_bytes(
  graphdef: Any, params: Any, rest: Any, x: jax.Array, y: jax.Array
) -> int:
  """Bytes of the stacked per-exit gradients, from their traced shapes."""

  def exit_losses(params, rest, x, y):
    model = nnx.merge(graphdef, params, rest, copy=True)
    return per_exit_cross_entropy(model(x), y)

  fn = osgd_jax.value_and_per_exit_grads(exit_losses)
  _, grads = jax.eval_shape(fn, params, rest, x, y)
  return sum(
    math.prod(g.shape) * jnp.dtype(g.dtype).itemsize
    for g in jax.tree.leaves(grads)
  )


# ------------------------------------------------------------- PyTorch side


def _torch_modules():
  """``(torch, torch_zoo, torchjd pieces)``, or ``None`` without the extra."""
  try:
    import torch
    from torchjd import aggregation
    from torchjd.autojac import backward, jac_to_grad

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import torch_zoo

    aggregation.UPGrad()  # needs the quadprog extra; fail here, not mid-run
  except ImportError as e:
    return None, str(e)
  return (torch, torch_zoo, aggregation, backward, jac_to_grad), None


def _torch_variants(
  mods,
  name: str,
  config: dict,
  x: np.ndarray,
  y: np.ndarray,
  layouts: Sequence[str],
) -> tuple[list[Variant], dict]:
  """PyTorch's plain step and TorchJD's steps, per memory layout.

  Each variant owns a copy of one initial model and its own SGD optimizer
  (momentum 0.9, weight decay 5e-4, as ours).
  """
  torch, torch_zoo, aggregation, backward, jac_to_grad = mods
  from torch.nn import functional as F

  torch.manual_seed(0)
  base = torch_zoo.build(name, config)
  info = dict(
    params=sum(p.numel() for p in base.parameters()),
    tensors=len(list(base.parameters())),
    sizes=sorted(p.numel() for p in base.parameters()),
  )
  conv = x.ndim == 4
  xt = torch.from_numpy(
    np.ascontiguousarray(x.transpose(0, 3, 1, 2) if conv else x)
  )
  yt = torch.from_numpy(y.astype(np.int64))
  variants = []
  for layout in layouts if conv else ("-",):
    fmt = (
      torch.channels_last
      if layout == "channels_last"
      else torch.contiguous_format
    )
    xl = xt.to(memory_format=fmt) if conv else xt
    for agg in (None,) + TORCHJD_AGGREGATORS:
      model = copy.deepcopy(base)
      if conv:
        model = model.to(memory_format=fmt)
      params = list(model.parameters())
      opt = torch.optim.SGD(params, lr=LR, momentum=0.9, weight_decay=5e-4)
      aggregator = None if agg is None else getattr(aggregation, agg)()

      def call(
        model=model, params=params, opt=opt, aggregator=aggregator, xl=xl
      ):
        opt.zero_grad(set_to_none=True)
        losses = torch.stack([F.cross_entropy(o, yt) for o in model(xl)])
        if aggregator is None:
          losses.sum().backward()
        else:
          backward(losses, inputs=params)  # the K×N Jacobian, in .jac
          jac_to_grad(params, aggregator)
        opt.step()
        return losses

      suffix = "" if layout == "-" else f" [{layout}]"
      key = f"torch-{'plain' if agg is None else agg.lower()}"
      key += "" if layout == "-" else f"-{layout}"
      label = ("torch plain SGD" if agg is None else f"torchjd {agg}") + suffix
      variants.append(Variant(key, label, call))
  return variants, info


# ------------------------------------------------------------------ a model


def _transform_in_step(
  variants: Sequence[Variant], compiled_steps: dict, osgd_key: str, runs: int
) -> dict[str, float]:
  """The OSGD transform's kernel time inside the OSGD step, from profiles.

  Inside the step XLA fuses the transform's weighted sum into the
  optimizer's per-parameter update, so its time is bracketed:

  * lower: the kernels of ``osgd``'s operations only;
  * upper: those plus every kernel that fuses ``osgd`` operations with
    others (the whole update of those parameters);
  * added: what the transform adds to the optimizer: the OSGD step's
    kernels of the ``optimizer`` scope (osgd, the update and their fusions)
    minus the plain step's optimizer-only kernels (the update alone). The
    estimate is ``added`` kept within [lower, upper].
  """
  calls = {v.name: v.call for v in variants}
  osgd = scope_profile.profile_scopes(
    calls[osgd_key],
    compiled_steps[osgd_key].as_text(),
    ("osgd", "optimizer"),
    runs=runs,
  )
  plain = scope_profile.profile_scopes(
    calls["jax-plain"],
    compiled_steps["jax-plain"].as_text(),
    ("optimizer",),
    runs=runs,
  )["optimizer"]
  scope, optimizer = osgd["osgd"], osgd["optimizer"]
  lower, upper = scope.scope_s, scope.scope_s + scope.mixed_s
  added = optimizer.scope_s + optimizer.mixed_s - plain.scope_s
  estimate = min(max(added, lower), upper)
  return dict(
    runs=runs,
    kernels=scope.kernels,
    total_s=scope.total_s,
    osgd_kernels=scope.scope_kernels,
    osgd_s=lower,
    mixed_kernels=scope.mixed_kernels,
    mixed_s=scope.mixed_s,
    optimizer_s=optimizer.scope_s + optimizer.mixed_s,
    plain_optimizer_s=plain.scope_s,
    plain_total_s=plain.total_s,
    added_s=added,
    estimate_s=estimate,
    lower=scope.share,
    upper=scope.upper_share,
    share=estimate / scope.total_s,
  )


def _bench_model(
  name: str,
  args: argparse.Namespace,
  overrides: dict,
  batch: int,
  mods,
  log: Callable[[str], None],
) -> dict:
  preset = _preset(name)
  config = zoo.presets(name)[preset]
  config.update(overrides)
  model = zoo.create(name, rngs=nnx.Rngs(0), **config)
  num_exits = model.num_exits
  x_np, y_np = _batch(name, preset, config, batch)
  x, y = jnp.asarray(x_np), jnp.asarray(y_np)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  # What "staged" lowers to on this platform: rows looped on CPU, batched
  # elsewhere (jax.lax.platform_dependent in the staged Jacobian).
  backend = jax.devices()[0].platform.upper()
  rows = "looped" if backend == "CPU" else "batched"

  t0 = time.perf_counter()
  variants, memory = [], {}
  jax_steps = [
    ("jax-plain", "jax plain SGD (floor)", "sgd", None),
    (
      "jax-osgd-staged",
      f"jax OSGD, staged Jacobian (default: rows {rows} on {backend})",
      "osgd",
      "staged",
    ),
    (
      "jax-osgd-staged-batched",
      "jax OSGD, staged Jacobian, rows batched",
      "osgd",
      "staged-batched",
    ),
    ("jax-osgd-vmap", "jax OSGD, vmap Jacobian", "osgd", "vmap"),
    (
      "sum-staged",
      "jax staged Jacobian, rows summed (no projection)",
      "sum",
      "staged",
    ),
  ]
  compiled_steps = {}
  for key, label, optimizer, mode in jax_steps:
    call, compiled_steps[key] = _train_step(
      name, graphdef, params, rest, num_exits, x, y, optimizer, mode
    )
    memory[key] = _memory(compiled_steps[key])
    variants.append(Variant(key, label, call))
  structural = _structural_fns(graphdef, params, rest, num_exits, x, y)
  variants.append(
    Variant(
      "fwdbwd", "jax forward+backward of the sum (F+B)", structural["fwdbwd"]
    )
  )
  for k in range(1, num_exits + 1):
    label = (
      "jax forward, all exits (F)"
      if k == num_exits
      else f"jax forward, exits 1..{k}"
    )
    variants.append(Variant(f"fwd{k}", label, structural[f"fwd{k}"]))
  alone, launch = _transform_fns(params, num_exits)
  variants.append(Variant("transform", "osgd(...).update alone", alone))
  variants.append(
    Variant(
      "transform-launch", "a jitted call on the same arguments (launch)", launch
    )
  )
  log(f"  compiled the JAX functions in {time.perf_counter() - t0:.1f} s")

  torch_info, torch_note = None, None
  if mods is not None:
    tv, torch_info = _torch_variants(
      mods, name, config, x_np, y_np, args.torch_layouts
    )
    variants += tv

  samples = run_rounds(variants, args.repeats, log)
  med = {k: statistics.median(s) for k, s in samples.items()}
  osgd_key = "jax-osgd-staged"
  in_step = _transform_in_step(
    variants, compiled_steps, osgd_key, args.profile_runs
  )
  log(f"  profiled {args.profile_runs} OSGD and plain steps")

  # The structural limit of the staged step. Prefix shares from the timed
  # forwards when they are monotone (the noise of a loaded machine can make
  # them not), else from XLA's FLOPs of model(x, upto=k).
  fwd = np.array([med[f"fwd{k}"] for k in range(1, num_exits + 1)])
  flops = anytime.flops_per_exit(model, (batch,) + x_np.shape[1:])
  prefix_time = fwd / fwd[-1]
  prefix_flops = flops.flops / flops.flops[-1]
  monotone = bool(np.all(np.diff(prefix_time) >= -0.02))
  prefix, source = (
    (prefix_time, "timed forwards")
    if monotone
    else (prefix_flops, f"FLOPs ({flops.source})")
  )
  f_time = med[f"fwd{num_exits}"]
  b_time = max(med["fwdbwd"] - f_time, 0.0)
  limit = (f_time + prefix.sum() * b_time) / (f_time + b_time)
  vmap_limit = (f_time + num_exits * b_time) / (f_time + b_time)

  plain = med["jax-plain"]
  ratios = {k: med[k] / plain for k in med}
  osgd_ratio = ratios[osgd_key]
  alone_share = med["transform"] / med[osgd_key]
  # TorchJD's steps over PyTorch's plain step of the same memory layout.
  torchjd = {}
  for k, v in med.items():
    for agg in TORCHJD_AGGREGATORS:
      agg_key = f"torch-{agg.lower()}"
      if k.startswith(agg_key):
        torchjd[k] = v / med["torch-plain" + k[len(agg_key) :]]
  best_torchjd = min(torchjd, key=torchjd.get) if torchjd else None

  param_bytes = _nbytes(params)
  grad_bytes = _per_exit_grad_bytes(graphdef, params, rest, x, y)
  jax_info = dict(
    params=sum(p.size for p in jax.tree.leaves(params)),
    tensors=len(jax.tree.leaves(params)),
    sizes=sorted(p.size for p in jax.tree.leaves(params)),
  )
  return dict(
    model=name,
    preset=preset,
    config=config,
    batch=batch,
    K=num_exits,
    input_shape=list(x_np.shape),
    default_rows=rows,
    labels={v.name: v.label for v in variants},
    samples_s=samples,
    median_s=med,
    ratio_to_plain=ratios,
    structural=dict(
      F_s=f_time,
      B_s=b_time,
      prefix=prefix.tolist(),
      prefix_timed=prefix_time.tolist(),
      prefix_flops=prefix_flops.tolist(),
      prefix_source=source,
      limit=limit,
      vmap_limit=vmap_limit,
    ),
    osgd_variant=osgd_key,
    osgd_over_limit=osgd_ratio / limit,
    vmap_over_limit=ratios["jax-osgd-vmap"] / limit,
    batched_over_limit=ratios["jax-osgd-staged-batched"] / limit,
    transform_share=in_step["share"],
    transform_in_step=in_step,
    transform_alone_share=alone_share,
    # What the projection adds inside the step (the weighted sum of the
    # rows is part of both steps).
    projection_in_step_s=med[osgd_key] - med["sum-staged"],
    best_torchjd=best_torchjd,
    best_torchjd_ratio=torchjd.get(best_torchjd),
    osgd_over_best_torchjd=(
      osgd_ratio / torchjd[best_torchjd] if best_torchjd else None
    ),
    memory=dict(
      param_bytes=param_bytes,
      per_exit_grad_bytes=grad_bytes,
      grads_over_params=grad_bytes / param_bytes,
      compiled=memory,
    ),
    jax_params=jax_info,
    torch_params=torch_info,
    torch_note=torch_note,
    torch_threads=args.threads if mods is not None else None,
  )


# ------------------------------------------------------------------ printing


def _verdict(ok: bool | None) -> str:
  return "-" if ok is None else ("PASS" if ok else "MISS")


def _mb(n: float) -> str:
  return f"{n / 1e6:.2f} MB"


_GROUP_TITLES = {1: "-- parts of the step (for the limit and the share):"}


def _group(key: str) -> int:
  """0: whole training steps; 1: parts of our step."""
  if key.startswith(("fwd", "transform", "sum-")):
    return 1
  return 0


def _print_result(r: dict, out: Callable[[str], None]) -> None:
  med, ratios, labels = r["median_s"], r["ratio_to_plain"], r["labels"]
  s = r["structural"]
  shape = "×".join(str(d) for d in r["input_shape"])
  out(f"\n== {r['model']} ({r['preset']} preset), input {shape}, K={r['K']} ==")
  jp, tp = r["jax_params"], r["torch_params"]
  line = f"parameters: jax {jp['params']:,} in {jp['tensors']} tensors"
  if tp is not None:
    same = (
      "the same tensor sizes"
      if tp["sizes"] == jp["sizes"]
      else ("DIFFERENT tensor sizes")
    )
    line += f" | torch {tp['params']:,} in {tp['tensors']} tensors ({same})"
  out(line)
  mins = {k: min(v) for k, v in r["samples_s"].items()}
  out(
    f"{'step':<{LABEL_WIDTH}} {'median ms':>10} {'x jax plain':>12}"
    f" {'min ms':>10}"
  )
  last = None
  for key, label in sorted(labels.items(), key=lambda kv: _group(kv[0])):
    group = _group(key)
    if group != last and group > 0:
      out(_GROUP_TITLES[group])
    last = group
    out(
      f"{label:<{LABEL_WIDTH}} {med[key] * 1e3:>10.2f} {ratios[key]:>11.2f}x"
      f" {mins[key] * 1e3:>10.2f}"
    )
  if r["torch_params"] is None:
    out(f"(PyTorch/TorchJD skipped: {r['torch_note']})")
  out(
    f"structural limit: F = {s['F_s'] * 1e3:.2f} ms, B = (F+B) - F ="
    f" {s['B_s'] * 1e3:.2f} ms; prefix_k from {s['prefix_source']}:"
    f" {' '.join(f'{p:.3f}' for p in s['prefix'])}"
    f" (timed {' '.join(f'{p:.3f}' for p in s['prefix_timed'])};"
    f" FLOPs {' '.join(f'{p:.3f}' for p in s['prefix_flops'])})"
  )
  out(
    f"  (F + sum_k prefix_k B) / (F + B) = {s['limit']:.3f}"
    f"   [a K-row vmap backward: (F + K B)/(F + B) = {s['vmap_limit']:.3f}]"
  )
  osgd_label = labels[r["osgd_variant"]]
  over = r["osgd_over_limit"]
  out(
    f"target 1: {osgd_label} / plain = {ratios[r['osgd_variant']]:.3f}x ="
    f" {over:.3f}x the limit (target <= {TARGET_LIMIT:g}x)"
    f"  {_verdict(over <= TARGET_LIMIT)}"
  )
  out(
    f"          (staged, rows batched:"
    f" {ratios['jax-osgd-staged-batched']:.3f}x ="
    f" {r['batched_over_limit']:.3f}x the limit)"
  )
  out(
    f"vmap Jacobian (value_and_per_exit_grads): OSGD / plain ="
    f" {ratios['jax-osgd-vmap']:.3f}x, beside the limit of K full backward"
    f" passes {s['vmap_limit']:.3f}x ="
    f" {ratios['jax-osgd-vmap'] / s['vmap_limit']:.3f}x that limit"
  )
  p = r["transform_in_step"]
  out(
    f"target 2: the transform inside the OSGD step (profiles of {p['runs']}"
    f" steps): {p['estimate_s'] * 1e3:.3f} ms = {100 * p['share']:.2f}% of"
    f" its kernel time (target <= {100 * TARGET_SHARE:g}%)"
    f"  {_verdict(p['share'] <= TARGET_SHARE)}"
  )
  out(
    f"          bounds {100 * p['lower']:.2f}% .. {100 * p['upper']:.2f}%:"
    f" {p['osgd_kernels']:.0f} osgd-only kernels {p['osgd_s'] * 1e3:.3f} ms;"
    f" +{p['mixed_kernels']:.0f} kernels fusing its weighted sum into the"
    f" update {p['mixed_s'] * 1e3:.3f} ms; of {p['total_s'] * 1e3:.3f} ms"
    f" in {p['kernels']:.0f} kernels"
  )
  out(
    f"          estimate = the OSGD step's optimizer kernels"
    f" {p['optimizer_s'] * 1e3:.3f} ms - the plain step's"
    f" {p['plain_optimizer_s'] * 1e3:.3f} ms ="
    f" {p['added_s'] * 1e3:.3f} ms, kept within the bounds"
  )
  out(
    f"          (osgd(...).update alone, its own jitted call:"
    f" {med['transform'] * 1e3:.2f} ms ="
    f" {100 * r['transform_alone_share']:.2f}% of the step, of which"
    f" {med['transform-launch'] * 1e3:.2f} ms launches a call with its"
    f" arguments; the OSGD step - the same step with the rows summed ="
    f" {r['projection_in_step_s'] * 1e3:.2f} ms)"
  )
  if r["best_torchjd"] is not None:
    best = r["best_torchjd"]
    rel = r["osgd_over_best_torchjd"]
    out(
      f"target 3: OSGD / plain {ratios[r['osgd_variant']]:.3f}x against"
      f" TorchJD's fastest / PyTorch plain {r['best_torchjd_ratio']:.3f}x"
      f" ({labels[best]}) = {rel:.3f} (target < 1)  {_verdict(rel < 1.0)}"
    )
    out(
      f"          (absolute: {osgd_label} {med[r['osgd_variant']] * 1e3:.2f}"
      f" ms; {labels[best]} {med[best] * 1e3:.2f} ms)"
    )
  else:
    out("target 3: skipped (no PyTorch/TorchJD)")
  m = r["memory"]
  out(
    f"memory: parameters {_mb(m['param_bytes'])}; stacked per-exit gradients"
    f" {_mb(m['per_exit_grad_bytes'])} = {m['grads_over_params']:.2f}x the"
    f" parameters (at most K = {r['K']})"
    f"  {_verdict(m['grads_over_params'] <= r['K'] + 1e-9)}"
  )
  plain_temp = (m["compiled"].get("jax-plain") or {}).get("temp")
  width = max(len(labels[key]) for key in m["compiled"])
  for key, stats in m["compiled"].items():
    if stats is None:
      out(f"  {labels[key]}: no memory_analysis on this backend")
      continue
    extra = (
      ""
      if plain_temp is None or key == "jax-plain"
      else "; temp - plain temp ="
      f" {(stats['temp'] - plain_temp) / m['param_bytes']:.2f}x"
      " the parameters"
    )
    out(
      f"  {labels[key]:<{width}} compiled: arguments {_mb(stats['argument'])},"
      f" outputs {_mb(stats['output'])} ({_mb(stats['alias'])} aliased),"
      f" temp {_mb(stats['temp'])}{extra}"
    )


# ---------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--models",
    nargs="+",
    default=None,
    choices=(
      "branched-resnet",
      "nested-depth-resnet",
      "branched-mlp",
      "nested-depth-mlp",
    ),
    help=f"default: {' '.join(MODELS)}",
  )
  parser.add_argument(
    "--repeats",
    type=int,
    default=None,
    help="timed rounds (median taken); default 5",
  )
  parser.add_argument(
    "--batch", type=int, default=None, help="batch size; default 64"
  )
  parser.add_argument(
    "--torch-layouts",
    nargs="+",
    default=None,
    choices=("nchw", "channels_last"),
    help="memory layouts of the PyTorch conv models; default both",
  )
  parser.add_argument(
    "--threads",
    type=int,
    default=None,
    help="PyTorch intra-op threads; default: the cores"
    " XLA:CPU uses (this process's CPU affinity)",
  )
  parser.add_argument(
    "--profile-runs",
    type=int,
    default=None,
    help="OSGD steps profiled for the transform's share;"
    " default 100 (20 with --quick)",
  )
  parser.add_argument(
    "--no-torch",
    action="store_true",
    help="skip PyTorch and TorchJD even if installed",
  )
  parser.add_argument(
    "--quick",
    action="store_true",
    help="one small MLP, two rounds: a smoke test",
  )
  parser.add_argument("--json", metavar="PATH", help="write results as JSON")
  args = parser.parse_args(argv)

  models = args.models or (QUICK["models"] if args.quick else MODELS)
  args.repeats = args.repeats or (QUICK["repeats"] if args.quick else 5)
  args.profile_runs = args.profile_runs or (20 if args.quick else 100)
  batch = args.batch or (QUICK["batch"] if args.quick else 64)
  overrides = QUICK["overrides"] if args.quick else {}
  args.torch_layouts = args.torch_layouts or ["channels_last", "nchw"]
  # XLA:CPU's intra-op pool has one thread per core this process may use.
  cores = cpu_cores()
  # The quick model's PyTorch steps are tiny: with several OpenMP threads on
  # a loaded machine they stall for ~100x their run time, which would make
  # the smoke test slow, so it uses one thread unless told otherwise.
  args.threads = args.threads or (1 if args.quick else cores)

  def out(s):
    return print(s, flush=True)

  mods, note = (None, "--no-torch") if args.no_torch else _torch_modules()
  device = jax.devices()[0]
  out(
    f"jax {jax.__version__} ({jax.default_backend()}, {device.device_kind},"
    f" {cores} cores), flax {sys.modules['flax'].__version__},"
    f" python {platform.python_version()}"
  )
  if mods is not None:
    from importlib import metadata

    torch = mods[0]
    torch.set_num_threads(args.threads)
    out(
      f"torch {torch.__version__}, torchjd {metadata.version('torchjd')};"
      f" torch.set_num_threads({args.threads}) (XLA:CPU uses {cores} cores)"
    )
  else:
    hint = "" if args.no_torch else " (install it: pip install -e '.[bench]')"
    out(f"PyTorch/TorchJD part skipped: {note}{hint}")
  out(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  out(
    f"float32, batch {batch}; median of {args.repeats} rounds, variants"
    f" interleaved in rotated order; a sample lasts >= {MIN_SAMPLE_S:g} s or"
    " one step; ratios are of medians from this run"
  )

  results = []
  start = time.perf_counter()
  for name in models:
    out(f"\n-- {name}: compiling and timing ...")
    result = _bench_model(name, args, overrides, batch, mods, out)
    if mods is None:
      result["torch_note"] = note
    results.append(result)
    _print_result(result, out)

  out("\nsummary (ratios from this run):")
  out(
    f"{'model':<22} {'osgd/plain':>10} {'limit':>7} {'/limit':>7}"
    f" {'batched/limit':>13} {'vmap/Klimit':>11} {'transform':>9}"
    f" {'torchjd/plain':>13} {'ours/theirs':>11}"
  )
  for r in results:
    tj = r["osgd_over_best_torchjd"]
    tr = r["best_torchjd_ratio"]
    vmap = r["ratio_to_plain"]["jax-osgd-vmap"] / r["structural"]["vmap_limit"]
    out(
      f"{r['model']:<22} {r['ratio_to_plain'][r['osgd_variant']]:>9.2f}x"
      f" {r['structural']['limit']:>6.2f}x {r['osgd_over_limit']:>6.2f}x"
      f" {r['batched_over_limit']:>12.2f}x {vmap:>10.2f}x"
      f" {100 * r['transform_share']:>8.2f}%"
      f" {'-' if tr is None else f'{tr:.2f}x':>13}"
      f" {'-' if tj is None else f'{tj:.2f}':>11}"
    )
  out(f"total {time.perf_counter() - start:.0f} s")

  if args.json:
    meta = dict(
      jax=jax.__version__,
      backend=jax.default_backend(),
      device=str(device),
      cores=cores,
      python=platform.python_version(),
      torch=None if mods is None else mods[0].__version__,
      repeats=args.repeats,
      batch=batch,
      argv=sys.argv[1:],
    )
    with open(args.json, "w") as f:
      json.dump(dict(meta=meta, results=results), f, indent=2, default=str)
  return 0  # timings never fail the run


if __name__ == "__main__":
  sys.exit(main())
