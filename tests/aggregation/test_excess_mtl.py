"""ExcessMTL against a float64 NumPy oracle and TorchJD, over steps.

Weights following the exits' excess risks, with and without warm-up, in
x64.
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


def test_excess_mtl_matches_oracle_over_steps():
  rng = np.random.default_rng(7)
  steps = [
    rng.normal(size=(K, N)) * [[1.0], [0.1], [3.0], [1.0]] for _ in range(4)
  ]
  for warmup in (0, 2):
    tx = osgd_jax.excess_mtl(K, robust_step_size=0.5, n_warmup_steps=warmup)
    state = tx.init({"w": jnp.zeros(N)})
    with jax.enable_x64(True):
      update = jax.jit(tx.update)
      for rows, want in zip(
        steps, oracles.excess_mtl_updates(steps, 0.5, warmup), strict=True
      ):
        out, state = update({"w": jnp.asarray(rows)}, state)
        gram_cases.assert_close(np.asarray(out["w"]), want, rows, 1e-6)


# The state's float32 EMAs bound the agreement to about 1e-7.
@pytest.mark.parametrize("name", ["excess_mtl", "excess_mtl_warmup"])
def test_matches_torchjd_over_steps(name):
  gram_cases.assert_matches_torchjd_over_steps(
    name, osgd_jax.excess_mtl, rtol=1e-6
  )


def test_options_are_checked_with_a_fix():
  with pytest.raises(ValueError, match=r"n_warmup_steps must be an int"):
    osgd_jax.excess_mtl(n_warmup_steps=-1, num_exits=3)
