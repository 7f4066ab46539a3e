"""UPGrad against float64 NumPy oracles, TorchJD, its properties and errors.

The transformation is compared with the mean of the rows' projections onto
their dual cone (tests/numpy_oracles.py) on random and degenerate trees,
globally and per leaf; the weighting in x64, and against TorchJD's stored
outputs; then its documented properties are checked with hypothesis.
"""

from __future__ import annotations

import gram_cases
import jax.numpy as jnp
import numpy as np
import numpy_oracles as oracles
import pytest
import stacked_cases
from hypothesis import given, settings
from hypothesis import strategies as st

from osgd_jax import aggregation, weightings

K = stacked_cases.K
few = settings(max_examples=6, deadline=None)
seeds = st.integers(0, 2**31 - 1)
exponents = st.floats(-8, 8)


# --- against the oracles ------------------------------------------------------


@pytest.mark.parametrize("case", sorted(stacked_cases.CASES))
@pytest.mark.parametrize("granularity", ["global", "leaf"])
def test_matches_float64_oracle(granularity, case):
  grads = stacked_cases.case_grads(case)
  state = stacked_cases.init("upgrad", granularity)
  out, new_state = stacked_cases.jitted("upgrad", granularity)(grads, state)
  expected = oracles.aggregate(
    stacked_cases.leaves(grads), oracles.upgrad_direction, granularity
  )
  stacked_cases.assert_close(out, expected, grads, granularity)
  assert stacked_cases.finite((out, new_state))
  stacked_cases.assert_non_conflicting(out, grads, granularity)


@pytest.mark.parametrize("seed", [0, 1])
def test_upgrad_is_the_mean_projection_onto_the_dual_cone(seed):
  rows = gram_cases.conflicting_rows(seed)
  np.testing.assert_allclose(
    gram_cases.weighted_rows(weightings.upgrad, rows),
    oracles.upgrad_direction(rows),
    atol=1e-7,
  )


def test_weights_are_in_the_gram_matrix_dtype():
  assert weightings.upgrad(jnp.eye(3, dtype=jnp.float32)).dtype == jnp.float32


# --- against TorchJD ----------------------------------------------------------


def test_matches_torchjd():
  # TorchJD's projections solve the QP on the trace-normalised Gram plus
  # 1e-4 I.
  gram_cases.assert_matches_torchjd("upgrad", weightings.upgrad, {}, rtol=2e-4)


# --- properties ---------------------------------------------------------------
# On the K=6 trees of the oracle tests, so each jitted update compiles once.


@few
@given(seeds, exponents, st.booleans())
def test_finite_and_non_conflicting(seed, exp, zero_row):
  stacked_cases.assert_finite_and_non_conflicting("upgrad", seed, exp, zero_row)


@few
@given(seeds, exponents, st.floats(-3, 3))
def test_positively_homogeneous_and_order_invariant(seed, exp, log_c):
  stacked_cases.assert_positively_homogeneous_and_order_invariant(
    "upgrad", seed, exp, log_c
  )


@few
@given(seeds, exponents)
def test_upgrad_is_linear_under_scaling(seed, exp):
  grads = stacked_cases.random_tree(seed, exp)
  c1, c2 = np.random.default_rng(seed).uniform(0.1, 10, size=(2, K))

  def scaled(c):
    return {
      n: (g * c.reshape((K,) + (1,) * (g.ndim - 1))).astype(np.float32)
      for n, g in grads.items()
    }

  scale = np.abs(stacked_cases.global_rows(grads)).max() * 20
  np.testing.assert_allclose(
    stacked_cases.update("upgrad", scaled(c1 + c2)),
    stacked_cases.update("upgrad", scaled(c1))
    + stacked_cases.update("upgrad", scaled(c2)),
    rtol=1e-4,
    atol=1e-5 * scale,
  )


def test_single_exit_is_the_identity():
  stacked_cases.assert_single_exit_is_the_identity("upgrad")


# --- errors -------------------------------------------------------------------


@pytest.mark.parametrize(
  "make, match",
  [
    (lambda: aggregation.upgrad(max_iter=0, num_exits=2), "max_iter"),
    (
      lambda: aggregation.upgrad(tol=np.float64(-0.1), num_exits=2),
      r"upgrad: tol must be in \[0, 1\)",
    ),
    (lambda: aggregation.upgrad(), r"upgrad needs num_exits=K"),
  ],
)
def test_bad_options(make, match):
  with pytest.raises(ValueError, match=match):
    make()
