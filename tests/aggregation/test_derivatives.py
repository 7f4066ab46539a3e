"""Derivatives through the aggregators' updates (hypergradients).

``jax.grad`` of a scalar function of the update, under
``granularity="leaf"`` with the zero rows that the staged Jacobian makes
(exits 1 and 2 do not reach the tensor "b"), against central finite
differences of the float64 NumPy oracles of tests/numpy_oracles.py:
finite everywhere, and the oracle's derivative on every entry of a nonzero
row (docs/design.md, "Range, rank and derivatives"). The eigen-based
weightings are also checked at repeated eigenvalues, and Aligned-MTL at a
zero row whose derivative exists. One compile per method, in x64.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import numpy_oracles as oracles
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from osgd_jax import aggregation, weightings

K = 3
SHAPES = {"w": (4,), "b": (2,)}
H = 1e-6


def _pcd(rows, tau=0.02):
  """PCD's oracle on the rows it reads: none if the primary is zero.

  A zero secondary row's constraint (⟨0, d⟩ ≥ 0) holds for every d.
  """
  if not rows[0].any():
    return np.zeros(rows.shape[1])
  live = [0] + [j for j in range(1, len(rows)) if rows[j].any()]
  return oracles.pcd_direction(rows[live], tau)


# case: (registry name, options, oracle of one leaf's rows, tolerance
# relative to the largest derivative, finite-difference step).
METHODS = {
  "aligned-mtl": ("aligned-mtl", {}, oracles.aligned_mtl_direction, 1e-6, H),
  "aligned-mtl-rmse": (
    "aligned-mtl",
    {"scale_mode": "rmse"},
    functools.partial(oracles.aligned_mtl_direction, scale_mode="rmse"),
    1e-6,
    H,
  ),
  "imtl-g": ("imtl-g", {}, oracles.imtl_g_direction, 1e-6, H),
  "config": ("config", {}, oracles.config_direction, 1e-6, H),
  "nash-mtl": ("nash-mtl", {}, oracles.nash_mtl_direction, 1e-6, H),
  "mgda": ("mgda", {}, oracles.min_norm_point, 1e-6, H),
  "upgrad": ("upgrad", {}, oracles.upgrad_direction, 1e-6, H),
  "dualproj": ("dualproj", {}, oracles.dualproj_direction, 1e-6, H),
  "pcd": ("pcd", {"eps": 0.0}, _pcd, 1e-6, H),
  # SciPy's SLSQP solves the oracle's problem to about 1e-9: a longer step.
  "cagrad": (
    "cagrad",
    {},
    functools.partial(oracles.cagrad_direction, c=0.4),
    1e-4,
    1e-4,
  ),
  "crmogm": ("crmogm", {}, oracles.upgrad_direction, 1e-6, H),
}


def _params(shapes):
  return {n: jnp.zeros(s, jnp.float64) for n, s in shapes.items()}


@functools.cache
def _grad(case, shapes):
  """``jax.grad`` of ``⟨cot, update(g)⟩`` in g, jitted once per case.

  ``shapes``: ``((leaf, shape), ...)``; retraced per input dtype.
  """
  name, options, _, _, _ = METHODS[case]
  tx = aggregation.create(name, num_exits=K, granularity="leaf", **options)
  params = _params(dict(shapes))

  def inner(grads, cot):
    out, _ = tx.update(grads, tx.init(params), params)
    return sum(jnp.sum(out[n] * cot[n]) for n in out)

  return jax.jit(jax.grad(inner))


def _check(case, grads, cot, rows_to_check=None, dtype=np.float64, rtol=None):
  """jax.grad finite, and the oracle's central differences on nonzero rows.

  ``rows_to_check``: ``{leaf: rows}`` also compared where zero (the rows
  where the derivative exists); by default only the nonzero rows. The
  gradients enter the update in ``dtype``; ``rtol`` replaces the case's.
  """
  _, _, oracle, case_rtol, step = METHODS[case]
  rtol = case_rtol if rtol is None else rtol
  shapes = tuple((n, x.shape[1:]) for n, x in grads.items())
  with jax.enable_x64(True):
    got = _grad(case, shapes)(
      jax.tree.map(lambda x: jnp.asarray(x, dtype), grads),
      jax.tree.map(lambda x: jnp.asarray(x, dtype), cot),
    )
    got = {n: np.asarray(x, np.float64) for n, x in got.items()}
  for n, rows in grads.items():
    assert got[n].shape == rows.shape and np.all(np.isfinite(got[n])), n
    fd = np.zeros_like(rows)
    check = np.zeros(rows.shape, bool)
    for index in np.ndindex(rows.shape):
      extra = rows_to_check is not None and index[0] in rows_to_check.get(n, ())
      if not (rows[index[0]].any() or extra):
        continue
      plus, minus = rows.copy(), rows.copy()
      plus[index] += step
      minus[index] -= step
      fd[index] = cot[n] @ (oracle(plus) - oracle(minus)) / (2 * step)
      check[index] = True
    scale = 1.0 + np.abs(fd).max()
    np.testing.assert_allclose(
      got[n][check], fd[check], rtol=0, atol=rtol * scale, err_msg=n
    )


def _staged(rng):
  """Exit 1 reaches only "w"; exits 1 and 2 do not reach "b" (zero rows)."""
  grads = {n: rng.normal(size=(K, *s)) for n, s in SHAPES.items()}
  grads["b"][:2] = 0.0
  cot = {n: rng.normal(size=s) for n, s in SHAPES.items()}
  return grads, cot


# Aligned-MTL's "rmse" is checked at repeated eigenvalues below; CAGrad has
# its own test. (FairGrad shares Nash-MTL's solver.)
ZERO_ROW_CASES = sorted(set(METHODS) - {"aligned-mtl-rmse", "cagrad"})


@pytest.mark.parametrize("case", ZERO_ROW_CASES)
@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_grad_at_zero_rows_matches_finite_differences(case, seed):
  grads, cot = _staged(np.random.default_rng(seed))
  _check(case, grads, cot)


def test_cagrad_grad_at_zero_rows_matches_finite_differences():
  # One case: the oracle's SLSQP from K + 1 starts is slow.
  grads, cot = _staged(np.random.default_rng(2))
  _check("cagrad", grads, cot)


def test_nash_mtl_grad_at_zero_rows_is_finite_in_float32():
  # Long gradients (the update is clipped): a zero row's weight, which has
  # no solution and grows to about e^50, once overflowed the derivative of
  # the clipping norm in float32.
  grads, cot = _staged(np.random.default_rng(11))
  grads = {n: 10.0 * x for n, x in grads.items()}
  _check("nash-mtl", grads, cot, dtype=np.float32, rtol=1e-3)


@pytest.mark.parametrize("case", ["aligned-mtl-rmse", "config", "imtl-g"])
def test_grad_at_repeated_eigenvalues_matches_finite_differences(case):
  # Orthogonal rows of equal norms: M = c·I and C = I, whose eigenvectors
  # have no derivative; the weightings, as functions of M, have one.
  rng = np.random.default_rng(7)
  grads, cot = _staged(rng)
  basis, _ = np.linalg.qr(rng.normal(size=(SHAPES["w"][0], K)))
  grads["w"] = 1.7 * basis.T
  _check(case, grads, cot)


def test_aligned_mtl_grad_at_a_zero_row_in_the_span():
  # One entry: a zero row can only move within the span of the nonzero
  # one, the rank stays 1 and the update (pᵀG, Aligned-MTL of rank 1) has
  # a derivative there too, which the constant-rank one must give.
  rng = np.random.default_rng(3)
  grads = {"b": np.asarray([[0.0], [0.0], [-1.3]])}
  cot = {"b": rng.normal(size=(1,))}
  _check("aligned-mtl", grads, cot, rows_to_check={"b": (0, 1)})


@pytest.mark.parametrize("max_norm", [0.0, 1.0])
def test_nash_mtl_forward_matches_its_oracle_at_a_zero_row(max_norm):
  # The oracle minimises the bargaining objective on the live rows; the
  # library solves the equation by Newton's method on all of them.
  rows = np.random.default_rng(5).normal(size=(K, 4))
  rows[1] = 0.0
  with jax.enable_x64(True):
    weights = np.asarray(
      weightings.nash_mtl(jnp.asarray(rows @ rows.T), max_norm=max_norm)
    )
  np.testing.assert_allclose(
    weights @ rows,
    oracles.nash_mtl_direction(rows, max_norm=max_norm),
    rtol=1e-9,
  )
