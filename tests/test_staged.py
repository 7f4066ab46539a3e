"""The staged (anytime) Jacobian: its options, forms, export and errors.

It equals the vmapped VJP on every zoo name: tests/zoo/test_zoo_properties.py.

Compilation dominates these tests on a CPU: every model is tiny, and each
comparison compiles the paths it compares as one function, cheaply
(tests/tiny_anytime.py).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_anytime import WEIGHTS, compile_cheaply, tiny_net

import osgd_jax
from osgd_jax.losses import per_exit_cross_entropy
from osgd_jax.staged import ROWS


def _loss(logits, y):
  """Weighted cross-entropy; exit 3 also reads exit 1's logits (allowed)."""
  losses = per_exit_cross_entropy(logits, y, jnp.asarray(WEIGHTS))
  losses = losses.at[2].add(0.1 * jnp.mean(logits[0] ** 2))
  return losses, {"sum": losses.sum()}


def test_rows_option_is_checked():
  graphdef = nnx.split(tiny_net("branched-mlp")[0], nnx.Param, ...)[0]
  with pytest.raises(
    ValueError,
    match=r"rows must be one of \('auto', "
    r"'batched', 'looped'\), got 'unrolled'",
  ):
    osgd_jax.staged_value_and_per_exit_grads(graphdef, _loss, rows="unrolled")


def test_without_aux_and_forward_traced_once():
  model, x, y = tiny_net("branched-mlp")
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  calls = []

  def loss(logits, y):
    calls.append(1)
    return per_exit_cross_entropy(logits, y)

  fn = osgd_jax.staged_value_and_per_exit_grads(graphdef, loss)
  (losses, new_rest), grads = jax.eval_shape(fn, params, rest, x, y)
  assert losses.shape == (3,) and len(calls) == 1
  assert jax.tree.structure(new_rest) == jax.tree.structure(rest)
  assert all(
    g.shape == (3,) + p.shape
    for g, p in zip(
      jax.tree.leaves(grads), jax.tree.leaves(params), strict=True
    )
  )


def _abstract(name="branched-mlp"):
  model, x, y = tiny_net(name)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return model, graphdef, (params, rest, x, y)


def _trace(graphdef, loss, args, has_aux=False):
  fn = osgd_jax.staged_value_and_per_exit_grads(graphdef, loss, has_aux)
  return jax.eval_shape(fn, *args)


def test_later_exit_dependency_is_refused():
  _, graphdef, args = _abstract()

  def reads_exit_3(logits, y):
    losses = per_exit_cross_entropy(logits, y)
    return losses.at[0].add(jnp.mean(logits[2]))

  with pytest.raises(
    ValueError,
    match=r"\(exit 1 reads exit\(s\) 3\)\..*"
    r"value_and_per_exit_grads",
  ):
    _trace(graphdef, reads_exit_3, args)

  def mixes_all(logits, y):  # e.g. a mean over the exits' logits
    return per_exit_cross_entropy(logits, y) + jnp.mean(logits)

  with pytest.raises(
    ValueError,
    match=r"exit 1 reads exit\(s\) 2, 3; exit 2"
    r" reads exit\(s\) 3",
  ):
    _trace(graphdef, mixes_all, args)

  def distills(logits, y):  # from a later exit without its gradient: fine
    losses = per_exit_cross_entropy(logits, y)
    target = jax.nn.softmax(jax.lax.stop_gradient(logits[2]))
    pseudo = jnp.argmax(logits[1], axis=-1)  # integers carry no gradient
    distill = -jnp.mean(jnp.sum(target * jax.nn.log_softmax(logits[0]), -1))
    # Exit 3 learning from exit 2, gradient and all, is fine too.
    teacher = jax.nn.softmax(logits[1])
    back = -jnp.mean(jnp.sum(teacher * jax.nn.log_softmax(logits[2]), -1))
    return losses.at[0].add(distill + pseudo.sum() * 0.0).at[2].add(back)

  _trace(graphdef, distills, args)


@pytest.mark.parametrize(
  "loss, match",
  [
    (
      lambda logits, y: per_exit_cross_entropy(logits, y).sum(),
      "1-D vector of per-exit losses",
    ),
    (lambda logits, y: jnp.zeros((0,)), "empty loss vector"),
    (
      lambda logits, y: per_exit_cross_entropy(logits, y)[:2],
      "returned 2 losses but the model has 3 exits",
    ),
    (
      lambda logits, y: (logits.sum((1, 2)) > 0).astype(jnp.int32),
      "floating-point",
    ),
  ],
)
def test_bad_loss_vector(loss, match):
  _, graphdef, args = _abstract()
  with pytest.raises(ValueError, match=match):
    _trace(graphdef, loss, args)


def test_has_aux_needs_a_pair():
  _, graphdef, args = _abstract()
  with pytest.raises(ValueError, match=r"must return a pair \(losses, aux\)"):
    _trace(graphdef, per_exit_cross_entropy, args, has_aux=True)


def test_not_an_anytime_network():
  _, graphdef, args = _abstract()
  linear = nnx.Linear(
    64, 10, kernel_init=nnx.initializers.zeros_init(), rngs=nnx.Rngs(0)
  )
  lin_def, lin_params, lin_rest = nnx.split(linear, nnx.Param, ...)
  with pytest.raises(ValueError, match="anytime network with `stages`"):
    _trace(lin_def, per_exit_cross_entropy, (lin_params, lin_rest) + args[2:])
  with pytest.raises(ValueError, match="takes the graphdef"):
    osgd_jax.staged_value_and_per_exit_grads(linear, per_exit_cross_entropy)


