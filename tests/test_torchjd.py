"""TorchJD's aggregators as weightings and transformations.

Each weighting is checked three ways: against a float64 NumPy oracle of its
paper's definition (tests/numpy_oracles.py) on random, rank-deficient,
zero-row and mixed-scale (1e-8…1e8) gradients; against TorchJD's own outputs,
stored in tests/golden/torchjd_golden.json by
tests/golden/make_torchjd_golden.py (so the suite never imports torch); and
for the properties it claims, with hypothesis. The random ones (Random,
GradDrop) are checked by the distributions they document. Each
transformation gets one contract check (jit, ``lax.scan``, the state's
structure kept, the diagnostics found by name), and the three not built by
``from_weighting`` one on an ``Explicit`` mesh; the full harness of
tests/test_contract.py costs about ten seconds per transformation, and
covers ``from_weighting`` itself.

The weightings are compared in x64 (the algorithms, not float32 rounding),
each compiled once for the one (K, K) shape of the cases.
"""

from __future__ import annotations

import functools
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import numpy_oracles as oracles
import osgd_jax
from osgd_jax import weightings
from osgd_jax.aggregation import _stateful

K, N = 4, 12
GOLDEN = os.path.join(os.path.dirname(__file__), "golden",
                      "torchjd_golden.json")

# name -> (weighting, keyword arguments), the deterministic ones.
WEIGHTINGS = {
    "mean": (weightings.mean, {}),
    "sum": (weightings.uniform, {}),
    "constant": (weightings.constant, {"weights": (1.0, 0.5, 2.0, -1.0)}),
    "imtl_g": (weightings.imtl_g, {}),
    "aligned_mtl": (weightings.aligned_mtl, {}),
    "aligned_mtl_median": (weightings.aligned_mtl, {"scale_mode": "median"}),
    "aligned_mtl_rmse": (weightings.aligned_mtl, {"scale_mode": "rmse"}),
    "krum": (weightings.krum, {"n_byzantine": 0}),
    "multi_krum": (weightings.krum, {"n_byzantine": 0, "n_selected": 2}),
    "dualproj": (weightings.dualproj, {}),
    "upgrad": (weightings.upgrad, {}),
    "mgda": (weightings.mgda, {}),
    "cagrad": (weightings.cagrad, {"c": 0.4}),
    "config": (weightings.config, {}),
    "fairgrad": (weightings.fairgrad, {"alpha": 1.0}),
    "fairgrad_2": (weightings.fairgrad, {"alpha": 2.0}),
    "pcd": (weightings.pcd, {"tau": 0.3}),
}

ORACLES = {
    "mean": lambda g: g.mean(axis=0),
    "constant": lambda g: np.asarray([1.0, 0.5, 2.0, -1.0]) @ g,
    "imtl_g": oracles.imtl_g_direction,
    "aligned_mtl": oracles.aligned_mtl_direction,
    "aligned_mtl_median": functools.partial(oracles.aligned_mtl_direction,
                                            scale_mode="median"),
    "aligned_mtl_rmse": functools.partial(oracles.aligned_mtl_direction,
                                          scale_mode="rmse"),
    "krum": functools.partial(oracles.krum_direction, n_byzantine=0),
    "multi_krum": functools.partial(oracles.krum_direction, n_byzantine=0,
                                    n_selected=2),
    "dualproj": oracles.dualproj_direction,
    "cagrad": functools.partial(oracles.cagrad_direction, c=0.4),
    "config": oracles.config_direction,
    "pcd": functools.partial(oracles.pcd_direction, tau=0.3),
}
# PCD normalises the rows: a zero secondary row has no constraint to meet,
# which the oracle, on unit rows, does not express.
NO_ORACLE = {("pcd", "zero_row")}


def _random(rng):
  return rng.normal(size=(K, N))


def _rank_deficient(rng):
  rows = rng.normal(size=(K, N))
  rows[2] = 1.5 * rows[0] - 0.5 * rows[1]
  rows[3] = -2.0 * rows[1]
  return rows


