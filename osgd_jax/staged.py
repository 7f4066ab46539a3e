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

from osgd_jax._loss_checks import check_aux_pair, check_loss_vector
from osgd_jax.dataflow import check_exit_dependencies
from osgd_jax.zoo.base import AnytimeNet, replaced_call

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
  loss_fn: Callable[..., Any] | None = None,
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

  Two forms. **With a model** (as ``nnx.value_and_grad``):
  ``staged_value_and_per_exit_grads(loss_fn)(model, *args)`` with
  ``loss_fn(model, *args)`` written as for
  :func:`~osgd_jax.grads.value_and_per_exit_grads`, which calls the model
  exactly once, ``model(x)`` on one of ``args`` as passed, and reaches the
  parameters only through that call. It returns ``(losses, grads)``
  (``((losses, aux), grads)`` with ``has_aux``), ``grads`` an ``nnx.State``
  of the parameters with leaves ``(K, *param.shape)``, and updates the
  model's other state (BatchNorm statistics) in place, once. A loss
  function that does not fit is refused with the reason;
  :func:`~osgd_jax.grads.value_and_per_exit_grads` then takes the vmapped
  path instead. **Functional**: ``staged_value_and_per_exit_grads(graphdef,
  loss_fn)(params, rest, x, *loss_args)`` as below.

  Args:
    graphdef: the graph definition of an :class:`~osgd_jax.zoo.AnytimeNet`,
      from ``graphdef, params, rest = nnx.split(model, nnx.Param, ...)``;
      or, in the model form, the loss function ``loss_fn(model, *args)``.
    loss_fn: ``loss_fn(stacked_logits, *loss_args)`` with ``stacked_logits``
      of shape ``(K, batch, classes)``, returning the ``(K,)`` vector of exit
      losses, exit 1 first (or ``(losses, aux)`` with ``has_aux``). Left
      out in the model form.
    has_aux: whether ``loss_fn`` returns a pair ``(losses, aux)``.
    rows: how a stage's VJP runs for its exits: ``"batched"`` (one vmapped
      VJP), ``"looped"`` (one VJP per exit, unrolled), or ``"auto"`` (looped
      on CPU, where XLA's vmapped convolution gradients are slow; batched on
      GPU/TPU). The results agree to float rounding.

  Returns:
    In the model form, ``fn(model, *args)`` as described above. Otherwise
    a function ``fn(params, rest, x, *loss_args)`` returning
    ``((losses, new_rest), grads)``, or ``((losses, aux, new_rest), grads)``
    with ``has_aux``. ``new_rest`` is the non-parameter state after the
    forward pass (updated BatchNorm statistics in train mode); every leaf of
    ``grads`` has shape ``(K, *param.shape)``, row k the gradient of
    ``losses[k]``, in the structure of ``params``.

  Raises:
    ValueError: at construction, if ``graphdef`` is not an ``nnx.GraphDef``
      (nor, without ``loss_fn``, a function) or ``rows`` is unknown; in
      the model form, at trace time, if the model is not an AnytimeNet or
      ``loss_fn`` does not fit (the message says why);
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
  if rows not in ROWS:
    raise ValueError(f"rows must be one of {ROWS}, got {rows!r}.")
  if loss_fn is None and callable(graphdef):
    module_loss_fn = graphdef
    module_fn_name = getattr(module_loss_fn, "__name__", "loss_fn")

    def value_and_grads_of_model(model, *args):
      out = staged_module_value_and_grads(
        module_loss_fn,
        model,
        args,
        has_aux=has_aux,
        rows=rows,
        required=True,
        fn_name=module_fn_name,
      )
      assert out is not None  # required=True raises instead
      return out

    return value_and_grads_of_model
  fn_name = getattr(loss_fn, "__name__", "loss_fn")
  if loss_fn is None or not isinstance(graphdef, nnx.GraphDef):
    raise ValueError(
      "staged_value_and_per_exit_grads takes the graphdef of an anytime"
      " network, from `graphdef, params, rest = nnx.split(model,"
      f" nnx.Param, ...)`, and a loss function, but got a"
      f" {type(graphdef).__name__} and a {type(loss_fn).__name__}; or,"
      " for a model, the loss function alone:"
      " `staged_value_and_per_exit_grads(loss_fn)(model, x, y)`."
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


def _params_read(closed: Any, num_params: int) -> bool:
  """Whether a jaxpr reads any of its first ``num_params`` inputs."""
  params = {id(v) for v in closed.jaxpr.invars[:num_params]}
  used = [v for eqn in closed.jaxpr.eqns for v in eqn.invars]
  used += list(closed.jaxpr.outvars)
  return any(id(v) in params for v in used)


def _loss_of_logits(
  loss_fn: Callable[..., Any],
  model: AnytimeNet,
  args: tuple[Any, ...],
  has_aux: bool,
  fn_name: str,
) -> tuple[Any, Callable[..., Any]] | str:
  """Reads ``loss_fn(model, *args)`` as a loss of the model's logits.

  The staged Jacobian runs the forward itself, so it needs the loss as a
  function of the stacked logits. It gets it by calling ``loss_fn`` on a
  copy of the model whose one call returns the logits it is given. That is
  exact only if ``loss_fn`` reaches the parameters through that one call of
  the whole model on one of its own arguments, and changes no state of its
  own: each is checked on a trace, and the first one that fails is
  returned as a sentence (the caller falls back to the vmapped VJP, or
  reports it when the staged Jacobian was asked for).

  Returns:
    ``(x, loss)``: the model's input and ``loss(stacked_logits)``; or the
    reason why ``loss_fn`` cannot be read so.
  """
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  num_exits = len(model.stages)
  calls = []

  def discover():
    copy = nnx.merge(graphdef, params, rest, copy=True)

    def record(x, upto):
      with replaced_call(None, record):  # this one call runs as usual
        out = copy(x, upto=upto)
      calls.append((x, upto, jax.ShapeDtypeStruct(out.shape, out.dtype)))
      return out

    with replaced_call(copy, record):
      return loss_fn(copy, *args)

  jax.eval_shape(discover)
  if len(calls) != 1:
    return (
      f"{fn_name} calls the model {len(calls)} times; the staged Jacobian"
      " needs exactly one call `model(x)`"
    )
  x, upto, logits = calls[0]
  if upto not in (None, num_exits):
    return (
      f"{fn_name} calls the model with upto={upto!r}; the staged Jacobian"
      " needs all K exits"
    )
  if not any(x is leaf for leaf in jax.tree.leaves(args)):
    return (
      f"{fn_name} computes the model's input itself; the staged Jacobian"
      " needs `model(x)` on one of the arguments as it was passed"
    )

  def loss_of(p, stacked_logits):
    copy = nnx.merge(graphdef, p, rest, copy=True)
    with replaced_call(copy, lambda x, upto: stacked_logits):
      out = loss_fn(copy, *args)
    new_rest = nnx.state(copy, nnx.Not(nnx.Param))
    changed.extend(
      a is not b
      for a, b in zip(
        jax.tree.leaves(new_rest), jax.tree.leaves(rest), strict=True
      )
    )
    return out

  changed = []
  closed = jax.make_jaxpr(loss_of)(params, logits)
  if _params_read(closed, len(jax.tree.leaves(params))):
    return (
      f"{fn_name} reads the model's parameters other than through"
      " `model(x)` (e.g. a penalty on the weights)"
    )
  if any(changed):
    return f"{fn_name} changes the model's state other than through model(x)"
  closed = jax.make_jaxpr(
    lambda *exit_logits: loss_of(params, jnp.stack(exit_logits))
  )(*[jax.ShapeDtypeStruct(logits.shape[1:], logits.dtype)] * num_exits)
  try:
    check_exit_dependencies(closed, num_exits, fn_name)
  except ValueError as error:
    return str(error).rstrip(".")

  def stacked_loss(stacked_logits):
    return loss_of(params, stacked_logits)

  stacked_loss.__name__ = fn_name  # the name the staged checks report
  return x, stacked_loss


def staged_module_value_and_grads(
  loss_fn: Callable[..., Any],
  model: Any,
  args: tuple[Any, ...],
  *,
  has_aux: bool,
  rows: str,
  required: bool,
  fn_name: str,
  functional: Callable[..., Callable[..., Any]] | None = None,
  entry: str = "osgd_jax.value_and_per_exit_grads",
  what: str = "staged Jacobian",
) -> tuple[Any, Any] | None:
  """The staged Jacobian of ``loss_fn(model, *args)`` for an NNX model.

  The model case of :func:`staged_value_and_per_exit_grads` and of
  :func:`osgd_jax.grads.value_and_per_exit_grads`: returns
  ``(losses, grads)`` (``((losses, aux), grads)`` with ``has_aux``), with
  the model's non-parameter state updated in place, or ``None`` when
  ``loss_fn`` cannot be read as a loss of the logits and ``required`` is
  false (the caller then uses the vmapped VJP).

  ``functional(graphdef, loss, has_aux, rows)`` is the functional form it
  runs, :func:`staged_value_and_per_exit_grads` by default; the staged
  Gramian passes its own (same arguments, same outputs, a Gramian in
  place of the gradients). ``entry`` and ``what`` name the public function
  and the method in errors.

  Raises:
    ValueError: if ``required`` and ``model`` is not an
      :class:`~osgd_jax.zoo.AnytimeNet` or ``loss_fn`` does not fit, with
      the reason.
  """
  if not isinstance(model, AnytimeNet):
    if not required:
      return None
    raise ValueError(
      f"The {what} needs an osgd_jax.zoo.AnytimeNet, but got a"
      f" {type(model).__name__}; use {entry} without staged=True for other"
      " models."
    )
  read = _loss_of_logits(loss_fn, model, args, has_aux, fn_name)
  if isinstance(read, str):
    if not required:
      return None
    raise ValueError(
      f"{read}, so the {what} cannot be used. Write {fn_name} as"
      " `def loss_fn(model, x, y): return losses_of(model(x), y)` or use"
      f" {entry} with staged=False."
    )
  x, loss = read
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  if functional is None:
    functional = staged_value_and_per_exit_grads
  fn = functional(graphdef, loss, has_aux, rows)
  out, grads = fn(params, rest, x)
  new_rest = out[-1]
  nnx.update(model, new_rest)
  if has_aux:
    return (out[0], out[1]), grads
  return out[0], grads
