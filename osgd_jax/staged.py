"""The staged (anytime) Jacobian of a zoo :class:`~osgd_jax.zoo.AnytimeNet`.

Exit k of an anytime network depends only on stages 1..k, so the gradient of
its loss needs a backward pass through those stages only.
:func:`staged_value_and_per_exit_grads` runs the forward stage by stage,
keeping each stage's VJP, then walks the stages from last to first and runs
stage j's VJP for exits j..K only. With ``c_j`` the backward cost of stage j,
that is ``sum_k (c_1 + ... + c_k)`` instead of the ``K * (c_1 + ... + c_K)``
of :func:`~osgd_jax.grads.value_and_per_exit_grads`: for K stages of equal
cost, about half the backward work, and no multiplication of cotangents that
are known to be zero.

It is exact under two conditions, both checked when the function is traced:
every variable belongs to exactly one stage, and the loss of exit k reads no
later exit's logits (:func:`osgd_jax.dataflow.check_exit_dependencies`).

How the per-exit rows of one stage's VJP run is a backend choice (``rows``):
``"batched"`` vmaps them into one VJP, whose larger kernels suit
accelerators; ``"looped"`` traces one VJP per row, which suits XLA:CPU, where
the vmapped gradient of a convolution runs slower than the same convolutions
one by one. ``"auto"`` traces both and lets ``jax.lax.platform_dependent``
pick one when the function is lowered for its platform, so one traced
function (and a ``jax.export`` of it) serves CPUs and accelerators alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.extend
import jax.numpy as jnp
from flax import nnx

from osgd_jax.dataflow import check_exit_dependencies
from osgd_jax.grads import check_aux_pair, check_loss_vector

__all__ = ["ROWS", "staged_value_and_per_exit_grads"]

#: How the per-exit rows of one stage's VJP run; see the module docstring.
ROWS = ("auto", "batched", "looped")


def _split_floats(tree: Any) -> tuple[list[Any], list[Any], Any]:
  """Splits a carry into its differentiable leaves and the rest."""
  leaves, treedef = jax.tree.flatten(tree)
  is_float = tuple(
    jnp.issubdtype(jnp.result_type(leaf), jnp.inexact) for leaf in leaves
  )
  floats = [leaf for leaf, f in zip(leaves, is_float, strict=True) if f]
  others = [leaf for leaf, f in zip(leaves, is_float, strict=True) if not f]
  return floats, others, (treedef, is_float)


def _join_floats(floats: list[Any], others: list[Any], spec: Any) -> Any:
  treedef, is_float = spec
  float_iter, other_iter = iter(floats), iter(others)
  return jax.tree.unflatten(
    treedef, [next(float_iter) if f else next(other_iter) for f in is_float]
  )


def _anytime_stages(
  model: Any, params: Any, rest: Any, fn_name: str
) -> list[Any]:
  """Checks that every variable belongs to exactly one stage; returns stages.

  Each stage is split on its own, so a variable shared between two stages
  (or a parameter outside the stages) would make the staged gradient wrong.
  Such a variable shows up under only one path of the model's state, so
  comparing each stage's own state with its part of the model's finds it.
  """
  stages = getattr(model, "stages", None)
  if stages is None or not callable(getattr(model, "input_carry", None)):
    raise ValueError(
      f"{fn_name}: graphdef must describe an anytime network with `stages`"
      " and `input_carry` (an osgd_jax.zoo.AnytimeNet), but it describes a"
      f" {type(model).__name__}. Use osgd_jax.value_and_per_exit_grads for"
      " other models."
    )
  stages = list(stages)
  if not stages:
    raise ValueError(f"{fn_name}: the model has no stages.")
  outside = [k for k in params.keys() if k != "stages"]
  if outside:
    raise ValueError(
      f"{fn_name}: parameters outside model.stages ({outside}) would get"
      " no gradient; move them into a stage or use"
      " osgd_jax.value_and_per_exit_grads."
    )
  model_rest = nnx.state(model, nnx.Not(nnx.Param))
  for j, stage in enumerate(stages):
    _, own_params, own_rest = nnx.split(stage, nnx.Param, ...)
    for kind, own, whole in (
      ("parameters", own_params, params),
      ("state", own_rest, model_rest),
    ):
      part = (
        whole["stages"][j]
        if ("stages" in whole and j in whole["stages"])
        else nnx.State({})
      )
      if jax.tree.structure(own) != jax.tree.structure(part):
        raise ValueError(
          f"{fn_name}: stage {j + 1} does not own exactly its own {kind}:"
          " it shares variables with another stage or the params were not"
          " split with `nnx.split(model, nnx.Param, ...)`. The staged"
          " Jacobian needs disjoint stages; use"
          " osgd_jax.value_and_per_exit_grads."
        )
  return stages


def _pad_rows(j: int, grads_j: Any) -> Any:
  """Stage j's rows of exits j..K, with zero rows for the exits before j."""
  return jax.tree.map(
    lambda g: (
      g if j == 0 else jnp.concatenate([jnp.zeros_like(g[:1])] * j + [g])
    ),
    grads_j,
  )


