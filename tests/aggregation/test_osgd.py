"""OSGD against a float64 NumPy Gram–Schmidt oracle, its properties, errors.

The transformation is compared with tests/numpy_oracles.py on random and
degenerate trees, both methods and both granularities, within the error
bound of float32 Gram–Schmidt; the weighting in x64; then the projection's
properties are checked with hypothesis (docs/design.md, "The maths"), and
the options and ``osgd_sgd``'s chain against their definitions.
"""

from __future__ import annotations

import functools
import itertools

import gram_cases
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import stacked_cases
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy_oracles import gram_schmidt_components, osgd_direction

import osgd_jax
from osgd_jax import weightings
from osgd_jax.orthogonalize import DEFAULT_TOL

METHODS = ("gram", "sequential")
GRANULARITIES = ("leaf", "global")
SHAPES = stacked_cases.SHAPES
CASES = {
  case: stacked_cases.CASES[case]
  for case in ("random", "correlated", "collinear", "zero_row", "mixed_scale")
}
EPS32 = float(np.finfo(np.float32).eps)
_apply = stacked_cases.apply_osgd
_stacked = stacked_cases.stacked_with


def _error_bound(rows, method, tol=DEFAULT_TOL, order=None):
  """Forward-error bound for float32 Gram–Schmidt, relative to Σ_k ‖g_k‖.

  A kept component with relative squared norm p = ‖ĝ_k‖²/‖g_k‖² is computed
  to about eps/√p by modified Gram–Schmidt (cond(G)) and to eps/p by the Gram
  form (cond(M) = cond(G)²); see docs/design.md, "The maths". Nearly
  degenerate components are therefore inherently inaccurate, and the bound
  says so.
  """
  comps = gram_schmidt_components(rows, tol, order)
  in_sq = np.sum(rows**2, axis=1)
  kept = np.sum(comps**2, axis=1)
  p = kept[kept > 0] / in_sq[kept > 0]
  p_min = p.min() if p.size else 1.0
  amplification = 1 / p_min if method == "gram" else 1 / np.sqrt(p_min)
  return 1e-5 + 50 * EPS32 * amplification


def _assert_close_to_oracle(
  out, expected, leaves, granularity, method, order=None
):
  names = list(SHAPES)
  flats = [np.asarray(x, np.float64).reshape(len(x), -1) for x in leaves]
  if granularity == "global":
    flats = [np.concatenate(flats, axis=1)]
    got = [np.concatenate([np.ravel(out[n]) for n in names])]
    expected = [np.concatenate([np.ravel(r) for r in expected])]
  else:
    got = [np.ravel(out[n]) for n in names]
    expected = [np.ravel(r) for r in expected]
  for rows, g, ref in zip(flats, got, expected, strict=True):
    scale = np.linalg.norm(rows, axis=1).sum()
    err = np.max(np.abs(np.asarray(g, np.float64) - ref), initial=0.0)
    bound = _error_bound(rows, method, order=order)
    assert err <= bound * scale, (err / max(scale, 1e-300), bound)


# --- the transformation against the oracle ------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_matches_float64_oracle(case, method, granularity):
  # K=6 exceeds the bias leaf's 5 dimensions and the scalar leaf's one, so
  # every case also has rank-deficient leaves.
  k = 6
  make_rows = CASES[case]
  rng = np.random.default_rng([sorted(CASES).index(case), k])
  grads = _stacked(rng, k, make_rows)
  params = {n: jnp.zeros(s) for n, s in SHAPES.items()}
  out, state = _apply(grads, params, method=method, granularity=granularity)
  leaves = [grads[n] for n in SHAPES]
  expected = osgd_direction(leaves, tol=DEFAULT_TOL, granularity=granularity)
  _assert_close_to_oracle(out, expected, leaves, granularity, method)
  for leaf in jax.tree.leaves((out, state)):
    assert np.all(np.isfinite(leaf))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_rescale_matches_oracle(method, granularity):
  rng = np.random.default_rng(1)
  grads = _stacked(rng, 4, stacked_cases.correlated)
  out, _ = _apply(grads, method=method, granularity=granularity, rescale=True)
  leaves = [grads[n] for n in SHAPES]
  expected = osgd_direction(
    leaves, tol=DEFAULT_TOL, granularity=granularity, rescale=True
  )
  _assert_close_to_oracle(out, expected, leaves, granularity, method)


