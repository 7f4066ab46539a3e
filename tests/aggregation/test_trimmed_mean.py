"""TrimmedMean against a float64 NumPy oracle and TorchJD.

Per coordinate, the mean without the extremes, in x64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gram_cases
import numpy_oracles as oracles
import osgd_jax

K, N = gram_cases.K, gram_cases.N


@pytest.mark.parametrize("case", sorted(gram_cases.CASES))
def test_trimmed_mean_matches_oracle_and_torchjd(case):
  tx = osgd_jax.trimmed_mean(1, num_exits=K)
  state = tx.init({"w": jnp.zeros(N)})
  rows = gram_cases.case_rows(case)
  with jax.enable_x64(True):
    out, _ = tx.update({"w": jnp.asarray(rows)}, state)
  np.testing.assert_allclose(out["w"], oracles.trimmed_mean_direction(rows, 1),
                             rtol=1e-12)
  golden = gram_cases.golden()["aggregators"]["trimmed_mean"]
  if case in golden["outputs"]:
    rows = np.asarray(gram_cases.golden()["cases"][case])
    with jax.enable_x64(True):
      out, _ = tx.update({"w": jnp.asarray(rows[:, :N // 2])},
                         tx.init({"w": jnp.zeros(N // 2)}))
    np.testing.assert_allclose(out["w"], golden["outputs"][case], rtol=1e-11)


def test_options_are_checked_with_a_fix():
  with pytest.raises(ValueError, match=r"num_exits >= 2 \* trim_number \+ 1"):
    osgd_jax.trimmed_mean(2, num_exits=4)