def _zero_row(rng):
  rows = rng.normal(size=(K, N))
  rows[1] = 0.0
  return rows


def _mixed_scale(rng):
  return rng.normal(size=(K, N)) * 10.0 ** np.array([[-8.0], [-3.0], [2.0],
                                                     [8.0]])


CASES = {"random": _random, "rank_deficient": _rank_deficient,
         "zero_row": _zero_row, "mixed_scale": _mixed_scale}


@functools.lru_cache(maxsize=None)
def _weighting(name, dtype="float64"):
  """The jitted weighting (under x64 for float64), compiled once per name."""
  fn, kwargs = WEIGHTINGS[name]
  return jax.jit(functools.partial(fn, **kwargs))


def _direction(name, rows):
  with jax.enable_x64(True):
    w = np.asarray(_weighting(name)(jnp.asarray(rows @ rows.T, jnp.float64)))
  assert w.shape == (len(rows),) and np.all(np.isfinite(w)), w
  return w @ rows


def _assert_close(got, want, rows, rtol):
  """|got − want| ≤ rtol · Σ_k ‖g_k‖, the scale of the update."""
  scale = np.linalg.norm(rows, axis=1).sum()
  err = np.max(np.abs(got - want))
  assert err <= rtol * scale, (err / scale, rtol)


# --- against the oracles ------------------------------------------------------


# Aligned-MTL's "rmse" scale lifts M's smallest kept eigenvalue (1e4 here)
# to its mean (1e16): that eigenvector, known from M to eps · 1e16/1e4,
# dominates the update. TorchJD's is as far from the oracle.
MIXED_RTOL = {"aligned_mtl_rmse": 1e-3}
# SLSQP's accuracy; CAGrad's minimum is not smooth where ‖g_w‖ is small.
RTOL = {"cagrad": 1e-7}


@pytest.mark.parametrize("name, case", [
    (name, case) for name in sorted(ORACLES) for case in sorted(CASES)
    if (name, case) not in NO_ORACLE])
def test_matches_float64_oracle(name, case):
  rows = CASES[case](np.random.default_rng(sorted(CASES).index(case)))
  rtol = RTOL.get(name, 1e-9)
  rtol = MIXED_RTOL.get(name, rtol) if case == "mixed_scale" else rtol
  _assert_close(_direction(name, rows), ORACLES[name](rows), rows, rtol)


# FairGrad's equation has no positive solution when a positive combination
# of the gradients is 0 (a zero row, or g_4 = −2 g_2): only the other cases.
@pytest.mark.parametrize("case", ["random", "mixed_scale"])
@pytest.mark.parametrize("name, alpha", [("fairgrad", 1.0),
                                         ("fairgrad_2", 2.0)])
def test_fairgrad_solves_its_equation(name, alpha, case):
  rows = CASES[case](np.random.default_rng(sorted(CASES).index(case)))
  with jax.enable_x64(True):
    w = np.asarray(_weighting(name)(jnp.asarray(rows @ rows.T)))
  assert oracles.fairgrad_residual(rows @ rows.T, w, alpha) < 1e-9


def test_imtl_g_equalises_the_projections_at_every_scale():
  # Mixed scales: the cosine basis keeps the 1e-8 row, which M's own
  # eigenvalues (1e-16 of the largest) would lose.
  rows = _mixed_scale(np.random.default_rng(3))
  u = _direction("imtl_g", rows)
  proj = rows @ u / np.linalg.norm(rows, axis=1)
  np.testing.assert_allclose(proj, proj[0], rtol=1e-9)


def test_gradvac_matches_oracle_over_steps():
  rng = np.random.default_rng(5)
  target = np.zeros((K, K))
  state = jnp.zeros((K, K))
  with jax.enable_x64(True):
    step = jax.jit(functools.partial(weightings.gradvac, beta=0.3))
    for t in range(3):
      rows = rng.normal(size=(K, N))
      rows[1:] -= 0.8 * rows[0]
      key = jax.random.key(t)
      orders = np.asarray(_stateful.visiting_orders(key, K))
      w, state = step(jnp.asarray(rows @ rows.T), target=state, key=key)
      want, target = oracles.gradvac_direction(rows, orders, target, beta=0.3)
      _assert_close(np.asarray(w) @ rows, want, rows, 1e-9)
      np.testing.assert_allclose(np.asarray(state), target, atol=1e-12)


