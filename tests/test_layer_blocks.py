"""The ``"blocks"`` Gramian: per-layer Gram blocks from inputs and cotangents.

Checked against a float64 NumPy oracle: the same network written for NumPy,
its Jacobian by central finite differences, its Gram matrices and ``Jᵀ w``.
The network exercises every way a parameter is tapped (right and left
operand of a product, an einsum with two free axes, a head shared by three
exits, two leaves concatenated into one kernel, blocks of a leaf cut along
a free and a contracted axis) and every way one is not (a bias, a parameter
also used elementwise, a parameter inside a nested ``jax.jit``), at a batch
where the tapped leaves contract by their N×N kernel and at one where they
form their rows.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import osgd_jax

SHAPES = {
  "w1": (5, 6),  # x @ w1: right operand
  "b1": (6,),  # a bias: added, not tapped
  "w2": (6, 6),  # einsum("btd,hd->bth"): contracted on its last axis
  "w3": (6, 6),  # einsum("dh,btd->bth"): left operand
  "w4": (6, 2, 3),  # two free axes
  "head": (6, 3),  # one head for three exits: three uses
  "c1": (6, 3),  # concatenated with c2 into one kernel
  "c2": (6, 2),
  "scale": (6, 6),  # in a product and elementwise: not tapped
  "inner": (6, 4),  # inside a nested jax.jit: not tapped
}
TAPPED = {"w1", "w2", "w3", "w4", "head", "c1", "c2"}


def _network(p, x, xp, jit=lambda f: f):
  """Four exit losses of ``x`` (batch, time, 5); ``xp`` is np or jnp."""
  h1 = xp.tanh(xp.einsum("btd,dh->bth", x, p["w1"]) + p["b1"])
  h2 = xp.tanh(xp.einsum("btd,hd->bth", h1, p["w2"]))
  h3 = xp.tanh(xp.einsum("dh,btd->bth", p["w3"], h2))
  e4 = xp.einsum("btd,dqr->btqr", h3, p["w4"])
  mixed = xp.einsum("btd,dh->bth", h3, p["scale"]) + 0.1 * xp.sum(p["scale"])
  inner = jit(lambda h, w: xp.tanh(xp.einsum("btd,dh->bth", h, w)))
  head = lambda h: xp.einsum("btd,dc->btc", h, p["head"])  # noqa: E731
  joined = xp.einsum(
    "btd,dh->bth", h2, xp.concatenate([p["c1"], p["c2"]], axis=1)
  )
  # Blocks of w1 and w2, as a MatFormer's smaller models use: cut along a
  # free axis and along a contracted one.
  part = xp.einsum("btd,dh->bth", x, p["w1"][:, :3])
  part += xp.einsum("btd,hd->bth", h2[..., :4], p["w2"][:3, :4])
  return xp.stack(
    [
      xp.mean(head(h1) ** 2) + xp.mean(xp.sin(part)),
      xp.mean(head(h2) ** 2) + xp.mean(e4**2) + xp.mean(joined**3),
      xp.mean(xp.sin(head(h3))) + xp.mean(mixed**2),
      xp.mean(inner(h3, p["inner"]) ** 2) + xp.sum(p["b1"] ** 2),
    ]
  )


def _jax_loss(p, x):
  return _network(p, x, jnp, jax.jit)


def _numpy_jacobian(params, x, step=1e-6):
  """Central finite differences of the NumPy network: {name: (K, *shape)}."""
  rows = {}
  for name, value in params.items():
    flat = value.reshape(-1)
    cols = []
    for i in range(flat.size):
      plus, minus = dict(params), dict(params)
      for sign, target in ((1, plus), (-1, minus)):
        moved = flat.copy()
        moved[i] += sign * step
        target[name] = moved.reshape(value.shape)
      cols.append((_network(plus, x, np) - _network(minus, x, np)) / (2 * step))
    rows[name] = np.stack(cols, axis=1).reshape((-1, *value.shape))
  return rows


def _gram(rows):
  """The K×K Gram matrix of (K, ...) rows."""
  flat = np.reshape(rows, (rows.shape[0], -1))
  return flat @ flat.T


def _setup(batch, seed=0):
  rng = np.random.default_rng(seed)
  params = {n: rng.normal(size=s) / np.sqrt(s[0]) for n, s in SHAPES.items()}
  x = rng.normal(size=(batch, 2, 5))
  return params, x


@pytest.mark.parametrize(
  ("batch", "contraction"), [(1, "kernel"), (12, "rows")]
)
def test_blocks_equal_a_numpy_finite_difference_oracle(batch, contraction):
  params, x = _setup(batch)
  rows = _numpy_jacobian(params, x)
  names = sorted(params)  # the tree's leaf order
  leaf_grams = np.stack([_gram(rows[n]) for n in names])
  weights = np.asarray([0.5, -1.0, 2.0, 0.25])
  leaf_weights = np.linspace(-1, 1, 4 * len(names)).reshape(len(names), 4)
  with jax.enable_x64(True):
    p = jax.tree.map(jnp.asarray, params)
    value_and_gramian = osgd_jax.value_and_gramian(_jax_loss, form="blocks")
    losses, gramian = jax.jit(value_and_gramian)(p, jnp.asarray(x))
    got = jax.jit(
      lambda g: (
        g.grams("global"),
        g.grams("leaf"),
        g.combine(jnp.asarray(weights)),
        g.combine(jnp.asarray(leaf_weights), "leaf"),
      )
    )(gramian)
  assert gramian.form == "blocks"
  taps = {names[t.leaf]: t for t in gramian.engine.taps}
  assert set(taps) == TAPPED
  assert len(taps["head"].uses) == 3
  assert {t.contraction for t in taps.values()} == {contraction}
  np.testing.assert_allclose(losses, _network(params, x, np), rtol=1e-12)
  scale = np.abs(leaf_grams).max()
  np.testing.assert_allclose(got[0][0], leaf_grams.sum(0), atol=1e-7 * scale)
  np.testing.assert_allclose(got[1], leaf_grams, atol=1e-7 * scale)
  for i, name in enumerate(names):
    row_scale = np.abs(rows[name]).max()
    np.testing.assert_allclose(
      got[2][name],
      np.tensordot(weights, rows[name], axes=1),
      atol=1e-7 * row_scale,
    )
    np.testing.assert_allclose(
      got[3][name],
      np.tensordot(leaf_weights[i], rows[name], axes=1),
      atol=1e-7 * row_scale,
    )


@settings(max_examples=8, deadline=None)
@given(
  batch=st.integers(1, 6),
  width=st.integers(1, 5),
  exits=st.integers(1, 4),
  left=st.booleans(),
  seed=st.integers(0, 2**16),
)
def test_blocks_equal_the_vmapped_rows(batch, width, exits, left, seed):
  """Any batch, width, K and operand side: the Gram matrices of the rows."""
  rng = np.random.default_rng(seed)
  with jax.enable_x64(True):
    p = {
      "a": jnp.asarray(rng.normal(size=(3, width))),
      "b": jnp.asarray(rng.normal(size=(width, width))),
    }
    x = jnp.asarray(rng.normal(size=(batch, 3)))

    def loss_fn(p, x):
      h = jnp.tanh(x @ p["a"])
      h2 = p["b"].T @ h.T if left else (h @ p["b"]).T
      return jnp.stack(
        [jnp.mean(jnp.cos(k + h2) * h.sum()) for k in range(exits)]
      )

    taps = []

    @jax.jit
    def both(p, x):
      _, rows = osgd_jax.value_and_per_exit_grads(loss_fn)(p, x)
      _, gramian = osgd_jax.value_and_gramian(loss_fn, form="blocks")(p, x)
      taps.append(gramian.engine.taps)
      return rows, gramian.grams("leaf")

    rows, got = both(p, x)
    assert len(taps[0]) == 2
    expected = np.stack([_gram(np.asarray(r)) for r in jax.tree.leaves(rows)])
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


def test_auto_picks_blocks_only_where_untapped_parameters_are_few():
  """K × (bytes of untapped leaves) ≤ P: blocks; else the other forms."""
  rng = np.random.default_rng(1)
  params = {
    "w": jnp.asarray(rng.normal(size=(64, 64)), jnp.float32),
    "v": jnp.asarray(rng.normal(size=(64,)), jnp.float32),
  }
  x = jnp.ones((2, 64))

  def dense(p, x):
    h = jnp.tanh(x @ p["w"] + p["v"])
    return jnp.stack([jnp.mean(h), jnp.mean(h**2), jnp.mean(h**3)])

  def elementwise(p, x):  # w is also scaled elementwise: nothing to tap
    return dense({"w": p["w"] * 1.5, "v": p["v"]}, x)

  _, gramian = osgd_jax.value_and_gramian(dense)(params, x)
  assert gramian.form == "blocks"
  _, gramian = osgd_jax.value_and_gramian(elementwise)(params, x)
  assert gramian.form == "scan"
  _, gramian = osgd_jax.value_and_gramian(elementwise, form="blocks")(params, x)
  assert gramian.engine.taps == ()  # every leaf by its rows: still right
  _, rows = osgd_jax.value_and_per_exit_grads(elementwise)(params, x)
  expected = sum(_gram(np.asarray(r)) for r in jax.tree.leaves(rows))
  np.testing.assert_allclose(gramian.grams()[0], expected, rtol=1e-5)


def test_an_nnx_mlp_gets_blocks_and_the_stacked_update():
  """nnx.Linear kernels are tapped, biases and norms are not.

  The update equals the stacked path's, and BatchNorm (train mode) moves
  its statistics once per call, as the stacked path does.
  """

  class Net(nnx.Module):
    def __init__(self, rngs):
      # Wide enough for the parameters to dominate: "auto" picks blocks.
      self.a = nnx.Linear(8, 128, rngs=rngs)
      self.norm = nnx.BatchNorm(128, rngs=rngs)
      self.b = nnx.Linear(128, 128, rngs=rngs)
      self.head = nnx.Linear(128, 4, rngs=rngs)

    def __call__(self, x):
      h1 = jax.nn.relu(self.norm(self.a(x)))
      h2 = jax.nn.relu(self.b(h1))
      return [self.head(h1), self.head(h2)]

  def loss_fn(model, x, y):
    return osgd_jax.per_exit_cross_entropy(model(x), y)

  models = [Net(nnx.Rngs(0)) for _ in range(2)]
  x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 8)), jnp.float32)
  y = jnp.asarray([0, 1, 2, 3])
  params = nnx.state(models[0], nnx.Param)
  tx = optax.chain(osgd_jax.osgd(num_exits=2), optax.sgd(0.1, momentum=0.9))
  state = tx.init(params)
  seen = []

  @nnx.jit
  def both(gramian_model, stacked_model, x, y):
    _, gramian = osgd_jax.value_and_gramian(loss_fn)(gramian_model, x, y)
    _, stacked = osgd_jax.value_and_per_exit_grads(loss_fn)(stacked_model, x, y)
    seen.append((gramian, stacked))
    return tx.update(gramian, state, params), tx.update(stacked, state, params)

  got, expected = both(*models, x, y)
  gramian, stacked = seen[0]
  assert gramian.form == "blocks"
  paths = [
    jax.tree_util.keystr(path)
    for path, _ in jax.tree_util.tree_flatten_with_path(stacked)[0]
  ]
  tapped = {paths[t.leaf] for t in gramian.engine.taps}
  assert tapped == {p for p in paths if "kernel" in p}
  chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-6)
  stats = [nnx.state(m, nnx.BatchStat) for m in models]
  # Moved once, from the initial (0, 1), like the stacked path's.
  assert float(jnp.abs(stats[0]["norm"]["mean"][...]).max()) > 0
  chex.assert_trees_all_close(stats[0], stats[1], rtol=1e-6, atol=1e-7)