@pytest.mark.parametrize("method", METHODS)
def test_rescale_keeps_each_component_norm(method):
  # With two exits, u = g1 + ĝ2·‖g2‖/‖ĝ2‖, so ‖u − g1‖ = ‖g2‖.
  rng = np.random.default_rng(2)
  g = rng.normal(size=(2, 50)).astype(np.float32)
  g[1] += 3 * g[0]
  out, _ = _apply({"w": g}, method=method, rescale=True)
  np.testing.assert_allclose(
    np.linalg.norm(out["w"] - g[0]), np.linalg.norm(g[1]), rtol=1e-4
  )


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_order_matches_oracle(method, granularity):
  rng = np.random.default_rng(3)
  grads = _stacked(rng, 5, stacked_cases.correlated)
  order = (3, 0, 4, 2, 1)
  out, _ = _apply(grads, method=method, granularity=granularity, order=order)
  leaves = [grads[n] for n in SHAPES]
  expected = osgd_direction(
    leaves, tol=DEFAULT_TOL, granularity=granularity, order=order
  )
  _assert_close_to_oracle(out, expected, leaves, granularity, method, order)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_all_zero_and_unreached_leaves_give_no_nan(method, granularity):
  grads = {
    "dead": np.zeros((3, 4, 2), np.float32),
    "head2": np.stack([np.zeros(3), np.ones(3), np.zeros(3)]).astype(
      np.float32
    ),
    "trunk": np.arange(9, dtype=np.float32).reshape(3, 3) + 1.0,
  }
  out, state = _apply(grads, method=method, granularity=granularity)
  np.testing.assert_array_equal(out["dead"], 0.0)
  if granularity == "leaf":
    # Only exit 2 reaches head2: its gradient passes unchanged.
    np.testing.assert_allclose(out["head2"], np.ones(3))
    # Exit 1 reaches neither dead (8 params) nor head2 (3 of 14).
    np.testing.assert_allclose(state.degenerate_fraction[0], 11 / 14, rtol=1e-6)
  for leaf in jax.tree.leaves((out, state)):
    assert np.all(np.isfinite(leaf))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("method", METHODS)
def test_low_precision_is_computed_in_float32(dtype, method):
  rng = np.random.default_rng(4)
  g32 = rng.normal(size=(3, 64)).astype(np.float32)
  low = jnp.asarray(g32, dtype)
  out, state = _apply({"w": low}, method=method)
  assert out["w"].dtype == dtype
  assert state.exit_norms.dtype == jnp.float32
  # Same answer as the float32 computation on the (already rounded) inputs, up
  # to one rounding of the output.
  ref = osgd_direction([np.asarray(low, np.float32)], tol=DEFAULT_TOL)[0]
  eps = float(jnp.finfo(dtype).eps)
  np.testing.assert_allclose(
    np.asarray(out["w"], np.float32), ref, atol=4 * eps * np.abs(ref).max()
  )


@pytest.mark.parametrize("method", METHODS)
def test_float64_under_x64(method):
  rng = np.random.default_rng(5)
  g = rng.normal(size=(4, 30))
  g[3] = g[0] + 1e-6 * rng.normal(size=30)  # tiny residual, resolvable in f64
  with jax.enable_x64(True):
    out, _ = _apply({"w": jnp.asarray(g)}, method=method, tol=1e-14)
    assert out["w"].dtype == jnp.float64
    ref = osgd_direction([g], tol=1e-14)[0]
    np.testing.assert_allclose(np.asarray(out["w"]), ref, rtol=0, atol=1e-7)


