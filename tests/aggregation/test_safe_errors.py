"""Errors whose advice is safe to follow: unstacked gradients, a state made
for another K, complex gradients (issue 29, point 3)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import osgd_jax
from osgd_jax import aggregation
from osgd_jax.aggregation import _engine

PARAMS = {"b": jnp.ones(3), "w": jnp.ones((2, 3))}
# Two exits' gradients, stacked: every leaf (2, *param.shape).
STACKED = jax.tree.map(lambda p: jnp.stack([p, 2 * p]), PARAMS)


def test_unstacked_gradients_with_params_are_named_and_the_fix_is_stacking():
  """On main the advice was "build it with num_exits=3", which runs."""
  tx = aggregation.mgda(2)
  with pytest.raises(
    ValueError,
    match=r"every gradient leaf has its parameter's shape: these are"
    r" unstacked gradients\. Stack the K per-exit gradients.*"
    r"value_and_per_exit_grads.*jax\.tree\.map\(lambda \*g: jnp\.stack",
  ):
    tx.update(PARAMS, tx.init(PARAMS), PARAMS)


def test_the_advice_to_stack_is_right():
  """jax.tree.map(lambda *g: jnp.stack(g), *per_exit_grads) is STACKED."""
  per_exit = [PARAMS, jax.tree.map(lambda p: 2 * p, PARAMS)]
  stacked = jax.tree.map(lambda *g: jnp.stack(g), *per_exit)
  read = _engine.read_stacked(stacked, num_exits=2, params=PARAMS, name="x")
  assert read is not None and read.grams.shape == (2, 2, 2)


def test_unstacked_gradients_without_params_say_to_stack_first():
  tx = aggregation.pcgrad(3)
  with pytest.raises(
    ValueError,
    match=r"K=2 exits but pcgrad was built with num_exits=3.*If these are"
    r" unstacked gradients, stack.*pass params to update.*Only if they"
    r" really are stacked for K=2 exits",
  ):
    tx.update({"w": jnp.ones((2, 3))}, tx.init({"w": jnp.ones(3)}))
  with pytest.raises(
    ValueError, match=r"share the leading exit axis K.*unstacked.*stack"
  ):
    tx.update(PARAMS, tx.init(PARAMS))


@pytest.mark.parametrize(
  "make",
  [
    lambda k: aggregation.mgda(k),
    lambda k: aggregation.adaptive_loss_balancing(k),  # stateful
    lambda k: aggregation.graddrop(k),  # coordinatewise
    lambda k: aggregation.excess_mtl(k),
    lambda k: osgd_jax.osgd(k),
    lambda k: osgd_jax.osgd(k, method="sequential"),
  ],
)
def test_a_state_made_for_another_k_is_refused_by_name(make):
  """On main: accepted (the state changed shape) or a broadcasting error."""
  tx3 = make(3)
  grads = {"w": jnp.ones((2, 4))}
  with pytest.raises(
    ValueError,
    match=r"state field .* has shape \(3.*num_exits=2 makes it \(2.*"
    r"make it with this one's: state = tx\.init\(params\)",
  ):
    make(2).update(grads, tx3.init({"w": jnp.ones(4)}), {"w": jnp.ones(4)})


def test_a_state_of_another_structure_is_refused():
  tx = aggregation.mgda(2)
  with pytest.raises(ValueError, match=r"mgda's state has structure"):
    tx.update(STACKED, (), PARAMS)


@pytest.mark.parametrize(
  "tx", [aggregation.upgrad(2), osgd_jax.osgd(2, method="sequential")]
)
def test_complex_gradients_are_refused(tx):
  grads = {"w": jnp.ones((2, 3), jnp.complex64)}
  with pytest.raises(
    ValueError, match=r"\['w'\] has complex dtype complex64.*real gradients"
  ):
    tx.update(grads, tx.init({"w": jnp.ones(3)}))
