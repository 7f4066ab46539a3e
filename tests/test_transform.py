"""OSGD transform against a float64 NumPy Gram–Schmidt oracle, and its errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import osgd_jax
from osgd_jax.orthogonalize import DEFAULT_TOL
from numpy_oracles import gram_schmidt_components, osgd_direction

METHODS = ("gram", "sequential")
GRANULARITIES = ("leaf", "global")
SHAPES = {"conv": (3, 2, 4), "bias": (5,), "scale": ()}


def _stacked(rng, k, make_rows):
  """A dict of stacked leaves (K, *shape) whose rows come from make_rows."""
  return {name: make_rows(rng, k, int(np.prod(shape))).reshape((k,) + shape)
          .astype(np.float32) for name, shape in SHAPES.items()}


def _random(rng, k, n):
  return rng.normal(size=(k, n))


def _correlated(rng, k, n):
  return rng.normal(size=(1, n)) + 0.2 * rng.normal(size=(k, n))


def _collinear(rng, k, n):
  rows = rng.normal(size=(k, n))
  rows[2] = 1.5 * rows[0] - 0.5 * rows[1]  # in the span of earlier exits
  rows[3] = -2.0 * rows[1]
  return rows


def _zero_row(rng, k, n):
  rows = rng.normal(size=(k, n))
  rows[1] = 0.0  # e.g. a head that exit 2 does not reach
  rows[k - 1] = 0.0
  return rows


def _mixed_scale(rng, k, n):
  return rng.normal(size=(k, n)) * 10.0 ** rng.uniform(-8, 8, size=(k, 1))


CASES = {
    "random": _random,
    "correlated": _correlated,
    "collinear": _collinear,
    "zero_row": _zero_row,
    "mixed_scale": _mixed_scale,
}
EPS32 = float(np.finfo(np.float32).eps)


def _apply(grads, params=None, **options):
  """One jitted osgd update; K defaults to the gradients' leading axis."""
  leaves = jax.tree.leaves(grads)
  if "order" not in options:
    k = np.shape(leaves[0])[:1] if leaves else ()
    options.setdefault("num_exits", k[0] if k and k[0] else 1)
  tx = osgd_jax.osgd(**options)
  like_params = params if params is not None else jax.tree.map(
      lambda g: np.zeros(np.shape(g)[1:]), grads)
  state = tx.init(like_params)
  return jax.jit(tx.update)(grads, state, params)


def _error_bound(rows, method, tol=DEFAULT_TOL, order=None):
  """Forward-error bound for float32 Gram–Schmidt, relative to Σ_k ‖g_k‖.

  A kept component with relative squared norm p = ‖ĝ_k‖²/‖g_k‖² is computed
  to about eps/√p by modified Gram–Schmidt (cond(G)) and to eps/p by the Gram
  form (cond(M) = cond(G)²); see docs/design.md, "The maths". Nearly
  degenerate components are therefore inherently inaccurate, and the bound
  says so.
  """
  comps = gram_schmidt_components(rows, tol, order)
  in_sq = np.sum(rows ** 2, axis=1)
  kept = np.sum(comps ** 2, axis=1)
  p = kept[kept > 0] / in_sq[kept > 0]
  p_min = p.min() if p.size else 1.0
  amplification = 1 / p_min if method == "gram" else 1 / np.sqrt(p_min)
  return 1e-5 + 50 * EPS32 * amplification


def _assert_close_to_oracle(out, expected, leaves, granularity, method,
                            order=None):
  names = list(SHAPES)
  flats = [np.asarray(x, np.float64).reshape(len(x), -1) for x in leaves]
  if granularity == "global":
    flats = [np.concatenate(flats, axis=1)]
    got = [np.concatenate([np.ravel(out[n]) for n in names])]
    expected = [np.concatenate([np.ravel(r) for r in expected])]
  else:
    got = [np.ravel(out[n]) for n in names]
    expected = [np.ravel(r) for r in expected]
  for rows, g, ref in zip(flats, got, expected):
    scale = np.linalg.norm(rows, axis=1).sum()
    err = np.max(np.abs(np.asarray(g, np.float64) - ref), initial=0.0)
    bound = _error_bound(rows, method, order=order)
    assert err <= bound * scale, (err / max(scale, 1e-300), bound)


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
  grads = _stacked(rng, 4, _correlated)
  out, _ = _apply(grads, method=method, granularity=granularity, rescale=True)
  leaves = [grads[n] for n in SHAPES]
  expected = osgd_direction(
      leaves, tol=DEFAULT_TOL, granularity=granularity, rescale=True)
  _assert_close_to_oracle(out, expected, leaves, granularity, method)