def test_diagnostics_match_definitions():
  rng = np.random.default_rng(6)
  grads = _stacked(rng, 3, stacked_cases.random)
  grads["bias"][2] = 0.0
  _, state = _apply(grads, params=None)
  leaves = [np.asarray(grads[n], np.float64).reshape(3, -1) for n in SHAPES]
  flat = np.concatenate(leaves, 1)
  np.testing.assert_allclose(
    state.exit_norms, np.linalg.norm(flat, axis=1), rtol=1e-5
  )
  comps = np.concatenate(
    [gram_schmidt_components(x, DEFAULT_TOL) for x in leaves], 1
  )
  np.testing.assert_allclose(
    state.projected_norms, np.linalg.norm(comps, axis=1), rtol=1e-5
  )
  norms = np.linalg.norm(flat, axis=1)
  np.testing.assert_allclose(
    state.cosine, flat @ flat.T / np.outer(norms, norms), rtol=1e-5
  )
  # The state's groups follow the tree's leaf order (dict keys sorted).
  per_leaf_sq = [
    (
      gram_schmidt_components(leaves[list(SHAPES).index(n)], DEFAULT_TOL) ** 2
    ).sum(axis=1)
    for n in sorted(SHAPES)
  ]
  np.testing.assert_allclose(
    state.projected_sq_norms, per_leaf_sq, rtol=1e-5, atol=1e-6
  )
  # Dropped: exit 3 on the zeroed bias, and exits 2 and 3 on the scalar leaf,
  # whose one-dimensional space exit 1 already spans.
  dropped = sum(
    x.shape[1]
    * (np.linalg.norm(gram_schmidt_components(x, DEFAULT_TOL), axis=1) == 0)
    for x in leaves
  )
  np.testing.assert_allclose(dropped, [0, 1, 6])
  np.testing.assert_allclose(state.degenerate_fraction, dropped / 30, atol=1e-7)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_weights_give_the_update(method, granularity):
  # With more parameters than exits the rows are independent, so the weights
  # with u = Σ_k w_k g_k are unique: the oracle's least-squares solution.
  rng = np.random.default_rng(8)
  g = rng.normal(size=(4, 40))
  g[2] += 2.0 * g[0]
  out, state = _apply(
    {"w": jnp.asarray(g, jnp.float32)}, method=method, granularity=granularity
  )
  u = osgd_direction([g], tol=DEFAULT_TOL)[0]
  weights = np.linalg.lstsq(g.T, u, rcond=None)[0]
  np.testing.assert_allclose(state.weights, weights, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out["w"], u, rtol=1e-4, atol=1e-5)


def test_diagnostics_are_found_by_name():
  rng = np.random.default_rng(7)
  grads = _stacked(rng, 3, stacked_cases.random)
  _, state = _apply(grads)
  tx = optax.chain(osgd_jax.osgd(num_exits=3), optax.sgd(0.1))
  _, chained = tx.update(grads, tx.init(jax.tree.map(lambda g: g[0], grads)))
  for name in (
    "weights",
    "exit_norms",
    "projected_norms",
    "cosine",
    "degenerate_fraction",
    "projected_sq_norms",
  ):
    found = optax.tree_utils.tree_get(chained, name)
    np.testing.assert_allclose(found, getattr(state, name), rtol=1e-6)


def test_empty_tree_passes_through():
  out, _ = _apply({})
  assert out == {}


# --- the weighting ------------------------------------------------------------


@pytest.mark.parametrize("order", [None, (2, 0, 3, 1)])
def test_osgd_is_gram_schmidt_then_the_sum(order):
  rows = gram_cases.conflicting_rows(0)
  want = gram_schmidt_components(rows, DEFAULT_TOL, order).sum(axis=0)
  np.testing.assert_allclose(
    gram_cases.weighted_rows(weightings.osgd, rows, order=order),
    want,
    atol=1e-9,
  )


def test_weights_are_in_the_gram_matrix_dtype():
  gram = jnp.eye(3, dtype=jnp.float32)
  assert weightings.osgd(gram).dtype == jnp.float32


# --- properties (docs/design.md, "The maths") ---------------------------------
# Shapes are drawn from a small fixed set so that each jitted update compiles
# a bounded number of times across examples.

LEAF_SHAPES = [(6,), (3, 4), ()]


@functools.cache
def _update(method, granularity, order=None):
  """A jitted osgd update for stacked trees of any K (one trace per K)."""

  def update(grads):
    k = jax.tree.leaves(grads)[0].shape[0]
    tx = osgd_jax.osgd(
      method=method, granularity=granularity, order=order, num_exits=k
    )
    return tx.update(grads, tx.init(jax.tree.map(lambda g: g[0], grads)))[0]

  return jax.jit(update)


def _rows(seed, k, scale_exp=0.0, shapes=LEAF_SHAPES):
  rng = np.random.default_rng(seed)
  return {
    f"p{i}": (rng.normal(size=(k,) + s) * 10.0**scale_exp).astype(np.float32)
    for i, s in enumerate(shapes)
  }


def _flat(tree):
  return np.concatenate(
    [np.ravel(np.asarray(tree[n], np.float64)) for n in sorted(tree)]
  )


