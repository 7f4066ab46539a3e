"""GradDrop: per coordinate, one sign kept with its purity's probability."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import osgd_jax


def test_graddrop_keeps_a_sign_with_its_purity():
  # 20000 copies of one coordinate (a, −b) with a = 3, b = 1: P = ¾, so the
  # positive value is kept with probability ¾, the negative with ¼.
  tx = osgd_jax.graddrop(seed=1, num_exits=2)
  g = {"w": jnp.asarray(np.tile([[3.0], [-1.0]], (1, 20000)), jnp.float32)}
  out, _ = jax.jit(tx.update)(g, tx.init({"w": jnp.zeros(20000)}))
  values, counts = np.unique(np.asarray(out["w"]), return_counts=True)
  assert values.tolist() == [-1.0, 3.0]
  np.testing.assert_allclose(counts / 20000, [0.25, 0.75], atol=0.015)
  # Agreeing signs pass whole; leak 1 keeps everything.
  tx = osgd_jax.graddrop(leak=[1.0, 1.0], num_exits=2)
  out, _ = tx.update(g, tx.init({"w": jnp.zeros(20000)}))
  np.testing.assert_allclose(out["w"], 2.0)


def test_options_are_checked_with_a_fix():
  with pytest.raises(ValueError, match=r"leak must be 3 numbers in \[0, 1\]"):
    osgd_jax.graddrop(leak=[0.5, 2.0, 0.0], num_exits=3)
