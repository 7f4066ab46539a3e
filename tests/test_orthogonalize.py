"""The K×K algebra of the Gram method: LDLᵀ weights, unrolled and looped.

Up to ``UNROLL_MAX_EXITS`` exits the factorisation and the back substitution
are written entry by entry, and beyond, ``lax`` loops. Both must give the
weights whose combination of the rows is the float64 Gram–Schmidt oracle's
direction, and agree with each other.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy_oracles import gram_schmidt_components

from osgd_jax import orthogonalize

TOL = 1e-5


def _rows(num_exits, n=40, seed=0, kind="random"):
  rng = np.random.default_rng(seed)
  rows = rng.standard_normal((num_exits, n))
  if kind == "degenerate" and num_exits >= 3:
    rows[1] = 0.0  # an exit that does not reach the leaf
    rows[2] = 2.0 * rows[0]  # in the span of an earlier one
  if kind == "scaled":
    rows *= np.logspace(-4, 4, num_exits)[:, None]
  return rows


def _weights(rows, rescale, dtype=jnp.float64):
  gram = jnp.asarray(rows @ rows.T, dtype)
  weights, residual_sq = jax.jit(
    lambda m: orthogonalize.ldl_weights(m, tol=TOL, rescale=rescale)
  )(gram)
  return np.asarray(weights), np.asarray(residual_sq)


@pytest.fixture(params=["unrolled", "loop"])
def form(request, monkeypatch):
  # Every test traces a fresh function, so the patched bound takes effect
  # without clearing JAX's caches (which would recompile every other test's
  # programs in this process).
  if request.param == "loop":
    monkeypatch.setattr(orthogonalize, "UNROLL_MAX_EXITS", 0)
  jaxpr = jax.make_jaxpr(
    lambda m: orthogonalize.ldl_weights(m, tol=TOL, rescale=False)
  )(jnp.eye(3))
  looped = "scan" in str(jaxpr) or "while" in str(jaxpr)
  assert looped == (request.param == "loop")
  return request.param


@pytest.mark.parametrize("num_exits", [1, 2, 4, 7])
@pytest.mark.parametrize("kind", ["random", "degenerate", "scaled"])
@pytest.mark.parametrize("rescale", [False, True])
def test_weights_give_the_gram_schmidt_direction(
  form, num_exits, kind, rescale
):
  del form
  rows = _rows(num_exits, kind=kind)
  with jax.enable_x64(True):
    weights, residual_sq = _weights(rows, rescale)
  components = gram_schmidt_components(rows, tol=TOL, rescale=rescale)
  want = components.sum(axis=0)
  scale = np.abs(rows).max()
  np.testing.assert_allclose(weights @ rows / scale, want / scale, atol=1e-9)
  # ‖ĝ_k‖² of the projected components, before any rescaling.
  projected = gram_schmidt_components(rows, tol=TOL)
  np.testing.assert_allclose(
    residual_sq, (projected**2).sum(axis=1), rtol=1e-8, atol=1e-12 * scale**2
  )


def test_unrolled_and_looped_forms_agree_batched(monkeypatch):
  rng = np.random.default_rng(1)
  rows = rng.standard_normal((6, 5, 30))  # 6 leaves, K = 5
  rows[2, 3] = rows[2, 0]  # a degenerate exit on one leaf
  grams = jnp.asarray(np.einsum("lkn,ljn->lkj", rows, rows), jnp.float32)

  def fn(m):
    return orthogonalize.ldl_weights(m, tol=TOL, rescale=False)

  unrolled = jax.jit(fn)(grams)
  monkeypatch.setattr(orthogonalize, "UNROLL_MAX_EXITS", 0)
  looped = jax.jit(lambda m: fn(m))(grams)
  for b, c in zip(unrolled, looped, strict=True):
    np.testing.assert_allclose(b, c, rtol=1e-5, atol=1e-6)


def test_large_k_takes_the_loops_and_matches_the_oracle():
  num_exits = orthogonalize.UNROLL_MAX_EXITS + 1
  rows = _rows(num_exits, n=60, seed=2)
  jaxpr = jax.make_jaxpr(
    lambda m: orthogonalize.ldl_weights(m, tol=TOL, rescale=False)
  )(jnp.eye(num_exits))
  assert "scan" in str(jaxpr) or "while" in str(jaxpr)  # a fori_loop
  with jax.enable_x64(True):
    weights, _ = _weights(rows, rescale=False)
  want = gram_schmidt_components(rows, tol=TOL).sum(axis=0)
  np.testing.assert_allclose(weights @ rows, want, atol=1e-8)


def test_small_k_has_no_loop():
  jaxpr = jax.make_jaxpr(
    lambda m: orthogonalize.ldl_weights(m, tol=TOL, rescale=False)
  )(jnp.eye(4))
  assert "scan" not in str(jaxpr) and "while" not in str(jaxpr)


def test_one_exit_is_the_identity_bit_for_bit(form):
  del form
  gram = jnp.asarray([[[3.7]], [[0.0]]], jnp.float32)  # two leaves, K = 1
  weights, residual_sq = orthogonalize.ldl_weights(gram, tol=TOL, rescale=False)
  np.testing.assert_array_equal(weights, [[1.0], [0.0]])
  np.testing.assert_allclose(residual_sq, [[3.7], [0.0]], rtol=1e-6)
