"""Anytime utilities: what each exit costs, how well it does, when to stop.

Exit k of a zoo model needs stages 1..k only, so its cost is that of
``model(x, upto=k)``. :func:`flops_per_exit` measures it,
:func:`params_per_exit` counts the parameters on exit k's path.
:func:`evaluate` gives every exit's test accuracy and loss (per example, or
per token for a sequence model's next-token labels);
:func:`early_exit` stops each example at its first confident exit,
:func:`early_exit_curve` sweeps the confidence threshold, and
:func:`predict_within` answers with the deepest exit that fits a FLOPs budget.
For language models, :func:`token_early_exit` and
:func:`token_early_exit_curve` exit token by token, as CALM does (Schuster
et al., *Confident Adaptive Language Modeling*, NeurIPS 2022): each position
stops at its first exit whose top softmax probability reaches a threshold.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
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
  "TokenEarlyExit",
  "early_exit",
  "early_exit_curve",
  "evaluate",
  "flops_per_exit",
  "params_per_exit",
  "predict_within",
  "token_early_exit",
  "token_early_exit_curve",
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
  leaves, treedef = jax.tree.flatten(state)
  x = jax.ShapeDtypeStruct(shape, dtype)
  jax.eval_shape(model.input_carry, x)  # a wrong input shape fails here
  counts, counted_by = _exit_flops(
    graphdef,
    treedef,
    tuple(
      jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)) for a in leaves
    ),
    x,
    model.num_exits,
    source,
  )
  return ExitFlops(np.asarray(counts, dtype=np.float64), counted_by)


@functools.lru_cache(maxsize=64)
def _exit_flops(
  graphdef: Any,
  treedef: Any,
  leaves: tuple[jax.ShapeDtypeStruct, ...],
  x: jax.ShapeDtypeStruct,
  num_exits: int,
  source: str,
) -> tuple[tuple[float, ...], str]:
  """``flops_per_exit``'s counts, once per model structure and input.

  The counts depend only on the model's graph (its structure and static
  attributes, such as BatchNorm's mode), its state's shapes and dtypes
  and the input's: every training run of a comparison, and the evaluation
  after it, asks again for the same model.
  """
  abstract_state = jax.tree.unflatten(treedef, leaves)
  forwards = [
    functools.partial(_forward, graphdef, upto=k)
    for k in range(1, num_exits + 1)
  ]
  if source != "analytic":
    counts = [_xla_flops(fn, abstract_state, x) for fn in forwards]
    if all(c is not None for c in counts):
      return tuple(float(c) for c in counts if c is not None), "xla"
    if source == "xla":
      raise ValueError(
        "XLA's cost analysis gives no FLOP count on this backend; use"
        " source='analytic' or 'auto'."
      )
  counts = [
    _jaxpr_flops(jax.make_jaxpr(fn)(abstract_state, x).jaxpr) for fn in forwards
  ]
  return tuple(float(c) for c in counts), "analytic"


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


def _logit_chunks(
  model: AnytimeNet, x: np.ndarray, batch_size: int
) -> Iterator[tuple[jax.Array, int]]:
  """``(logits, valid)`` per fixed-size batch (one compile): ``(K, size, ...)``.

  The last batch is padded with zeros to the common size; only its first
  ``valid`` examples are real.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  graphdef, state = nnx.split(model)
  n = len(x)
  if n == 0:
    raise ValueError("cannot evaluate on an empty set of examples.")
  size = min(batch_size, n)
  for start in range(0, n, size):
    batch = np.asarray(x[start : start + size])
    valid = len(batch)
    if valid < size:  # pad the tail so every call has the same shape
      pad = np.zeros((size - valid,) + batch.shape[1:], batch.dtype)
      batch = np.concatenate([batch, pad])
    yield _predict_logits(graphdef, state, batch), valid


def _batched_logits(
  model: AnytimeNet, x: np.ndarray, batch_size: int
) -> np.ndarray:
  """All exits' logits ``(K, N, C)``, in fixed-size batches (one compile)."""
  return np.concatenate(
    [
      np.asarray(logits)[:, :valid]
      for logits, valid in _logit_chunks(model, x, batch_size)
    ],
    axis=1,
  )


def _check_labels(y: Any, x: Any) -> np.ndarray:
  """``y`` as an array of one label per example, or per position of ``x``."""
  y = np.asarray(y)
  if y.shape[:1] != (len(x),) or y.shape[1:] not in ((), np.shape(x)[1:]):
    raise ValueError(
      f"y must have shape ({len(x)},) to match x, or x's shape"
      f" {tuple(np.shape(x))} for one label per position (next-token"
      f" targets); got {y.shape}."
    )
  return y