@pytest.mark.parametrize("method", METHODS)
def test_rescale_keeps_each_component_norm(method):
  # With two exits, u = g1 + ĝ2·‖g2‖/‖ĝ2‖, so ‖u − g1‖ = ‖g2‖.
  rng = np.random.default_rng(2)
  g = rng.normal(size=(2, 50)).astype(np.float32)
  g[1] += 3 * g[0]
  out, _ = _apply({"w": g}, method=method, rescale=True)
  np.testing.assert_allclose(
      np.linalg.norm(out["w"] - g[0]), np.linalg.norm(g[1]), rtol=1e-4)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_order_matches_oracle(method, granularity):
  rng = np.random.default_rng(3)
  grads = _stacked(rng, 5, _correlated)
  order = (3, 0, 4, 2, 1)
  out, _ = _apply(grads, method=method, granularity=granularity, order=order)
  leaves = [grads[n] for n in SHAPES]
  expected = osgd_direction(
      leaves, tol=DEFAULT_TOL, granularity=granularity, order=order)
  _assert_close_to_oracle(out, expected, leaves, granularity, method, order)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_all_zero_and_unreached_leaves_give_no_nan(method, granularity):
  grads = {
      "dead": np.zeros((3, 4, 2), np.float32),
      "head2": np.stack([np.zeros(3), np.ones(3), np.zeros(3)]).astype(np.float32),
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
      np.asarray(out["w"], np.float32), ref, atol=4 * eps * np.abs(ref).max())


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
  grads = _stacked(rng, 3, _random)
  grads["bias"][2] = 0.0
  _, state = _apply(grads, params=None)
  leaves = [np.asarray(grads[n], np.float64).reshape(3, -1) for n in SHAPES]
  flat = np.concatenate(leaves, 1)
  np.testing.assert_allclose(state.exit_norms, np.linalg.norm(flat, axis=1),
                             rtol=1e-5)
  comps = np.concatenate(
      [gram_schmidt_components(x, DEFAULT_TOL) for x in leaves], 1)
  np.testing.assert_allclose(state.projected_norms, np.linalg.norm(comps, axis=1),
                             rtol=1e-5)
  norms = np.linalg.norm(flat, axis=1)
  np.testing.assert_allclose(state.cosine, flat @ flat.T / np.outer(norms, norms),
                             rtol=1e-5)
  # The state's groups follow the tree's leaf order (dict keys sorted).
  per_leaf_sq = [
      (gram_schmidt_components(leaves[list(SHAPES).index(n)], DEFAULT_TOL)
       ** 2).sum(axis=1) for n in sorted(SHAPES)]
  np.testing.assert_allclose(state.projected_sq_norms, per_leaf_sq, rtol=1e-5,
                             atol=1e-6)
  # Dropped: exit 3 on the zeroed bias, and exits 2 and 3 on the scalar leaf,
  # whose one-dimensional space exit 1 already spans.
  dropped = sum(x.shape[1] * (np.linalg.norm(
      gram_schmidt_components(x, DEFAULT_TOL), axis=1) == 0) for x in leaves)
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
  out, state = _apply({"w": jnp.asarray(g, jnp.float32)}, method=method,
                      granularity=granularity)
  u = osgd_direction([g], tol=DEFAULT_TOL)[0]
  weights = np.linalg.lstsq(g.T, u, rcond=None)[0]
  np.testing.assert_allclose(state.weights, weights, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out["w"], u, rtol=1e-4, atol=1e-5)


def test_diagnostics_are_found_by_name():
  rng = np.random.default_rng(7)
  grads = _stacked(rng, 3, _random)
  _, state = _apply(grads)
  tx = optax.chain(osgd_jax.osgd(num_exits=3), optax.sgd(0.1))
  _, chained = tx.update(grads, tx.init(jax.tree.map(lambda g: g[0], grads)))
  for name in ("weights", "exit_norms", "projected_norms", "cosine",
               "degenerate_fraction", "projected_sq_norms"):
    found = optax.tree_utils.tree_get(chained, name)
    np.testing.assert_allclose(found, getattr(state, name), rtol=1e-6)


def test_empty_tree_passes_through():
  out, _ = _apply({})
  assert out == {}


# --- errors: every one names the problem and, where there is one, the leaf ---


