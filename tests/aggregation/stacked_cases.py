"""Stacked gradient trees (K, *param.shape) and their jitted transformations.

Shared by the transformation-level tests: the K = 6 trees of the oracle and
property tests of OSGD's first baselines (MGDA, UPGrad, PCGrad, AdaLoss, the
weighted sum), and OSGD's own update on any tree. Each jitted update is
compiled once per (aggregator, options, shapes) for the whole session,
whichever test file asks for it first.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import numpy_oracles as oracles

import osgd_jax
from osgd_jax import aggregation
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


@functools.cache
def transform(name, granularity="global", k=K):
  return FACTORIES[name](granularity=granularity, num_exits=k)


@functools.cache
def jitted(name, granularity="global", k=K):
  """A jitted update, compiled once per (shapes, aggregator, granularity)."""
  return jax.jit(transform(name, granularity, k).update)


def init(name, granularity="global", k=K):
  # With granularity="global" the state has one group whatever the tree.
  return transform(name, granularity, k).init(PARAMS)


def random(rng, k, n):
  return rng.normal(size=(k, n))


def correlated(rng, k, n):
  return rng.normal(size=(1, n)) + 0.2 * rng.normal(size=(k, n))


def conflicting(rng, k, n):
  rows = rng.normal(size=(k, n))
  rows[1:] -= 0.9 * rows[0]  # every later row conflicts with the first
  return rows


def collinear(rng, k, n):
  rows = rng.normal(size=(k, n))
  rows[2] = 1.5 * rows[0] - 0.5 * rows[1]  # rank-deficient
  rows[3] = -2.0 * rows[1]  # exactly opposite: 0 in the hull
  return rows


def zero_row(rng, k, n):
  rows = rng.normal(size=(k, n))
  rows[1] = 0.0
  rows[k - 1] = 0.0
  return rows


def mixed_scale(rng, k, n):
  return rng.normal(size=(k, n)) * 10.0 ** rng.uniform(-8, 8, size=(k, 1))


def tiny(rng, k, n):
  return 1e-8 * rng.normal(size=(k, n))


def huge(rng, k, n):
  return 1e8 * rng.normal(size=(k, n))


CASES = {
  "random": random,
  "correlated": correlated,
  "conflicting": conflicting,
  "collinear": collinear,
  "zero_row": zero_row,
  "mixed_scale": mixed_scale,
  "tiny": tiny,
  "huge": huge,
}


def stacked_with(rng, k, make_rows):
  """A dict of stacked leaves (K, *shape) whose rows come from make_rows."""
  return {
    name: make_rows(rng, k, int(np.prod(shape)))
    .reshape((k,) + shape)
    .astype(np.float32)
    for name, shape in SHAPES.items()
  }


def stacked(seed, make_rows, k=K):
  return stacked_with(np.random.default_rng(seed), k, make_rows)


def case_grads(case):
  """The tree of ``case``, seeded by its place in the sorted case names."""
  return stacked(sorted(CASES).index(case), CASES[case])


def leaves(tree):
  return [np.asarray(tree[n]) for n in NAMES]


def assert_close(out, expected, grads, granularity, rtol=1e-4):
  """|out − expected| ≤ rtol · Σ_k ‖g_k‖ within every group."""
  rows = oracles._flat_rows(leaves(grads), granularity)
  got = oracles._flat_rows([x[None] for x in leaves(out)], granularity)
  ref = oracles._flat_rows([np.asarray(x)[None] for x in expected], granularity)
  for g, u, r in zip(rows, got, ref, strict=True):
    scale = np.linalg.norm(g, axis=1).sum()
    err = np.max(np.abs(u[0] - r[0]), initial=0.0)
    assert err <= rtol * scale, (err / max(scale, 1e-300), rtol)


def assert_non_conflicting(out, grads, granularity, rtol=1e-4):
  """⟨g_k, u⟩ ≥ −rtol · ‖g_k‖ · Σ_j ‖g_j‖ for every row k of every group."""
  rows = oracles._flat_rows(leaves(grads), granularity)
  got = oracles._flat_rows([x[None] for x in leaves(out)], granularity)
  for g, u in zip(rows, got, strict=True):
    dots = g @ u[0]
    bound = rtol * np.linalg.norm(g, axis=1) * np.linalg.norm(g, axis=1).sum()
    assert np.all(dots >= -bound), (dots, bound)


def finite(tree):
  return all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(tree))


def pcgrad_orders(state):
  """The visiting orders the next update draws (the transform's own split)."""
  key_data = state.weighting_state.key_data[0]
  _, subkey = jax.random.split(jax.random.wrap_key_data(key_data))
  return np.asarray(_stateful.visiting_orders(subkey, K))


# --- OSGD on any tree ---------------------------------------------------------


@functools.cache
def _osgd(options):
  tx = osgd_jax.osgd(**dict(options))
  return tx, jax.jit(tx.update)


def apply_osgd(grads, params=None, **options):
  """One jitted osgd update; K defaults to the gradients' leading axis.

  The transformation and its jitted update are made once per options, so
  that the cases with the same options and shapes share one compilation.
  """
  leaves = jax.tree.leaves(grads)
  if "order" not in options:
    k = np.shape(leaves[0])[:1] if leaves else ()
    options.setdefault("num_exits", k[0] if k and k[0] else 1)
  tx, update = _osgd(tuple(sorted(options.items())))
  like_params = (
    params
    if params is not None
    else jax.tree.map(lambda g: np.zeros(np.shape(g)[1:]), grads)
  )
  state = tx.init(like_params)
  return update(grads, state, params)


# --- for the properties -------------------------------------------------------
# On the K=6 trees of the oracle tests, so each jitted update compiles once.


def random_tree(seed, exp, zero_row=False):
  rng = np.random.default_rng(seed)
  scales = 10.0 ** (exp + rng.uniform(-1, 1, size=K))
  grads = stacked(
    seed, lambda rng, k, n: rng.normal(size=(k, n)) * scales[:, None]
  )
  if zero_row:
    for g in grads.values():
      g[rng.integers(K)] = 0.0
  return grads


def global_rows(tree):
  return oracles._flat_rows(leaves(tree), "global")[0]


def update(name, grads, losses=None):
  if losses is None:  # the losses 1, ..., K unless given
    losses = np.arange(1.0, K + 1, dtype=np.float32)
  # Only AdaLoss takes the losses; passing them to the others would compile
  # another variant of their update.
  extra = {"losses": losses} if name == "adaloss" else {}
  out, _ = jitted(name)(grads, init(name), **extra)
  return global_rows({n: np.asarray(out[n])[None] for n in NAMES})[0]


def assert_outputs_are_finite(name, seed, exp, zero_row):
  """``name``'s update of a random tree is finite."""
  grads = random_tree(seed, exp, zero_row)
  assert np.all(np.isfinite(update(name, grads)))


def assert_finite_and_non_conflicting(name, seed, exp, zero_row):
  """``name``'s update is finite and conflicts with no row of the tree."""
  grads = random_tree(seed, exp, zero_row)
  rows = global_rows(grads)
  norms = np.linalg.norm(rows, axis=1)
  u = update(name, grads)
  assert np.all(np.isfinite(u))
  assert np.all(rows @ u >= -1e-4 * norms * norms.sum()), rows @ u


def assert_positively_homogeneous(name, seed, exp, log_c):
  """Scaling every row by c > 0 scales ``name``'s update by c.

  Returns the tree, its update and the scale of its rows, for the checks
  that follow on the same tree.
  """
  grads = random_tree(seed, exp)
  c = np.float32(10.0**log_c)
  scale = np.abs(global_rows(grads)).max() * K
  base = update(name, grads)
  scaled = update(name, {n: g * c for n, g in grads.items()})
  np.testing.assert_allclose(scaled, c * base, rtol=1e-4, atol=1e-5 * c * scale)
  return grads, base, scale


def assert_positively_homogeneous_and_order_invariant(name, seed, exp, log_c):
  """As :func:`assert_positively_homogeneous`; permuting the exits too."""
  grads, base, scale = assert_positively_homogeneous(name, seed, exp, log_c)
  perm = np.random.default_rng(seed).permutation(K)
  permuted = update(name, {n: g[perm] for n, g in grads.items()})
  np.testing.assert_allclose(permuted, base, rtol=1e-4, atol=1e-5 * scale)


def assert_single_exit_is_the_identity(name, **extra):
  """With K = 1, ``name`` passes the one gradient on (``extra``: its args)."""
  g = {"w": np.random.default_rng(0).normal(size=(1, 12)).astype(np.float32)}
  out, _ = jitted(name, k=1)(g, init(name, k=1), **extra)
  np.testing.assert_allclose(out["w"], g["w"][0], rtol=1e-6)
