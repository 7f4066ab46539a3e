"""The exact powers of two that keep Gram matrices in range (``gram.py``).

A leaf is scaled by ``2^-e`` before it is contracted, with ``e`` the
exponent of its largest magnitude, and scaled quantities are brought back by
``2^e``. The exponents and powers are built from float bits; here they are
checked against NumPy's ``frexp`` and ``ldexp`` in float64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jaxpr_walk import inputs_reached

from osgd_jax import gram

# Normal float32 magnitudes: XLA:CPU flushes subnormals to zero.
_NORMAL = st.floats(
  min_value=float(np.finfo(np.float32).tiny),
  max_value=float(np.finfo(np.float32).max),
  width=32,
)


def _numpy_exponents(largest):
  """``e`` with ``2^(e-1) ≤ x < 2^e``, 0 for 0 or non-finite, within ±125."""
  largest = np.asarray(largest, np.float64)
  _, exponents = np.frexp(np.where(np.isfinite(largest), largest, 0.0))
  return np.clip(exponents, -125, 125)


_scale_exponents = jax.jit(gram.scale_exponents)


@settings(max_examples=40, deadline=None)
@given(
  st.lists(
    st.lists(_NORMAL | st.just(0.0), min_size=1, max_size=3),
    min_size=1,
    max_size=5,
  ),
  st.data(),
)
def test_scale_exponents_are_numpys_frexp_of_the_largest_magnitude(rows, data):
  signs = data.draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=3))
  leaves = [
    np.asarray(row, np.float32) * np.float32(signs[i % len(signs)])
    for i, row in enumerate(rows)
  ]
  got = _scale_exponents([jnp.asarray(leaf) for leaf in leaves])
  expected = _numpy_exponents([np.max(np.abs(leaf)) for leaf in leaves])
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(got, expected)


def test_scale_exponents_of_edge_values():
  values = np.asarray(
    [0.0, 1.0, 0.5, 2.0**-126, 2.0**125, 2.0**126, 3e38, np.inf, -np.inf],
    np.float32,
  )
  values = np.append(values, np.nan).astype(np.float32)
  got = gram.scale_exponents([jnp.asarray([v]) for v in values])
  # 2^-126 and 2^126 are clipped to ±125; 0, ±inf and NaN scale nothing.
  np.testing.assert_array_equal(got, [0, 1, 0, -125, 125, 125, 125, 0, 0, 0])
  # A float64 leaf beyond float32's range scales nothing either.
  with jax.enable_x64(True):
    huge = gram.scale_exponents([jnp.asarray([1e300], jnp.float64)])
  np.testing.assert_array_equal(huge, [0])


@pytest.mark.parametrize(
  ("dtype", "low", "high"),
  [
    (jnp.float32, -126, 127),
    (jnp.float64, -126, 126),
    (jnp.bfloat16, -126, 127),
    # Beyond float16's range, 2^16 and up overflow to inf, as the float64
    # value cast to float16 does.
    (jnp.float16, -14, 15),
  ],
)
def test_powers_of_two_are_exact_in_every_dtype(dtype, low, high):
  exponents = np.arange(-126, 127)
  with jax.enable_x64(dtype == jnp.float64):
    ones = jnp.ones(exponents.shape, dtype)
    got = jax.jit(gram.unscale, static_argnums=2)(ones, exponents, 1)
    assert got.dtype == dtype
    got = np.asarray(got, np.float64)
  expected = np.ldexp(1.0, exponents)
  normal = (exponents >= low) & (exponents <= high)
  np.testing.assert_array_equal(got[normal], expected[normal])
  assert np.all(np.isinf(got[exponents > high]))
  if dtype == jnp.float16:  # below its smallest subnormal, 2^-24
    assert np.all(got[exponents < -25] == 0)


def test_scale_down_divides_each_leaf_by_its_own_power_of_two():
  leaves = [
    np.asarray([[3.0, -1.5]], np.float32),
    np.asarray([2.0**100], np.float32),
  ]
  exponents = gram.scale_exponents([jnp.asarray(leaf) for leaf in leaves])
  got = gram.scale_down(
    [jnp.asarray(leaf) for leaf in leaves], exponents, jnp.float32
  )
  for leaf, exponent, scaled in zip(leaves, exponents, got, strict=True):
    np.testing.assert_array_equal(
      scaled, np.ldexp(leaf.astype(np.float64), -int(exponent))
    )
    assert np.max(np.abs(scaled)) < 1.0 <= 2 * np.max(np.abs(scaled))


@settings(max_examples=20, deadline=None)
@given(
  scales=st.lists(st.floats(-60, 60), min_size=1, max_size=4),
  seed=st.integers(0, 2**16),
)
def test_scale_each_is_scale_down_with_each_leafs_own_exponent(scales, seed):
  """Same values; and a scaled leaf is computed from its own leaf alone.

  One exponent vector for all leaves would make every scaled copy wait for
  every leaf's maximum, and XLA then held all the scaled copies of a
  stacked step at once (benchmarks/RESULTS.md, 2026-12-07).
  """
  rng = np.random.default_rng(seed)
  leaves = [
    jnp.asarray(rng.normal(size=(3, 2 + i)) * 2.0**scale, jnp.float32)
    for i, scale in enumerate(scales)
  ]
  scaled, exponents = gram.scale_each(leaves, jnp.float32)
  expected_exponents = gram.scale_exponents(leaves)
  np.testing.assert_array_equal(exponents, expected_exponents)
  np.testing.assert_array_equal(
    jnp.stack(gram.leaf_exponents(leaves)), expected_exponents
  )
  expected = gram.scale_down(leaves, expected_exponents, jnp.float32)
  for got, want in zip(scaled, expected, strict=True):
    np.testing.assert_array_equal(got, want)
  closed = jax.make_jaxpr(lambda ls: gram.scale_each(ls, jnp.float32))(leaves)
  for i in range(len(leaves)):
    assert inputs_reached(closed.jaxpr, closed.jaxpr.outvars[i]) == {i}