methods = st.sampled_from(["gram", "sequential"])
granularities = st.sampled_from(["leaf", "global"])
seeds = st.integers(0, 2**31 - 1)
common = settings(max_examples=25, deadline=None)


def _components(grads, k, method, granularity):
  """ĝ_j = u(g_1..g_j) − u(g_1..g_{j−1}): Gram–Schmidt works on prefixes."""
  update = _update(method, granularity)

  def prefix(j):
    return _flat(update({n: g[:j] for n, g in grads.items()}))

  sums = [np.zeros_like(_flat({n: g[0] for n, g in grads.items()}))]
  sums += [prefix(j) for j in range(1, k + 1)]
  return [b - a for a, b in itertools.pairwise(sums)]


@common
@given(seeds, st.integers(2, 4), methods)
def test_components_are_mutually_orthogonal(seed, k, method):
  # Global granularity: the components live in one space, so their pairwise
  # inner products are well defined over the whole vector.
  grads = _rows(seed, k, shapes=[(12,), (2, 5)])
  comps = _components(grads, k, method, "global")
  for i in range(k):
    for j in range(i):
      cos = (
        comps[i]
        @ comps[j]
        / (np.linalg.norm(comps[i]) * np.linalg.norm(comps[j]) + 1e-30)
      )
      assert abs(cos) < 1e-3, (i, j, cos)


@common
@given(seeds, st.integers(1, 5), methods, granularities)
def test_exit_one_passes_unchanged(seed, k, method, granularity):
  grads = _rows(seed, k)
  comps = _components(grads, 1, method, granularity)
  np.testing.assert_allclose(
    comps[0], _flat({n: g[0] for n, g in grads.items()}), rtol=1e-6
  )
  # Every later component is orthogonal to g_1, hence so is u − g_1.
  if granularity == "global":
    u = _flat(_update(method, granularity)(grads))
    g1 = comps[0]
    assert abs((u - g1) @ g1) <= (
      1e-4 * np.linalg.norm(u - g1) * np.linalg.norm(g1) + 1e-6
    )


@common
@given(seeds, st.integers(1, 6), methods, granularities, st.floats(-6, 6))
def test_orthogonal_inputs_give_the_plain_sum(
  seed, k, method, granularity, exp
):
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.normal(size=(12, k)))
  scales = 10.0 ** (exp + rng.uniform(-2, 2, size=k))
  rows = (q.T * scales[:, None]).astype(np.float32)
  out = _update(method, granularity)({"w": rows.reshape(k, 3, 4)})
  np.testing.assert_allclose(
    np.ravel(out["w"]), rows.sum(0), rtol=1e-4, atol=1e-5 * np.abs(rows).max()
  )


@common
@given(seeds, methods, granularities, st.floats(-8, 8))
def test_single_exit_is_the_identity(seed, method, granularity, exp):
  grads = _rows(seed, 1, exp)
  out = _update(method, granularity)(grads)
  for name, g in grads.items():
    np.testing.assert_array_equal(out[name], g[0])


@common
@given(seeds, st.integers(1, 5), methods, granularities, st.floats(-3, 3))
def test_positively_homogeneous(seed, k, method, granularity, log_c):
  grads = _rows(seed, k)
  c = np.float32(10.0**log_c)
  update = _update(method, granularity)
  scaled = _flat(update({n: g * c for n, g in grads.items()}))
  base = _flat(update(grads))
  np.testing.assert_allclose(
    scaled, c * base, rtol=2e-4, atol=1e-5 * c * np.abs(base).max()
  )


@common
@given(seeds, st.permutations(range(4)), methods, granularities)
def test_order_equals_permuting_the_input(seed, perm, method, granularity):
  grads = _rows(seed, 4)
  perm = tuple(perm)
  ordered = _flat(_update(method, granularity, perm)(grads))
  permuted = _flat(
    _update(method, granularity)(
      {n: g[np.asarray(perm)] for n, g in grads.items()}
    )
  )
  np.testing.assert_allclose(
    ordered, permuted, rtol=1e-5, atol=1e-5 * np.abs(permuted).max()
  )


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
  np.testing.assert_allclose(
    gram, seq, rtol=1e-4, atol=1e-4 * np.abs(seq).max()
  )


# --- options and errors -------------------------------------------------------


@pytest.mark.parametrize("order", [(0, 0, 1), (1, 2, 3), (), ("a", "b")])
def test_error_for_invalid_order(order):
  with pytest.raises(ValueError, match="order"):
    osgd_jax.osgd(order=order)