def staged_backward(
  vjps: list[Any],
  logit_cts: Any,
  num_exits: int,
  rows: str,
  reduce: Callable[[int, Any], Any] = _pad_rows,
) -> list[Any]:
  """The per-exit gradients of every stage's parameters, stage 1 first.

  ``vjps[j]`` is stage j's VJP with its output floats; ``logit_cts[j][k]``
  the cotangent of exit k's loss on exit j's logits. ``reduce(j, grads_j)``
  receives stage j's gradients for exits j..K (leaves ``(K - j,
  *param.shape)``) as soon as they exist; the default pads them to K rows,
  so that one pytree per stage with ``(K, *param.shape)`` leaves returns.
  """
  # Backward: stage j runs for exits j..K-1. Exit j starts at its own
  # logits with a zero carry cotangent; later exits bring theirs.
  stage_grads: list[Any] = [None] * num_exits
  carry_cts = None  # batched: stacked over exits j+1..K; looped: a list
  for j in reversed(range(num_exits)):
    vjp, out_floats = vjps[j]
    if rows == "batched":
      # zeros_like keeps each array's sharding (explicit-sharding meshes).
      first = [jnp.zeros_like(f)[None] for f in out_floats]
      out_cts = (
        first
        if carry_cts is None
        else [
          jnp.concatenate([z, c]) for z, c in zip(first, carry_cts, strict=True)
        ]
      )
      cts = jax.vmap(vjp)((out_cts, logit_cts[j][j:]))
      if j == 0:
        (grads_j,) = cts
      else:
        grads_j, carry_cts = cts
      # Exits before j do not reach stage j: zero rows, one concatenation.
      stage_grads[j] = reduce(j, grads_j)
    else:
      own = [jnp.zeros_like(f) for f in out_floats]
      outs = [
        vjp((ct, logit_cts[j][k]))
        for k, ct in zip(
          range(j, num_exits), [own] + (carry_cts or []), strict=True
        )
      ]
      carry_cts = [out[1] for out in outs] if j else None
      stage_grads[j] = reduce(
        j, jax.tree.map(lambda *g: jnp.stack(g), *[out[0] for out in outs])
      )
  return stage_grads


