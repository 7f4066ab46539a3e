"""The engine every aggregator is built on: from_weighting and read_stacked.

Every error names the problem and, where there is one, the leaf; the
stacked gradients are read through OSGD's update (any aggregator reads them
the same way). The jitted update's operations carry the aggregator's name
as their scope.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
import stacked_cases

import osgd_jax
from osgd_jax import aggregation

_apply = stacked_cases.apply_osgd


# --- from_weighting's options -------------------------------------------------


@pytest.mark.parametrize(
  "make, match",
  [
    (
      lambda: osgd_jax.from_weighting(len, num_exits=2, granularity="x"),
      "granularity must be one of",
    ),
    (lambda: osgd_jax.from_weighting(3, num_exits=2), "must be a function"),
  ],
)
def test_bad_options(make, match):
  with pytest.raises(ValueError, match=match):
    make()


# --- read_stacked: the gradients' tree ----------------------------------------


def test_error_when_k_differs_between_leaves():
  grads = {"a": jnp.ones((3, 2)), "b": {"c": jnp.ones((2, 2))}}
  with pytest.raises(ValueError, match=r"K=3.*\['b'\]\['c'\].*K=2"):
    _apply(grads)


def test_error_when_leaf_is_not_stacked_like_its_param():
  grads = {"a": jnp.ones((3, 2)), "b": jnp.ones((3, 4, 5))}
  params = {"a": jnp.ones(2), "b": jnp.ones((5, 4))}
  with pytest.raises(ValueError, match=r"\['b'\].*\(3, 4, 5\).*\(K, 5, 4\)"):
    _apply(grads, params)


def test_error_when_params_structure_differs():
  with pytest.raises(ValueError, match="tree structures"):
    _apply({"a": jnp.ones((3, 2))}, {"z": jnp.ones(2)})


def test_error_for_unstacked_scalar_leaf():
  with pytest.raises(ValueError, match=r"\['s'\] is a scalar"):
    _apply({"s": jnp.float32(1.0)})


def test_error_for_zero_exits():
  with pytest.raises(ValueError, match=r"K=0"):
    _apply({"a": jnp.ones((0, 3))})


def test_error_when_num_exits_differs_from_k():
  with pytest.raises(ValueError, match=r"K=3.*num_exits=4"):
    _apply({"a": jnp.ones((3, 2))}, num_exits=4)


def test_error_for_integer_gradients():
  with pytest.raises(ValueError, match="non-float"):
    _apply({"a": jnp.ones((2, 3), jnp.int32)})


def test_shape_errors_at_update():
  """The errors name the aggregator, the leaf and the fix."""
  grads = {"w": jnp.ones((3, 2))}
  with pytest.raises(
    ValueError,
    match=r"K=3 exits but mgda was built with"
    r" num_exits=2",
  ):
    tx = aggregation.mgda(num_exits=2)
    tx.update(grads, tx.init(None))
  with pytest.raises(ValueError, match=r"pcgrad expects.*\['s'\] is a scalar"):
    tx = aggregation.pcgrad(num_exits=1)
    tx.update({"s": jnp.float32(1.0)}, tx.init(None))
  with pytest.raises(
    ValueError, match=r"\['w'\].*expected \(K, \*param\.shape\)"
  ):
    tx = aggregation.upgrad(num_exits=3)
    tx.update(grads, tx.init(None), {"w": jnp.ones(3)})
  with pytest.raises(
    ValueError,
    match=r"pcgrad's state field \.weighting_state.* has shape \(2, 2\)"
    r".*makes it \(1, 2\).*tx.init\(params\)",
  ):
    tx = aggregation.pcgrad(num_exits=3, granularity="leaf")
    tx.update(grads, tx.init({"a": jnp.ones(2), "b": jnp.ones(2)}))


# --- the named scope ----------------------------------------------------------


def test_update_ops_carry_the_transformation_name_as_scope():
  """Profiles and compiled programs tell osgd's operations apart by scope."""
  params = {"w": jnp.zeros((4, 3))}
  grads = {"w": jnp.ones((2, 4, 3))}
  for tx, scope in (
    (osgd_jax.osgd(num_exits=2), "osgd"),
    (osgd_jax.pcgrad(seed=0, num_exits=2), "pcgrad"),
  ):
    text = (
      jax.jit(tx.update)
      .lower(grads, tx.init(params), params)
      .as_text(debug_info=True)
    )
    assert f"/{scope}/" in text or f'"{scope}/' in text, scope
