"""The CPU Gram matrices (native kernel, or XLA flat views) against float64 NumPy.

On CPU, ``osgd`` forms the Gram matrices of its leaves with ``cpu_gram``:
all of them in one call of the native kernel (``osgd_jax/csrc/gram_cpu.cc``)
when it is built, else the flat view (blocks when large) for leaves where it
pays. Both paths must give the plain contraction's Gram matrices (to
rounding), stay differentiable and batchable, and feed OSGD the same update.
Every test of a path runs on both (``path`` fixture). The sharded cases are
in tests/test_sharding.py; building and loading in tests/test_native.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import osgd_jax
from osgd_jax import cpu_gram, native, orthogonalize

from numpy_oracles import osgd_direction


@pytest.fixture(params=["native", "xla"])
def path(request, monkeypatch):
  """Runs a test on the native kernel, then on XLA's flat views."""
  if request.param == "native":
    assert native.available(), (
        "the native CPU kernel did not build; the test machine needs a C++"
        " compiler (see osgd_jax/native.py)")
  else:
    monkeypatch.setattr(cpu_gram, "uses_native",
                        lambda dtype, num_exits: False)
  # Traces are cached by function; a path must not reuse the other's.
  jax.clear_caches()
  yield request.param
  jax.clear_caches()


def _block_width(k, itemsize=4):
  """Elements per row of one block of K rows (XLA path)."""
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
  if shape[0] > 2:
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


@pytest.mark.parametrize("shape", [
    (3, 33 * _block_width(3)),          # XLA: whole blocks only
    (4, 33 * _block_width(4) + 1234),   # XLA: a partial last block
    (8, 700, 400),                      # K = 8, two axes; native: threads
    (2, 3, 3, 128, 1000),               # a conv kernel's four axes
    (2, 3, 3, 64, 480),                 # the same, smaller
    (3, 1000),                          # a small vector
    (5, 8193),                          # native: odd K, chunks with tails
    (1, 7),                             # K = 1, shorter than one SIMD vector
    (4,),                               # a scalar parameter's stacked leaf
])
def test_matches_float64_oracle(path, shape):
  del path
  leaf = _leaf(shape)
  _check_gram(jax.jit(cpu_gram.gram, static_argnums=1)(leaf, jnp.float32),
              leaf)


@pytest.mark.parametrize("num_exits", [1, 2, 3, 4, 5, 7, 8, 13, 16])
def test_many_leaves_in_one_call_match_the_oracle(path, num_exits):
  """Every K blocks its rows differently (4+4, 3+2, 4+3+3+3, ...).

  Column counts end their last tile of 64 in each way a block's loop can:
  whole pairs of SIMD vectors (144), one vector and a scalar tail (75 = 64 +
  8 + 3), a scalar tail only (7, 165 = 128 + 2·16 + 5), many tiles (70001).
  """
  del path
  shapes = [(num_exits,), (num_exits, 7), (num_exits, 33, 5), (num_exits, 75),
            (num_exits, 3, 3, 4, 4), (num_exits, 70001)]
  leaves = [_leaf(s, seed=i) for i, s in enumerate(shapes)]
  got = jax.jit(cpu_gram.grams, static_argnums=1)(leaves, jnp.float32)
  assert got.shape == (len(leaves), num_exits, num_exits)
  for gram, leaf in zip(got, leaves):
    _check_gram(gram, leaf)
    np.testing.assert_array_equal(gram, np.asarray(gram).T)  # symmetric


def test_multi_threaded_sums_equal_one_thread(path):
  """A leaf large enough to be split over the pool, next to its pieces."""
  del path
  leaf = _leaf((4, 600_001), seed=5)
  whole = cpu_gram.gram(leaf, jnp.float32)
  pieces = cpu_gram.grams([leaf[:, :8192], leaf[:, 8192:]], jnp.float32)
  _check_gram(whole, leaf)
  np.testing.assert_allclose(whole, pieces.sum(axis=0), rtol=1e-6)


