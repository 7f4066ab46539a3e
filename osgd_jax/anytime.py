"""Anytime utilities: what each exit costs, how well it does, when to stop.

Exit k of a zoo model needs stages 1..k only, so its cost is that of
``model(x, upto=k)``. :func:`flops_per_exit` measures it,
:func:`params_per_exit` counts the parameters on exit k's path.
:func:`evaluate` gives every exit's test accuracy and loss;
:func:`early_exit` stops each example at its first confident exit,
:func:`early_exit_curve` sweeps the confidence threshold, and
:func:`predict_within` answers with the deepest exit that fits a FLOPs budget.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from osgd_jax.zoo.base import AnytimeNet

__all__ = [
  "EarlyExitResult",
  "ExitFlops",
  "ExitMetrics",
  "early_exit",
  "early_exit_curve",
  "evaluate",
  "flops_per_exit",
  "params_per_exit",
  "predict_within",
]

_SOURCES = ("auto", "xla", "analytic")


class ExitFlops(NamedTuple):
  """FLOPs of ``model(x, upto=k)`` for k = 1..K.

  Attributes:
    flops: float64 array of shape ``(K,)``.
    source: ``"xla"`` (XLA's compiled cost analysis) or ``"analytic"``
      (multiply-adds of every convolution and matrix product in the jaxpr,
      counted as 2 FLOPs each).
  """

  flops: np.ndarray
  source: str


def _forward(graphdef: Any, state: Any, x: jax.Array, *, upto: int):
  return nnx.merge(graphdef, state)(x, upto=upto)


def _xla_flops(fn: Any, *args: Any) -> float | None:
  """FLOPs from XLA's cost analysis, or ``None`` if the backend has none.

  The HLO cost analysis of the lowered module counts the same FLOPs as that
  of the compiled one without paying for a compilation per exit; the
  compiled analysis is the fallback.
  """
  try:
    lowered = jax.jit(fn).lower(*args)
  except Exception:  # pylint: disable=broad-except
    return None
  cost = None
  for analyse in (
    lowered.cost_analysis,
    lambda: lowered.compile().cost_analysis(),
  ):
    try:
      cost = analyse()
    except Exception:  # pylint: disable=broad-except
      continue  # not every backend implements cost analysis
    if cost:
      break
  if isinstance(cost, (list, tuple)):  # older JAX returns one dict per device
    cost = cost[0] if cost else None
  flops = cost.get("flops") if cost else None
  return float(flops) if flops is not None and flops > 0 else None


def _eqn_flops(eqn: Any) -> float:
  name = eqn.primitive.name
  if name == "dot_general":
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    out = eqn.outvars[0].aval.shape
    return 2.0 * math.prod(out) * math.prod(lhs[d] for d in lhs_contract)
  if name == "conv_general_dilated":
    rhs = eqn.invars[1].aval.shape
    out = eqn.outvars[0].aval.shape
    out_channels = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
    return 2.0 * math.prod(out) * math.prod(rhs) / out_channels
  return 0.0


def _jaxpr_flops(jaxpr: Any) -> float:
  total = 0.0
  for eqn in jaxpr.eqns:
    total += _eqn_flops(eqn)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else (param,):
        inner = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
        if hasattr(inner, "eqns"):
          total += _jaxpr_flops(inner)
  return total


def flops_per_exit(
  model: AnytimeNet,
  input_shape: Sequence[int],
  *,
  source: str = "auto",
  dtype: Any = jnp.float32,
) -> ExitFlops:
  """FLOPs of computing exits 1..k, for every k.

  Each ``model(x, upto=k)`` is traced on an abstract input (no data, the
  model is not changed) and costed by XLA's compiled cost analysis where the
  backend provides it, else by counting the convolutions and matrix products
  of its jaxpr. The model is costed in its current mode (BatchNorm train
  mode also computes batch statistics).

  Args:
    model: a zoo model (any module with ``num_exits`` and ``upto``).
    input_shape: shape of the input batch, batch axis included, e.g.
      ``(1, 32, 32, 3)``.
    source: ``"auto"`` (XLA, falling back to analytic), ``"xla"`` or
      ``"analytic"``.
    dtype: input dtype.

  Returns:
    An :class:`ExitFlops` ``(flops, source)`` with ``flops.shape == (K,)``.

  Raises:
    ValueError: for an unknown ``source``, a bad ``input_shape``, or
      ``source="xla"`` on a backend without cost analysis.

  Example:
    >>> from flax import nnx
    >>> from osgd_jax import zoo
    >>> model = zoo.create("nested-width-mlp", rngs=nnx.Rngs(0), width=4)
    >>> cost = flops_per_exit(model, (1, 64))
    >>> cost.flops.shape, cost.source in ("xla", "analytic")
    ((4,), True)
  """
  if source not in _SOURCES:
    raise ValueError(f"source must be one of {_SOURCES}, got {source!r}.")
  try:
    shape = tuple(int(d) for d in input_shape)
  except TypeError:
    shape = ()
  if len(shape) < 2 or min(shape) < 1:
    raise ValueError(
      "input_shape must be the shape of an input batch, batch axis"
      f" included, e.g. (1, 32, 32, 3) or (1, 64); got {input_shape!r}."
    )
  graphdef, state = nnx.split(model)
  abstract_state = jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), state
  )
  x = jax.ShapeDtypeStruct(shape, dtype)
  jax.eval_shape(model.input_carry, x)  # a wrong input shape fails here
  forwards = [
    functools.partial(_forward, graphdef, upto=k)
    for k in range(1, model.num_exits + 1)
  ]

  if source != "analytic":
    counts = [_xla_flops(fn, abstract_state, x) for fn in forwards]
    if all(c is not None for c in counts):
      return ExitFlops(np.asarray(counts, dtype=np.float64), "xla")
    if source == "xla":
      raise ValueError(
        "XLA's cost analysis gives no FLOP count on this backend; use"
        " source='analytic' or 'auto'."
      )
  counts = [
    _jaxpr_flops(jax.make_jaxpr(fn)(abstract_state, x).jaxpr) for fn in forwards
  ]
  return ExitFlops(np.asarray(counts, dtype=np.float64), "analytic")


def params_per_exit(model: AnytimeNet) -> np.ndarray:
  """Number of parameters on each exit's path: those of stages 1..k.

  Args:
    model: a zoo model; ``model.stages[k-1]`` owns stage k's parameters.

  Returns:
    An int64 array of shape ``(K,)``, non-decreasing (strictly increasing
    for the zoo models, since every stage has its own head).

  Example:
    >>> from flax import nnx
    >>> from osgd_jax import zoo
    >>> model = zoo.create("branched-mlp", rngs=nnx.Rngs(0), stages=3)
    >>> params_per_exit(model).shape
    (3,)
  """
  stages = getattr(model, "stages", None)
  if stages is None:
    raise ValueError(
      "params_per_exit needs a staged model with a `stages` list, such as"
      " one built by osgd_jax.zoo.create()."
    )
  counts = [
    sum(
      int(np.prod(jnp.shape(p)))
      for p in jax.tree.leaves(nnx.state(stage, nnx.Param))
    )
    for stage in stages
  ]
  return np.cumsum(np.asarray(counts, dtype=np.int64))


class ExitMetrics(NamedTuple):
  """Per-exit test metrics: ``accuracy`` and mean ``loss``, each ``(K,)``."""

  accuracy: np.ndarray
  loss: np.ndarray


class EarlyExitResult(NamedTuple):
  """Result of :func:`early_exit`.

  Attributes:
    predictions: ``(B,)`` predicted class of each example.
    exit_used: ``(B,)`` 1-based exit at which each example stopped.
    mean_flops: mean FLOPs per example, from :func:`flops_per_exit`.
  """

  predictions: np.ndarray
  exit_used: np.ndarray
  mean_flops: float


@functools.partial(jax.jit, static_argnums=0)
def _predict_logits(graphdef: Any, state: Any, x: jax.Array) -> jax.Array:
  # Running BatchNorm statistics, whatever mode the model is in.
  return nnx.merge(graphdef, state).predict(x)


def _batched_logits(
  model: AnytimeNet, x: np.ndarray, batch_size: int
) -> np.ndarray:
  """All exits' logits ``(K, N, C)``, in fixed-size batches (one compile)."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  graphdef, state = nnx.split(model)
  n = len(x)
  if n == 0:
    raise ValueError("cannot evaluate on an empty set of examples.")
  size = min(batch_size, n)
  chunks = []
  for start in range(0, n, size):
    batch = np.asarray(x[start : start + size])
    valid = len(batch)
    if valid < size:  # pad the tail so every call has the same shape
      pad = np.zeros((size - valid,) + batch.shape[1:], batch.dtype)
      batch = np.concatenate([batch, pad])
    chunks.append(
      np.asarray(_predict_logits(graphdef, state, batch))[:, :valid]
    )
  return np.concatenate(chunks, axis=1)


def evaluate(
  model: AnytimeNet, x: np.ndarray, y: np.ndarray, *, batch_size: int = 500
) -> ExitMetrics:
  """Test accuracy and cross-entropy of every exit.

  BatchNorm uses its running statistics (the model is not changed).

  Args:
    model: a zoo model.
    x: inputs, ``(N, ...)``.
    y: integer labels, ``(N,)``.
    batch_size: examples per forward pass.

  Returns:
    An :class:`ExitMetrics` of ``(K,)`` arrays.

  Example:
    >>> import numpy as np
    >>> from flax import nnx
    >>> from osgd_jax import zoo
    >>> model = zoo.create("branched-mlp", rngs=nnx.Rngs(0), stages=3)
    >>> metrics = evaluate(
    ...     model, np.zeros((10, 64), np.float32), np.zeros(10, int))
    >>> metrics.accuracy.shape
    (3,)
  """
  y = np.asarray(y)
  if y.shape != (len(x),):
    raise ValueError(
      f"y must have shape ({len(x)},) to match x, got {y.shape}."
    )
  logits = _batched_logits(model, x, batch_size).astype(np.float64)
  accuracy = (logits.argmax(-1) == y).mean(axis=1)
  shifted = logits - logits.max(-1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  loss = -np.take_along_axis(log_probs, y[None, :, None], axis=-1)[..., 0].mean(
    1
  )
  return ExitMetrics(accuracy, loss)


def _confidence_exits(probs: np.ndarray, threshold: float) -> np.ndarray:
  """0-based first exit whose max-softmax reaches ``threshold`` (else last)."""
  confident = probs.max(-1) >= threshold  # (K, B)
  confident[-1] = True  # the last exit always answers
  return confident.argmax(axis=0)


def early_exit(
  model: AnytimeNet,
  x: np.ndarray,
  threshold: float,
  *,
  flops: np.ndarray | None = None,
  batch_size: int = 500,
) -> EarlyExitResult:
  """Confidence-based early exit: each example stops at its first sure exit.

  An example stops at the first exit whose maximum softmax probability is at
  least ``threshold``, or at the last exit. A threshold of 0 always uses exit
  1; one above 1 always uses the last exit. The logits of every exit are
  computed here for simplicity; the FLOPs charged are those of running stages
  1..k only, as a deployed model would.

  Args:
    model: a zoo model.
    x: inputs, ``(N, ...)``.
    threshold: confidence in [0, ∞).
    flops: ``(K,)`` FLOPs per example up to each exit; by default
      :func:`flops_per_exit` for one example of ``x``.
    batch_size: examples per forward pass.

  Returns:
    An :class:`EarlyExitResult`.
  """
  if not threshold >= 0:
    raise ValueError(f"threshold must be >= 0, got {threshold}.")
  if flops is None:
    flops = flops_per_exit(model, (1,) + tuple(np.shape(x)[1:])).flops
  logits = _batched_logits(model, x, batch_size)
  probs = np.asarray(jax.nn.softmax(logits, axis=-1))
  exits = _confidence_exits(probs, threshold)
  predictions = logits.argmax(-1)[exits, np.arange(logits.shape[1])]
  return EarlyExitResult(
    predictions, exits + 1, float(np.asarray(flops)[exits].mean())
  )


def early_exit_curve(
  model: AnytimeNet,
  x: np.ndarray,
  y: np.ndarray,
  thresholds: Sequence[float] | np.ndarray,
  *,
  flops: np.ndarray | None = None,
  batch_size: int = 500,
) -> tuple[np.ndarray, np.ndarray]:
  """Accuracy against mean FLOPs per example over a threshold sweep.

  Args:
    model: a zoo model.
    x: inputs, ``(N, ...)``.
    y: labels, ``(N,)``.
    thresholds: confidence thresholds to sweep.
    flops: ``(K,)`` FLOPs per example up to each exit; by default
      :func:`flops_per_exit` for one example of ``x``.
    batch_size: examples per forward pass.

  Returns:
    ``(mean_flops, accuracy)``, each of shape ``(len(thresholds),)``.
  """
  if flops is None:
    flops = flops_per_exit(model, (1,) + tuple(np.shape(x)[1:])).flops
  flops = np.asarray(flops)
  logits = _batched_logits(model, x, batch_size)
  probs = np.asarray(jax.nn.softmax(logits, axis=-1))
  predictions = logits.argmax(-1)
  columns = np.arange(logits.shape[1])
  mean_flops, accuracy = [], []
  for t in thresholds:
    exits = _confidence_exits(probs, t)
    mean_flops.append(flops[exits].mean())
    accuracy.append((predictions[exits, columns] == np.asarray(y)).mean())
  return np.asarray(mean_flops), np.asarray(accuracy)


def predict_within(
  model: AnytimeNet, x: jax.Array, flops_budget: float
) -> tuple[jax.Array, int]:
  """Logits of the deepest exit whose cost fits ``flops_budget`` per example.

  Only stages 1..k run.

  Args:
    model: a zoo model.
    x: a batch of inputs.
    flops_budget: FLOPs allowed per example.

  Returns:
    ``(logits, k)``: the ``(batch, classes)`` logits of exit k (1-based).

  Raises:
    ValueError: if even exit 1 costs more than the budget.
  """
  flops = flops_per_exit(model, (1,) + tuple(np.shape(x)[1:])).flops
  fits = np.nonzero(flops <= flops_budget)[0]
  if fits.size == 0:
    raise ValueError(
      f"a budget of {flops_budget:.4g} FLOPs is below exit 1's cost of"
      f" {flops[0]:.4g} FLOPs per example; raise the budget."
    )
  k = int(fits[-1]) + 1
  return model.predict(x, upto=k)[-1], k
