"""Per-exit gradients of Flax NNX models, as ``nnx.value_and_grad`` works.

``value_and_per_exit_grads(loss_fn)(model, x, y)`` must update BatchNorm
statistics and RNG counts exactly once per call (inside ``nnx.jit`` too),
return an ``nnx.State`` that ``nnx.Optimizer`` takes, and give a zoo model
the staged Jacobian when the loss function allows it. The references are
written with ``nnx.split``/``nnx.merge`` and the functional path. Models are
tiny: compilation dominates on a CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from tiny_anytime import tiny_net

import osgd_jax
from osgd_jax import staged as staged_module
from osgd_jax import zoo


def loss_fn(model, x, y):
  return osgd_jax.per_exit_cross_entropy(model(x), y)


def _numpy(leaf):
  if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    leaf = jax.random.key_data(leaf)
  return np.asarray(leaf)


def _arrays(state):
  return [_numpy(leaf) for leaf in jax.tree.leaves(state)]


def _assert_trees_close(a, b, **tolerance):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for u, v in zip(_arrays(a), _arrays(b), strict=True):
    np.testing.assert_allclose(u, v, **tolerance)


@pytest.fixture(scope="module")
def branched():
  """One tiny branched zoo model and its batch; tests take clones of it."""
  return tiny_net("branched-mlp")


def test_zoo_training_step_updates_batchnorm_like_split_merge(
  branched, monkeypatch
):
  """The done-when test of the NNX path: statistics move, once, as written
  out by hand with nnx.split/nnx.merge; so do the parameters. A zoo model
  gets the staged Jacobian by default (auxiliary data too); the vmapped
  path is compared with split/merge below."""
  model, x, y = branched
  model = nnx.clone(model)
  # A clone: split shares the model's Variables, which the step updates.
  graphdef, params, rest = nnx.split(nnx.clone(model), nnx.Param, ...)
  old_stats = _arrays(nnx.state(model, nnx.BatchStat))
  tx = osgd_jax.osgd_sgd(0.1, num_exits=3)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  calls = _count_staged(monkeypatch)

  def with_aux(model, x, y):
    losses = loss_fn(model, x, y)
    return losses, {"total": losses.sum()}

  @nnx.jit
  def step(model, optimizer, x, y):
    (losses, aux), grads = osgd_jax.value_and_per_exit_grads(
      with_aux, has_aux=True
    )(model, x, y)
    optimizer.update(model, grads)
    return losses, aux, grads

  losses, aux, grads = step(model, optimizer, x, y)
  assert len(calls) == 1

  # The reference: split by hand, functional per-exit gradients, one update.
  reference = osgd_jax.value_and_per_exit_grads(
    zoo.per_exit_loss_fn(graphdef), has_aux=True
  )

  @jax.jit
  def reference_step(params, rest, x, y):
    (losses, rest), grads = reference(params, rest, x, y)
    updates, _ = tx.update(grads, tx.init(params), params)
    return losses, rest, grads, optax.apply_updates(params, updates)

  ref_losses, ref_rest, ref_grads, ref_params = reference_step(
    params, rest, x, y
  )

  stats = nnx.state(model, nnx.BatchStat)
  moved = [
    not np.array_equal(a, b)
    for a, b in zip(_arrays(stats), old_stats, strict=True)
  ]
  assert any(moved)
  ref_stats = nnx.state(nnx.merge(graphdef, params, ref_rest), nnx.BatchStat)
  _assert_trees_close(stats, ref_stats, rtol=1e-6, atol=1e-7)
  _assert_trees_close(losses, ref_losses, rtol=1e-6)
  np.testing.assert_allclose(aux["total"], ref_losses.sum(), rtol=1e-6)
  assert isinstance(grads, nnx.State)
  _assert_trees_close(grads, ref_grads, rtol=2e-5, atol=1e-6)
  _assert_trees_close(
    nnx.state(model, nnx.Param), ref_params, rtol=2e-5, atol=1e-6
  )


def test_eval_mode_leaves_the_statistics_alone(branched):
  """The model form of the staged function, in eval mode: the statistics
  stay, and exit 1's rows of the later stages are exact zeros."""
  model, x, y = branched
  model = nnx.clone(model)
  model.eval()
  before = _arrays(nnx.state(model, nnx.BatchStat))
  losses, grads = nnx.jit(osgd_jax.staged_value_and_per_exit_grads(loss_fn))(
    model, x, y
  )
  after = _arrays(nnx.state(model, nnx.BatchStat))
  assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
  assert losses.shape == (3,)
  assert jax.tree.structure(grads) == jax.tree.structure(
    nnx.state(model, nnx.Param)
  )
  for stage in (1, 2):
    rows = jax.tree.leaves(grads["stages"][stage])
    assert all(not np.asarray(leaf[:stage]).any() for leaf in rows)
    assert any(np.asarray(leaf[stage:]).any() for leaf in rows)


