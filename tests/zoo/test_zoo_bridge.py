"""Linen users: a zoo model through ``flax.nnx.bridge.ToLinen``."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import FrozenDict

from osgd_jax import anytime, zoo
from osgd_jax.losses import per_exit_cross_entropy

BACKBONE = zoo.dense_backbone(in_features=64)
CONFIG = FrozenDict(stages=3, width=4, depth=1, norm="batch")


# XLA:CPU's optimisation passes dominate the compile time of these tiny
# programs.
jit = functools.partial(
  jax.jit, compiler_options={"xla_backend_optimization_level": 0}
)


def test_zoo_model_through_to_linen():
  net = nnx.bridge.ToLinen(zoo.NestedDepthNet, args=(BACKBONE,), kwargs=CONFIG)
  x = jax.random.normal(jax.random.key(1), (4, 64))
  labels = jnp.arange(4)
  variables = jit(net.init)(jax.random.key(0), x)
  assert set(variables) == {"params", "batch_stats"}
  # Same parameters as the NNX model.
  count = sum(a.size for a in jax.tree.leaves(variables["params"]))
  reference = nnx.eval_shape(
    lambda: zoo.NestedDepthNet(BACKBONE, rngs=nnx.Rngs(0), **CONFIG)
  )
  assert count == anytime.params_per_exit(reference)[-1]

  @jit
  def run(variables, x, labels):
    apply = functools.partial(net.apply, mutable=["batch_stats"])

    def loss(params):
      logits, updates = apply({**variables, "params": params}, x)
      return per_exit_cross_entropy(logits, labels).sum(), (logits, updates)

    (_, (logits, updates)), grads = jax.value_and_grad(loss, has_aux=True)(
      variables["params"]
    )
    first_two, _ = apply(variables, x, upto=2)
    predicted, _ = apply(variables, x, nnx_method="predict")
    return logits, updates, first_two, predicted, grads

  logits, updates, first_two, predicted, grads = jax.tree.map(
    np.asarray, run(variables, x, labels)
  )
  assert logits.shape == (3, 4, 10)
  np.testing.assert_allclose(first_two, logits[:2], rtol=1e-6, atol=1e-6)
  assert not np.allclose(predicted, logits)  # running vs batch statistics
  new = jax.tree.leaves(updates["batch_stats"])
  old = jax.tree.leaves(variables["batch_stats"])
  assert new and all(
    not np.allclose(a, b) for a, b in zip(new, old, strict=True)
  )
  assert all(
    g.shape == p.shape
    for g, p in zip(
      jax.tree.leaves(grads), jax.tree.leaves(variables["params"]), strict=True
    )
  )
  assert all(np.any(g) for g in jax.tree.leaves(grads))
