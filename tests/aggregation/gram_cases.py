"""Gradient rows of K = 4 exits, jitted weightings and TorchJD's outputs.

Shared by the weighting-level tests of every method: a weighting is compared
with a float64 NumPy oracle of its paper's definition (tests/numpy_oracles.py)
on random, rank-deficient, zero-row and mixed-scale (1e-8…1e8) gradients, and
with TorchJD's own outputs, stored in tests/golden/torchjd_golden.json by
tests/golden/make_torchjd_golden.py (so the suite never imports torch).

The weightings are compared in x64 (the algorithms, not float32 rounding),
each jitted once per (weighting, options) for the whole session, whichever
test file asks for it first.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import settings
from hypothesis import strategies as st

K, N = 4, 12
GOLDEN = os.path.join(
  os.path.dirname(os.path.dirname(__file__)), "golden", "torchjd_golden.json"
)


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


def mixed_scale(rng):
  return rng.normal(size=(K, N)) * 10.0 ** np.array(
    [[-8.0], [-3.0], [2.0], [8.0]]
  )


CASES = {
  "random": _random,
  "rank_deficient": _rank_deficient,
  "zero_row": _zero_row,
  "mixed_scale": mixed_scale,
}


def case_rows(case):
  """The rows of ``case``, seeded by its place in the sorted case names."""
  return CASES[case](np.random.default_rng(sorted(CASES).index(case)))


@functools.cache
def _jitted(weighting, options):
  return jax.jit(functools.partial(weighting, **dict(options)))


def jitted(weighting, **options):
  """``weighting`` with ``options``, jitted once per (weighting, options).

  (Under x64 for float64: jit traces once per dtype.) An option that is an
  array (a PRNG key) cannot key the cache: that weighting is jitted anew.
  """
  key = tuple(sorted(options.items()))
  try:
    hash(key)
  except TypeError:
    return jax.jit(functools.partial(weighting, **options))
  return _jitted(weighting, key)


def direction(weighting, rows, **options):
  """``wᵀ G`` with the weights of ``weighting`` on ``G Gᵀ``, in float64."""
  with jax.enable_x64(True):
    w = np.asarray(
      jitted(weighting, **options)(jnp.asarray(rows @ rows.T, jnp.float64))
    )
  assert w.shape == (len(rows),) and np.all(np.isfinite(w)), w
  return w @ rows


def weighted_rows(weighting, rows, **options):
  """``wᵀ G`` in float64, checking only the weights' shape."""
  with jax.enable_x64(True):
    gram = jnp.asarray(rows @ rows.T, jnp.float64)
    weights = np.asarray(jitted(weighting, **options)(gram))
  assert weights.shape == (len(rows),)
  return weights @ rows


def conflicting_rows(seed):
  """K rows, the second conflicting with the first, the last in their span."""
  rng = np.random.default_rng(seed)
  rows = rng.normal(size=(K, N))
  rows[1] -= 1.2 * rows[0]  # conflicting
  rows[3] = 0.5 * rows[0] + rows[2]  # in the span of earlier rows
  return rows


def assert_close(got, want, rows, rtol):
  """|got − want| ≤ rtol · Σ_k ‖g_k‖, the scale of the update."""
  scale = np.linalg.norm(rows, axis=1).sum()
  err = np.max(np.abs(got - want))
  assert err <= rtol * scale, (err / scale, rtol)


# --- TorchJD's outputs --------------------------------------------------------


@functools.cache
def golden():
  with open(GOLDEN) as f:
    return json.load(f)


def golden_entry(kind, name):
  """The file's entry for ``name``; every aggregator has one."""
  entry = golden()[kind].get(name)
  assert entry is not None, (
    f"no TorchJD output for {name} in {GOLDEN}: regenerate it with"
    " tests/golden/make_torchjd_golden.py where torch and"
    " 'torchjd[cagrad,nash_mtl]' (cvxpy, ecos) are installed"
  )
  return entry


