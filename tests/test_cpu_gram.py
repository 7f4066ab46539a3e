"""The CPU Gram kernel (flat view, blocks when large) against float64 NumPy.

On CPU, ``osgd`` takes ``cpu_gram`` for leaves with several parameter axes
and for stacked leaves over ``cpu_gram.MIN_BYTES``; it must give the plain
contraction's Gram matrix (to rounding) on both of its paths, stay
differentiable and batchable, and feed OSGD the same update. The sharded
cases are in tests/test_sharding.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import osgd_jax
from osgd_jax import cpu_gram, orthogonalize

from numpy_oracles import osgd_direction


def _block_width(k, itemsize=4):
  """Elements per row of one block of K rows."""
  return cpu_gram.BLOCK_BYTES // (itemsize * k)


def _blocked_size(k, itemsize=4):
  """The fewest parameters that make K stacked rows take the blocks."""
  return cpu_gram.MIN_BYTES // (itemsize * k) + 1


def _leaf(shape, seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  leaf = rng.standard_normal(shape).astype(np.float32)
  # Rows of very different scales and one nearly collinear pair: the Gram
  # matrix then spans orders of magnitude, so a lost block would show.
  leaf[0] *= 1e3
  leaf[-1] = 0.5 * leaf[1] + 1e-3 * leaf[-1]
  return jnp.asarray(leaf, dtype)


def _oracle(leaf):
  rows = np.asarray(leaf, np.float64).reshape(leaf.shape[0], -1)
  return rows @ rows.T


def _check_gram(got, leaf, rtol=2e-6):
  want = _oracle(leaf)
  # Relative to each entry's Cauchy–Schwarz bound √(M_ii M_jj).
  bound = np.sqrt(np.outer(np.diag(want), np.diag(want)))
  np.testing.assert_array_less(np.abs(np.asarray(got, np.float64) - want),
                               rtol * bound + 1e-30)


@pytest.mark.parametrize("shape,blocks", [
    ((3, 33 * _block_width(3)), True),          # whole blocks only
    ((4, 33 * _block_width(4) + 1234), True),   # a partial last block
    ((8, 700, 400), True),                      # K = 8, two axes
    ((2, 3, 3, 128, 1000), True),               # a conv kernel's four axes
    ((2, 3, 3, 64, 480), False),                # the same, one flat dot
    ((3, 1000), False),                         # a small vector
])
def test_matches_float64_oracle(shape, blocks):
  leaf = _leaf(shape)
  assert (leaf.nbytes > cpu_gram.MIN_BYTES) == blocks
  _check_gram(jax.jit(cpu_gram.gram, static_argnums=1)(leaf, jnp.float32),
              leaf)


def test_gram_matrix_takes_the_kernel_where_it_pays(monkeypatch):
  calls = []
  real = cpu_gram.gram
  monkeypatch.setattr(cpu_gram, "gram",
                      lambda leaf, dtype: calls.append(leaf.shape) or
                      real(leaf, dtype))
  large = _leaf((3, _blocked_size(3)))        # one axis, over MIN_BYTES
  small = _leaf((3, _blocked_size(3) - 1))    # one axis, under it
  matrix = _leaf((3, 40, 30))                 # several axes: the flat view
  for leaf in (large, small, matrix):
    _check_gram(orthogonalize.gram_matrix(leaf, jnp.float32), leaf)
  assert calls == [large.shape, matrix.shape]


def test_bfloat16_accumulates_in_float32():
  leaf = _leaf((3, _blocked_size(3, itemsize=2) + 5), dtype=jnp.bfloat16)
  got = cpu_gram.gram(leaf, jnp.float32)
  assert got.dtype == jnp.float32
  # XLA:CPU's bf16 dots accumulate less tightly than its f32 ones; the plain
  # contraction's error here is 4e-6 of the bound too.
  _check_gram(got, leaf.astype(jnp.float32), rtol=2e-5)


def test_float64_under_x64():
  with jax.enable_x64(True):
    leaf = jnp.asarray(_leaf((3, _blocked_size(3, itemsize=8) + 7)),
                       jnp.float64)
    got = jax.jit(cpu_gram.gram, static_argnums=1)(leaf, jnp.float64)
    assert got.dtype == jnp.float64
    _check_gram(got, leaf, rtol=1e-13)


@pytest.mark.parametrize("shape", [(3, 40, 30), (3, _blocked_size(3) + 11)])
def test_gradient_equals_the_plain_contractions(shape):
  leaf = _leaf(shape)
  weights = jnp.asarray(np.random.default_rng(3).standard_normal((3, 3)),
                        jnp.float32)

  def plain(x):
    axes = tuple(range(1, x.ndim))
    return jnp.tensordot(x, x, axes=(axes, axes),
                         precision=jax.lax.Precision.HIGHEST)

  kernel = lambda x: cpu_gram.gram(x, jnp.float32)
  loss = lambda gram_fn: lambda x: jnp.sum(weights * gram_fn(x)) / 1e6
  got = jax.jit(jax.grad(loss(kernel)))(leaf)
  want = jax.grad(loss(plain))(leaf)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # Forward mode too: a JVP is what jax.grad transposes.
  tangent = jnp.ones_like(leaf)
  _, got_t = jax.jvp(kernel, (leaf,), (tangent,))
  _, want_t = jax.jvp(plain, (leaf,), (tangent,))
  np.testing.assert_allclose(got_t, want_t, rtol=1e-5)


def test_vmap_over_a_batch_of_leaves():
  leaves = jnp.stack([_leaf((3, 40, 30), seed=s) for s in range(2)])
  got = jax.vmap(lambda x: cpu_gram.gram(x, jnp.float32))(leaves)
  assert got.shape == (2, 3, 3)
  for i in range(2):
    _check_gram(got[i], leaves[i])


@pytest.mark.parametrize("shape", [(4, 3, 3, 16, 32), (4, 1000, 600)])
def test_osgd_through_the_kernel_matches_the_oracle(shape):
  leaf = _leaf(shape)
  assert cpu_gram.worthwhile(leaf)
  params = {"w": jnp.zeros(shape[1:])}
  for method in orthogonalize.METHODS:
    tx = osgd_jax.osgd(method=method)
    out, state = jax.jit(tx.update)({"w": leaf}, tx.init(params), params)
    (want,) = osgd_direction([leaf], tol=osgd_jax.transform.DEFAULT_TOL)
    scale = np.max(np.abs(want))
    np.testing.assert_allclose(np.asarray(out["w"], np.float64) / scale,
                               want / scale, atol=2e-4, err_msg=method)
    # The diagnostics come from the same Gram matrix.
    rows = np.asarray(leaf, np.float64).reshape(shape[0], -1)
    np.testing.assert_allclose(state.exit_norms, np.linalg.norm(rows, axis=1),
                               rtol=1e-5)


def test_empty_or_unstacked_leaf_is_refused():
  with pytest.raises(ValueError, match="non-empty stacked leaf"):
    cpu_gram.gram(jnp.zeros((3,)), jnp.float32)
  with pytest.raises(ValueError, match="non-empty stacked leaf"):
    cpu_gram.gram(jnp.zeros((3, 0, 5)), jnp.float32)