def test_modo_and_sdmgrad_match_oracles_over_steps():
  rng = np.random.default_rng(6)
  grams = []
  for _ in range(3):
    rows = rng.normal(size=(K, N))
    grams.append(rows @ rows.T)
  with jax.enable_x64(True):
    modo = jax.jit(functools.partial(weightings.modo, gamma=0.05, rho=0.1))
    sdmgrad = jax.jit(weightings.sdmgrad)
    lam = jnp.full((K,), 1.0 / K)
    w = lam
    for m in grams:
      lam = modo(jnp.asarray(m), previous=lam)
      weights, w = sdmgrad(jnp.asarray(m), previous=w)
  np.testing.assert_allclose(lam, oracles.modo_weights(grams, 0.05, 0.1),
                             atol=1e-12)
  np.testing.assert_allclose(weights, oracles.sdmgrad_weights(grams),
                             atol=1e-10)


def test_excess_mtl_matches_oracle_over_steps():
  rng = np.random.default_rng(7)
  steps = [rng.normal(size=(K, N)) * [[1.0], [0.1], [3.0], [1.0]]
           for _ in range(4)]
  for warmup in (0, 2):
    tx = osgd_jax.excess_mtl(0.5, warmup, num_exits=K)
    state = tx.init({"w": jnp.zeros(N)})
    with jax.enable_x64(True):
      update = jax.jit(tx.update)
      for rows, want in zip(steps, oracles.excess_mtl_updates(steps, 0.5,
                                                              warmup)):
        out, state = update({"w": jnp.asarray(rows)}, state)
        _assert_close(np.asarray(out["w"]), want, rows, 1e-6)


