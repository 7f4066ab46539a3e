"""The library under bad numbers: NaN/Inf gradients and learning rates.

What is promised (docs/guides/optax.md, "Wrappers, NaN and Inf"): a NaN or Inf
gradient makes the update of its group non-finite, and leaves the
aggregator's own state as it was, so that ``optax.apply_if_finite`` after
the aggregator skips the step and the next steps are as if it never came.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import osgd_jax

K = 3
PARAMS = {"a": jnp.zeros((4,)), "b": jnp.zeros((2, 3))}

# Every transformation, with its defaults (plus a stateful weighting each).
TRANSFORMS = {
  "osgd": lambda: osgd_jax.osgd(num_exits=K),
  "osgd_global": lambda: osgd_jax.osgd(num_exits=K, granularity="global"),
  "weighted_sum_sdn": lambda: osgd_jax.weighted_sum(
    "sdn", total_steps=10, num_exits=K
  ),
  "adaloss": lambda: osgd_jax.adaptive_loss_balancing(num_exits=K),
  "pcgrad": lambda: osgd_jax.pcgrad(num_exits=K),
  "mgda": lambda: osgd_jax.mgda(num_exits=K),
  "upgrad": lambda: osgd_jax.upgrad(num_exits=K),
  # TorchJD's aggregators (NaN only: Inf takes the same path).
  **{
    name: (lambda name=name: getattr(osgd_jax.aggregation, name)(num_exits=K))
    for name in (
      "random_weighting",
      "imtl_g",
      "aligned_mtl",
      "krum",
      "dualproj",
      "gradvac",
      "cagrad",
      "config",
      "fairgrad",
      "modo",
      "sdmgrad",
      "pcd",
      "nash_mtl",
      "trimmed_mean",
      "graddrop",
      "excess_mtl",
    )
  },
  "crmogm": lambda: osgd_jax.crmogm(osgd_jax.weightings.upgrad, num_exits=K),
}
_BOTH_POISONS = (
  "osgd",
  "osgd_global",
  "weighted_sum_sdn",
  "adaloss",
  "pcgrad",
  "mgda",
  "upgrad",
)
CASES = [
  (name, poison)
  for name in sorted(TRANSFORMS)
  for poison in ((np.nan, np.inf) if name in _BOTH_POISONS else (np.nan,))
]


def _grads(seed, poison=None):
  keys = jax.random.split(jax.random.key(seed), 2)
  grads = {
    name: jax.random.normal(key, (K, *p.shape))
    for key, (name, p) in zip(keys, PARAMS.items(), strict=True)
  }
  if poison is not None:
    grads["a"] = grads["a"].at[1, 2].set(poison)
  return grads


def _losses(poison=None):
  losses = jnp.array([2.0, 1.5, 1.0])
  return losses if poison is None else losses.at[1].set(poison)


@functools.cache
def _chain(name):
  """The chain and its jitted update, compiled once for both poisons."""
  tx = optax.chain(TRANSFORMS[name](), optax.apply_if_finite(optax.sgd(0.1), 3))
  return tx, jax.jit(
    lambda g, s, losses: tx.update(g, s, PARAMS, losses=losses)
  )


@pytest.mark.parametrize("name, poison", CASES)
def test_apply_if_finite_after_the_aggregator_skips_a_bad_step(name, poison):
  tx, update = _chain(name)
  state = tx.init(PARAMS)
  # A bad step: gradient and loss non-finite, as a diverging loss gives.
  skipped, after_bad = update(_grads(0, poison), state, _losses(poison))
  for leaf in jax.tree.leaves(skipped):
    np.testing.assert_array_equal(leaf, 0.0)  # the step is skipped
  assert int(after_bad[1].notfinite_count) == 1
  # The aggregator's own state (AdaLoss's running losses, PCGrad's key,
  # SDN's step count) is as if the bad step never came: the next good
  # step's update equals the first good step's from a fresh state.
  want, _ = update(_grads(1), state, _losses())
  got, after_good = update(_grads(1), after_bad, _losses())
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert np.all(np.isfinite(g))
    np.testing.assert_array_equal(g, w)
  assert int(after_good[1].notfinite_count) == 0
  assert jax.tree.structure(after_good) == jax.tree.structure(state)


def test_under_leaf_granularity_only_the_bad_leaf_is_non_finite():
  tx = osgd_jax.osgd(num_exits=K)  # granularity="leaf"
  updates, _ = jax.jit(tx.update)(_grads(0, np.nan), tx.init(PARAMS), PARAMS)
  assert not np.any(np.isfinite(updates["a"]))
  assert np.all(np.isfinite(updates["b"]))


_OSGD_SGD_RANGES = {
  "learning_rate": r"must be a finite number.*makes every update NaN",
  "momentum": r"must be in \[0, 1\)",
  "weight_decay": r"must be a finite number >= 0",
}


@pytest.mark.parametrize("option", list(_OSGD_SGD_RANGES))
@pytest.mark.parametrize("value", [math.nan, math.inf, np.float32("nan")])
def test_osgd_sgd_refuses_a_non_finite_number(option, value):
  kwargs = {"learning_rate": 0.1, "num_exits": K, option: value}
  with pytest.raises(
    ValueError, match=f"osgd_sgd: {option} {_OSGD_SGD_RANGES[option]}"
  ):
    osgd_jax.osgd_sgd(**kwargs)


@pytest.mark.parametrize(
  ("kwargs", "match"),
  [
    ({"momentum": 1.5}, r"momentum must be in \[0, 1\), got 1.5"),
    ({"momentum": -0.1}, r"momentum must be in \[0, 1\)"),
    ({"weight_decay": -1e-4}, "weight_decay must be a finite number >= 0"),
  ],
)
def test_osgd_sgd_refuses_out_of_range_hyperparameters(kwargs, match):
  with pytest.raises(ValueError, match=f"osgd_sgd: {match}"):
    osgd_jax.osgd_sgd(0.1, num_exits=K, **kwargs)
