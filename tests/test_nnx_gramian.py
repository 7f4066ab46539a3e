"""The Gramian engine on Flax NNX models, and ``osgd_jax.Optimizer``.

``value_and_gramian(loss_fn)(model, x, y)`` must work as the model form of
``value_and_per_exit_grads`` does (BatchNorm statistics moved once per
call, a zoo model differentiated by the staged engine), and
``osgd_jax.Optimizer`` must apply its Gramian in one call, training a zoo
model exactly as ``nnx.Optimizer`` does with stacked gradients. The
references: the stacked NNX path, Gram matrices formed in float64 NumPy
from its gradients, and the statistics of one plain forward pass. Each
comparison is one cheaply compiled function (``tiny_anytime``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from tiny_anytime import compile_cheaply

import osgd_jax
from osgd_jax import zoo

K = 3
X = jax.random.normal(jax.random.key(1), (8, 64))
Y = jnp.arange(8) % 10


def loss_fn(model, x, y):
  return osgd_jax.per_exit_cross_entropy(model(x), y)


def _zoo():
  return zoo.create(
    "branched-mlp", rngs=nnx.Rngs(0), stages=K, width=8, norm="batch"
  )


@functools.cache
def _statistics_of_one_forward():
  """The BatchNorm statistics after one train-mode forward pass on X."""
  model = _zoo()
  start = jax.tree.leaves(nnx.state(model, nnx.BatchStat))
  model(X)
  moved = [
    np.asarray(s) for s in jax.tree.leaves(nnx.state(model, nnx.BatchStat))
  ]
  # Guards the comparisons with it: a forward that moved nothing would
  # match a step that moved nothing.
  assert not any(np.allclose(a, b) for a, b in zip(start, moved, strict=True))
  return moved


def _assert_close(a, b, **tolerance):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), **tolerance)


def _compiled(fn, *objects_and_args):
  """``fn`` on NNX objects, compiled once as a pure function of their state.

  Returns ``step(*args) -> out``, which writes the new state back.
  """
  objects, args = objects_and_args[0], objects_and_args[1:]
  graphdef, state = nnx.split(objects)

  def pure(state, *args):
    merged = nnx.merge(graphdef, state)
    out = fn(*merged, *args)
    return nnx.state(merged), out

  compiled = compile_cheaply(pure, state, *args)

  def step(*args):
    new_state, out = compiled(nnx.state(objects), *args)
    nnx.update(objects, new_state)
    return out

  return step


def test_optimizer_trains_a_zoo_model_with_a_gramian_as_with_stacked_grads():
  # A chain with inject_hyperparams after the per-leaf OSGD projection.
  tx = optax.chain(
    osgd_jax.osgd(num_exits=K, granularity="leaf"),
    optax.add_decayed_weights(1e-3),
    optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9),
  )
  stacked_model, gramian_model = _zoo(), _zoo()
  stacked = (stacked_model, nnx.Optimizer(stacked_model, tx, wrt=nnx.Param))
  gramian = (
    gramian_model,
    osgd_jax.Optimizer(gramian_model, tx, wrt=nnx.Param),
  )
  before = jax.tree.map(np.asarray, nnx.state(gramian_model))
  forms = []

  def both_steps(stacked_model, stacked_opt, gramian_model, gramian_opt, x, y):
    want, grads = osgd_jax.value_and_per_exit_grads(loss_fn)(
      stacked_model, x, y
    )
    stacked_opt.update(stacked_model, grads)
    got, gramian = osgd_jax.value_and_gramian(loss_fn)(gramian_model, x, y)
    forms.append(gramian.form)
    gramian_opt.update(gramian_model, gramian)
    return want, got

  step = _compiled(both_steps, stacked + gramian, X, Y)
  for i in range(2):
    want, got = step(X, Y)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    if i == 0:  # one forward pass moved the statistics, from the start
      _assert_close(
        nnx.state(gramian_model, nnx.BatchStat),
        jax.tree.unflatten(
          jax.tree.structure(nnx.state(gramian_model, nnx.BatchStat)),
          _statistics_of_one_forward(),
        ),
        rtol=1e-6,
      )
  assert forms and all(form.startswith("staged") for form in forms)
  # Parameters, statistics, optimizer state and step: the stacked path's.
  _assert_close(nnx.state(gramian), nnx.state(stacked), rtol=1e-5, atol=1e-6)
  assert int(gramian[1].step[...]) == int(stacked[1].step[...]) == 2
  # The optimizer is stored (and so checkpointed) as nnx.Optimizer is.
  assert jax.tree.structure(nnx.state(gramian[1])) == jax.tree.structure(
    nnx.state(stacked[1])
  )
  # It trained: parameters and statistics moved.
  for kind in (nnx.Param, nnx.BatchStat):
    assert not all(
      np.allclose(a, b)
      for a, b in zip(
        jax.tree.leaves(nnx.state(before, kind)),
        jax.tree.leaves(nnx.state(gramian_model, kind)),
        strict=True,
      )
    )


def _leaf_grams(grads):
  """Each leaf's K×K Gram matrix of stacked gradients, in float64 NumPy."""
  rows = [
    np.asarray(g, np.float64).reshape(K, -1) for g in jax.tree.leaves(grads)
  ]
  return np.stack([r @ r.T for r in rows])