def staged_forward(
  graphdef: Any,
  loss_fn: Callable[..., Any],
  has_aux: bool,
  fn_name: str,
  params: Any,
  rest: Any,
  x: Any,
  *loss_args: Any,
) -> tuple[Any, Any, list[Any], Any, Any]:
  """The forward pass of the staged Jacobian, stage by stage, with checks.

  Returns:
    ``(losses, aux, vjps, logit_cts, new_rest)``: ``vjps[j]`` is stage j's
    pullback with its output floats, ``logit_cts[j][k]`` the cotangent of
    exit k's loss on exit j's logits, ``new_rest`` the non-parameter state
    after the forward (``aux`` is ``None`` without ``has_aux``).
  """
  # Fresh Variables: the caller's state is never mutated.
  model = nnx.merge(graphdef, params, rest, copy=True)
  stages = _anytime_stages(model, params, rest, fn_name)
  num_exits = len(stages)

  # Forward, stage by stage; each VJP involves only its stage's variables.
  carry = model.input_carry(x)
  vjps, logits = [], []
  for j, stage in enumerate(stages):
    stage_def, stage_params, stage_rest = nnx.split(stage, nnx.Param, ...)
    floats, others, spec = _split_floats(carry)
    out_spec = []

    def run(
      p,
      floats,
      stage_def=stage_def,
      stage_rest=stage_rest,
      others=others,
      spec=spec,
      out_spec=out_spec,
    ):
      module = nnx.merge(stage_def, p, stage_rest, copy=True)
      new_carry, out = module(_join_floats(floats, others, spec))
      new_floats, new_others, new_spec = _split_floats(new_carry)
      out_spec.append(new_spec)
      return (
        (new_floats, out),
        (new_others, nnx.state(module, nnx.Not(nnx.Param))),
      )

    if j == 0:
      # Nothing upstream of stage 1 has parameters: no input cotangent.
      (new_floats, out), vjp, (new_others, new_rest) = jax.vjp(
        lambda p, run=run, floats=floats: run(p, floats),
        stage_params,
        has_aux=True,
      )
    else:
      (new_floats, out), vjp, (new_others, new_rest) = jax.vjp(
        run, stage_params, floats, has_aux=True
      )
    nnx.update(stage, new_rest)
    carry = _join_floats(new_floats, new_others, out_spec[-1])
    vjps.append((vjp, new_floats))
    logits.append(out)

  # The loss, traced once; its jaxpr also serves the dependency check.
  def stacked_loss(*exit_logits):
    out = loss_fn(jnp.stack(exit_logits), *loss_args)
    return check_aux_pair(out, fn_name) if has_aux else out

  closed, out_shape = jax.make_jaxpr(stacked_loss, return_shape=True)(*logits)
  loss_shape = out_shape[0] if has_aux else out_shape
  check_loss_vector(loss_shape, fn_name)
  if loss_shape.shape[0] != num_exits:
    raise ValueError(
      f"{fn_name} returned {loss_shape.shape[0]} losses but the model has"
      f" {num_exits} exits; return one loss per exit."
    )
  check_exit_dependencies(closed, num_exits, fn_name)
  out_tree = jax.tree.structure(out_shape)
  loss_from_jaxpr = jax.extend.core.jaxpr_as_fun(closed)

  def losses_and_aux(*exit_logits):
    out = jax.tree.unflatten(out_tree, loss_from_jaxpr(*exit_logits))
    return out if has_aux else (out, None)

  losses, loss_vjp, aux = jax.vjp(losses_and_aux, *logits, has_aux=True)
  # logit_cts[j][k]: cotangent of exit k's loss on exit j's logits.
  logit_cts = jax.vmap(loss_vjp)(jnp.eye(num_exits, dtype=losses.dtype))

  new_rest = nnx.state(model, nnx.Not(nnx.Param))
  return losses, aux, vjps, logit_cts, new_rest


