"""FairGrad against its equation, TorchJD, and its properties.

α-fair improvements of the exits: the weighting in x64 solves FairGrad's
equation (tests/numpy_oracles.py) and gives TorchJD's stored outputs; then
its claims with hypothesis.
"""

from __future__ import annotations

import gram_cases
import jax
import jax.numpy as jnp
import numpy as np
import numpy_oracles as oracles
import pytest
from hypothesis import given
from hypothesis import strategies as st

from osgd_jax import weightings

K = gram_cases.K
# name in tests/golden/torchjd_golden.json -> α.
ALPHAS = {"fairgrad": 1.0, "fairgrad_2": 2.0}
# TorchJD's least squares stops short of its own tolerance on mixed scales.
GOLDEN_RTOL = {"fairgrad": 1e-6, "fairgrad_2": 1e-5}


# FairGrad's equation has no positive solution when a positive combination
# of the gradients is 0 (a zero row, or g_4 = −2 g_2): only the other cases.
@pytest.mark.parametrize("case", ["random", "mixed_scale"])
@pytest.mark.parametrize("name, alpha", sorted(ALPHAS.items()))
def test_fairgrad_solves_its_equation(name, alpha, case):
  rows = gram_cases.case_rows(case)
  with jax.enable_x64(True):
    w = np.asarray(
      gram_cases.jitted(weightings.fairgrad, alpha=alpha)(
        jnp.asarray(rows @ rows.T)
      )
    )
  assert oracles.fairgrad_residual(rows @ rows.T, w, alpha) < 1e-9


@pytest.mark.parametrize("name", sorted(ALPHAS))
def test_matches_torchjd(name):
  # On rank_deficient: no positive solution (see above).
  gram_cases.assert_matches_torchjd(
    name,
    weightings.fairgrad,
    {"alpha": ALPHAS[name]},
    rtol=GOLDEN_RTOL[name],
    skip=("rank_deficient",),
  )


# --- properties ---------------------------------------------------------------


@gram_cases.common
@given(gram_cases.seeds, gram_cases.scales, gram_cases.zeros)
def test_outputs_are_finite_everywhere(seed, scales, zero):
  gram_cases.assert_finite_everywhere(
    weightings.fairgrad, seed, scales, zero, alpha=1.0
  )


@gram_cases.common
@given(gram_cases.seeds, st.permutations(range(K)))
def test_ignores_the_exits_order(seed, perm):
  gram_cases.assert_ignores_the_exits_order(
    weightings.fairgrad, seed, perm, alpha=1.0
  )
