"""CR-MOGM: any weighting's weights smoothed by an EMA; against TorchJD.

The smoothing of a cheap weighting against its definition, and CR-MOGM
wrapping UPGrad against TorchJD's over steps.
"""

from __future__ import annotations

import functools

import gram_cases
import jax.numpy as jnp
import numpy as np
import pytest

import osgd_jax


def test_crmogm_smooths_the_wrapped_weights():
  # A cheap weighting to wrap (eager): the squared norms' shares.
  def shares(gram):
    return jnp.diagonal(gram) / jnp.trace(gram)

  tx = osgd_jax.crmogm(shares, alpha=0.75, num_exits=2)
  state = tx.init({"w": jnp.zeros(2)})
  want = None
  for sq in ([1.0, 4.0], [4.0, 1.0], [1.0, 9.0]):
    g = jnp.asarray(np.diag(np.sqrt(sq)), jnp.float32)
    _, state = tx.update({"w": g}, state)
    fresh = np.asarray(sq) / np.sum(sq)
    want = fresh if want is None else 0.75 * want + 0.25 * fresh
    np.testing.assert_allclose(state.weights, want, rtol=1e-5)


def test_matches_torchjd_over_steps():
  # CR-MOGM wraps UPGrad, whose QP TorchJD regularises.
  gram_cases.assert_matches_torchjd_over_steps(
    "crmogm_upgrad", functools.partial(osgd_jax.crmogm, "upgrad"), rtol=2e-4
  )


def test_options_are_checked_with_a_fix():
  with pytest.raises(ValueError, match=r"unknown weighting 'nope'"):
    osgd_jax.crmogm("nope", num_exits=3)
