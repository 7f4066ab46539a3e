"""PCGrad against float64 NumPy oracles, TorchJD, its properties and errors.

The transformation is compared with Yu et al.'s Algorithm 1, run in the
visiting orders its key draws (tests/numpy_oracles.py), on random and
degenerate trees, globally and per leaf; the weighting in x64; TorchJD's
PCGrad with K = 2 (deterministic) over steps; then its documented properties
are checked with hypothesis.
"""

from __future__ import annotations

import gram_cases
import jax
import jax.numpy as jnp
import numpy as np
import numpy_oracles as oracles
import pytest
import stacked_cases
from hypothesis import given, settings
from hypothesis import strategies as st

import osgd_jax
from osgd_jax import aggregation, weightings
from osgd_jax.aggregation import _stateful

K = stacked_cases.K
PARAMS = stacked_cases.PARAMS
few = settings(max_examples=6, deadline=None)
seeds = st.integers(0, 2**31 - 1)
exponents = st.floats(-8, 8)


# --- against the oracles ------------------------------------------------------


@pytest.mark.parametrize("case", sorted(stacked_cases.CASES))
@pytest.mark.parametrize("granularity", ["global", "leaf"])
def test_matches_float64_oracle(granularity, case):
  grads = stacked_cases.case_grads(case)
  state = stacked_cases.init("pcgrad", granularity)
  out, new_state = stacked_cases.jitted("pcgrad", granularity)(grads, state)
  orders = stacked_cases.pcgrad_orders(state)

  def direction(rows):
    return oracles.pcgrad_direction(rows, orders)

  expected = oracles.aggregate(
    stacked_cases.leaves(grads), direction, granularity
  )
  stacked_cases.assert_close(out, expected, grads, granularity)
  assert stacked_cases.finite((out, new_state))


def test_pcgrad_orders_are_reproducible_and_advance():
  grads = stacked_cases.stacked(3, stacked_cases.conflicting)
  update = stacked_cases.jitted("pcgrad")
  runs = []
  for _ in range(2):
    state, outs = stacked_cases.init("pcgrad"), []
    for _ in range(3):
      out, state = update(grads, state)
      outs.append(out["conv"])
    runs.append(np.stack(outs))
  np.testing.assert_array_equal(runs[0], runs[1])
  other_seed = aggregation.pcgrad(seed=1, num_exits=K).init(PARAMS)
  assert not np.array_equal(
    other_seed.weighting_state.key_data,
    stacked_cases.init("pcgrad").weighting_state.key_data,
  )
  # The key advances, so the orders of consecutive updates differ.
  state = stacked_cases.init("pcgrad")
  _, next_state = update(grads, state)
  assert not np.array_equal(
    stacked_cases.pcgrad_orders(state), stacked_cases.pcgrad_orders(next_state)
  )


def test_pcgrad_follows_the_orders_its_key_draws():
  rows = gram_cases.conflicting_rows(1)
  key = jax.random.key(7)
  orders = np.asarray(_stateful.visiting_orders(key, gram_cases.K))
  assert all(
    sorted(order) == list(range(gram_cases.K)) for order in orders.tolist()
  )
  np.testing.assert_allclose(
    gram_cases.weighted_rows(weightings.pcgrad, rows, key=key),
    oracles.pcgrad_direction(rows, orders),
    atol=1e-9,
  )


def test_weights_are_in_the_gram_matrix_dtype():
  gram = jnp.eye(3, dtype=jnp.float32)
  assert weightings.pcgrad(gram, key=jax.random.key(0)).dtype == jnp.float32


# --- against TorchJD ----------------------------------------------------------


def test_matches_torchjd_over_steps():
  # With K = 2 each task has one other to visit, so TorchJD is deterministic.
  gram_cases.assert_matches_torchjd_over_steps(
    "pcgrad", osgd_jax.pcgrad, rtol=1e-9
  )


# --- properties ---------------------------------------------------------------
# On the K=6 trees of the oracle tests, so each jitted update compiles once.


@few
@given(seeds, exponents, st.booleans())
def test_outputs_are_finite(seed, exp, zero_row):
  stacked_cases.assert_outputs_are_finite("pcgrad", seed, exp, zero_row)


@few
@given(seeds, exponents, st.floats(-3, 3))
def test_positively_homogeneous(seed, exp, log_c):
  # Not invariant to the exits' order: PCGrad's random orders depend on the
  # exits' index.
  stacked_cases.assert_positively_homogeneous("pcgrad", seed, exp, log_c)


@few
@given(seeds, exponents)
def test_pcgrad_two_non_conflicting_rows_give_the_sum(seed, exp):
  rng = np.random.default_rng(seed)
  rows = (rng.normal(size=(2, 12)) * 10.0**exp).astype(np.float32)
  if rows[0] @ rows[1] < 0:
    rows[1] = -rows[1]
  out, _ = stacked_cases.jitted("pcgrad", k=2)(
    {"w": rows}, stacked_cases.init("pcgrad", k=2)
  )
  np.testing.assert_allclose(
    out["w"], rows.sum(0), rtol=1e-5, atol=1e-6 * np.abs(rows).max()
  )


def test_single_exit_is_the_identity():
  stacked_cases.assert_single_exit_is_the_identity("pcgrad")


# --- errors -------------------------------------------------------------------


@pytest.mark.parametrize(
  "make, match",
  [
    (lambda: aggregation.pcgrad(num_exits=0), "num_exits"),
    (lambda: aggregation.pcgrad(), r"pcgrad needs num_exits=K"),
  ],
)
def test_bad_options(make, match):
  with pytest.raises(ValueError, match=match):
    make()