def test_every_model_form_gives_the_gram_matrices_of_the_stacked_grads():
  def aux_loss_fn(model, x, y):
    losses = loss_fn(model, x, y)
    return losses, losses.sum()

  def forms(m0, m1, m2, x, y):
    _, grads = osgd_jax.value_and_per_exit_grads(loss_fn)(m0, x, y)
    # An explicit form rules the staged Gramian out: the VJP's path.
    (losses, aux), vmap = osgd_jax.value_and_gramian(
      aux_loss_fn, has_aux=True, form="vmap"
    )(m1, x, y)
    staged = osgd_jax.staged_value_and_gramian(loss_fn, form="replay")(
      m2, x, y
    )[1]
    kinds.extend([vmap.form, staged.form])
    grams = [g.grams("leaf") for g in (vmap, staged)]
    return grads, grams, losses, aux

  kinds = []
  models = tuple(_zoo() for _ in range(3))
  grads, grams, losses, aux = _compiled(forms, models, X, Y)(X, Y)
  assert kinds == ["vmap", "staged"]
  want = _leaf_grams(grads)
  scale = np.abs(want).max()
  for got in grams:
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * scale)
  np.testing.assert_allclose(aux, np.sum(losses), rtol=1e-6)
  # Each call moved its model's statistics once.
  for model in models:
    for got, want in zip(
      jax.tree.leaves(nnx.state(model, nnx.BatchStat)),
      _statistics_of_one_forward(),
      strict=True,
    ):
      np.testing.assert_allclose(got, want, rtol=1e-6)


# --- errors -------------------------------------------------------------------


class _TwoLosses(nnx.Module):
  """Not a zoo model: one linear layer, two exits' losses."""

  def __init__(self):
    self.linear = nnx.Linear(3, 2, rngs=nnx.Rngs(0))

  def __call__(self, x):
    return self.linear(x)


def _two_losses(model, x):
  out = model(x)
  return jnp.stack([jnp.sum(out**2), jnp.sum(out)])


def test_plain_nnx_optimizer_refuses_a_gramian_naming_osgd_jax_optimizer():
  model = _TwoLosses()
  _, gramian = osgd_jax.value_and_gramian(_two_losses)(model, jnp.ones((1, 3)))
  for tx in (osgd_jax.osgd_sgd(0.1, num_exits=2), osgd_jax.upgrad(num_exits=2)):
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    with pytest.raises(
      ValueError,
      match=r"gradients without leaves for params with 2 leaves\..*use"
      r" osgd_jax\.Optimizer, whose update takes a Gramian, in place of"
      r" nnx\.Optimizer \(same arguments\)",
    ):
      optimizer.update(model, gramian)
  # Empty gradients for empty params still pass through.
  tx = osgd_jax.upgrad(num_exits=2)
  assert tx.update({}, tx.init({}), {})[0] == {}


def test_osgd_jax_optimizer_refuses_a_gramian_of_other_variables():
  model = _TwoLosses()
  optimizer = osgd_jax.Optimizer(
    model, osgd_jax.osgd(num_exits=2), wrt=nnx.Param
  )

  def pure_loss(w, x):
    return jnp.stack([jnp.sum(w * x), jnp.sum(w)])

  _, gramian = osgd_jax.value_and_gramian(pure_loss)(jnp.ones(3), jnp.ones(3))
  with pytest.raises(
    ValueError,
    match=r"the Gramian is not of the variables this optimizer updates.*"
    r"1 leaves in another structure than the model's 2\. Take it with"
    r" osgd_jax\.value_and_gramian\(loss_fn\)\(model, \.\.\.\)",
  ):
    optimizer.update(model, gramian)
  assert int(optimizer.step[...]) == 0


def test_the_staged_gramian_says_why_it_does_not_apply():
  x = jnp.ones((1, 3))
  for fn in (
    osgd_jax.value_and_gramian(_two_losses, staged=True),
    osgd_jax.staged_value_and_gramian(_two_losses),
  ):
    with pytest.raises(
      ValueError,
      match=r"The staged Gramian needs an osgd_jax\.zoo\.AnytimeNet, but"
      r" got a _TwoLosses; use osgd_jax\.value_and_gramian without"
      r" staged=True",
    ):
      fn(_TwoLosses(), x)

  def twice(model, x, y):
    return loss_fn(model, x, y) + loss_fn(model, x, y)

  with pytest.raises(
    ValueError,
    match=r"twice calls the model 2 times.*so the staged Gramian cannot be"
    r" used\. .*use osgd_jax\.value_and_gramian with staged=False",
  ):
    osgd_jax.value_and_gramian(twice, staged=True)(_zoo(), X, Y)


def test_bad_arguments_of_the_model_forms_are_refused():
  with pytest.raises(ValueError, match=r"staged must be None, True or False"):
    osgd_jax.value_and_gramian(loss_fn, staged="yes")
  with pytest.raises(
    ValueError,
    match=r"form='scan' is a formulation of the vmapped VJP, and"
    r" staged=True asks for the staged Gramian.*"
    r"osgd_jax\.staged_value_and_gramian\(loss_fn, form=\.\.\.\)",
  ):
    osgd_jax.value_and_gramian(loss_fn, staged=True, form="scan")
  with pytest.raises(
    ValueError,
    match=r"staged=False applies to an nnx\.Module, but the first argument"
    r" is a ArrayImpl; leave staged out",
  ):
    osgd_jax.value_and_gramian(_two_losses, staged=False)(
      jnp.ones(3), jnp.ones(3)
    )
  with pytest.raises(
    ValueError,
    match=r"takes the graphdef of an anytime network.*but got a int and a"
    r" NoneType; or, for a model, the loss function alone",
  ):
    osgd_jax.staged_value_and_gramian(42)
