"""The native CPU LDLᵀ weights against float64 NumPy Gram–Schmidt and XLA.

On CPU, :func:`osgd_jax.orthogonalize.ldl_weights` runs the native kernel
(``osgd_jax/csrc/ldl_cpu.cc``) through :mod:`osgd_jax.cpu_ldl`. It must
give the oracle's direction, agree with the XLA form it replaces (values,
tangents, batching), and fall back to that form where it cannot run.
tests/test_orthogonalize.py runs its own cases on all three forms.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import osgd_jax
from osgd_jax import cpu_ldl, native, orthogonalize

from numpy_oracles import gram_schmidt_components

TOL = 1e-5


@pytest.fixture(autouse=True)
def _kernel_built():
  assert native.available(), "the native CPU kernels did not build"


def _rows(num_exits, n=80, seed=0, kind="random"):
  rng = np.random.default_rng(seed)
  rows = rng.standard_normal((num_exits, n))
  if kind == "degenerate" and num_exits >= 3:
    rows[1] = 0.0                                    # does not reach the leaf
    rows[2] = 2.0 * rows[0]                          # in an earlier span
    rows[-1] = rows[0] - 3.0 * rows[min(3, num_exits - 1) - 1]
  if kind == "scaled":
    rows *= np.logspace(-6, 6, num_exits)[:, None]
  return rows


def _native(gram, rescale, tol=TOL):
  return jax.jit(lambda m: cpu_ldl.ldl_weights(m, tol=tol, rescale=rescale))(
      gram)


@pytest.mark.parametrize("num_exits", [1, 2, 3, 5, 8, 16, 17, 40, 64])
@pytest.mark.parametrize("kind", ["random", "degenerate", "scaled"])
@pytest.mark.parametrize("rescale", [False, True])
def test_float64_weights_give_the_oracle_direction(num_exits, kind, rescale):
  rows = _rows(num_exits, kind=kind)
  with jax.enable_x64(True):
    weights, residual_sq = map(np.asarray, _native(
        jnp.asarray(rows @ rows.T, jnp.float64), rescale))
  want = gram_schmidt_components(rows, tol=TOL, rescale=rescale).sum(axis=0)
  scale = np.abs(rows).max()
  np.testing.assert_allclose(weights @ rows / scale, want / scale, atol=1e-9)
  projected = gram_schmidt_components(rows, tol=TOL)
  np.testing.assert_allclose(residual_sq, (projected ** 2).sum(axis=1),
                             rtol=1e-8, atol=1e-12 * scale ** 2)


@pytest.mark.parametrize("num_exits", [2, 4, 8, 17])
@pytest.mark.parametrize("kind", ["random", "degenerate", "scaled"])
@pytest.mark.parametrize("rescale", [False, True])
def test_float32_matches_the_xla_form(num_exits, kind, rescale):
  rows = _rows(num_exits, kind=kind, seed=num_exits)
  gram = jnp.asarray(rows @ rows.T, jnp.float32)
  got = _native(gram, rescale)
  want = jax.jit(lambda m: orthogonalize.ldl_weights_xla(
      m, tol=TOL, rescale=rescale))(gram)
  assert all(g.dtype == jnp.float32 for g in got)
  # The kernel sums in double, XLA in float32: equal to float32 rounding,
  # relative to each matrix's scale.
  weights_scale = np.abs(np.asarray(want[0])).max()
  np.testing.assert_allclose(got[0], want[0], atol=1e-4 * weights_scale)
  np.testing.assert_allclose(got[1], want[1], rtol=1e-4,
                             atol=1e-5 * float(jnp.abs(gram).max()))


def test_zero_and_nan_matrices():
  zero = jnp.zeros((3, 3), jnp.float32)
  weights, residual_sq = _native(zero, rescale=True)
  np.testing.assert_array_equal(weights, np.zeros(3))
  np.testing.assert_array_equal(residual_sq, np.zeros(3))
  # A non-finite Gram (a NaN gradient) must not come out finite:
  # optax.apply_if_finite relies on the update showing it. Where it shows is
  # the XLA form's.
  nan = jnp.eye(3, dtype=jnp.float32).at[1, 1].set(jnp.nan)
  got = _native(nan, rescale=False)
  want = orthogonalize.ldl_weights_xla(nan, tol=TOL, rescale=False)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(np.isnan(g), np.isnan(w))
  assert np.isnan(np.asarray(got[0])).any()


def test_leading_axes_and_vmap_with_a_batched_tol():
  rng = np.random.default_rng(3)
  rows = rng.standard_normal((2, 3, 4, 30))
  rows[1, 2, 3] = rows[1, 2, 0] + 1e-2 * rows[1, 2, 3]  # residual ~1e-4
  grams = jnp.asarray(np.einsum("abkn,abjn->abkj", rows, rows), jnp.float32)
  whole = _native(grams, rescale=False)
  assert whole[0].shape == whole[1].shape == (2, 3, 4)
  tols = jnp.asarray([[TOL, 0.5, 0.9], [TOL, 1e-6, 1e-2]], jnp.float32)
  batched = jax.jit(jax.vmap(jax.vmap(
      lambda m, t: cpu_ldl.ldl_weights(m, tol=t, rescale=False))))(grams, tols)
  for a in range(2):
    for b in range(3):
      one = _native(grams[a, b], rescale=False, tol=float(tols[a, b]))
      np.testing.assert_array_equal(batched[0][a, b], one[0])
      np.testing.assert_array_equal(batched[1][a, b], one[1])
      if a == 0 and b == 0:
        np.testing.assert_array_equal(whole[0][a, b], one[0])
  # The per-matrix tol matters: 1e-2 drops the nearly dependent exit 4.
  assert batched[1][1, 2, 3] == 0.0 and batched[1][1, 1, 3] > 0.0


@pytest.mark.parametrize("rescale", [False, True])
def test_tangents_and_gradients_are_the_xla_forms(rescale):
  rows = _rows(4, seed=5)
  gram = jnp.asarray(rows @ rows.T, jnp.float32)
  tangent = jnp.asarray(_rows(4, seed=6)[:, :4], jnp.float32)
  tangent = tangent + tangent.T

  def forms(fn):
    jvp = jax.jvp(lambda m: fn(m, tol=TOL, rescale=rescale), (gram,),
                  (tangent,))[1]
    grad = jax.grad(lambda m: (fn(m, tol=TOL, rescale=rescale)[0] ** 2).sum())(
        gram)
    return (*jvp, grad)

  for got, want in zip(forms(cpu_ldl.ldl_weights),
                       forms(orthogonalize.ldl_weights_xla)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_bad_shapes_are_named():
  with pytest.raises(ValueError, match=r"1 <= K <= 64.*\(65, 65\)"):
    cpu_ldl.ldl_weights(jnp.eye(65), tol=TOL, rescale=False)
  with pytest.raises(ValueError, match=r"\(\.\.\., K, K\).*\(3, 4\)"):
    cpu_ldl.ldl_weights(jnp.ones((3, 4)), tol=TOL, rescale=False)


def test_without_the_kernel_it_says_so_and_ldl_weights_falls_back(
    monkeypatch):
  monkeypatch.setattr(native, "available", lambda: False)
  with pytest.raises(RuntimeError, match="native kernel .* unavailable"):
    cpu_ldl.ldl_weights(jnp.eye(3), tol=TOL, rescale=False)
  jax.clear_caches()
  jaxpr = str(jax.make_jaxpr(lambda m: orthogonalize.ldl_weights(
      m, tol=TOL, rescale=False))(jnp.eye(3)))
  assert "ffi_call" not in jaxpr
  jax.clear_caches()


def test_ldl_weights_uses_the_kernel_on_cpu_up_to_64_exits():
  def calls(num_exits):
    jaxpr = str(jax.make_jaxpr(lambda m: orthogonalize.ldl_weights(
        m, tol=TOL, rescale=False))(jnp.eye(num_exits)))
    return jaxpr.count("osgd_jax_ldl_f32")

  assert calls(8) == 1 and calls(64) == 1
  assert calls(65) == 0  # beyond the kernel's bound: XLA's loops


def test_an_osgd_update_makes_one_kernel_call_for_all_leaves():
  rng = np.random.default_rng(7)
  grads = {name: jnp.asarray(rng.standard_normal((4,) + shape), jnp.float32)
           for name, shape in (("a", (30,)), ("b", (5, 6)), ("c", (2, 3, 4)))}
  tx = osgd_jax.osgd()
  state = tx.init(jax.tree.map(lambda g: g[0], grads))
  update = jax.jit(lambda g: tx.update(g, state)[0])
  assert update.lower(grads).compile().as_text().count(
      'custom_call_target="osgd_jax_ldl_f32"') == 1
  # The update is the oracle's, leaf by leaf.
  got = update(grads)
  for name, leaf in grads.items():
    rows = np.asarray(leaf, np.float64).reshape(4, -1)
    want = gram_schmidt_components(
        rows, tol=osgd_jax.transform.DEFAULT_TOL).sum(axis=0)
    np.testing.assert_allclose(np.asarray(got[name]).reshape(-1), want,
                               rtol=1e-4, atol=1e-4)


def test_more_exits_than_the_kernels_take_run_on_xla():
  num_exits = native.MAX_EXITS + 1
  rng = np.random.default_rng(8)
  grads = {"a": jnp.asarray(rng.standard_normal((num_exits, 70)), jnp.float32),
           "b": jnp.asarray(rng.standard_normal((num_exits, 3, 4)),
                            jnp.float32)}
  tx = osgd_jax.osgd()
  state = tx.init(jax.tree.map(lambda g: g[0], grads))
  update = jax.jit(lambda g: tx.update(g, state)[0])
  assert "osgd_jax_" not in update.lower(grads).compile().as_text()
  got = update(grads)  # a native call would fail here, at run time
  for name, leaf in grads.items():
    rows = np.asarray(leaf, np.float64).reshape(num_exits, -1)
    want = gram_schmidt_components(
        rows, tol=osgd_jax.transform.DEFAULT_TOL).sum(axis=0)
    np.testing.assert_allclose(np.asarray(got[name]).reshape(-1), want,
                               rtol=1e-3, atol=1e-3)