def evaluate(
  model: AnytimeNet, x: np.ndarray, y: np.ndarray, *, batch_size: int = 500
) -> ExitMetrics:
  """Test accuracy and cross-entropy of every exit.

  BatchNorm uses its running statistics (the model is not changed). For a
  sequence model, ``y`` holds a label per position (next-token targets) and
  both metrics are over every position of every example: the token accuracy
  and the mean next-token cross-entropy, in nats (divide by ``ln 2`` for
  bits per token). Each batch's logits are taken to float64 on the host, so
  ``batch_size`` bounds the memory: ``8 * K * batch_size * positions *
  classes`` bytes.

  Args:
    model: a zoo model.
    x: inputs, ``(N, ...)``.
    y: integer labels, ``(N,)``, or ``(N, *positions)`` like ``x`` for one
      label per position.
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
  y = _check_labels(y, x)
  correct, nats, start = 0.0, 0.0, 0
  for chunk, valid in _logit_chunks(model, x, batch_size):
    logits = np.asarray(chunk, np.float64)[:, :valid]
    labels = y[start : start + valid]
    start += valid
    # (K, B, ..., C) -> (K, M, C) over the M labels of the batch.
    logits = logits.reshape(logits.shape[0], -1, logits.shape[-1])
    labels = labels.reshape(-1)
    correct = correct + (logits.argmax(-1) == labels).sum(axis=1)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    nats = nats - np.take_along_axis(log_probs, labels[None, :, None], axis=-1)[
      ..., 0
    ].sum(axis=1)
  count = y.size
  return ExitMetrics(np.asarray(correct) / count, np.asarray(nats) / count)


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


class TokenEarlyExit(NamedTuple):
  """Token-level early exit by confidence over a sweep of thresholds.

  Every field but ``exit_counts`` has one entry per threshold.

  Attributes:
    threshold: ``(T,)`` the confidence thresholds.
    exit_counts: ``(T, K)`` int64, how many tokens stopped at each exit.
    mean_exit: ``(T,)`` mean 1-based exit depth per token.
    mean_flops: ``(T,)`` mean FLOPs per token, from the ``(K,)`` FLOPs per
      token of each exit (NaN where none were given).
    loss: ``(T,)`` mean cross-entropy, in nats, of the answering exit.
    bits: ``(T,)`` the same in bits per token (``loss / ln 2``).
    accuracy: ``(T,)`` how often the answering exit's top token is the
      label.
  """

  threshold: np.ndarray
  exit_counts: np.ndarray
  mean_exit: np.ndarray
  mean_flops: np.ndarray
  loss: np.ndarray
  bits: np.ndarray
  accuracy: np.ndarray


@jax.jit
def _token_exit_sums(
  logits: jax.Array, labels: jax.Array, valid: jax.Array, thresholds: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per threshold: tokens per exit ``(T, K)``, summed nats, correct count.

  ``logits`` are ``(K, ..., C)``, ``labels`` and ``valid`` (which labels
  count) the logits' shape without the exit and class axes.
  """
  k = logits.shape[0]
  dtype = jnp.promote_types(logits.dtype, jnp.float32)
  log_probs = jax.nn.log_softmax(
    logits.astype(dtype).reshape(k, -1, logits.shape[-1]), axis=-1
  )  # (K, M, C)
  labels = labels.reshape(-1)
  weight = valid.reshape(-1).astype(dtype)
  nats = -jnp.take_along_axis(log_probs, labels[None, :, None], axis=-1)[
    ..., 0
  ]  # (K, M)
  correct = (log_probs.argmax(-1) == labels).astype(dtype)
  confidence = jnp.exp(log_probs.max(-1))  # max softmax probability
  confident = confidence[None] >= thresholds[:, None, None]  # (T, K, M)
  confident = confident.at[:, -1].set(True)  # the last exit always answers
  exits = jnp.argmax(confident, axis=1)  # (T, M), the first confident exit
  counts = jnp.einsum(
    "tmk,m->tk", jax.nn.one_hot(exits, k, dtype=dtype), weight
  )
  chosen_nats = jnp.take_along_axis(nats, exits, axis=0)  # (T, M)
  chosen_correct = jnp.take_along_axis(correct, exits, axis=0)
  return counts, chosen_nats @ weight, chosen_correct @ weight


def _check_thresholds(thresholds: Any) -> np.ndarray:
  values = np.asarray(thresholds, np.float64)
  if values.ndim != 1 or values.size == 0 or not np.all(values >= 0):
    raise ValueError(
      "thresholds must be a non-empty 1-D sequence of numbers >= 0, such as"
      f" numpy.linspace(0, 1, 21); got {thresholds!r}."
    )
  return values


def _token_exit_result(
  thresholds: np.ndarray,
  counts: np.ndarray,
  nats: np.ndarray,
  correct: np.ndarray,
  flops: Any,
) -> TokenEarlyExit:
  num_exits = counts.shape[1]
  if flops is None:
    mean_flops = np.full(len(thresholds), np.nan)
  else:
    flops = np.asarray(flops, np.float64)
    if flops.shape != (num_exits,):
      raise ValueError(
        f"flops must have shape (K,) = ({num_exits},), the FLOPs per token"
        f" of each exit; got shape {flops.shape}."
      )
    mean_flops = counts @ flops / counts.sum(1)
  total = counts.sum(1)
  loss = nats / total
  return TokenEarlyExit(
    threshold=thresholds,
    exit_counts=np.rint(counts).astype(np.int64),
    mean_exit=counts @ np.arange(1, num_exits + 1) / total,
    mean_flops=mean_flops,
    loss=loss,
    bits=loss / math.log(2),
    accuracy=correct / total,
  )


