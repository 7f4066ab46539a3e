"""The training step with the staged per-exit gradients against the vmap path.

The staged Jacobian itself is tested in tests/test_staged.py; these tests
drive it through the training code (and move with it to the application's
tests).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from osgd_jax import train as train_lib
from osgd_jax.cli import config_from_args
from tiny_anytime import WEIGHTS
from tiny_anytime import compile_cheaply as _compile
from tiny_anytime import tiny_net as _tiny


def _train_config(per_exit_grads):
  return train_lib.TrainConfig(
      model="branched-mlp", optimizer="osgd", exit_weights=WEIGHTS,
      lr=0.1, per_exit_grads=per_exit_grads, progress=False)


def test_train_step_staged_equals_vmap():
  model, x, y = _tiny("branched-mlp")
  graphdef, params0, rest0 = nnx.split(model, nnx.Param, ...)
  results = {}
  for mode in ("staged-batched", "staged-looped", "vmap"):
    tx, step = train_lib.make_train_step(_train_config(mode), graphdef, 3,
                                         total_steps=10, augment=False)
    copy = lambda t: jax.tree.map(jnp.array, t)  # the step donates its inputs
    params, rest = copy(params0), copy(rest0)
    state = tx.init(params)
    key = jax.random.key(0)
    compiled = _compile(None, params, rest, state, x, y, key, jitted=step)
    for _ in range(2):
      params, rest, state, losses = compiled(params, rest, state, x, y, key)
    results[mode] = params, rest, losses
  for mode in ("staged-batched", "staged-looped"):
    for a, b in zip(jax.tree.leaves(results[mode]),
                    jax.tree.leaves(results["vmap"])):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=mode)
  # The logged losses are the unweighted ones.
  assert float(results["staged-looped"][2][1]) > 0


def test_per_exit_grads_flag_and_config():
  assert config_from_args([]).per_exit_grads == "staged"
  for choice in ("vmap", "staged-looped", "staged-batched"):
    assert config_from_args(
        ["--per-exit-grads", choice]).per_exit_grads == choice
  with pytest.raises(SystemExit):
    config_from_args(["--per-exit-grads", "loop"])
  with pytest.raises(ValueError, match="unknown --per-exit-grads 'loop'"):
    dataclasses.replace(_train_config("staged"),
                        per_exit_grads="loop").validate()
  # Checkpoints written before the field existed can still be resumed.
  saved = _train_config("staged").to_json()
  del saved["per_exit_grads"]
  train_lib._check_resumable(saved, _train_config("staged"))
