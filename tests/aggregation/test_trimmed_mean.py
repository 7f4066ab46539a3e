"""TrimmedMean against a float64 NumPy oracle and TorchJD.

Per coordinate, the mean without the extremes, in x64.
"""

from __future__ import annotations

import gram_cases
import jax
import jax.numpy as jnp
import numpy as np
import numpy_oracles as oracles
import pytest

import osgd_jax

K, N = gram_cases.K, gram_cases.N


@pytest.mark.parametrize("case", sorted(gram_cases.CASES))
def test_trimmed_mean_matches_oracle_and_torchjd(case):
  tx = osgd_jax.trimmed_mean(num_exits=K, trim_number=1)
  state = tx.init({"w": jnp.zeros(N)})
  rows = gram_cases.case_rows(case)
  with jax.enable_x64(True):
    out, _ = tx.update({"w": jnp.asarray(rows)}, state)
  np.testing.assert_allclose(
    out["w"], oracles.trimmed_mean_direction(rows, 1), rtol=1e-12
  )
  golden = gram_cases.golden()["aggregators"]["trimmed_mean"]
  if case in golden["outputs"]:
    rows = np.asarray(gram_cases.golden()["cases"][case])
    with jax.enable_x64(True):
      out, _ = tx.update(
        {"w": jnp.asarray(rows[:, : N // 2])}, tx.init({"w": jnp.zeros(N // 2)})
      )
    np.testing.assert_allclose(out["w"], golden["outputs"][case], rtol=1e-11)


def test_options_are_checked_with_a_fix():
  with pytest.raises(ValueError, match=r"num_exits >= 2 \* trim_number \+ 1"):
    osgd_jax.trimmed_mean(num_exits=4, trim_number=2)


def test_one_exit_is_the_identity_with_its_diagnostics():
  # With K = 1 no other exit ranks a coordinate: the rank is an array of
  # zeros, not the Python int 0 (which once raised AttributeError).
  tx = osgd_jax.trimmed_mean(num_exits=1, trim_number=0)
  grads = {"w": jnp.asarray([[3.0, -1.0, 0.5]]), "b": jnp.asarray([[2.0]])}
  out, state = jax.jit(tx.update)(
    grads, tx.init({"w": jnp.zeros(3), "b": jnp.zeros(1)})
  )
  np.testing.assert_array_equal(out["w"], [3.0, -1.0, 0.5])
  np.testing.assert_array_equal(out["b"], [2.0])
  np.testing.assert_array_equal(state.weights, [1.0])