def test_error_when_k_differs_between_leaves():
  grads = {"a": jnp.ones((3, 2)), "b": {"c": jnp.ones((2, 2))}}
  with pytest.raises(ValueError, match=r"K=3.*\['b'\]\['c'\].*K=2"):
    _apply(grads)


def test_error_when_leaf_is_not_stacked_like_its_param():
  grads = {"a": jnp.ones((3, 2)), "b": jnp.ones((3, 4, 5))}
  params = {"a": jnp.ones(2), "b": jnp.ones((5, 4))}
  with pytest.raises(ValueError, match=r"\['b'\].*\(3, 4, 5\).*\(K, 5, 4\)"):
    _apply(grads, params)


def test_error_when_params_structure_differs():
  with pytest.raises(ValueError, match="tree structures"):
    _apply({"a": jnp.ones((3, 2))}, {"z": jnp.ones(2)})


def test_error_for_unstacked_scalar_leaf():
  with pytest.raises(ValueError, match=r"\['s'\] is a scalar"):
    _apply({"s": jnp.float32(1.0)})


def test_error_for_zero_exits():
  with pytest.raises(ValueError, match=r"K=0"):
    _apply({"a": jnp.ones((0, 3))})


@pytest.mark.parametrize("order", [(0, 0, 1), (1, 2, 3), (), ("a", "b")])
def test_error_for_invalid_order(order):
  with pytest.raises(ValueError, match="order"):
    osgd_jax.osgd(order=order)


def test_error_when_order_length_differs_from_k():
  with pytest.raises(ValueError, match=r"K=3.*num_exits=2"):
    _apply({"a": jnp.ones((3, 2))}, order=(1, 0))


def test_error_when_num_exits_differs_from_k():
  with pytest.raises(ValueError, match=r"K=3.*num_exits=4"):
    _apply({"a": jnp.ones((3, 2))}, num_exits=4)


@pytest.mark.parametrize("kwargs, match", [
    ({"granularity": "layer"}, "granularity must be one of"),
    ({"method": "qr"}, "method must be one of"),
    ({"tol": -1.0}, r"osgd: tol must be in \[0, 1\), got -1.0"),
    ({"tol": np.float32(1.0)}, r"osgd: tol must be in \[0, 1\)"),
    ({"num_exits": 0}, "num_exits must be a positive int"),
    ({"num_exits": 2.0}, "num_exits must be a positive int"),
    ({"num_exits": 2, "order": (1, 0, 2)}, "order has 3 entries"),
])
def test_error_for_bad_options(kwargs, match):
  with pytest.raises(ValueError, match=match):
    osgd_jax.osgd(**{"num_exits": 3, **kwargs})


@pytest.mark.parametrize("factory", [osgd_jax.osgd, osgd_jax.osgd_sgd])
def test_error_without_num_exits_says_why(factory):
  args = (0.1,) if factory is osgd_jax.osgd_sgd else ()
  with pytest.raises(ValueError, match=r"needs num_exits=K.*fixed at init"):
    factory(*args)


def test_error_for_integer_gradients():
  with pytest.raises(ValueError, match="non-float"):
    _apply({"a": jnp.ones((2, 3), jnp.int32)})


def test_osgd_sgd_equals_explicit_chain():
  rng = np.random.default_rng(7)
  params = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)}
  ready = osgd_jax.osgd_sgd(0.1, momentum=0.9, nesterov=True, weight_decay=1e-2,
                            granularity="global", num_exits=3)
  explicit = optax.chain(
      osgd_jax.osgd(granularity="global", num_exits=3),
      optax.add_decayed_weights(1e-2),
      optax.trace(decay=0.9, nesterov=True), optax.scale_by_learning_rate(0.1))
  s1, s2 = ready.init(params), explicit.init(params)
  for step in range(3):
    grads = {"w": jnp.asarray(rng.normal(size=(3, 4, 3)), jnp.float32)}
    u1, s1 = ready.update(grads, s1, params)
    u2, s2 = explicit.update(grads, s2, params)
    np.testing.assert_allclose(u1["w"], u2["w"], rtol=1e-6)
    params = optax.apply_updates(params, u1)


def test_update_ops_carry_the_transformation_name_as_scope():
  """Profiles and compiled programs tell osgd's operations apart by scope."""
  params = {"w": jnp.zeros((4, 3))}
  grads = {"w": jnp.ones((2, 4, 3))}
  for tx, scope in ((osgd_jax.osgd(num_exits=2), "osgd"),
                    (osgd_jax.pcgrad(seed=0, num_exits=2), "pcgrad")):
    text = jax.jit(tx.update).lower(grads, tx.init(params), params).as_text(
        debug_info=True)
    assert f"/{scope}/" in text or f'"{scope}/' in text, scope


