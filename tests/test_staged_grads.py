"""The staged (anytime) Jacobian against the vmapped VJP, its zeros and errors.

Compilation dominates these tests on a CPU, so every model is tiny, each
comparison compiles the staged and the vmap path as one function, and that
function is compiled with XLA:CPU's cheapest settings: both paths get the
same code generator, and the compile takes a third of the time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import osgd_jax
from osgd_jax import zoo
from osgd_jax.losses import per_exit_cross_entropy

_FAST_COMPILE = {"xla_backend_optimization_level": 0,
                 "xla_llvm_disable_expensive_passes": True,
                 "xla_cpu_use_fusion_emitters": False}
# Exit 2 has weight 0: its gradient rows must be exactly zero.
WEIGHTS = (1.0, 0.0, 2.0)
BATCH = 4


def _compile(fn, *args, jitted=None):
  lowered = (jitted or jax.jit(fn)).lower(*args)
  if jax.default_backend() != "cpu":
    return lowered.compile()
  try:
    return lowered.compile(_FAST_COMPILE)
  except Exception as e:  # an XLA without these options: compile as usual
    if "compile option" not in str(e):
      raise
    return lowered.compile()


def _tiny(name, **config):
  conv = "resnet" in name
  fit = dict(in_channels=1, downsamples=1) if conv else dict(in_features=64)
  model = zoo.create(name, rngs=nnx.Rngs(0), width=4, depth=1, stages=3,
                     norm="batch", **{**fit, **config})
  shape = (BATCH, 8, 8, 1) if conv else (BATCH, 64)
  x = jax.random.normal(jax.random.key(1), shape)
  y = jnp.arange(BATCH, dtype=jnp.int32) % 10
  return model, x, y


def _loss(logits, y):
  """Weighted cross-entropy; exit 3 also reads exit 1's logits (allowed)."""
  losses = per_exit_cross_entropy(logits, y, jnp.asarray(WEIGHTS))
  losses = losses.at[2].add(0.1 * jnp.mean(logits[0] ** 2))
  return losses, {"sum": losses.sum()}


def _reference(graphdef, loss):
  """The vmap path, with the loss function as train.py's step writes it."""

  def exit_losses(params, rest, x, y):
    model = nnx.merge(graphdef, params, rest, copy=True)
    losses, aux = loss(model(x), y)
    return losses, (aux, nnx.state(model, nnx.Not(nnx.Param)))

  return osgd_jax.value_and_per_exit_grads(exit_losses, has_aux=True)


def _staged_and_reference(graphdef, loss, rows="auto"):
  staged = osgd_jax.staged_value_and_per_exit_grads(graphdef, loss,
                                                    has_aux=True, rows=rows)
  reference = _reference(graphdef, loss)
  return lambda *args: (staged(*args), reference(*args))


def _stage_rows(grads, stage):
  return jax.tree.leaves(grads["stages"][stage])


# Each family runs one way of driving a stage's rows; each way meets conv
# and dense families, nested and branched ones.
_ROWS = {"branched-mlp": "batched", "branched-resnet": "looped",
         "nested-depth-mlp": "looped", "nested-depth-resnet": "batched",
         "nested-width-mlp": "batched", "nested-width-resnet": "looped",
         "nested-width-depth-mlp": "looped",
         "nested-width-depth-resnet": "batched"}


@pytest.mark.parametrize("name", zoo.names())
def test_staged_equals_vmap_on_every_family(name):
  # One family runs in float64, where the paths must agree to double
  # precision; the train-step test below covers it in float32.
  x64 = name == "branched-mlp"
  with jax.enable_x64(x64):
    _check_family(name, x64, _ROWS[name])


def test_rows_option_is_checked():
  graphdef = nnx.split(_tiny("branched-mlp")[0], nnx.Param, ...)[0]
  with pytest.raises(ValueError, match=r"rows must be one of \('auto', "
                     r"'batched', 'looped'\), got 'unrolled'"):
    osgd_jax.staged_value_and_per_exit_grads(graphdef, _loss, rows="unrolled")


