"""The training step's per-exit gradient modes, and the flag that picks one.

Moved from tests/test_staged_grads.py, which tests the staged Jacobian
itself: here the whole jitted step of ``osgd_jax.app.train`` is compared
across ``--per-exit-grads`` modes.
"""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_anytime import WEIGHTS, tiny_net

from osgd_jax import zoo
from osgd_jax.app import train as train_lib
from osgd_jax.app.train.cli import config_from_args


def _tiny_branched_mlp():
  return tiny_net("branched-mlp")


def _train_config(per_exit_grads, engine="stacked"):
  return train_lib.TrainConfig(
    model="branched-mlp",
    optimizer="osgd",
    exit_weights=WEIGHTS,
    lr=0.1,
    per_exit_grads=per_exit_grads,
    engine=engine,
    progress=False,
  )


def test_train_step_staged_equals_vmap_and_gramian_equals_stacked():
  model, x, y = _tiny_branched_mlp()
  graphdef, params0, rest0 = nnx.split(model, nnx.Param, ...)
  results = {}
  modes = ("staged-batched", "staged-looped", "vmap")
  gramians = ("staged-looped/gramian", "vmap/gramian")
  for mode in modes + gramians:
    grads_mode, _, engine = mode.partition("/")
    tx, step = train_lib.make_train_step(
      _train_config(grads_mode, engine or "stacked"),
      graphdef,
      3,
      total_steps=10,
      augment=False,
    )

    def copy(t):
      return jax.tree.map(jnp.array, t)  # the step donates its inputs

    params, rest = copy(params0), copy(rest0)
    state = tx.init(params)
    key = jax.random.key(0)
    for _ in range(2):
      params, rest, state, losses = step(params, rest, state, x, y, key)
    # A step keeps every array's shape and dtype, the optimizer state's too.
    chex.assert_trees_all_equal_shapes_and_dtypes(
      (params, rest, state), (params0, rest0, tx.init(params0))
    )
    results[mode] = params, rest, losses
  # A Gramian gives the aggregator the same update and state as the stack.
  for mode in ("staged-batched", "staged-looped", *gramians):
    for a, b in zip(
      jax.tree.leaves(results[mode]),
      jax.tree.leaves(results["vmap"]),
      strict=True,
    ):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=mode)
  # The logged losses are the unweighted ones.
  assert float(results["staged-looped"][2][1]) > 0


def test_per_exit_grads_flag_and_config():
  assert config_from_args([]).per_exit_grads == "staged"
  for choice in ("vmap", "staged-looped", "staged-batched"):
    assert (
      config_from_args(["--per-exit-grads", choice]).per_exit_grads == choice
    )
  with pytest.raises(SystemExit):
    config_from_args(["--per-exit-grads", "loop"])
  with pytest.raises(ValueError, match="unknown --per-exit-grads 'loop'"):
    dataclasses.replace(
      _train_config("staged"), per_exit_grads="loop"
    ).validate()
  # Checkpoints written before the field existed can still be resumed.
  saved = _train_config("staged").to_json()
  del saved["per_exit_grads"]
  train_lib.check_resumable(saved, _train_config("staged"))


# --- the optimizers by name, and what the step passes them ---


def _all_finite(tree):
  return all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(tree))


def test_make_optimizer_builds_every_optimizer():
  params = {"w": jnp.ones(4)}
  grads = {"w": jnp.arange(12.0).reshape(3, 4) - 5.0}
  for name in train_lib.OPTIMIZERS:
    config = dataclasses.replace(train_lib.TrainConfig(), optimizer=name)
    config.validate()
    tx = train_lib.make_optimizer(config, total_steps=10, num_exits=3)
    state = tx.init(params)
    g = {"w": grads["w"].sum(0)} if name == "sgd" else grads
    # Traced, not compiled: the compiled kernels are tested above.
    updates, new_state = jax.eval_shape(
      functools.partial(tx.update, losses=jnp.ones(3)), g, state, params
    )
    assert updates["w"].shape == (4,), name
    assert jax.tree.map(jnp.shape, new_state) == jax.tree.map(jnp.shape, state)


def test_train_step_passes_losses_and_seed():
  # AdaLoss is the optimizer that needs train.py to pass the losses along.
  model = zoo.create("branched-mlp", rngs=nnx.Rngs(0), stages=3, width=8)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  config = train_lib.TrainConfig(model="branched-mlp", optimizer="adaloss")
  tx, step = train_lib.make_train_step(
    config, graphdef, 3, total_steps=4, augment=False
  )
  opt_state = tx.init(params)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(32, 64)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, size=32), jnp.int32)
  for _ in range(2):
    params, rest, opt_state, losses = step(
      params, rest, opt_state, x, y, jax.random.key(0)
    )
  ada = opt_state[0].weighting_state
  assert int(ada.count[0]) == 2 and _all_finite((params, opt_state, losses))
  # The step is shared by the seeds of an experiment; PCGrad's key is not.
  keys = [
    train_lib.make_train_step(
      dataclasses.replace(config, optimizer="pcgrad", seed=seed),
      graphdef,
      3,
      total_steps=4,
      augment=False,
    )[0]
    .init(params)[0]
    .weighting_state.key_data
    for seed in (0, 1)
  ]
  assert not np.array_equal(keys[0], keys[1])