def test_gram_matrices_sends_the_leaves_that_pay_to_one_call(monkeypatch):
  calls = []
  real = cpu_gram.grams
  monkeypatch.setattr(cpu_gram, "grams", lambda leaves, dtype: calls.append(
      [leaf.shape for leaf in leaves]) or real(leaves, dtype))
  large = _leaf((3, _blocked_size(3)))        # one axis, over MIN_BYTES
  small = _leaf((3, _blocked_size(3) - 1))    # one axis, under it
  matrix = _leaf((3, 40, 30))                 # several axes: the flat view
  leaves = [large, small, matrix]
  for native_on, expected in ((True, [[large.shape, small.shape,
                                        matrix.shape]]),
                              (False, [[large.shape, matrix.shape]])):
    calls.clear()
    monkeypatch.setattr(cpu_gram, "uses_native", lambda dtype, num_exits, on=native_on: on)
    got = orthogonalize.gram_matrices(leaves, jnp.float32)
    for gram, leaf in zip(got, leaves):  # in the order of the leaves
      _check_gram(gram, leaf)
    assert calls == expected, native_on


def test_bfloat16_accumulates_in_float32(path):
  del path
  leaf = _leaf((3, _blocked_size(3, itemsize=2) + 5), dtype=jnp.bfloat16)
  got = cpu_gram.gram(leaf, jnp.float32)
  assert got.dtype == jnp.float32
  # XLA:CPU's bf16 dots accumulate less tightly than its f32 ones; the plain
  # contraction's error here is 4e-6 of the bound too.
  _check_gram(got, leaf.astype(jnp.float32), rtol=2e-5)


def test_float64_under_x64(path):
  del path
  with jax.enable_x64(True):
    leaves = [jnp.asarray(_leaf((3, _blocked_size(3, itemsize=8) + 7)),
                          jnp.float64),
              jnp.asarray(_leaf((3, 5, 7), seed=1), jnp.float64)]
    got = jax.jit(cpu_gram.grams, static_argnums=1)(leaves, jnp.float64)
    assert got.dtype == jnp.float64
    for gram, leaf in zip(got, leaves):
      _check_gram(gram, leaf, rtol=1e-13)


@pytest.mark.parametrize("shape", [(3, 40, 30), (3, _blocked_size(3) + 11)])
def test_gradient_equals_the_plain_contractions(path, shape):
  del path
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


def test_vmap_over_a_batch_of_leaves(path):
  del path
  leaves = jnp.stack([_leaf((3, 40, 30), seed=s) for s in range(2)])
  other = _leaf((3, 9), seed=7)  # not batched: broadcast over the batch
  got = jax.vmap(lambda x: cpu_gram.grams([x, other], jnp.float32))(leaves)
  assert got.shape == (2, 2, 3, 3)
  for i in range(2):
    _check_gram(got[i, 0], leaves[i])
    _check_gram(got[i, 1], other)


@pytest.mark.parametrize("shape", [(4, 3, 3, 16, 32), (4, 1000, 600), (4, 9)])
def test_osgd_through_the_kernel_matches_the_oracle(path, shape):
  del path
  leaf = _leaf(shape)
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


def test_native_kernel_runs_in_the_compiled_update():
  """Guards the dispatch: OSGD on CPU is one custom call for all leaves."""
  assert native.available()
  params = {"a": jnp.zeros((5, 3)), "b": jnp.zeros(4), "c": jnp.zeros(())}
  grads = jax.tree.map(lambda p: jnp.ones((3,) + p.shape), params)
  tx = osgd_jax.osgd()
  text = jax.jit(tx.update).lower(grads, tx.init(params), params).compile(
  ).as_text()
  assert text.count(native.TARGETS["float32"][0]) == 1, text


def test_bad_leaves_are_refused_by_name():
  with pytest.raises(ValueError, match="at least one stacked leaf"):
    cpu_gram.grams([], jnp.float32)
  with pytest.raises(ValueError, match=r"leaf 0 has shape \(\)"):
    cpu_gram.gram(jnp.zeros(()), jnp.float32)
  with pytest.raises(ValueError, match=r"leaf 1 has K=2"):
    cpu_gram.grams([jnp.zeros((3, 4)), jnp.zeros((2, 4))], jnp.float32)


def test_empty_leaf_has_a_zero_gram(path):
  del path
  got = cpu_gram.grams([jnp.zeros((3, 0, 5)), _leaf((3, 4))], jnp.float32)
  np.testing.assert_array_equal(got[0], np.zeros((3, 3)))
  _check_gram(got[1], _leaf((3, 4)))