def _check_family(name, x64, rows):
  model, x, y = _tiny(name)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  if x64:
    to64 = lambda t: jax.tree.map(lambda a: np.asarray(a, np.float64), t)
    params, rest, x = to64(params), to64(rest), to64(x)
  rtol, atol = (1e-10, 1e-12) if x64 else (1e-4, 1e-5)
  both = _compile(_staged_and_reference(graphdef, _loss, rows), params, rest,
                  x, y)
  # NumPy from here on: eager jnp ops would each compile for their shape.
  staged, reference = jax.device_get(both(params, rest, x, y))
  (losses, aux, new_rest), grads = staged
  (ref_losses, (ref_aux, ref_rest)), ref_grads = reference

  np.testing.assert_allclose(losses, ref_losses, rtol=rtol)
  np.testing.assert_allclose(aux["sum"], ref_aux["sum"], rtol=rtol)
  # BatchNorm ran in train mode: its statistics moved, identically.
  assert jax.tree.structure(new_rest) == jax.tree.structure(rest)
  moved = [not np.allclose(a, b) for a, b in
           zip(jax.tree.leaves(new_rest), jax.tree.leaves(rest))]
  assert any(moved)
  for a, b in zip(jax.tree.leaves(new_rest), jax.tree.leaves(ref_rest)):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)

  assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
  scale = max(np.abs(g).max() for g in jax.tree.leaves(ref_grads))
  for (path, g), r, p in zip(
      jax.tree_util.tree_flatten_with_path(grads)[0],
      jax.tree.leaves(ref_grads), jax.tree.leaves(params)):
    assert g.shape == (3,) + p.shape and g.dtype == p.dtype, path
    np.testing.assert_allclose(g, r, rtol=rtol, atol=atol * scale,
                               err_msg=jax.tree_util.keystr(path))

  for stage in range(3):
    rows = _stage_rows(grads, stage)
    for exit_ in range(3):
      reaches = exit_ >= stage and WEIGHTS[exit_] != 0
      nonzero = any(np.any(leaf[exit_] != 0) for leaf in rows)
      # Exits that do not reach a stage (or weigh 0) give exact zeros.
      assert nonzero == reaches, (name, stage, exit_)


def test_without_aux_and_forward_traced_once():
  model, x, y = _tiny("branched-mlp")
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  calls = []

  def loss(logits, y):
    calls.append(1)
    return per_exit_cross_entropy(logits, y)

  fn = osgd_jax.staged_value_and_per_exit_grads(graphdef, loss)
  (losses, new_rest), grads = jax.eval_shape(fn, params, rest, x, y)
  assert losses.shape == (3,) and len(calls) == 1
  assert jax.tree.structure(new_rest) == jax.tree.structure(rest)
  assert all(g.shape == (3,) + p.shape for g, p in
             zip(jax.tree.leaves(grads), jax.tree.leaves(params)))


def _abstract(name="branched-mlp"):
  model, x, y = _tiny(name)
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

  with pytest.raises(ValueError, match=r"\(exit 1 reads exit\(s\) 3\)\..*"
                     r"value_and_per_exit_grads"):
    _trace(graphdef, reads_exit_3, args)

  def mixes_all(logits, y):  # e.g. a mean over the exits' logits
    return per_exit_cross_entropy(logits, y) + jnp.mean(logits)

  with pytest.raises(ValueError, match=r"exit 1 reads exit\(s\) 2, 3; exit 2"
                     r" reads exit\(s\) 3"):
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


@pytest.mark.parametrize("loss, match", [
    (lambda logits, y: per_exit_cross_entropy(logits, y).sum(),
     "1-D vector of per-exit losses"),
    (lambda logits, y: jnp.zeros((0,)), "empty loss vector"),
    (lambda logits, y: per_exit_cross_entropy(logits, y)[:2],
     "returned 2 losses but the model has 3 exits"),
    (lambda logits, y: (logits.sum((1, 2)) > 0).astype(jnp.int32),
     "floating-point"),
])
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
  linear = nnx.Linear(64, 10, kernel_init=nnx.initializers.zeros_init(),
                      rngs=nnx.Rngs(0))
  lin_def, lin_params, lin_rest = nnx.split(linear, nnx.Param, ...)
  with pytest.raises(ValueError, match="anytime network with `stages`"):
    _trace(lin_def, per_exit_cross_entropy,
           (lin_params, lin_rest) + args[2:])
  with pytest.raises(ValueError, match="takes the graphdef"):
    osgd_jax.staged_value_and_per_exit_grads(linear, per_exit_cross_entropy)


def test_variables_shared_between_stages_are_refused():
  model, _, args = _abstract()
  model.stages[2].head = model.stages[1].head  # both exits share one head
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  with pytest.raises(ValueError, match="stage 3 does not own exactly"):
    _trace(graphdef, per_exit_cross_entropy, (params, rest) + args[2:])