@pytest.mark.parametrize("case", sorted(CASES))
def test_trimmed_mean_matches_oracle_and_torchjd(case):
  tx = osgd_jax.trimmed_mean(1, num_exits=K)
  state = tx.init({"w": jnp.zeros(N)})
  rows = CASES[case](np.random.default_rng(sorted(CASES).index(case)))
  with jax.enable_x64(True):
    out, _ = tx.update({"w": jnp.asarray(rows)}, state)
  np.testing.assert_allclose(out["w"], oracles.trimmed_mean_direction(rows, 1),
                             rtol=1e-12)
  golden = _golden()["aggregators"]["trimmed_mean"]
  if case in golden["outputs"]:
    rows = np.asarray(_golden()["cases"][case])
    with jax.enable_x64(True):
      out, _ = tx.update({"w": jnp.asarray(rows[:, :N // 2])},
                         tx.init({"w": jnp.zeros(N // 2)}))
    np.testing.assert_allclose(out["w"], golden["outputs"][case], rtol=1e-11)


@pytest.mark.parametrize("case", ["random", "mixed_scale"])
def test_nash_mtl_is_the_bargaining_solution_clipped(case):
  rows = CASES[case](np.random.default_rng(sorted(CASES).index(case)))
  m = rows @ rows.T
  with jax.enable_x64(True):
    nash = jax.jit(weightings.nash_mtl)   # max_norm traced: one compile
    alpha = np.asarray(nash(jnp.asarray(m), max_norm=jnp.asarray(0.0)))
    clipped = np.asarray(nash(jnp.asarray(m), max_norm=jnp.asarray(1.0)))
  # ⟨g_k, d⟩ = 1/α_k on M/‖M‖_F: FairGrad's equation with α = 1.
  assert oracles.fairgrad_residual(m / np.linalg.norm(m), alpha, 1.0) < 1e-9
  norm = np.sqrt(alpha @ m @ alpha)
  np.testing.assert_allclose(clipped, alpha / max(norm, 1.0), rtol=1e-9)


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


def test_pcd_falls_back_to_the_primary_when_infeasible():
  # Two opposite secondaries cannot both get progress.
  rows = np.zeros((3, 4))
  rows[0, 0], rows[1, 1], rows[2, 1] = 2.0, 1.0, -3.0
  np.testing.assert_allclose(_direction("pcd", rows), rows[0], atol=1e-12)


def test_crmogm_smooths_the_wrapped_weights():
  # A cheap weighting to wrap (eager): the squared norms' shares.
  shares = lambda gram: jnp.diagonal(gram) / jnp.trace(gram)
  tx = osgd_jax.crmogm(shares, alpha=0.75, num_exits=2)
  state = tx.init({"w": jnp.zeros(2)})
  want = None
  for sq in ([1.0, 4.0], [4.0, 1.0], [1.0, 9.0]):
    g = jnp.asarray(np.diag(np.sqrt(sq)), jnp.float32)
    _, state = tx.update({"w": g}, state)
    fresh = np.asarray(sq) / np.sum(sq)
    want = fresh if want is None else 0.75 * want + 0.25 * fresh
    np.testing.assert_allclose(state.weights, want, rtol=1e-5)


def test_random_weighting_is_a_softmax_of_standard_normals():
  # log w_i − log w_j = z_i − z_j ~ N(0, 2); weights positive, summing to 1.
  keys = jax.random.split(jax.random.key(0), 4000)
  w = np.asarray(jax.jit(jax.vmap(
      lambda key: weightings.random_weighting(jnp.eye(K), key=key)))(keys))
  assert np.all(w > 0)
  np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-5)
  diff = np.log(w[:, 0]) - np.log(w[:, 1:]).T
  assert abs(diff.mean()) < 0.1 and abs(diff.var() - 2.0) < 0.15, (
      diff.mean(), diff.var())
  # Exchangeable: every exit is the heaviest about 1/K of the time.
  share = np.bincount(w.argmax(axis=1), minlength=K) / len(w)
  np.testing.assert_allclose(share, 1.0 / K, atol=0.03)


# --- against TorchJD ----------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _golden():
  with open(GOLDEN) as f:
    return json.load(f)


# TorchJD's projections solve the QP on the trace-normalised Gram plus 1e-4 I;
# its MGDA stops Frank–Wolfe early.
# Aligned-MTL's "rmse" on mixed scales: see MIXED_RTOL.
GOLDEN_RTOL = {"dualproj": 2e-4, "upgrad": 2e-4, "mgda": 2e-2,
               "aligned_mtl_rmse": 1e-6, "fairgrad": 1e-6, "fairgrad_2": 1e-5}
# TorchJD's pinv of M counts the 1e-8 row's eigenvalue (1e-16 of the largest)
# as zero; ours works with the cosines (see the test above).
# FairGrad on rank_deficient: no positive solution (see NO_ORACLE); TorchJD's
# least squares stops short of its own tolerance on mixed scales.
GOLDEN_SKIP = {("imtl_g", "mixed_scale"), ("fairgrad", "rank_deficient"),
               ("fairgrad_2", "rank_deficient")}


def _golden_entry(kind, name):
  """The file's entry for ``name``; every aggregator has one."""
  entry = _golden()[kind].get(name)
  assert entry is not None, (
      f"no TorchJD output for {name} in {GOLDEN}: regenerate it with"
      " tests/golden/make_torchjd_golden.py where torch and"
      " 'torchjd[cagrad,nash_mtl]' (cvxpy, ecos) are installed")
  return entry


# PCD is stateful in TorchJD (its EMA): see the sequences below.
@pytest.mark.parametrize("name", sorted(set(WEIGHTINGS) - {"pcd"}))
def test_matches_torchjd(name):
  golden = _golden_entry("aggregators", name)
  assert golden["kwargs"] == {
      k: list(v) if isinstance(v, tuple) else v
      for k, v in WEIGHTINGS[name][1].items()}
  for case, want in golden["outputs"].items():
    if (name, case) in GOLDEN_SKIP:
      continue
    rows = np.asarray(_golden()["cases"][case])
    _assert_close(_direction(name, rows), np.asarray(want), rows,
                  GOLDEN_RTOL.get(name, 1e-9))


# name in the file -> (transform, tolerance). GradVac and PCGrad with K = 2:
# each task has one other to visit, so TorchJD is deterministic. The states' float32
# EMAs bound the agreement to about 1e-7; CR-MOGM wraps UPGrad, whose QP
# TorchJD regularises.
STATEFUL_GOLDEN = {
    "gradvac": (osgd_jax.gradvac, 1e-6),
    "pcgrad": (osgd_jax.pcgrad, 1e-9),
    "pcd": (osgd_jax.pcd, 1e-6),
    "pcd_tau": (osgd_jax.pcd, 1e-6),
    "modo": (osgd_jax.modo, 1e-6),
    "sdmgrad": (osgd_jax.sdmgrad, 1e-6),
    "crmogm_upgrad": (functools.partial(osgd_jax.crmogm, "upgrad"), 2e-4),
    "excess_mtl": (osgd_jax.excess_mtl, 1e-6),
    "excess_mtl_warmup": (osgd_jax.excess_mtl, 1e-6),
    # TorchJD approaches Nash's solution by at most 20 warm-started cvxpy
    # steps, stopping at a residual of 1e-3; ours solves it. The first step
    # agrees to 1e-10; later ones differ by up to 3.3% of the update's scale.
    "nash_mtl": (osgd_jax.nash_mtl, 5e-2),
}


@pytest.mark.parametrize("name", sorted(STATEFUL_GOLDEN))
def test_stateful_transforms_match_torchjd_over_steps(name):
  golden = _golden_entry("stateful", name)
  factory, rtol = STATEFUL_GOLDEN[name]
  sequence = np.asarray(_golden()["sequences"][golden["sequence"]])
  k = sequence.shape[1]
  tx = factory(**golden["kwargs"], num_exits=k)
  state = tx.init({"w": jnp.zeros(sequence.shape[2])})
  with jax.enable_x64(True):
    update = jax.jit(tx.update)
    for rows, want in zip(sequence, golden["outputs"]):
      out, state = update({"w": jnp.asarray(rows)}, state)
      _assert_close(np.asarray(out["w"]), np.asarray(want), rows, rtol)


# --- properties -----------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _float32(name):
  fn, kwargs = WEIGHTINGS[name]
  return jax.jit(lambda rows: functools.partial(fn, **kwargs)(rows @ rows.T)
                 @ rows)


def _rows(seed, scales, zero):
  rng = np.random.default_rng(seed)
  rows = rng.normal(size=(K, N)) * 10.0 ** np.asarray(scales)[:, None]
  if zero is not None:
    rows[zero] = 0.0
  return rows.astype(np.float32)


seeds = st.integers(0, 2**31 - 1)
scales = st.lists(st.floats(-8, 8), min_size=K, max_size=K)
zeros = st.one_of(st.none(), st.integers(0, K - 1))
common = settings(max_examples=10, deadline=None)
DETERMINISTIC = ["imtl_g", "aligned_mtl", "krum", "dualproj", "cagrad",
                 "config", "fairgrad", "pcd"]
# PCD favours its first exit: not symmetric.
SYMMETRIC = [name for name in DETERMINISTIC if name != "pcd"]


@common
@given(seeds, scales, zeros)
def test_outputs_are_finite_everywhere(seed, scales, zero):
  rows = _rows(seed, scales, zero)
  for name in DETERMINISTIC:
    assert np.all(np.isfinite(np.asarray(_float32(name)(rows)))), name


@common
@given(seeds, st.lists(st.floats(-3, 3), min_size=K, max_size=K), zeros)
def test_dualproj_and_config_are_non_conflicting(seed, scales, zero):
  # ConFIG's claim needs independent rows (K ≤ N here; a zero row
  # constrains nothing), and its v = Ĝ⁺1 is as ill-conditioned as Ĝ, whose
  # condition the Gram squares: nearly parallel rows are beyond float32,
  # so ConFIG is checked in x64. DualProj's claim holds for any rows.
  rows = _rows(seed, scales, None)
  rows[1:] -= 0.9 * rows[0]   # conflicts to resolve
  if zero is not None:
    rows[zero] = 0.0
  norms = np.linalg.norm(rows.astype(np.float64), axis=1)
  for name, u in (
      ("dualproj", np.asarray(_float32("dualproj")(rows), np.float64)),
      ("config", _direction("config", rows.astype(np.float64)))):
    assert np.all(rows @ u >= -1e-4 * norms * norms.sum()), (name, rows @ u)


# Invariances are properties of the maths: checked in x64 (the weightings
# compiled for the oracle tests), away from float32's conditioning.


@common
@given(seeds, st.permutations(range(K)))
def test_symmetric_weightings_ignore_the_exits_order(seed, perm):
  rows = _rows(seed, [0.0, 1.0, -1.0, 0.5], None).astype(np.float64)
  for name in SYMMETRIC:
    u = _direction(name, rows)
    permuted = _direction(name, rows[np.asarray(perm)])
    np.testing.assert_allclose(permuted, u, rtol=1e-9,
                               atol=1e-12 * np.abs(u).max(), err_msg=name)


@common
@given(seeds, st.lists(st.floats(-3, 3), min_size=K, max_size=K))
def test_imtl_g_line_ignores_the_rows_scales(seed, log_c):
  # The line, not the direction: Σ w = 1 can flip the sign.
  rows = _rows(seed, [0.0] * K, None).astype(np.float64)
  u = _direction("imtl_g", rows)
  scaled = _direction("imtl_g", rows * 10.0 ** np.asarray(log_c)[:, None])
  cos = u @ scaled / (np.linalg.norm(u) * np.linalg.norm(scaled))
  assert abs(cos) > 1 - 1e-12, cos


# --- the transformations --------------------------------------------------------


TRANSFORMS = {
    "random_weighting": osgd_jax.random_weighting,
    "imtl_g": osgd_jax.imtl_g,
    "aligned_mtl": osgd_jax.aligned_mtl,
    "krum": osgd_jax.krum,
    "dualproj": osgd_jax.dualproj,
    "gradvac": osgd_jax.gradvac,
    "cagrad": osgd_jax.cagrad,
    "config": osgd_jax.aggregation.config,
    "fairgrad": osgd_jax.fairgrad,
    "modo": osgd_jax.modo,
    "sdmgrad": osgd_jax.sdmgrad,
    "crmogm": osgd_jax.crmogm,
    "pcd": osgd_jax.pcd,
}


# Coordinate-wise, or one group by construction: no granularity.
COORDINATEWISE = {
    "nash_mtl": osgd_jax.nash_mtl,
    "trimmed_mean": osgd_jax.trimmed_mean,
    "graddrop": osgd_jax.graddrop,
    "excess_mtl": osgd_jax.excess_mtl,
}


@pytest.mark.parametrize("name", sorted(TRANSFORMS) + sorted(COORDINATEWISE))
def test_transform_scans_and_keeps_its_state(name):
  """jit + lax.scan over steps; the state keeps its structure and dtypes."""
  tx = (TRANSFORMS[name](num_exits=K, granularity="leaf") if name in TRANSFORMS
        else COORDINATEWISE[name](num_exits=K))
  params = {"b": jnp.zeros(3), "w": jnp.zeros((2, 3))}
  rng = np.random.default_rng(0)
  grads = {n: jnp.asarray(rng.normal(size=(3, K) + p.shape), jnp.float32)
           for n, p in params.items()}

  def step(state, g):
    updates, state = tx.update(g, state, params)
    return state, updates

  state0 = tx.init(params)
  state, updates = jax.jit(lambda s: jax.lax.scan(step, s, grads))(state0)
  chex.assert_trees_all_equal_structs(state0, state)
  chex.assert_trees_all_equal_shapes_and_dtypes(state0, state)
  chex.assert_tree_all_finite((state, updates))
  chex.assert_trees_all_equal_shapes(
      updates, jax.tree.map(lambda p: jnp.zeros((3,) + p.shape), params))
  for field, shape in (("weights", (K,)), ("exit_norms", (K,)),
                       ("cosine", (K, K))):
    assert optax.tree_utils.tree_get(state, field).shape == shape, field


def test_coordinatewise_states_keep_their_sharding_types():
  """The transformations not built by from_weighting, on an Explicit mesh.

  (tests/test_contract.py runs the full harness on from_weighting's; these
  few cases cost a fraction of it.)
  """
  mesh = jax.make_mesh((4, 2), ("data", "model"),
                       axis_types=(AxisType.Explicit,) * 2)
  put = lambda x, *spec: jax.device_put(x, NamedSharding(mesh, P(*spec)))
  types = lambda tree: jax.tree.map(jax.typeof, tree)
  rng = np.random.default_rng(0)
  with jax.set_mesh(mesh):
    params = {"b": put(jnp.zeros(6), "model"),
              "w": put(jnp.zeros((4, 6)), None, "model")}
    grads = {"b": put(jnp.asarray(rng.normal(size=(K, 6)), jnp.float32),
                      None, "model"),
             "w": put(jnp.asarray(rng.normal(size=(K, 4, 6)), jnp.float32),
                      None, None, "model")}
    for tx in (osgd_jax.graddrop(num_exits=K), osgd_jax.excess_mtl(
        num_exits=K), osgd_jax.trimmed_mean(num_exits=K)):
      state0 = tx.init(params)
      updates, state1 = jax.jit(tx.update)(grads, state0, params)
      chex.assert_trees_all_equal(types(state0), types(state1))
      chex.assert_trees_all_equal(types(updates), types(params))


def test_mean_sum_and_constant_are_weighted_sum_presets():
  g = {"w": jnp.asarray([[1.0, 2.0], [3.0, 6.0]])}
  params = {"w": jnp.zeros(2)}
  for weights, want in (("mean", [2.0, 4.0]), ("sum", [4.0, 8.0]),
                        ([0.5, -1.0], [-2.5, -5.0])):
    tx = osgd_jax.weighted_sum(weights, num_exits=2)
    np.testing.assert_allclose(tx.update(g, tx.init(params))[0]["w"], want)


def test_options_are_checked_with_a_fix():
  with pytest.raises(ValueError, match=r"num_exits >= 4.*lower n_byzantine"):
    osgd_jax.krum(n_byzantine=1, num_exits=3)
  with pytest.raises(ValueError, match=r"scale_mode must be one of"):
    osgd_jax.aligned_mtl(scale_mode="max", num_exits=3)
  with pytest.raises(ValueError, match=r"pref_vector must be 3 finite"):
    osgd_jax.dualproj([0.5, 0.5], num_exits=3)
  with pytest.raises(ValueError, match=r"c must be a finite number >= 0"):
    osgd_jax.cagrad(-0.1, num_exits=3)
  with pytest.raises(ValueError, match=r"beta must be in \[0, 1\]"):
    osgd_jax.gradvac(beta=1.5, num_exits=3)
  with pytest.raises(ValueError, match=r"tau must be one number or 2"):
    osgd_jax.pcd(tau=[0.1, 0.2, 0.3], num_exits=3)
  with pytest.raises(ValueError, match=r"unknown weighting 'nope'"):
    osgd_jax.crmogm("nope", num_exits=3)
  with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\)"):
    osgd_jax.sdmgrad(momentum=1.0, num_exits=3)
  with pytest.raises(ValueError, match=r"num_exits >= 2 \* trim_number \+ 1"):
    osgd_jax.trimmed_mean(2, num_exits=4)
  with pytest.raises(ValueError, match=r"leak must be 3 numbers in \[0, 1\]"):
    osgd_jax.graddrop(leak=[0.5, 2.0, 0.0], num_exits=3)
  with pytest.raises(ValueError, match=r"n_warmup_steps must be an int"):
    osgd_jax.excess_mtl(n_warmup_steps=-1, num_exits=3)
  with pytest.raises(ValueError, match=r"shape \(3,\).*K=2"):
    weightings.constant(jnp.eye(2), weights=[1.0, 2.0, 3.0])