def test_error_when_order_length_differs_from_k():
  with pytest.raises(ValueError, match=r"K=3.*num_exits=2"):
    _apply({"a": jnp.ones((3, 2))}, order=(1, 0))


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({"granularity": "layer"}, "granularity must be one of"),
    ({"method": "qr"}, "method must be one of"),
    ({"tol": -1.0}, r"osgd: tol must be in \[0, 1\), got -1.0"),
    ({"tol": np.float32(1.0)}, r"osgd: tol must be in \[0, 1\)"),
    ({"num_exits": 0}, "num_exits must be a positive int"),
    ({"num_exits": 2.0}, "num_exits must be a positive int"),
    ({"num_exits": 2, "order": (1, 0, 2)}, "order has 3 entries"),
  ],
)
def test_error_for_bad_options(kwargs, match):
  with pytest.raises(ValueError, match=match):
    osgd_jax.osgd(**{"num_exits": 3, **kwargs})


@pytest.mark.parametrize("factory", [osgd_jax.osgd, osgd_jax.osgd_sgd])
def test_error_without_num_exits_says_why(factory):
  args = (0.1,) if factory is osgd_jax.osgd_sgd else ()
  with pytest.raises(ValueError, match=r"needs num_exits=K.*fixed at init"):
    factory(*args)


# --- osgd_sgd -----------------------------------------------------------------


def test_osgd_sgd_equals_explicit_chain():
  rng = np.random.default_rng(7)
  params = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)}
  ready = osgd_jax.osgd_sgd(
    0.1,
    momentum=0.9,
    nesterov=True,
    weight_decay=1e-2,
    granularity="global",
    num_exits=3,
  )
  explicit = optax.chain(
    osgd_jax.osgd(granularity="global", num_exits=3),
    optax.add_decayed_weights(1e-2),
    optax.trace(decay=0.9, nesterov=True),
    optax.scale_by_learning_rate(0.1),
  )
  s1, s2 = ready.init(params), explicit.init(params)
  for _ in range(3):
    grads = {"w": jnp.asarray(rng.normal(size=(3, 4, 3)), jnp.float32)}
    u1, s1 = ready.update(grads, s1, params)
    u2, s2 = explicit.update(grads, s2, params)
    np.testing.assert_allclose(u1["w"], u2["w"], rtol=1e-6)
    params = optax.apply_updates(params, u1)


@pytest.mark.parametrize("sgd_after", [0, 2, 5])
def test_osgd_sgd_switches_to_the_summed_gradient_after_n_steps(sgd_after):
  # A float64 NumPy oracle of the whole chain: OSGD's direction for the
  # first sgd_after steps, the sum of the exit gradients after, then weight
  # decay and heavy-ball momentum carried across the switch.
  rng = np.random.default_rng(3)
  shapes = {"b": (5,), "w": (4, 5)}
  params = {
    n: jnp.asarray(rng.normal(size=s), jnp.float32) for n, s in shapes.items()
  }
  lr, beta, decay = 0.1, 0.9, 1e-2
  tx = osgd_jax.osgd_sgd(
    lr, momentum=beta, weight_decay=decay, num_exits=3, sgd_after=sgd_after
  )
  state = jax.jit(tx.init)(params)
  update = jax.jit(tx.update)
  ref_params = {n: np.asarray(p, np.float64) for n, p in params.items()}
  trace = {n: np.zeros(s) for n, s in shapes.items()}
  for step in range(4):
    grads = {n: rng.normal(size=(3,) + s) for n, s in shapes.items()}
    grads["w"][1] -= 0.9 * grads["w"][0]  # conflicting exits
    names = sorted(shapes)
    if step < sgd_after:
      directions = dict(
        zip(
          names,
          osgd_direction([grads[n] for n in names], tol=DEFAULT_TOL),
          strict=True,
        )
      )
    else:
      directions = {n: grads[n].sum(0) for n in names}
    for n in names:
      trace[n] = beta * trace[n] + directions[n] + decay * ref_params[n]
      ref_params[n] = ref_params[n] - lr * trace[n]
    updates, state = update(
      {n: jnp.asarray(g, jnp.float32) for n, g in grads.items()}, state, params
    )
    params = optax.apply_updates(params, updates)
    for n in names:
      np.testing.assert_allclose(params[n], ref_params[n], rtol=2e-5, atol=2e-6)
  assert int(state[0].count) == 4
