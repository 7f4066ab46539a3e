"""Baseline aggregators against float64 NumPy oracles of their papers' definitions.

Each aggregator is compared with an independent implementation that works on
the gradient vectors (tests/numpy_oracles.py), on random and degenerate
Jacobians; then its documented properties are checked with hypothesis, and it
is run under jit in a chain with momentum on a zoo model.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

import numpy_oracles as oracles
import osgd_jax
from osgd_jax import aggregation, weightings, zoo
from osgd_jax.aggregation import _stateful

SHAPES = {"conv": (3, 2, 4), "bias": (5,), "scale": ()}
NAMES = list(SHAPES)
# K = 6 exceeds the bias leaf's 5 dimensions and the scalar leaf's one, so the
# per-leaf cases are rank-deficient too.
K = 6
FACTORIES = {
    "mgda": aggregation.mgda,
    "upgrad": aggregation.upgrad,
    "pcgrad": aggregation.pcgrad,
    "adaloss": aggregation.adaptive_loss_balancing,
    "weighted_sum": aggregation.weighted_sum,
}


PARAMS = {name: np.zeros(shape, np.float32) for name, shape in SHAPES.items()}


@functools.lru_cache(maxsize=None)
def _transform(name, granularity="global", k=K):
  return FACTORIES[name](granularity=granularity, num_exits=k)


@functools.lru_cache(maxsize=None)
def _jitted(name, granularity="global", k=K):
  """A jitted update, compiled once per (shapes, aggregator, granularity)."""
  return jax.jit(_transform(name, granularity, k).update)


def _init(name, granularity="global", k=K):
  # With granularity="global" the state has one group whatever the tree.
  return _transform(name, granularity, k).init(PARAMS)


def _random(rng, k, n):
  return rng.normal(size=(k, n))


def _correlated(rng, k, n):
  return rng.normal(size=(1, n)) + 0.2 * rng.normal(size=(k, n))


def _conflicting(rng, k, n):
  rows = rng.normal(size=(k, n))
  rows[1:] -= 0.9 * rows[0]  # every later row conflicts with the first
  return rows


def _collinear(rng, k, n):
  rows = rng.normal(size=(k, n))
  rows[2] = 1.5 * rows[0] - 0.5 * rows[1]  # rank-deficient
  rows[3] = -2.0 * rows[1]                 # exactly opposite: 0 in the hull
  return rows


def _zero_row(rng, k, n):
  rows = rng.normal(size=(k, n))
  rows[1] = 0.0
  rows[k - 1] = 0.0
  return rows


def _mixed_scale(rng, k, n):
  return rng.normal(size=(k, n)) * 10.0 ** rng.uniform(-8, 8, size=(k, 1))


def _tiny(rng, k, n):
  return 1e-8 * rng.normal(size=(k, n))


def _huge(rng, k, n):
  return 1e8 * rng.normal(size=(k, n))


CASES = {
    "random": _random, "correlated": _correlated, "conflicting": _conflicting,
    "collinear": _collinear, "zero_row": _zero_row,
    "mixed_scale": _mixed_scale, "tiny": _tiny, "huge": _huge,
}


def _stacked(seed, make_rows, k=K):
  rng = np.random.default_rng(seed)
  return {name: make_rows(rng, k, int(np.prod(shape))).reshape((k,) + shape)
          .astype(np.float32) for name, shape in SHAPES.items()}


def _leaves(tree):
  return [np.asarray(tree[n]) for n in NAMES]


def _assert_close(out, expected, grads, granularity, rtol=1e-4):
  """|out − expected| ≤ rtol · Σ_k ‖g_k‖ within every group."""
  rows = oracles._flat_rows(_leaves(grads), granularity)
  got = oracles._flat_rows([x[None] for x in _leaves(out)], granularity)
  ref = oracles._flat_rows([np.asarray(x)[None] for x in expected], granularity)
  for g, u, r in zip(rows, got, ref):
    scale = np.linalg.norm(g, axis=1).sum()
    err = np.max(np.abs(u[0] - r[0]), initial=0.0)
    assert err <= rtol * scale, (err / max(scale, 1e-300), rtol)


def _assert_non_conflicting(out, grads, granularity, rtol=1e-4):
  """⟨g_k, u⟩ ≥ −rtol · ‖g_k‖ · Σ_j ‖g_j‖ for every row k of every group."""
  rows = oracles._flat_rows(_leaves(grads), granularity)
  got = oracles._flat_rows([x[None] for x in _leaves(out)], granularity)
  for g, u in zip(rows, got):
    dots = g @ u[0]
    bound = rtol * np.linalg.norm(g, axis=1) * np.linalg.norm(g, axis=1).sum()
    assert np.all(dots >= -bound), (dots, bound)


def _finite(tree):
  return all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(tree))


def _pcgrad_orders(state):
  """The visiting orders the next update draws (the transform's own split)."""
  key_data = state.weighting_state.key_data[0]
  _, subkey = jax.random.split(jax.random.wrap_key_data(key_data))
  return np.asarray(_stateful.visiting_orders(subkey, K))


# --- against the oracles -----------------------------------------------------


# Per leaf every weighting runs vmapped over the leaves; MGDA shares UPGrad's
# solver, so its per-leaf variant would only add a compilation.
ORACLE_VARIANTS = [("mgda", "global"), ("upgrad", "global"), ("upgrad", "leaf"),
                   ("pcgrad", "global"), ("pcgrad", "leaf")]


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name, granularity", ORACLE_VARIANTS)
def test_matches_float64_oracle(name, granularity, case):
  grads = _stacked(sorted(CASES).index(case), CASES[case])
  state = _init(name, granularity)
  out, new_state = _jitted(name, granularity)(grads, state)
  if name == "mgda":
    direction = oracles.min_norm_point
  elif name == "upgrad":
    direction = oracles.upgrad_direction
  else:
    orders = _pcgrad_orders(state)
    direction = lambda rows: oracles.pcgrad_direction(rows, orders)
  expected = oracles.aggregate(_leaves(grads), direction, granularity)
  _assert_close(out, expected, grads, granularity)
  assert _finite((out, new_state))
  if name != "pcgrad":
    _assert_non_conflicting(out, grads, granularity)


@pytest.mark.parametrize("granularity", ["global", "leaf"])
def test_weighted_sum_and_adaloss_match_oracle(granularity):
  grads = _stacked(0, _mixed_scale)
  w = np.array([1.0, 0.5, 2.0, 0.0, -1.0, 3.0], np.float32)
  tx = aggregation.weighted_sum(w, granularity=granularity)
  out, state = tx.update(grads, tx.init(PARAMS))  # eager: nothing to compile
  expected = oracles.aggregate(_leaves(grads), lambda rows: w @ rows, granularity)
  _assert_close(out, expected, grads, granularity, rtol=1e-6)
  np.testing.assert_allclose(state.weights, w, rtol=1e-6)

  history = np.array([[2.0, 1.0, 0.5, 0.5, 4.0, 1.0],
                      [1.0, 1.0, 0.2, 0.4, 3.0, 0.0],
                      [0.5, 2.0, 0.1, 0.3, 3.5, 0.5]], np.float32)
  tx = aggregation.adaptive_loss_balancing(decay=0.8, granularity=granularity,
                                          num_exits=K)
  update = tx.update
  state = tx.init(PARAMS)
  for losses in history:
    out, state = update(grads, state, losses=losses)
  w = oracles.adaloss_weights(history, decay=0.8)
  np.testing.assert_allclose(state.weights, w, rtol=1e-5)
  expected = oracles.aggregate(_leaves(grads), lambda rows: w @ rows, granularity)
  _assert_close(out, expected, grads, granularity, rtol=1e-5)


def test_weighted_sum_presets_and_schedules():
  grads = {"w": np.arange(12, dtype=np.float32).reshape(4, 3)}

  def weights_over(tx, steps):
    # Eager: cheaper than compiling one program per preset.
    update, state, seen = tx.update, tx.init(None), []
    for _ in range(steps):
      _, state = update(grads, state)
      seen.append(np.asarray(state.weights))
    return np.stack(seen)

  k = np.arange(1, 5)
  ws = functools.partial(aggregation.weighted_sum, num_exits=4)
  np.testing.assert_allclose(weights_over(ws(), 1)[0], 1)
  np.testing.assert_allclose(weights_over(ws("linear"), 1)[0],
                             4 * k / k.sum(), rtol=1e-6)
  np.testing.assert_allclose(weights_over(ws("geometric", ratio=3.0), 1)[0],
                             4 * 3.0 ** (k - 1) / (3.0 ** (k - 1)).sum(),
                             rtol=1e-6)
  sdn = weights_over(ws("sdn", total_steps=4, cap=0.9), 6)
  np.testing.assert_allclose(
      sdn, [oracles.sdn_weights(4, t, 4, 0.9) for t in range(6)], rtol=1e-6)
  schedule = lambda count: jnp.array([1.0, count, 2.0, 0.0])
  np.testing.assert_allclose(weights_over(ws(schedule), 3)[:, 1], [0, 1, 2])
  # The uniform sum is the plain sum of the rows.
  tx = ws()
  out, _ = tx.update(grads, tx.init(None))
  np.testing.assert_allclose(out["w"], grads["w"].sum(0))


def test_pcgrad_orders_are_reproducible_and_advance():
  grads = _stacked(3, _conflicting)
  update = _jitted("pcgrad")
  runs = []
  for _ in range(2):
    state, outs = _init("pcgrad"), []
    for _ in range(3):
      out, state = update(grads, state)
      outs.append(out["conv"])
    runs.append(np.stack(outs))
  np.testing.assert_array_equal(runs[0], runs[1])
  other_seed = aggregation.pcgrad(seed=1, num_exits=K).init(PARAMS)
  assert not np.array_equal(other_seed.weighting_state.key_data,
                            _init("pcgrad").weighting_state.key_data)
  # The key advances, so the orders of consecutive updates differ.
  state = _init("pcgrad")
  _, next_state = update(grads, state)
  assert not np.array_equal(_pcgrad_orders(state), _pcgrad_orders(next_state))


# --- properties ----------------------------------------------------------------
# On the K=6 trees of the oracle tests, so each jitted update compiles once.

seeds = st.integers(0, 2**31 - 1)
exponents = st.floats(-8, 8)
few = settings(max_examples=6, deadline=None)


def _random_tree(seed, exp, zero_row=False):
  rng = np.random.default_rng(seed)
  scales = 10.0 ** (exp + rng.uniform(-1, 1, size=K))
  grads = _stacked(seed, lambda rng, k, n: rng.normal(size=(k, n)) * scales[:, None])
  if zero_row:
    for g in grads.values():
      g[rng.integers(K)] = 0.0
  return grads


def _global_rows(tree):
  return oracles._flat_rows(_leaves(tree), "global")[0]


def _update(name, grads, losses=np.arange(1.0, K + 1, dtype=np.float32)):
  # Only AdaLoss takes the losses; passing them to the others would compile
  # another variant of their update.
  extra = {"losses": losses} if name == "adaloss" else {}
  out, _ = _jitted(name)(grads, _init(name), **extra)
  return _global_rows({n: np.asarray(out[n])[None] for n in NAMES})[0]


@few
@given(seeds, exponents, st.booleans())
def test_finite_and_non_conflicting(seed, exp, zero_row):
  grads = _random_tree(seed, exp, zero_row)
  rows = _global_rows(grads)
  norms = np.linalg.norm(rows, axis=1)
  for name in FACTORIES:
    u = _update(name, grads)
    assert np.all(np.isfinite(u)), name
    if name in ("mgda", "upgrad"):
      assert np.all(rows @ u >= -1e-4 * norms * norms.sum()), (name, rows @ u)


@few
@given(seeds, exponents, st.floats(-3, 3))
def test_positively_homogeneous_and_order_invariant(seed, exp, log_c):
  grads = _random_tree(seed, exp)
  c = np.float32(10.0 ** log_c)
  perm = np.random.default_rng(seed).permutation(K)
  scale = np.abs(_global_rows(grads)).max() * K
  for name in ("mgda", "upgrad", "pcgrad"):
    base = _update(name, grads)
    scaled = _update(name, {n: g * c for n, g in grads.items()})
    np.testing.assert_allclose(scaled, c * base, rtol=1e-4,
                               atol=1e-5 * c * scale, err_msg=name)
    if name != "pcgrad":  # PCGrad's random orders depend on the exits' index
      permuted = _update(name, {n: g[perm] for n, g in grads.items()})
      np.testing.assert_allclose(permuted, base, rtol=1e-4, atol=1e-5 * scale,
                                 err_msg=name)


@few
@given(seeds, exponents)
def test_upgrad_is_linear_under_scaling(seed, exp):
  grads = _random_tree(seed, exp)
  c1, c2 = np.random.default_rng(seed).uniform(0.1, 10, size=(2, K))
  scaled = lambda c: {n: (g * c.reshape((K,) + (1,) * (g.ndim - 1))
                          ).astype(np.float32) for n, g in grads.items()}
  scale = np.abs(_global_rows(grads)).max() * 20
  np.testing.assert_allclose(
      _update("upgrad", scaled(c1 + c2)),
      _update("upgrad", scaled(c1)) + _update("upgrad", scaled(c2)),
      rtol=1e-4, atol=1e-5 * scale)


@few
@given(seeds, exponents)
def test_adaloss_ignores_per_exit_loss_scale(seed, exp):
  grads = _random_tree(seed, exp)
  rng = np.random.default_rng(seed)
  losses = rng.uniform(0.1, 3, size=K).astype(np.float32)
  c = (10.0 ** rng.uniform(-3, 3, size=K)).astype(np.float32)
  scaled = {n: g * c.reshape((K,) + (1,) * (g.ndim - 1)) for n, g in grads.items()}
  # Only the normalisation Σ_j 1/ℓ_j sees the scales.
  ratio = np.sum(1 / losses) / np.sum(1 / (losses * c))
  np.testing.assert_allclose(
      _update("adaloss", scaled, losses * c),
      ratio * _update("adaloss", grads, losses),
      rtol=1e-4, atol=1e-5 * K * ratio * np.abs(_global_rows(grads)).max())


@few
@given(seeds, exponents)
def test_pcgrad_two_non_conflicting_rows_give_the_sum(seed, exp):
  rng = np.random.default_rng(seed)
  rows = (rng.normal(size=(2, 12)) * 10.0 ** exp).astype(np.float32)
  if rows[0] @ rows[1] < 0:
    rows[1] = -rows[1]
  out, _ = _jitted("pcgrad", k=2)({"w": rows}, _init("pcgrad", k=2))
  np.testing.assert_allclose(out["w"], rows.sum(0), rtol=1e-5,
                             atol=1e-6 * np.abs(rows).max())


def test_single_exit_is_the_identity():
  g = {"w": np.random.default_rng(0).normal(size=(1, 12)).astype(np.float32)}
  for name in FACTORIES:
    extra = {"losses": np.ones(1, np.float32)} if name == "adaloss" else {}
    out, _ = _jitted(name, k=1)(g, _init(name, k=1), **extra)
    np.testing.assert_allclose(out["w"], g["w"][0], rtol=1e-6, err_msg=name)


# --- in a training step --------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _zoo_task():
  """A 3-exit zoo model, a batch and its jitted per-exit gradients.

  Compiled once for all aggregators: the model's forward and vmapped VJP
  cost more to compile than any aggregator.
  """
  model = zoo.create("branched-mlp", rngs=nnx.Rngs(0), stages=3, width=8)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  grads_fn = jax.jit(osgd_jax.value_and_per_exit_grads(
      zoo.per_exit_loss_fn(graphdef), has_aux=True))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(64, 64)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, size=64), jnp.int32)
  return params, rest, lambda p, r: grads_fn(p, r, x, y)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_jitted_chain_with_momentum_on_zoo_model(name):
  params, rest, grads_fn = _zoo_task()
  options = {"weights": "sdn", "total_steps": 10} if name == "weighted_sum" else {}
  tx = optax.chain(FACTORIES[name](num_exits=3, **options),
                   optax.add_decayed_weights(1e-4),
                   optax.sgd(0.1, momentum=0.9))
  update = jax.jit(tx.update)
  state = tx.init(params)
  shapes = jax.tree.map(jnp.shape, state)
  first = None
  for _ in range(8):
    (losses, rest), grads = grads_fn(params, rest)
    updates, state = update(grads, state, params, losses=losses)
    params = optax.apply_updates(params, updates)
    first = losses if first is None else first
  (losses, _), _ = grads_fn(params, rest)
  assert _finite((params, state, losses))
  assert jax.tree.map(jnp.shape, state) == shapes  # fixed by num_exits
  assert float(losses.mean()) < float(first.mean()), (first, losses)