def assert_matches_torchjd(name, weighting, options, rtol, skip=()):
  """``weighting`` with ``options`` gives TorchJD's ``name`` on its cases.

  Args:
    name: the aggregator's name in the file.
    weighting: the weighting compared.
    options: its keyword arguments; the file's must be the same.
    rtol: the tolerance of :func:`assert_close`.
    skip: cases of the file not compared (each with its reason where it is
      called).
  """
  entry = golden_entry("aggregators", name)
  assert entry["kwargs"] == {
    k: list(v) if isinstance(v, tuple) else v for k, v in options.items()
  }
  for case, want in entry["outputs"].items():
    if case in skip:
      continue
    rows = np.asarray(golden()["cases"][case])
    assert_close(
      direction(weighting, rows, **options), np.asarray(want), rows, rtol
    )


def assert_matches_torchjd_over_steps(name, factory, rtol):
  """The transformation of ``factory`` follows TorchJD's stateful ``name``.

  From a fresh state, over the file's sequence of Jacobians, in x64.
  """
  entry = golden_entry("stateful", name)
  sequence = np.asarray(golden()["sequences"][entry["sequence"]])
  k = sequence.shape[1]
  tx = factory(**entry["kwargs"], num_exits=k)
  state = tx.init({"w": jnp.zeros(sequence.shape[2])})
  with jax.enable_x64(True):
    update = jax.jit(tx.update)
    for rows, want in zip(sequence, entry["outputs"], strict=True):
      out, state = update({"w": jnp.asarray(rows)}, state)
      assert_close(np.asarray(out["w"]), np.asarray(want), rows, rtol)


# --- for the properties -------------------------------------------------------


@functools.cache
def _float32(weighting, options):
  fn = functools.partial(weighting, **dict(options))
  return jax.jit(lambda rows: fn(rows @ rows.T) @ rows)


def float32_direction(weighting, rows, **options):
  """``wᵀ G`` in float32, jitted once per (weighting, options)."""
  return _float32(weighting, tuple(sorted(options.items())))(rows)


seeds = st.integers(0, 2**31 - 1)
scales = st.lists(st.floats(-8, 8), min_size=K, max_size=K)
zeros = st.one_of(st.none(), st.integers(0, K - 1))
common = settings(max_examples=10, deadline=None)


def property_rows(seed, scales, zero):
  rng = np.random.default_rng(seed)
  rows = rng.normal(size=(K, N)) * 10.0 ** np.asarray(scales)[:, None]
  if zero is not None:
    rows[zero] = 0.0
  return rows.astype(np.float32)


def assert_finite_everywhere(weighting, seed, scales, zero, **options):
  """``weighting``'s float32 update of the property rows is finite."""
  rows = property_rows(seed, scales, zero)
  assert np.all(
    np.isfinite(np.asarray(float32_direction(weighting, rows, **options)))
  )


def assert_ignores_the_exits_order(weighting, seed, perm, **options):
  """Permuting the exits leaves ``weighting``'s update as it is.

  An invariance of the maths: checked in x64, away from float32's
  conditioning.
  """
  rows = property_rows(seed, [0.0, 1.0, -1.0, 0.5], None).astype(np.float64)
  u = direction(weighting, rows, **options)
  permuted = direction(weighting, rows[np.asarray(perm)], **options)
  np.testing.assert_allclose(
    permuted, u, rtol=1e-9, atol=1e-12 * np.abs(u).max()
  )


def assert_non_conflicting(seed, scales, zero, update):
  """``update(rows)`` conflicts with no row of rows made to conflict.

  Every later row conflicts with the first; then the row ``zero``, if any,
  is zeroed. ``update`` takes the float32 rows and returns a float64 update.
  """
  rows = property_rows(seed, scales, None)
  rows[1:] -= 0.9 * rows[0]  # conflicts to resolve
  if zero is not None:
    rows[zero] = 0.0
  norms = np.linalg.norm(rows.astype(np.float64), axis=1)
  u = update(rows)
  assert np.all(rows @ u >= -1e-4 * norms * norms.sum()), rows @ u


def assert_matches_oracle(weighting, oracle, case, rtol, **options):
  """``weighting`` with ``options`` gives ``oracle``'s update on ``case``."""
  rows = case_rows(case)
  assert_close(direction(weighting, rows, **options), oracle(rows), rows, rtol)


def random_grams(seed, steps):
  """``steps`` Gram matrices of random K × N rows, in float64."""
  rng = np.random.default_rng(seed)
  grams = []
  for _ in range(steps):
    rows = rng.normal(size=(K, N))
    grams.append(rows @ rows.T)
  return grams
