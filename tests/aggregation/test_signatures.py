"""Factories read like Optax: K first, and ambiguous calls refused.

``num_exits`` is the first positional parameter of every aggregator's
factory (the other options are keywords); ``from_weighting``, ``crmogm``
and ``weighted_sum`` take what they apply first and K second; ``osgd_sgd``
takes the learning rate first, as ``optax.sgd``. A call written for K that
would be read as another option is refused, never misread.
"""

from __future__ import annotations

import inspect

import jax.numpy as jnp
import numpy as np
import pytest

import osgd_jax
from osgd_jax import aggregation

# Every aggregator's factory but those that take what they apply first.
_WHAT_FIRST = {
  "create",  # the registry: create(name, num_exits=K)
  "crmogm",
  "from_weighting",
  "osgd_sgd",  # the learning rate first, as optax.sgd
  "switch_to_sum",
  "weighted_sum",
}
_K_FIRST = sorted(
  name
  for name in aggregation.__all__
  if name[0].islower()
  and callable(getattr(aggregation, name))
  and "num_exits" in inspect.signature(getattr(aggregation, name)).parameters
  and name not in _WHAT_FIRST
)


def test_the_list_of_factories_is_complete():
  assert {"osgd", "pcgrad", "cagrad", "upgrad", "excess_mtl"} <= set(_K_FIRST)


@pytest.mark.parametrize("name", _K_FIRST)
def test_num_exits_is_the_first_positional_parameter(name):
  factory = getattr(aggregation, name)
  parameters = list(inspect.signature(factory).parameters.values())
  assert parameters[0].name == "num_exits"
  assert all(p.kind is p.KEYWORD_ONLY for p in parameters[1:])


def test_osgd_4_is_four_exits():
  params = {"w": jnp.zeros(2)}
  grads = {"w": jnp.asarray([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [2.0, 0.0]])}
  tx = osgd_jax.osgd(4)
  updates, _ = tx.update(grads, tx.init(params), params)
  # exit 2 keeps [0, 1]; exits 3 (zero) and 4 (collinear) add nothing.
  np.testing.assert_allclose(updates["w"], [1.0, 1.0], atol=1e-6)
  keyword = osgd_jax.osgd(num_exits=4)
  same, _ = keyword.update(grads, keyword.init(params), params)
  np.testing.assert_array_equal(updates["w"], same["w"])


@pytest.mark.parametrize(
  ("make", "match"),
  [
    (lambda: osgd_jax.osgd_sgd(4), "osgd_sgd takes learning_rate first"),
    (
      lambda: osgd_jax.weighted_sum(3),
      r"weighted_sum takes weights first .* weighted_sum\(weights, num_exits",
    ),
    (lambda: osgd_jax.crmogm(3), "crmogm takes weighting first"),
    (lambda: osgd_jax.from_weighting(2), "from_weighting takes weighting"),
  ],
)
def test_a_number_of_exits_in_another_options_place_is_refused(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_old_positional_options_fail_loudly_not_silently():
  """cagrad(0.5, num_exits=3) used to mean c=0.5: now a TypeError."""
  with pytest.raises(TypeError, match="multiple values for argument"):
    osgd_jax.cagrad(0.5, num_exits=3)  # type: ignore[misc]
  with pytest.raises(TypeError, match="positional argument"):
    osgd_jax.pcgrad(3, 1)  # type: ignore[misc]


def test_what_first_factories_take_k_second():
  params = {"w": jnp.zeros(2)}
  grads = {"w": jnp.asarray([[1.0, 0.0], [0.0, 2.0]])}
  for tx in (
    osgd_jax.weighted_sum("sum", 2),
    osgd_jax.from_weighting(osgd_jax.weightings.uniform, 2),
    osgd_jax.crmogm("mean", 2),
  ):
    updates, _ = tx.update(grads, tx.init(params), params)
    assert updates["w"].shape == (2,)
