"""The edges of the shared Gram path: range, rank and derivatives.

Each edge is checked as a property against the float64 NumPy oracles of
tests/numpy_oracles.py (docs/design.md, "Range, rank and derivatives"):
gradients of magnitude 1e-30 to 1e30, groups with more exits than entries,
and ``jax.grad`` through the update at zero rows, against central finite
differences of the oracle. Each has a fixed case that failed before the fix.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy_oracles import gram_schmidt_components, osgd_direction

import osgd_jax
from osgd_jax import aggregation
from osgd_jax.orthogonalize import DEFAULT_TOL

K = 3
SHAPES = {"w": (4,), "b": (2,)}
# Methods with constants of their own see the true Gram matrix: their update
# is NaN where it overflows, never finite and wrong.
TRUE_GRAM = {
  "crmogm",
  "excess-mtl",
  "gradvac",
  "modo",
  "nash-mtl",
  "pcd",
  "sdmgrad",
}
OPTIONS = {"sdn": {"total_steps": 10}}
LOSSES = jnp.asarray([1.0, 2.0, 3.0])


def _params():
  return {n: jnp.zeros(s) for n, s in SHAPES.items()}


@functools.cache
def _update(name, granularity=None, **options):
  """A jitted ``grads -> (update, state)`` of a fresh state, one compile."""
  if granularity is not None:
    options["granularity"] = granularity
  tx = aggregation.create(name, num_exits=K, **OPTIONS.get(name, {}), **options)
  state = tx.init(_params())
  return jax.jit(lambda g: tx.update(g, state, _params(), losses=LOSSES))


@functools.cache
def _osgd_update(k, granularity="leaf", method="gram"):
  """``jax.jit`` of OSGD's update from a fresh state: one per setting.

  Cached: the hypothesis examples below differ in their values, dtypes and
  shapes, not in the update; each new dtype or shape retraces this function.
  """
  tx = osgd_jax.osgd(num_exits=k, granularity=granularity, method=method)

  def update(grads):
    # The parameters: float32 zeros shaped like one exit's gradient.
    params = jax.tree.map(lambda g: jnp.zeros(g.shape[1:], jnp.float32), grads)
    return tx.update(grads, tx.init(params))

  return jax.jit(update)


def _grads(rng, scale, dtype=np.float32):
  return {
    n: jnp.asarray(rng.normal(size=(K, *s)) * scale, dtype)
    for n, s in SHAPES.items()
  }


def _oracle(grads, granularity):
  leaves = [np.asarray(grads[n], np.float64) for n in SHAPES]
  out = osgd_direction(leaves, tol=DEFAULT_TOL, granularity=granularity)
  return dict(zip(SHAPES, out, strict=True))


def _assert_close(got, expected, scale, rtol):
  for n in SHAPES:
    g = np.asarray(got[n], np.float64)
    assert np.all(np.isfinite(g)), (n, g)
    np.testing.assert_allclose(g, expected[n], rtol=0, atol=rtol * scale)


# --- Range -------------------------------------------------------------------


def test_exploding_gradient_is_not_dropped():
  """Norm 1e20: the squared norm overflows float32; it gave 0 or NaN."""
  grads = _grads(np.random.default_rng(0), 1e20)
  for k in (1, K):
    g = {n: x[:k] for n, x in grads.items()}
    out, state = _osgd_update(k)(g)
    expected = _oracle(g, "leaf")
    _assert_close(out, expected, 1e20, 1e-5)
    rows = np.concatenate([np.asarray(g[n], np.float64) for n in SHAPES], 1)
    np.testing.assert_allclose(
      state.exit_norms, np.linalg.norm(rows, axis=1), rtol=1e-5
    )


@settings(max_examples=12, deadline=None)
@given(
  exponent=st.floats(-30.0, 30.0),
  seed=st.integers(0, 2**16),
  dtype=st.sampled_from(["float32", "bfloat16"]),
  granularity=st.sampled_from(["leaf", "global"]),
)
def test_k1_is_the_identity_at_any_scale(exponent, seed, dtype, granularity):
  """K = 1: the update is the gradient itself, bit for bit."""
  g = {
    n: jnp.asarray(
      np.random.default_rng(seed).normal(size=(1, *s)) * 10.0**exponent,
      dtype,
    )
    for n, s in SHAPES.items()
  }
  out, _ = _osgd_update(1, granularity)(g)
  for n in SHAPES:
    assert out[n].dtype == g[n].dtype
    np.testing.assert_array_equal(
      np.asarray(out[n], np.float32), np.asarray(g[n][0], np.float32)
    )


@settings(max_examples=12, deadline=None)
@given(
  exponent=st.floats(-30.0, 30.0),
  seed=st.integers(0, 2**16),
  granularity=st.sampled_from(["leaf", "global"]),
  method=st.sampled_from(["gram", "sequential"]),
)
def test_osgd_matches_float64_oracle_at_any_scale(
  exponent, seed, granularity, method
):
  scale = 10.0**exponent
  grads = _grads(np.random.default_rng(seed), scale)
  out, state = _update("osgd", granularity, method=method)(grads)
  _assert_close(out, _oracle(grads, granularity), scale, 1e-4)
  assert np.all(np.asarray(state.projected_norms) > 0)


@pytest.mark.parametrize("name", aggregation.names())
def test_every_method_scales_or_says_it_cannot(name):
  """u(c·G) = c·u(G) for c = 2^±100 (FairGrad: c^(1+2p)), or NaN.

  Scaling by a power of two is exact, so a homogeneous method gives the
  same digits at any scale; a method that needs the true Gram matrix gives
  a non-finite update where it overflows, never a finite wrong one.
  """
  rng = np.random.default_rng(3)
  grads = _grads(rng, 1.0)
  run = _update(name)
  base = run(grads)[0]
  for c in (2.0**100, 2.0**-100):
    out = run(jax.tree.map(lambda x, c=c: x * c, grads))[0]
    power = 0.0 if name == "fairgrad" else 1.0  # FairGrad's α = 1: 1 + 2p
    for n in SHAPES:
      got = np.asarray(out[n], np.float64) / c**power
      want = np.asarray(base[n], np.float64)
      if name in TRUE_GRAM:
        if c > 1:
          assert not np.all(np.isfinite(got)), (name, got)
        continue
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# --- Rank --------------------------------------------------------------------


def test_exit_in_span_is_dropped_when_k_exceeds_size():
  """A case float32 kept: exit 4 is in the span of exits 1, 2 (size 2)."""
  bias = np.asarray(
    [
      [-3.6351791e-01, -1.5351888e00],
      [5.5189233e00, 2.5384501e01],
      [5.1201897e00, 2.3364109e01],
      [2.9243766e-03, 4.1743758e-01],
    ],
    np.float32,
  )
  tx = osgd_jax.osgd(num_exits=4)
  out, state = tx.update({"b": jnp.asarray(bias)}, tx.init({"b": jnp.zeros(2)}))
  expected = gram_schmidt_components(bias, DEFAULT_TOL)
  np.testing.assert_allclose(out["b"], expected.sum(0), rtol=1e-3)
  np.testing.assert_array_equal(state.degenerate_fraction, [0, 0, 1, 1])


@settings(max_examples=15, deadline=None)
@given(
  size=st.integers(1, 3),
  extra=st.integers(1, 3),
  closeness=st.sampled_from([1.0, 0.1, 0.03]),
  seed=st.integers(0, 2**16),
  method=st.sampled_from(["gram", "sequential"]),
)
def test_rank_deficient_groups_match_oracle(
  size, extra, closeness, seed, method
):
  """K > size: exits beyond the rank are dropped, diagnostics agree."""
  rng = np.random.default_rng(seed)
  k = size + extra
  first = rng.normal(size=(size, size))
  for i in range(1, size):  # nearly collinear leading rows, pivots ≥ 1e-3
    first[i] = first[i - 1] + closeness * first[i]
  later = rng.normal(size=(extra, size)) @ first
  rows = np.concatenate([first, later]).astype(np.float32)
  out, state = _osgd_update(k, method=method)({"b": jnp.asarray(rows)})
  components = gram_schmidt_components(rows, DEFAULT_TOL)
  norm = np.linalg.norm(rows, axis=1).max()
  np.testing.assert_allclose(out["b"], components.sum(0), atol=1e-3 * norm)
  dropped = np.linalg.norm(components, axis=1) == 0
  np.testing.assert_array_equal(state.degenerate_fraction, dropped)
  np.testing.assert_array_equal(np.asarray(state.projected_norms) == 0, dropped)


# --- Derivatives -------------------------------------------------------------


def _staged(rng):
  """Exit 1 reaches only "w"; exits 1 and 2 do not reach "b" (leaf rows 0)."""
  g = {n: rng.normal(size=(K, *s)) for n, s in SHAPES.items()}
  g["b"][:2] = 0.0
  return g


@settings(max_examples=4, deadline=None)
@given(
  seed=st.integers(0, 2**16),
  granularity=st.sampled_from(["leaf", "global"]),
  method=st.sampled_from(["gram", "sequential"]),
)
def test_grad_through_update_matches_finite_differences(
  seed, granularity, method
):
  """jax.grad at zero rows: finite, and the oracle's derivative elsewhere."""
  rng = np.random.default_rng(seed)
  grads = _staged(rng)
  cot = {n: rng.normal(size=s) for n, s in SHAPES.items()}
  tx = osgd_jax.osgd(num_exits=K, granularity=granularity, method=method)
  state = tx.init(_params())

  def f(g):
    out, _ = tx.update(g, state)
    return sum(jnp.sum(out[n] * cot[n]) for n in SHAPES)

  got = jax.jit(jax.grad(f))(
    jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), grads)
  )

  def oracle(g):
    out = _oracle(g, granularity)
    return sum(float(np.sum(out[n] * cot[n])) for n in SHAPES)

  h = 1e-6
  for n in SHAPES:
    g_n = np.asarray(got[n], np.float64)
    assert np.all(np.isfinite(g_n)), (n, g_n)
    for index in np.ndindex(grads[n].shape):
      group = [n] if granularity == "leaf" else list(SHAPES)
      if any(grads[m][index[0]].any() for m in group):
        plus = {m: x.copy() for m, x in grads.items()}
        minus = {m: x.copy() for m, x in grads.items()}
        plus[n][index] += h
        minus[n][index] -= h
        fd = (oracle(plus) - oracle(minus)) / (2 * h)
        assert abs(g_n[index] - fd) <= 2e-3 * (1 + abs(fd)), (n, index, fd)
      else:  # a zero row stays a zero row: no derivative through it
        assert g_n[index] == 0.0