def token_early_exit(
  logits: Any,
  labels: Any,
  thresholds: Sequence[float] | np.ndarray,
  *,
  flops: Any = None,
) -> TokenEarlyExit:
  """CALM-style early exit of every token, for each confidence threshold.

  Each position stops at the first exit whose maximum softmax probability
  is at least the threshold, or at the last exit, and is scored by that
  exit's logits: the cross-entropy of its label and whether the top token
  is the label. A threshold of 0 always stops at exit 1; one above 1 always
  runs to the last exit. This is the token-level confidence rule of Schuster
  et al., *Confident Adaptive Language Modeling* (NeurIPS 2022), with the
  softmax-response measure. It scores exits whose logits were computed in
  one full forward pass: later tokens attend to the full-depth states of
  the earlier ones, where CALM's decoder copies an exiting token's state to
  its skipped layers. The curve is that of the exit rule on a full
  forward's states, the bound that such state propagation approaches.

  Args:
    logits: stacked exit logits ``(K, batch, *positions, classes)``, e.g.
      ``(K, batch, seq, vocab)``; classification's ``(K, batch, classes)``
      works as well.
    labels: integer labels, the logits' shape without the exit and class
      axes.
    thresholds: ``(T,)`` confidence thresholds, each >= 0.
    flops: ``(K,)`` FLOPs per token of each exit, for ``mean_flops``;
      ``None`` leaves it NaN.

  Returns:
    A :class:`TokenEarlyExit`, its averages over every position.

  Raises:
    ValueError: the shapes do not fit, or a threshold is negative.

  Example:
    >>> import jax.numpy as jnp
    >>> logits = jnp.zeros((2, 1, 3, 4)).at[1, ..., 0].set(5.0)
    >>> result = token_early_exit(logits, jnp.zeros((1, 3), int), [0.0, 0.5])
    >>> result.mean_exit.tolist()
    [1.0, 2.0]
  """
  logits, labels = jnp.asarray(logits), jnp.asarray(labels)
  values = _check_thresholds(thresholds)
  if logits.ndim < 3 or labels.shape != logits.shape[1:-1]:
    raise ValueError(
      "logits must be stacked (K, batch, *positions, classes) and labels"
      " their shape without the exit and class axes; got logits"
      f" {tuple(logits.shape)} and labels {tuple(labels.shape)}."
    )
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(
      f"labels must be integer class indices, got dtype {labels.dtype}."
    )
  sums = _token_exit_sums(
    logits, labels, jnp.ones(labels.shape, bool), jnp.asarray(values)
  )
  counts, nats, correct = (np.asarray(a, np.float64) for a in sums)
  return _token_exit_result(values, counts, nats, correct, flops)


def token_early_exit_curve(
  model: AnytimeNet,
  x: np.ndarray,
  y: np.ndarray,
  thresholds: Sequence[float] | np.ndarray,
  *,
  flops: np.ndarray | None = None,
  batch_size: int = 64,
) -> TokenEarlyExit:
  """:func:`token_early_exit` of a sequence model over a whole test set.

  The logits are computed batch by batch and never held together; each
  batch's sums are taken in float32 and added up in float64.

  Args:
    model: a zoo model returning ``(K, batch, seq, vocab)`` logits.
    x: inputs, ``(N, seq)`` tokens.
    y: next-token labels, ``(N, seq)``.
    thresholds: ``(T,)`` confidence thresholds, each >= 0.
    flops: ``(K,)`` FLOPs per token of each exit; by default
      :func:`flops_per_exit` of one sequence divided by its length, the
      token's share of the sequence's cost.
    batch_size: sequences per forward pass.

  Returns:
    A :class:`TokenEarlyExit`.

  Raises:
    ValueError: the labels do not match ``x``, or a threshold is negative.
  """
  y = _check_labels(y, x)
  values = _check_thresholds(thresholds)
  if y.ndim < 2:
    raise ValueError(
      f"y must hold a label per position, shape {tuple(np.shape(x))} like"
      f" x; got {y.shape}. For one label per example, use early_exit_curve."
    )
  if flops is None:
    shape = (1, *np.shape(x)[1:])
    per_sequence = flops_per_exit(model, shape, dtype=np.asarray(x).dtype)
    flops = per_sequence.flops / math.prod(shape[1:])
  totals = None
  start = 0
  for logits, valid in _logit_chunks(model, x, batch_size):
    labels = np.zeros(logits.shape[1:-1], y.dtype)
    labels[:valid] = y[start : start + valid]
    mask = np.zeros(labels.shape, bool)
    mask[:valid] = True
    start += valid
    sums = _token_exit_sums(logits, labels, mask, jnp.asarray(values))
    sums = [np.asarray(a, np.float64) for a in sums]
    totals = (
      sums
      if totals is None
      else [t + a for t, a in zip(totals, sums, strict=True)]
    )
  assert totals is not None  # _logit_chunks yields at least one batch
  counts, nats, correct = totals
  return _token_exit_result(values, counts, nats, correct, flops)


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