@pytest.mark.parametrize("sgd_after", [0, 2, 5])
def test_osgd_sgd_switches_to_the_summed_gradient_after_n_steps(sgd_after):
  # A float64 NumPy oracle of the whole chain: OSGD's direction for the
  # first sgd_after steps, the sum of the exit gradients after, then weight
  # decay and heavy-ball momentum carried across the switch.
  rng = np.random.default_rng(3)
  shapes = {"b": (5,), "w": (4, 5)}
  params = {n: jnp.asarray(rng.normal(size=s), jnp.float32)
            for n, s in shapes.items()}
  lr, beta, decay = 0.1, 0.9, 1e-2
  tx = osgd_jax.osgd_sgd(lr, momentum=beta, weight_decay=decay, num_exits=3,
                         sgd_after=sgd_after)
  state = jax.jit(tx.init)(params)
  update = jax.jit(tx.update)
  ref_params = {n: np.asarray(p, np.float64) for n, p in params.items()}
  trace = {n: np.zeros(s) for n, s in shapes.items()}
  for step in range(4):
    grads = {n: rng.normal(size=(3,) + s) for n, s in shapes.items()}
    grads["w"][1] -= 0.9 * grads["w"][0]  # conflicting exits
    names = sorted(shapes)
    if step < sgd_after:
      directions = dict(zip(names, osgd_direction(
          [grads[n] for n in names], tol=DEFAULT_TOL)))
    else:
      directions = {n: grads[n].sum(0) for n in names}
    for n in names:
      trace[n] = beta * trace[n] + directions[n] + decay * ref_params[n]
      ref_params[n] = ref_params[n] - lr * trace[n]
    updates, state = update(
        {n: jnp.asarray(g, jnp.float32) for n, g in grads.items()}, state,
        params)
    params = optax.apply_updates(params, updates)
    for n in names:
      np.testing.assert_allclose(params[n], ref_params[n], rtol=2e-5,
                                 atol=2e-6)
  assert int(state[0].count) == 4


def test_switch_to_sum_keeps_the_aggregator_state_after_the_switch():
  tx = osgd_jax.switch_to_sum(osgd_jax.osgd(num_exits=2), after_steps=1)
  params = {"w": jnp.zeros(3)}
  grads = {"w": jnp.array([[1.0, 0.0, 0.0], [1.0, 2.0, 0.0]])}
  state = tx.init(params)
  assert isinstance(state, osgd_jax.SwitchToSumState)
  _, state = tx.update(grads, state)
  frozen = state.inner
  updates, state = tx.update({"w": 3 * grads["w"]}, state)
  np.testing.assert_array_equal(updates["w"], [6.0, 6.0, 0.0])
  # The diagnostics are the last projection's, from before the switch:
  # g2's part along g1 removed, u = g1 + (g2 - g1) = g2.
  jax.tree.map(np.testing.assert_array_equal, state.inner, frozen)
  np.testing.assert_allclose(state.inner.weights, [0.0, 1.0])


def test_switch_to_sum_moves_with_an_injected_step_count():
  tx = optax.inject_hyperparams(osgd_jax.osgd_sgd, static_args=("num_exits",))(
      learning_rate=1.0, momentum=None, num_exits=2, sgd_after=100)
  params = {"w": jnp.zeros(2)}
  grads = {"w": jnp.array([[1.0, 0.0], [1.0, 1.0]])}
  state = tx.init(params)
  projected, state = jax.jit(tx.update)(grads, state, params)
  np.testing.assert_allclose(projected["w"], [-1.0, -1.0])
  state.hyperparams["sgd_after"] = jnp.asarray(0)  # switch now
  summed, state = jax.jit(tx.update)(grads, state, params)
  np.testing.assert_allclose(summed["w"], [-2.0, -1.0])


@pytest.mark.parametrize("after_steps", [-1, 1.5, float("nan")])
def test_switch_to_sum_refuses_a_step_count_that_is_not_a_count(after_steps):
  with pytest.raises(ValueError, match="switch_to_sum: after_steps must be an"
                     " integer >= 0"):
    osgd_jax.switch_to_sum(osgd_jax.osgd(num_exits=2), after_steps)