class _DropoutTwoExit(nnx.Module):
  """Dropout with its own RNG stream, and a count of calls in a Variable."""

  def __init__(self, rngs: nnx.Rngs):
    self.body = nnx.Linear(4, 4, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.head = nnx.Linear(4, 2, rngs=rngs)
    self.calls = nnx.BatchStat(jnp.zeros((), jnp.int32))

  def __call__(self, x):
    self.calls[...] += 1
    h = self.drop(jax.nn.relu(self.body(x)))
    return jnp.stack([h[:, :2], self.head(h)])


def test_rng_counts_and_other_state_move_once_like_nnx_value_and_grad():
  model = _DropoutTwoExit(nnx.Rngs(0, dropout=1))
  reference = nnx.clone(model)
  x, y = jnp.ones((3, 4)), jnp.zeros(3, jnp.int32)

  losses, grads = nnx.jit(osgd_jax.value_and_per_exit_grads(loss_fn))(
    model, x, y
  )
  ref_loss, ref_grads = nnx.jit(
    nnx.value_and_grad(lambda m, x, y: loss_fn(m, x, y).sum())
  )(reference, x, y)

  assert int(model.calls[...]) == 1
  _assert_trees_close(
    nnx.state(model, nnx.Not(nnx.Param)),
    nnx.state(reference, nnx.Not(nnx.Param)),
  )
  # The same dropout mask: the summed rows are nnx.value_and_grad's.
  np.testing.assert_allclose(losses.sum(), ref_loss, rtol=1e-6)
  _assert_trees_close(
    jax.tree.map(lambda g: g.sum(0), grads), ref_grads, rtol=1e-5, atol=1e-7
  )


def _count_staged(monkeypatch):
  calls = []
  real = staged_module.staged_value_and_per_exit_grads

  def spy(*args, **kwargs):
    calls.append(args)
    return real(*args, **kwargs)

  monkeypatch.setattr(staged_module, "staged_value_and_per_exit_grads", spy)
  return calls


def _weight_penalty(model, x, y):
  kernel = model.stages[0].head.linear.kernel[...]
  return loss_fn(model, x, y) + jnp.stack([jnp.sum(kernel**2), 0.0, 0.0])


def _twice(model, x, y):
  return loss_fn(model, x, y) + 0.0 * model(x).mean()


def _first_two(model, x, y):
  losses = osgd_jax.per_exit_cross_entropy(model(x, upto=2), y)
  return jnp.concatenate([losses, losses[1:]])


def _scaled_input(model, x, y):
  return loss_fn(model, 2.0 * x, y)


def _later_exit(model, x, y):
  logits = model(x)
  losses = osgd_jax.per_exit_cross_entropy(logits, y)
  return losses.at[0].add(jnp.mean(logits[2] ** 2))


def _writes_state(model, x, y):
  model.stages[0].stem.norm.mean[...] = jnp.zeros_like(
    model.stages[0].stem.norm.mean[...]
  )
  return loss_fn(model, x, y)


_NOT_STAGED = [
  (_weight_penalty, "reads the model's parameters other than through"),
  (_twice, "calls the model 2 times"),
  (_first_two, "calls the model with upto=2"),
  (_scaled_input, "computes the model's input itself"),
  (_later_exit, "the loss of an exit depends on the logits of a later"),
  (_writes_state, "changes the model's state other than through model"),
]


@pytest.mark.parametrize(("fn", "match"), _NOT_STAGED)
def test_loss_functions_the_staged_jacobian_cannot_read(fn, match, branched):
  """Refused by name with staged=True; the default then takes the vmapped
  path (the same decision, returned instead of raised: see below)."""
  model, x, y = branched
  with pytest.raises(ValueError, match=match) as raised:
    osgd_jax.value_and_per_exit_grads(fn, staged=True)(nnx.clone(model), x, y)
  assert "staged=False" in str(raised.value)


def _all_of_them(model, x, y):
  """Writes the state, reads a parameter directly, calls the model twice."""
  return _writes_state(model, x, y) + _weight_penalty(model, x, y)


def test_by_default_such_losses_get_the_vmapped_gradients(
  branched, monkeypatch
):
  """The gradients of the loss as written, and the statistics as the loss
  leaves them (written, then moved twice), checked against split/merge.
  One loss does all the staged Jacobian refuses: the same path for each."""
  model, x, y = branched
  model = nnx.clone(model)
  graphdef, params, rest = nnx.split(nnx.clone(model), nnx.Param, ...)
  calls = _count_staged(monkeypatch)

  def split_loss(params, rest, x, y):
    copy = nnx.merge(graphdef, params, rest, copy=True)
    return _all_of_them(copy, x, y), nnx.state(copy, nnx.BatchStat)

  # One compile for both: compilation dominates on a CPU.
  @nnx.jit
  def both(model, params, rest, x, y):
    out = osgd_jax.value_and_per_exit_grads(_all_of_them)(model, x, y)
    reference = osgd_jax.value_and_per_exit_grads(split_loss, has_aux=True)
    return out, reference(params, rest, x, y)

  (losses, grads), ((ref_losses, ref_stats), ref_grads) = both(
    model, params, rest, x, y
  )
  assert not calls
  _assert_trees_close(losses, ref_losses, rtol=1e-6)
  # The two programs sum the same float32 terms in different orders (XLA
  # fuses them differently), so an entry that nearly cancels differs by a
  # few ulps of the leaf's largest entry: the bound is relative to that.
  for u, v in zip(_arrays(grads), _arrays(ref_grads), strict=True):
    np.testing.assert_allclose(
      u, v, rtol=1e-5, atol=1e-6 * float(np.abs(v).max())
    )
  assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
  _assert_trees_close(
    nnx.state(model, nnx.BatchStat), ref_stats, rtol=1e-6, atol=1e-7
  )


def test_staged_option_errors():
  model = _DropoutTwoExit(nnx.Rngs(0))
  x, y = jnp.ones((3, 4)), jnp.zeros(3, jnp.int32)
  with pytest.raises(ValueError, match="needs an osgd_jax.zoo.AnytimeNet"):
    osgd_jax.value_and_per_exit_grads(loss_fn, staged=True)(model, x, y)
  with pytest.raises(ValueError, match="needs an osgd_jax.zoo.AnytimeNet"):
    osgd_jax.staged_value_and_per_exit_grads(loss_fn)(model, x, y)
  with pytest.raises(ValueError, match="staged=True applies to an nnx.Module"):
    osgd_jax.value_and_per_exit_grads(
      lambda w: jnp.stack([w.sum()]), staged=True
    )(jnp.ones(2))
  with pytest.raises(ValueError, match="staged must be None, True or False"):
    osgd_jax.value_and_per_exit_grads(loss_fn, staged="yes")  # type: ignore[arg-type]
  with pytest.raises(ValueError, match="or, for a model, the loss function"):
    osgd_jax.staged_value_and_per_exit_grads(3)  # type: ignore[arg-type]


def test_split_with_param_alone_is_what_fails_on_a_zoo_model(branched):
  """The recipe the guide gives: nnx.split(model, nnx.Param, ...)."""
  model, _, _ = branched
  with pytest.raises(ValueError, match="Non-exhaustive filters"):
    nnx.split(model, nnx.Param)
  _, params, rest = nnx.split(model, nnx.Param, ...)
  assert jax.tree.leaves(params) and jax.tree.leaves(rest)
