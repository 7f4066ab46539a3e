"""Hypothesis properties of the OSGD projection (docs/design.md, "The maths")."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st

import osgd_jax

# Shapes are drawn from a small fixed set so that each jitted update compiles
# a bounded number of times across examples.
LEAF_SHAPES = [(6,), (3, 4), ()]


@functools.lru_cache(maxsize=None)
def _update(method, granularity, order=None):
  """A jitted osgd update for stacked trees of any K (one trace per K)."""

  def update(grads):
    k = jax.tree.leaves(grads)[0].shape[0]
    tx = osgd_jax.osgd(method=method, granularity=granularity, order=order,
                       num_exits=k)
    return tx.update(grads, tx.init(jax.tree.map(lambda g: g[0], grads)))[0]

  return jax.jit(update)


def _rows(seed, k, scale_exp=0.0, shapes=LEAF_SHAPES):
  rng = np.random.default_rng(seed)
  return {f"p{i}": (rng.normal(size=(k,) + s) * 10.0 ** scale_exp)
          .astype(np.float32) for i, s in enumerate(shapes)}


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(tree[n], np.float64))
                         for n in sorted(tree)])


methods = st.sampled_from(["gram", "sequential"])
granularities = st.sampled_from(["leaf", "global"])
seeds = st.integers(0, 2**31 - 1)
common = settings(max_examples=25, deadline=None)


def _components(grads, k, method, granularity):
  """ĝ_j = u(g_1..g_j) − u(g_1..g_{j−1}): Gram–Schmidt works on prefixes."""
  update = _update(method, granularity)
  prefix = lambda j: _flat(update({n: g[:j] for n, g in grads.items()}))
  sums = [np.zeros_like(_flat({n: g[0] for n, g in grads.items()}))]
  sums += [prefix(j) for j in range(1, k + 1)]
  return [b - a for a, b in zip(sums, sums[1:])]


@common
@given(seeds, st.integers(2, 4), methods)
def test_components_are_mutually_orthogonal(seed, k, method):
  # Global granularity: the components live in one space, so their pairwise
  # inner products are well defined over the whole vector.
  grads = _rows(seed, k, shapes=[(12,), (2, 5)])
  comps = _components(grads, k, method, "global")
  for i in range(k):
    for j in range(i):
      cos = comps[i] @ comps[j] / (
          np.linalg.norm(comps[i]) * np.linalg.norm(comps[j]) + 1e-30)
      assert abs(cos) < 1e-3, (i, j, cos)


@common
@given(seeds, st.integers(1, 5), methods, granularities)
def test_exit_one_passes_unchanged(seed, k, method, granularity):
  grads = _rows(seed, k)
  comps = _components(grads, 1, method, granularity)
  np.testing.assert_allclose(comps[0], _flat({n: g[0] for n, g in grads.items()}),
                             rtol=1e-6)
  # Every later component is orthogonal to g_1, hence so is u − g_1.
  if granularity == "global":
    u = _flat(_update(method, granularity)(grads))
    g1 = comps[0]
    assert abs((u - g1) @ g1) <= 1e-4 * np.linalg.norm(u - g1) * np.linalg.norm(g1) + 1e-6


@common
@given(seeds, st.integers(1, 6), methods, granularities,
       st.floats(-6, 6))
def test_orthogonal_inputs_give_the_plain_sum(seed, k, method, granularity, exp):
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.normal(size=(12, k)))
  scales = 10.0 ** (exp + rng.uniform(-2, 2, size=k))
  rows = (q.T * scales[:, None]).astype(np.float32)
  out = _update(method, granularity)({"w": rows.reshape(k, 3, 4)})
  np.testing.assert_allclose(np.ravel(out["w"]), rows.sum(0),
                             rtol=1e-4, atol=1e-5 * np.abs(rows).max())


@common
@given(seeds, methods, granularities, st.floats(-8, 8))
def test_single_exit_is_the_identity(seed, method, granularity, exp):
  grads = _rows(seed, 1, exp)
  out = _update(method, granularity)(grads)
  for name, g in grads.items():
    np.testing.assert_array_equal(out[name], g[0])


@common
@given(seeds, st.integers(1, 5), methods, granularities,
       st.floats(-3, 3))
def test_positively_homogeneous(seed, k, method, granularity, log_c):
  grads = _rows(seed, k)
  c = np.float32(10.0 ** log_c)
  update = _update(method, granularity)
  scaled = _flat(update({n: g * c for n, g in grads.items()}))
  base = _flat(update(grads))
  np.testing.assert_allclose(scaled, c * base, rtol=2e-4,
                             atol=1e-5 * c * np.abs(base).max())


@common
@given(seeds, st.permutations(range(4)), methods, granularities)
def test_order_equals_permuting_the_input(seed, perm, method, granularity):
  grads = _rows(seed, 4)
  perm = tuple(perm)
  ordered = _flat(_update(method, granularity, perm)(grads))
  permuted = _flat(_update(method, granularity)(
      {n: g[np.asarray(perm)] for n, g in grads.items()}))
  np.testing.assert_allclose(ordered, permuted, rtol=1e-5,
                             atol=1e-5 * np.abs(permuted).max())


@common
@given(seeds, st.integers(2, 5), granularities)
def test_gram_matches_sequential_when_well_conditioned(seed, k, granularity):
  # Leaves with more dimensions than exits, drawn at random, are well
  # conditioned; check it rather than assume it.
  grads = _rows(seed, k, shapes=[(16,), (4, 5)])
  for g in grads.values():
    rows = g.reshape(k, -1).astype(np.float64)
    assert np.linalg.cond(rows) < 1e3
  gram = _flat(_update("gram", granularity)(grads))
  seq = _flat(_update("sequential", granularity)(grads))
  np.testing.assert_allclose(gram, seq, rtol=1e-4, atol=1e-4 * np.abs(seq).max())