def staged_value_and_per_exit_grads(
  graphdef: Any,
  loss_fn: Callable[..., Any],
  has_aux: bool = False,
  rows: str = "auto",
) -> Callable[..., tuple[Any, Any]]:
  """Per-exit gradients of an anytime network, each through its own stages.

  The anytime (staged) Jacobian: exit k's loss depends only on stages 1..k,
  so its gradient needs a backward pass through those stages only. The
  returned function runs the forward once, stage by stage, keeping each
  stage's VJP, then walks the stages backwards; stage j's VJP runs for exits
  j..K only, and its parameters' rows for exits before j are exact zeros.
  The result equals :func:`~osgd_jax.grads.value_and_per_exit_grads` of the
  merged model's loss, for about ``sum_k (c_1 + ... + c_k)`` backward work
  instead of ``K * (c_1 + ... + c_K)`` (``c_j``: the cost of stage j).

  Assumptions, checked at trace time:

  * every parameter and every other variable belongs to exactly one stage
    (``model.stages[j]``), and ``model.input_carry`` has no parameters;
  * ``losses[k]`` depends on the logits of exits 1..k only, never on a later
    exit's (checked on the jaxpr of ``loss_fn``; ``jax.lax.stop_gradient``
    on the later logits is fine).

  Args:
    graphdef: the graph definition of an :class:`~osgd_jax.zoo.AnytimeNet`,
      from ``graphdef, params, rest = nnx.split(model, nnx.Param, ...)``.
    loss_fn: ``loss_fn(stacked_logits, *loss_args)`` with ``stacked_logits``
      of shape ``(K, batch, classes)``, returning the ``(K,)`` vector of exit
      losses, exit 1 first (or ``(losses, aux)`` with ``has_aux``).
    has_aux: whether ``loss_fn`` returns a pair ``(losses, aux)``.
    rows: how a stage's VJP runs for its exits: ``"batched"`` (one vmapped
      VJP), ``"looped"`` (one VJP per exit, unrolled), or ``"auto"`` (looped
      on CPU, where XLA's vmapped convolution gradients are slow; batched on
      GPU/TPU). The results agree to float rounding.

  Returns:
    A function ``fn(params, rest, x, *loss_args)`` returning
    ``((losses, new_rest), grads)``, or ``((losses, aux, new_rest), grads)``
    with ``has_aux``. ``new_rest`` is the non-parameter state after the
    forward pass (updated BatchNorm statistics in train mode); every leaf of
    ``grads`` has shape ``(K, *param.shape)``, row k the gradient of
    ``losses[k]``, in the structure of ``params``.

  Raises:
    ValueError: at construction, if ``graphdef`` is not an ``nnx.GraphDef``
      or ``rows`` is unknown;
      at trace time, if the model has no ``stages``, a variable is shared
      between stages or lies outside them, ``loss_fn`` does not return a
      non-empty 1-D floating-point vector of length K, or an exit's loss
      depends on a later exit's logits.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import osgd_jax
    >>> from osgd_jax import zoo
    >>> model = zoo.create("nested-depth-mlp", rngs=nnx.Rngs(0), width=8,
    ...                    stages=3)
    >>> graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    >>> loss_fn = lambda logits, y: osgd_jax.per_exit_cross_entropy(logits, y)
    >>> grads_fn = jax.jit(
    ...     osgd_jax.staged_value_and_per_exit_grads(graphdef, loss_fn))
    >>> (losses, rest), grads = grads_fn(
    ...     params, rest, jnp.ones((4, 64)), jnp.zeros(4, jnp.int32))
    >>> nnx.update(model, rest)  # keep the new batch statistics
    >>> head_2 = grads["stages"][1]["head"]["linear"]["kernel"]
    >>> losses.shape, head_2.shape, bool((head_2[0] == 0).all())
    ((3,), (3, 8, 10), True)
  """
  fn_name = getattr(loss_fn, "__name__", "loss_fn")
  if rows not in ROWS:
    raise ValueError(f"rows must be one of {ROWS}, got {rows!r}.")
  if not isinstance(graphdef, nnx.GraphDef):
    raise ValueError(
      "staged_value_and_per_exit_grads takes the graphdef of an anytime"
      " network, from `graphdef, params, rest = nnx.split(model,"
      f" nnx.Param, ...)`, but got a {type(graphdef).__name__}."
    )

  def value_and_grads(params, rest, x, *loss_args):
    losses, aux, vjps, logit_cts, new_rest = staged_forward(
      graphdef, loss_fn, has_aux, fn_name, params, rest, x, *loss_args
    )
    num_exits = len(vjps)

    def backward(form):
      return staged_backward(vjps, logit_cts, num_exits, form)

    if rows == "auto":
      # Decided when the step is lowered for its platform, not when traced.
      stage_grads = jax.lax.platform_dependent(
        cpu=lambda: backward("looped"), default=lambda: backward("batched")
      )
    else:
      stage_grads = backward(rows)

    by_path = {}
    for j, grads_j in enumerate(stage_grads):
      prefix = (jax.tree_util.DictKey("stages"), jax.tree_util.DictKey(j))
      for path, leaf in jax.tree_util.tree_flatten_with_path(grads_j)[0]:
        by_path[prefix + path] = leaf
    paths, treedef = jax.tree_util.tree_flatten_with_path(params)
    grads = jax.tree.unflatten(treedef, [by_path[path] for path, _ in paths])

    if has_aux:
      return (losses, aux, new_rest), grads
    return (losses, new_rest), grads

  return value_and_grads