def test_variables_shared_between_stages_are_refused():
  model, _, args = _abstract()
  model.stages[2].head = model.stages[1].head  # both exits share one head
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  with pytest.raises(ValueError, match="stage 3 does not own exactly"):
    _trace(graphdef, per_exit_cross_entropy, (params, rest) + args[2:])


def test_model_without_stages_is_refused():
  model, _, args = _abstract()
  model.stages = nnx.List([])
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  with pytest.raises(ValueError, match="the model has no stages"):
    _trace(graphdef, per_exit_cross_entropy, (params, rest) + args[2:])


def test_parameters_outside_the_stages_are_refused():
  model, _, args = _abstract()
  model.extra = nnx.Param(jnp.zeros(2))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  with pytest.raises(
    ValueError,
    match=r"parameters outside model.stages"
    r" \(\['extra'\]\) would get no gradient",
  ):
    _trace(graphdef, per_exit_cross_entropy, (params, rest) + args[2:])


def test_state_shared_between_stages_is_refused():
  model, _, args = _abstract()
  shared = nnx.BatchStat(jnp.zeros(2))  # a statistic, not a parameter
  model.stages[1].shared, model.stages[2].shared = shared, shared
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  with pytest.raises(
    ValueError, match="stage 3 does not own exactly its own state"
  ):
    _trace(graphdef, per_exit_cross_entropy, (params, rest) + args[2:])


def _leaves_equal(a, b, exact, err_msg=""):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    if exact:
      np.testing.assert_array_equal(x, y, err_msg=err_msg)
    else:
      np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6, err_msg=err_msg)


def test_auto_rows_equal_looped_and_batched():
  # A conv family: the two forms differ most for convolution gradients.
  model, x, y = tiny_net("branched-resnet")
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  forms = {
    rows: osgd_jax.staged_value_and_per_exit_grads(
      graphdef, _loss, has_aux=True, rows=rows
    )
    for rows in ROWS
  }
  every_form = compile_cheaply(
    lambda *args: {rows: fn(*args) for rows, fn in forms.items()},
    params,
    rest,
    x,
    y,
  )
  results = jax.device_get(every_form(params, rest, x, y))
  # "auto" is the looped program on CPU, so it gives the looped form's bits
  # there (an accelerator's convolutions need not be deterministic, and it
  # runs the batched form), and the other form's values to rounding.
  on_cpu = jax.default_backend() == "cpu"
  chosen, other = ("looped", "batched") if on_cpu else ("batched", "looped")
  _leaves_equal(results["auto"], results[chosen], exact=on_cpu)
  _leaves_equal(results["auto"], results[other], exact=False)


# What JAX itself may emit as custom calls to place shardings; no other
# target (a native kernel, a vendor library) may appear in the export.
_SHARDING_TARGETS = {"Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape"}


def _custom_call_targets(mlir_text):
  """The target of every custom_call in ``mlir_text``, "" where unreadable."""
  targets = []
  for line in mlir_text.splitlines():
    if "custom_call" in line:
      match = re.search(r"custom_call\s*@([\w.$-]+)", line) or re.search(
        r'call_target_name\s*=\s*"([^"]*)"', line
      )
      targets.append(match.group(1) if match else "")
  return targets


def test_custom_call_targets_are_read():
  # Guards the export test below against passing because it reads nothing.
  text = (
    "%0 = stablehlo.custom_call @Sharding(%arg0)\n"
    '%1 = "stablehlo.custom_call"(%0) {call_target_name = "lapack"}\n'
    "%2 = stablehlo.custom_call(%1)\n"
  )
  assert _custom_call_targets(text) == ["Sharding", "lapack", ""]


def test_export_for_cpu_gpu_and_tpu_from_a_cpu_host():
  # rows="auto" stages both forms; the platform picks one when it lowers,
  # so a CPU host can export for accelerators it does not have.
  model, x, y = tiny_net("nested-depth-resnet")
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  jitted = jax.jit(
    osgd_jax.staged_value_and_per_exit_grads(graphdef, _loss, has_aux=True)
  )
  platforms = ("cpu", "cuda", "tpu")
  exported = jax.export.export(jitted, platforms=platforms)(params, rest, x, y)
  assert exported.platforms == platforms
  # Pure JAX: nothing but what JAX emits for sharding (today: nothing).
  targets = _custom_call_targets(exported.mlir_module())
  assert set(targets) <= _SHARDING_TARGETS, targets

  both = compile_cheaply(
    lambda *args: (exported.call(*args), jitted(*args)), params, rest, x, y
  )
  from_export, from_jit = jax.device_get(both(params, rest, x, y))
  _leaves_equal(from_export, from_jit, exact=False)


def _convolutions(jitted, args, platform):
  lowered = jitted.trace(*args).lower(lowering_platforms=(platform,))
  return lowered.as_text().count("stablehlo.convolution")


def test_auto_rows_are_chosen_per_platform_when_lowered():
  # One trace of rows="auto" lowers to the looped program for CPU and the
  # batched one for GPU and TPU: the forms differ in how many convolutions
  # run (one set per exit, or one vmapped set per stage).
  model, x, y = tiny_net("nested-depth-resnet")
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  args = (params, rest, x, y)
  jitted = {
    rows: jax.jit(
      osgd_jax.staged_value_and_per_exit_grads(
        graphdef, per_exit_cross_entropy, rows=rows
      )
    )
    for rows in ROWS
  }
  looped = _convolutions(jitted["looped"], args, "cpu")
  batched = _convolutions(jitted["batched"], args, "cpu")
  assert looped != batched
  assert _convolutions(jitted["auto"], args, "cpu") == looped
  assert _convolutions(jitted["auto"], args, "cuda") == batched
  assert _convolutions(jitted["auto"], args, "tpu") == batched
