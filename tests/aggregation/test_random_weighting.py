"""Random weighting: a softmax of standard normal draws, by its distribution."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from osgd_jax import weightings

K = 4


def test_random_weighting_is_a_softmax_of_standard_normals():
  # log w_i − log w_j = z_i − z_j ~ N(0, 2); weights positive, summing to 1.
  keys = jax.random.split(jax.random.key(0), 4000)
  w = np.asarray(
    jax.jit(
      jax.vmap(lambda key: weightings.random_weighting(jnp.eye(K), key=key))
    )(keys)
  )
  assert np.all(w > 0)
  np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-5)
  diff = np.log(w[:, 0]) - np.log(w[:, 1:]).T
  assert abs(diff.mean()) < 0.1 and abs(diff.var() - 2.0) < 0.15, (
    diff.mean(),
    diff.var(),
  )
  # Exchangeable: every exit is the heaviest about 1/K of the time.
  share = np.bincount(w.argmax(axis=1), minlength=K) / len(w)
  np.testing.assert_allclose(share, 1.0 / K, atol=0.03)