# --- errors ----------------------------------------------------------------------


def test_adaloss_errors_name_the_missing_or_misshapen_losses():
  tx = aggregation.adaptive_loss_balancing(num_exits=3)
  grads = {"w": jnp.ones((3, 2))}
  with pytest.raises(ValueError, match=r"needs the per-exit losses.*losses=losses"):
    tx.update(grads, tx.init(None))
  with pytest.raises(ValueError, match=r"shape \(2,\).*K=3"):
    tx.update(grads, tx.init(None), losses=jnp.ones(2))


@pytest.mark.parametrize("make, match", [
    (lambda: aggregation.weighted_sum("cubic"), "unknown weighted_sum preset"),
    (lambda: aggregation.weighted_sum("sdn"), "needs total_steps"),
    (lambda: aggregation.weighted_sum([[1.0]]), "1-D vector"),
    (lambda: aggregation.weighted_sum([1.0, 2.0], num_exits=3), "num_exits=3"),
    (lambda: aggregation.mgda(granularity="layer", num_exits=2),
     "granularity must be one of"),
    (lambda: aggregation.upgrad(max_iter=0, num_exits=2), "max_iter"),
    (lambda: aggregation.mgda(tol=1.0, num_exits=2),
     r"mgda: tol must be in \[0, 1\), got 1.0"),
    (lambda: aggregation.upgrad(tol=np.float64(-0.1), num_exits=2),
     r"upgrad: tol must be in \[0, 1\)"),
    (lambda: aggregation.pcgrad(num_exits=0), "num_exits"),
    (lambda: aggregation.adaptive_loss_balancing(decay=1.0, num_exits=2),
     r"adaptive_loss_balancing: decay must be in \[0, 1\)"),
    (lambda: aggregation.mgda(), r"mgda needs num_exits=K.*fixed at init"),
    (lambda: aggregation.upgrad(), r"upgrad needs num_exits=K"),
    (lambda: aggregation.pcgrad(), r"pcgrad needs num_exits=K"),
    (lambda: aggregation.weighted_sum(), r"weighted_sum needs num_exits=K"),
    (lambda: aggregation.adaptive_loss_balancing(),
     r"adaptive_loss_balancing needs num_exits=K"),
    (lambda: osgd_jax.from_weighting(len, num_exits=2, granularity="x"),
     "granularity must be one of"),
    (lambda: osgd_jax.from_weighting(3, num_exits=2), "must be a function"),
])
def test_bad_options(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_shape_errors_at_update():
  grads = {"w": jnp.ones((3, 2))}
  with pytest.raises(ValueError, match=r"K=3 exits but weighted_sum was built"
                     r" with num_exits=2; build it with num_exits=3"):
    tx = aggregation.weighted_sum([1.0, 2.0])
    tx.update(grads, tx.init(None))
  with pytest.raises(ValueError, match=r"2 caps.*K=4"):
    tx = aggregation.weighted_sum("sdn", total_steps=5, cap=[0.1, 0.2],
                                  num_exits=4)
    tx.update({"w": jnp.ones((4, 2))}, tx.init(None))
  with pytest.raises(ValueError, match=r"schedule returned weights of shape"
                     r" \(2,\).*K=3"):
    tx = aggregation.weighted_sum(lambda step: jnp.ones(2), num_exits=3)
    tx.update(grads, tx.init(None))
  with pytest.raises(ValueError, match=r"K=3 exits but mgda was built with num_exits=2"):
    tx = aggregation.mgda(num_exits=2)
    tx.update(grads, tx.init(None))
  with pytest.raises(ValueError, match=r"pcgrad expects.*\['s'\] is a scalar"):
    tx = aggregation.pcgrad(num_exits=1)
    tx.update({"s": jnp.float32(1.0)}, tx.init(None))
  with pytest.raises(ValueError, match=r"\['w'\].*expected \(K, \*param\.shape\)"):
    tx = aggregation.upgrad(num_exits=3)
    tx.update(grads, tx.init(None), {"w": jnp.ones(3)})
  with pytest.raises(ValueError, match=r"state for 2 groups but the gradients"
                     r" form 1.*tx.init\(params\)"):
    tx = aggregation.pcgrad(num_exits=3, granularity="leaf")
    tx.update(grads, tx.init({"a": jnp.ones(2), "b": jnp.ones(2)}))
