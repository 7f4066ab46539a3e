"""value_and_per_exit_grads against K jax.grad calls, and the loss checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import osgd_jax


def _params():
  rng = np.random.default_rng(0)
  return {
    "w1": jnp.asarray(rng.normal(size=(4, 5)), jnp.float32),
    "w2": jnp.asarray(rng.normal(size=(5,)), jnp.float32),
    "unused": jnp.ones((2,)),
  }


def _losses(params, x):
  h = jnp.tanh(x @ params["w1"])
  return jnp.stack(
    [
      jnp.mean(h**2),
      jnp.mean((h @ params["w2"]) ** 2),
      jnp.sum(params["w2"] ** 3),
    ]
  )


def test_rows_equal_separate_gradients():
  params, x = _params(), jnp.linspace(-1, 1, 12).reshape(3, 4)
  losses, grads = jax.jit(osgd_jax.value_and_per_exit_grads(_losses))(params, x)
  np.testing.assert_allclose(losses, _losses(params, x), rtol=1e-6)
  for k in range(3):
    expected = jax.grad(lambda p, k=k: _losses(p, x)[k])(params)
    for name in params:
      assert grads[name].shape == (3,) + params[name].shape
      np.testing.assert_allclose(
        grads[name][k], expected[name], rtol=1e-5, atol=1e-6
      )
  np.testing.assert_array_equal(grads["unused"], 0.0)


def test_forward_is_traced_once():
  calls = []

  def counting_losses(params, x):
    calls.append(1)
    return _losses(params, x)

  osgd_jax.value_and_per_exit_grads(counting_losses)(
    _params(), jnp.ones((2, 4))
  )
  # One forward, whose VJP is vmapped: not K gradient computations.
  assert len(calls) == 1


def test_has_aux_returns_aux():
  def with_aux(params, x):
    losses = _losses(params, x)
    return losses, {"total": losses.sum()}

  (losses, aux), grads = osgd_jax.value_and_per_exit_grads(
    with_aux, has_aux=True
  )(_params(), jnp.ones((2, 4)))
  np.testing.assert_allclose(aux["total"], losses.sum(), rtol=1e-6)
  assert grads["w1"].shape == (3, 4, 5)


@pytest.mark.parametrize(
  "bad, match",
  [
    (lambda p: jnp.sum(p["w2"]), r"shape \(\).*jax.value_and_grad"),
    (lambda p: jnp.ones((3, 2)) * p["w2"][0], r"shape \(3, 2\).*Reduce"),
    (lambda p: jnp.zeros((0,)) * p["w2"][0], r"K=0"),
    (
      lambda p: [p["w2"][0], p["w2"][1]],
      r"returned a list\. Stack the exit losses",
    ),
    (
      lambda p: jnp.round(p["w2"][:2]).astype(jnp.int32),
      r"floating-point losses, got dtype int32\. Cast them",
    ),
  ],
)
def test_error_when_loss_is_not_a_vector(bad, match):
  with pytest.raises(ValueError, match=match):
    osgd_jax.value_and_per_exit_grads(bad)(_params())


def test_error_when_has_aux_output_is_not_a_pair():
  with pytest.raises(ValueError, match=r"pair \(losses, aux\)"):
    osgd_jax.value_and_per_exit_grads(
      lambda p: _losses(p, jnp.ones((1, 4))), has_aux=True
    )(_params())
